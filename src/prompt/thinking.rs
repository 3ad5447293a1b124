//! InternVL3.5's thinking mode (the model card's "Thinking mode"): the model thinks when its
//! system message is [`R1_SYSTEM_PROMPT`], and then answers `<think>\n…\n</think>\n\nanswer`.
//! [`split`] tells the thinking from the answer in a whole (or partial) answer text;
//! [`ThinkStream`] does the same for text that arrives piece by piece, never sending text to
//! one side that a later piece would move to the other.

/// The model card's `R1_SYSTEM_PROMPT`, set as `model.system_message` to make the model think.
pub const R1_SYSTEM_PROMPT: &str = "You are an AI assistant that rigorously follows this response protocol:\n\n\
1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n\n\
2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the answer from the think section with a newline.\n\n\
Ensure that the thinking process is thorough but remains focused on the query. The final answer should be standalone and not reference the thinking section.";

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

/// An answer told apart: its thinking and what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split<'a> {
    /// The text between `<think>` and `</think>` (all of it after `<think>` while `</think>`
    /// has not come), without the newlines around it; `None`: the answer does not start with
    /// `<think>`.
    pub reasoning: Option<&'a str>,
    /// The answer proper: what follows `</think>` (without the blank line after it), or the
    /// whole text when it has no think block.
    pub content: &'a str,
    /// `</think>` has come: the thinking is over.
    pub closed: bool,
}

impl Split<'_> {
    /// The model is still thinking (a think block without its end).
    pub fn thinking(&self) -> bool {
        self.reasoning.is_some() && !self.closed
    }
}

/// Splits an answer, whole or as far as it has come, into thinking and answer.
pub fn split(text: &str) -> Split<'_> {
    let Some(rest) = text.trim_start().strip_prefix(THINK_OPEN) else {
        return Split {
            reasoning: None,
            content: text,
            closed: false,
        };
    };
    match rest.split_once(THINK_CLOSE) {
        Some((reasoning, content)) => Split {
            reasoning: Some(reasoning.trim()),
            content: content.trim_start(),
            closed: true,
        },
        None => Split {
            reasoning: Some(rest.trim()),
            content: "",
            closed: false,
        },
    }
}

/// Newly settled text of each side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

/// [`split`] for streamed text. What [`ThinkStream::push`] and [`ThinkStream::finish`]
/// return concatenates, side by side, to `split` of the whole text: text that could still
/// turn out to be a tag (`<thi` at the start, `</thi` in the thinking) or trimmed whitespace
/// is held back until a later piece settles it.
#[derive(Debug, Clone, Default)]
pub struct ThinkStream {
    text: String,
    /// Bytes of each side returned so far.
    sent: (usize, usize),
}

impl ThinkStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text so far has a think block.
    pub fn has_reasoning(&self) -> bool {
        split(&self.text).reasoning.is_some()
    }

    /// Takes in the next piece; returns what is settled now and was not before.
    pub fn push(&mut self, piece: &str) -> Delta {
        self.text.push_str(piece);
        let (reasoning, content) = settled(&self.text);
        take(&mut self.sent, reasoning, content)
    }

    /// The text is complete: everything not yet returned.
    pub fn finish(&mut self) -> Delta {
        let s = split(&self.text);
        take(&mut self.sent, s.reasoning.unwrap_or(""), s.content)
    }
}

/// What of `reasoning` and `content` is past the bytes already `sent`.
fn take(sent: &mut (usize, usize), reasoning: &str, content: &str) -> Delta {
    let delta = Delta {
        reasoning: reasoning.get(sent.0..).unwrap_or_default().to_string(),
        content: content.get(sent.1..).unwrap_or_default().to_string(),
    };
    *sent = (sent.0.max(reasoning.len()), sent.1.max(content.len()));
    delta
}

/// The parts of a partial answer no later text can change: each is a prefix of what [`split`]
/// gives for any continuation.
fn settled(text: &str) -> (&str, &str) {
    let t = text.trim_start();
    if t.is_empty() || (t.len() < THINK_OPEN.len() && THINK_OPEN.starts_with(t)) {
        // whitespace, or `<thi`: nothing known yet
        return ("", "");
    }
    let Some(rest) = t.strip_prefix(THINK_OPEN) else {
        return ("", text);
    };
    if let Some((reasoning, content)) = rest.split_once(THINK_CLOSE) {
        return (reasoning.trim(), content.trim_start());
    }
    let reasoning = rest.trim_start();
    // the longest end that may be the start of `</think>` waits for the next piece
    let held = (1..THINK_CLOSE.len())
        .rev()
        .find(|&k| reasoning.ends_with(&THINK_CLOSE[..k]))
        .unwrap_or(0);
    let reasoning = reasoning[..reasoning.len() - held].trim_end();
    (reasoning, "")
}

/// The thinking of `reasoning` and the answer `content` as the model writes them in one text:
/// `<think>\nREASONING\n</think>\n\nCONTENT` (a server's `reasoning_content` given back the
/// shape of a local answer).
pub fn rewrap(reasoning: &str, content: &str) -> String {
    format!("{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{content}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    #[test]
    fn the_prompt_is_the_model_cards_byte_for_byte() {
        let path = fixture("golden/tiny-qwen3/thinking.json");
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(golden["system_message"].as_str().unwrap(), R1_SYSTEM_PROMPT);
        // and the reference renders it as the system turn of internvl2_5
        let t = crate::prompt::template::get_template("internvl2_5").unwrap();
        let rendered = t.render(R1_SYSTEM_PROMPT, &[], "");
        let system_turn = rendered.split("<|im_start|>user").next().unwrap();
        let query = golden["turns"][0]["query"].as_str().unwrap();
        assert!(query.starts_with(system_turn), "{system_turn:?}");
        assert!(system_turn.ends_with("thinking section.<|im_end|>\n"));
    }

    type Parts<'a> = (Option<&'a str>, &'a str, bool);

    fn parts(text: &str) -> Parts<'_> {
        let s = split(text);
        (s.reasoning, s.content, s.closed)
    }

    #[test]
    fn split_whole_and_partial_answers() {
        let cases: &[(&str, Parts)] = &[
            (
                "<think>\nA cat, maybe.\nYes.\n</think>\n\nTwo cats.",
                (Some("A cat, maybe.\nYes."), "Two cats.", true),
            ),
            ("Two cats.", (None, "Two cats.", false)),
            ("", (None, "", false)),
            // before `</think>` everything after `<think>` is thinking
            ("<think>\nA cat", (Some("A cat"), "", false)),
            ("<think>", (Some(""), "", false)),
            ("<think>\nhm </thi", (Some("hm </thi"), "", false)),
            ("  \n<think>x</think>y", (Some("x"), "y", true)),
            ("<think></think>\n\nok", (Some(""), "ok", true)),
            // only a leading block counts; a later tag is text
            (
                "I said <think> once.",
                (None, "I said <think> once.", false),
            ),
            (
                "<thinking>no</thinking>",
                (None, "<thinking>no</thinking>", false),
            ),
            // the first `</think>` ends the thinking; later ones are answer
            ("<think>a</think>b</think>", (Some("a"), "b</think>", true)),
            ("<think>a\n</think>", (Some("a"), "", true)),
        ];
        for (text, want) in cases {
            assert_eq!(parts(text), *want, "{text:?}");
        }
        assert!(split("<think>a").thinking());
        assert!(!split("<think>a</think>b").thinking());
        assert!(!split("a").thinking());
    }

    /// Streams `pieces`; checks that every step's deltas concatenate to the split of the whole
    /// text and returns what each push gave.
    fn stream(pieces: &[&str]) -> Vec<Delta> {
        let mut s = ThinkStream::new();
        let mut deltas: Vec<Delta> = pieces.iter().map(|p| s.push(p)).collect();
        deltas.push(s.finish());
        let whole = pieces.concat();
        let want = split(&whole);
        let reasoning: String = deltas.iter().map(|d| d.reasoning.as_str()).collect();
        let content: String = deltas.iter().map(|d| d.content.as_str()).collect();
        assert_eq!(reasoning, want.reasoning.unwrap_or(""), "{pieces:?}");
        assert_eq!(content, want.content, "{pieces:?}");
        deltas
    }

    #[test]
    fn streaming_never_takes_back_what_it_sent() {
        let answer = "<think>\nTwo animals? Look again.\n</think>\n\nTwo cats <sleeping>.";
        // every way of cutting it in two, and one character at a time
        for i in (0..=answer.len()).filter(|&i| answer.is_char_boundary(i)) {
            stream(&[&answer[..i], &answer[i..]]);
        }
        let chars: Vec<String> = answer.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        let deltas = stream(&chars);
        let first_content = deltas.iter().position(|d| !d.content.is_empty()).unwrap();
        let last_reasoning = deltas
            .iter()
            .rposition(|d| !d.reasoning.is_empty())
            .unwrap();
        assert!(last_reasoning < first_content);
        for text in [
            "<thinking> is a word",
            "plain answer",
            "<think>never closed </thi",
            "<think>a </th</think>b",
            "  <think>\n\n  x  \n</think>\n\n\ny",
            "<",
            "<think",
            " \n ",
            "<think>é</think>ü",
        ] {
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            stream(&chars);
            stream(&[text]);
        }
    }

    #[test]
    fn partial_tags_wait_for_the_next_piece() {
        let mut s = ThinkStream::new();
        assert!(s.push("<thi").is_empty(), "may be <think>");
        assert_eq!(
            s.push("nk>\nStep one"),
            Delta {
                reasoning: "Step one".into(),
                content: String::new()
            }
        );
        assert!(s.has_reasoning());
        assert!(
            s.push(".\n</th").reasoning == ".",
            "the newline and </th wait"
        );
        assert_eq!(
            s.push("ink>\n\nDone"),
            Delta {
                reasoning: String::new(),
                content: "Done".into()
            }
        );
        let mut s = ThinkStream::new();
        assert!(s.push("<thi").is_empty());
        assert_eq!(s.push("s").content, "<this", "not a tag after all");
        assert!(!s.has_reasoning());
        let mut s = ThinkStream::new();
        assert!(s.push("<think>a </th").reasoning == "a");
        assert_eq!(
            s.finish().reasoning,
            " </th",
            "an unfinished tag is thinking at the end"
        );
    }

    #[test]
    fn rewrap_gives_the_local_shape() {
        let text = rewrap("Look.", "Two cats.");
        assert_eq!(text, "<think>\nLook.\n</think>\n\nTwo cats.");
        assert_eq!(parts(&text), (Some("Look."), "Two cats.", true));
    }
}
