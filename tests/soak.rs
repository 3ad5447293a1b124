//! Issue #7, the soak test: 200 turns with attachments in one conversation on one engine, as
//! the chat sends them (the whole history each time, oldest turns left out when the context is
//! full). Memory stays flat and the KV cache never grows past the context window.
//!
//! Alone in its file, so the process's RSS is this test's.
mod common;
use common::*;
use image::{DynamicImage, Rgb, RgbImage};
use internvl_chat::engine::chat::{ChatInput, Engine, Fit};
use internvl_chat::engine::generate::Flow;
use internvl_chat::engine::protocol::{Attachment, Turn};
use internvl_chat::model::LoadOptions;
use internvl_chat::sampling::SamplingParams;
use internvl_chat::testutil::fixture;
use tch::{Device, Kind};

const TURNS: usize = 200;
const CONTEXT: usize = 2048;
const MAX_NEW: usize = 8;

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

#[test]
fn two_hundred_turns_with_attachments_keep_memory_flat_and_the_cache_in_the_window() {
    let m = model_with_context("tiny-qwen2", CONTEXT);
    let mut engine =
        Engine::load(m.path(), &LoadOptions::single(Device::Cpu, Kind::Float)).unwrap();
    assert_eq!(engine.context_len(), CONTEXT);
    let pics = tempdir("soak");
    let images: Vec<std::path::PathBuf> = (0..12u32)
        .map(|i| {
            let (w, h) = [(64, 48), (40, 90), (120, 30)][i as usize % 3];
            let img = RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 4 + i * 20) as u8, (y * 3) as u8, (i * 17) as u8])
            });
            let p = pics.path().join(format!("pic{i}.png"));
            DynamicImage::ImageRgb8(img).save(&p).unwrap();
            p
        })
        .collect();
    let video = fixture("media/videos/video_90.mov");
    let mut history: Vec<Turn> = Vec::new();
    let mut rss_at = Vec::new();
    let mut most_dropped = 0;
    for turn in 1..=TURNS {
        let attachments = if turn % 25 == 0 {
            vec![Attachment::Video {
                path: video.clone(),
                segments: 3,
                bound: None,
                max_tiles: 1,
            }]
        } else {
            vec![Attachment::Image {
                path: images[turn % images.len()].clone(),
                max_tiles: Some(if turn % 7 == 0 { 2 } else { 1 }),
            }]
        };
        let question = format!("Turn {turn}: what colour is it?");
        let input = ChatInput {
            system: None,
            history: &history,
            question: &question,
            attachments: &attachments,
            combine_images: false,
        };
        let fit = Fit {
            max_new_tokens: MAX_NEW,
            truncate_history: true,
        };
        let p = engine
            .prepare_to_fit(&input, fit)
            .unwrap_or_else(|e| panic!("turn {turn}: {e}"));
        let params = SamplingParams {
            seed: turn as u64,
            max_new_tokens: MAX_NEW,
            ..SamplingParams::default()
        };
        let out = engine
            .run(&p, &params, &mut |_| Flow::Continue)
            .unwrap_or_else(|e| panic!("turn {turn}: {e}"));
        assert!(p.prompt_tokens() + MAX_NEW <= CONTEXT, "turn {turn}");
        let (len, cap) = engine.kv_cache_size();
        assert!(
            len <= CONTEXT && cap <= CONTEXT,
            "turn {turn}: KV cache holds {len} positions in room for {cap}, context {CONTEXT}"
        );
        assert_eq!(len, p.prompt_tokens() + out.tokens.len() - 1, "turn {turn}");
        most_dropped = most_dropped.max(p.dropped_turns);
        history.push(Turn {
            question: p.question.clone(),
            attachments,
            answer: out.answer,
        });
        if turn == 1 || turn % 50 == 0 {
            rss_at.push((turn, rss()));
            eprintln!(
                "soak: turn {turn}: RSS {:.1} MiB, prompt {} tokens, {} oldest turns left out, KV cache {len}/{cap}",
                mib(rss()),
                p.prompt_tokens(),
                p.dropped_turns
            );
        }
    }
    assert_eq!(history.len(), TURNS);
    assert!(
        most_dropped > TURNS / 2,
        "the context filled and old turns were left out ({most_dropped})"
    );
    let first = rss_at[0].1;
    let last = rss_at.last().unwrap().1;
    println!(
        "soak: RSS at turn 1: {:.1} MiB, at turn {TURNS}: {:.1} MiB",
        mib(first),
        mib(last)
    );
    assert!(
        last < first + (200 << 20),
        "RSS grew from {:.1} MiB to {:.1} MiB over {TURNS} turns",
        mib(first),
        mib(last)
    );
    // once the window is full (by turn 50) memory is flat: no per-turn leak (the allocator
    // moves it by a few tens of MiB either way)
    let full = rss_at[1].1;
    assert!(
        last < full + (100 << 20),
        "RSS grew from {:.1} MiB at turn 50 to {:.1} MiB at turn {TURNS}",
        mib(full),
        mib(last)
    );
}
