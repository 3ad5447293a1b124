//! Video frames as the InternVL model card's `load_video` samples them: decord's
//! `VideoReader(path, ctx=cpu(0), num_threads=1)`, `len(vr)`, `vr.get_avg_fps()`, `get_index` and
//! `vr[i].asnumpy()`, rebuilt on FFmpeg through `ffmpeg-next`.
//!
//! What decord does (dmlc/decord `src/video/video_reader.cc`, `ffmpeg/threaded_decoder.cc`,
//! `ffmpeg/filter_graph.cc`) and this module reproduces:
//! - It opens the best video stream (`av_find_best_stream`) and, before anything else, reads every
//!   packet of that stream (`IndexKeyframes`). `len(vr)` is the number of those packets, so a
//!   Matroska file without a frame count reports its exact 310, not duration x fps (311). decord
//!   falls back to the container's count or that estimate only when there are no packets, and then
//!   has nothing to decode: here that is the zero-frames error.
//! - The packet timestamps are sorted: frame `i` is the frame with the `i`-th smallest pts, i.e.
//!   presentation order, whatever the decode order (`unordered.mov`).
//! - `get_avg_fps()` is the stream's `avg_frame_rate` as `num / den`.
//! - Rotation is applied: the stream's `rotate` tag, else the display matrix, gives an angle;
//!   90, 180 and 270 degrees put `transpose=1`, `transpose=1,transpose=1` or `transpose=2` in front
//!   of the scaler, and width and height swap for 90 and 270.
//! - Colour conversion is the libavfilter graph `[transpose,]scale=W:H` ending in rgb24. The same
//!   graph is built here, so swscale runs with the same default flags and takes the YCbCr matrix
//!   from the frame's colour tags (BT.709 for `video_90.mov`, BT.601 when untagged); the frames
//!   match the goldens bit for bit.
//!
//! Frames are decoded forward only: for each wanted frame the reader seeks to the last keyframe at
//! or before it unless the decoder is already past that keyframe, and recognises frames by their
//! pts. Streams whose packets lack distinct timestamps are decoded from the start, counting frames
//! in output order. A file is opened twice (packet index, then decoding). The first call sets
//! FFmpeg's global log level to quiet: FFmpeg logs to stderr, which the TUI owns.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Once;

use ffmpeg::{codec, decoder, filter, format, frame, media, threading, Packet, Rational};
use ffmpeg_next as ffmpeg;
use image::RgbImage;

/// What decord reports about a video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoMeta {
    /// `len(vr)`: the number of packets in the video stream.
    pub num_frames: usize,
    /// `vr.get_avg_fps()`: `avg_frame_rate` as a float (NaN or infinite when FFmpeg has none).
    pub avg_fps: f64,
    /// Width of the returned frames, after rotation.
    pub width: u32,
    /// Height of the returned frames, after rotation.
    pub height: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("video file not found: {}", path.display())]
    NotFound { path: PathBuf },
    #[error("video {} is an empty file", path.display())]
    Empty { path: PathBuf },
    #[error("{} is a directory, not a video file", path.display())]
    IsDirectory { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {}: its path is not valid utf-8 without nul bytes", path.display())]
    UnsupportedPath { path: PathBuf },
    #[error("cannot open {} as a video: {source}", path.display())]
    Open {
        path: PathBuf,
        source: ffmpeg::Error,
    },
    #[error("video {} ends before its first frame (no frames)", path.display())]
    EndsBeforeFrames { path: PathBuf },
    #[error("{} has no video stream", path.display())]
    NoVideoStream { path: PathBuf },
    #[error("cannot set up a decoder for the video stream of {}: {source}", path.display())]
    Decoder {
        path: PathBuf,
        source: ffmpeg::Error,
    },
    #[error("cannot read the packets of {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: ffmpeg::Error,
    },
    #[error("{} has a video stream with zero frames", path.display())]
    NoFrames { path: PathBuf },
    #[error("frame {frame} is out of range for {}, which has {num_frames} frames", path.display())]
    FrameOutOfRange {
        path: PathBuf,
        frame: usize,
        num_frames: usize,
    },
    #[error("cannot decode frame {frame} of {}: {source}", path.display())]
    Decode {
        path: PathBuf,
        frame: usize,
        source: ffmpeg::Error,
    },
    #[error("decoding {} produced no frame {frame} (the stream lists {num_frames} frames)", path.display())]
    MissingFrame {
        path: PathBuf,
        frame: usize,
        num_frames: usize,
    },
    #[error(
        "time bound {start}s..{end}s lies outside {}, which lasts {duration:.3}s ({num_frames} frames at {fps} fps)",
        path.display()
    )]
    BoundOutsideClip {
        path: PathBuf,
        start: f64,
        end: f64,
        duration: f64,
        num_frames: usize,
        fps: f64,
    },
    #[error("cannot sample frames of {}: its average frame rate is {fps}", path.display())]
    UnknownFrameRate { path: PathBuf, fps: f64 },
    #[error("cannot sample frames of {}: num_segments must be at least 1", path.display())]
    NoSegments { path: PathBuf },
}

/// Frame count, average fps and frame size, as decord reports them.
pub fn probe(path: &Path) -> Result<VideoMeta, VideoError> {
    Ok(Reader::open(path)?.meta)
}

/// The model card's `get_index`, number for number.
///
/// Python's `round` and `np.round` round half to even, as `round_ties_even` does; `int()` truncates
/// toward zero. When `round(start * fps)` (raised to `first_idx`) exceeds
/// `min(round(end * fps), max_frame)`, the reference's segment size is negative and it yields
/// positions outside `[0, max_frame]` (negative ones index from the end in decord); here
/// negative positions become 0. `num_segments == 0` (a ZeroDivisionError in Python) gives no
/// indices. [`sample_indices`] rejects all of these inputs with an error instead.
pub fn frame_indices(
    bound: Option<(f64, f64)>,
    fps: f64,
    max_frame: usize,
    first_idx: usize,
    num_segments: usize,
) -> Vec<usize> {
    let (start_idx, end_idx) = index_range(bound, fps, max_frame, first_idx);
    if num_segments == 0 {
        return Vec::new();
    }
    let seg_size = end_idx.saturating_sub(start_idx) as f64 / num_segments as f64;
    (0..num_segments)
        .map(|idx| {
            let pos = start_idx as f64 + seg_size / 2.0 + (seg_size * idx as f64).round_ties_even();
            // `as` truncates toward zero like `int()` and saturates negatives to 0.
            pos as usize
        })
        .collect()
}

/// `(start_idx, end_idx)` of `get_index`; the default bound is the reference's +-100000 seconds.
fn index_range(
    bound: Option<(f64, f64)>,
    fps: f64,
    max_frame: usize,
    first_idx: usize,
) -> (i64, i64) {
    let (start, end) = bound.unwrap_or((-100_000.0, 100_000.0));
    let start_idx = (first_idx as i64).max((start * fps).round_ties_even() as i64);
    let end_idx = ((end * fps).round_ties_even() as i64).min(max_frame as i64);
    (start_idx, end_idx)
}

/// [`frame_indices`] for `load_video` (`first_idx` 0), refusing what the reference cannot sample:
/// `num_segments` 0, a non-finite fps, and a bound whose frame range is empty, i.e. one that lies
/// outside the clip (parts outside are clamped, as in the reference). `path` names the file in
/// errors.
pub fn sample_indices(
    path: &Path,
    meta: &VideoMeta,
    bound: Option<(f64, f64)>,
    num_segments: usize,
) -> Result<Vec<usize>, VideoError> {
    let path = path.to_path_buf();
    if num_segments == 0 {
        return Err(VideoError::NoSegments { path });
    }
    let fps = meta.avg_fps;
    if !fps.is_finite() {
        return Err(VideoError::UnknownFrameRate { path, fps });
    }
    let max_frame = meta
        .num_frames
        .checked_sub(1)
        .ok_or(VideoError::NoFrames { path: path.clone() })?;
    if let Some((start, end)) = bound {
        let (start_idx, end_idx) = index_range(bound, fps, max_frame, 0);
        if !start.is_finite() || !end.is_finite() || start_idx > end_idx {
            return Err(VideoError::BoundOutsideClip {
                path,
                start,
                end,
                duration: meta.num_frames as f64 / fps,
                num_frames: meta.num_frames,
                fps,
            });
        }
    }
    Ok(frame_indices(bound, fps, max_frame, 0, num_segments))
}

/// The RGB frames decord returns for `indices` (in that order, repeats allowed).
pub fn load_frames(path: &Path, indices: &[usize]) -> Result<Vec<RgbImage>, VideoError> {
    Reader::open(path)?.frames(indices, true)
}

/// `load_video` of the model card up to the PIL images: metadata, sampled indices and frames.
pub fn load_video(
    path: &Path,
    bound: Option<(f64, f64)>,
    num_segments: usize,
) -> Result<(VideoMeta, Vec<usize>, Vec<RgbImage>), VideoError> {
    let reader = Reader::open(path)?;
    let indices = sample_indices(path, &reader.meta, bound, num_segments)?;
    let frames = reader.frames(&indices, true)?;
    Ok((reader.meta, indices, frames))
}

/// An opened video: its best video stream and decord's frame table.
struct Reader {
    path: PathBuf,
    time_base: Rational,
    rotation: u32,
    meta: VideoMeta,
    /// pts of every frame in presentation order (packet timestamps, sorted).
    frame_pts: Vec<i64>,
    /// pts of the keyframe packets, sorted.
    key_pts: Vec<i64>,
    /// Every packet has a pts and no two share one, so frames can be recognised by pts.
    by_pts: bool,
}

impl Reader {
    fn open(path: &Path) -> Result<Self, VideoError> {
        let (mut input, stream, decoder) = open_stream(path)?;
        let (time_base, avg_rate, rotation) = {
            let st = input.stream(stream).expect("best stream index is valid");
            (st.time_base(), st.avg_frame_rate(), rotation(&st))
        };
        let (mut frame_pts, mut key_pts, mut packets, mut by_pts) =
            (Vec::new(), Vec::new(), 0, true);
        let mut packet = Packet::empty();
        while read_packet(&mut input, &mut packet).map_err(|source| VideoError::Read {
            path: path.to_path_buf(),
            source,
        })? {
            if packet.stream() != stream {
                continue;
            }
            packets += 1;
            match packet.pts() {
                Some(pts) => {
                    frame_pts.push(pts);
                    if packet.is_key() {
                        key_pts.push(pts);
                    }
                }
                None => by_pts = false,
            }
        }
        if packets == 0 {
            return Err(VideoError::NoFrames {
                path: path.to_path_buf(),
            });
        }
        frame_pts.sort_unstable();
        key_pts.sort_unstable();
        by_pts &= frame_pts.windows(2).all(|w| w[0] < w[1]);
        let (width, height) = match rotation {
            90 | 270 => (decoder.height(), decoder.width()),
            _ => (decoder.width(), decoder.height()),
        };
        Ok(Self {
            path: path.to_path_buf(),
            time_base,
            rotation,
            meta: VideoMeta {
                num_frames: packets,
                avg_fps: f64::from(avg_rate.numerator()) / f64::from(avg_rate.denominator()),
                width,
                height,
            },
            frame_pts,
            key_pts,
            by_pts,
        })
    }

    /// Decodes the frames at `indices`; `seek` false decodes from the start without seeking.
    fn frames(&self, indices: &[usize], seek: bool) -> Result<Vec<RgbImage>, VideoError> {
        let num_frames = self.meta.num_frames;
        if let Some(&frame) = indices.iter().find(|&&i| i >= num_frames) {
            return Err(VideoError::FrameOutOfRange {
                path: self.path.clone(),
                frame,
                num_frames,
            });
        }
        let wanted: BTreeSet<usize> = indices.iter().copied().collect();
        let mut got = self.decode(&wanted, seek && self.by_pts)?;
        if got.len() < wanted.len() && seek && self.by_pts {
            // A seek landed past its keyframe; decode once more from the start.
            got = self.decode(&wanted, false)?;
        }
        indices
            .iter()
            .map(|i| {
                got.get(i).cloned().ok_or(VideoError::MissingFrame {
                    path: self.path.clone(),
                    frame: *i,
                    num_frames,
                })
            })
            .collect()
    }

    /// Decodes forward through the file and keeps the `wanted` frames. Stops at the first frame it
    /// cannot produce, returning what it has.
    fn decode(
        &self,
        wanted: &BTreeSet<usize>,
        seek: bool,
    ) -> Result<BTreeMap<usize, RgbImage>, VideoError> {
        let (input, stream, decoder) = open_stream(&self.path)?;
        let mut cursor = Cursor {
            input,
            stream,
            decoder,
        };
        let mut converter: Option<Converter> = None;
        let mut got = BTreeMap::new();
        // pts of the newest frame decoded or keyframe sought to; frames before it need no seek.
        let mut reach = i64::MIN;
        let mut output_count = 0usize;
        for &want in wanted {
            if seek {
                let target = self.frame_pts[want];
                let keys_before = self.key_pts.partition_point(|&k| k <= target);
                if let Some(&key) = keys_before.checked_sub(1).and_then(|k| self.key_pts.get(k)) {
                    if key > reach && cursor.seek(key) {
                        reach = key;
                    }
                }
            }
            loop {
                let Some(mut frame) = cursor.next().map_err(self.decode_error(want))? else {
                    return Ok(got);
                };
                let pos = if self.by_pts {
                    let Some(pos) = frame
                        .timestamp()
                        .and_then(|t| self.frame_pts.binary_search(&t).ok())
                    else {
                        continue;
                    };
                    reach = reach.max(self.frame_pts[pos]);
                    pos
                } else {
                    output_count += 1;
                    output_count - 1
                };
                if pos > want {
                    return Ok(got);
                }
                // Frames already taken may come again after a seek (leading frames of an open GOP).
                if wanted.contains(&pos) && !got.contains_key(&pos) {
                    let conv = match &mut converter {
                        Some(conv) => conv,
                        None => converter.insert(
                            Converter::new(&frame, self.time_base, self.rotation, &self.meta)
                                .map_err(self.decode_error(pos))?,
                        ),
                    };
                    got.insert(
                        pos,
                        conv.convert(&mut frame).map_err(self.decode_error(pos))?,
                    );
                }
                if pos == want {
                    break;
                }
            }
        }
        Ok(got)
    }

    fn decode_error(&self, frame: usize) -> impl FnOnce(ffmpeg::Error) -> VideoError + '_ {
        move |source| VideoError::Decode {
            path: self.path.clone(),
            frame,
            source,
        }
    }
}

/// Opens `path` and a single-threaded decoder for its best video stream, as decord does.
fn open_stream(path: &Path) -> Result<(format::context::Input, usize, decoder::Video), VideoError> {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Quiet FFmpeg before it logs anything (it writes to stderr, which the TUI owns).
        ffmpeg::log::set_level(ffmpeg::log::Level::Quiet);
        ffmpeg::init().expect("ffmpeg-next's init only registers error strings and devices");
    });
    let owned = || path.to_path_buf();
    // only regular files: FFmpeg would wait forever on a FIFO and read a device without end
    match crate::files::regular(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VideoError::NotFound { path: owned() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {
            return Err(VideoError::IsDirectory { path: owned() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VideoError::NotFound { path: owned() })
        }
        Err(source) => {
            return Err(VideoError::Io {
                path: owned(),
                source,
            })
        }
        Ok(m) if m.is_dir() => return Err(VideoError::IsDirectory { path: owned() }),
        Ok(m) if m.is_file() && m.len() == 0 => return Err(VideoError::Empty { path: owned() }),
        Ok(_) => {}
    }
    // ffmpeg-next panics on non-utf-8 paths and nul bytes; `file:` keeps FFmpeg from reading a
    // local name such as `http:x` as a network protocol.
    let url = match path.to_str() {
        Some(s) if !s.contains('\0') => format!("file:{s}"),
        _ => return Err(VideoError::UnsupportedPath { path: owned() }),
    };
    let input = format::input(&url).map_err(|source| match source {
        ffmpeg::Error::Eof => VideoError::EndsBeforeFrames { path: owned() },
        source => VideoError::Open {
            path: owned(),
            source,
        },
    })?;
    let st = input
        .streams()
        .best(media::Type::Video)
        .ok_or(VideoError::NoVideoStream { path: owned() })?;
    let decoder_err = |source| VideoError::Decoder {
        path: owned(),
        source,
    };
    let mut ctx = codec::Context::from_parameters(st.parameters()).map_err(decoder_err)?;
    ctx.set_threading(threading::Config::count(1));
    let decoder = ctx.decoder().video().map_err(decoder_err)?;
    let stream = st.index();
    Ok((input, stream, decoder))
}

/// Reads the next packet; false at the end of the file.
fn read_packet(
    input: &mut format::context::Input,
    packet: &mut Packet,
) -> Result<bool, ffmpeg::Error> {
    loop {
        // `Packet::read` is a bare av_read_frame, which overwrites the packet without releasing
        // the buffer it holds: drop the previous one first, or every packet of the file leaks
        *packet = Packet::empty();
        match packet.read(input) {
            Ok(()) => return Ok(true),
            Err(ffmpeg::Error::Eof) => return Ok(false),
            Err(ffmpeg::Error::Other {
                errno: ffmpeg::error::EAGAIN,
            }) => {}
            Err(e) => return Err(e),
        }
    }
}

/// decord's rotation: the `rotate` tag if set and non-zero, else minus the display matrix angle,
/// taken modulo 360 and truncated to whole degrees; only 90, 180 and 270 are applied.
fn rotation(stream: &ffmpeg::Stream) -> u32 {
    let tag = stream
        .metadata()
        .get("rotate")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|&theta| theta != 0.0);
    let theta = tag.or_else(|| {
        stream
            .side_data()
            .find(|sd| {
                sd.kind() == codec::packet::side_data::Type::DisplayMatrix && sd.data().len() >= 36
            })
            // SAFETY: the side data is a 3x3 i32 matrix (36 bytes, checked) in an av_malloc'd,
            // suitably aligned buffer that outlives the call.
            .map(|sd| -unsafe { ffmpeg::ffi::av_display_rotation_get(sd.data().as_ptr().cast()) })
    });
    match theta.unwrap_or(0.0).rem_euclid(360.0) as u32 {
        r @ (90 | 180 | 270) => r,
        _ => 0,
    }
}

/// Packets in, frames out, forward only.
struct Cursor {
    input: format::context::Input,
    stream: usize,
    decoder: decoder::Video,
}

impl Cursor {
    /// The next frame in output order, or `None` once the decoder is drained.
    fn next(&mut self) -> Result<Option<frame::Video>, ffmpeg::Error> {
        let mut frame = frame::Video::empty();
        let mut packet = Packet::empty();
        loop {
            match self.decoder.receive_frame(&mut frame) {
                Ok(()) => return Ok(Some(frame)),
                Err(ffmpeg::Error::Eof) => return Ok(None),
                Err(ffmpeg::Error::Other {
                    errno: ffmpeg::error::EAGAIN,
                }) => {}
                Err(e) => return Err(e),
            }
            if read_packet(&mut self.input, &mut packet)? {
                if packet.stream() == self.stream {
                    self.decoder.send_packet(&packet)?;
                }
            } else {
                self.decoder.send_eof()?;
            }
        }
    }

    /// Seeks to the keyframe with pts `key`; false (and nothing changed) when the container
    /// refuses, in which case decoding simply goes on from where it is.
    fn seek(&mut self, key: i64) -> bool {
        // SAFETY: a valid, open format context and a stream index taken from it.
        let ret = unsafe {
            ffmpeg::ffi::av_seek_frame(
                self.input.as_mut_ptr(),
                self.stream as i32,
                key,
                ffmpeg::ffi::AVSEEK_FLAG_BACKWARD,
            )
        };
        if ret >= 0 {
            self.decoder.flush();
        }
        ret >= 0
    }
}

/// decord's filter graph: `buffer -> [transpose,]scale=W:H -> rgb24 -> buffersink`.
struct Converter {
    graph: filter::Graph,
}

impl Converter {
    fn new(
        first: &frame::Video,
        time_base: Rational,
        rotation: u32,
        meta: &VideoMeta,
    ) -> Result<Self, ffmpeg::Error> {
        let pix_fmt = first
            .format()
            .descriptor()
            .ok_or(ffmpeg::Error::InvalidData)?
            .name();
        let args = format!(
            "video_size={}x{}:pix_fmt={pix_fmt}:time_base={}/{}:pixel_aspect=1/1",
            first.width(),
            first.height(),
            time_base.numerator(),
            time_base.denominator()
        );
        let mut graph = filter::Graph::new();
        let find = |name| filter::find(name).ok_or(ffmpeg::Error::FilterNotFound);
        graph.add(&find("buffer")?, "in", &args)?;
        graph.add(&find("buffersink")?, "out", "")?;
        let transpose = match rotation {
            90 => "transpose=1,",
            180 => "transpose=1,transpose=1,",
            270 => "transpose=2,",
            _ => "",
        };
        let spec = format!(
            "{transpose}scale={}:{},format=rgb24",
            meta.width, meta.height
        );
        graph.output("in", 0)?.input("out", 0)?.parse(&spec)?;
        graph.validate()?;
        Ok(Self { graph })
    }

    /// Converts `frame` (its buffers move into the graph).
    fn convert(&mut self, frame: &mut frame::Video) -> Result<RgbImage, ffmpeg::Error> {
        self.graph
            .get("in")
            .expect("graph has a buffer source")
            .source()
            .add(frame)?;
        let mut out = frame::Video::empty();
        self.graph
            .get("out")
            .expect("graph has a buffer sink")
            .sink()
            .frame(&mut out)?;
        let (width, height) = (out.width(), out.height());
        let row = width as usize * 3;
        let mut rgb = Vec::with_capacity(row * height as usize);
        for line in out.data(0).chunks(out.stride(0)).take(height as usize) {
            rgb.extend_from_slice(&line[..row]);
        }
        Ok(RgbImage::from_raw(width, height, rgb)
            .expect("an rgb24 frame holds width * height * 3 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    fn video(name: &str) -> PathBuf {
        fixture(&format!("media/videos/{name}"))
    }

    /// Mean absolute difference and largest difference of two equally sized byte buffers.
    fn diff(a: &[u8], b: &[u8]) -> (f64, u8) {
        assert_eq!(a.len(), b.len());
        let sum: u64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| u64::from(x.abs_diff(*y)))
            .sum();
        let max = a
            .iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        (sum as f64 / a.len() as f64, max)
    }

    fn check_golden(video_name: &str, num_segments: usize) {
        let stem = format!("golden/preprocess/{video_name}.seg{num_segments}");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("{stem}.json"))).unwrap(),
        )
        .unwrap();
        let bytes = std::fs::read(fixture(&format!("{stem}.safetensors"))).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let golden = tensors.tensor("frames_u8").unwrap();

        let (meta, indices, frames) = load_video(&video(video_name), None, num_segments).unwrap();
        assert_eq!(meta.num_frames as u64, json["num_frames"].as_u64().unwrap());
        assert_eq!(meta.avg_fps, json["avg_fps"].as_f64().unwrap());
        let want: Vec<usize> = json["frame_indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(indices, want);
        let shape = golden.shape();
        assert_eq!(
            shape,
            [frames.len(), meta.height as usize, meta.width as usize, 3]
        );
        let frame_len = shape[1] * shape[2] * 3;
        for ((frame, gold), idx) in frames
            .iter()
            .zip(golden.data().chunks(frame_len))
            .zip(&indices)
        {
            assert_eq!((frame.width(), frame.height()), (meta.width, meta.height));
            let (mad, max) = diff(frame.as_raw(), gold);
            eprintln!("{video_name} frame {idx}: mean abs diff {mad:.4}, max {max}");
            assert!(
                mad <= 2.0,
                "{video_name} frame {idx}: mean abs diff {mad} > 2"
            );
        }
    }

    #[test]
    fn pancake_matches_decord_golden() {
        // No frame count in the Matroska container: 310 packets, not duration x fps (311).
        check_golden("flipping_a_pancake.mkv", 8);
    }

    #[test]
    fn rotated_mov_matches_decord_golden() {
        // Coded 568x320 with a 90 degree display matrix: decord returns 320x568 frames.
        check_golden("video_90.mov", 4);
    }

    #[test]
    fn get_index_without_bound() {
        // 310 frames: seg_size 309/8 = 38.625, first position 19.3125; round(77.25) = 77.
        assert_eq!(
            frame_indices(None, 30.0, 309, 0, 8),
            [19, 58, 96, 135, 173, 212, 251, 289]
        );
        // 3 frames, 4 segments: seg_size 0.5, offsets round(0, 0.5, 1, 1.5) = 0, 0, 1, 2 (half to even).
        assert_eq!(frame_indices(None, 30.0, 2, 0, 4), [0, 0, 1, 2]);
        // seg_size 2.5: offsets round(0, 2.5, 5, 7.5) = 0, 2, 5, 8 on top of 1.25.
        assert_eq!(frame_indices(None, 1.0, 10, 0, 4), [1, 3, 6, 9]);
        // first_idx raises the start: 5..10, seg_size 1.25, positions 5.625 + round(0, 1.25, 2.5, 3.75).
        assert_eq!(frame_indices(None, 1.0, 10, 5, 4), [5, 6, 7, 9]);
        assert!(frame_indices(None, 30.0, 309, 0, 0).is_empty());
    }

    #[test]
    fn get_index_with_bound() {
        // 1 s..3 s at 30 fps: frames 30..90, seg_size 15, positions 37.5 + 0, 15, 30, 45.
        assert_eq!(
            frame_indices(Some((1.0, 3.0)), 30.0, 309, 0, 4),
            [37, 52, 67, 82]
        );
        // round(2.5) = 2 and round(12.5) = 12 (half to even): seg_size 2, positions 3, 5, 7, 9, 11.
        assert_eq!(
            frame_indices(Some((0.25, 1.25)), 10.0, 100, 0, 5),
            [3, 5, 7, 9, 11]
        );
        // The end is clamped to the last frame: 270..309, seg_size 13, positions 276.5 + 0, 13, 26.
        assert_eq!(
            frame_indices(Some((9.0, 20.0)), 30.0, 309, 0, 3),
            [276, 289, 302]
        );
        // A start before the clip is clamped to 0, as the reference's default bound is.
        assert_eq!(frame_indices(Some((-1.0, 1.0)), 10.0, 100, 0, 2), [2, 7]);
        // Inverted: 5..-20, seg_size -12.5; the reference gives int(-1.25) = -1 and
        // int(-1.25 + round(-12.5)) = -13, which become 0.
        assert_eq!(frame_indices(Some((0.5, -2.0)), 10.0, 100, 0, 2), [0, 0]);
        // Backwards but in range, as in the reference: 30..10, positions 25 and 15.
        assert_eq!(frame_indices(Some((3.0, 1.0)), 10.0, 100, 0, 2), [25, 15]);
        assert_eq!(
            frame_indices(Some((0.5, f64::NEG_INFINITY)), 10.0, 100, 0, 1),
            [0]
        );
    }

    #[test]
    fn sample_indices_rejects_what_the_reference_cannot_sample() {
        let path = Path::new("clip.mkv");
        let meta = VideoMeta {
            num_frames: 310,
            avg_fps: 30.0,
            width: 426,
            height: 240,
        };
        assert_eq!(
            sample_indices(path, &meta, Some((1.0, 3.0)), 4).unwrap(),
            [37, 52, 67, 82]
        );
        let err = sample_indices(path, &meta, Some((12.0, 15.0)), 8).unwrap_err();
        assert!(matches!(err, VideoError::BoundOutsideClip { .. }));
        assert_eq!(
            err.to_string(),
            "time bound 12s..15s lies outside clip.mkv, which lasts 10.333s (310 frames at 30 fps)"
        );
        // 10.33 s is frame 310 (past the last one); an inverted bound and one before 0 are empty.
        for bound in [(10.33, 11.0), (3.0, 1.0), (-5.0, -1.0), (f64::NAN, 1.0)] {
            let err = sample_indices(path, &meta, Some(bound), 8).unwrap_err();
            assert!(
                matches!(err, VideoError::BoundOutsideClip { .. }),
                "{bound:?}: {err}"
            );
        }
        let err = sample_indices(path, &meta, None, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot sample frames of clip.mkv: num_segments must be at least 1"
        );
        let no_rate = VideoMeta {
            avg_fps: f64::NAN,
            ..meta
        };
        let err = sample_indices(path, &no_rate, None, 8).unwrap_err();
        assert!(matches!(err, VideoError::UnknownFrameRate { .. }));
    }

    #[test]
    fn unordered_mov_gives_frames_in_presentation_order() {
        let path = video("unordered.mov");
        let reader = Reader::open(&path).unwrap();
        assert_eq!(reader.meta.num_frames, 4);
        assert_eq!(reader.meta.avg_fps, 32.0);
        // Packets come in decode order; decord's frames are sorted by pts.
        let (mut input, stream, _) = open_stream(&path).unwrap();
        let mut packet_pts = Vec::new();
        let mut packet = Packet::empty();
        while read_packet(&mut input, &mut packet).unwrap() {
            if packet.stream() == stream {
                packet_pts.push(packet.pts().unwrap());
            }
        }
        assert_eq!(packet_pts, [0, 1536, 512, 1024]);
        assert_eq!(reader.frame_pts, [0, 512, 1024, 1536]);
        assert!(reader.by_pts);
        // The decoder emits frames in presentation order, so frame i is the i-th output.
        let (input, stream, decoder) = open_stream(&path).unwrap();
        let mut cursor = Cursor {
            input,
            stream,
            decoder,
        };
        let mut output_pts = Vec::new();
        while let Some(frame) = cursor.next().unwrap() {
            output_pts.push(frame.timestamp().unwrap());
        }
        assert_eq!(output_pts, reader.frame_pts);
        // Frames found by pts and frames counted in output order agree, in any request order.
        let by_pts = load_frames(&path, &[3, 0, 2, 1, 3]).unwrap();
        let counted = Reader {
            by_pts: false,
            ..reader
        }
        .frames(&[3, 0, 2, 1, 3], false)
        .unwrap();
        assert_eq!(by_pts.len(), 5);
        assert_eq!(by_pts, counted);
        assert!(by_pts.iter().all(|f| f.dimensions() == (50, 50)));
    }

    #[test]
    fn seeking_gives_the_frames_decoding_from_the_start_gives() {
        let reader = Reader::open(&video("flipping_a_pancake.mkv")).unwrap();
        assert!(
            reader.key_pts.len() > 1,
            "needs several keyframes to exercise seeking"
        );
        let indices = [305, 5, 151, 160, 149, 300, 5];
        let sought = reader.frames(&indices, true).unwrap();
        let sequential = reader.frames(&indices, false).unwrap();
        assert_eq!(sought.len(), indices.len());
        assert_eq!(sought, sequential);
        assert_ne!(sought[0], sought[1]);
    }

    #[test]
    fn corrupted_file_is_an_error() {
        let path = video("corrupted.mp4");
        // The container is intact (decord opens it too); a packet in the middle is broken.
        let meta = probe(&path).unwrap();
        assert_eq!((meta.num_frames, meta.avg_fps), (50, 10.0));
        let err = load_video(&path, None, 8).unwrap_err();
        assert!(matches!(err, VideoError::Decode { frame: 34, .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("cannot decode frame 34 of {}", path.display())));
    }

    #[test]
    fn bad_paths_are_errors() {
        let missing = Path::new("/nonexistent/clip.mp4");
        let err = probe(missing).unwrap_err();
        assert!(matches!(err, VideoError::NotFound { .. }));
        assert_eq!(
            err.to_string(),
            "video file not found: /nonexistent/clip.mp4"
        );
        assert!(matches!(
            load_video(missing, None, 8),
            Err(VideoError::NotFound { .. })
        ));

        let dir = fixture("media/videos");
        assert!(matches!(probe(&dir), Err(VideoError::IsDirectory { .. })));

        let err = load_frames(&video("video_90.mov"), &[0, 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "frame 3 is out of range for {}, which has 3 frames",
                video("video_90.mov").display()
            )
        );
    }

    #[test]
    fn a_video_stream_without_frames_and_an_empty_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        // AVI keeps the stream: decord would count zero frames and have nothing to decode
        let avi = dir.path().join("no-frames.avi");
        crate::testutil::write_video_without_frames(&avi);
        let (input, _, decoder) = open_stream(&avi).unwrap();
        assert_eq!((decoder.width(), decoder.height()), (16, 16));
        drop(input);
        let err = load_video(&avi, None, 8).unwrap_err();
        assert!(matches!(err, VideoError::NoFrames { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("{} has a video stream with zero frames", avi.display())
        );
        // Matroska: FFmpeg reaches the end of the file while probing the stream
        let mkv = dir.path().join("no-frames.mkv");
        crate::testutil::write_video_without_frames(&mkv);
        assert_eq!(
            probe(&mkv).unwrap_err().to_string(),
            format!(
                "video {} ends before its first frame (no frames)",
                mkv.display()
            )
        );
        // MP4: the demuxer drops a track without samples
        let mp4 = dir.path().join("no-frames.mp4");
        crate::testutil::write_video_without_frames(&mp4);
        assert!(matches!(probe(&mp4), Err(VideoError::NoVideoStream { .. })));
        let empty = dir.path().join("empty.mp4");
        std::fs::write(&empty, b"").unwrap();
        let err = probe(&empty).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("video {} is an empty file", empty.display())
        );
    }

    #[test]
    fn files_without_video_are_errors() {
        let dir = std::env::temp_dir().join(format!("internvl-video-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.mp4");
        std::fs::write(&text, "these are meeting notes, not a video\n".repeat(20)).unwrap();
        let err = probe(&text).unwrap_err();
        assert!(matches!(err, VideoError::Open { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("cannot open {} as a video: ", text.display())));

        // A valid WAV file (mono, 8 kHz, 16-bit, 800 samples of silence): audio only.
        let samples = 800u32 * 2;
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF");
        wav.extend_from_slice(&(36 + samples).to_le_bytes());
        wav.extend_from_slice(b"WAVEfmt ");
        for v in [16u32, 1 | (1 << 16), 8000, 16000, 2 | (16 << 16)] {
            wav.extend_from_slice(&v.to_le_bytes());
        }
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&samples.to_le_bytes());
        wav.resize(wav.len() + samples as usize, 0);
        let audio = dir.join("sound.wav");
        std::fs::write(&audio, wav).unwrap();
        let err = probe(&audio).unwrap_err();
        assert!(matches!(err, VideoError::NoVideoStream { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
