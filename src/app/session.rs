//! Saved chats: one JSON file per session in `<data dir>/sessions/NAME.json` (`<data dir>` is
//! `$XDG_DATA_HOME/internvl-chat` on Linux). A session holds the transcript (turns with their
//! attachments by path), the system message and the generation settings. Writes are atomic
//! (temporary file in the same folder, fsync, rename) and never replace a file that is not this
//! chat's own unless asked to.
use crate::engine::protocol::{Finish, Turn};
use crate::sampling::SamplingParams;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub version: u32,
    /// Tells this chat's file from another's of the same name.
    pub id: String,
    /// Seconds since the Unix epoch.
    pub saved_at: u64,
    #[serde(default)]
    pub system: Option<String>,
    /// Thinking mode was on (the answers keep their `<think>` blocks either way).
    #[serde(default)]
    pub think: bool,
    pub params: SamplingParams,
    #[serde(default)]
    pub max_tiles: Option<usize>,
    #[serde(default)]
    pub combine_images: bool,
    pub exchanges: Vec<SavedExchange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedExchange {
    /// The question as typed, as the chat shows it.
    pub typed: String,
    /// What the model saw: the question with placeholders, attachments, answer.
    pub turn: Turn,
    pub finish: Finish,
}

/// One line of `/sessions`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub saved_at: u64,
    pub turns: usize,
    /// Why the file cannot be loaded, if it cannot.
    pub problem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no home directory to keep sessions in")]
    NoHome,
    #[error("bad session name \"{0}\": use letters, digits, '.', '-' and '_' (at most 64)")]
    BadName(String),
    #[error("no session named \"{name}\" in {}", dir.display())]
    NotFound { name: String, dir: PathBuf },
    #[error("cannot read session {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session {} is corrupt (line {line}, column {column}: {message}); the file was left as it is", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("session {} has version {found}, this program reads version {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write session {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not overwriting {}: {reason}", path.display())]
    Occupied { path: PathBuf, reason: String },
}

/// `<data dir>/sessions` from the platform's conventions.
pub fn default_dir() -> Result<PathBuf, SessionError> {
    directories::ProjectDirs::from("", "", "internvl-chat")
        .map(|d| d.data_dir().join("sessions"))
        .ok_or(SessionError::NoHome)
}

/// The file of session `name` in `dir`.
pub fn path_for(dir: &Path, name: &str) -> Result<PathBuf, SessionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(dir.join(format!("{name}.json")))
    } else {
        Err(SessionError::BadName(name.to_string()))
    }
}

pub fn load(path: &Path) -> Result<Session, SessionError> {
    let text = crate::files::read_to_string(path, crate::files::MAX_SESSION_BYTES, "a session")
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => SessionError::NotFound {
                name: path
                    .file_stem()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
                dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            },
            _ => SessionError::Read {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let session: Session = serde_json::from_str(&text).map_err(|e| SessionError::Corrupt {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        message: e
            .to_string()
            .split(" at line")
            .next()
            .unwrap_or("")
            .to_string(),
    })?;
    if session.version != VERSION {
        return Err(SessionError::Version {
            path: path.to_path_buf(),
            found: session.version,
        });
    }
    Ok(session)
}

/// Writes `session` to `path` atomically. Unless `force`, an existing file is replaced only
/// when it is a readable session with the same id (an earlier save of this chat).
pub fn save(path: &Path, session: &Session, force: bool) -> Result<(), SessionError> {
    let write_err = |source| SessionError::Write {
        path: path.to_path_buf(),
        source,
    };
    if !force && path.exists() {
        let reason = match load(path) {
            Ok(old) if old.id == session.id => None,
            Ok(_) => Some("it holds another chat (use /save! to replace it)".to_string()),
            Err(e) => Some(format!("it is not a readable session ({e})")),
        };
        if let Some(reason) = reason {
            return Err(SessionError::Occupied {
                path: path.to_path_buf(),
                reason,
            });
        }
    }
    let json = serde_json::to_vec_pretty(session).expect("sessions always serialise");
    write_atomically(path, |f| f.write_all(&json)).map_err(write_err)
}

/// Replaces `path` with what `write` writes, or leaves it as it was: a temporary file in the
/// same folder (so the rename stays on one file system; its name starts with a dot and does not
/// end in `.json`, so [`list`] never shows it), synced, then renamed over `path`. A failure on
/// the way removes the temporary file.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map_or_else(|| "session".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // make the rename itself durable
    fs::File::open(dir)?.sync_all()
}

/// The sessions in `dir`, newest first; unreadable files are listed with the reason.
pub fn list(dir: &Path) -> Result<Vec<Summary>, SessionError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SessionError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|n| !n.starts_with('.'))
        else {
            continue;
        };
        out.push(match load(&path) {
            Ok(s) => Summary {
                name: name.to_string(),
                saved_at: s.saved_at,
                turns: s.exchanges.len(),
                problem: None,
            },
            Err(e) => Summary {
                name: name.to_string(),
                saved_at: 0,
                turns: 0,
                problem: Some(e.to_string()),
            },
        });
    }
    out.sort_by(|a, b| b.saved_at.cmp(&a.saved_at).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time.
pub fn format_time(secs: u64) -> String {
    let (y, mo, d, h, mi, _) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}")
}

/// A fresh session name from the time: `chat-YYYYMMDD-HHMMSS`.
pub fn name_for_time(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("chat-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// Calendar date and time (UTC) of a Unix time (days-to-civil, proleptic Gregorian).
fn civil(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::Attachment;

    fn sample(id: &str) -> Session {
        Session {
            version: VERSION,
            id: id.into(),
            saved_at: 1_700_000_000,
            system: Some("be brief".into()),
            think: false,
            params: SamplingParams::greedy(64),
            max_tiles: Some(6),
            combine_images: false,
            exchanges: vec![SavedExchange {
                typed: "what is this?".into(),
                turn: Turn {
                    question: "<image>\nwhat is this?".into(),
                    attachments: vec![Attachment::Image {
                        path: "/pics/cat.png".into(),
                        max_tiles: Some(6),
                    }],
                    answer: "A cat.".into(),
                },
                finish: Finish::Stop,
            }],
        }
    }

    #[test]
    fn names_are_checked() {
        let dir = Path::new("/d");
        assert_eq!(
            path_for(dir, "my-chat_1.2").unwrap(),
            dir.join("my-chat_1.2.json")
        );
        for bad in ["", "../x", ".hidden", "a b", "a/b"] {
            assert!(
                matches!(path_for(dir, bad), Err(SessionError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn save_load_round_trip_and_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "one").unwrap();
        let s = sample("id-1");
        save(&path, &s, false).unwrap();
        assert_eq!(load(&path).unwrap(), s);
        // saving again (same chat) replaces it; no temporary file is left behind
        let mut s2 = s.clone();
        s2.saved_at += 10;
        save(&path, &s2, false).unwrap();
        assert_eq!(load(&path).unwrap(), s2);
        fs::write(dir.path().join("broken.json"), "{\"version\": 1,").unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let list = list(dir.path()).unwrap();
        assert_eq!(list[0].name, "one");
        assert_eq!((list[0].turns, list[0].saved_at), (1, 1_700_000_010));
        assert_eq!(list[1].name, "broken");
        assert!(list[1].problem.as_ref().unwrap().contains("is corrupt"));
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_write_leaves_the_old_session_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "one").unwrap();
        let failing = |f: &mut fs::File| {
            f.write_all(b"{\"version\": 1, \"id\": \"hal")?;
            Err(std::io::Error::other("disk full"))
        };
        // no session yet: none appears, and no temporary file is left
        let e = write_atomically(&path, failing).unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(names_in(dir.path()), Vec::<String>::new());
        // an earlier save stays whole
        let s = sample("id-1");
        save(&path, &s, false).unwrap();
        write_atomically(&path, failing).unwrap_err();
        assert_eq!(load(&path).unwrap(), s);
        assert_eq!(names_in(dir.path()), ["one.json"]);
        // the rename itself failing (a folder where the file goes) leaves no temporary file
        let blocked = dir.path().join("blocked.json");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), "x").unwrap();
        let e = save(&blocked, &s, true).unwrap_err();
        assert!(matches!(e, SessionError::Write { .. }), "{e}");
        assert_eq!(names_in(dir.path()), ["blocked.json", "one.json"]);
    }

    #[test]
    fn never_overwrites_another_chat_or_a_corrupt_file_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "x").unwrap();
        save(&path, &sample("a"), false).unwrap();
        let err = save(&path, &sample("b"), false).unwrap_err().to_string();
        assert!(err.contains("it holds another chat"), "{err}");
        fs::write(&path, "not json").unwrap();
        let err = save(&path, &sample("a"), false).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("not overwriting {}", path.display())),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "not json");
        save(&path, &sample("b"), true).unwrap();
        assert_eq!(load(&path).unwrap().id, "b");
    }

    #[test]
    fn corrupt_file_names_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        fs::write(&path, "{\n  \"version\": 1,\n  \"id\": 5\n}").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "session {} is corrupt (line 3, column 9: invalid type: integer `5`, expected a string); the file was left as it is",
                path.display()
            )
        );
    }

    #[test]
    fn a_missing_session_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&path_for(dir.path(), "nope").unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no session named \"nope\" in {}", dir.path().display())
        );
    }

    #[test]
    fn times_format_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13");
        assert_eq!(name_for_time(951_782_400), "chat-20000229-000000");
    }
}
