//! Slash commands: attaching by path, settings, the system message, retry, new chat, saving
//! and loading sessions. Like the rest of `update`, no effects: work comes back as commands.
use super::input::{self, MediaKind, SlashCommand};
use super::keys::Action;
use super::session::{self, Session};
use super::state::{App, EntryKind, Exchange, Mode, ProbeTarget, SessionRef, Status};
use super::update::Command;

impl App {
    /// Runs a slash command.
    pub(super) fn command(&mut self, cmd: SlashCommand) -> Vec<Command> {
        let refuse_busy = matches!(
            cmd,
            SlashCommand::Clear | SlashCommand::Retry | SlashCommand::Load(_)
        ) && self.busy();
        let refuse_pending = matches!(
            cmd,
            SlashCommand::Detach(_)
                | SlashCommand::Clear
                | SlashCommand::Retry
                | SlashCommand::Load(_)
        ) && self.pending.is_some();
        if refuse_busy || refuse_pending {
            let key = self.settings.keys.hint(Action::Cancel);
            let why = if refuse_busy {
                format!("wait for the answer, or stop it with {key}")
            } else {
                format!("still reading the attachments ({key} stops sending)")
            };
            self.set_flash(why, true);
            return vec![];
        }
        match cmd {
            SlashCommand::Image { path, max_tiles } => {
                self.attach_path(&path, MediaKind::Image, max_tiles, None, None)
            }
            SlashCommand::Video {
                path,
                segments,
                bound,
            } => self.attach_path(&path, MediaKind::Video, None, segments, bound),
            SlashCommand::Detach(which) => {
                match which {
                    None => self.staged.clear(),
                    Some(n) if n <= self.staged.len() => {
                        self.staged.remove(n - 1);
                    }
                    Some(n) => self.set_flash(
                        format!("no attachment {n}: {} staged", self.staged.len()),
                        true,
                    ),
                }
                vec![]
            }
            SlashCommand::Clear => self.clear(),
            SlashCommand::Retry => self.retry(),
            SlashCommand::System(arg) => {
                if let Some(text) = arg {
                    self.settings.system = text;
                }
                let shown = self
                    .settings
                    .system
                    .as_deref()
                    .unwrap_or("(the model's default)");
                let thinking = if self.settings.think {
                    " (not used while /think is on: thinking has its own)"
                } else {
                    ""
                };
                self.notice(format!("System message: {shown}{thinking}"), false);
                vec![]
            }
            SlashCommand::Set(None) => {
                self.notice(self.describe_settings(), false);
                vec![]
            }
            SlashCommand::Set(Some((key, value))) => {
                match self.set(&key, &value) {
                    Ok(()) => self.set_flash(format!("{key} = {value}"), false),
                    Err(e) => self.notice(format!("/set {key}: {e}"), true),
                }
                vec![]
            }
            SlashCommand::Help => {
                self.mode = Mode::Help { scroll: 0 };
                vec![]
            }
            SlashCommand::Combine(on) => {
                self.settings.combine_images = on;
                self.set_flash(
                    if on {
                        "images go to the model as one <image>"
                    } else {
                        "images go to the model one by one (Image-1, Image-2…)"
                    },
                    false,
                );
                vec![]
            }
            SlashCommand::Think(on) => {
                if let Some(on) = on {
                    self.settings.think = on;
                }
                let key = self.settings.keys.hint(Action::ToggleThinking);
                let text = match (self.settings.think, &self.settings.system) {
                    (true, Some(_)) => format!(
                        "Thinking on: the model thinks before it answers ({key} expands its \
                         thinking). It has its own system message; yours comes back with /think off."
                    ),
                    (true, None) => format!(
                        "Thinking on: the model thinks before it answers ({key} expands its thinking)."
                    ),
                    (false, _) => "Thinking off.".to_string(),
                };
                self.notice(text, false);
                vec![]
            }
            SlashCommand::Save { name, force } => {
                let name = name.unwrap_or_else(|| self.session.name.clone());
                self.save(name, force).into_iter().collect()
            }
            SlashCommand::Load(name) => match session::path_for(&self.sessions_dir, &name) {
                Ok(path) => vec![Command::Load { name, path }],
                Err(e) => {
                    self.set_flash(e.to_string(), true);
                    vec![]
                }
            },
            SlashCommand::Sessions => vec![Command::ListSessions(self.sessions_dir.clone())],
            SlashCommand::Quit => {
                let mut cmds = self.cancel();
                cmds.push(Command::Quit);
                cmds
            }
        }
    }

    fn save(&mut self, name: String, force: bool) -> Option<Command> {
        match session::path_for(&self.sessions_dir, &name) {
            Ok(path) => Some(Command::Save {
                name,
                path,
                session: self.to_session(),
                force,
            }),
            Err(e) => {
                self.set_flash(e.to_string(), true);
                None
            }
        }
    }

    /// Saves the chat under its name, if it has anything to save.
    pub(super) fn autosave(&mut self) -> Option<Command> {
        if self.exchanges().any(|(_, x)| x.turn().is_some()) {
            self.save(self.session.name.clone(), false)
        } else {
            None
        }
    }

    fn describe_settings(&self) -> String {
        let s = &self.settings;
        let p = &s.params;
        let tiles = s
            .max_tiles
            .map_or_else(|| "the model's".into(), |n| n.to_string());
        format!(
            "Settings: temperature {} ({}), top_p {}, top_k {}, repetition_penalty {}, \
             max_new_tokens {}, min_new_tokens {}, seed {}, max_tiles {tiles}, segments {}, \
             combine {}, think {}, truncate_history {}",
            p.temperature,
            if p.is_greedy() { "greedy" } else { "sampling" },
            p.top_p,
            p.top_k,
            p.repetition_penalty,
            p.max_new_tokens,
            p.min_new_tokens,
            p.seed,
            s.video_segments,
            if s.combine_images { "on" } else { "off" },
            if s.think { "on" } else { "off" },
            if s.truncate_history { "on" } else { "off" },
        )
    }

    /// `/set KEY VALUE`: nothing changes unless the whole result is valid.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let float = || {
            value
                .parse::<f64>()
                .map_err(|_| format!("expected a number, got \"{value}\""))
        };
        let int = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("expected a whole number, got \"{value}\""))
        };
        let count = || {
            int().and_then(|n| {
                usize::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("must be at least 1, got {n}"))
            })
        };
        let mut p = self.settings.params.clone();
        match key {
            "temperature" => {
                p.temperature = float()?;
                p.do_sample = p.temperature > 0.0;
            }
            "top_p" => p.top_p = float()?,
            "top_k" => p.top_k = int()? as usize,
            "repetition_penalty" => p.repetition_penalty = float()?,
            "max_new_tokens" => p.max_new_tokens = int()? as usize,
            "min_new_tokens" => p.min_new_tokens = int()? as usize,
            "seed" => p.seed = int()?,
            "max_tiles" if value == "default" => self.settings.max_tiles = None,
            "max_tiles" => self.settings.max_tiles = Some(count()?),
            "segments" => self.settings.video_segments = count()?,
            "truncate_history" => {
                self.settings.truncate_history = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(format!("expected on or off, got \"{value}\"")),
                }
            }
            _ => {
                return Err(format!(
                    "unknown setting (one of {})",
                    input::SET_KEYS.join(", ")
                ))
            }
        }
        p.validate()?;
        self.settings.params = p;
        Ok(())
    }

    fn attach_path(
        &mut self,
        raw: &str,
        kind: MediaKind,
        max_tiles: Option<usize>,
        segments: Option<usize>,
        bound: Option<crate::media::TimeRange>,
    ) -> Vec<Command> {
        let path = match self.paths.resolve(raw) {
            Ok(path) => path,
            Err(e) => {
                self.notice(format!("Cannot attach {e}."), true);
                return vec![];
            }
        };
        // a FIFO or a device is refused here, before anything tries to read it
        let problem = match crate::files::regular(&path) {
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
                Some("it is a folder".to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("no such file".into()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(problem) = problem {
            self.notice(
                format!("Cannot attach {}: {problem}.", path.display()),
                true,
            );
            return vec![];
        }
        let attachment = self.attachment_for(kind, path, max_tiles, segments, bound);
        self.stage(attachment)
    }

    fn retry(&mut self) -> Vec<Command> {
        if let Some(why) = self.cannot_send() {
            self.set_flash(why, true);
            return vec![];
        }
        let Some((id, x)) = self.exchanges().next_back() else {
            self.set_flash("nothing to answer again", true);
            return vec![];
        };
        let x = x.clone();
        if self.editing == Some(id) {
            self.editing = None;
            self.editor.take();
            self.staged.clear();
        }
        self.start_exchange(x.typed, x.attachments, x.infos, Some(id), x.seed_offset + 1)
    }

    fn clear(&mut self) -> Vec<Command> {
        let had_turns = self.exchanges().any(|(_, x)| x.turn().is_some());
        let old = self.session.name.clone();
        self.entries.clear();
        self.view.lines.borrow_mut().clear();
        self.editing = None;
        self.scroll = None;
        self.probes.retain(|_, t| *t == ProbeTarget::Staged);
        let mut name = session::name_for_time(self.unix);
        if name == old {
            name = format!("{name}-{}", self.next_id);
        }
        let n = self.fresh_id();
        let id = format!("{}.{n}", self.id_base);
        self.session = SessionRef { name, id };
        if had_turns {
            self.notice(
                format!("New chat. The previous one is saved as \"{old}\"."),
                false,
            );
        } else {
            self.notice("New chat.", false);
        }
        vec![Command::Reset]
    }

    pub(super) fn loaded(&mut self, name: String, result: Result<Session, String>) -> Vec<Command> {
        let s = match result {
            Ok(s) => s,
            Err(e) => {
                self.notice(format!("Could not load \"{name}\": {e}"), true);
                return vec![];
            }
        };
        self.entries.clear();
        self.view.lines.borrow_mut().clear();
        self.editing = None;
        self.scroll = None;
        self.probes.retain(|_, t| *t == ProbeTarget::Staged);
        self.settings.system = s.system;
        self.settings.think = s.think;
        self.settings.params = s.params;
        self.settings.max_tiles = s.max_tiles;
        self.settings.combine_images = s.combine_images;
        self.session = SessionRef {
            name: name.clone(),
            id: s.id,
        };
        let turns = s.exchanges.len();
        self.notice(
            format!(
                "Loaded \"{name}\": {turns} turn{}, saved {} UTC.",
                if turns == 1 { "" } else { "s" },
                session::format_time(s.saved_at)
            ),
            false,
        );
        let mut cmds = vec![Command::Reset];
        for ex in s.exchanges {
            let n = ex.turn.attachments.len();
            let attachments = ex.turn.attachments;
            let entry = self.push_entry(EntryKind::Exchange(Box::new(Exchange {
                typed: ex.typed,
                question: Some(ex.turn.question),
                attachments: attachments.clone(),
                infos: vec![None; n],
                answer: ex.turn.answer,
                status: Status::Done(ex.finish),
                prompt_tokens: None,
                stats: None,
                pieces: 0,
                seed_offset: 0,
                dropped_turns: 0,
            })));
            for (index, attachment) in attachments.into_iter().enumerate() {
                let id = self.fresh_id();
                self.probes.insert(id, ProbeTarget::Entry { entry, index });
                cmds.push(Command::Probe { id, attachment });
            }
        }
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testkit::*;
    use crate::app::update::Msg;
    use crate::engine::protocol::{EngineEvent, Finish};

    #[test]
    fn retry_regenerates_the_last_answer_with_a_new_seed() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        one_turn(&mut app);
        let id = request(&submit(&mut app, "second?")).id;
        answer(&mut app, id, &["Two."], Finish::Stop);
        let req = request(&submit(&mut app, "/retry")).clone();
        assert_eq!(req.question, "second?");
        assert_eq!(req.history.len(), 1);
        assert_eq!(req.params.seed, app.settings.params.seed + 1);
        assert_eq!(exchange_count(&app), 2, "the retried exchange is replaced");
        assert_eq!(last(&app).status, Status::Waiting);
        // retry is refused while answering
        assert!(submit(&mut app, "/retry").is_empty());
        assert!(app.flash.as_ref().unwrap().error);
        answer(&mut app, req.id, &["Deux."], Finish::Stop);
        let again = request(&submit(&mut app, "/retry")).clone();
        assert_eq!(again.params.seed, app.settings.params.seed + 2);
    }

    #[test]
    fn clear_starts_a_new_chat_and_resets_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        let id = request(&submit(&mut app, "q")).id;
        assert!(
            submit(&mut app, "/clear").is_empty(),
            "refused while answering"
        );
        answer(&mut app, id, &["a"], Finish::Stop);
        app.update(Msg::Tick {
            now: std::time::Instant::now(),
            unix: 1_700_000_000,
        });
        assert_eq!(submit(&mut app, "/clear"), vec![Command::Reset]);
        assert_eq!(exchange_count(&app), 0);
        assert_eq!(app.session.name, "chat-20231114-221320");
        assert_ne!(app.session.id, "id-test");
        assert_eq!(
            last_notice(&app).0,
            "New chat. The previous one is saved as \"chat-test\"."
        );
        assert!(request(&submit(&mut app, "fresh")).history.is_empty());
    }

    #[test]
    fn set_validates_and_changes_nothing_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        let before = app.settings.params.clone();
        for (cmd, err) in [
            ("/set top_p 2", "/set top_p: top_p must be in (0, 1], got 2"),
            (
                "/set temperature warm",
                "/set temperature: expected a number, got \"warm\"",
            ),
            (
                "/set max_new_tokens 0",
                "/set max_new_tokens: max_new_tokens must be at least 1",
            ),
            (
                "/set max_tiles 0",
                "/set max_tiles: must be at least 1, got 0",
            ),
            (
                "/set top_k -1",
                "/set top_k: expected a whole number, got \"-1\"",
            ),
        ] {
            submit(&mut app, cmd);
            assert_eq!(last_notice(&app), (err.to_string(), true), "{cmd}");
            assert_eq!(app.settings.params, before);
        }
        submit(&mut app, "/set warmth 1");
        assert!(last_notice(&app)
            .0
            .starts_with("/set warmth: unknown setting (one of temperature"));
        submit(&mut app, "/set temperature 0");
        assert!(app.settings.params.is_greedy());
        submit(&mut app, "/set temperature 0.3");
        assert!(!app.settings.params.is_greedy());
        submit(&mut app, "/set max_tiles 6");
        assert_eq!(app.settings.max_tiles, Some(6));
        submit(&mut app, "/set seed 42");
        assert_eq!(app.settings.params.seed, 42);
        // a bad command keeps the text so it can be fixed
        submit(&mut app, "/set top_p");
        assert_eq!(app.editor.text(), "/set top_p");
        assert_eq!(app.flash.as_ref().unwrap().text, "usage: /set [KEY VALUE]");
    }

    #[test]
    fn system_and_combine_reach_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        submit(&mut app, "/system Answer in French.");
        submit(&mut app, "/combine on");
        let req = request(&submit(&mut app, "hello")).clone();
        assert_eq!(req.system.as_deref(), Some("Answer in French."));
        assert!(req.combine_images);
        answer(&mut app, req.id, &["Bonjour"], Finish::Stop);
        submit(&mut app, "/system clear");
        assert_eq!(last_notice(&app).0, "System message: (the model's default)");
        assert_eq!(request(&submit(&mut app, "hi")).system, None);
    }

    #[test]
    fn loading_a_session_restores_transcript_settings_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let mut app = app_in(dir.path());
        ready(&mut app);
        submit(&mut app, "/system Be brief.");
        submit(&mut app, "/set temperature 0");
        let first = one_turn(&mut app);
        let saved = match engine(
            &mut app,
            EngineEvent::Done {
                id: first,
                answer: String::new(),
                stats: stats(Finish::Stop, 0),
            },
        )
        .as_slice()
        {
            [] => app.to_session(),
            other => panic!("a stale Done does nothing, got {other:?}"),
        };
        let mut other = app_in(dir.path());
        ready(&mut other);
        let cmds = other.update(Msg::Loaded {
            name: "mine".into(),
            result: Ok(saved.clone()),
        });
        assert_eq!(cmds[0], Command::Reset);
        assert_eq!(cmds.len(), 1, "no attachments, nothing to probe");
        assert_eq!(other.session.name, "mine");
        assert_eq!(other.session.id, saved.id);
        assert_eq!(other.settings.system.as_deref(), Some("Be brief."));
        assert!(other.settings.params.is_greedy());
        assert_eq!(other.to_session().exchanges, saved.exchanges);
        let req = request(&submit(&mut other, "more")).clone();
        assert_eq!(req.history, vec![saved.exchanges[0].turn.clone()]);
        // a corrupt file: a message, and the chat stays as it was
        other.update(Msg::Loaded {
            name: "bad".into(),
            result: Err("session /x/bad.json is corrupt (line 1, column 2: oops); the file was left as it is".into()),
        });
        assert_eq!(
            last_notice(&other),
            (
                "Could not load \"bad\": session /x/bad.json is corrupt (line 1, column 2: oops); the file was left as it is".into(),
                true
            )
        );
        assert_eq!(other.session.name, "mine");
    }
}
