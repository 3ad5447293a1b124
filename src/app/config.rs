//! `config.toml` in the config directory: defaults for generation, attachments, the theme and
//! key bindings. Every field is optional; a missing file means the defaults. Command-line
//! settings ([`Overrides`]) go over the file's.
//!
//! ```toml
//! theme = "dark"            # dark | light | mono
//! max_tiles = 6             # tiles per image (default: the model's max_dynamic_patch)
//! combine_images = false
//! video_segments = 8
//! video_max_tiles = 1
//! mouse = true              # wheel scrolling (hold Shift to select text)
//! graphics = "auto"         # pictures: auto | kitty | sixel | iterm2 | halfblocks
//! system = "You are a careful assistant."
//! think = false             # thinking mode (InternVL3.5): /think on|off in the chat
//! truncate_history = false  # when the context is full, leave out the oldest turns
//! context = 16384           # context window in tokens (default: the model's; --context wins)
//! load_4bit = "llm"         # or load_8bit; "llm" | "head" | "all" (--load-8bit / --load-4bit win)
//!
//! [sampling]
//! temperature = 0.7         # 0 = greedy
//! top_p = 0.95
//! top_k = 50
//! repetition_penalty = 1.1
//! max_new_tokens = 1024
//! seed = 0
//!
//! [keys]
//! send = "enter"
//! newline = ["alt+enter", "shift+enter", "ctrl+j"]
//! ```
use super::graphics::GraphicsMode;
use super::keys::{Action, Key, KeyMap};
use super::theme::{Theme, THEMES};
use crate::sampling::SamplingParams;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The settings a chat starts with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub params: SamplingParams,
    /// Tiles per image; `None`: the model's `max_dynamic_patch`.
    pub max_tiles: Option<usize>,
    pub video_segments: usize,
    pub video_max_tiles: usize,
    pub combine_images: bool,
    /// `None`: the template's system message.
    pub system: Option<String>,
    /// Thinking mode: the model card's R1 system message instead of `system`.
    pub think: bool,
    /// When a prompt would not fit the context window, leave out the oldest turns instead of
    /// refusing it.
    pub truncate_history: bool,
    /// The context window in tokens (`None`: the model's); read before the model loads.
    pub context: Option<usize>,
    /// `--load-8bit` / `--load-4bit` (at most one); read before the model loads.
    pub load_8bit: Option<crate::cli::QuantScope>,
    pub load_4bit: Option<crate::cli::QuantScope>,
    pub theme: Theme,
    pub mouse: bool,
    /// How pictures are drawn (`Auto`: detected at start-up).
    pub graphics: GraphicsMode,
    pub keys: KeyMap,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            params: SamplingParams::default(),
            max_tiles: None,
            video_segments: crate::media::DEFAULT_SEGMENTS,
            video_max_tiles: crate::media::DEFAULT_VIDEO_MAX_TILES,
            combine_images: false,
            system: None,
            think: false,
            truncate_history: false,
            context: None,
            load_8bit: None,
            load_4bit: None,
            theme: Theme::default(),
            mouse: true,
            graphics: GraphicsMode::Auto,
            keys: KeyMap::default(),
        }
    }
}

/// Settings given on the command line (each `Some` wins over the config file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub system: Option<String>,
    /// `--think` (never given with `system`).
    pub think: bool,
    pub max_tiles: Option<usize>,
    /// Sampling flags, applied as the one-shot and batch modes apply them.
    pub sampling: crate::sampling::Overrides,
    pub combine_images: bool,
    pub graphics: Option<GraphicsMode>,
    pub truncate_history: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} line {line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("no home directory to find the config directory in")]
    NoHome,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    theme: Option<Spanned<String>>,
    max_tiles: Option<Spanned<usize>>,
    combine_images: Option<bool>,
    video_segments: Option<Spanned<usize>>,
    video_max_tiles: Option<Spanned<usize>>,
    system: Option<String>,
    think: Option<bool>,
    truncate_history: Option<bool>,
    context: Option<Spanned<usize>>,
    load_8bit: Option<Spanned<String>>,
    load_4bit: Option<Spanned<String>>,
    mouse: Option<bool>,
    graphics: Option<Spanned<String>>,
    sampling: Option<Spanned<Sampling>>,
    #[serde(default)]
    keys: BTreeMap<Action, Spanned<OneOrMany>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sampling {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f64>,
    max_new_tokens: Option<usize>,
    min_new_tokens: Option<usize>,
    seed: Option<u64>,
    do_sample: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `config.toml` in the platform's config directory (`$XDG_CONFIG_HOME/internvl-chat` on Linux).
pub fn default_path() -> Result<PathBuf, ConfigError> {
    directories::ProjectDirs::from("", "", "internvl-chat")
        .map(|d| d.config_dir().join("config.toml"))
        .ok_or(ConfigError::NoHome)
}

/// Reads the settings from `path`; a missing file gives the defaults.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    match crate::files::read_to_string(path, crate::files::MAX_SESSION_BYTES, "config.toml") {
        Ok(src) => parse(&src, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Parses `src`, the text of `path` (named in errors).
pub fn parse(src: &str, path: &Path) -> Result<Settings, ConfigError> {
    let invalid = |span: Option<std::ops::Range<usize>>, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        line: span.map_or(1, |s| line_of(src, s.start)),
        message,
    };
    let file: File = toml::from_str(src).map_err(|e| invalid(e.span(), e.message().into()))?;
    let mut s = Settings::default();
    if let Some(t) = file.theme {
        s.theme = Theme::named(t.get_ref()).ok_or_else(|| {
            invalid(
                Some(t.span()),
                format!(
                    "unknown theme \"{}\" (one of {})",
                    t.get_ref(),
                    THEMES.join(", ")
                ),
            )
        })?;
    }
    let at_least_one = |v: Option<Spanned<usize>>, name: &str| match v {
        Some(v) if *v.get_ref() == 0 => Err(invalid(
            Some(v.span()),
            format!("{name} must be at least 1"),
        )),
        v => Ok(v.map(Spanned::into_inner)),
    };
    s.max_tiles = at_least_one(file.max_tiles, "max_tiles")?;
    s.context = at_least_one(file.context, "context")?;
    let scope = |v: Option<Spanned<String>>, name: &str| match v {
        None => Ok(None),
        Some(v) => {
            use clap::ValueEnum;
            crate::cli::QuantScope::from_str(v.get_ref(), false)
                .map(Some)
                .map_err(|_| {
                    invalid(
                        Some(v.span()),
                        format!("unknown {name} \"{}\" (one of llm, head, all)", v.get_ref()),
                    )
                })
        }
    };
    if let (Some(_), Some(b)) = (&file.load_8bit, &file.load_4bit) {
        return Err(invalid(
            Some(b.span()),
            "load_8bit and load_4bit cannot both be set: choose one weight precision".into(),
        ));
    }
    s.load_8bit = scope(file.load_8bit, "load_8bit")?;
    s.load_4bit = scope(file.load_4bit, "load_4bit")?;
    if let Some(n) = at_least_one(file.video_segments, "video_segments")? {
        s.video_segments = n;
    }
    if let Some(n) = at_least_one(file.video_max_tiles, "video_max_tiles")? {
        s.video_max_tiles = n;
    }
    s.combine_images = file.combine_images.unwrap_or(s.combine_images);
    s.system = file.system;
    s.think = file.think.unwrap_or(s.think);
    s.truncate_history = file.truncate_history.unwrap_or(s.truncate_history);
    s.mouse = file.mouse.unwrap_or(s.mouse);
    if let Some(g) = file.graphics {
        s.graphics = GraphicsMode::named(g.get_ref()).ok_or_else(|| {
            invalid(
                Some(g.span()),
                format!(
                    "unknown graphics \"{}\" (one of {})",
                    g.get_ref(),
                    GraphicsMode::NAMES.join(", ")
                ),
            )
        })?;
    }
    if let Some(sampling) = file.sampling {
        let span = sampling.span();
        let f = sampling.into_inner();
        let p = &mut s.params;
        p.temperature = f.temperature.unwrap_or(p.temperature);
        p.top_p = f.top_p.unwrap_or(p.top_p);
        p.top_k = f.top_k.unwrap_or(p.top_k);
        p.repetition_penalty = f.repetition_penalty.unwrap_or(p.repetition_penalty);
        p.max_new_tokens = f.max_new_tokens.unwrap_or(p.max_new_tokens);
        p.min_new_tokens = f.min_new_tokens.unwrap_or(p.min_new_tokens);
        p.seed = f.seed.unwrap_or(p.seed);
        p.do_sample = f.do_sample.unwrap_or(p.do_sample);
        p.validate()
            .map_err(|e| invalid(Some(span), format!("[sampling]: {e}")))?;
    }
    let mut seen: std::collections::HashMap<Key, Action> = Default::default();
    for (action, names) in file.keys {
        let span = names.span();
        let names = match names.into_inner() {
            OneOrMany::One(n) => vec![n],
            OneOrMany::Many(ns) => ns,
        };
        let mut keys = Vec::new();
        for name in names {
            let key = Key::parse(&name)
                .map_err(|e| invalid(Some(span.clone()), format!("key \"{name}\": {e}")))?;
            if let Some(other) = seen.insert(key, action).filter(|&o| o != action) {
                return Err(invalid(
                    Some(span),
                    format!("key \"{name}\" is bound to both {other:?} and {action:?}"),
                ));
            }
            keys.push(key);
        }
        s.keys.bind(action, &keys);
    }
    Ok(s)
}

impl Settings {
    /// The system message a request carries: thinking's, the chosen one, or none (the
    /// model's).
    pub fn system_message(&self) -> Option<String> {
        if self.think {
            Some(crate::prompt::thinking::R1_SYSTEM_PROMPT.to_string())
        } else {
            self.system.clone()
        }
    }

    /// Applies command-line settings; the message names what is out of range.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), String> {
        self.params = o.sampling.apply(&self.params)?;
        if o.max_tiles == Some(0) {
            return Err("max_tiles must be at least 1".into());
        }
        self.max_tiles = o.max_tiles.or(self.max_tiles);
        self.system = o.system.clone().or(self.system.take());
        // a system message on the command line outranks the file's thinking
        self.think = o.think || (self.think && o.system.is_none());
        self.combine_images |= o.combine_images;
        self.graphics = o.graphics.unwrap_or(self.graphics);
        self.truncate_history |= o.truncate_history;
        Ok(())
    }
}

/// 1-based line of byte `pos`.
fn line_of(src: &str, pos: usize) -> usize {
    src.as_bytes()[..pos.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

    fn parse_str(src: &str) -> Result<Settings, String> {
        parse(src, Path::new("/cfg/config.toml")).map_err(|e| e.to_string())
    }

    /// `load_8bit` / `load_4bit` take `llm` or `all`; both at once, or another value, is one
    /// error naming the line.
    #[test]
    fn quantized_weights_from_the_file() {
        use crate::cli::QuantScope;
        let s = parse_str("load_4bit = \"llm\"\n").unwrap();
        assert_eq!((s.load_8bit, s.load_4bit), (None, Some(QuantScope::Llm)));
        let s = parse_str("load_8bit = \"all\"\n").unwrap();
        assert_eq!((s.load_8bit, s.load_4bit), (Some(QuantScope::All), None));
        assert_eq!(
            parse_str("theme = \"dark\"\nload_8bit = \"llm\"\nload_4bit = \"llm\"\n").unwrap_err(),
            "config /cfg/config.toml line 3: load_8bit and load_4bit cannot both be set: choose one weight precision"
        );
        assert_eq!(
            parse_str("load_4bit = \"vision\"\n").unwrap_err(),
            "config /cfg/config.toml line 1: unknown load_4bit \"vision\" (one of llm, head, all)"
        );
    }

    #[test]
    fn full_file_sets_everything() {
        let s = parse_str(
            "theme = \"light\"\nmax_tiles = 6\ncombine_images = true\nvideo_segments = 4\n\
             system = \"be brief\"\nmouse = false\ngraphics = \"sixel\"\ntruncate_history = true\ncontext = 4096\n[sampling]\ntemperature = 0\nseed = 7\n\
             [keys]\nsend = \"ctrl+s\"\nnewline = [\"enter\"]\n",
        )
        .unwrap();
        assert_eq!(s.theme.name, "light");
        assert_eq!(s.max_tiles, Some(6));
        assert_eq!(s.context, Some(4096));
        assert_eq!(s.load_8bit, None);
        assert_eq!(s.load_4bit, None);
        assert!(s.combine_images && !s.mouse && s.truncate_history);
        assert_eq!(s.graphics, GraphicsMode::Sixel);
        assert_eq!(s.video_segments, 4);
        assert_eq!(s.system.as_deref(), Some("be brief"));
        assert!(s.params.is_greedy());
        assert_eq!(s.params.seed, 7);
        assert_eq!(
            s.keys
                .action(&KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
            Some(Action::Newline)
        );
    }

    #[test]
    fn errors_name_the_file_and_line() {
        assert_eq!(
            parse_str("theme = \"dark\"\n\n[sampling]\ntempreature = 1\n").unwrap_err(),
            "config /cfg/config.toml line 4: unknown field `tempreature`, expected one of \
             `temperature`, `top_p`, `top_k`, `repetition_penalty`, `max_new_tokens`, \
             `min_new_tokens`, `seed`, `do_sample`"
        );
        assert_eq!(
            parse_str("mouse = true\ntheme = \"neon\"\n").unwrap_err(),
            "config /cfg/config.toml line 2: unknown theme \"neon\" (one of dark, light, mono)"
        );
        assert_eq!(
            parse_str("[keys]\nsend = \"ctrl+shft+s\"\n").unwrap_err(),
            "config /cfg/config.toml line 2: key \"ctrl+shft+s\": unknown modifier \"shft\""
        );
        assert_eq!(
            parse_str("[keys]\nsend = \"f5\"\nhelp = \"f5\"\n").unwrap_err(),
            "config /cfg/config.toml line 3: key \"f5\" is bound to both Send and Help"
        );
        assert_eq!(
            parse_str("mouse = true\ngraphics = \"ascii\"\n").unwrap_err(),
            "config /cfg/config.toml line 2: unknown graphics \"ascii\" \
             (one of auto, kitty, sixel, iterm2, halfblocks)"
        );
        assert_eq!(
            parse_str("max_tiles = 0\n").unwrap_err(),
            "config /cfg/config.toml line 1: max_tiles must be at least 1"
        );
        assert_eq!(
            parse_str("mouse = true\nx = [\n").unwrap_err(),
            "config /cfg/config.toml line 2: unclosed array, expected `]`"
        );
        let e = parse_str("\n[sampling]\ntop_p = 2.0\n").unwrap_err();
        assert_eq!(
            e,
            "config /cfg/config.toml line 2: [sampling]: top_p must be in (0, 1], got 2"
        );
    }

    #[test]
    fn thinking_from_the_file_and_the_command_line() {
        let path = Path::new("/cfg/config.toml");
        let s = parse("think = true\nsystem = \"be brief\"\n", path).unwrap();
        assert!(s.think);
        let r1 = crate::prompt::thinking::R1_SYSTEM_PROMPT;
        assert_eq!(s.system_message().as_deref(), Some(r1));
        // a system message on the command line outranks the file's thinking
        let mut cli_system = s.clone();
        let o = Overrides {
            system: Some("terse".into()),
            ..Default::default()
        };
        cli_system.apply(&o).unwrap();
        assert!(!cli_system.think);
        assert_eq!(cli_system.system_message().as_deref(), Some("terse"));
        let mut cli_think = Settings::default();
        let o = Overrides {
            think: true,
            ..Default::default()
        };
        cli_think.apply(&o).unwrap();
        assert_eq!(cli_think.system_message().as_deref(), Some(r1));
    }

    #[test]
    fn missing_file_is_the_defaults_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = load(&dir.path().join("config.toml")).unwrap();
        assert_eq!(s, Settings::default());
        s.apply(&Overrides {
            max_tiles: Some(2),
            sampling: crate::sampling::Overrides {
                temperature: Some(0.2),
                do_sample: Some(false),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.params.temperature, 0.2);
        assert!(!s.params.do_sample);
        assert_eq!(s.max_tiles, Some(2));
        assert_eq!(s.graphics, GraphicsMode::Auto);
        s.apply(&Overrides {
            graphics: Some(GraphicsMode::Halfblocks),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.graphics, GraphicsMode::Halfblocks);
        let bad = s.apply(&Overrides {
            sampling: crate::sampling::Overrides {
                top_p: Some(0.0),
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(bad.unwrap_err(), "top_p must be in (0, 1], got 0");
    }
}
