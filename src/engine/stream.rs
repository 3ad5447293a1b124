//! Incremental detokenisation: generated ids in, newly completed text out.
//!
//! Everything a [`StreamDecoder`] returns, [`StreamDecoder::finish`] included, concatenates to
//! `tokenizer.decode(all_ids, true)`. Text is released only once no later token can change it:
//! not while the decoded text ends in U+FFFD (a UTF-8 character split over byte tokens), and,
//! for tokenizers whose decode applies `clean_up_tokenization` (InternLM2's always does), not
//! while one of the last three characters before any clean-up is a space, since
//! `" ." -> "."`, `" 's" -> "'s"` and the like only ever remove spaces that start a pattern of
//! at most four characters.
//!
//! Each step decodes the whole sequence again: linear per token, which is small next to a
//! forward pass for any response length a chat produces.
use crate::prompt::tokenizer::Tokenizer;

/// Turns a stream of generated token ids into text, skipping special tokens. Every call must
/// pass the same tokenizer.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Bytes of the decoded text already returned.
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one generated id; returns the text it completed, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let raw = tokenizer.decode_uncleaned(&self.ids);
        if raw.ends_with('\u{FFFD}') {
            return None;
        }
        if !tokenizer.cleans_up() {
            return self.take(raw);
        }
        if raw.chars().rev().take(3).any(|c| c == ' ') {
            return None;
        }
        self.take(tokenizer.decode(&self.ids, true))
    }

    /// The text still held back, once generation has ended.
    pub fn finish(mut self, tokenizer: &Tokenizer) -> Option<String> {
        let text = tokenizer.decode(&self.ids, true);
        self.take(text)
    }

    fn take(&mut self, text: String) -> Option<String> {
        let new = text.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = text.len();
        (!new.is_empty()).then_some(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::tests::{golden_cases, ids, MODELS};
    use crate::testutil::fixture;

    fn tokenizer(model: &str) -> Tokenizer {
        Tokenizer::from_dir(&fixture(&format!("models/{model}"))).unwrap()
    }

    /// Feeds `ids` one by one; returns what each call gave (`""` for nothing), `finish` last.
    fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut decoder = StreamDecoder::new();
        let mut chunks: Vec<Option<String>> =
            ids.iter().map(|&id| decoder.push(tokenizer, id)).collect();
        chunks.push(decoder.finish(tokenizer));
        assert!(
            chunks.iter().flatten().all(|c| !c.is_empty()),
            "Some(\"\") returned"
        );
        chunks.into_iter().map(Option::unwrap_or_default).collect()
    }

    #[test]
    fn streaming_every_golden_generation_gives_the_full_decode() {
        for model in MODELS {
            let tokenizer = tokenizer(model);
            for (name, case) in golden_cases(model) {
                for turn in case["turns"].as_array().unwrap() {
                    let ids = ids(&turn["generated_ids"]);
                    let chunks = stream(&tokenizer, &ids);
                    assert_eq!(
                        chunks.concat(),
                        tokenizer.decode(&ids, true),
                        "{model}/{name}"
                    );
                    // text flows while generating, not only at the end
                    assert!(
                        chunks[..ids.len()].iter().any(|c| !c.is_empty()),
                        "{model}/{name}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_emoji_split_over_byte_tokens_comes_out_whole() {
        for model in ["tiny-qwen2", "tiny-internlm2"] {
            let tokenizer = tokenizer(model);
            let ids = tokenizer.encode("emoji 🦀🐼 ok").unwrap();
            // the crab's bytes are spread over several tokens: the first of them alone is invalid
            let partial = ids
                .iter()
                .position(|&id| tokenizer.decode(&[id], true).contains('\u{FFFD}'));
            let partial = partial.unwrap();
            assert!(
                tokenizer
                    .decode(&ids[..=partial], true)
                    .ends_with('\u{FFFD}'),
                "{model}"
            );
            let chunks = stream(&tokenizer, &ids);
            assert_eq!(chunks[partial], "", "{model}");
            assert!(
                chunks.iter().all(|c| !c.contains('\u{FFFD}')),
                "{model}: {chunks:?}"
            );
            assert!(
                chunks.iter().any(|c| c.contains('🦀')),
                "{model}: {chunks:?}"
            );
            assert_eq!(chunks.concat(), "emoji 🦀🐼 ok", "{model}");
        }
        // InternLM2 spells 🦀 as four byte pieces after BOS: nothing until the last one
        let tokenizer = tokenizer("tiny-internlm2");
        let ids = [1, 3 + 0xF0, 3 + 0x9F, 3 + 0xA6, 3 + 0x80];
        assert_eq!(stream(&tokenizer, &ids), ["", "", "", "", "🦀", ""]);
    }

    #[test]
    fn clean_up_spaces_are_held_until_settled() {
        // InternLM2's decode turns " ," into ",": the space must not be released early
        let tokenizer = tokenizer("tiny-internlm2");
        let ids = tokenizer.encode("Hello , world ' s").unwrap();
        let chunks = stream(&tokenizer, &ids);
        assert_eq!(chunks.concat(), tokenizer.decode(&ids, true));
        assert_eq!(chunks.concat(), "Hello, world's");
    }

    #[test]
    fn an_unfinished_character_is_flushed_at_the_end() {
        let tokenizer = tokenizer("tiny-internlm2");
        let ids = [3 + 0xE4, 3 + 0xB8];
        assert_eq!(stream(&tokenizer, &ids), ["", "", "\u{FFFD}\u{FFFD}"]);
    }
}

/// Makes streamed text add up to the trimmed answer (`response.strip()`): leading whitespace is
/// dropped and trailing whitespace held back until more text follows it.
#[derive(Debug, Default)]
pub struct Trimmed {
    started: bool,
    held: String,
}

impl Trimmed {
    pub fn push(&mut self, text: &str) -> Option<String> {
        let text = if self.started {
            text
        } else {
            text.trim_start()
        };
        if text.is_empty() {
            return None;
        }
        self.started = true;
        let body = text.trim_end();
        let tail = &text[body.len()..];
        if body.is_empty() {
            self.held.push_str(tail);
            return None;
        }
        let out = std::mem::take(&mut self.held) + body;
        self.held.push_str(tail);
        Some(out)
    }
}

#[cfg(test)]
mod trim_tests {
    use super::Trimmed;

    #[test]
    fn streamed_pieces_add_up_to_the_trimmed_text() {
        let pieces = ["  ", "\n Hello", " ", "world", "  \n", "!", " \n "];
        let mut t = Trimmed::default();
        let out: String = pieces.iter().filter_map(|p| t.push(p)).collect();
        assert_eq!(out, pieces.concat().trim());
    }
}

/// The streamed text of an answer, as the user sees it: stop tokens left out, never a partial
/// character, and adding up to the trimmed answer (`response.strip()`).
pub struct AnswerStream {
    tokenizer: std::sync::Arc<Tokenizer>,
    stops: Vec<u32>,
    decoder: StreamDecoder,
    trim: Trimmed,
}

impl AnswerStream {
    pub fn new(tokenizer: std::sync::Arc<Tokenizer>, stops: Vec<u32>) -> Self {
        Self {
            tokenizer,
            stops,
            decoder: StreamDecoder::new(),
            trim: Trimmed::default(),
        }
    }

    /// New text after token `id`, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        if self.stops.contains(&id) {
            return None;
        }
        let text = self.decoder.push(&self.tokenizer, id)?;
        self.trim.push(&text)
    }

    /// Text held back until generation ended.
    pub fn finish(self) -> Option<String> {
        let mut trim = self.trim;
        let text = self.decoder.finish(&self.tokenizer)?;
        trim.push(&text)
    }
}
