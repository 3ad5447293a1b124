//! The real binary, as a shell script would use it: answers on stdout, one-line errors on
//! stderr, exit codes.
use internvl_chat::testutil::{fixture, fixtures};
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_internvl-chat"))
}

fn model(name: &str) -> String {
    fixture(&format!("models/{name}")).display().to_string()
}

fn golden(model: &str, case: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("golden/{model}/{case}.json"))).unwrap(),
    )
    .unwrap()
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = bin();
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

const GREEDY: [&str; 6] = [
    "--dtype",
    "f32",
    "--greedy",
    "--max-new-tokens",
    "24",
    "--device",
];

fn greedy_args<'a>(m: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--model", m];
    v.extend(GREEDY);
    v.push("cpu");
    v.extend(extra);
    v
}

/// A failure: exit code 1 and exactly one line on stderr that says `what`.
fn assert_one_line_error(o: &Output, what: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("internvl-chat: error: "), "{err}");
    for w in what {
        assert!(err.contains(w), "{err:?} should mention {w:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn one_shot_text_prints_the_reference_answer() {
    let m = model("tiny-internlm2");
    let o = run(&greedy_args(&m, &["--prompt", "Hello, who are you?"]), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = golden("tiny-internlm2", "text_hello");
    assert_eq!(
        stdout(&o),
        format!("{}\n", g["turns"][0]["response"].as_str().unwrap())
    );
}

#[test]
fn prompt_from_stdin_when_not_a_terminal() {
    let m = model("tiny-internlm2");
    let o = run(&greedy_args(&m, &[]), Some("Hello, who are you?\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    let g = golden("tiny-internlm2", "text_hello");
    assert_eq!(
        stdout(&o).trim_end(),
        g["turns"][0]["response"].as_str().unwrap()
    );
}

#[test]
fn one_shot_image_and_video() {
    let m = model("tiny-internlm2");
    let img = format!("{}:6", fixture("media/images/image1.jpg").display());
    let o = run(
        &greedy_args(
            &m,
            &[
                "--image",
                &img,
                "--prompt",
                "<image>\nPlease describe the image shortly.",
            ],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = golden("tiny-internlm2", "image_single");
    assert_eq!(
        stdout(&o).trim_end(),
        g["turns"][0]["response"].as_str().unwrap()
    );

    let m = model("tiny-qwen2");
    let v = fixture("media/videos/flipping_a_pancake.mkv")
        .display()
        .to_string();
    let o = run(
        &greedy_args(
            &m,
            &[
                "--video",
                &v,
                "--prompt",
                "What is happening in this video?",
            ],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = golden("tiny-qwen2", "video");
    assert_eq!(
        stdout(&o).trim_end(),
        g["turns"][0]["response"].as_str().unwrap()
    );
}

/// An -hf checkpoint through the real binary: its chat template and processor, the answer
/// transformers' `generate` gave (decoded without stripping), for an image and a video.
#[test]
fn one_shot_hf_image_and_video() {
    let m = model("tiny-qwen2-hf");
    let img1 = format!("{}:2", fixture("media/images/image1.jpg").display());
    let img2 = format!("{}:2", fixture("media/images/image2.jpg").display());
    let o = run(
        &greedy_args(
            &m,
            &[
                "--image",
                &img1,
                "--image",
                &img2,
                "--prompt",
                "<image>\n<image>\nDescribe the two images in detail.",
            ],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = golden("tiny-qwen2-hf", "image_combined");
    assert_eq!(
        stdout(&o),
        format!("{}\n", g["turns"][0]["response"].as_str().unwrap())
    );
    let v = fixture("media/videos/flipping_a_pancake.mkv")
        .display()
        .to_string();
    let o = run(
        &greedy_args(
            &m,
            &[
                "--video",
                &v,
                "--segments",
                "8",
                "--prompt",
                "What is happening in this video?",
            ],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let g = golden("tiny-qwen2-hf", "video");
    assert_eq!(
        stdout(&o),
        format!("{}\n", g["turns"][0]["response"].as_str().unwrap())
    );
}

/// A broken -hf folder: one line naming the file or field.
#[test]
fn bad_hf_folders_give_one_line_errors() {
    let src = fixture("models/tiny-qwen2-hf");
    let d = tmpdir("hf");
    let copy = || {
        for e in std::fs::read_dir(&src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    };
    let m = d.to_str().unwrap();
    copy();
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
    let o = run(&["--model", m, "--prompt", "hi"], None);
    assert_one_line_error(&o, &[m, "no chat template", "chat_template.jinja"]);
    copy();
    std::fs::remove_file(d.join("preprocessor_config.json")).unwrap();
    let o = run(&["--model", m, "--prompt", "hi"], None);
    assert_one_line_error(&o, &["preprocessor_config.json", "not found"]);
    copy();
    let cfg = std::fs::read_to_string(src.join("preprocessor_config.json"))
        .unwrap()
        .replace("\"max_patches\": 12", "\"max_patches\": 0");
    std::fs::write(d.join("preprocessor_config.json"), cfg).unwrap();
    let o = run(&["--model", m, "--prompt", "hi"], None);
    assert_one_line_error(&o, &["preprocessor_config.json", "max_patches 0"]);
    copy();
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"image_token_id\": 151667", "\"image_token_id\": 151665");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let o = run(&["--model", m, "--prompt", "hi"], None);
    assert_one_line_error(
        &o,
        &["config.json", "image_token_id 151665", "<IMG_CONTEXT>"],
    );
    copy();
    std::fs::write(d.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
    let o = run(&["--model", m, "--prompt", "hi"], None);
    assert_one_line_error(&o, &["chat_template.jinja", "chat template"]);
    std::fs::remove_dir_all(&d).unwrap();
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ivl-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn bad_attachments_give_one_line_errors() {
    let m = model("tiny-qwen2");
    let corrupt = fixture("media/videos/corrupted.mp4").display().to_string();
    let o = run(
        &["--model", &m, "--video", &corrupt, "--prompt", "hi"],
        None,
    );
    assert_one_line_error(&o, &["corrupted.mp4"]);
    let o = run(
        &[
            "--model",
            &m,
            "--image",
            "/no/such/file.jpg",
            "--prompt",
            "hi",
        ],
        None,
    );
    assert_one_line_error(&o, &["/no/such/file.jpg", "No such file"]);
    let d = tmpdir("att");
    let txt = d.join("notes.jpg");
    std::fs::write(&txt, "just text\n").unwrap();
    let o = run(
        &[
            "--model",
            &m,
            "--image",
            txt.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        None,
    );
    assert_one_line_error(&o, &["notes.jpg", "not an image"]);
    let o = run(
        &[
            "--model",
            &m,
            "--image",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        None,
    );
    assert_one_line_error(&o, &[d.to_str().unwrap(), "directory"]);
}

#[test]
fn bad_model_folders_give_one_line_errors() {
    let d = tmpdir("model");
    let o = run(&["--model", d.to_str().unwrap(), "--prompt", "hi"], None);
    assert_one_line_error(&o, &["config.json", "not found"]);
    std::fs::write(d.join("config.json"), r#"{"model_type": "llava"}"#).unwrap();
    let o = run(&["--model", d.to_str().unwrap(), "--prompt", "hi"], None);
    assert_one_line_error(&o, &["config.json", "llava", "internvl_chat"]);
    // truncated shard of a sharded checkpoint
    let src = fixture("models/tiny-internlm2");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    let shard = d.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let o = run(&["--model", d.to_str().unwrap(), "--prompt", "hi"], None);
    assert_one_line_error(&o, &["model-00002-of-00002.safetensors", "truncated"]);
    // index naming a missing shard
    std::fs::remove_file(&shard).unwrap();
    let o = run(&["--model", d.to_str().unwrap(), "--prompt", "hi"], None);
    assert_one_line_error(
        &o,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
        ],
    );
    // tokenizer files absent
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::remove_file(d.join("tokenizer.model")).unwrap();
    let o = run(&["--model", d.to_str().unwrap(), "--prompt", "hi"], None);
    assert_one_line_error(&o, &["tokenizer"]);
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["--bogus"], None);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--prompt", "hi", "--dtype", "f8"], None);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn batch_keeps_order_reports_bad_lines_and_matches_goldens() {
    let d = tmpdir("batch");
    let img1 = fixture("media/images/image1.jpg").display().to_string();
    let water = fixture("media/images/waterview.jpg").display().to_string();
    let lines = [
        serde_json::json!({"id": "hello", "question": "Hello, who are you?", "do_sample": false, "max_new_tokens": 24}).to_string(),
        "{not json".to_string(),
        serde_json::json!({"id": 7, "question": "x", "colour": "red"}).to_string(),
        serde_json::json!({"id": 8, "question": "x", "max_new_tokens": -3}).to_string(),
        serde_json::json!({"id": 9, "question": "x", "images": [{"path": "/no/such.png"}]}).to_string(),
        serde_json::json!({"id": "b1", "question": "<image>\nDescribe the image in detail.", "do_sample": false,
            "max_new_tokens": 16, "images": [{"path": img1, "max_tiles": 2}]}).to_string(),
        serde_json::json!({"id": "b2", "question": "<image>\nDescribe the image in detail.", "do_sample": false,
            "max_new_tokens": 16, "images": [{"path": water, "max_tiles": 1}]}).to_string(),
    ];
    let input = d.join("in.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = d.join("out.jsonl");
    let m = model("tiny-qwen2");
    let o = run(
        &[
            "batch",
            "--model",
            &m,
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "some lines failed: {}",
        stderr(&o)
    );
    let results: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<Value> = results.iter().map(|r| r["id"].clone()).collect();
    assert_eq!(
        ids,
        vec![
            "hello".into(),
            Value::Null,
            7.into(),
            8.into(),
            9.into(),
            "b1".into(),
            "b2".into()
        ]
    );
    let g = golden("tiny-qwen2", "text_hello");
    let t = &g["turns"][0];
    let n = t["step_margins"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m.as_f64().unwrap() < 0.01)
        .unwrap();
    assert_eq!(
        results[0]["generated_ids"].as_array().unwrap()[..n],
        t["generated_ids"].as_array().unwrap()[..n]
    );
    assert_eq!(
        results[0]["prompt_tokens"],
        t["input_ids"].as_array().unwrap().len()
    );
    assert_eq!(results[0]["completion_tokens"], 24);
    assert_eq!(results[0]["finish_reason"], "length");
    assert!(results[1]["error"].as_str().unwrap().contains("line 2"));
    assert!(results[2]["error"].as_str().unwrap().contains("colour"));
    assert!(results[3]["error"]
        .as_str()
        .unwrap()
        .contains("max_new_tokens"));
    assert!(results[4]["error"]
        .as_str()
        .unwrap()
        .contains("/no/such.png"));
    let gb = golden("tiny-qwen2", "batch_two_images");
    assert_eq!(results[5]["response"], gb["responses"][0]);
    assert_eq!(results[6]["response"], gb["responses"][1]);
}

/// `batch` with an -hf checkpoint: two left-padded rows give transformers' `generate` ids.
#[test]
fn batch_takes_hf_checkpoints() {
    let g = golden("tiny-qwen2-hf", "batch_two_images");
    let lines: Vec<String> = g["questions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(g["images"].as_array().unwrap())
        .map(|(q, i)| {
            let path = fixture(&format!("media/images/{}", i["image"].as_str().unwrap()));
            serde_json::json!({"question": q, "do_sample": false, "max_new_tokens": 16,
                "images": [{"path": path, "max_tiles": i["max_num"]}]})
            .to_string()
        })
        .collect();
    let m = model("tiny-qwen2-hf");
    let o = run(
        &[
            "batch",
            "--model",
            &m,
            "--dtype",
            "f32",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--input",
            "-",
        ],
        Some(&(lines.join("\n") + "\n")),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let results: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), 2);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["generated_ids"], g["generated_ids"][i], "row {i}");
        assert_eq!(r["response"], g["responses"][i], "row {i}");
    }
}

#[test]
fn batch_from_stdin_to_stdout_exits_0_when_all_succeed() {
    let m = model("tiny-qwen2");
    let input = serde_json::json!({"id": 1, "question": "Hi", "max_new_tokens": 3, "min_new_tokens": 3, "seed": 5}).to_string()
        + "\n"
        + &serde_json::json!({"id": 2, "question": "Hi", "max_new_tokens": 3, "min_new_tokens": 3, "seed": 5}).to_string();
    let o = run(
        &["batch", "--model", &m, "--device", "cpu", "--input", "-"],
        Some(&input),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(r.len(), 2);
    // seeded sampling: the same request gives the same tokens
    assert_eq!(r[0]["generated_ids"], r[1]["generated_ids"]);
    assert_eq!(r[0]["completion_tokens"], 3);
}

#[test]
fn plan_prints_the_model_card_device_map_and_refuses_what_does_not_fit() {
    let cfg = fixtures().join("configs/InternVL2_5-78B.config.json");
    let c = cfg.to_str().unwrap();
    let o = run(
        &[
            "plan",
            "--model",
            c,
            "--gpus",
            "8",
            "--gpu-memory",
            "80",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["device_map"]["language_model.model.layers.79"], 0);
    assert_eq!(j["device_map"]["language_model.model.layers.72"], 7);
    assert_eq!(j["device_map"]["vision_model"], 0);
    assert_eq!(j["fits"], true);
    let o = run(
        &["plan", "--model", c, "--gpus", "2", "--gpu-memory", "24"],
        None,
    );
    assert!(
        stdout(&o).contains("decoder layers (80 x"),
        "{}",
        stdout(&o)
    );
    assert_one_line_error(&o, &["does not fit", "cuda:0 needs", "but has 24.00 GiB"]);
    let o = run(
        &[
            "plan",
            "--model",
            c,
            "--gpus",
            "2",
            "--gpu-memory",
            "80",
            "--device-map",
            "0:40,1:30",
        ],
        None,
    );
    assert_one_line_error(&o, &["70 layers", "cuda:0: 40, cuda:1: 30", "80"]);
}

#[test]
fn a_map_whose_devices_are_all_cpu_gives_the_same_tokens() {
    let m = model("tiny-internlm2");
    let a = run(&greedy_args(&m, &["--prompt", "Hello, who are you?"]), None);
    let b = run(
        &greedy_args(
            &m,
            &[
                "--device-map",
                "cpu:1,cpu:1",
                "--prompt",
                "Hello, who are you?",
            ],
        ),
        None,
    );
    assert!(a.status.success() && b.status.success(), "{}", stderr(&b));
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn a_model_that_does_not_fit_is_refused_before_loading() {
    let m = model("tiny-qwen2");
    let mut c = bin();
    c.args(["--model", &m, "--device", "cpu", "--prompt", "hi"])
        .env("INTERNVL_RAM_GIB", "0.001")
        .stdin(Stdio::null());
    let o = c.output().unwrap();
    assert_one_line_error(
        &o,
        &[
            "tiny-qwen2",
            "does not fit",
            "cpu needs",
            "but has 0.00 GiB",
        ],
    );
}

/// `--load-8bit`: the plan costs int8 weights (a 78B model that needs 86 GiB on a 56 GiB card
/// in bf16 fits in 8 bits), `head` the output head's too (on the first device: vocab x hidden
/// bytes and a bf16 scale per row, in place of two bytes a weight), and a one-shot answer runs
/// with int8 decoder weights, and with the int8 head.
#[test]
fn load_8bit_plans_and_answers() {
    let cfg = fixtures().join("configs/InternVL2_5-78B.config.json");
    let c = cfg.to_str().unwrap();
    let plan = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "--model",
            c,
            "--gpus",
            "2",
            "--gpu-memory",
            "56",
            "--json",
        ];
        a.extend(extra);
        run(&a, None)
    };
    let bf16 = plan(&[]);
    assert_one_line_error(&bf16, &["does not fit", "cuda:1 needs 86.64 GiB"]);
    let int8 = plan(&["--load-8bit"]);
    assert!(int8.status.success(), "{}", stderr(&int8));
    let all = plan(&["--load-8bit", "all"]);
    assert!(all.status.success(), "{}", stderr(&all));
    let head = plan(&["--load-8bit", "head"]);
    assert!(head.status.success(), "{}", stderr(&head));
    let bytes = |o: &Output, dev: &str| {
        let j: Value = serde_json::from_str(&stdout(o)).unwrap();
        j["devices"][dev]["weight_bytes"].as_u64().unwrap()
    };
    let b = bytes(&bf16, "cuda:1");
    let q = bytes(&int8, "cuda:1");
    // decoder layers only on cuda:1: just over half (norms stay bf16, one bf16 scale per row)
    assert!(q * 2 > b && (q as f64) < 0.501 * b as f64, "{q} vs {b}");
    assert!(bytes(&all, "cuda:0") < bytes(&head, "cuda:0"));
    assert_eq!(bytes(&all, "cuda:1"), q);
    assert_eq!(bytes(&head, "cuda:1"), q);
    let l = &serde_json::from_str::<Value>(&std::fs::read_to_string(&cfg).unwrap()).unwrap()
        ["llm_config"];
    let (vocab, hidden) = (
        l["vocab_size"].as_u64().unwrap(),
        l["hidden_size"].as_u64().unwrap(),
    );
    assert_eq!(
        bytes(&int8, "cuda:0") - bytes(&head, "cuda:0"),
        2 * vocab * hidden - (vocab * hidden + 2 * vocab)
    );

    let m = model("tiny-qwen2");
    let o = run(
        &[
            "--model",
            &m,
            "--load-8bit",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--prompt",
            "Hello, who are you?",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
    let o = run(
        &[
            "--model",
            &m,
            "--load-8bit",
            "head",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--prompt",
            "Hello, who are you?",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
}

/// `--load-4bit`: the plan costs 16 bytes and a bf16 scale per 32 weights of the decoder
/// layers' matrices (exactly, from the 78B config's shapes: it then fits one 56 GiB card's
/// share), `--load-8bit` with `--load-4bit` is refused in one line, and a one-shot answer with
/// 4-bit decoder weights (and with 4-bit vision weights, on a picture) equals the 4-bit
/// engine's in-process answer.
#[test]
fn load_4bit_plans_and_answers() {
    use internvl_chat::engine::chat::{ChatInput, Engine};
    use internvl_chat::engine::generate::Flow;
    use internvl_chat::engine::protocol::Attachment;
    use internvl_chat::model::{LoadOptions, Quant, Quantize};
    use internvl_chat::sampling::SamplingParams;
    use tch::{Device, Kind};

    let cfg = fixtures().join("configs/InternVL2_5-78B.config.json");
    let c = cfg.to_str().unwrap();
    let plan = |extra: &[&str]| -> Value {
        let mut a = vec![
            "plan",
            "--model",
            c,
            "--gpus",
            "2",
            "--gpu-memory",
            "56",
            "--json",
        ];
        a.extend(extra);
        let o = run(&a, None);
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let bf16 = plan(&[]);
    let q4 = plan(&["--load-4bit"]);
    let all = plan(&["--load-4bit", "all"]);
    assert_eq!(bf16["fits"], false);
    assert_eq!(q4["fits"], true);
    let bytes = |j: &Value, dev: &str| j["devices"][dev]["weight_bytes"].as_u64().unwrap();
    // Qwen2.5-72B's decoder layer: q, o 8192x8192; k, v 1024x8192; gate, up 29568x8192; down
    // 8192x29568 (every input size a multiple of 32); biases of q, k, v and two norms in bf16
    let matrix: u64 = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 29568 * 8192;
    let rest: u64 = 8192 + 2 * 1024 + 2 * 8192;
    let layers = q4["devices"]["cuda:1"]["layers"].as_u64().unwrap();
    assert!(layers > 0);
    assert_eq!(bytes(&q4, "cuda:1"), layers * (matrix / 32 * 18 + rest * 2));
    assert_eq!(bytes(&bf16, "cuda:1"), layers * (matrix + rest) * 2);
    assert_eq!(bytes(&all, "cuda:1"), bytes(&q4, "cuda:1"));
    assert!(bytes(&all, "cuda:0") < bytes(&q4, "cuda:0"));
    // the table says the same
    let o = run(
        &[
            "plan",
            "--model",
            c,
            "--gpus",
            "2",
            "--gpu-memory",
            "56",
            "--load-4bit",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let gib = format!(
        "{:.2} GiB",
        bytes(&q4, "cuda:1") as f64 / (1u64 << 30) as f64
    );
    assert!(stdout(&o).contains(&gib), "{gib} in {}", stdout(&o));

    let m = model("tiny-qwen2");
    for extra in [
        ["--load-8bit", "--load-4bit"],
        ["--load-4bit", "--load-8bit"],
    ] {
        let mut a = vec!["plan", "--model", c];
        a.extend(extra);
        assert_one_line_error(&run(&a, None), &["--load-8bit and --load-4bit"]);
        let mut a = vec!["--model", &m, "--device", "cpu", "--prompt", "Hi"];
        a.extend(extra);
        assert_one_line_error(&run(&a, None), &["--load-8bit and --load-4bit"]);
    }

    let image = fixture("media/images/image1.jpg");
    let cases: [(Quantize, &str, Vec<Attachment>, String); 2] = [
        (
            Quantize::llm(Quant::Q4),
            "Hello, who are you?",
            vec![],
            "--load-4bit".into(),
        ),
        (
            Quantize::all(Quant::Q4),
            "<image>\nPlease describe the image shortly.",
            vec![Attachment::Image {
                path: image.clone(),
                max_tiles: Some(2),
            }],
            "--load-4bit=all".into(),
        ),
    ];
    for (quant, question, atts, flag) in cases {
        let opts = LoadOptions {
            quant,
            ..LoadOptions::single(Device::Cpu, Kind::BFloat16)
        };
        let mut e = Engine::load(&fixture("models/tiny-qwen2"), &opts).unwrap();
        let p = e
            .prepare(&ChatInput {
                system: None,
                history: &[],
                question,
                attachments: &atts,
                combine_images: false,
            })
            .unwrap();
        let want = e
            .run(&p, &SamplingParams::greedy(24), &mut |_| Flow::Continue)
            .unwrap()
            .answer;
        assert!(!want.trim().is_empty());
        let img = format!("{}:2", image.display());
        let mut a = vec![
            "--model",
            &m,
            flag.as_str(),
            "--greedy",
            "--max-new-tokens",
            "24",
            "--device",
            "cpu",
        ];
        if !atts.is_empty() {
            a.extend(["--image", img.as_str()]);
        }
        a.extend(["--prompt", question]);
        let o = run(&a, None);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).trim_end(), want.trim_end(), "{flag}");
    }
}

/// InternVL3.5 (Qwen3 and Qwen3-MoE decoders) and InternVL3 (Qwen2 with a dynamic rope) through
/// the real binary: the reference's answers, thinking mode, `--context`, `--load-8bit`.
#[test]
fn internvl3_and_3_5_one_shot() {
    let response = |m: &str, case: &str| {
        golden(m, case)["turns"][0]["response"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let img = |name: &str, tiles: u32| {
        format!(
            "{}:{tiles}",
            fixture(&format!("media/images/{name}")).display()
        )
    };
    // dense Qwen3, a picture
    let m = model("tiny-qwen3");
    let image = img("image1.jpg", 6);
    let o = run(
        &greedy_args(
            &m,
            &[
                "--image",
                &image,
                "--prompt",
                "<image>\nPlease describe the image shortly.",
            ],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        response("tiny-qwen3", "image_single")
    );
    // thinking mode: the model card's R1 system prompt
    let g = golden("tiny-qwen3", "thinking");
    let image = img("image3.jpg", 1);
    let o = run(
        &greedy_args(
            &m,
            &[
                "--think",
                "--image",
                &image,
                "--prompt",
                g["question"].as_str().unwrap(),
            ],
        ),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end(), response("tiny-qwen3", "thinking"));
    // Qwen3-MoE, bf16 weights as stored run in f32, and in 8-bit
    let m = model("tiny-qwen3-moe");
    let o = run(&greedy_args(&m, &["--prompt", "Hello, who are you?"]), None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        response("tiny-qwen3-moe", "text_hello")
    );
    let o = run(
        &[
            "--model",
            &m,
            "--device",
            "cpu",
            "--load-8bit",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--prompt",
            "Hello",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());
    // a dynamic rope: 1846 prompt tokens past 256 trained positions, with a larger window
    let m = model("tiny-qwen2-dyn");
    let image = img("image1.jpg", 6);
    let q = "<image>\nPlease describe the image shortly.";
    let o = run(
        &greedy_args(&m, &["--context", "4096", "--image", &image, "--prompt", q]),
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end(),
        response("tiny-qwen2-dyn", "image_single")
    );
    // the default window (256 x factor 2) refuses it with the numbers
    let o = run(&greedy_args(&m, &["--image", &image, "--prompt", q]), None);
    assert_one_line_error(
        &o,
        &[
            "1846 tokens",
            "24 new tokens",
            "context window of 512 tokens",
        ],
    );
    let o = run(
        &greedy_args(&m, &["--context", "0", "--prompt", "hi"]),
        None,
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `plan --json` of config `c` on GPUs of 141 GiB with `extra` flags; it must succeed.
fn plan_json(c: &str, extra: &[&str]) -> Value {
    let mut args = vec!["plan", "--model", c, "--gpu-memory", "141", "--json"];
    args.extend(extra);
    let o = run(&args, None);
    assert!(o.status.success(), "{c}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// `plan` gives a sane plan for every config of the fixtures; a mixture of experts shows what a
/// token reads; `--context` sizes the KV cache.
#[test]
fn plan_covers_every_config() {
    for e in std::fs::read_dir(fixtures().join("configs")).unwrap() {
        let p = e.unwrap().path();
        let c = p.to_str().unwrap();
        let j = plan_json(c, &["--gpus", "8"]);
        assert_eq!(j["fits"], true, "{c}");
        let params = &j["parameters"];
        let total = params["total"].as_u64().unwrap();
        let active = params["active_per_token"].as_u64().unwrap();
        assert!(
            total > 900_000_000 && active <= total,
            "{c}: {total} {active}"
        );
        if c.contains("-A3B") || c.contains("-A28B") {
            assert!(
                active * 4 < total,
                "{c}: a MoE reads a fraction: {active} of {total}"
            );
        } else {
            assert!(
                active
                    + params["vision_model"].as_u64().unwrap()
                    + params["mlp1"].as_u64().unwrap()
                    >= total,
                "{c}"
            );
        }
        assert_eq!(j["context"], 8192, "{c}");
    }
    let c = fixtures().join("configs/InternVL3_5-30B-A3B.config.json");
    let o = run(
        &[
            "plan",
            "--model",
            c.to_str().unwrap(),
            "--gpus",
            "1",
            "--gpu-memory",
            "141",
        ],
        None,
    );
    let out = stdout(&o);
    assert!(out.contains("read per token (experts)"), "{out}");
    let c = c.to_str().unwrap();
    let kv = |ctx: &str| {
        plan_json(c, &["--gpus", "1", "--context", ctx])["devices"]["cuda:0"]["kv_bytes"]
            .as_u64()
            .unwrap()
    };
    // 48 layers x (k + v) x 4 KV heads x 128 x bf16 per position
    assert_eq!(kv("1000"), 1000 * 48 * 2 * 4 * 128 * 2);
    assert_eq!(kv("2000"), 2 * kv("1000"));
}
