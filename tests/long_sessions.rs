//! Issue #7, long conversations: a prompt over the context window is refused with the numbers,
//! or, when asked (`--truncate-history`, a request's `truncate_history`, `/set truncate_history
//! on`), the oldest whole turns are left out until it fits.
mod common;
use common::*;
use internvl_chat::engine::chat::{ChatInput, Engine, Fit};
use internvl_chat::engine::generate::Flow;
use internvl_chat::engine::protocol::{Attachment, Turn};
use internvl_chat::model::LoadOptions;
use internvl_chat::sampling::SamplingParams;
use internvl_chat::testutil::fixture;
use serde_json::{json, Value};
use tch::{Device, Kind};

fn engine(dir: &std::path::Path) -> Engine {
    Engine::load(dir, &LoadOptions::single(Device::Cpu, Kind::Float)).unwrap()
}

/// [start, end) of each run of `id`.
fn runs(ids: &[i64], id: i64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == id {
            let s = i;
            while i < ids.len() && ids[i] == id {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn history_is_refused_or_truncated_oldest_first_by_whole_turns() {
    let m = model_with_context("tiny-qwen2", 1536);
    let mut e = engine(m.path());
    let images = ["image1.jpg", "image2.jpg", "image3.jpg", "waterview.jpg"];
    // 8 turns of one 1-tile picture (256 tokens) and a 30-word answer: ~2400 tokens in all
    let history: Vec<Turn> = (0..8)
        .map(|i| Turn {
            question: format!("<image>\nWhat is in picture {i}?"),
            attachments: vec![Attachment::Image {
                path: fixture(&format!("media/images/{}", images[i % 4])),
                max_tiles: Some(1),
            }],
            answer: format!("Picture {i} shows {}", "something ".repeat(30)),
        })
        .collect();
    let input = ChatInput {
        system: None,
        history: &history,
        question: "Which picture was the brightest?",
        attachments: &[],
        combine_images: false,
    };
    let refuse = Fit {
        max_new_tokens: 16,
        truncate_history: false,
    };
    let full = e.prepare(&input).unwrap().ids.len();
    assert!(full > 2000, "{full}");
    assert_eq!(
        e.prepare_to_fit(&input, refuse).err().unwrap().to_string(),
        format!(
            "prompt of {full} tokens plus 16 new tokens exceeds the context window of 1536 tokens"
        )
    );
    let truncate = Fit {
        truncate_history: true,
        ..refuse
    };
    let p = e.prepare_to_fit(&input, truncate).unwrap();
    let k = p.dropped_turns;
    assert!((1..8).contains(&k), "{k}");
    assert!(p.ids.len() + 16 <= 1536);
    // exactly the prompt of the newest 8 - k turns, and keeping one more would not fit
    let kept = e
        .prepare(&ChatInput {
            history: &history[k..],
            ..input
        })
        .unwrap();
    assert_eq!(p.ids, kept.ids);
    assert_eq!(p.query, kept.query);
    let one_more = e
        .prepare(&ChatInput {
            history: &history[k - 1..],
            ..input
        })
        .unwrap();
    assert!(one_more.ids.len() + 16 > 1536);
    // whole turns: the kept pictures are complete runs of 256 <IMG_CONTEXT> inside <img>…</img>
    let ctx = e.img_context_id;
    let open = e.tokenizer.token_to_id("<img>").unwrap() as i64;
    let close = e.tokenizer.token_to_id("</img>").unwrap() as i64;
    let r = runs(&p.ids, ctx);
    assert_eq!(r.len(), 8 - k);
    for (s, end) in r {
        assert_eq!(end - s, 256);
        assert_eq!((p.ids[s - 1], p.ids[end]), (open, close));
    }
    // the system message and the question stay; the oldest kept turn is turn k
    assert!(p.query.starts_with("<|im_start|>system\n"), "{}", p.query);
    assert!(p
        .query
        .ends_with("Which picture was the brightest?<|im_end|>\n<|im_start|>assistant\n"));
    assert!(p.query.contains(&format!("What is in picture {k}?")));
    assert!(!p.query.contains(&format!("What is in picture {}?", k - 1)));
    // and the model answers it, within the window
    let out = e
        .run(&p, &SamplingParams::greedy(16), &mut |_| Flow::Continue)
        .unwrap();
    assert!(!out.tokens.is_empty());
    let (len, cap) = e.kv_cache_size();
    assert!(len <= 1536 && cap <= 1536, "{len} {cap}");

    // a question that does not fit on its own is refused even with every turn left out
    let long = "word ".repeat(2000);
    let err = e
        .prepare_to_fit(
            &ChatInput {
                question: &long,
                ..input
            },
            truncate,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("new tokens exceeds the context window of 1536 tokens even with the 8 oldest turns left out"),
        "{err}"
    );
}

/// A JSONL `history` too long for the window: refused with the numbers, or cut when the line or
/// the command line asks for it.
#[test]
fn batch_truncates_history_only_when_asked() {
    let m = model_with_context("tiny-qwen2", 512);
    let d = tempdir("trunc");
    let history: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                format!("Question {i}?"),
                format!("Answer {i}: {}", "blah ".repeat(60)),
            )
        })
        .collect();
    let line = |id: u32, truncate: Option<bool>| {
        let mut v = json!({"id": id, "question": "And so?", "history": history,
            "do_sample": false, "max_new_tokens": 8});
        if let Some(t) = truncate {
            v["truncate_history"] = t.into();
        }
        v.to_string()
    };
    let input = d.path().join("in.jsonl");
    std::fs::write(
        &input,
        [line(1, None), line(2, Some(true)), line(3, Some(false))].join("\n"),
    )
    .unwrap();
    let batch = |extra: &[&str]| -> Vec<Value> {
        let mut a = vec![
            "batch",
            "--model",
            m.path().to_str().unwrap(),
            "--device",
            "cpu",
            "--input",
            input.to_str().unwrap(),
        ];
        a.extend(extra);
        let o = run(&a, None);
        assert_eq!(o.status.code(), Some(1), "a line fails: {}", stderr(&o));
        stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let refused = |r: &Value| {
        let e = r["error"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(e.starts_with("prompt of "), "{e}");
        assert!(e.ends_with("plus 8 new tokens exceeds the context window of 512 tokens"));
    };
    let cut = |r: &Value| {
        assert!(r.get("error").is_none(), "{r}");
        let dropped = r["dropped_turns"].as_u64().unwrap();
        assert!((1..6).contains(&dropped), "{r}");
        assert!(r["prompt_tokens"].as_u64().unwrap() + 8 <= 512, "{r}");
    };
    let r = batch(&[]);
    refused(&r[0]);
    cut(&r[1]);
    refused(&r[2]);
    let r = batch(&["--truncate-history"]);
    cut(&r[0]);
    cut(&r[1]);
    refused(&r[2]);
    assert_eq!(r[0]["dropped_turns"], r[1]["dropped_turns"]);
}

/// Fitting a history remembers how many tiles each attachment gives, but not past a change of
/// the file.
#[test]
fn a_picture_replaced_on_disk_is_read_again() {
    let m = model_with_context("tiny-qwen2", 1024);
    let e = engine(m.path());
    let d = tempdir("replaced");
    let pic = d.path().join("pic.png");
    let save = |w: u32, h: u32| {
        image::RgbImage::from_fn(w, h, |x, _| image::Rgb([x as u8, 9, 9]))
            .save(&pic)
            .unwrap()
    };
    save(40, 40);
    let history: Vec<Turn> = (0..3)
        .map(|i| Turn {
            question: format!("<image>\nPicture {i}?"),
            attachments: vec![Attachment::Image {
                path: pic.clone(),
                max_tiles: Some(2),
            }],
            answer: "A picture.".into(),
        })
        .collect();
    let input = ChatInput {
        system: None,
        history: &history,
        question: "Again?",
        attachments: &[],
        combine_images: false,
    };
    let fit = Fit {
        max_new_tokens: 8,
        truncate_history: true,
    };
    // square: one tile each, everything fits
    let p = e.prepare_to_fit(&input, fit).unwrap();
    assert_eq!((p.dropped_turns, p.num_patches.clone()), (0, vec![1, 1, 1]));
    // wide: two tiles and a thumbnail each, 768 tokens a turn: only one turn fits
    save(400, 100);
    let p = e.prepare_to_fit(&input, fit).unwrap();
    assert_eq!((p.dropped_turns, p.num_patches.clone()), (2, vec![3]));
}
