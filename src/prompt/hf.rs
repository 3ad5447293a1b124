//! Prompts of -hf checkpoints as transformers builds them: the checkpoint's own chat template
//! (`processor.apply_chat_template`, rendered by a Jinja engine with the settings transformers
//! uses), then `InternVLProcessor`'s expansion of each image token into `<img>` + 256·tiles
//! `<IMG_CONTEXT>` + `</img>` and of each video token into `Frame1: <img>…</img>\nFrame2: …`.
//!
//! A question keeps the program's placeholders: `<image>` for an image, `<video>` for a video.
//! They become the `{"type": "image"}` / `{"type": "video"}` items of the user message, the
//! text between them `{"type": "text"}` items (the `\n` right after a placeholder is the one
//! the template writes after the media token, so it is not repeated).
use super::conversation::{Conversation, Media};
use super::{PromptError, IMAGE_PLACEHOLDER};
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The placeholder a question uses for a video with -hf checkpoints.
pub const VIDEO_PLACEHOLDER: &str = "<video>";

#[derive(Debug, thiserror::Error)]
pub enum HfPromptError {
    #[error("{dir}: no chat template (chat_template.jinja, chat_template.json, or chat_template in processor_config.json / tokenizer_config.json)")]
    NoTemplate { dir: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// The checkpoint's chat template and the processor's tokens.
#[derive(Debug, Clone)]
pub struct HfPrompt {
    /// Where the template came from (for errors).
    pub source: PathBuf,
    pub template: String,
    /// The tokenizer's special tokens, as transformers passes them to the template.
    specials: Vec<(String, String)>,
    /// `context_image_token`: the image token the template writes and the processor expands.
    pub image_token: String,
    pub start_image_token: String,
    pub end_image_token: String,
    pub video_token: String,
    /// `image_seq_length` of processor_config.json.
    pub image_seq_length: usize,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, HfPromptError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = crate::files::read_to_string(
        path,
        crate::files::MAX_METADATA_BYTES,
        "a model's metadata file",
    )
    .map_err(|source| HfPromptError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| HfPromptError::Invalid {
            path: path.into(),
            what: format!("invalid JSON: {e}"),
        })
}

/// A `chat_template` field: a string, or a list of `{name, template}` (the `default` one).
fn template_field(v: &serde_json::Value, path: &Path) -> Result<Option<String>, HfPromptError> {
    match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)),
        Some(other) => Err(HfPromptError::Invalid {
            path: path.into(),
            what: format!("chat_template is {other}, not a string"),
        }),
    }
}

/// A special token attribute: a string or `{"content": ...}`.
fn token_str(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .map(str::to_owned)
        .or_else(|| v.get("content")?.as_str().map(str::to_owned))
}

impl HfPrompt {
    /// The template of the checkpoint in `dir`, in the order transformers' processor looks:
    /// `chat_template.jinja`, `chat_template.json`, `processor_config.json`, then the
    /// tokenizer's `tokenizer_config.json`.
    pub fn load(dir: &Path) -> Result<Self, HfPromptError> {
        let jinja = dir.join("chat_template.jinja");
        let mut found: Option<(PathBuf, String)> = None;
        if jinja.exists() {
            let t = crate::files::read_to_string(
                &jinja,
                crate::files::MAX_METADATA_BYTES,
                "a model's metadata file",
            )
            .map_err(|source| HfPromptError::Read {
                path: jinja.clone(),
                source,
            })?;
            found = Some((jinja, t));
        }
        let tok_path = dir.join("tokenizer_config.json");
        let tok = read_json(&tok_path)?.unwrap_or_default();
        let proc_path = dir.join("processor_config.json");
        let proc = read_json(&proc_path)?.unwrap_or_default();
        for name in [
            "chat_template.json",
            "processor_config.json",
            "tokenizer_config.json",
        ] {
            if found.is_some() {
                break;
            }
            let path = dir.join(name);
            let v = match name {
                "processor_config.json" => Some(proc.clone()),
                "tokenizer_config.json" => Some(tok.clone()),
                _ => read_json(&path)?,
            };
            if let Some(t) = v.map(|v| template_field(&v, &path)).transpose()?.flatten() {
                found = Some((path, t));
            }
        }
        let (source, template) =
            found.ok_or_else(|| HfPromptError::NoTemplate { dir: dir.into() })?;
        let specials = [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "start_image_token",
            "end_image_token",
            "context_image_token",
            "video_token",
        ]
        .iter()
        .filter_map(|k| {
            let v = tok
                .get(*k)
                .or_else(|| tok.get("extra_special_tokens")?.get(*k))?;
            Some((k.to_string(), token_str(v)?))
        })
        .collect::<Vec<_>>();
        let special = |k: &str, default: &str| {
            specials
                .iter()
                .find(|(n, _)| n == k)
                .map_or(default.to_string(), |(_, v)| v.clone())
        };
        let image_seq_length = match proc.get("image_seq_length") {
            None => 256,
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| HfPromptError::Invalid {
                    path: proc_path.clone(),
                    what: format!("image_seq_length {v} is not a positive number"),
                })? as usize,
        };
        let p = Self {
            image_token: special("context_image_token", "<IMG_CONTEXT>"),
            start_image_token: special("start_image_token", "<img>"),
            end_image_token: special("end_image_token", "</img>"),
            video_token: special("video_token", VIDEO_PLACEHOLDER),
            specials,
            source,
            template,
            image_seq_length,
        };
        // a template that does not parse is refused when the model loads, not at the first turn
        p.env().map_err(|e| HfPromptError::Invalid {
            path: p.source.clone(),
            what: template_error(&e),
        })?;
        Ok(p)
    }

    /// A template held in memory (tests).
    pub fn from_template(template: &str) -> Self {
        Self {
            source: PathBuf::from("chat_template.jinja"),
            template: template.into(),
            specials: vec![("eos_token".into(), "<|im_end|>".into())],
            image_token: "<IMG_CONTEXT>".into(),
            start_image_token: "<img>".into(),
            end_image_token: "</img>".into(),
            video_token: VIDEO_PLACEHOLDER.into(),
            image_seq_length: 256,
        }
    }

    /// The Jinja environment transformers renders chat templates in: `trim_blocks`,
    /// `lstrip_blocks`, Python's string and dict methods, `raise_exception`, `strftime_now`.
    fn env(&self) -> Result<Environment<'_>, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> Result<Value, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now is not supported",
            ))
        });
        env.add_template("chat", &self.template)?;
        Ok(env)
    }

    /// `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`.
    pub fn render(&self, messages: &[Message]) -> Result<String, PromptError> {
        let env = self.env().map_err(|e| PromptError::Template {
            what: template_error(&e),
        })?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| PromptError::Template {
                what: template_error(&e),
            })?;
        let mut ctx: std::collections::BTreeMap<String, Value> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(true));
        let _ = context!();
        tmpl.render(ctx).map_err(|e| PromptError::Template {
            what: template_error(&e),
        })
    }

    /// `InternVLProcessor._insert_media_placeholders`: each image token (in text order, images
    /// and videos interleaved as they come) becomes `<img>` + `image_seq_length`·tiles image
    /// tokens + `</img>`; each video token `Frame{i}: <img>…</img>` lines, one tile per frame.
    /// `media` lists the pictures in the order the template wrote their tokens.
    pub fn expand(
        &self,
        prompt: &str,
        media: &[&Media],
    ) -> Result<(String, Vec<usize>), PromptError> {
        let (mut images, mut videos) = (
            media.iter().filter(|m| !m.video),
            media.iter().filter(|m| m.video),
        );
        let mut out = String::with_capacity(prompt.len());
        let mut num_patches = Vec::new();
        let mut rest = prompt;
        let block = |out: &mut String, tiles: usize| {
            out.push_str(&self.start_image_token);
            out.push_str(&self.image_token.repeat(self.image_seq_length * tiles));
            out.push_str(&self.end_image_token);
        };
        let (mut n_img, mut n_vid) = (0, 0);
        loop {
            let img = rest.find(&self.image_token);
            let vid = rest.find(&self.video_token);
            let (at, is_video) = match (img, vid) {
                (None, None) => break,
                (Some(i), None) => (i, false),
                (None, Some(v)) => (v, true),
                (Some(i), Some(v)) => (i.min(v), v < i),
            };
            out.push_str(&rest[..at]);
            if is_video {
                n_vid += 1;
                rest = &rest[at + self.video_token.len()..];
                let Some(m) = videos.next() else { continue };
                for (i, &tiles) in m.tiles.iter().enumerate() {
                    if i > 0 {
                        out.push('\n');
                    }
                    out.push_str(&format!("Frame{}: ", i + 1));
                    block(&mut out, tiles);
                    num_patches.push(tiles);
                }
            } else {
                n_img += 1;
                rest = &rest[at + self.image_token.len()..];
                let Some(m) = images.next() else { continue };
                let tiles = m.tiles.iter().sum();
                block(&mut out, tiles);
                num_patches.push(tiles);
            }
        }
        out.push_str(rest);
        let (want_img, want_vid) = (
            media.iter().filter(|m| !m.video).count(),
            media.iter().filter(|m| m.video).count(),
        );
        if n_img != want_img || n_vid != want_vid {
            return Err(PromptError::Template {
                what: format!(
                    "the rendered prompt has {n_img} image and {n_vid} video token(s) ({} / {}) for {want_img} image(s) and {want_vid} video(s)",
                    self.image_token, self.video_token
                ),
            });
        }
        Ok((out, num_patches))
    }
}

fn template_error(e: &Error) -> String {
    let mut s = format!("chat template: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s.replace('\n', " ")
}

/// A chat message as transformers' processors take it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Items(Vec<Item>),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Item {
    Text { text: String },
    Image {},
    Video {},
}

/// A question's items: `<image>` and `<video>` placeholders become media items, the text around
/// them text items (minus the `\n` right after a placeholder; empty ones left out).
pub fn items(question: &str) -> Vec<Item> {
    let mut out = Vec::new();
    let mut rest = question;
    let mut after_media = false;
    loop {
        let img = rest.find(IMAGE_PLACEHOLDER);
        let vid = rest.find(VIDEO_PLACEHOLDER);
        let next = match (img, vid) {
            (None, None) => None,
            (Some(i), None) => Some((i, false)),
            (None, Some(v)) => Some((v, true)),
            (Some(i), Some(v)) => Some((i.min(v), v < i)),
        };
        let end = next.map_or(rest.len(), |(at, _)| at);
        let mut text = &rest[..end];
        if after_media {
            text = text.strip_prefix('\n').unwrap_or(text);
        }
        if !text.is_empty() {
            out.push(Item::Text { text: text.into() });
        }
        let Some((at, video)) = next else { break };
        if video {
            out.push(Item::Video {});
            rest = &rest[at + VIDEO_PLACEHOLDER.len()..];
        } else {
            out.push(Item::Image {});
            rest = &rest[at + IMAGE_PLACEHOLDER.len()..];
        }
        after_media = true;
    }
    out
}

/// The question with placeholders for `media` when it has none of its own: `<image>\n` per image
/// (or `Image-1: <image>\n…` for several separate images), then `<video>\n` per video. The -hf
/// processor gives every image its own `<img>…</img>`, so combined images are one `<image>`
/// each.
pub fn with_placeholders(question: &str, media: &[Media], combine: bool) -> String {
    if question.contains(IMAGE_PLACEHOLDER)
        || question.contains(VIDEO_PLACEHOLDER)
        || media.is_empty()
    {
        return question.to_string();
    }
    let n_images = media.iter().filter(|m| !m.video).count();
    let mut prefix = if n_images > 1 && !combine {
        super::image_list_prefix(n_images)
    } else {
        "<image>\n".repeat(n_images)
    };
    for _ in media.iter().filter(|m| m.video) {
        prefix.push_str("<video>\n");
    }
    prefix + question
}

fn count(q: &str) -> (usize, usize) {
    (
        q.matches(IMAGE_PLACEHOLDER).count(),
        q.matches(VIDEO_PLACEHOLDER).count(),
    )
}

/// The conversation as the -hf processor sees it.
pub struct ExpandedHf {
    pub question: String,
    pub query: String,
    /// Tiles of each `<img>` block, in prompt order.
    pub num_patches: Vec<usize>,
    /// Indices into the conversation's media (history turns' own, in order, then the new
    /// question's) in the order their features fill the prompt.
    pub order: Vec<usize>,
}

/// The query of `conv`: messages (system when given, each past turn's question and answer, the
/// new question), the chat template, then the processor's expansion. A past turn without its
/// own attachments but with placeholders takes the new question's first, as with remote-code
/// checkpoints.
pub fn expand(p: &HfPrompt, conv: &Conversation) -> Result<ExpandedHf, PromptError> {
    let mut messages = Vec::new();
    if !conv.system.is_empty() {
        messages.push(Message {
            role: "system".into(),
            content: Content::Text(conv.system.into()),
        });
    }
    // global media indices: history turns' own media first, then the new question's
    let mut base = 0;
    let mut own: Vec<Vec<usize>> = Vec::new();
    for t in conv.history {
        own.push((base..base + t.media.len()).collect());
        base += t.media.len();
    }
    let new_idx: Vec<usize> = (base..base + conv.media.len()).collect();
    let all: Vec<&Media> = conv
        .history
        .iter()
        .flat_map(|t| t.media.iter())
        .chain(conv.media.iter())
        .collect();
    // the new question's images and videos, handed out in order
    let mut new_images = new_idx.iter().copied().filter(|&i| !all[i].video);
    let mut new_videos = new_idx.iter().copied().filter(|&i| all[i].video);
    let mut order: Vec<usize> = Vec::new();
    let mut take = |q: &str, mine: Option<&[usize]>, order: &mut Vec<usize>| {
        let (n_img, n_vid) = count(q);
        let (mut imgs, mut vids): (Vec<usize>, Vec<usize>) = match mine {
            Some(m) => m.iter().partition(|&&i| !all[i].video),
            None => (
                new_images.by_ref().take(n_img).collect(),
                new_videos.by_ref().take(n_vid).collect(),
            ),
        };
        if imgs.len() != n_img {
            return Err(PromptError::ImageCount {
                placeholders: n_img,
                images: imgs.len(),
            });
        }
        if vids.len() != n_vid {
            return Err(PromptError::VideoCount {
                placeholders: n_vid,
                videos: vids.len(),
            });
        }
        // in the order the placeholders come
        imgs.reverse();
        vids.reverse();
        for item in items(q) {
            match item {
                Item::Image {} => order.push(imgs.pop().expect("counted")),
                Item::Video {} => order.push(vids.pop().expect("counted")),
                Item::Text { .. } => {}
            }
        }
        Ok(())
    };
    let mut pending = false;
    for (t, mine) in conv.history.iter().zip(&own) {
        let has = count(t.question) != (0, 0);
        let mine = if t.media.is_empty() && has {
            pending = true;
            None
        } else {
            Some(mine.as_slice())
        };
        take(t.question, mine, &mut order)?;
        messages.push(Message {
            role: "user".into(),
            content: Content::Items(items(t.question)),
        });
        messages.push(Message {
            role: "assistant".into(),
            content: Content::Items(vec![Item::Text {
                text: t.answer.into(),
            }]),
        });
    }
    let question = if pending {
        conv.question.to_string()
    } else {
        with_placeholders(conv.question, conv.media, conv.combine_images)
    };
    take(&question, None, &mut order)?;
    let left = new_images.count() + new_videos.count();
    if left > 0 {
        let (n_img, n_vid) = count(&question);
        return Err(PromptError::Placeholders {
            placeholders: n_img + n_vid,
            attached: n_img + n_vid + left,
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: Content::Items(items(&question)),
    });
    let prompt = p.render(&messages)?;
    let ordered: Vec<&Media> = order.iter().map(|&i| all[i]).collect();
    let (query, num_patches) = p.expand(&prompt, &ordered)?;
    Ok(ExpandedHf {
        question,
        query,
        num_patches,
        order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::conversation::PastTurn;

    fn msg(role: &str, items: Vec<Item>) -> Message {
        Message {
            role: role.into(),
            content: Content::Items(items),
        }
    }

    fn text(t: &str) -> Item {
        Item::Text { text: t.into() }
    }

    /// Every construct the fixtures' (and the published -hf) templates use: a loop over the
    /// messages, `is string` on the content, a nested loop over content items with `if` /
    /// `elif` on their type, string concatenation, `add_generation_prompt`, trim_blocks, and
    /// Python string methods (pycompat) and `raise_exception` that user-edited templates use.
    #[test]
    fn template_features_render_as_jinja2_does() {
        let fixture = std::fs::read_to_string(crate::testutil::fixture(
            "models/tiny-qwen2-hf/chat_template.jinja",
        ))
        .unwrap();
        let p = HfPrompt::from_template(&fixture);
        let messages = vec![
            Message {
                role: "system".into(),
                content: Content::Text("Be brief.".into()),
            },
            msg(
                "user",
                vec![text("A: "), Item::Image {}, Item::Video {}, text("What?")],
            ),
            msg("assistant", vec![text("Stuff.")]),
            msg("user", vec![text("More.")]),
        ];
        assert_eq!(
            p.render(&messages).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA: <IMG_CONTEXT>\n<video>\nWhat?<|im_end|>\n<|im_start|>assistant\nStuff.<|im_end|>\n<|im_start|>user\nMore.<|im_end|>\n<|im_start|>assistant\n"
        );
        // string methods, loop variables, filters, special tokens, trim/lstrip blocks
        let p = HfPrompt::from_template(
            "{%- for m in messages %}\n  {%- if loop.first and m.role != 'system' %}[default]{% endif %}\n{{ m.role.upper() }}:{{ m.content.strip() if m.content is string else m.content | map(attribute='type') | join(',') }}{% if m.content is string and m.content.startswith(' ') %}!{% endif %}|\n{%- endfor %}{{ eos_token }}{% if add_generation_prompt %}>{% endif %}",
        );
        let out = p
            .render(&[
                Message {
                    role: "user".into(),
                    content: Content::Text("  hi ".into()),
                },
                msg("assistant", vec![text("x"), Item::Image {}]),
            ])
            .unwrap();
        assert_eq!(out, "[default]USER:hi!|ASSISTANT:text,image|<|im_end|>>");
        // raise_exception names the problem
        let p = HfPrompt::from_template("{{ raise_exception('only user turns') }}");
        let e = p.render(&[]).unwrap_err().to_string();
        assert!(e.contains("only user turns"), "{e}");
        // a template that does not parse
        let p = HfPrompt::from_template("{% for m in messages %}");
        assert!(p
            .render(&[])
            .unwrap_err()
            .to_string()
            .contains("chat template"));
    }

    #[test]
    fn questions_become_content_items() {
        assert_eq!(
            items("Image-1: <image>\nImage-2: <image>\nDescribe."),
            [
                text("Image-1: "),
                Item::Image {},
                text("Image-2: "),
                Item::Image {},
                text("Describe.")
            ]
        );
        assert_eq!(items("<video>\nWhat?"), [Item::Video {}, text("What?")]);
        assert_eq!(items("plain"), [text("plain")]);
        assert_eq!(
            with_placeholders(
                "Q",
                &[
                    Media {
                        video: false,
                        tiles: vec![2]
                    },
                    Media {
                        video: false,
                        tiles: vec![1]
                    },
                    Media {
                        video: true,
                        tiles: vec![1, 1]
                    }
                ],
                true
            ),
            "<image>\n<image>\n<video>\nQ"
        );
    }

    #[test]
    fn media_tokens_expand_in_prompt_order() {
        let p = HfPrompt {
            image_seq_length: 2,
            ..HfPrompt::from_template(
                std::str::from_utf8(
                    &std::fs::read(crate::testutil::fixture(
                        "models/tiny-qwen2-hf/chat_template.jinja",
                    ))
                    .unwrap(),
                )
                .unwrap(),
            )
        };
        let video = Media {
            video: true,
            tiles: vec![1, 1],
        };
        let image = Media {
            video: false,
            tiles: vec![3],
        };
        let history = [PastTurn {
            question: "<video>\nA",
            answer: "B",
            media: vec![video.clone()],
        }];
        let e = expand(
            &p,
            &Conversation {
                system: "",
                history: &history,
                question: "C",
                media: &[image],
                combine_images: false,
            },
        )
        .unwrap();
        let c = "<IMG_CONTEXT>";
        assert_eq!(
            e.query,
            format!("<|im_start|>user\nFrame1: <img>{c}{c}</img>\nFrame2: <img>{c}{c}</img>\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\n<img>{}</img>\nC<|im_end|>\n<|im_start|>assistant\n", c.repeat(6))
        );
        assert_eq!(e.num_patches, [1, 1, 3]);
        assert_eq!(e.order, [0, 1]);
        assert_eq!(e.question, "<image>\nC");
        // a placeholder without a picture
        let err = expand(
            &p,
            &Conversation {
                system: "",
                history: &[],
                question: "<image> and <image>",
                media: &[Media {
                    video: false,
                    tiles: vec![1],
                }],
                combine_images: false,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("2 <image> placeholder(s) but 1 image(s)"),
            "{err}"
        );
    }
}
