//! What the chat holds: the transcript, the prompt editor, staged attachments, the model's
//! state, the mode (chat, help, session list) and the view's scroll position.
use super::config::Settings;
use super::editor::Editor;
use super::input::PathContext;
use super::session::{SavedExchange, Session, Summary, VERSION};
use super::AttachmentInfo;
use crate::engine::protocol::{Attachment, DoneStats, Finish, ModelInfo, RequestId, Turn};
use ratatui::text::Line;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

pub struct App {
    pub(super) settings: Settings,
    pub(super) paths: PathContext,
    pub(super) sessions_dir: PathBuf,
    pub(super) session: SessionRef,
    /// New sessions (after /clear) get ids made from this one.
    pub(super) id_base: String,
    pub(super) model: ModelState,
    pub(super) info: Option<ModelInfo>,
    pub(super) entries: Vec<Entry>,
    pub(super) editor: Editor,
    pub(super) staged: Vec<Staged>,
    /// A message waiting for its attachments to be read.
    pub(super) pending: Option<String>,
    /// The exchange whose question is being edited (Up on an empty prompt).
    pub(super) editing: Option<EntryId>,
    pub(super) gen: Option<Generation>,
    pub(super) mode: Mode,
    /// First transcript line shown; `None` follows the end.
    pub(super) scroll: Option<usize>,
    pub(super) show_preview: bool,
    /// Finished thinking blocks shown whole instead of as one line.
    pub(super) thinking_expanded: bool,
    /// Pictures through a terminal graphics protocol; `None`: half blocks.
    pub(super) graphics: Option<super::graphics::Graphics>,
    pub(super) flash: Option<Flash>,
    /// Ctrl+C was pressed once while idle.
    pub(super) quit_armed: bool,
    pub(super) ticks: u64,
    pub(super) now: Option<Instant>,
    /// Seconds since the Unix epoch at the last tick.
    pub(super) unix: u64,
    pub(super) last_stats: Option<DoneStats>,
    pub(super) probes: HashMap<u64, ProbeTarget>,
    pub(super) next_id: u64,
    pub(super) view: ViewCache,
}

/// Names the session file and tells this chat's file from another's.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRef {
    pub name: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading {
        progress: f32,
        what: String,
    },
    Ready,
    Failed(String),
    /// The worker thread is gone.
    Gone,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Chat,
    Help { scroll: u16 },
    Sessions { list: Vec<Summary>, selected: usize },
}

pub type EntryId = u64;

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: EntryId,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryKind {
    /// Boxed: an exchange is ten times the size of a notice.
    Exchange(Box<Exchange>),
    Notice {
        text: String,
        error: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// The question as typed.
    pub typed: String,
    /// The question as the engine sent it (with placeholders), once it started.
    pub question: Option<String>,
    pub attachments: Vec<Attachment>,
    /// What the probe said of each attachment (for previews); `None` while unknown.
    pub infos: Vec<Option<AttachmentInfo>>,
    pub answer: String,
    pub status: Status,
    pub prompt_tokens: Option<usize>,
    pub stats: Option<DoneStats>,
    /// Pieces of text streamed so far.
    pub pieces: usize,
    /// Added to the seed: each /retry draws a new sample.
    pub seed_offset: u64,
    /// Oldest turns the engine left out of this prompt to fit the context window.
    pub dropped_turns: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Sent; the engine has not started it.
    Waiting,
    Streaming,
    Done(Finish),
    Failed(String),
}

impl Exchange {
    /// The turn the model saw, once finished with something to show for it.
    pub fn turn(&self) -> Option<Turn> {
        match self.status {
            Status::Done(Finish::Cancelled) if self.answer.is_empty() => None,
            Status::Done(_) => Some(Turn {
                question: self.question.clone().unwrap_or_else(|| self.typed.clone()),
                attachments: self.attachments.clone(),
                answer: self.answer.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Staged {
    pub probe: u64,
    pub attachment: Attachment,
    /// `None` while the file is being read.
    pub info: Option<AttachmentInfo>,
    /// When reading it started (the first tick after, where no tick had come yet).
    pub since: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeTarget {
    Staged,
    /// An attachment of an earlier exchange (after loading a session).
    Entry {
        entry: EntryId,
        index: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub id: RequestId,
    pub entry: EntryId,
    pub first_token: Option<Instant>,
    pub cancelling: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Flash {
    pub text: String,
    pub error: bool,
    /// Ticks left on screen.
    pub ticks: u32,
}

/// Rendered lines of finished entries, by entry, with the width they were wrapped to.
pub type LineCache = HashMap<EntryId, (u16, Rc<Vec<Line<'static>>>)>;

/// What the last render measured (scrolling needs it) and rendered lines of finished entries.
#[derive(Default)]
pub struct ViewCache {
    pub metrics: Cell<Metrics>,
    pub lines: RefCell<LineCache>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    /// Transcript lines and the rows showing them.
    pub lines: usize,
    pub height: usize,
    /// Columns of prompt text (for Up/Down across wrapped rows).
    pub input_width: u16,
}

impl App {
    pub fn new(
        settings: Settings,
        paths: PathContext,
        sessions_dir: PathBuf,
        session: SessionRef,
    ) -> Self {
        let mut app = Self {
            settings,
            paths,
            sessions_dir,
            id_base: session.id.clone(),
            session,
            model: ModelState::Loading {
                progress: 0.0,
                what: String::new(),
            },
            info: None,
            entries: Vec::new(),
            editor: Editor::default(),
            staged: Vec::new(),
            pending: None,
            editing: None,
            gen: None,
            mode: Mode::Chat,
            scroll: None,
            show_preview: true,
            thinking_expanded: false,
            graphics: None,
            flash: None,
            quit_armed: false,
            ticks: 0,
            now: None,
            unix: 0,
            last_stats: None,
            probes: HashMap::new(),
            next_id: 1,
            view: ViewCache::default(),
        };
        app.notice(
            "Ask anything; attach pictures with /image PATH (or paste, drop or type a path), \
             videos with /video PATH. F1 or /help lists keys and commands.",
            false,
        );
        app
    }

    pub(super) fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn push_entry(&mut self, kind: EntryKind) -> EntryId {
        let id = self.fresh_id();
        self.entries.push(Entry { id, kind });
        id
    }

    pub(super) fn notice(&mut self, text: impl Into<String>, error: bool) {
        let text = text.into();
        if error {
            tracing::warn!("{text}");
        }
        self.push_entry(EntryKind::Notice { text, error });
    }

    pub(super) fn set_flash(&mut self, text: impl Into<String>, error: bool) {
        self.flash = Some(Flash {
            text: text.into(),
            error,
            ticks: 40,
        });
    }

    pub(super) fn exchange_mut(&mut self, id: EntryId) -> Option<&mut Exchange> {
        self.entries
            .iter_mut()
            .find(|e| e.id == id)
            .and_then(|e| match &mut e.kind {
                EntryKind::Exchange(x) => Some(&mut **x),
                EntryKind::Notice { .. } => None,
            })
    }

    pub(super) fn exchanges(&self) -> impl DoubleEndedIterator<Item = (EntryId, &Exchange)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::Exchange(x) => Some((e.id, &**x)),
            EntryKind::Notice { .. } => None,
        })
    }

    /// The turns before entry `until` (all when `None`), as the model's history.
    pub(super) fn history(&self, until: Option<EntryId>) -> Vec<Turn> {
        self.exchanges()
            .take_while(|(id, _)| Some(*id) != until)
            .filter_map(|(_, x)| x.turn())
            .collect()
    }

    pub(super) fn to_session(&self) -> Session {
        Session {
            version: VERSION,
            id: self.session.id.clone(),
            saved_at: self.unix,
            system: self.settings.system.clone(),
            think: self.settings.think,
            params: self.settings.params.clone(),
            max_tiles: self.settings.max_tiles,
            combine_images: self.settings.combine_images,
            exchanges: self
                .exchanges()
                .filter_map(|(_, x)| {
                    let turn = x.turn()?;
                    let Status::Done(finish) = x.status else {
                        return None;
                    };
                    Some(SavedExchange {
                        typed: x.typed.clone(),
                        turn,
                        finish,
                    })
                })
                .collect(),
        }
    }

    pub(super) fn busy(&self) -> bool {
        self.gen.is_some()
    }

    /// Something on screen moves by itself (spinner, fading message).
    pub fn animating(&self) -> bool {
        self.gen.is_some()
            || self.pending.is_some()
            || self.flash.is_some()
            || matches!(self.model, ModelState::Loading { .. })
    }
}
