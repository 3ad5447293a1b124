//! Issue #7, bad input: every bad attachment, model folder and request the issue lists, through
//! the real binary as a script runs it: one line on stderr naming the file (or field) and the
//! problem, exit code 1 (2 for a flag out of range), never a panic.
mod common;
use common::*;
use image::{DynamicImage, Rgb, RgbImage};
use internvl_chat::testutil::fixture;
use serde_json::{json, Value};
use std::path::Path;

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// CRC-32 of PNG chunks, to forge a header.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn one_shot(extra: &[&str]) -> std::process::Output {
    let m = model("tiny-qwen2");
    run(&greedy(&m, "4", extra), None)
}

#[test]
fn every_bad_attachment_gives_one_line_naming_the_file() {
    let d = tempdir("att");
    let dir = d.path();
    let p = |name: &str| dir.join(name).display().to_string();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    std::fs::write(dir.join("empty.mp4"), b"").unwrap();
    std::fs::write(dir.join("notes.jpg"), "meeting notes, not a photo\n").unwrap();
    let jpeg = std::fs::read(fixture("media/images/image1.jpg")).unwrap();
    std::fs::write(dir.join("cut.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let png_bytes = std::fs::read(fixture("media/images/benchmark.png")).unwrap();
    std::fs::write(dir.join("cut.png"), &png_bytes[..png_bytes.len() / 2]).unwrap();
    // a valid 1x1 PNG whose header claims 50000x50000: refused before any pixel is allocated
    let mut bomb = png(&RgbImage::new(1, 1));
    bomb[16..24].copy_from_slice(&[0, 0, 0xc3, 0x50, 0, 0, 0xc3, 0x50]);
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(dir.join("bomb.png"), &bomb).unwrap();
    // audio only: a WAV of silence
    let samples = 1600u32;
    let mut wav = b"RIFF".to_vec();
    wav.extend_from_slice(&(36 + samples).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    for v in [16u32, 1 | (1 << 16), 8000, 16000, 2 | (16 << 16)] {
        wav.extend_from_slice(&v.to_le_bytes());
    }
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&samples.to_le_bytes());
    wav.resize(wav.len() + samples as usize, 0);
    std::fs::write(dir.join("sound.wav"), wav).unwrap();
    internvl_chat::testutil::write_video_without_frames(&dir.join("no-frames.avi"));
    std::fs::create_dir(dir.join("clips.mp4")).unwrap();

    let pancake = media("videos/flipping_a_pancake.mkv");
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec!["--image".into(), "/no/such/file.jpg".into()],
            vec!["/no/such/file.jpg".into(), "No such file".into()],
        ),
        (
            vec!["--video".into(), "/no/such/clip.mp4".into()],
            vec!["/no/such/clip.mp4".into(), "No such file".into()],
        ),
        (
            vec!["--image".into(), p("")],
            vec![dir.display().to_string(), "directory".into()],
        ),
        (
            vec!["--video".into(), p("clips.mp4")],
            vec![p("clips.mp4"), "is a directory".into()],
        ),
        (
            vec!["--image".into(), p("empty.png")],
            vec![p("empty.png"), "is an empty file".into()],
        ),
        (
            vec!["--video".into(), p("empty.mp4")],
            vec![p("empty.mp4"), "is an empty file".into()],
        ),
        (
            vec!["--image".into(), p("cut.jpg")],
            vec![p("cut.jpg"), "truncated or corrupt".into()],
        ),
        (
            vec!["--image".into(), p("cut.png")],
            vec![p("cut.png"), "truncated or corrupt".into()],
        ),
        (
            vec!["--image".into(), p("notes.jpg")],
            vec![p("notes.jpg"), "not an image".into()],
        ),
        (
            vec!["--image".into(), p("bomb.png")],
            vec![p("bomb.png"), "50000x50000 exceeds 178956970 pixels".into()],
        ),
        (
            vec![
                "--video".into(),
                media("videos/corrupted.mp4"),
                "--segments".into(),
                "8".into(),
            ],
            vec!["cannot decode frame 34 of".into(), "corrupted.mp4".into()],
        ),
        (
            vec!["--video".into(), p("sound.wav")],
            vec![p("sound.wav"), "has no video stream".into()],
        ),
        (
            vec!["--video".into(), p("no-frames.avi")],
            vec![p("no-frames.avi"), "zero frames".into()],
        ),
        (
            vec![
                "--video".into(),
                pancake.clone(),
                "--video-bound".into(),
                "100,200".into(),
            ],
            vec![
                "time bound 100s..200s lies outside".into(),
                pancake.clone(),
                "lasts 10.333s".into(),
            ],
        ),
    ];
    for (args, want) in cases {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["--prompt", "What is this?"]);
        let o = one_shot(&a);
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_one_line_error(&o, &want);
        assert!(stdout(&o).is_empty(), "{args:?}: no answer");
    }
}

#[test]
fn flags_out_of_range_are_usage_errors() {
    let m = model("tiny-qwen2");
    let v = media("videos/video_90.mov");
    for (flag, value) in [
        ("--segments", "0"),
        ("--segments", "1000000000"),
        ("--max-tiles", "0"),
        ("--max-tiles", "129"),
        ("--video-max-tiles", "4096"),
    ] {
        let o = run(
            &["--model", &m, "--video", &v, flag, value, "--prompt", "hi"],
            None,
        );
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
    }
    // typed values: clap names the flag and says what is wrong with the value
    let img = media("images/image1.jpg");
    for (flag, value, why) in [
        (
            "--image",
            format!("{img}:4294967297"),
            "the tile limit after ':' must be 1 to 128, got 4294967297",
        ),
        (
            "--image",
            format!("{img}:0"),
            "the tile limit after ':' must be 1 to 128, got 0",
        ),
        ("--video-bound", "9,1".into(), "START 9 is not before END 1"),
        (
            "--video-bound",
            "-1,5".into(),
            "START -1 is negative (seconds count from the start of the video)",
        ),
        (
            "--video-bound",
            "1,inf".into(),
            "END inf is not a finite number of seconds",
        ),
        (
            "--video-bound",
            "2".into(),
            "expected START,END in seconds, got \"2\" (no comma)",
        ),
        (
            "--video-bound",
            "a,2".into(),
            "START \"a\" is not a number of seconds",
        ),
    ] {
        let o = run(
            &["--model", &m, "--video", &v, flag, &value, "--prompt", "hi"],
            None,
        );
        assert_eq!(o.status.code(), Some(2), "{flag} {value}: {}", stderr(&o));
        let first = stderr(&o).lines().next().unwrap_or("").to_string();
        assert!(
            first.starts_with(&format!("error: invalid value '{value}' for '{flag} ")),
            "{first}"
        );
        assert!(first.ends_with(why), "{first}");
    }
    let o = run(
        &["--model", &m, "--max-new-tokens", "-1", "--prompt", "hi"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("unexpected argument '-1'"),
        "{}",
        stderr(&o)
    );
    let o = run(
        &[
            "--model",
            &m,
            "--max-new-tokens",
            "1048577",
            "--prompt",
            "hi",
        ],
        None,
    );
    assert_one_line_error(&o, &["max_new_tokens 1048577 is larger than 1048576"]);
}

/// Inputs the reference takes that look odd: each one is answered.
#[test]
fn odd_but_valid_attachments_are_answered() {
    let d = tempdir("odd");
    let dir = d.path();
    // a 200000x1 strip
    let strip = RgbImage::from_fn(200_000, 1, |x, _| Rgb([(x % 256) as u8, 80, 160]));
    std::fs::write(dir.join("strip.png"), png(&strip)).unwrap();
    // an animated GIF is its first frame, as PIL's convert('RGB') takes it
    let palette = [200u8, 30, 30, 30, 200, 30, 30, 30, 200];
    let frames: [&[u8]; 3] = [&[0, 1, 2, 0], &[2, 2, 2, 2], &[1, 1, 0, 0]];
    let mut gif_bytes = Vec::new();
    {
        let mut enc = gif::Encoder::new(&mut gif_bytes, 2, 2, &palette).unwrap();
        enc.set_repeat(gif::Repeat::Infinite).unwrap();
        for f in frames {
            let frame = gif::Frame {
                width: 2,
                height: 2,
                delay: 20,
                buffer: std::borrow::Cow::Borrowed(f),
                ..gif::Frame::default()
            };
            enc.write_frame(&frame).unwrap();
        }
    }
    std::fs::write(dir.join("anim.gif"), gif_bytes).unwrap();
    let first = RgbImage::from_fn(2, 2, |x, y| {
        let i = [0usize, 1, 2, 0][(y * 2 + x) as usize];
        Rgb([palette[3 * i], palette[3 * i + 1], palette[3 * i + 2]])
    });
    std::fs::write(dir.join("first.png"), png(&first)).unwrap();
    let answer = |att: &[&str]| {
        let mut a = att.to_vec();
        a.extend(["--prompt", "Describe it."]);
        let o = one_shot(&a);
        assert!(o.status.success(), "{att:?}: {}", stderr(&o));
        assert!(stderr(&o).is_empty(), "{}", stderr(&o));
        stdout(&o)
    };
    let strip_path = dir.join("strip.png").display().to_string();
    assert!(!answer(&["--image", &strip_path]).trim().is_empty());
    let gif_path = dir.join("anim.gif").display().to_string();
    let png_path = dir.join("first.png").display().to_string();
    assert_eq!(
        answer(&["--image", &gif_path]),
        answer(&["--image", &png_path])
    );
    // unordered.mov: packets out of presentation order, frames sampled in presentation order
    let mov = media("videos/unordered.mov");
    assert!(!answer(&["--video", &mov, "--segments", "4"])
        .trim()
        .is_empty());
}

/// A file the user may not read. Root reads everything, so when the tests run as root the
/// program runs as `nobody` (uid 65534), for whom the file's mode 000 is a real EACCES.
#[test]
fn an_unreadable_attachment_is_named_with_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let d = tempdir("perm");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = d.path().join("secret.png");
    std::fs::write(&secret, png(&RgbImage::new(4, 4))).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let secret_video = d.path().join("secret.mp4");
    std::fs::copy(fixture("media/videos/video_90.mov"), &secret_video).unwrap();
    std::fs::set_permissions(&secret_video, std::fs::Permissions::from_mode(0o000)).unwrap();
    let m = model("tiny-qwen2");
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    for (flag, file) in [("--image", &secret), ("--video", &secret_video)] {
        let f = file.display().to_string();
        let mut c = bin();
        c.args(["--model", &m, "--device", "cpu", flag, &f, "--prompt", "hi"]);
        if root {
            c.uid(65534).gid(65534);
        }
        let o = run_cmd(&mut c, None);
        assert_one_line_error(&o, &[&f, "ermission denied"]);
    }
}

fn copy_model(src: &str, dst: &Path) {
    for e in std::fs::read_dir(fixture(&format!("models/{src}"))).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn every_bad_model_folder_gives_one_line_naming_the_file() {
    let d = tempdir("mdl");
    let dir = d.path();
    let m = dir.display().to_string();
    let ask = || run(&["--model", &m, "--device", "cpu", "--prompt", "hi"], None);
    copy_model("tiny-qwen2", dir);
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    // missing weights of a single-file checkpoint
    std::fs::remove_file(&weights).unwrap();
    assert_one_line_error(&ask(), &[&m, "no model.safetensors"]);

    // a tensor stored as a dtype the model cannot use (header edited in place, same length)
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let first = header.find("\"dtype\":\"BF16\"").expect("a bf16 tensor");
    let name_start = header[..first].rfind("},\"").map_or(2, |i| i + 3);
    let tensor = &header[name_start..header[name_start..].find('"').unwrap() + name_start];
    let mut edited = bytes.clone();
    edited[8 + first..8 + first + 14].copy_from_slice(b"\"dtype\":\"I16\" ");
    std::fs::write(&weights, &edited).unwrap();
    assert_one_line_error(
        &ask(),
        &[
            "model.safetensors",
            &format!("tensor {tensor} has unsupported dtype I16"),
        ],
    );

    // a tensor whose shape disagrees with the config
    std::fs::write(&weights, &bytes).unwrap();
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let wrong = cfg_text.replace(
        "\"intermediate_size\": 64,\n    \"max_position",
        "\"intermediate_size\": 65,\n    \"max_position",
    );
    assert_ne!(wrong, cfg_text);
    std::fs::write(dir.join("config.json"), &wrong).unwrap();
    assert_one_line_error(
        &ask(),
        &[
            &m,
            "mlp.gate_proj.weight has shape [64, 32], expected [65, 32]",
        ],
    );
    std::fs::write(dir.join("config.json"), &cfg_text).unwrap();

    // a tokenizer with more tokens than the model's vocabulary (one added past its end)
    let tok_cfg = dir.join("tokenizer_config.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&tok_cfg).unwrap()).unwrap();
    t["added_tokens_decoder"]["151674"] = json!({"content": "<extra_0>", "lstrip": false,
        "normalized": false, "rstrip": false, "single_word": false, "special": true});
    std::fs::write(&tok_cfg, t.to_string()).unwrap();
    assert_one_line_error(
        &ask(),
        &[
            &m,
            "tokenizer has 151675 tokens but the model's vocab_size is 151674",
        ],
    );

    // tokenizer files absent
    for f in ["tokenizer_config.json", "vocab.json", "merges.txt"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    assert_one_line_error(&ask(), &[&m, "tokenizer"]);

    // a config of another kind, then none
    std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen2"}"#).unwrap();
    assert_one_line_error(&ask(), &["config.json", "qwen2", "internvl_chat"]);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_one_line_error(&ask(), &["config.json", "not found"]);
}

#[test]
fn a_prompt_over_the_context_window_is_refused_with_the_numbers() {
    let m = model("tiny-qwen2");
    let long = "word ".repeat(40_000);
    let o = run(&greedy(&m, "4", &[]), Some(&long));
    assert_one_line_error(
        &o,
        &["prompt of 40046 tokens plus 4 new tokens exceeds the context window of 32768 tokens"],
    );
    let o = run(&greedy(&m, "32768", &["--prompt", "hi"]), None);
    assert_one_line_error(
        &o,
        &["prompt of 46 tokens plus 32768 new tokens exceeds the context window of 32768 tokens"],
    );
}

#[test]
fn placeholders_and_images_must_agree() {
    let img = media("images/image1.jpg");
    let img2 = media("images/image2.jpg");
    let img3 = media("images/image3.jpg");
    // more placeholders than images
    let o = one_shot(&[
        "--image",
        &img,
        "--prompt",
        "<image> and <image>: which is older?",
    ]);
    assert_one_line_error(&o, &["2 <image> placeholders but 1 image"]);
    // fewer placeholders than images (one placeholder takes them all, as combined)
    let o = one_shot(&[
        "--image",
        &img,
        "--image",
        &img2,
        "--image",
        &img3,
        "--prompt",
        "<image> then <image>",
    ]);
    assert_one_line_error(&o, &["2 <image> placeholders but 3 images"]);
    // placeholders with no image at all
    let o = one_shot(&["--prompt", "What is in <image>?"]);
    assert_one_line_error(&o, &["1 <image> placeholder", "0 images"]);
}

/// A JSONL batch whose every line is wrong in a different way: each result names the field,
/// the batch goes on to the end and exits 1.
#[test]
fn bad_request_lines_name_the_field() {
    let d = tempdir("req");
    let img = media("images/image1.jpg");
    let vid = media("videos/video_90.mov");
    let lines: Vec<(String, &str)> = vec![
        ("{\"id\": 1, \"question\": ".into(), "line 1: invalid JSON"),
        ("[1, 2]".into(), "a request must be a JSON object"),
        (
            "\"just a string\"".into(),
            "a request must be a JSON object",
        ),
        (json!({"id": 3}).to_string(), "missing field `question`"),
        (
            json!({"id": 4, "question": 5}).to_string(),
            "question: invalid type: integer `5`",
        ),
        (
            json!({"id": 5, "question": "q", "images": "a.jpg"}).to_string(),
            "images: invalid type",
        ),
        (
            json!({"id": 6, "question": "q", "images": [{"path": img, "tiles": 2}]}).to_string(),
            "unknown field `tiles`",
        ),
        (
            json!({"id": 7, "question": "q", "max_new_tokens": "64"}).to_string(),
            "max_new_tokens: invalid type: string",
        ),
        (
            json!({"id": 8, "question": "q", "max_new_tokens": -1}).to_string(),
            "max_new_tokens: invalid value: integer `-1`",
        ),
        (
            json!({"id": 9, "question": "q", "max_new_tokens": 1_000_000_000_000u64}).to_string(),
            "max_new_tokens 1000000000000 is larger than 1048576",
        ),
        (
            json!({"id": 10, "question": "q", "max_new_tokens": 1e30}).to_string(),
            "max_new_tokens: invalid type: floating point",
        ),
        (
            json!({"id": 11, "question": "q", "seed": -5}).to_string(),
            "seed: invalid value: integer `-5`",
        ),
        (
            json!({"id": 12, "question": "q", "top_p": 2.0}).to_string(),
            "top_p must be in (0, 1], got 2",
        ),
        (
            json!({"id": 13, "question": "q", "temperature": -1}).to_string(),
            "temperature must be >= 0, got -1",
        ),
        (
            json!({"id": 14, "question": "q", "min_new_tokens": 9, "max_new_tokens": 3})
                .to_string(),
            "min_new_tokens (9) exceeds max_new_tokens (3)",
        ),
        (
            json!({"id": 15, "question": "q", "images": [{"path": img, "max_tiles": 100000}]})
                .to_string(),
            "max tiles 100000 is more than 128",
        ),
        (
            json!({"id": 16, "question": "q", "images": [{"path": img, "max_tiles": 0}]})
                .to_string(),
            "max tiles must be at least 1",
        ),
        (
            json!({"id": 17, "question": "q", "video": {"path": vid, "segments": 1_000_000_000}})
                .to_string(),
            "segments 1000000000 is more than 128",
        ),
        (
            json!({"id": 18, "question": "q", "video": {"path": vid, "bound": [50, 60]}})
                .to_string(),
            "time bound 50s..60s lies outside",
        ),
        (
            json!({"id": 19, "question": "q", "video": {"path": vid, "bound": [1]}}).to_string(),
            "video.bound: invalid length 1",
        ),
        (
            json!({"id": 20, "question": "q", "history": [["only a question"]]}).to_string(),
            "history[0]: invalid length 1",
        ),
        (
            json!({"id": 21, "question": "q", "max_new_tokens": 32768}).to_string(),
            "new tokens exceeds the context window of 32768 tokens",
        ),
        (
            json!({"id": 22, "question": "<image><image>", "images": [{"path": img}]}).to_string(),
            "2 <image> placeholders but 1 image",
        ),
        // the time range rule of --video-bound and /video, with the line and field named
        (
            json!({"id": 23, "question": "q", "video": {"path": vid, "bound": [9, 1]}}).to_string(),
            "line 24: invalid request: video.bound: START 9 is not before END 1",
        ),
        (
            json!({"id": 24, "question": "q", "video": {"path": vid, "bound": [-1, 1]}})
                .to_string(),
            "line 25: invalid request: video.bound: START -1 is negative",
        ),
    ];
    let input = d.path().join("in.jsonl");
    let text: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    std::fs::write(&input, text.join("\n") + "\n").unwrap();
    let m = model("tiny-qwen2");
    let o = run(
        &[
            "batch",
            "--model",
            &m,
            "--device",
            "cpu",
            "--input",
            input.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let results: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), lines.len(), "one result per line");
    for (i, ((line, want), r)) in lines.iter().zip(&results).enumerate() {
        let err = r["error"].as_str().unwrap_or_else(|| panic!("{line}: {r}"));
        assert!(
            err.contains(want),
            "line {}: {err:?} should say {want:?}",
            i + 1
        );
        assert!(!err.contains('\n'), "{err:?}");
        assert!(r.get("response").is_none());
    }
    // ids are echoed where they could be read
    assert_eq!(results[4]["id"], 4);
    assert_eq!(results[21]["id"], 21);
}

/// Runs the binary with `args` and `stdin`, killed (and the test failed) if it is not done in
/// `secs`; also its peak resident memory, sampled as it runs.
fn run_bounded(args: &[&str], stdin: Option<Vec<u8>>, secs: u64) -> (std::process::Output, u64) {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let mut child = common::bin()
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let feeder = stdin.map(|bytes| {
        let mut input = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = input.write_all(&bytes);
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let _ = out.read_to_end(&mut o);
        let _ = err.read_to_end(&mut e);
        (o, e)
    });
    let status_file = format!("/proc/{}/status", child.id());
    let start = std::time::Instant::now();
    let mut peak = 0u64;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if let Some(kb) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        }) {
            peak = peak.max(kb * 1024);
        }
        if start.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} still running after {secs} s (peak RSS {peak} bytes)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let (stdout, stderr) = reader.join().unwrap();
    (
        std::process::Output {
            status,
            stdout,
            stderr,
        },
        peak,
    )
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Far above what a refused attachment needs (no model is loaded for it).
const GIB: u64 = 1 << 30;

#[test]
fn fifos_devices_and_sockets_are_refused_at_once_naming_what_they_are() {
    let d = tempdir("special");
    let fifo = d.path().join("pipe.jpg");
    mkfifo(&fifo);
    let sock = d.path().join("sock.mp4");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fifo = fifo.display().to_string();
    let sock = sock.display().to_string();
    let m = model("tiny-qwen2");
    let cases = [
        (
            "--image",
            "/dev/zero",
            "is a character device, not a regular file",
        ),
        (
            "--image",
            fifo.as_str(),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "--video",
            fifo.as_str(),
            "is a FIFO (named pipe), not a regular file",
        ),
        (
            "--video",
            "/dev/zero",
            "is a character device, not a regular file",
        ),
        ("--image", sock.as_str(), "is a socket, not a regular file"),
    ];
    for (flag, path, what) in cases {
        let args = greedy(&m, "4", &[flag, path, "--prompt", "hi"]);
        let (o, peak) = run_bounded(&args, None, 60);
        assert_one_line_error(&o, &[path, what]);
        assert!(peak < GIB, "{path}: peak RSS {peak}");
    }
}

#[test]
fn a_batch_goes_on_past_special_files_and_over_long_lines() {
    let d = tempdir("special-batch");
    let fifo = d.path().join("pipe.png");
    mkfifo(&fifo);
    let m = model("tiny-qwen2");
    let huge = format!(
        "{{\"id\": 2, \"question\": \"{}\"}}",
        "x".repeat(internvl_chat::files::MAX_JSONL_LINE_BYTES as usize)
    );
    let huge_len = huge.len();
    let input = [
        json!({"id": 1, "question": "<image>\nwhat?", "images": [{"path": fifo}]}).to_string(),
        huge,
        json!({"id": 3, "question": "<image>\nwhat?", "images": [{"path": "/dev/zero"}]})
            .to_string(),
        json!({"id": 4, "question": "Hi"}).to_string(),
    ]
    .join("\n");
    let args = [
        "batch",
        "--model",
        &m,
        "--device",
        "cpu",
        "--greedy",
        "--max-new-tokens",
        "2",
        "--input",
        "-",
    ];
    let (o, peak) = run_bounded(&args, Some(input.into_bytes()), 300);
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{}", stderr(&o));
    let error = |i: usize| lines[i]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error(0).contains(&format!("{} cannot be read: it is a FIFO", fifo.display())),
        "{}",
        lines[0]
    );
    assert_eq!(
        error(1),
        format!(
            "line 2: {huge_len} bytes, longer than the limit of 67108864 bytes for a request line"
        )
    );
    assert!(error(2).contains("/dev/zero cannot be read: it is a character device"));
    assert_eq!(lines[3]["id"], 4);
    assert!(lines[3]["response"].is_string(), "{}", lines[3]);
    assert_eq!(o.status.code(), Some(1));
    // the 64 MiB line was never held whole, let alone tokenized
    assert!(peak < GIB, "peak RSS {peak}");
}

#[test]
fn a_huge_question_is_refused_before_it_is_tokenized_with_the_numbers() {
    let m = model("tiny-qwen2");
    let question = "word ".repeat(6 << 20);
    assert_eq!(question.len(), 31_457_280);
    // a one-shot reading its prompt from stdin (an argument cannot be that long)
    let args = greedy(&m, "4", &[]);
    let t = std::time::Instant::now();
    let (small, _) = run_bounded(&args, Some(b"Hi".to_vec()), 120);
    let answered = t.elapsed();
    assert_eq!(small.status.code(), Some(0), "{}", stderr(&small));
    let t = std::time::Instant::now();
    let (o, peak) = run_bounded(&args, Some(question.clone().into_bytes()), 120);
    let refused = t.elapsed();
    assert_one_line_error(
        &o,
        &[
            "question of 31457280 bytes is at least",
            "tokens (no token covers more than",
            "which with 4 new tokens exceeds the context window of",
        ],
    );
    // the same model load as the answered one, and well under a second more
    assert!(
        refused < answered + std::time::Duration::from_secs(1),
        "refused after {refused:?}, a short question answered in {answered:?}"
    );
    // the question itself is 30 MiB, its ids alone would be 240 MiB
    assert!(peak < GIB, "peak RSS {peak}");
    // a batch line
    let line = json!({"id": 7, "question": question}).to_string();
    let hi = json!({"id": 8, "question": "Hi"}).to_string();
    let args = [
        "batch",
        "--model",
        &m,
        "--device",
        "cpu",
        "--greedy",
        "--max-new-tokens",
        "2",
        "--input",
        "-",
    ];
    let (o, peak) = run_bounded(&args, Some(format!("{line}\n{hi}\n").into_bytes()), 120);
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", stderr(&o));
    assert_eq!(lines[0]["id"], 7);
    let e = lines[0]["error"].as_str().unwrap();
    assert!(
        e.starts_with("question of 31457280 bytes is at least "),
        "{e}"
    );
    assert!(lines[1]["response"].is_string(), "{}", lines[1]);
    assert!(peak < GIB, "peak RSS {peak}");
}
