//! `App::update`: every change of state, one message at a time. No effects: sending to the
//! engine, reading attachments, writing sessions and quitting come back as [`Command`]s for the
//! run loop. (It does look at the file system: whether a typed path exists, what Tab can
//! complete.)
use super::input::{self, MediaKind, SlashCommand};
use super::keys::Action;
use super::session::{Session, Summary};
use super::state::{
    App, EntryId, EntryKind, Exchange, Generation, Mode, ModelState, ProbeTarget, Staged, Status,
};
use super::AttachmentInfo;
use crate::engine::protocol::{Attachment, EngineEvent, Finish, GenerateRequest};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseEvent, MouseEventKind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a staged attachment may take to be read before it is dropped (a file on a hung
/// network mount, say): the message waiting for it goes out without it.
pub const READ_DEADLINE: Duration = Duration::from_secs(20);

/// Everything that can happen: input, engine events, results of commands, time.
#[derive(Debug, Clone)]
pub enum Msg {
    Key(KeyEvent),
    Mouse(MouseEvent),
    Paste(String),
    Resize(u16, u16),
    Engine(EngineEvent),
    /// The engine's channel closed: the worker thread ended.
    EngineGone,
    Probed {
        id: u64,
        result: Result<AttachmentInfo, String>,
    },
    Saved {
        name: String,
        result: Result<(), String>,
    },
    Loaded {
        name: String,
        result: Result<Session, String>,
    },
    Sessions(Result<Vec<Summary>, String>),
    Tick {
        now: Instant,
        unix: u64,
    },
    /// SIGTERM, SIGINT or SIGHUP.
    Signal,
    /// SIGTSTP from outside (`kill -TSTP`): stop as Ctrl+Z does.
    Suspend,
    /// SIGCONT: the process was stopped and continued; the terminal must be taken again.
    Continued,
}

/// Work with effects, done by the run loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Generate(GenerateRequest),
    /// `EngineCmd::Reset`.
    Reset,
    /// Stop the running request (its own cancel switch).
    Cancel,
    /// Run the probe on `attachment`; answer with `Msg::Probed { id, .. }`.
    Probe {
        id: u64,
        attachment: Attachment,
    },
    Save {
        name: String,
        path: PathBuf,
        session: Session,
        force: bool,
    },
    Load {
        name: String,
        path: PathBuf,
    },
    ListSessions(PathBuf),
    /// Give the terminal back and stop the process until it is continued (Ctrl+Z).
    Suspend,
    /// Take the terminal again and redraw it all (after SIGCONT).
    Resume,
    Quit,
}

const WHEEL_LINES: isize = 3;

impl App {
    pub fn update(&mut self, msg: Msg) -> Vec<Command> {
        match msg {
            Msg::Key(k) => self.key(k),
            Msg::Mouse(m) => {
                match m.kind {
                    MouseEventKind::ScrollUp => self.scroll_by(-WHEEL_LINES),
                    MouseEventKind::ScrollDown => self.scroll_by(WHEEL_LINES),
                    _ => {}
                }
                vec![]
            }
            Msg::Paste(text) => self.paste(&text),
            Msg::Resize(..) => vec![],
            Msg::Engine(ev) => self.engine(ev),
            Msg::EngineGone => {
                self.model = ModelState::Gone;
                self.fail_generation("the model worker has stopped");
                self.notice(
                    "The model worker has stopped; saved chats can still be read.",
                    true,
                );
                vec![]
            }
            Msg::Probed { id, result } => self.probed(id, result),
            Msg::Saved { name, result } => {
                match result {
                    Ok(()) => {
                        self.set_flash(format!("saved {name}"), false);
                        self.session.name = name;
                    }
                    Err(e) => self.notice(format!("The chat was not saved: {e}"), true),
                }
                vec![]
            }
            Msg::Loaded { name, result } => self.loaded(name, result),
            Msg::Sessions(Ok(list)) => {
                if list.is_empty() {
                    self.set_flash("no saved chats yet", false);
                } else {
                    self.mode = Mode::Sessions { list, selected: 0 };
                }
                vec![]
            }
            Msg::Sessions(Err(e)) => {
                self.notice(e, true);
                vec![]
            }
            Msg::Tick { now, unix } => {
                self.ticks += 1;
                self.now = Some(now);
                self.unix = unix;
                if let Some(f) = &mut self.flash {
                    f.ticks = f.ticks.saturating_sub(1);
                    if f.ticks == 0 {
                        self.flash = None;
                    }
                }
                self.drop_slow_reads(now)
            }
            Msg::Signal => {
                let mut cmds: Vec<Command> = self.cancel();
                cmds.extend(self.autosave());
                cmds.push(Command::Quit);
                cmds
            }
            Msg::Suspend => vec![Command::Suspend],
            Msg::Continued => vec![Command::Resume],
        }
    }

    fn key(&mut self, k: KeyEvent) -> Vec<Command> {
        let action = self.settings.keys.action(&k);
        // the terminal's suspend key, which raw mode delivers as a key
        if action.is_none()
            && k.code == KeyCode::Char('z')
            && k.modifiers.contains(KeyModifiers::CONTROL)
        {
            return vec![Command::Suspend];
        }
        if action != Some(Action::Interrupt) {
            self.quit_armed = false;
        }
        match &mut self.mode {
            Mode::Chat => {}
            Mode::Help { scroll } => {
                match (action, k.code) {
                    (Some(Action::Cancel | Action::Help | Action::Interrupt), _)
                    | (_, KeyCode::Char('q')) => self.mode = Mode::Chat,
                    (_, KeyCode::Up) => *scroll = scroll.saturating_sub(1),
                    (_, KeyCode::Down) => *scroll = scroll.saturating_add(1),
                    (_, KeyCode::PageUp) => *scroll = scroll.saturating_sub(10),
                    (_, KeyCode::PageDown) => *scroll = scroll.saturating_add(10),
                    _ => {}
                }
                return vec![];
            }
            Mode::Sessions { list, selected } => {
                match (action, k.code) {
                    (Some(Action::Cancel | Action::Sessions | Action::Interrupt), _) => {
                        self.mode = Mode::Chat;
                    }
                    (_, KeyCode::Up) => *selected = selected.saturating_sub(1),
                    (_, KeyCode::Down) => {
                        *selected = (*selected + 1).min(list.len().saturating_sub(1))
                    }
                    (Some(Action::Send), _) => {
                        let name = list.get(*selected).map(|s| s.name.clone());
                        self.mode = Mode::Chat;
                        if let Some(name) = name {
                            return self.command(SlashCommand::Load(name));
                        }
                    }
                    _ => {}
                }
                return vec![];
            }
        }
        match action {
            Some(a) => self.action(a),
            None => self.edit(k),
        }
    }

    fn action(&mut self, action: Action) -> Vec<Command> {
        let page = self.view.metrics.get().height.max(2) as isize - 1;
        match action {
            Action::Send => return self.submit(),
            Action::Newline => self.editor.insert_char('\n'),
            Action::Cancel => {
                if self.busy() {
                    return self.cancel();
                }
                if self.pending.is_some() {
                    self.drop_reads("was cancelled", |_| true);
                    self.abandon_pending("sending stopped");
                } else if self.staged.iter().any(|s| s.info.is_none()) {
                    self.drop_reads("was cancelled", |_| true);
                } else if self.editing.take().is_some() {
                    self.editor.take();
                    self.staged.clear();
                    self.set_flash("left the last question as it was", false);
                }
            }
            Action::Interrupt => {
                if self.busy() {
                    return self.cancel();
                }
                if self.quit_armed {
                    return vec![Command::Quit];
                }
                self.quit_armed = true;
                let key = self.settings.keys.hint(Action::Interrupt);
                self.set_flash(format!("press {key} again to quit"), false);
            }
            Action::Help => self.mode = Mode::Help { scroll: 0 },
            Action::Complete => self.complete(),
            Action::ScrollUp => self.scroll_by(-1),
            Action::ScrollDown => self.scroll_by(1),
            Action::PageUp => self.scroll_by(-page),
            Action::PageDown => self.scroll_by(page),
            Action::Top => self.scroll = Some(0),
            Action::Bottom => self.scroll = None,
            Action::TogglePreview => self.show_preview = !self.show_preview,
            Action::ToggleThinking => self.toggle_thinking(),
            Action::Sessions => return self.command(SlashCommand::Sessions),
        }
        vec![]
    }

    /// Editing keys (fixed bindings).
    fn edit(&mut self, k: KeyEvent) -> Vec<Command> {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let alt = k.modifiers.contains(KeyModifiers::ALT);
        let width = self.view.metrics.get().input_width;
        let e = &mut self.editor;
        match k.code {
            KeyCode::Char('a') if ctrl => e.line_start(),
            KeyCode::Char('e') if ctrl => e.line_end(),
            KeyCode::Char('k') if ctrl => e.kill_to_line_end(),
            KeyCode::Char('u') if ctrl => e.kill_to_line_start(),
            KeyCode::Char('w') if ctrl => e.kill_word_back(),
            KeyCode::Char('h') if ctrl => e.backspace(),
            KeyCode::Char('b') if alt => e.word_left(),
            KeyCode::Char('f') if alt => e.word_right(),
            KeyCode::Char(c) if !ctrl && !alt => e.insert_char(c),
            KeyCode::Backspace if ctrl || alt => e.kill_word_back(),
            KeyCode::Backspace => e.backspace(),
            KeyCode::Delete => e.delete(),
            KeyCode::Left if ctrl || alt => e.word_left(),
            KeyCode::Left => e.left(),
            KeyCode::Right if ctrl || alt => e.word_right(),
            KeyCode::Right => e.right(),
            KeyCode::Home => e.line_start(),
            KeyCode::End => e.line_end(),
            KeyCode::Up if e.is_empty() && self.staged.is_empty() => return self.edit_last(),
            KeyCode::Up => {
                e.up(width);
            }
            KeyCode::Down => {
                e.down(width);
            }
            _ => {}
        }
        vec![]
    }

    fn submit(&mut self) -> Vec<Command> {
        let text = self.editor.text().to_string();
        match input::parse_command(&text) {
            Some(Ok(cmd)) => {
                self.editor.take();
                self.command(cmd)
            }
            Some(Err(e)) => {
                self.set_flash(e, true);
                vec![]
            }
            None => self.send_message(&text),
        }
    }

    /// Why a message cannot go now, if it cannot.
    pub(super) fn cannot_send(&self) -> Option<String> {
        if self.busy() {
            let key = self.settings.keys.hint(Action::Cancel);
            return Some(format!("still answering; {key} stops it"));
        }
        if self.pending.is_some() {
            return Some("still reading the attachments".into());
        }
        match &self.model {
            ModelState::Failed(e) => Some(format!("the model is not loaded: {e}")),
            ModelState::Gone => Some("the model worker has stopped".into()),
            ModelState::Loading { .. } | ModelState::Ready => None,
        }
    }

    /// A typed message: paths to media files in it are staged and taken out of the text.
    fn send_message(&mut self, text: &str) -> Vec<Command> {
        if let Some(why) = self.cannot_send() {
            self.set_flash(why, true);
            return vec![];
        }
        let found = match input::media_paths(text, &self.paths) {
            Ok(found) => found,
            Err(e) => {
                self.notice(format!("Cannot attach {e}; nothing was sent."), true);
                return vec![];
            }
        };
        if let Some(m) = found.iter().find(|m| m.explicit && !m.exists) {
            let msg = format!(
                "Cannot attach {}: no such file; nothing was sent.",
                m.path.display()
            );
            self.notice(msg, true);
            return vec![];
        }
        let mut cmds = Vec::new();
        let mut question = String::new();
        let mut last = 0;
        for m in found.iter().filter(|m| m.exists) {
            question.push_str(&text[last..m.range.start]);
            last = m.range.end;
            if question.ends_with(' ') && text[last..].starts_with([' ', '\n']) {
                question.pop();
            }
            let attachment = self.attachment_for(m.kind, m.path.clone(), None, None, None);
            cmds.extend(self.stage(attachment));
        }
        question.push_str(&text[last..]);
        let question = question.trim().to_string();
        if question.is_empty() && self.staged.is_empty() {
            return cmds;
        }
        self.editor.take();
        if self.staged.iter().any(|s| s.info.is_none()) {
            self.pending = Some(question);
        } else {
            cmds.extend(self.dispatch(question));
        }
        cmds
    }

    /// Sends `question` with the staged attachments.
    fn dispatch(&mut self, question: String) -> Vec<Command> {
        let (attachments, infos) = std::mem::take(&mut self.staged)
            .into_iter()
            .map(|s| (s.attachment, s.info))
            .unzip();
        let replace = self.editing.take();
        self.start_exchange(question, attachments, infos, replace, 0)
    }

    pub(super) fn start_exchange(
        &mut self,
        typed: String,
        attachments: Vec<Attachment>,
        infos: Vec<Option<AttachmentInfo>>,
        replace: Option<EntryId>,
        seed_offset: u64,
    ) -> Vec<Command> {
        let history = self.history(replace);
        if let Some(old) = replace {
            self.entries.retain(|e| e.id != old);
        }
        let id = self.fresh_id();
        let mut params = self.settings.params.clone();
        params.seed = params.seed.wrapping_add(seed_offset);
        let request = GenerateRequest {
            id,
            system: self.settings.system_message(),
            history,
            question: typed.clone(),
            attachments: attachments.clone(),
            combine_images: self.settings.combine_images,
            params,
            stop: Vec::new(),
            truncate_history: self.settings.truncate_history,
        };
        let entry = self.push_entry(EntryKind::Exchange(Box::new(Exchange {
            typed,
            question: None,
            attachments,
            infos,
            answer: String::new(),
            status: Status::Waiting,
            prompt_tokens: None,
            stats: None,
            pieces: 0,
            seed_offset,
            dropped_turns: 0,
        })));
        self.gen = Some(Generation {
            id,
            entry,
            first_token: None,
            cancelling: false,
        });
        self.scroll = None;
        vec![Command::Generate(request)]
    }

    pub(super) fn cancel(&mut self) -> Vec<Command> {
        match &mut self.gen {
            Some(g) if !g.cancelling => {
                g.cancelling = true;
                self.set_flash("stopping…", false);
                vec![Command::Cancel]
            }
            _ => vec![],
        }
    }

    /// Staged attachments still being read that `which` picks are dropped, each with a notice
    /// saying `why`; a late answer of their reads is ignored.
    fn drop_reads(&mut self, why: &str, which: impl Fn(&Staged) -> bool) {
        let mut dropped = Vec::new();
        self.staged.retain(|s| {
            let drop = s.info.is_none() && which(s);
            if drop {
                dropped.push((s.probe, s.attachment.path().display().to_string()));
            }
            !drop
        });
        for (probe, path) in dropped {
            self.probes.remove(&probe);
            self.notice(format!("Reading {path} {why}; it was not attached."), true);
        }
    }

    /// Staged attachments read for longer than [`READ_DEADLINE`] are dropped; a message that
    /// waited for them goes out without them.
    fn drop_slow_reads(&mut self, now: Instant) -> Vec<Command> {
        for s in self.staged.iter_mut().filter(|s| s.info.is_none()) {
            s.since.get_or_insert(now);
        }
        let slow = |s: &Staged| {
            s.since
                .is_some_and(|t| now.duration_since(t) >= READ_DEADLINE)
        };
        if !self.staged.iter().any(|s| s.info.is_none() && slow(s)) {
            return vec![];
        }
        self.drop_reads(
            &format!("took more than {} s", READ_DEADLINE.as_secs()),
            slow,
        );
        if self.pending.is_some() && self.staged.iter().all(|s| s.info.is_some()) {
            let question = self.pending.take().unwrap_or_default();
            return self.dispatch(question);
        }
        vec![]
    }

    /// The pending message goes back to the prompt; nothing is sent.
    fn abandon_pending(&mut self, why: &str) {
        if let Some(text) = self.pending.take() {
            let typed_since = self.editor.take();
            let joined = [text, typed_since]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            self.editor.set(&joined);
            self.set_flash(format!("{why}; nothing was sent"), true);
        }
    }

    fn fail_generation(&mut self, why: &str) {
        if let Some(g) = self.gen.take() {
            if let Some(x) = self.exchange_mut(g.entry) {
                x.status = Status::Failed(why.to_string());
            }
        }
        self.abandon_pending(why);
    }

    pub(super) fn attachment_for(
        &self,
        kind: MediaKind,
        path: PathBuf,
        max_tiles: Option<usize>,
        segments: Option<usize>,
        bound: Option<crate::media::TimeRange>,
    ) -> Attachment {
        match kind {
            MediaKind::Image => Attachment::Image {
                path,
                max_tiles: max_tiles.or(self.settings.max_tiles),
            },
            MediaKind::Video => Attachment::Video {
                path,
                segments: segments.unwrap_or(self.settings.video_segments),
                bound,
                max_tiles: self.settings.video_max_tiles,
            },
        }
    }

    /// Adds an attachment to the next message and asks for it to be read.
    pub(super) fn stage(&mut self, attachment: Attachment) -> Vec<Command> {
        let id = self.fresh_id();
        self.probes.insert(id, ProbeTarget::Staged);
        self.staged.push(Staged {
            probe: id,
            attachment: attachment.clone(),
            info: None,
            since: self.now,
        });
        vec![Command::Probe { id, attachment }]
    }

    fn probed(&mut self, id: u64, result: Result<AttachmentInfo, String>) -> Vec<Command> {
        match self.probes.remove(&id) {
            Some(ProbeTarget::Staged) => {
                let Some(pos) = self.staged.iter().position(|s| s.probe == id) else {
                    return vec![];
                };
                match result {
                    Ok(info) => self.staged[pos].info = Some(info),
                    Err(reason) => {
                        let s = self.staged.remove(pos);
                        let path = s.attachment.path().display().to_string();
                        self.notice(format!("Cannot attach {path}: {reason}."), true);
                        self.abandon_pending("an attachment could not be read");
                        return vec![];
                    }
                }
                if self.pending.is_some() && self.staged.iter().all(|s| s.info.is_some()) {
                    let question = self.pending.take().unwrap_or_default();
                    return self.dispatch(question);
                }
            }
            Some(ProbeTarget::Entry { entry, index }) => {
                if let (Some(x), Ok(info)) = (self.exchange_mut(entry), result) {
                    if let Some(slot) = x.infos.get_mut(index) {
                        *slot = Some(info);
                    }
                }
            }
            None => {}
        }
        vec![]
    }

    fn paste(&mut self, text: &str) -> Vec<Command> {
        if self.mode != Mode::Chat {
            return vec![];
        }
        let words = input::split_words(text);
        let found = match input::media_paths(text, &self.paths) {
            Ok(found) => found,
            Err(e) => {
                self.notice(format!("Cannot attach {e}."), true);
                return vec![];
            }
        };
        if !found.is_empty() && found.len() == words.len() {
            if found.iter().all(|m| m.exists) {
                return found
                    .into_iter()
                    .flat_map(|m| {
                        let a = self.attachment_for(m.kind, m.path, None, None, None);
                        self.stage(a)
                    })
                    .collect();
            }
            if let [m] = found.as_slice() {
                if m.explicit {
                    let msg = format!("Cannot attach {}: no such file.", m.path.display());
                    self.notice(msg, true);
                    return vec![];
                }
            }
        }
        self.editor.insert_str(text);
        vec![]
    }

    fn complete(&mut self) {
        let Some(c) = input::complete(self.editor.text(), self.editor.cursor(), &self.paths) else {
            return;
        };
        if self.editor.text()[c.range.clone()] != c.replacement {
            self.editor.replace_range(c.range, &c.replacement);
        }
        if !c.candidates.is_empty() {
            let mut shown: Vec<&str> = c.candidates.iter().take(8).map(String::as_str).collect();
            if c.candidates.len() > shown.len() {
                shown.push("…");
            }
            self.set_flash(shown.join("  "), false);
        }
    }

    fn edit_last(&mut self) -> Vec<Command> {
        if self.busy() || self.pending.is_some() {
            return vec![];
        }
        let Some((id, x)) = self.exchanges().next_back() else {
            return vec![];
        };
        let (typed, attachments, infos) = (x.typed.clone(), x.attachments.clone(), x.infos.clone());
        self.editing = Some(id);
        self.editor.set(&typed);
        let mut cmds = Vec::new();
        for (attachment, info) in attachments.into_iter().zip(infos) {
            match info {
                Some(info) => {
                    let probe = self.fresh_id();
                    self.staged.push(Staged {
                        probe,
                        attachment,
                        info: Some(info),
                        since: None,
                    });
                }
                None => cmds.extend(self.stage(attachment)),
            }
        }
        let key = self.settings.keys.hint(Action::Cancel);
        self.set_flash(
            format!("editing the last question: Enter sends it again, {key} leaves it"),
            false,
        );
        cmds
    }

    fn engine(&mut self, ev: EngineEvent) -> Vec<Command> {
        let current = |id| self.gen.as_ref().is_some_and(|g| g.id == id);
        match ev {
            EngineEvent::Loading { progress, what } => {
                if matches!(self.model, ModelState::Loading { .. }) {
                    self.model = ModelState::Loading { progress, what };
                }
            }
            EngineEvent::Ready(info) => {
                self.model = ModelState::Ready;
                // headers name the model
                self.view.lines.borrow_mut().clear();
                self.set_flash(format!("{} is ready", info.name), false);
                self.info = Some(info);
            }
            EngineEvent::LoadFailed(e) => {
                self.model = ModelState::Failed(e.clone());
                self.fail_generation("the model could not be loaded");
                self.notice(format!("The model could not be loaded: {e}"), true);
            }
            EngineEvent::Started {
                id,
                question,
                prompt_tokens,
                dropped_turns,
            } if current(id) => {
                if let Some(x) = self.generating() {
                    x.question = Some(question);
                    x.prompt_tokens = Some(prompt_tokens);
                    x.dropped_turns = dropped_turns;
                    x.status = Status::Streaming;
                }
            }
            EngineEvent::Token { id, text } if current(id) => {
                let now = self.now;
                if let Some(g) = &mut self.gen {
                    g.first_token = g.first_token.or(now);
                }
                if let Some(x) = self.generating() {
                    x.answer.push_str(&text);
                    x.pieces += 1;
                    x.status = Status::Streaming;
                }
            }
            EngineEvent::Done { id, answer, stats } if current(id) => {
                if let Some(x) = self.generating() {
                    x.answer = answer;
                    x.status = Status::Done(stats.finish);
                    x.prompt_tokens = Some(stats.prompt_tokens);
                    x.stats = Some(stats.clone());
                }
                if stats.finish == Finish::Cancelled {
                    self.flash = None;
                }
                self.last_stats = Some(stats);
                self.gen = None;
                return self.autosave().into_iter().collect();
            }
            EngineEvent::Error { id, message, .. } if current(id) => {
                self.fail_generation(&message);
            }
            // events of a request this chat no longer waits for
            EngineEvent::Started { .. }
            | EngineEvent::Token { .. }
            | EngineEvent::Done { .. }
            | EngineEvent::Error { .. } => {}
        }
        vec![]
    }

    fn generating(&mut self) -> Option<&mut Exchange> {
        let entry = self.gen.as_ref()?.entry;
        self.exchange_mut(entry)
    }

    /// Expands or collapses finished think blocks (one that is being written stays open).
    fn toggle_thinking(&mut self) {
        self.thinking_expanded = !self.thinking_expanded;
        // finished entries are drawn from the cache
        self.view.lines.borrow_mut().clear();
        self.set_flash(
            if self.thinking_expanded {
                "thinking expanded"
            } else {
                "thinking collapsed"
            },
            false,
        );
    }

    fn scroll_by(&mut self, delta: isize) {
        let m = self.view.metrics.get();
        let max_top = m.lines.saturating_sub(m.height);
        let top = self.scroll.unwrap_or(max_top).min(max_top);
        let new = top.saturating_add_signed(delta).min(max_top);
        self.scroll = (new < max_top).then_some(new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testkit::*;
    use crate::engine::protocol::{Fault, Turn};
    use crossterm::event::KeyCode;
    use std::fs;
    #[test]
    fn send_with_attachments_waits_for_the_probe_then_sends_them() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cat.png"), b"png").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let cmds = submit(&mut app, "/image cat.png 4");
        let path = dir.path().join("cat.png");
        assert_eq!(
            cmds,
            vec![Command::Probe {
                id: app.staged[0].probe,
                attachment: Attachment::Image {
                    path: path.clone(),
                    max_tiles: Some(4)
                }
            }]
        );
        assert!(app.editor.is_empty());
        // sending before the probe answers waits for it
        assert!(submit(&mut app, "what is this?").is_empty());
        assert_eq!(app.pending.as_deref(), Some("what is this?"));
        let cmds = app.update(Msg::Probed {
            id: probes(&cmds)[0],
            result: Ok(info("cat.png")),
        });
        let req = request(&cmds);
        assert_eq!(req.question, "what is this?");
        assert_eq!(
            req.attachments,
            vec![Attachment::Image {
                path,
                max_tiles: Some(4)
            }]
        );
        assert!(req.history.is_empty());
        assert_eq!(req.params, app.settings.params);
        assert!(app.staged.is_empty() && app.pending.is_none());
        assert_eq!(last(&app).status, Status::Waiting);
        assert_eq!(last(&app).infos, vec![Some(info("cat.png"))]);
    }

    #[test]
    fn a_read_that_never_ends_is_dropped_at_its_deadline_and_the_message_goes_out() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("slow.png"), b"png").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let t0 = Instant::now();
        let tick = |app: &mut App, after: Duration| {
            app.update(Msg::Tick {
                now: t0 + after,
                unix: 0,
            })
        };
        tick(&mut app, Duration::ZERO);
        let probe = probes(&submit(&mut app, "/image slow.png"))[0];
        assert!(submit(&mut app, "what is this?").is_empty());
        assert_eq!(app.pending.as_deref(), Some("what is this?"));
        assert!(tick(&mut app, READ_DEADLINE - Duration::from_millis(1)).is_empty());
        assert_eq!(
            app.staged.len(),
            1,
            "still waiting just before the deadline"
        );
        let cmds = tick(&mut app, READ_DEADLINE);
        let req = request(&cmds);
        assert_eq!(req.question, "what is this?");
        assert!(req.attachments.is_empty());
        assert!(app.staged.is_empty() && app.pending.is_none());
        let path = dir.path().join("slow.png").display().to_string();
        assert!(app.entries.iter().any(|e| matches!(&e.kind,
            EntryKind::Notice { text, error: true }
                if *text == format!("Reading {path} took more than 20 s; it was not attached."))));
        // the read answering after all changes nothing
        assert!(app
            .update(Msg::Probed {
                id: probe,
                result: Ok(info("slow.png")),
            })
            .is_empty());
        assert!(app.staged.is_empty());
        assert_eq!(last(&app).attachments, vec![]);
    }

    #[test]
    fn esc_cancels_a_read_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("slow.png"), b"png").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let path = dir.path().join("slow.png").display().to_string();
        let cancelled = format!("Reading {path} was cancelled; it was not attached.");
        // staged, not sent yet
        submit(&mut app, "/image slow.png");
        assert!(key(&mut app, KeyCode::Esc).is_empty());
        assert!(app.staged.is_empty());
        assert_eq!(last_notice(&app), (cancelled.clone(), true));
        // a message waiting for the read goes back to the prompt
        submit(&mut app, "/image slow.png");
        assert!(submit(&mut app, "what is this?").is_empty());
        assert!(key(&mut app, KeyCode::Esc).is_empty());
        assert!(app.staged.is_empty() && app.pending.is_none());
        assert_eq!(app.editor.text(), "what is this?");
        assert_eq!(exchange_count(&app), 0);
    }

    #[test]
    fn paths_typed_in_the_prompt_are_staged_and_taken_out() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("my pics")).unwrap();
        fs::write(dir.path().join("my pics/a.jpg"), b"x").unwrap();
        fs::write(dir.path().join("b.mp4"), b"x").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let cmds = submit(&mut app, r"compare ~/my\ pics/a.jpg with ./b.mp4 please");
        let ids = probes(&cmds);
        assert_eq!(ids.len(), 2);
        assert_eq!(app.pending.as_deref(), Some("compare with please"));
        app.update(Msg::Probed {
            id: ids[1],
            result: Ok(info("b.mp4")),
        });
        let cmds = app.update(Msg::Probed {
            id: ids[0],
            result: Ok(info("a.jpg")),
        });
        let req = request(&cmds);
        assert_eq!(req.question, "compare with please");
        assert_eq!(
            req.attachments[1],
            Attachment::Video {
                path: dir.path().join("b.mp4"),
                segments: 8,
                bound: None,
                max_tiles: 1
            }
        );
    }

    #[test]
    fn a_missing_or_unreadable_file_is_refused_and_nothing_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        // /image of a missing file: refused at once, nothing staged
        assert!(submit(&mut app, "/image gone.png").is_empty());
        let missing = dir.path().join("gone.png");
        assert_eq!(
            last_notice(&app),
            (
                format!("Cannot attach {}: no such file.", missing.display()),
                true
            )
        );
        assert!(app.staged.is_empty());
        // a path typed in the prompt: nothing sent, the text stays to be fixed
        assert!(submit(&mut app, "look at ./gone.png").is_empty());
        assert!(last_notice(&app)
            .0
            .ends_with("no such file; nothing was sent."));
        assert_eq!(app.editor.text(), "look at ./gone.png");
        app.editor.take();
        // a file:// URL with a malformed escape: one line naming it, nothing sent
        assert!(submit(&mut app, "look at file:///tmp/a%+f.png").is_empty());
        assert_eq!(
            last_notice(&app),
            (
                "Cannot attach file:///tmp/a%+f.png: bad percent-encoding: malformed escape \
                 \"%+f\" (a % must be followed by two hex digits); nothing was sent."
                    .to_string(),
                true
            )
        );
        assert_eq!(app.editor.text(), "look at file:///tmp/a%+f.png");
        app.editor.take();
        assert!(submit(&mut app, "/image file:///tmp/a%4.png").is_empty());
        assert!(last_notice(&app).0.starts_with(
            "Cannot attach file:///tmp/a%4.png: bad percent-encoding: malformed escape \"%4.\""
        ));
        assert!(app.staged.is_empty());
        // a file the probe cannot decode: dropped with the probe's reason; the message waiting
        // for it goes back to the prompt
        let ids = probes(&submit(&mut app, "/image broken.png"));
        assert!(submit(&mut app, "and this?").is_empty());
        let cmds = app.update(Msg::Probed {
            id: ids[0],
            result: Err("not a PNG file: bad signature".into()),
        });
        assert!(cmds.is_empty());
        assert!(app.staged.is_empty() && app.pending.is_none());
        assert_eq!(
            last_notice(&app),
            (
                format!(
                    "Cannot attach {}: not a PNG file: bad signature.",
                    dir.path().join("broken.png").display()
                ),
                true
            )
        );
        assert_eq!(app.editor.text(), "and this?");
        assert_eq!(exchange_count(&app), 0);
    }

    #[test]
    fn streaming_tokens_build_the_answer_and_done_saves_the_turn() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let id = request(&submit(&mut app, "hi")).id;
        engine(
            &mut app,
            EngineEvent::Started {
                id,
                question: "hi".into(),
                prompt_tokens: 20,
                dropped_turns: 0,
            },
        );
        assert_eq!(last(&app).status, Status::Streaming);
        for t in ["Hel", "lo", " 世界"] {
            engine(&mut app, EngineEvent::Token { id, text: t.into() });
        }
        assert_eq!(last(&app).answer, "Hello 世界");
        assert_eq!(last(&app).pieces, 3);
        // tokens of another request are ignored
        engine(
            &mut app,
            EngineEvent::Token {
                id: id + 100,
                text: "x".into(),
            },
        );
        assert_eq!(last(&app).answer, "Hello 世界");
        let cmds = engine(
            &mut app,
            EngineEvent::Done {
                id,
                answer: "Hello 世界!".into(),
                stats: stats(Finish::Stop, 4),
            },
        );
        assert_eq!(
            last(&app).answer,
            "Hello 世界!",
            "Done's answer is the final one"
        );
        assert!(!app.busy());
        let [Command::Save {
            name,
            session,
            force,
            ..
        }] = cmds.as_slice()
        else {
            panic!("expected an autosave, got {cmds:?}");
        };
        assert_eq!((name.as_str(), *force), ("chat-test", false));
        assert_eq!(
            session.exchanges[0].turn,
            Turn {
                question: "hi".into(),
                attachments: vec![],
                answer: "Hello 世界!".into()
            }
        );
    }

    #[test]
    fn history_carries_the_question_as_the_engine_reported_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        one_turn(&mut app);
        let req = request(&submit(&mut app, "second?")).clone();
        assert_eq!(
            req.history,
            vec![Turn {
                question: "<image>\nquestion".into(),
                attachments: vec![],
                answer: "First answer.".into()
            }]
        );
    }

    #[test]
    fn cancel_keeps_the_partial_answer() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let id = request(&submit(&mut app, "long story")).id;
        engine(
            &mut app,
            EngineEvent::Token {
                id,
                text: "Once upon".into(),
            },
        );
        assert_eq!(key(&mut app, KeyCode::Esc), vec![Command::Cancel]);
        assert!(
            key(&mut app, KeyCode::Esc).is_empty(),
            "one cancel is enough"
        );
        // Ctrl+C while generating also cancels, and does not arm quitting
        assert!(ctrl(&mut app, 'c').is_empty());
        assert!(!app.quit_armed);
        engine(
            &mut app,
            EngineEvent::Done {
                id,
                answer: "Once upon".into(),
                stats: stats(Finish::Cancelled, 2),
            },
        );
        assert_eq!(last(&app).status, Status::Done(Finish::Cancelled));
        assert_eq!(last(&app).answer, "Once upon");
        let req = request(&submit(&mut app, "go on")).clone();
        assert_eq!(req.history[0].answer, "Once upon");
    }

    /// The request's own cancel switch keeps a stop asked for while it waited: nothing is
    /// asked again when it starts.
    #[test]
    fn a_stop_before_the_request_starts_is_not_repeated_when_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        let id = request(&submit(&mut app, "queued while loading")).id;
        assert_eq!(key(&mut app, KeyCode::Esc), vec![Command::Cancel]);
        ready(&mut app);
        let started = EngineEvent::Started {
            id,
            question: "queued while loading".into(),
            prompt_tokens: 9,
            dropped_turns: 0,
        };
        assert_eq!(engine(&mut app, started), vec![]);
    }

    #[test]
    fn ctrl_c_twice_quits_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        assert!(ctrl(&mut app, 'c').is_empty());
        assert!(app.flash.as_ref().unwrap().text.contains("again to quit"));
        // another key in between disarms it
        key(&mut app, KeyCode::Char('x'));
        key(&mut app, KeyCode::Backspace);
        assert!(ctrl(&mut app, 'c').is_empty());
        assert_eq!(ctrl(&mut app, 'c'), vec![Command::Quit]);
        assert_eq!(submit(&mut app, "/quit").last(), Some(&Command::Quit));
    }

    #[test]
    fn an_engine_error_is_shown_and_the_chat_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        one_turn(&mut app);
        let id = request(&submit(&mut app, "boom?")).id;
        let cmds = engine(
            &mut app,
            EngineEvent::Error {
                id,
                message: "image too large".into(),
                fault: Fault::Request,
            },
        );
        assert!(cmds.is_empty(), "nothing to save for a failed turn");
        assert_eq!(last(&app).status, Status::Failed("image too large".into()));
        assert!(!app.busy());
        let req = request(&submit(&mut app, "next")).clone();
        assert_eq!(req.history.len(), 1, "the failed exchange is not history");
    }

    #[test]
    fn load_failure_stops_sending_but_not_the_chat() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        // a question sent while loading waits; the failure fails it
        let _ = request(&submit(&mut app, "early")).id;
        engine(
            &mut app,
            EngineEvent::LoadFailed("no config.json in /m".into()),
        );
        assert_eq!(
            last(&app).status,
            Status::Failed("the model could not be loaded".into())
        );
        assert_eq!(
            last_notice(&app),
            (
                "The model could not be loaded: no config.json in /m".into(),
                true
            )
        );
        assert!(submit(&mut app, "again").is_empty());
        assert!(app
            .flash
            .as_ref()
            .unwrap()
            .text
            .starts_with("the model is not loaded"));
        assert_eq!(
            app.editor.text(),
            "again",
            "a refused message stays in the prompt"
        );
        ctrl(&mut app, 'u');
        assert_eq!(submit(&mut app, "/help"), vec![], "commands still work");
        assert!(matches!(app.mode, Mode::Help { .. }));
    }

    #[test]
    fn up_on_an_empty_prompt_edits_the_last_question() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cat.png"), b"x").unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        one_turn(&mut app);
        let ids = probes(&submit(&mut app, "/image cat.png"));
        app.update(Msg::Probed {
            id: ids[0],
            result: Ok(info("cat.png")),
        });
        let id = request(&submit(&mut app, "what colour?")).id;
        answer(&mut app, id, &["Grey."], Finish::Stop);
        assert!(
            key(&mut app, KeyCode::Up).is_empty(),
            "infos are kept: no new probe"
        );
        assert_eq!(app.editor.text(), "what colour?");
        assert_eq!(app.staged.len(), 1);
        // Esc leaves it as it was
        key(&mut app, KeyCode::Esc);
        assert!(app.editor.is_empty() && app.staged.is_empty() && app.editing.is_none());
        key(&mut app, KeyCode::Up);
        for _ in 0.."colour?".len() {
            key(&mut app, KeyCode::Backspace);
        }
        let req = request(&submit(&mut app, "breed?")).clone();
        assert_eq!(req.question, "what breed?");
        assert_eq!(req.attachments.len(), 1);
        assert_eq!(req.history.len(), 1, "the edited exchange is not history");
        assert_eq!(exchange_count(&app), 2);
        assert_eq!(last(&app).typed, "what breed?");
    }

    #[test]
    fn paste_keeps_newlines_and_stages_dropped_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a b.png"), b"x").unwrap();
        let mut app = app_in(dir.path());
        app.update(Msg::Paste("line one\r\nline two".into()));
        assert_eq!(app.editor.text(), "line one\nline two");
        // a terminal pastes a dropped file as its quoted path
        let dropped = format!("'{}' ", dir.path().join("a b.png").display());
        let cmds = app.update(Msg::Paste(dropped));
        assert_eq!(probes(&cmds).len(), 1);
        assert_eq!(app.staged[0].attachment.path(), dir.path().join("a b.png"));
        assert_eq!(
            app.editor.text(),
            "line one\nline two",
            "the prompt is untouched"
        );
        // a dropped path that does not exist is refused
        assert!(app.update(Msg::Paste("/nowhere/x.jpg".into())).is_empty());
        assert_eq!(
            last_notice(&app),
            ("Cannot attach /nowhere/x.jpg: no such file.".into(), true)
        );
        assert_eq!(app.staged.len(), 1);
        app.editor.take();
        assert_eq!(submit(&mut app, "/detach 2"), vec![]);
        assert_eq!(
            app.flash.as_ref().unwrap().text,
            "no attachment 2: 1 staged"
        );
        submit(&mut app, "/detach 1");
        assert!(app.staged.is_empty());
    }

    #[test]
    fn fifos_and_devices_are_refused_before_anything_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.jpg");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut app = app_in(dir.path());
        for (path, kind) in [
            (fifo.display().to_string(), "a FIFO (named pipe)"),
            ("/dev/zero".to_string(), "a character device"),
        ] {
            for cmd in ["/image", "/video"] {
                let cmds = submit(&mut app, &format!("{cmd} {path}"));
                assert!(probes(&cmds).is_empty(), "{cmd} {path}: nothing probes it");
                assert_eq!(
                    last_notice(&app),
                    (
                        format!("Cannot attach {path}: it is {kind}, not a regular file."),
                        true
                    )
                );
                assert!(app.staged.is_empty());
            }
        }
    }

    #[test]
    fn enter_and_newline_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        type_text(&mut app, "a");
        app.update(Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT)));
        type_text(&mut app, "b");
        app.update(Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::SHIFT)));
        type_text(&mut app, "c");
        let req = request(&key(&mut app, KeyCode::Enter)).clone();
        assert_eq!(req.question, "a\nb\nc");
        // empty input sends nothing
        answer(&mut app, req.id, &["ok"], Finish::Stop);
        assert!(key(&mut app, KeyCode::Enter).is_empty());
    }

    #[test]
    fn tab_completes_paths() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("holiday.jpg"), b"x").unwrap();
        let mut app = app_in(dir.path());
        type_text(&mut app, "/image hol");
        key(&mut app, KeyCode::Tab);
        assert_eq!(app.editor.text(), "/image holiday.jpg ");
    }

    #[test]
    fn ctrl_z_and_sigtstp_suspend_and_sigcont_takes_the_terminal_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        type_text(&mut app, "half a question");
        assert_eq!(ctrl(&mut app, 'z'), vec![Command::Suspend]);
        assert_eq!(app.update(Msg::Suspend), vec![Command::Suspend]);
        assert_eq!(app.update(Msg::Continued), vec![Command::Resume]);
        assert_eq!(
            app.editor.text(),
            "half a question",
            "nothing typed is lost"
        );
        submit(&mut app, "/help");
        assert_eq!(
            ctrl(&mut app, 'z'),
            vec![Command::Suspend],
            "also over the help"
        );
    }

    #[test]
    fn signal_saves_and_quits() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        assert_eq!(
            app.update(Msg::Signal),
            vec![Command::Quit],
            "nothing to save yet"
        );
        one_turn(&mut app);
        let cmds = app.update(Msg::Signal);
        assert!(matches!(
            cmds.as_slice(),
            [Command::Save { .. }, Command::Quit]
        ));
    }

    #[test]
    fn scrolling_follows_the_end_until_moved() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        app.view.metrics.set(crate::app::state::Metrics {
            lines: 100,
            height: 20,
            input_width: 40,
        });
        key(&mut app, KeyCode::PageUp);
        assert_eq!(app.scroll, Some(61));
        app.update(Msg::Mouse(MouseEvent {
            kind: MouseEventKind::ScrollDown,
            column: 0,
            row: 0,
            modifiers: KeyModifiers::NONE,
        }));
        assert_eq!(app.scroll, Some(64));
        key(&mut app, KeyCode::PageDown);
        assert_eq!(app.scroll, None, "back at the end: following again");
        app.update(Msg::Key(KeyEvent::new(
            KeyCode::Home,
            KeyModifiers::CONTROL,
        )));
        assert_eq!(app.scroll, Some(0));
    }
}

#[cfg(test)]
mod thinking_tests {
    use super::*;
    use crate::app::testkit::*;
    use crate::prompt::thinking::R1_SYSTEM_PROMPT;
    use crossterm::event::KeyCode;

    #[test]
    fn think_on_and_off_switch_the_system_message() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        submit(&mut app, "/system Be brief.");
        submit(&mut app, "/think on");
        assert!(app.settings.think);
        assert!(last_notice(&app).0.starts_with("Thinking on"));
        assert!(last_notice(&app)
            .0
            .contains("yours comes back with /think off"));
        let req = request(&submit(&mut app, "hello")).clone();
        assert_eq!(req.system.as_deref(), Some(R1_SYSTEM_PROMPT));
        answer(
            &mut app,
            req.id,
            &["<think>\nhm\n</think>\n\nhi"],
            Finish::Stop,
        );
        submit(&mut app, "/think");
        assert!(
            last_notice(&app).0.starts_with("Thinking on"),
            "/think shows it"
        );
        submit(&mut app, "/think off");
        assert_eq!(last_notice(&app).0, "Thinking off.");
        let req = request(&submit(&mut app, "again")).clone();
        assert_eq!(req.system.as_deref(), Some("Be brief."));
        // the history keeps the answer as the model wrote it, think block included
        assert_eq!(req.history[0].answer, "<think>\nhm\n</think>\n\nhi");
        submit(&mut app, "/think maybe");
        assert_eq!(app.flash.as_ref().unwrap().text, "usage: /think [on|off]");
    }

    #[test]
    fn sessions_keep_thinking_and_each_answers_thoughts() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        submit(&mut app, "/think on");
        let id = request(&submit(&mut app, "q")).id;
        let thought = "<think>\nstep\n</think>\n\nanswer";
        answer(&mut app, id, &[thought], Finish::Stop);
        let saved = app.to_session();
        assert!(saved.think);
        assert_eq!(saved.exchanges[0].turn.answer, thought);
        let json = serde_json::to_string(&saved).unwrap();
        let back: crate::app::session::Session = serde_json::from_str(&json).unwrap();
        let mut other = app_in(dir.path());
        ready(&mut other);
        assert!(!other.settings.think);
        other.update(Msg::Loaded {
            name: "t".into(),
            result: Ok(back),
        });
        assert!(other.settings.think);
        let req = request(&submit(&mut other, "more")).clone();
        assert_eq!(req.system.as_deref(), Some(R1_SYSTEM_PROMPT));
        assert_eq!(req.history[0].answer, thought);
        // a session saved before thinking existed loads with it off
        let old = json.replace(",\"think\":true", "");
        assert!(!old.contains("think\":"));
        let old: crate::app::session::Session = serde_json::from_str(&old).unwrap();
        assert!(!old.think);
    }

    #[test]
    fn its_key_expands_and_collapses_finished_thinking() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        assert!(!app.thinking_expanded);
        assert!(key(&mut app, KeyCode::F(4)).is_empty());
        assert!(app.thinking_expanded);
        assert_eq!(app.flash.as_ref().unwrap().text, "thinking expanded");
        key(&mut app, KeyCode::F(4));
        assert!(!app.thinking_expanded);
        assert_eq!(app.flash.as_ref().unwrap().text, "thinking collapsed");
        // the key is F4 by default and can be bound in config.toml
        assert_eq!(app.settings.keys.hint(Action::ToggleThinking), "F4");
    }
}
