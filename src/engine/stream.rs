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
    /// Pass text through as decoded (-hf checkpoints: transformers does not strip).
    off: bool,
}

impl Trimmed {
    pub fn push(&mut self, text: &str) -> Option<String> {
        if self.off {
            return (!text.is_empty()).then(|| text.to_string());
        }
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
        let mut t = Trimmed {
            off: true,
            ..Trimmed::default()
        };
        let out: String = pieces.iter().filter_map(|p| t.push(p)).collect();
        assert_eq!(out, pieces.concat());
    }
}

/// The streamed text of an answer, as the user sees it: stop tokens left out, never a partial
/// character, and adding up to the trimmed answer (`response.strip()`). With stop strings, the
/// text ends before the first one (text that may begin one is held back until it cannot).
pub struct AnswerStream {
    tokenizer: std::sync::Arc<Tokenizer>,
    stops: Vec<u32>,
    decoder: StreamDecoder,
    trim: Trimmed,
    stop_strings: Vec<String>,
    /// The decoded text so far (stop strings only).
    raw: String,
    /// Bytes of `raw` passed on.
    released: usize,
    /// Where the first stop string begins in `raw`, once one has.
    stop_at: Option<usize>,
}

impl AnswerStream {
    pub fn new(tokenizer: std::sync::Arc<Tokenizer>, stops: Vec<u32>) -> Self {
        Self {
            tokenizer,
            stops,
            decoder: StreamDecoder::new(),
            trim: Trimmed::default(),
            stop_strings: Vec::new(),
            raw: String::new(),
            released: 0,
            stop_at: None,
        }
    }

    /// Streams the answer as decoded, without the `strip()` (-hf checkpoints).
    pub fn untrimmed(mut self) -> Self {
        self.trim.off = true;
        self
    }

    /// Ends the answer before the first of `stops` (empty strings are ignored).
    pub fn with_stop_strings(mut self, stops: &[String]) -> Self {
        self.stop_strings = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        self
    }

    /// New text after token `id`, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        if self.stops.contains(&id) || self.stop_at.is_some() {
            return None;
        }
        let text = self.decoder.push(&self.tokenizer, id)?;
        self.release(&text, false)
    }

    /// Text held back until generation ended.
    pub fn finish(&mut self) -> Option<String> {
        if self.stop_at.is_some() {
            return None;
        }
        let text = std::mem::take(&mut self.decoder)
            .finish(&self.tokenizer)
            .unwrap_or_default();
        self.release(&text, true)
    }

    /// The decoded text before the stop string, once one has appeared.
    pub fn before_stop(&self) -> Option<&str> {
        self.stop_at.map(|at| &self.raw[..at])
    }

    fn release(&mut self, text: &str, last: bool) -> Option<String> {
        if self.stop_strings.is_empty() {
            return self.trim.push(text);
        }
        self.raw.push_str(text);
        // a stop string cannot begin before `released`: nothing there was a stop's prefix
        let tail = &self.raw[self.released..];
        let hit = self.stop_strings.iter().filter_map(|s| tail.find(s)).min();
        let end = match hit {
            Some(at) => {
                self.stop_at = Some(self.released + at);
                self.released + at
            }
            None if last => self.raw.len(),
            None => self.raw.len() - self.longest_stop_prefix_at_end(tail),
        };
        let out = self.raw[self.released..end].to_string();
        self.released = end;
        self.trim.push(&out)
    }

    /// Length of the longest end of `tail` that begins some stop string.
    fn longest_stop_prefix_at_end(&self, tail: &str) -> usize {
        self.stop_strings
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n) && tail.ends_with(&s[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod stop_tests {
    use super::AnswerStream;
    use crate::prompt::tokenizer::Tokenizer;
    use crate::testutil::fixture;
    use std::sync::Arc;

    /// Streams the ids of `text` with `stops`: what came out, and how many ids were pushed
    /// when the stop string appeared.
    fn stream(text: &str, stops: &[&str]) -> (String, Option<usize>, Option<String>) {
        let tokenizer = Arc::new(Tokenizer::from_dir(&fixture("models/tiny-qwen2")).unwrap());
        let ids = tokenizer.encode(text).unwrap();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = AnswerStream::new(tokenizer, vec![]).with_stop_strings(&stops);
        let mut out = String::new();
        let mut hit = None;
        for (n, &id) in ids.iter().enumerate() {
            out.extend(s.push(id));
            if hit.is_none() && s.before_stop().is_some() {
                hit = Some(n + 1);
            }
        }
        out.extend(s.finish());
        (out, hit, s.before_stop().map(str::to_string))
    }

    #[test]
    fn the_answer_ends_before_the_first_stop_string() {
        let (out, hit, before) = stream("One two. Three four. Five", &["four", "Five"]);
        assert_eq!(out, "One two. Three");
        assert_eq!(before.as_deref(), Some("One two. Three "));
        // the token that completed "four" was the last one that mattered
        let tokenizer = Tokenizer::from_dir(&fixture("models/tiny-qwen2")).unwrap();
        let ids = tokenizer.encode("One two. Three four. Five").unwrap();
        let hit = hit.unwrap();
        assert!(tokenizer.decode(&ids[..hit], true).contains("four"));
        assert!(!tokenizer.decode(&ids[..hit - 1], true).contains("four"));
    }

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_until_it_cannot() {
        // "Thr" could begin "Three!" but the text goes on otherwise: nothing is lost
        let (out, hit, before) = stream("Three four Three!", &["Three!"]);
        assert_eq!((out.as_str(), hit.is_some()), ("Three four", true));
        assert_eq!(before.as_deref(), Some("Three four "));
        let (out, hit, _) = stream("Three four Three", &["Three!"]);
        assert_eq!((out.as_str(), hit), ("Three four Three", None));
    }

    #[test]
    fn a_stop_string_at_the_start_leaves_an_empty_answer() {
        let (out, hit, before) = stream("Hello world", &["Hello"]);
        assert_eq!(
            (out.as_str(), hit, before.as_deref()),
            ("", Some(1), Some(""))
        );
    }

    #[test]
    fn without_stop_strings_nothing_is_held() {
        let (out, hit, _) = stream("  Hello world \n", &[""]);
        assert_eq!((out.as_str(), hit), ("Hello world", None));
    }
}
