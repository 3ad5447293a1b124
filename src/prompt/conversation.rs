//! A whole conversation to the query the model reads: which tiles each `<image>` placeholder
//! stands for, the placeholders the program adds for attachments, and the template. Pure: the
//! engine says how many tiles each attachment gives; no file, tokenizer or model is involved.
use super::template::Template;
use super::{build_query, image_list_prefix, video_prefix, PromptError, IMAGE_PLACEHOLDER};

/// An attachment as the prompt sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Media {
    pub video: bool,
    /// Tiles of each placeholder it fills: one entry for an image, one per frame of a video.
    pub tiles: Vec<usize>,
}

/// A finished turn.
#[derive(Debug, Clone, PartialEq)]
pub struct PastTurn<'a> {
    /// The question as it was sent, placeholders included.
    pub question: &'a str,
    pub answer: &'a str,
    /// The turn's own attachments. Without any, its placeholders take the new question's
    /// attachments first, as `chat` fills a JSONL-style `history`.
    pub media: Vec<Media>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversation<'a> {
    pub system: &'a str,
    pub history: &'a [PastTurn<'a>],
    /// The new question as typed.
    pub question: &'a str,
    /// The new question's attachments, images before videos.
    pub media: &'a [Media],
    /// Several images as one `<image>` instead of `Image-1: <image>` lines.
    pub combine_images: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expanded {
    /// The new question as sent, with the placeholders added for its attachments.
    pub question: String,
    /// The templated conversation with every `<image>` expanded to `<img>`, `<IMG_CONTEXT>`s,
    /// `</img>`.
    pub query: String,
    /// Tiles of each placeholder, in prompt order.
    pub num_patches: Vec<usize>,
}

/// The question with placeholders for `media` when it has none of its own: images first
/// (`<image>\n` for one image or combined images, `Image-1: <image>\n…` for several), then a
/// video's `Frame1: <image>\n…`, as the model card writes them.
pub fn with_placeholders(question: &str, media: &[Media], combine: bool) -> String {
    if question.contains(IMAGE_PLACEHOLDER) || media.is_empty() {
        return question.to_string();
    }
    let n_images = media.iter().filter(|m| !m.video).count();
    let mut prefix = String::new();
    if n_images == 1 || (combine && n_images > 1) {
        prefix.push_str("<image>\n");
    } else if n_images > 1 {
        prefix.push_str(&image_list_prefix(n_images));
    }
    for m in media.iter().filter(|m| m.video) {
        prefix.push_str(&video_prefix(m.tiles.len()));
    }
    prefix + question
}

/// Tiles per placeholder when `slots` placeholders take `media`: one each, or all in one.
pub fn assign(slots: usize, media: &[Media]) -> Result<Vec<usize>, PromptError> {
    let per: Vec<usize> = media.iter().flat_map(|m| m.tiles.iter().copied()).collect();
    if slots == per.len() {
        Ok(per)
    } else if slots == 1 && !per.is_empty() {
        Ok(vec![per.iter().sum()])
    } else {
        Err(PromptError::Placeholders {
            placeholders: slots,
            attached: per.len(),
        })
    }
}

/// The conversation's query, as `chat` builds it for its `history` and `question`.
pub fn expand(
    template: &Template,
    conv: &Conversation,
    tokens_per_tile: usize,
) -> Result<Expanded, PromptError> {
    let mut num_patches = Vec::new();
    let mut history = Vec::with_capacity(conv.history.len());
    let mut pending = 0;
    for t in conv.history {
        let slots = t.question.matches(IMAGE_PLACEHOLDER).count();
        if t.media.is_empty() {
            pending += slots;
        } else {
            num_patches.extend(assign(slots, &t.media)?);
        }
        history.push((t.question.to_string(), t.answer.to_string()));
    }
    let question = if pending > 0 {
        conv.question.to_string()
    } else {
        with_placeholders(conv.question, conv.media, conv.combine_images)
    };
    let slots = pending + question.matches(IMAGE_PLACEHOLDER).count();
    num_patches.extend(assign(slots, conv.media)?);
    let query = build_query(
        template,
        conv.system,
        &history,
        &question,
        &num_patches,
        tokens_per_tile,
        conv.history.is_empty(),
    )?;
    Ok(Expanded {
        question,
        query,
        num_patches,
    })
}

/// How many of the oldest turns may be left out to make room: every turn before the first one
/// whose placeholders wait for the new question's attachments (leaving that one out would hand
/// the attachments to the wrong placeholders).
pub fn droppable_turns(history: &[PastTurn]) -> usize {
    history
        .iter()
        .position(|t| t.media.is_empty() && t.question.contains(IMAGE_PLACEHOLDER))
        .unwrap_or(history.len())
}

#[cfg(test)]
mod tests {
    use super::super::template::get_template;
    use super::super::IMG_CONTEXT_TOKEN;
    use super::*;

    fn image(tiles: usize) -> Media {
        Media {
            video: false,
            tiles: vec![tiles],
        }
    }

    fn video(frames: usize) -> Media {
        Media {
            video: true,
            tiles: vec![1; frames],
        }
    }

    fn conv<'a>(
        history: &'a [PastTurn<'a>],
        question: &'a str,
        media: &'a [Media],
    ) -> Conversation<'a> {
        Conversation {
            system: "sys",
            history,
            question,
            media,
            combine_images: false,
        }
    }

    #[test]
    fn placeholders_are_added_like_the_model_card() {
        let t = get_template("internvl2_5").unwrap();
        let m = [image(7), image(1), video(2)];
        let e = expand(&t, &conv(&[], "What differs?", &m), 2).unwrap();
        assert_eq!(
            e.question,
            "Image-1: <image>\nImage-2: <image>\nFrame1: <image>\nFrame2: <image>\nWhat differs?"
        );
        assert_eq!(e.num_patches, [7, 1, 1, 1]);
        assert_eq!(e.query.matches(IMG_CONTEXT_TOKEN).count(), 2 * 10);
        let mut c = conv(&[], "Compare.", &m[..2]);
        c.combine_images = true;
        let e = expand(&t, &c, 2).unwrap();
        assert_eq!(
            (e.question.as_str(), e.num_patches),
            ("<image>\nCompare.", vec![8])
        );
    }

    #[test]
    fn history_turns_keep_their_own_tiles_and_jsonl_history_takes_the_new_attachments() {
        let t = get_template("internvl2_5").unwrap();
        let history = [
            PastTurn {
                question: "<image>\nWhat is it?",
                answer: "A cat.",
                media: vec![image(3)],
            },
            PastTurn {
                question: "And <image>?",
                answer: "A dog.",
                media: vec![],
            },
        ];
        let m = [image(5)];
        let e = expand(&t, &conv(&history, "Which is bigger?", &m), 1).unwrap();
        // the pending placeholder of turn 2 takes the new image; the question gets none
        assert_eq!(e.question, "Which is bigger?");
        assert_eq!(e.num_patches, [3, 5]);
        assert_eq!(droppable_turns(&history), 1);
        assert_eq!(droppable_turns(&history[..1]), 1);
    }

    #[test]
    fn counts_that_disagree_are_refused_with_the_numbers() {
        let t = get_template("internvl2_5").unwrap();
        let m = [image(1), image(1), image(1)];
        let e = expand(&t, &conv(&[], "<image> then <image>", &m), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the prompt has 2 <image> placeholders but 3 images/frames are attached"
        );
        let e = expand(&t, &conv(&[], "What is in <image>?", &[]), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the prompt has 1 <image> placeholder but 0 images/frames are attached"
        );
        let e = expand(&t, &conv(&[], "<image><image>", &m[..1]), 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the prompt has 2 <image> placeholders but 1 image/frame is attached"
        );
        // one placeholder takes several images, as combined
        let e = expand(&t, &conv(&[], "<image> all of them", &m), 1).unwrap();
        assert_eq!(e.num_patches, [3]);
    }
}
