//! Rendering snapshots (TestBackend + insta). Screens hold no clock time: the spinner moves
//! with ticks, which these tests do not send, and rates come from the engine's stats.
use super::grounding;
use super::testkit::*;
use super::update::Msg;
use super::App;
use crate::engine::protocol::{Attachment, EngineEvent, Fault, Finish};
use crossterm::event::KeyCode;
use insta::assert_snapshot;
use ratatui::backend::TestBackend;
use ratatui::layout::Position;
use ratatui::style::Color;
use ratatui::Terminal;
use std::fs;

fn terminal(w: u16, h: u16) -> Terminal<TestBackend> {
    Terminal::new(TestBackend::new(w, h)).expect("test terminal")
}

/// Draws as the run loop does (widget, then the cursor).
fn draw(t: &mut Terminal<TestBackend>, app: &App) -> Option<Position> {
    let mut cursor = None;
    t.draw(|f| {
        f.render_widget(app, f.area());
        cursor = app.cursor(f.area());
        if let Some(p) = cursor {
            f.set_cursor_position(p);
        }
    })
    .expect("draw");
    cursor
}

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut t = terminal(w, h);
    draw(&mut t, app);
    t.backend().to_string()
}

fn drawn(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = terminal(w, h);
    draw(&mut t, app);
    t
}

/// A ready chat in `dir` with one finished exchange and a streaming one.
fn streaming_app(dir: &std::path::Path) -> App {
    let mut app = app_in(dir);
    ready(&mut app);
    let id = request(&submit(&mut app, "What is Rust?")).id;
    answer(&mut app, id, &["A systems language."], Finish::Stop);
    let id = request(&submit(&mut app, "Show me a loop, briefly.")).id;
    engine(
        &mut app,
        EngineEvent::Started {
            id,
            question: "Show me a loop, briefly.".into(),
            prompt_tokens: 64,
            dropped_turns: 0,
        },
    );
    for t in [
        "## A loop\n\n",
        "Use **`for`** over a *range*:\n\n",
        "```rust\nfor i in 0..3 {\n",
        "    println!(\"{i}\"); // print\n",
    ] {
        engine(&mut app, EngineEvent::Token { id, text: t.into() });
    }
    app
}

#[test]
fn loading_screen() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_in(dir.path());
    engine(
        &mut app,
        EngineEvent::Loading {
            progress: 0.4,
            what: "language model".into(),
        },
    );
    assert_snapshot!(screen(&app, 80, 12));
}

#[test]
fn streaming_markdown() {
    let dir = tempfile::tempdir().unwrap();
    let app = streaming_app(dir.path());
    assert_snapshot!(screen(&app, 80, 26));
}

#[test]
fn cancelled_answer_keeps_the_partial_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = streaming_app(dir.path());
    let id = app.gen.as_ref().unwrap().id;
    key(&mut app, KeyCode::Esc);
    let partial = "## A loop\n\nUse **`for`** over a *range*:\n\n```rust\nfor i in 0..3 {\n";
    engine(
        &mut app,
        EngineEvent::Done {
            id,
            answer: partial.into(),
            stats: stats(Finish::Cancelled, 17),
        },
    );
    assert_snapshot!(screen(&app, 80, 22));
}

#[test]
fn engine_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_in(dir.path());
    ready(&mut app);
    let id = request(&submit(&mut app, "Describe it.")).id;
    engine(
        &mut app,
        EngineEvent::Error {
            id,
            message: "out of memory while encoding 13 tiles".into(),
            fault: Fault::Engine,
        },
    );
    assert_snapshot!(screen(&app, 60, 14));
}

#[test]
fn wide_characters_wrap_and_keep_the_cursor_right() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_in(dir.path());
    ready(&mut app);
    let id = request(&submit(&mut app, "这张图片里有什么？🐱🐶")).id;
    answer(
        &mut app,
        id,
        &["图片中有一只猫🐱和一只狗🐶，它们在草地上玩耍。Both are happy 😀 today."],
        Finish::Stop,
    );
    type_text(&mut app, "再说一遍🙂好");
    let mut t = terminal(30, 20);
    let cursor = draw(&mut t, &app);
    assert_snapshot!(t.backend().to_string());
    // "› " + 再说一遍 (8) + 🙂 (2) + 好 (2): column 14 of the 28-column text area
    let input_row = 18;
    assert_eq!(cursor, Some(Position::new(14, input_row)));
    // moving left over the wide 好 moves two columns
    key(&mut app, KeyCode::Left);
    assert_eq!(draw(&mut t, &app), Some(Position::new(12, input_row)));
    // a prompt wider than the box wraps and the cursor follows onto the next row
    type_text(&mut app, "字字字字字字字字字字字");
    let c = draw(&mut t, &app).unwrap();
    let layout = app.editor.layout(28);
    assert_eq!(layout.rows.len(), 2);
    assert_eq!(c.x, 2 + layout.cursor.1);
}

#[test]
fn resize_to_10x3_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = streaming_app(dir.path());
    let mut t = terminal(80, 24);
    draw(&mut t, &app);
    let before = t.backend().buffer().clone();
    t.backend_mut().resize(10, 3);
    app.update(Msg::Resize(10, 3));
    draw(&mut t, &app);
    assert_snapshot!(t.backend().to_string());
    // smaller still, and an overlay at a tiny size: nothing panics
    for (w, h) in [(1, 1), (3, 2), (10, 1), (0, 0), (2, 40)] {
        t.backend_mut().resize(w, h);
        draw(&mut t, &app);
        app.update(Msg::Key(crossterm::event::KeyEvent::new(
            KeyCode::F(1),
            crossterm::event::KeyModifiers::NONE,
        )));
        draw(&mut t, &app);
        key(&mut app, KeyCode::Esc);
    }
    t.backend_mut().resize(80, 24);
    app.update(Msg::Resize(80, 24));
    draw(&mut t, &app);
    assert_eq!(
        t.backend().buffer(),
        &before,
        "the same screen after growing back"
    );
}

#[test]
fn help_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_in(dir.path());
    ready(&mut app);
    submit(&mut app, "/help");
    assert_snapshot!(screen(&app, 90, 46));
}

fn staged_app(dir: &std::path::Path) -> App {
    fs::write(dir.join("harbour.jpg"), b"jpg").unwrap();
    let mut app = app_in(dir);
    ready(&mut app);
    let cmds = submit(&mut app, "/image harbour.jpg");
    app.update(Msg::Probed {
        id: probes(&cmds)[0],
        result: Ok(info("harbour.jpg")),
    });
    type_text(&mut app, "Where are the boats?");
    app
}

#[test]
fn staged_attachment_with_half_block_preview() {
    let dir = tempfile::tempdir().unwrap();
    let app = staged_app(dir.path());
    let t = drawn(&app, 90, 24);
    assert_snapshot!(t.backend().to_string());
    let buf = t.backend().buffer();
    // the preview pane (right 36 columns) draws the picture with half blocks in its colours:
    // blue left half, amber right half, white top-left corner
    let cells: Vec<_> = buf.content().iter().filter(|c| c.symbol() == "▀").collect();
    assert!(cells.len() > 300, "{} half-block cells", cells.len());
    let has = |fg: Color, bg: Color| cells.iter().any(|c| c.fg == fg && c.bg == bg);
    assert!(has(Color::Rgb(40, 120, 200), Color::Rgb(40, 120, 200)));
    assert!(has(Color::Rgb(200, 160, 40), Color::Rgb(200, 160, 40)));
    assert!(has(Color::Rgb(255, 255, 255), Color::Rgb(255, 255, 255)));
}

fn grounded_app(dir: &std::path::Path) -> App {
    let mut app = staged_app(dir);
    let id = request(&key(&mut app, KeyCode::Enter)).id;
    let answer_text = "There are two: <ref>a red boat</ref><box>[[560, 120, 940, 460]]</box> \
                       and <ref>a dinghy</ref><box>[[80, 600, 300, 900]]</box>.";
    engine(
        &mut app,
        EngineEvent::Done {
            id,
            answer: answer_text.into(),
            stats: stats(Finish::Stop, 42),
        },
    );
    app
}

#[test]
fn grounding_boxes_on_the_turns_picture() {
    let dir = tempfile::tempdir().unwrap();
    let app = grounded_app(dir.path());
    let t = drawn(&app, 90, 24);
    assert_snapshot!(t.backend().to_string());
    let buf = t.backend().buffer();
    // both boxes are outlined in their colours, and the answer's tags carry the same colours
    for n in 0..2 {
        let c = grounding::color(n);
        let outlined = buf
            .content()
            .iter()
            .filter(|cell| cell.symbol() == "▀" && (cell.fg == c || cell.bg == c))
            .count();
        assert!(outlined >= 10, "box {n}: {outlined} cells");
        let tag = format!("[{}]", n + 1);
        let tagged = (0..buf.area.height).any(|y| {
            let row: String = (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect();
            row.find(&tag).is_some_and(|i| {
                let x = row[..i].chars().count() as u16;
                buf[(x, y)].fg == c
            })
        });
        assert!(tagged, "tag {tag} in the answer");
    }
}

#[test]
fn a_graphics_protocol_reserves_blank_cells_for_the_picture() {
    use super::graphics::{CellSize, Graphics, Protocol};
    let dir = tempfile::tempdir().unwrap();
    let mut app = grounded_app(dir.path());
    app.graphics = Some(Graphics {
        protocol: Protocol::Kitty,
        cell: CellSize { w: 10, h: 20 },
        tmux: false,
    });
    let t = drawn(&app, 90, 24);
    assert_snapshot!(t.backend().to_string());
    let buf = t.backend().buffer();
    assert!(!buf.content().iter().any(|c| c.symbol() == "▀"));
    // one picture for the graphics protocol, with the turn's boxes, over cells left blank
    let pics = app.pictures(buf.area);
    assert_eq!(pics.len(), 1);
    assert_eq!(pics[0].groundings.len(), 2);
    let r = pics[0].place.rect;
    assert!(r.width >= 30 && r.height >= 5, "{r:?}");
    for pos in r.positions() {
        assert_eq!(buf[pos], ratatui::buffer::Cell::EMPTY, "{pos:?}");
    }
    // the legend and caption stay text
    let text = t.backend().to_string();
    assert!(text.contains("[1] a red boat") && text.contains("harbour.jpg"));
    // the help overlay takes the picture away and half blocks show around the popup
    submit(&mut app, "/help");
    let t = drawn(&app, 200, 30);
    assert!(app.pictures(t.backend().buffer().area).is_empty());
    assert!(t
        .backend()
        .buffer()
        .content()
        .iter()
        .any(|c| c.symbol() == "▀"));
}

#[test]
fn sixel_pictures_fit_whole_bands_in_their_cells() {
    use super::graphics::{CellSize, Graphics, Protocol};
    let dir = tempfile::tempdir().unwrap();
    let mut app = grounded_app(dir.path());
    let cell = CellSize { w: 7, h: 15 };
    app.graphics = Some(Graphics {
        protocol: Protocol::Sixel,
        cell,
        tmux: false,
    });
    for (w, h) in [(90, 24), (61, 9), (200, 60)] {
        let t = drawn(&app, w, h);
        for p in app.pictures(t.backend().buffer().area) {
            let r = p.place.rect;
            assert_eq!(p.place.canvas.1 % 6, 0);
            assert!(p.place.canvas.1 <= u32::from(r.height) * 15);
            assert_eq!(p.place.canvas.0, u32::from(r.width) * 7);
            for pos in r.positions() {
                assert_eq!(t.backend().buffer()[pos].symbol(), " ");
            }
        }
    }
}

#[test]
fn video_frames_as_a_gallery() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("clip.mp4"), b"mp4").unwrap();
    let mut app = app_in(dir.path());
    ready(&mut app);
    let cmds = submit(&mut app, "/video clip.mp4 4");
    let frames = (0..4)
        .map(|i| {
            picture(
                64,
                36,
                [60 * i as u8, 40, 90],
                [20, 200 - 40 * i as u8, 120],
            )
        })
        .collect::<Vec<_>>();
    let mut video = info("clip.mp4");
    video.frames = frames;
    video.duration = Some(10.333);
    video.tiles = 4;
    video.tokens = 1024;
    app.update(Msg::Probed {
        id: probes(&cmds)[0],
        result: Ok(video),
    });
    assert!(matches!(
        app.staged[0].attachment,
        Attachment::Video { segments: 4, .. }
    ));
    assert_snapshot!(screen(&app, 90, 20));
}

#[test]
fn session_list_overlay() {
    use super::session::Summary;
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_in(dir.path());
    ready(&mut app);
    app.update(Msg::Sessions(Ok(vec![
        Summary {
            name: "harbour-boats".into(),
            saved_at: 1_700_000_000,
            turns: 3,
            problem: None,
        },
        Summary {
            name: "broken".into(),
            saved_at: 0,
            turns: 0,
            problem: Some("corrupt (line 1, column 2)".into()),
        },
    ])));
    key(&mut app, KeyCode::Down);
    assert_snapshot!(screen(&app, 70, 12));
}

#[test]
fn every_small_size_renders_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let mut grounded = grounded_app(dir.path());
    let staged = staged_app(dir.path());
    let streaming = streaming_app(dir.path());
    let mut t = terminal(1, 1);
    for w in 0..=64 {
        for h in 0..=14 {
            t.backend_mut().resize(w, h);
            for app in [&grounded, &staged, &streaming] {
                draw(&mut t, app);
            }
        }
    }
    submit(&mut grounded, "/help");
    for (w, h) in [(0, 0), (1, 1), (5, 2), (12, 3), (30, 6)] {
        t.backend_mut().resize(w, h);
        draw(&mut t, &grounded);
    }
}

/// The capture in the README.
#[test]
fn readme_screen() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = staged_app(dir.path());
    let id = request(&key(&mut app, KeyCode::Enter)).id;
    let text = "I can see **two boats**:\n\n\
                1. <ref>a red boat</ref><box>[[560, 120, 940, 460]]</box> moored by the pier\n\
                2. <ref>a dinghy</ref><box>[[80, 600, 300, 900]]</box> pulled up on the shore\n\n\
                Neither looks `occupied`.";
    engine(
        &mut app,
        EngineEvent::Done {
            id,
            answer: text.into(),
            stats: stats(Finish::Stop, 38),
        },
    );
    type_text(&mut app, "How long is the red one?");
    assert_snapshot!(screen(&app, 100, 26));
}

/// `/set truncate_history on` goes into the next request, and an answer whose prompt lost its
/// oldest turns says so.
#[test]
fn truncate_history_is_a_setting_and_left_out_turns_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = app_in(dir.path());
    ready(&mut app);
    let first = request(&submit(&mut app, "first")).clone();
    assert!(!first.truncate_history, "off unless asked");
    answer(&mut app, first.id, &["one"], Finish::Stop);
    submit(&mut app, "/set truncate_history maybe");
    assert_eq!(
        last_notice(&app),
        (
            "/set truncate_history: expected on or off, got \"maybe\"".to_string(),
            true
        )
    );
    submit(&mut app, "/set truncate_history on");
    let req = request(&submit(&mut app, "second")).clone();
    assert!(req.truncate_history);
    assert_eq!(
        req.history.len(),
        1,
        "the whole history goes; the engine cuts it"
    );
    engine(
        &mut app,
        EngineEvent::Started {
            id: req.id,
            question: "second".into(),
            prompt_tokens: 4000,
            dropped_turns: 3,
        },
    );
    engine(
        &mut app,
        EngineEvent::Done {
            id: req.id,
            answer: "two".into(),
            stats: stats(Finish::Stop, 1),
        },
    );
    let s = screen(&app, 110, 20);
    assert!(
        s.contains("3 earlier turns left out to fit the context"),
        "{s}"
    );
    submit(&mut app, "/set");
    assert!(last_notice(&app).0.ends_with("truncate_history on"));
}

/// A ready chat with thinking on, answering "How many cats?" with a think block; the
/// tokens given so far.
fn thinking_app(dir: &std::path::Path, tokens: &[&str]) -> (App, u64) {
    let mut app = app_in(dir);
    ready(&mut app);
    submit(&mut app, "/think on");
    let id = request(&submit(&mut app, "How many cats?")).id;
    engine(
        &mut app,
        EngineEvent::Started {
            id,
            question: "How many cats?".into(),
            prompt_tokens: 180,
            dropped_turns: 0,
        },
    );
    for t in tokens {
        engine(
            &mut app,
            EngineEvent::Token {
                id,
                text: (*t).into(),
            },
        );
    }
    (app, id)
}

const THINKING: [&str; 5] = [
    "<think>\nThe picture shows **two** shapes.\n",
    "One is striped, one is grey:\n",
    "- both are cats\n</think>\n\n",
    "There are **two** cats.\n\n",
    "- one *striped*\n- one grey",
];

#[test]
fn thinking_streams_expanded_and_dimmed() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = thinking_app(dir.path(), &THINKING[..2]);
    let screen = screen(&app, 70, 16);
    assert_snapshot!(screen);
    // the thinking is not rendered as Markdown: its asterisks stay
    assert!(screen.contains("**two** shapes"), "{screen}");
    // and it is dimmed
    let t = drawn(&app, 70, 16);
    let buf = t.backend().buffer();
    let row = (0..16)
        .find(|&y| {
            buf[(4, y)].symbol() == "T"
                && buf[(5, y)].symbol() == "h"
                && buf[(2, y)].symbol() == "│"
        })
        .expect("the thinking's first line");
    let dim = app.settings.theme.dim;
    assert_eq!(buf[(4, row)].fg, dim.fg.unwrap_or(Color::Reset));
    assert!(buf[(4, row)]
        .modifier
        .contains(ratatui::style::Modifier::ITALIC));
}

#[test]
fn thinking_collapses_to_one_line_once_the_answer_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut app, id) = thinking_app(dir.path(), &THINKING[..4]);
    let streaming = screen(&app, 70, 16);
    assert!(
        streaming.contains("▸ thought for 3 lines — F4 to expand"),
        "{streaming}"
    );
    engine(
        &mut app,
        EngineEvent::Token {
            id,
            text: THINKING[4].into(),
        },
    );
    engine(
        &mut app,
        EngineEvent::Done {
            id,
            answer: THINKING.concat(),
            stats: stats(Finish::Stop, 40),
        },
    );
    assert_snapshot!(screen(&app, 70, 16));
}

#[test]
fn thinking_expanded_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut app, id) = thinking_app(dir.path(), &THINKING);
    engine(
        &mut app,
        EngineEvent::Done {
            id,
            answer: THINKING.concat(),
            stats: stats(Finish::Stop, 40),
        },
    );
    // drawn once collapsed (and cached), then expanded
    let collapsed = screen(&app, 70, 20);
    key(&mut app, KeyCode::F(4));
    app.flash = None;
    let expanded = screen(&app, 70, 20);
    assert_ne!(collapsed, expanded);
    assert_snapshot!(expanded);
}
