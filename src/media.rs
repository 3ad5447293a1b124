//! What a question carries besides its text: the [`Attachment`] every front end (command line,
//! chat, batch, server, remote worker) and the engine share, the video [`TimeRange`] with its one
//! parser, the `PATH[:N]` image form, and [`AttachmentInfo`], what a staged attachment costs.
//! The bottom floor beside `preprocess`: nothing here imports from the engine, the prompt or a
//! front end.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Most tiles of one image or video frame, and most frames sampled from one video. 128 tiles
/// of 256 tokens fill 32768 positions, the largest context window of the InternVL 2.5 family,
/// so a larger limit could never be sent; unbounded, a limit of billions would make the tile
/// search (and a frame list) run out of time or memory before anything is refused.
pub const MAX_TILES_LIMIT: usize = 128;

/// Frames sampled from a video when not told (`--segments`, `/video`, batch, `config.toml`).
pub const DEFAULT_SEGMENTS: usize = 8;

/// Tiles per video frame when not told (`--video-max-tiles`, batch, `config.toml`).
pub const DEFAULT_VIDEO_MAX_TILES: usize = 1;

/// A file attached to a question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Attachment {
    Image {
        path: PathBuf,
        /// Most tiles; `None`: the config's `max_dynamic_patch`.
        #[serde(default)]
        max_tiles: Option<usize>,
    },
    Video {
        path: PathBuf,
        segments: usize,
        /// Only sample between these seconds.
        #[serde(default)]
        bound: Option<TimeRange>,
        /// Tiles per frame.
        max_tiles: usize,
    },
}

impl Attachment {
    pub fn path(&self) -> &Path {
        match self {
            Attachment::Image { path, .. } | Attachment::Video { path, .. } => path,
        }
    }

    pub fn is_video(&self) -> bool {
        matches!(self, Attachment::Video { .. })
    }
}

/// The part of a video to sample, in seconds from its start: `START,END` with
/// `0 <= START < END`, both finite (decimals allowed, e.g. `1.5,9`). Parts past the end of the
/// clip are clamped when frames are sampled, as the model card's `get_index` does; a range
/// wholly outside the clip is refused then, naming the clip's length.
///
/// One parser ([`FromStr`]) serves `--video-bound`, the chat's `/video` and, through
/// [`TimeRange::new`], batch's `"bound": [START, END]` (and saved sessions), so all of them
/// accept and refuse the same ranges with the same words.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "(f64, f64)", into = "(f64, f64)")]
pub struct TimeRange {
    start: f64,
    end: f64,
}

/// Why a time range is refused: one line, naming the part that is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TimeRangeError {
    #[error("expected START,END in seconds, got \"{0}\" (no comma)")]
    NoComma(String),
    #[error("{part} is missing in \"{given}\" (expected START,END in seconds)")]
    Missing { part: &'static str, given: String },
    #[error("{part} \"{value}\" is not a number of seconds")]
    NotANumber { part: &'static str, value: String },
    #[error("{part} {value} is not a finite number of seconds")]
    NotFinite { part: &'static str, value: f64 },
    #[error("{part} {value} is negative (seconds count from the start of the video)")]
    Negative { part: &'static str, value: f64 },
    #[error("START {start} is not before END {end}")]
    Empty { start: f64, end: f64 },
}

impl TimeRange {
    /// Checks `start` and `end` by the rule above.
    pub fn new(start: f64, end: f64) -> Result<Self, TimeRangeError> {
        for (part, value) in [("START", start), ("END", end)] {
            if !value.is_finite() {
                return Err(TimeRangeError::NotFinite { part, value });
            }
            if value < 0.0 {
                return Err(TimeRangeError::Negative { part, value });
            }
        }
        if start >= end {
            return Err(TimeRangeError::Empty { start, end });
        }
        Ok(Self { start, end })
    }

    pub fn start(&self) -> f64 {
        self.start
    }

    pub fn end(&self) -> f64 {
        self.end
    }

    /// `(start, end)`, as the model card's `bound` argument.
    pub fn pair(&self) -> (f64, f64) {
        (self.start, self.end)
    }
}

impl TryFrom<(f64, f64)> for TimeRange {
    type Error = TimeRangeError;
    fn try_from((start, end): (f64, f64)) -> Result<Self, Self::Error> {
        Self::new(start, end)
    }
}

impl From<TimeRange> for (f64, f64) {
    fn from(r: TimeRange) -> Self {
        r.pair()
    }
}

impl FromStr for TimeRange {
    type Err = TimeRangeError;
    /// `START,END` in seconds; spaces around either number are allowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once(',')
            .ok_or_else(|| TimeRangeError::NoComma(s.to_string()))?;
        let number = |part: &'static str, text: &str| {
            let text = text.trim();
            if text.is_empty() {
                return Err(TimeRangeError::Missing {
                    part,
                    given: s.to_string(),
                });
            }
            text.parse::<f64>().map_err(|_| TimeRangeError::NotANumber {
                part,
                value: text.to_string(),
            })
        };
        Self::new(number("START", a)?, number("END", b)?)
    }
}

impl std::fmt::Display for TimeRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.start, self.end)
    }
}

/// `--image`'s `PATH` or `PATH:N` (at most N tiles, 1 to [`MAX_TILES_LIMIT`]). A tail after the
/// last `:` that is not a whole number belongs to the path (`a:b.png` is a file name).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageArg {
    pub path: PathBuf,
    pub max_tiles: Option<usize>,
}

impl FromStr for ImageArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("the path is empty".into());
        }
        if let Some((p, n)) = s.rsplit_once(':') {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                let max = n.parse::<usize>().unwrap_or(usize::MAX);
                if !(1..=MAX_TILES_LIMIT).contains(&max) {
                    return Err(format!(
                        "the tile limit after ':' must be 1 to {MAX_TILES_LIMIT}, got {n}"
                    ));
                }
                if p.is_empty() {
                    return Err(format!("no path before \":{n}\""));
                }
                return Ok(Self {
                    path: p.into(),
                    max_tiles: Some(max),
                });
            }
        }
        Ok(Self {
            path: s.into(),
            max_tiles: None,
        })
    }
}

impl From<ImageArg> for Attachment {
    fn from(a: ImageArg) -> Self {
        Attachment::Image {
            path: a.path,
            max_tiles: a.max_tiles,
        }
    }
}

/// What staging an attachment shows before anything is sent, computed in one place,
/// `preprocess::probe` (for the chat, local or remote), with the tiling the engine counts a
/// prompt with (`preprocess::placeholder_tiles`; a test holds the two equal).
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentInfo {
    /// The file's name.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Tile grid (columns, rows) of the image or of one frame.
    pub grid: (u32, u32),
    /// Tiles sent (with the thumbnail; for a video, over all frames).
    pub tiles: usize,
    /// Image tokens in the prompt.
    pub tokens: usize,
    /// Video: the clip's length in seconds, as decord counts it (frames over average fps).
    pub duration: Option<f64>,
    /// A small picture, or a video's first frame.
    pub preview: Option<image::RgbImage>,
    /// Sampled video frames (small); may be empty.
    pub frames: Vec<image::RgbImage>,
}

impl AttachmentInfo {
    /// A file's name for showing: its last component, else the whole path.
    pub fn display_name(path: &Path) -> String {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<TimeRange>().unwrap_err().to_string()
    }

    #[test]
    fn time_ranges_parse_by_one_rule() {
        let ok = |s: &str| s.parse::<TimeRange>().unwrap().pair();
        assert_eq!(ok("2,10"), (2.0, 10.0));
        assert_eq!(ok(" 1.5 , 9 "), (1.5, 9.0));
        assert_eq!(ok("0,0.001"), (0.0, 0.001));
        assert_eq!(ok("1e1,2e1"), (10.0, 20.0));
        assert_eq!(
            err("5"),
            "expected START,END in seconds, got \"5\" (no comma)"
        );
        assert_eq!(
            err("5,"),
            "END is missing in \"5,\" (expected START,END in seconds)"
        );
        assert_eq!(
            err(",5"),
            "START is missing in \",5\" (expected START,END in seconds)"
        );
        assert_eq!(err("a,5"), "START \"a\" is not a number of seconds");
        assert_eq!(err("1,2,3"), "END \"2,3\" is not a number of seconds");
        assert_eq!(err("1,5s"), "END \"5s\" is not a number of seconds");
        assert_eq!(err("nan,5"), "START NaN is not a finite number of seconds");
        assert_eq!(err("0,inf"), "END inf is not a finite number of seconds");
        assert_eq!(
            err("-1,5"),
            "START -1 is negative (seconds count from the start of the video)"
        );
        assert_eq!(err("9,1"), "START 9 is not before END 1");
        assert_eq!(err("3,3"), "START 3 is not before END 3");
        assert_eq!("2,10".parse::<TimeRange>().unwrap().to_string(), "2,10");
    }

    #[test]
    fn time_ranges_in_json_are_pairs_checked_by_the_same_rule() {
        use serde_json::{from_value, json};
        let r: TimeRange = from_value(json!([1.5, 9])).unwrap();
        assert_eq!(r.pair(), (1.5, 9.0));
        assert_eq!(serde_json::to_string(&r).unwrap(), "[1.5,9.0]");
        let e = from_value::<TimeRange>(json!([9, 1])).unwrap_err();
        assert_eq!(e.to_string(), "START 9 is not before END 1");
        let e = from_value::<TimeRange>(json!([-2, 1])).unwrap_err();
        assert!(e.to_string().starts_with("START -2 is negative"), "{e}");
        let e = from_value::<TimeRange>(json!([1])).unwrap_err();
        assert!(e.to_string().contains("invalid length 1"), "{e}");
        // an attachment keeps its JSON form (saved sessions, the protocol)
        let a = Attachment::Video {
            path: "v.mp4".into(),
            segments: 8,
            bound: Some(TimeRange::new(1.0, 2.0).unwrap()),
            max_tiles: 1,
        };
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(
            j,
            r#"{"kind":"video","path":"v.mp4","segments":8,"bound":[1.0,2.0],"max_tiles":1}"#
        );
        assert_eq!(serde_json::from_str::<Attachment>(&j).unwrap(), a);
    }

    #[test]
    fn image_args_are_a_path_and_maybe_a_tile_limit() {
        let p = |s: &str| s.parse::<ImageArg>();
        let img = |path: &str, max_tiles| {
            Ok(ImageArg {
                path: path.into(),
                max_tiles,
            })
        };
        assert_eq!(p("a.png"), img("a.png", None));
        assert_eq!(p("big.png:4"), img("big.png", Some(4)));
        assert_eq!(p("dir:x/a.png"), img("dir:x/a.png", None));
        assert_eq!(p("a.png:"), img("a.png:", None));
        assert_eq!(p("a.png:-1"), img("a.png:-1", None));
        assert_eq!(
            p("a.png:0"),
            Err("the tile limit after ':' must be 1 to 128, got 0".into())
        );
        assert_eq!(
            p("a.png:99999999999999999999999"),
            Err("the tile limit after ':' must be 1 to 128, got 99999999999999999999999".into())
        );
        assert_eq!(p(":4"), Err("no path before \":4\"".into()));
        assert_eq!(p(""), Err("the path is empty".into()));
    }
}
