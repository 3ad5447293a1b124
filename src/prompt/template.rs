//! Conversation templates, ported from OpenGVLab/InternVL `internvl_chat/internvl/conversation.py`
//! (the templates it registers and `Conversation.get_prompt` for their separator styles).

/// `SeparatorStyle` members used by the InternVL templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeparatorStyle {
    /// `MPT`: `system + sep`, then `role + message + sep` per message, a bare role for the open one.
    Mpt,
    /// `INTERNVL_ZH`: `system_message + sep2`, then `role + ': ' + message` closed by `sep2` after
    /// a user message and `sep` after an assistant one; `role + ':'` for the open one.
    InternVlZh,
}

/// A conversation template (`Conversation` without its messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    /// Holds `{system_message}` where the system message goes.
    pub system_template: String,
    /// The default system message (`InternVLChatModel.system_message` starts as this).
    pub system_message: String,
    /// User and assistant roles.
    pub roles: [String; 2],
    pub sep_style: SeparatorStyle,
    pub sep: String,
    pub sep2: Option<String>,
    pub stop_str: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown conversation template {name:?} (known: {known})")]
    Unknown { name: String, known: String },
}

/// `你是书生·万象…`: the system message of `internvl2_5`.
const SYSTEM_INTERNVL2_5: &str = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";
/// The older system message of `Hermes-2`, `internlm2-chat` and `phi3-chat`.
const SYSTEM_INTERNVL2: &str =
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。";

/// Names accepted by [`get_template`].
pub const TEMPLATE_NAMES: [&str; 5] = [
    "internvl2_5",
    "internlm2-chat",
    "Hermes-2",
    "phi3-chat",
    "internvl_zh",
];

/// `get_conv_template(name)`.
pub fn get_template(name: &str) -> Result<Template, TemplateError> {
    let chatml = |system_message: &str, sep: &str, stop_str: Option<&str>| Template {
        name: name.to_owned(),
        system_template: "<|im_start|>system\n{system_message}".into(),
        system_message: system_message.into(),
        roles: [
            "<|im_start|>user\n".into(),
            "<|im_start|>assistant\n".into(),
        ],
        sep_style: SeparatorStyle::Mpt,
        sep: sep.into(),
        sep2: None,
        stop_str: stop_str.map(str::to_owned),
    };
    match name {
        "internvl2_5" => Ok(chatml(SYSTEM_INTERNVL2_5, "<|im_end|>\n", None)),
        "internlm2-chat" => Ok(chatml(SYSTEM_INTERNVL2, "<|im_end|>", None)),
        "Hermes-2" => Ok(chatml(
            SYSTEM_INTERNVL2,
            "<|im_end|>",
            Some("<|endoftext|>"),
        )),
        "phi3-chat" => Ok(Template {
            name: name.to_owned(),
            system_template: "<|system|>\n{system_message}".into(),
            system_message: SYSTEM_INTERNVL2.into(),
            roles: ["<|user|>\n".into(), "<|assistant|>\n".into()],
            sep_style: SeparatorStyle::Mpt,
            sep: "<|end|>".into(),
            sep2: None,
            stop_str: None,
        }),
        "internvl_zh" => Ok(Template {
            name: name.to_owned(),
            system_template: String::new(),
            system_message: String::new(),
            roles: ["<human>".into(), "<bot>".into()],
            sep_style: SeparatorStyle::InternVlZh,
            sep: "</s>".into(),
            sep2: Some(" ".into()),
            stop_str: None,
        }),
        _ => Err(TemplateError::Unknown {
            name: name.to_owned(),
            known: TEMPLATE_NAMES.join(", "),
        }),
    }
}

/// Python's `str.strip()`: Unicode whitespace plus the separators U+001C..U+001F.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

impl Template {
    /// The prompt for `history` pairs, then `question` and an open assistant turn
    /// (`append_message` for each, `append_message(roles[1], None)`, `get_prompt()`).
    pub fn render(
        &self,
        system_message: &str,
        history: &[(String, String)],
        question: &str,
    ) -> String {
        let messages = history
            .iter()
            .flat_map(|(q, a)| [q.as_str(), a.as_str()])
            .chain([question, ""]);
        // an empty message is falsy in get_prompt: it renders like the open turn
        let mut ret = match self.sep_style {
            SeparatorStyle::Mpt => {
                self.system_template
                    .replace("{system_message}", system_message)
                    + &self.sep
            }
            SeparatorStyle::InternVlZh => system_message.to_owned() + self.sep2(0),
        };
        for (i, message) in messages.enumerate() {
            let role = &self.roles[i % 2];
            ret.push_str(role);
            match self.sep_style {
                SeparatorStyle::Mpt if !message.is_empty() => {
                    ret.push_str(message);
                    ret.push_str(&self.sep);
                }
                SeparatorStyle::InternVlZh if !message.is_empty() => {
                    ret.push_str(": ");
                    ret.push_str(message);
                    ret.push_str(self.sep2(i));
                }
                SeparatorStyle::InternVlZh => ret.push(':'),
                SeparatorStyle::Mpt => {}
            }
        }
        ret
    }

    /// `[sep2, sep][i % 2]` of `INTERNVL_ZH`.
    fn sep2(&self, i: usize) -> &str {
        if i.is_multiple_of(2) {
            self.sep2.as_deref().unwrap_or_default()
        } else {
            &self.sep
        }
    }

    /// `sep.strip()`: the token `model.chat` uses as `eos_token_id`.
    pub fn stop_token(&self) -> &str {
        py_strip(&self.sep)
    }

    /// The response `model.chat` returns for decoded text:
    /// `text.split(sep.strip())[0].strip()`.
    pub fn response_text<'a>(&self, decoded: &'a str) -> &'a str {
        let stop = self.stop_token();
        let head = if stop.is_empty() {
            decoded
        } else {
            decoded.split(stop).next().unwrap_or_default()
        };
        py_strip(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(q: &str, a: &str) -> (String, String) {
        (q.to_owned(), a.to_owned())
    }

    #[test]
    fn internvl2_5_renders_chatml() {
        let t = get_template("internvl2_5").unwrap();
        assert_eq!(
            t.render("SYS", &[], "hi"),
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render("SYS", &[pair("q1", "a1")], "q2"),
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n\
             <|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.stop_token(), "<|im_end|>");
        assert!(t.system_message.starts_with("你是书生·万象"));
    }

    #[test]
    fn internlm2_chat_and_hermes_have_no_newline_after_separators() {
        for name in ["internlm2-chat", "Hermes-2"] {
            let t = get_template(name).unwrap();
            assert_eq!(
                t.render(&t.system_message, &[pair("q1", "a1")], "q2"),
                format!(
                    "<|im_start|>system\n{}<|im_end|><|im_start|>user\nq1<|im_end|><|im_start|>assistant\na1<|im_end|>\
                     <|im_start|>user\nq2<|im_end|><|im_start|>assistant\n",
                    SYSTEM_INTERNVL2
                )
            );
            assert_eq!(t.stop_token(), "<|im_end|>");
        }
        assert_eq!(
            get_template("Hermes-2").unwrap().stop_str.as_deref(),
            Some("<|endoftext|>")
        );
    }

    #[test]
    fn phi3_chat() {
        let t = get_template("phi3-chat").unwrap();
        assert_eq!(
            t.render("S", &[], "q"),
            "<|system|>\nS<|end|><|user|>\nq<|end|><|assistant|>\n"
        );
        assert_eq!(t.stop_token(), "<|end|>");
    }

    #[test]
    fn internvl_zh_alternates_separators() {
        let t = get_template("internvl_zh").unwrap();
        assert_eq!(
            t.render("S", &[pair("q1", "a1")], "q2"),
            "S <human>: q1 <bot>: a1</s><human>: q2 <bot>:"
        );
        assert_eq!(t.stop_token(), "</s>");
    }

    #[test]
    fn an_empty_answer_renders_like_an_open_turn() {
        let t = get_template("internvl2_5").unwrap();
        assert_eq!(
            t.render("S", &[pair("q1", "")], "q2"),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\n\
             <|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn unknown_template_lists_the_known_ones() {
        let err = get_template("vicuna").unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown conversation template \"vicuna\" (known: internvl2_5, internlm2-chat, Hermes-2, phi3-chat, internvl_zh)"
        );
    }

    #[test]
    fn response_is_cut_at_the_stop_token_and_stripped_like_python() {
        let t = get_template("internvl2_5").unwrap();
        assert_eq!(t.response_text("  Hello<|im_end|>more"), "Hello");
        assert_eq!(t.response_text("\u{1f} x \u{3000}"), "x");
        assert_eq!(t.response_text("no stop"), "no stop");
    }
}
