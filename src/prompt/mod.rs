//! Prompts as `InternVLChatModel.chat` and `batch_chat` build them (OpenGVLab/InternVL
//! `modeling_internvl_chat.py`), plus the tokenizers and conversation templates they use.
//!
//! `batch_chat` builds each query like a first `chat` turn with one image entry, so it is
//! `build_query(template, system, &[], question, &[num_patches], num_image_token, true)`.
pub mod conversation;
pub mod hf;
pub mod sentencepiece;
pub mod template;
pub mod thinking;
pub mod tokenizer;

use template::Template;

/// The placeholder a question uses for an image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
pub const IMG_START_TOKEN: &str = "<img>";
pub const IMG_END_TOKEN: &str = "</img>";
pub const IMG_CONTEXT_TOKEN: &str = "<IMG_CONTEXT>";

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error(
        "the prompt has {placeholders} <image> placeholder(s) but {images} image(s) were given"
    )]
    ImageCount { placeholders: usize, images: usize },
    #[error(
        "the prompt has {placeholders} <video> placeholder(s) but {videos} video(s) were given"
    )]
    VideoCount { placeholders: usize, videos: usize },
    #[error("{what}")]
    Template { what: String },
    #[error(
        "the prompt has {} but {}",
        placeholder_count(*.placeholders),
        attached_count(*.attached)
    )]
    Placeholders {
        placeholders: usize,
        attached: usize,
    },
}

fn placeholder_count(n: usize) -> String {
    match n {
        1 => "1 <image> placeholder".into(),
        n => format!("{n} <image> placeholders"),
    }
}

fn attached_count(n: usize) -> String {
    match n {
        1 => "1 image/frame is attached".into(),
        n => format!("{n} images/frames are attached"),
    }
}

/// The question `chat` sends on a turn: on the first turn with images and no `<image>` in it,
/// `"<image>\n"` goes in front. This is also what `chat` keeps in the history.
pub fn chat_question(question: &str, num_images: usize, first_turn: bool) -> String {
    if first_turn && num_images > 0 && !question.contains(IMAGE_PLACEHOLDER) {
        format!("{IMAGE_PLACEHOLDER}\n{question}")
    } else {
        question.to_owned()
    }
}

/// The query `chat` tokenizes: the templated conversation with the `n`-th `<image>` (counted
/// over the whole prompt, history included) replaced by `<img>`, `num_image_token *
/// num_patches_list[n]` times `<IMG_CONTEXT>`, `</img>`.
///
/// Unlike the reference, a prompt whose `<image>` count differs from the number of images is
/// refused.
pub fn build_query(
    template: &Template,
    system_message: &str,
    history: &[(String, String)],
    question: &str,
    num_patches_list: &[usize],
    num_image_token: usize,
    first_turn: bool,
) -> Result<String, PromptError> {
    let question = chat_question(question, num_patches_list.len(), first_turn);
    let query = template.render(system_message, history, &question);
    let placeholders = query.matches(IMAGE_PLACEHOLDER).count();
    if placeholders != num_patches_list.len() {
        return Err(PromptError::ImageCount {
            placeholders,
            images: num_patches_list.len(),
        });
    }
    let context_len = IMG_CONTEXT_TOKEN.len() * num_image_token;
    let image_len: usize = num_patches_list.iter().map(|n| n * context_len).sum();
    let mut out = String::with_capacity(query.len() + image_len + num_patches_list.len() * 16);
    let mut parts = query.split(IMAGE_PLACEHOLDER);
    out.push_str(parts.next().unwrap_or_default());
    for (part, &num_patches) in parts.zip(num_patches_list) {
        out.push_str(IMG_START_TOKEN);
        out.push_str(&IMG_CONTEXT_TOKEN.repeat(num_image_token * num_patches));
        out.push_str(IMG_END_TOKEN);
        out.push_str(part);
    }
    Ok(out)
}

/// The model card's video prefix: `Frame1: <image>\nFrame2: <image>\n...`.
pub fn video_prefix(num_frames: usize) -> String {
    (1..=num_frames)
        .map(|i| format!("Frame{i}: {IMAGE_PLACEHOLDER}\n"))
        .collect()
}

/// The model card's prefix for separate images: `Image-1: <image>\nImage-2: <image>\n...`.
pub fn image_list_prefix(num_images: usize) -> String {
    (1..=num_images)
        .map(|i| format!("Image-{i}: {IMAGE_PLACEHOLDER}\n"))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::template::get_template;
    use super::tokenizer::Tokenizer;
    use super::*;
    use crate::testutil::fixture;
    use serde_json::Value;

    pub(crate) use crate::testutil::TINY_MODELS as MODELS;
    /// 448px tiles, downsample ratio 0.5: (448 / 14 * 0.5)^2.
    const NUM_IMAGE_TOKEN: usize = 256;

    /// Every golden case of a model that has turns, as parsed json.
    pub(crate) fn golden_cases(model: &str) -> Vec<(String, Value)> {
        let dir = fixture(&format!("golden/{model}"));
        let mut cases: Vec<(String, Value)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                let json: Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                (p.file_stem().unwrap().to_string_lossy().into_owned(), json)
            })
            .filter(|(_, json)| json.get("turns").is_some())
            .collect();
        cases.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(
            cases.len() >= 3,
            "{model}: only {} golden chat cases",
            cases.len()
        );
        cases
    }

    /// A json array of token ids.
    pub(crate) fn ids(value: &Value) -> Vec<u32> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }

    /// The images of a case as `chat` got them: `num_patches_list`, or one tile per video frame.
    fn num_patches_list(case: &Value) -> Vec<usize> {
        if let Some(list) = case.get("num_patches_list") {
            return list
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap() as usize)
                .collect();
        }
        if let Some(meta) = case.get("video_meta") {
            assert_eq!(
                case["max_num"], 1,
                "video frames are single tiles only with max_num 1"
            );
            return vec![1; meta["frame_indices"].as_array().unwrap().len()];
        }
        assert!(case.get("images").is_none());
        Vec::new()
    }

    fn config_template(model: &str) -> Template {
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("models/{model}/config.json"))).unwrap(),
        )
        .unwrap();
        get_template(config["template"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn every_golden_query_is_rebuilt_exactly() {
        for model in MODELS {
            let template = config_template(model);
            for (name, case) in golden_cases(model) {
                let patches = num_patches_list(&case);
                let mut history: Vec<(String, String)> = Vec::new();
                for (i, turn) in case["turns"].as_array().unwrap().iter().enumerate() {
                    let question = turn["question"].as_str().unwrap();
                    // the thinking case sets the model's system_message (the model card's
                    // R1_SYSTEM_PROMPT)
                    let system = case["system_message"]
                        .as_str()
                        .unwrap_or(&template.system_message);
                    let query = build_query(
                        &template,
                        system,
                        &history,
                        question,
                        &patches,
                        NUM_IMAGE_TOKEN,
                        i == 0,
                    )
                    .unwrap();
                    assert_eq!(
                        query,
                        turn["query"].as_str().unwrap(),
                        "{model}/{name} turn {i}"
                    );
                    history.push((
                        chat_question(question, patches.len(), i == 0),
                        turn["response"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
    }

    #[test]
    fn every_golden_query_encodes_to_its_input_ids() {
        for model in MODELS {
            let tokenizer = Tokenizer::from_dir(&fixture(&format!("models/{model}"))).unwrap();
            for (name, case) in golden_cases(model) {
                for (i, turn) in case["turns"].as_array().unwrap().iter().enumerate() {
                    let want = ids(&turn["input_ids"]);
                    let got = tokenizer.encode(turn["query"].as_str().unwrap()).unwrap();
                    assert_eq!(got, want, "{model}/{name} turn {i}");
                }
            }
        }
    }

    #[test]
    fn every_golden_response_is_decoded_like_model_chat() {
        for model in MODELS {
            let tokenizer = Tokenizer::from_dir(&fixture(&format!("models/{model}"))).unwrap();
            let template = config_template(model);
            for (name, case) in golden_cases(model) {
                for (i, turn) in case["turns"].as_array().unwrap().iter().enumerate() {
                    let decoded = tokenizer.decode(&ids(&turn["generated_ids"]), true);
                    assert_eq!(
                        template.response_text(&decoded),
                        turn["response"].as_str().unwrap(),
                        "{model}/{name} turn {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn golden_questions_use_the_model_card_prefixes() {
        for model in MODELS {
            for (name, case) in golden_cases(model) {
                let question = case["question"].as_str().unwrap();
                match name.as_str() {
                    "video" => assert_eq!(
                        question,
                        video_prefix(8) + "What is happening in this video?"
                    ),
                    "image_separate" => {
                        assert_eq!(
                            question,
                            image_list_prefix(2) + "Describe the two images in detail."
                        )
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn image_tokens_expand_in_order_and_in_history() {
        let t = get_template("internvl2_5").unwrap();
        let history = vec![("<image>\nfirst".to_owned(), "ok".to_owned())];
        let query = build_query(
            &t,
            "S",
            &history,
            "Image-1: <image>\nsecond",
            &[2, 1],
            2,
            false,
        )
        .unwrap();
        let img = |n: usize| format!("<img>{}</img>", "<IMG_CONTEXT>".repeat(n));
        assert_eq!(
            query,
            format!(
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{}\nfirst<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n\
                 <|im_start|>user\nImage-1: {}\nsecond<|im_end|>\n<|im_start|>assistant\n",
                img(4),
                img(2)
            )
        );
    }

    #[test]
    fn the_image_tag_is_added_only_on_a_first_turn_with_images() {
        let t = get_template("internvl2_5").unwrap();
        let first = build_query(&t, "S", &[], "what?", &[1], 1, true).unwrap();
        assert!(
            first.contains("<|im_start|>user\n<img><IMG_CONTEXT></img>\nwhat?<|im_end|>"),
            "{first}"
        );
        let text_only = build_query(&t, "S", &[], "what?", &[], 1, true).unwrap();
        assert!(
            text_only.contains("<|im_start|>user\nwhat?<|im_end|>"),
            "{text_only}"
        );
        // a later turn without a placeholder anywhere has nowhere to put the image
        let err = build_query(
            &t,
            "S",
            &[("q".into(), "a".into())],
            "what?",
            &[1],
            1,
            false,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the prompt has 0 <image> placeholder(s) but 1 image(s) were given"
        );
    }

    #[test]
    fn placeholder_and_image_counts_must_agree() {
        let t = get_template("internvl2_5").unwrap();
        let err = build_query(&t, "S", &[], "<image>\n<image>\nboth", &[1], 256, true).unwrap_err();
        assert!(
            matches!(
                err,
                PromptError::ImageCount {
                    placeholders: 2,
                    images: 1
                }
            ),
            "{err}"
        );
        let err = build_query(&t, "S", &[], "<image>\none", &[1, 3], 256, true).unwrap_err();
        assert!(
            matches!(
                err,
                PromptError::ImageCount {
                    placeholders: 1,
                    images: 2
                }
            ),
            "{err}"
        );
        let err =
            build_query(&t, "S", &[], "typed <image> without images", &[], 256, true).unwrap_err();
        assert!(
            matches!(
                err,
                PromptError::ImageCount {
                    placeholders: 1,
                    images: 0
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn prefixes() {
        assert_eq!(video_prefix(2), "Frame1: <image>\nFrame2: <image>\n");
        assert_eq!(
            image_list_prefix(3),
            "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\n"
        );
        assert_eq!(video_prefix(0), "");
    }
}
