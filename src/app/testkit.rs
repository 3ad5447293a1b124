//! Helpers for the chat's tests: an app in a temporary folder, keys, engine events, fake
//! attachment infos.
use super::config::Settings;
use super::input::PathContext;
use super::state::{App, EntryKind, Exchange, SessionRef};
use super::update::{Command, Msg};
use super::AttachmentInfo;
use crate::engine::protocol::{
    DoneStats, EngineEvent, Finish, GenerateRequest, ModelInfo, RequestId,
};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use image::{Rgb, RgbImage};
use std::path::Path;
use std::time::Duration;

/// A chat whose working folder, home and sessions live in `dir`.
pub fn app_in(dir: &Path) -> App {
    App::new(
        Settings::default(),
        PathContext {
            cwd: dir.to_path_buf(),
            home: Some(dir.to_path_buf()),
        },
        dir.join("sessions"),
        SessionRef {
            name: "chat-test".into(),
            id: "id-test".into(),
        },
    )
}

pub fn model_info() -> ModelInfo {
    ModelInfo {
        name: "InternVL2_5-1B".into(),
        device: "cpu".into(),
        dtype: "bf16".into(),
        context_len: 8192,
        max_tiles: 12,
    }
}

pub fn ready(app: &mut App) {
    app.update(Msg::Engine(EngineEvent::Ready(model_info())));
    // let the "ready" message fade so screens do not depend on it
    app.flash = None;
}

pub fn key(app: &mut App, code: KeyCode) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)))
}

pub fn ctrl(app: &mut App, c: char) -> Vec<Command> {
    app.update(Msg::Key(KeyEvent::new(
        KeyCode::Char(c),
        KeyModifiers::CONTROL,
    )))
}

pub fn type_text(app: &mut App, text: &str) {
    for c in text.chars() {
        key(app, KeyCode::Char(c));
    }
}

/// Types `text` and presses Enter.
pub fn submit(app: &mut App, text: &str) -> Vec<Command> {
    type_text(app, text);
    key(app, KeyCode::Enter)
}

pub fn engine(app: &mut App, ev: EngineEvent) -> Vec<Command> {
    app.update(Msg::Engine(ev))
}

/// The one `Generate` among `cmds`.
pub fn request(cmds: &[Command]) -> &GenerateRequest {
    let reqs: Vec<_> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Generate(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(reqs.len(), 1, "one Generate expected in {cmds:?}");
    reqs[0]
}

/// Probe ids among `cmds`.
pub fn probes(cmds: &[Command]) -> Vec<u64> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Probe { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

pub fn stats(finish: Finish, completion_tokens: usize) -> DoneStats {
    DoneStats {
        finish,
        prompt_tokens: 1812,
        completion_tokens,
        ttft: Duration::from_millis(1250),
        tokens_per_s: 31.4,
    }
}

/// Started, the tokens, then Done with their concatenation; returns Done's commands.
pub fn answer(app: &mut App, id: RequestId, tokens: &[&str], finish: Finish) -> Vec<Command> {
    engine(
        app,
        EngineEvent::Started {
            id,
            question: "<image>\nquestion".into(),
            prompt_tokens: 1812,
            dropped_turns: 0,
        },
    );
    for t in tokens {
        engine(
            app,
            EngineEvent::Token {
                id,
                text: (*t).into(),
            },
        );
    }
    engine(
        app,
        EngineEvent::Done {
            id,
            answer: tokens.concat(),
            stats: stats(finish, tokens.len()),
        },
    )
}

/// A picture: left half `a`, right half `b`, with a white square in the top-left quarter.
pub fn picture(w: u32, h: u32, a: [u8; 3], b: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        if x < w / 4 && y < h / 4 {
            Rgb([255, 255, 255])
        } else if x < w / 2 {
            Rgb(a)
        } else {
            Rgb(b)
        }
    })
}

pub fn info(name: &str) -> AttachmentInfo {
    AttachmentInfo {
        name: name.into(),
        bytes: 250_880,
        grid: (3, 2),
        tiles: 7,
        tokens: 1792,
        duration: None,
        preview: Some(picture(96, 64, [40, 120, 200], [200, 160, 40])),
        frames: Vec::new(),
    }
}

pub fn exchange_count(app: &App) -> usize {
    app.exchanges().count()
}

pub fn last(app: &App) -> &Exchange {
    app.exchanges().next_back().expect("an exchange").1
}

/// The latest notice: its text and whether it is an error.
pub fn last_notice(app: &App) -> (String, bool) {
    app.entries
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EntryKind::Notice { text, error } => Some((text.clone(), *error)),
            EntryKind::Exchange(_) => None,
        })
        .expect("a notice")
}

/// An answered exchange: "first?" -> "First answer."
pub fn one_turn(app: &mut App) -> RequestId {
    let id = request(&submit(app, "first?")).id;
    answer(app, id, &["First ", "answer."], Finish::Stop);
    id
}
