//! What the user types: slash commands, file paths in the prompt (typed, pasted or dropped:
//! quoted, with escaped spaces, `~`, `file://`), and Tab completion of commands and paths.
use crate::media::TimeRange;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum SlashCommand {
    Image {
        path: String,
        max_tiles: Option<usize>,
    },
    Video {
        path: String,
        segments: Option<usize>,
        bound: Option<TimeRange>,
    },
    /// `None`: all.
    Detach(Option<usize>),
    Clear,
    Retry,
    /// `None`: show it; `Some(None)`: back to the template's.
    System(Option<Option<String>>),
    /// `None`: show the settings.
    Set(Option<(String, String)>),
    Help,
    Combine(bool),
    /// `None`: show whether thinking is on.
    Think(Option<bool>),
    Save {
        name: Option<String>,
        force: bool,
    },
    Load(String),
    Sessions,
    Quit,
}

/// Name, arguments and what it does, for `/help` and completion.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    (
        "/image",
        "PATH [MAX_TILES]",
        "attach an image (tiles: its most tiles)",
    ),
    (
        "/video",
        "PATH [SEGMENTS] [START,END]",
        "attach a video (frames sampled)",
    ),
    ("/detach", "N|all", "remove staged attachment N"),
    ("/retry", "", "answer the last question again"),
    ("/clear", "", "start a new chat (the old one stays saved)"),
    ("/system", "[TEXT|clear]", "show or set the system message"),
    (
        "/set",
        "[KEY VALUE]",
        "show or change a setting (see below)",
    ),
    ("/combine", "on|off", "several images as one <image>"),
    ("/think", "[on|off]", "think before answering (InternVL3.5)"),
    (
        "/save",
        "[NAME]",
        "save the chat (/save! NAME replaces a file)",
    ),
    ("/load", "NAME", "open a saved chat"),
    ("/sessions", "", "list saved chats"),
    ("/help", "", "this help"),
    ("/quit", "", "leave (also /exit)"),
];

pub const SET_KEYS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_new_tokens",
    "min_new_tokens",
    "max_tiles",
    "segments",
    "seed",
    "truncate_history",
];

/// A shell-like word: its text with quotes and escapes removed, and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    pub text: String,
    pub range: Range<usize>,
    /// Quoted or escaped: certainly meant as one thing.
    pub quoted: bool,
}

/// Splits at unquoted whitespace; `'...'`, `"..."` and backslash escapes group.
pub fn split_words(s: &str) -> Vec<Word> {
    let mut words = Vec::new();
    let mut cur: Option<Word> = None;
    let mut quote: Option<char> = None;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = i + c.len_utf8();
        if quote.is_none() && c.is_whitespace() {
            words.extend(cur.take());
            continue;
        }
        let w = cur.get_or_insert_with(|| Word {
            text: String::new(),
            range: i..i,
            quoted: false,
        });
        w.range.end = end;
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"') => {
                quote = Some(c);
                w.quoted = true;
            }
            (Some('\''), c) => w.text.push(c),
            (_, '\\') => match chars.next() {
                Some((j, n)) => {
                    w.text.push(n);
                    w.range.end = j + n.len_utf8();
                    w.quoted = true;
                }
                None => w.text.push('\\'),
            },
            (_, c) => w.text.push(c),
        }
    }
    words.extend(cur);
    words
}

/// Parses `input` if it is a slash command. A first word with another `/` in it is a path,
/// not a command.
pub fn parse_command(input: &str) -> Option<Result<SlashCommand, String>> {
    let input = input.trim();
    let head = input.split_whitespace().next()?;
    if !head.starts_with('/') || head[1..].contains('/') {
        return None;
    }
    let rest = input[head.len()..].trim();
    let args: Vec<String> = split_words(rest).into_iter().map(|w| w.text).collect();
    let usage = |name: &str| {
        let args = COMMANDS.iter().find(|c| c.0 == name).map_or("", |c| c.1);
        Err(format!("usage: {name} {args}"))
    };
    let number = |s: &str, what: &str| {
        s.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{what} must be a whole number above 0, got \"{s}\""))
    };
    let cmd = match head {
        "/image" => match args.as_slice() {
            [path] => Ok(SlashCommand::Image {
                path: path.clone(),
                max_tiles: None,
            }),
            [path, n] => number(n, "max tiles").map(|n| SlashCommand::Image {
                path: path.clone(),
                max_tiles: Some(n),
            }),
            _ => usage(head),
        },
        "/video" => match args.as_slice() {
            [path, more @ ..] if more.len() <= 2 => {
                let segments = more.first().map(|s| number(s, "segments")).transpose();
                let bound = more
                    .get(1)
                    .map(|b| {
                        b.parse::<TimeRange>()
                            .map_err(|e| format!("time range: {e}"))
                    })
                    .transpose();
                segments.and_then(|segments| {
                    bound.map(|bound| SlashCommand::Video {
                        path: path.clone(),
                        segments,
                        bound,
                    })
                })
            }
            _ => usage(head),
        },
        "/detach" => match args.as_slice() {
            [a] if a == "all" => Ok(SlashCommand::Detach(None)),
            [n] => number(n, "the attachment number").map(|n| SlashCommand::Detach(Some(n))),
            _ => usage(head),
        },
        "/clear" | "/new" => Ok(SlashCommand::Clear),
        "/retry" | "/regenerate" => Ok(SlashCommand::Retry),
        "/system" => Ok(SlashCommand::System(match rest {
            "" => None,
            "clear" => Some(None),
            text => Some(Some(text.to_string())),
        })),
        "/set" => match args.as_slice() {
            [] => Ok(SlashCommand::Set(None)),
            [k, v] => Ok(SlashCommand::Set(Some((k.clone(), v.clone())))),
            _ => usage(head),
        },
        "/combine" => match args.as_slice() {
            [v] if v == "on" => Ok(SlashCommand::Combine(true)),
            [v] if v == "off" => Ok(SlashCommand::Combine(false)),
            _ => usage(head),
        },
        "/think" => match args.as_slice() {
            [] => Ok(SlashCommand::Think(None)),
            [v] if v == "on" => Ok(SlashCommand::Think(Some(true))),
            [v] if v == "off" => Ok(SlashCommand::Think(Some(false))),
            _ => usage(head),
        },
        "/save" | "/save!" => match args.as_slice() {
            [] => Ok(SlashCommand::Save {
                name: None,
                force: head == "/save!",
            }),
            [name] => Ok(SlashCommand::Save {
                name: Some(name.clone()),
                force: head == "/save!",
            }),
            _ => usage("/save"),
        },
        "/load" => match args.as_slice() {
            [name] => Ok(SlashCommand::Load(name.clone())),
            _ => usage(head),
        },
        "/sessions" => Ok(SlashCommand::Sessions),
        "/help" | "/?" => Ok(SlashCommand::Help),
        "/quit" | "/exit" | "/bye" => Ok(SlashCommand::Quit),
        other => Err(format!("unknown command {other} (/help lists them)")),
    };
    Some(cmd)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Video,
}

const IMAGE_EXT: &[&str] = &[
    "jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm",
];
const VIDEO_EXT: &[&str] = &[
    "mp4", "mkv", "avi", "mov", "webm", "m4v", "flv", "wmv", "mpg", "mpeg",
];

pub fn media_kind(path: &Path) -> Option<MediaKind> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    if IMAGE_EXT.contains(&ext.as_str()) {
        Some(MediaKind::Image)
    } else if VIDEO_EXT.contains(&ext.as_str()) {
        Some(MediaKind::Video)
    } else {
        None
    }
}

/// Where relative paths and `~` point.
#[derive(Debug, Clone, PartialEq)]
pub struct PathContext {
    pub cwd: PathBuf,
    pub home: Option<PathBuf>,
}

impl PathContext {
    /// The absolute path a word names: `file://` URLs decoded, `~` expanded, relative to `cwd`.
    /// A `file://` URL with a malformed escape or bytes that are not UTF-8 is an error that
    /// names the word.
    pub fn resolve(&self, word: &str) -> Result<PathBuf, String> {
        let word = match word.strip_prefix("file://") {
            Some(url) => crate::files::percent_decode(url)
                .map_err(|e| format!("{word}: bad percent-encoding: {e}"))?,
            None => word.to_string(),
        };
        let path = match (word.strip_prefix('~'), &self.home) {
            (Some(""), Some(home)) => home.clone(),
            (Some(rest), Some(home)) if rest.starts_with('/') => home.join(&rest[1..]),
            _ => PathBuf::from(&word),
        };
        Ok(self.cwd.join(path))
    }
}

/// A word of the prompt naming an image or a video file.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaPath {
    pub range: Range<usize>,
    pub path: PathBuf,
    pub kind: MediaKind,
    pub exists: bool,
    /// Written as a path (has a `/`, `~`, quotes or escapes), so a missing file is an error
    /// rather than a word that happens to end in `.png`.
    pub explicit: bool,
}

/// The words of `text` that name media files; an error (one line naming the word) when a
/// `file://` URL with a media file's extension does not decode.
pub fn media_paths(text: &str, ctx: &PathContext) -> Result<Vec<MediaPath>, String> {
    let mut found = Vec::new();
    for w in split_words(text) {
        let path = match ctx.resolve(&w.text) {
            Ok(path) => path,
            Err(e) if media_kind(Path::new(&w.text)).is_some() => return Err(e),
            Err(_) => continue,
        };
        let Some(kind) = media_kind(&path) else {
            continue;
        };
        found.push(MediaPath {
            range: w.range,
            exists: path.is_file(),
            explicit: w.quoted || w.text.contains('/') || w.text.starts_with('~'),
            path,
            kind,
        });
    }
    Ok(found)
}

/// What Tab does: replace `range` with `replacement` (the longest common start, plus a space
/// once unique); `candidates` when it is ambiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub range: Range<usize>,
    pub replacement: String,
    pub candidates: Vec<String>,
}

/// Completes the command or path before `cursor`.
pub fn complete(text: &str, cursor: usize, ctx: &PathContext) -> Option<Completion> {
    let word = split_words(&text[..cursor])
        .pop()
        .filter(|w| w.range.end == cursor)?;
    let first = word.range.start == text.len() - text.trim_start().len();
    if first && word.text.starts_with('/') && !word.text[1..].contains('/') {
        let names: Vec<String> = COMMANDS
            .iter()
            .map(|c| c.0.to_string())
            .filter(|n| n.starts_with(&word.text))
            .collect();
        return completion(word.range, &names, str::to_string);
    }
    let (dir_part, prefix) = match word.text.rfind('/') {
        Some(i) => word.text.split_at(i + 1),
        None => ("", word.text.as_str()),
    };
    let dir = if dir_part.is_empty() {
        ctx.cwd.clone()
    } else {
        ctx.resolve(dir_part).ok()?
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let shown =
                name.starts_with(prefix) && (prefix.starts_with('.') || !name.starts_with('.'));
            let is_dir = e.path().is_dir();
            shown.then(|| if is_dir { format!("{name}/") } else { name })
        })
        .collect();
    names.sort();
    completion(word.range, &names, |n| escape(&format!("{dir_part}{n}")))
}

fn completion(
    range: Range<usize>,
    names: &[String],
    render: impl Fn(&str) -> String,
) -> Option<Completion> {
    let first = names.first()?;
    let common = names.iter().fold(first.as_str(), |acc, n| {
        let len = acc
            .char_indices()
            .zip(n.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, a), _)| i + a.len_utf8());
        &acc[..len]
    });
    let mut replacement = render(common);
    let candidates = if names.len() == 1 {
        if !common.ends_with('/') {
            replacement.push(' ');
        }
        Vec::new()
    } else {
        names.to_vec()
    };
    Some(Completion {
        range,
        replacement,
        candidates,
    })
}

/// Backslash-escapes what the word splitter would otherwise split or strip.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_whitespace() || matches!(c, '\\' | '\'' | '"') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn words(s: &str) -> Vec<String> {
        split_words(s).into_iter().map(|w| w.text).collect()
    }

    #[test]
    fn words_honour_quotes_and_escapes() {
        assert_eq!(
            words(r#"look at '/a b/c.png' and /x\ y.jpg "q \"z\"" end\"#),
            [
                "look",
                "at",
                "/a b/c.png",
                "and",
                "/x y.jpg",
                "q \"z\"",
                "end\\"
            ]
        );
        let w = &split_words("ab  'c d'")[1];
        assert_eq!((w.range.clone(), w.quoted), (4..9, true));
    }

    #[test]
    fn commands_parse_with_checked_arguments() {
        use SlashCommand::*;
        let p = |s: &str| parse_command(s).unwrap();
        assert_eq!(
            p("/image '~/my pics/a.png' 6"),
            Ok(Image {
                path: "~/my pics/a.png".into(),
                max_tiles: Some(6)
            })
        );
        assert_eq!(
            p("/video v.mp4 16 1.5,9"),
            Ok(Video {
                path: "v.mp4".into(),
                segments: Some(16),
                bound: Some(TimeRange::new(1.5, 9.0).unwrap())
            })
        );
        assert_eq!(
            p("/video v.mp4 8 9,1"),
            Err("time range: START 9 is not before END 1".into())
        );
        assert_eq!(
            p("/video v.mp4 8 -1,5"),
            Err(
                "time range: START -1 is negative (seconds count from the start of the video)"
                    .into()
            )
        );
        assert_eq!(
            p("/video v.mp4 8 1"),
            Err("time range: expected START,END in seconds, got \"1\" (no comma)".into())
        );
        assert_eq!(
            p("/image a.png 0"),
            Err("max tiles must be a whole number above 0, got \"0\"".into())
        );
        assert_eq!(p("/image"), Err("usage: /image PATH [MAX_TILES]".into()));
        assert_eq!(p("/detach 2"), Ok(Detach(Some(2))));
        assert_eq!(p("/detach all"), Ok(Detach(None)));
        assert_eq!(
            p("/system You are\na poet."),
            Ok(System(Some(Some("You are\na poet.".into()))))
        );
        assert_eq!(p("/system clear"), Ok(System(Some(None))));
        assert_eq!(
            p("/set top_k 5"),
            Ok(Set(Some(("top_k".into(), "5".into()))))
        );
        assert_eq!(
            p("/save! mine"),
            Ok(Save {
                name: Some("mine".into()),
                force: true
            })
        );
        assert_eq!(p("/combine maybe"), Err("usage: /combine on|off".into()));
        assert_eq!(
            p("/frobnicate"),
            Err("unknown command /frobnicate (/help lists them)".into())
        );
        // a path is not a command
        assert_eq!(parse_command("/home/me/cat.png what is it?"), None);
        assert_eq!(parse_command("hello /image"), None);
    }

    #[test]
    fn paths_resolve_home_urls_and_relative() {
        let ctx = PathContext {
            cwd: "/work".into(),
            home: Some("/home/me".into()),
        };
        let ok = |w: &str| ctx.resolve(w).unwrap();
        assert_eq!(ok("~/a.png"), PathBuf::from("/home/me/a.png"));
        assert_eq!(ok("pics/a.png"), PathBuf::from("/work/pics/a.png"));
        assert_eq!(ok("file:///tmp/a%20b.png"), PathBuf::from("/tmp/a b.png"));
        assert_eq!(ok("/abs.png"), PathBuf::from("/abs.png"));
        // malformed escapes are refused with the word, not kept as a literal '%'
        assert_eq!(
            ctx.resolve("file:///tmp/a%+f.png").unwrap_err(),
            "file:///tmp/a%+f.png: bad percent-encoding: malformed escape \"%+f\" \
             (a % must be followed by two hex digits)"
        );
        assert_eq!(
            ctx.resolve("file:///tmp/a%FF.png").unwrap_err(),
            "file:///tmp/a%FF.png: bad percent-encoding: the decoded bytes are not UTF-8"
        );
    }

    #[test]
    fn a_bad_file_url_naming_a_picture_is_an_error() {
        let ctx = PathContext {
            cwd: "/work".into(),
            home: None,
        };
        assert_eq!(
            media_paths("what is file:///tmp/a%zz.png ?", &ctx).unwrap_err(),
            "file:///tmp/a%zz.png: bad percent-encoding: malformed escape \"%zz\" \
             (a % must be followed by two hex digits)"
        );
        // a URL that names no media file is only a word of the text
        assert_eq!(media_paths("see file:///a%zz/notes", &ctx).unwrap(), []);
    }

    #[test]
    fn media_paths_in_a_prompt() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a b.png"), b"x").unwrap();
        fs::write(dir.path().join("clip.MP4"), b"x").unwrap();
        let ctx = PathContext {
            cwd: dir.path().into(),
            home: None,
        };
        let text = r"compare a\ b.png with ./clip.MP4 and gone.png or ./gone.jpg notes.txt";
        let found = media_paths(text, &ctx).unwrap();
        let summary: Vec<_> = found
            .iter()
            .map(|m| (&text[m.range.clone()], m.kind, m.exists, m.explicit))
            .collect();
        assert_eq!(
            summary,
            [
                (r"a\ b.png", MediaKind::Image, true, true),
                ("./clip.MP4", MediaKind::Video, true, true),
                ("gone.png", MediaKind::Image, false, false),
                ("./gone.jpg", MediaKind::Image, false, true),
            ]
        );
    }

    #[test]
    fn tab_completes_commands_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("my pics")).unwrap();
        fs::write(dir.path().join("my pics/cat.png"), b"x").unwrap();
        fs::write(dir.path().join("my pics/car.jpg"), b"x").unwrap();
        fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let ctx = PathContext {
            cwd: dir.path().into(),
            home: None,
        };
        let c = complete("/ima", 4, &ctx).unwrap();
        assert_eq!((c.range, c.replacement.as_str()), (0..4, "/image "));
        let c = complete("/s", 2, &ctx).unwrap();
        assert_eq!(c.replacement, "/s");
        assert_eq!(c.candidates, ["/system", "/set", "/save", "/sessions"]);
        let text = "/image my";
        let c = complete(text, text.len(), &ctx).unwrap();
        assert_eq!(c.replacement, r"my\ pics/");
        let text = r"look my\ pics/ca";
        let c = complete(text, text.len(), &ctx).unwrap();
        assert_eq!((c.range, c.replacement.as_str()), (5..16, r"my\ pics/ca"));
        assert_eq!(c.candidates, ["car.jpg", "cat.png"]);
        let text = r"look my\ pics/cat";
        let c = complete(text, text.len(), &ctx).unwrap();
        assert_eq!(c.replacement, r"my\ pics/cat.png ");
        assert_eq!(complete("look ", 5, &ctx), None);
    }
}
