//! The prompt expander: any conversation (system message, turns with their attachments' tile
//! counts, a question with or without `<image>` placeholders, any template) gives the query or
//! an error saying why, never a panic; and a query keeps its promises: every placeholder is
//! expanded, each into `<img>`, `tokens_per_tile` `<IMG_CONTEXT>` per tile, `</img>`, and every
//! attached tile is in it once.
#![no_main]
use arbitrary::Arbitrary;
use internvl_chat::prompt::conversation::{droppable_turns, expand, Conversation, Media, PastTurn};
use internvl_chat::prompt::template::{get_template, TEMPLATE_NAMES};
use internvl_chat::prompt::{IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_START_TOKEN};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct MediaIn {
    video: bool,
    /// Tiles of each placeholder (1..=13 each, as a 12-tile grid plus its thumbnail).
    tiles: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct TurnIn<'a> {
    question: &'a str,
    answer: &'a str,
    media: Vec<MediaIn>,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    template: u8,
    system: &'a str,
    history: Vec<TurnIn<'a>>,
    question: &'a str,
    media: Vec<MediaIn>,
    combine_images: bool,
    tokens_per_tile: u8,
}

fn media(m: &[MediaIn]) -> Vec<Media> {
    m.iter()
        .take(8)
        .map(|m| Media {
            video: m.video,
            tiles: m
                .tiles
                .iter()
                .take(16)
                .map(|&t| usize::from(t % 13) + 1)
                .collect(),
        })
        .filter(|m| !m.tiles.is_empty())
        .collect()
}

fn tiles(m: &[Media]) -> usize {
    m.iter().flat_map(|m| &m.tiles).sum()
}

fuzz_target!(|input: Input| {
    let template =
        get_template(TEMPLATE_NAMES[usize::from(input.template) % TEMPLATE_NAMES.len()]).unwrap();
    let tokens_per_tile = usize::from(input.tokens_per_tile % 8) + 1;
    let history_media: Vec<Vec<Media>> = input
        .history
        .iter()
        .take(16)
        .map(|t| media(&t.media))
        .collect();
    let history: Vec<PastTurn> = input
        .history
        .iter()
        .zip(&history_media)
        .map(|(t, m)| PastTurn {
            question: t.question,
            answer: t.answer,
            media: m.clone(),
        })
        .collect();
    let new = media(&input.media);
    let conv = Conversation {
        system: input.system,
        history: &history,
        question: input.question,
        media: &new,
        combine_images: input.combine_images,
    };
    assert!(droppable_turns(&history) <= history.len());
    let Ok(e) = expand(&template, &conv, tokens_per_tile) else {
        return;
    };
    // every tile attached to the conversation is in the prompt once
    let all: usize = history_media.iter().map(|m| tiles(m)).sum::<usize>() + tiles(&new);
    assert_eq!(e.num_patches.iter().sum::<usize>(), all);
    // the conversation before expansion, and what expansion added to it
    let pairs: Vec<(String, String)> = history
        .iter()
        .map(|t| (t.question.to_string(), t.answer.to_string()))
        .collect();
    let rendered = template.render(input.system, &pairs, &e.question);
    assert_eq!(
        rendered.matches(IMAGE_PLACEHOLDER).count(),
        e.num_patches.len()
    );
    assert!(!e.query.contains(IMAGE_PLACEHOLDER), "{:?}", e.query);
    assert_eq!(
        e.query.matches(IMG_START_TOKEN).count(),
        rendered.matches(IMG_START_TOKEN).count() + e.num_patches.len()
    );
    assert_eq!(
        e.query.matches(IMG_CONTEXT_TOKEN).count(),
        rendered.matches(IMG_CONTEXT_TOKEN).count() + all * tokens_per_tile
    );
    // the question as sent keeps what was typed
    assert!(e.question.ends_with(input.question));
});
