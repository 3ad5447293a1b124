//! `internvl-chat serve` on 127.0.0.1 with tiny-qwen2, driven by the official `openai` Python
//! client (tests/openai_client.py, run with the project's .venv), and `--remote` against it:
//! answers equal the batch mode's for the same request and seed, streamed or not.
mod common;

use base64::Engine as _;
use common::tmux::{streamed, Tmux};
use internvl_chat::prompt::tokenizer::Tokenizer;
use internvl_chat::testutil::fixture;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_internvl-chat");
const MODEL: &str = "tiny-qwen2";
/// Every process of these tests computes alike, and two of them share the two cores.
const ONE_CPU_THREAD: [&str; 4] = ["--device", "cpu", "--threads", "1"];

fn model_dir() -> String {
    fixture(&format!("models/{MODEL}")).display().to_string()
}

fn image(name: &str) -> String {
    fixture(&format!("media/images/{name}"))
        .display()
        .to_string()
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(image(name)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:image/jpeg;base64,{b64}")
}

/// A running `serve`, killed when dropped; its stderr is kept.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with(&model_dir(), extra)
    }

    /// `serve` of the checkpoint in `m`.
    fn start_with(m: &str, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--model", m, "--port", "0"];
        args.extend(ONE_CPU_THREAD);
        args.extend(extra);
        let mut child = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("listening on ") {
                    let _ = tx.send(rest.split(' ').next().unwrap().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
            log,
        };
        // a generous bound, against a server that never comes up: not a timed assertion
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => server.url = url,
            Err(_) => panic!("serve did not start; stderr:\n{}", server.log()),
        }
        assert!(
            server.url.starts_with("http://127.0.0.1:"),
            "{}",
            server.url
        );
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line satisfies `pred`; returns it.
    fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| pred(l)) {
                return l.clone();
            }
            if t.elapsed() > Duration::from_secs(120) {
                panic!("no log line for {what}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a scenario of tests/openai_client.py; its JSON output.
fn client(scenario: &str, server: &Server, key: &str, spec: &Value) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/setup.sh (it installs the openai client)",
        python.display()
    );
    let mut child = Command::new(python)
        .arg(root.join("tests/openai_client.py"))
        .args([scenario, &server.url, key, MODEL])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(spec.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openai_client.py {scenario} failed:\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `internvl-chat batch` over `lines`: one result per line.
fn batch(lines: &[Value]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&input, text.join("\n")).unwrap();
    let m = model_dir();
    let out = Command::new(BIN)
        .args(["batch", "--model", &m])
        .args(ONE_CPU_THREAD)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), lines.len());
    results
}

/// A chat request and the batch line that asks the same.
struct Case {
    openai: Value,
    batch: Value,
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn cases() -> Vec<Case> {
    let jpg = image("image1.jpg");
    vec![
        // sampled, text only
        Case {
            openai: json!({"messages": [user("Tell me a story about a cat.")],
                "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
            batch: json!({"question": "Tell me a story about a cat.",
                "max_new_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
        },
        // greedy (temperature 0), with a system message
        Case {
            openai: json!({"messages": [{"role": "system", "content": "Be brief."}, user("Hello, who are you?")],
                "max_tokens": 10, "temperature": 0}),
            batch: json!({"question": "Hello, who are you?", "system": "Be brief.",
                "max_new_tokens": 10, "temperature": 0}),
        },
        // a picture as a data: URL, two tiles and the thumbnail
        Case {
            openai: json!({"messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is in the picture?"},
                    {"type": "image_url", "image_url": {"url": data_url("image1.jpg"), "max_dynamic_patch": 2}}]}],
                "max_tokens": 10, "seed": 3}),
            batch: json!({"question": "What is in the picture?", "images": [{"path": jpg, "max_tiles": 2}],
                "max_new_tokens": 10, "seed": 3}),
        },
        // a picture as a file:// URL, greedy; the model's own tile limit
        Case {
            openai: json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": format!("file://{}", image("image2.jpg"))}},
                    {"type": "text", "text": "Describe it."}]}],
                "max_tokens": 8, "temperature": 0}),
            batch: json!({"question": "Describe it.", "images": [{"path": image("image2.jpg")}],
                "max_new_tokens": 8, "do_sample": false}),
        },
        // a conversation: the picture in the first turn, a follow-up question
        Case {
            openai: json!({"messages": [
                    {"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": data_url("image1.jpg"), "max_dynamic_patch": 1}},
                        {"type": "text", "text": "What is this?"}]},
                    {"role": "assistant", "content": "A harbour."},
                    user("And the colours?")],
                "max_tokens": 8, "seed": 11, "top_k": 5, "repetition_penalty": 1.3}),
            batch: json!({"question": "And the colours?",
                "history": [["<image>\nWhat is this?", "A harbour."]],
                "images": [{"path": jpg, "max_tiles": 1}],
                "max_new_tokens": 8, "seed": 11, "top_k": 5, "repetition_penalty": 1.3}),
        },
    ]
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A result of `ask` in openai_client.py equals the batch mode's result `b`.
fn assert_same_answer(label: &str, got: &Value, b: &Value) {
    assert!(got.get("status").is_none(), "{label}: {got}");
    assert_eq!(got["answer"], b["response"], "{label}");
    assert_eq!(got["finish_reason"], b["finish_reason"], "{label}");
    assert_eq!(
        got["usage"],
        usage(
            b["prompt_tokens"].as_u64().unwrap(),
            b["completion_tokens"].as_u64().unwrap()
        ),
        "{label}"
    );
    assert_eq!(got["role"], "assistant", "{label}");
    assert!(
        got["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{label}: {got}"
    );
}

fn streamed_too(requests: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for r in requests {
        out.push(r.clone());
        let mut s = r.clone();
        s["stream"] = json!(true);
        out.push(s);
    }
    out
}

#[test]
fn answers_equal_the_batch_modes_streamed_or_not() {
    let cases = cases();
    let expected = batch(&cases.iter().map(|c| c.batch.clone()).collect::<Vec<_>>());
    let server = Server::start(&[]);
    let models = client("models", &server, "none", &json!({}));
    assert_eq!(models, json!({"ids": [MODEL]}));
    let requests: Vec<Value> = cases.iter().map(|c| c.openai.clone()).collect();
    let got = client("complete", &server, "none", &json!(streamed_too(&requests)));
    let got = got.as_array().unwrap();
    for (i, b) in expected.iter().enumerate() {
        let whole = &got[2 * i];
        let stream = &got[2 * i + 1];
        assert_same_answer(&format!("case {i}"), whole, b);
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["model"], MODEL);
        assert_same_answer(&format!("case {i}, streamed"), stream, b);
        assert_eq!(stream["object"], "chat.completion.chunk");
        assert!(stream["pieces"].as_u64().unwrap() > 1, "{stream}");
        assert_ne!(whole["id"], stream["id"]);
    }
    // the random tiny model keeps going: every answer hit max_tokens
    assert!(expected.iter().all(|b| b["finish_reason"] == "length"));
}

/// How many tokens of `ids` the stream needs before `stop` shows in its text.
fn tokens_until(ids: &[u32], stop: &str) -> usize {
    let tok = Tokenizer::from_dir(&fixture(&format!("models/{MODEL}"))).unwrap();
    (1..=ids.len())
        .find(|&k| {
            let text = tok.decode(&ids[..k], true);
            !text.ends_with('\u{FFFD}') && text.contains(stop)
        })
        .unwrap()
}

#[test]
fn stop_strings_end_the_answer_before_them() {
    let case = &cases()[0];
    let mut long = case.batch.clone();
    long["max_new_tokens"] = json!(24);
    let b = &batch(&[long])[0];
    let full = b["response"].as_str().unwrap();
    let ids: Vec<u32> = b["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // a stop string from the middle of the answer: its first non-space character on
    let mid = full
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= full.len() / 2 && !full[i..].starts_with(char::is_whitespace))
        .unwrap();
    let stop: String = full[mid..].chars().take(2).collect();
    let at = full.find(&stop).unwrap();
    let answer = full[..at].trim_end();
    let k = tokens_until(&ids, &stop);
    assert!(
        k < ids.len(),
        "the stop string {stop:?} ends the answer early"
    );

    let server = Server::start(&[]);
    let mut r = case.openai.clone();
    r["max_tokens"] = json!(24);
    r["stop"] = json!(["never in this answer", stop]);
    let mut absent = r.clone();
    absent["stop"] = json!("never in this answer");
    let mut got = client("complete", &server, "none", &json!(streamed_too(&[r])))
        .as_array()
        .unwrap()
        .clone();
    got.extend(
        client("complete", &server, "none", &json!([absent]))
            .as_array()
            .unwrap()
            .clone(),
    );
    let prompt = b["prompt_tokens"].as_u64().unwrap();
    for g in &got[..2] {
        assert_eq!(g["answer"], answer, "stop {stop:?} in {full:?}");
        assert_eq!(g["finish_reason"], "stop");
        assert_eq!(g["usage"], usage(prompt, k as u64));
    }
    // a stop string that never shows changes nothing
    assert_same_answer("absent stop", &got[2], b);
}

#[test]
fn http_pictures_are_fetched_when_allowed() {
    let server = Server::start(&["--allow-remote-images"]);
    let ask = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "max_dynamic_patch": 1}},
            {"type": "text", "text": "Describe it."}]}],
            "max_tokens": 6, "temperature": 0})
    };
    let dir = fixture("media/images").display().to_string();
    let got = client(
        "served_images",
        &server,
        "none",
        &json!({"dir": dir, "requests": [ask("{images}/image2.jpg"), ask("{images}/none.jpg")]}),
    );
    let b = &batch(&[json!({"question": "Describe it.",
        "images": [{"path": image("image2.jpg"), "max_tiles": 1}],
        "max_new_tokens": 6, "do_sample": false})])[0];
    assert_same_answer("fetched over http", &got[0], b);
    assert_eq!(got[1]["status"], 400, "{}", got[1]);
    let message = error_of(&got[1]["body"])["message"].as_str().unwrap();
    assert!(
        message.starts_with("messages[0].content[0]: cannot fetch http://127.0.0.1:")
            && message.ends_with("none.jpg: HTTP 404 Not Found"),
        "{message}"
    );
}

/// `{"error": {"message", "type", "code"}}` (the openai client hands over the inner object).
fn error_of(body: &Value) -> &Value {
    let e = body.get("error").unwrap_or(body);
    for k in ["message", "type", "code"] {
        assert!(e[k].is_string(), "{k} in {body}");
    }
    e
}

#[test]
fn the_api_key_is_required() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let denied = client("models", &server, "wrong", &json!({}));
    assert_eq!(denied["status"], 401, "{denied}");
    assert_eq!(error_of(&denied["body"])["code"], "invalid_api_key");
    let case = &cases()[1];
    let got = client("complete", &server, "wrong", &json!([case.openai]));
    assert_eq!(got[0]["status"], 401);
    let raw = client(
        "raw",
        &server,
        "",
        &json!([
            {"method": "GET", "path": "/v1/models"},
            {"method": "POST", "path": "/v1/chat/completions", "body": case.openai.to_string()},
            {"method": "POST", "path": "/v1/chat/completions", "body": case.openai.to_string(), "key": "s3cret"},
        ]),
    );
    for r in &raw.as_array().unwrap()[..2] {
        assert_eq!(r["status"], 401, "no key: {r}");
        assert!(error_of(&r["body"])["message"]
            .as_str()
            .unwrap()
            .contains("API key"));
    }
    assert_eq!(raw[2]["status"], 200, "{}", raw[2]);
    let allowed = client("complete", &server, "s3cret", &json!([case.openai]));
    let b = &batch(std::slice::from_ref(&case.batch))[0];
    assert_same_answer("with the key", &allowed[0], b);
    assert_eq!(
        raw[2]["body"]["choices"][0]["message"]["content"],
        b["response"]
    );
}

#[test]
fn malformed_requests_get_a_json_error_naming_the_problem() {
    let server = Server::start(&[]);
    let post = |body: &str| json!({"method": "POST", "path": "/v1/chat/completions", "body": body});
    let hello = |extra: Value| {
        let mut b = json!({"messages": [user("Hello")], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let image = |url: &str| {
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]})
        .to_string()
    };
    let cases: Vec<(Value, u64, &str)> = vec![
        (post("{\"messages\": ["), 400, "invalid JSON body"),
        (post("[]"), 400, "the request body must be a JSON object"),
        (post("{\"max_tokens\": 2}"), 400, "messages: missing"),
        (
            post(&hello(json!({"messages": "Hello"}))),
            400,
            "messages: expected an array",
        ),
        (
            post(&hello(json!({"max_tokens": -3}))),
            400,
            "max_tokens: invalid value: integer `-3`",
        ),
        (
            post(&hello(json!({"temperature": "warm"}))),
            400,
            "temperature: invalid type: string",
        ),
        (
            post(&hello(json!({"top_p": 0}))),
            400,
            "top_p must be in (0, 1]",
        ),
        (
            post(&hello(
                json!({"messages": [{"role": "user", "content": 5}]}),
            )),
            400,
            "messages[0].content: expected a string or an array of parts",
        ),
        (
            post(&image("http://example.com/a.jpg")),
            400,
            "--allow-remote-images",
        ),
        (
            post(&image("data:image/png;base64,%%%")),
            400,
            "invalid base64",
        ),
        (
            post(&image("file:///tmp/a%zz.jpg")),
            400,
            "bad percent-encoding in \"file:///tmp/a%zz.jpg\": malformed escape \"%zz\"",
        ),
        (
            post(&image("file:///no/such/picture.jpg")),
            400,
            "/no/such/picture.jpg: no such file",
        ),
        // decodes as base64 but is no picture: the engine refuses it, still a 400
        (
            post(&image("data:image/png;base64,aGVsbG8gd29ybGQ=")),
            400,
            "messages[0].content[0] is not an image",
        ),
        (
            post(&hello(json!({"max_tokens": 40000}))),
            400,
            "exceeds the context window",
        ),
        (
            post(&hello(json!({"model": "gpt-4o"}))),
            404,
            "\"gpt-4o\" does not exist",
        ),
        (
            json!({"method": "GET", "path": "/v1/chat/completions"}),
            405,
            "GET /v1/chat/completions",
        ),
        (
            json!({"method": "GET", "path": "/v1/nothing"}),
            404,
            "unknown route: GET /v1/nothing",
        ),
        (
            json!({"method": "GET", "path": "/v1/models/other"}),
            404,
            "\"other\" does not exist",
        ),
    ];
    let spec: Vec<Value> = cases.iter().map(|c| c.0.clone()).collect();
    let got = client("raw", &server, "", &json!(spec));
    for ((req, status, want), r) in cases.iter().zip(got.as_array().unwrap()) {
        assert_eq!(&r["status"], status, "{req}: {r}");
        let message = error_of(&r["body"])["message"].as_str().unwrap();
        assert!(
            message.contains(want),
            "{req}: {message:?} should say {want:?}"
        );
    }
    // the official client sees the same
    let via_client = client(
        "complete",
        &server,
        "none",
        &json!([{"messages": [user("Hello")], "max_tokens": -1}, {"messages": [], "max_tokens": 2}]),
    );
    assert_eq!(via_client[0]["status"], 400);
    assert_eq!(via_client[1]["status"], 400);
    assert!(error_of(&via_client[1]["body"])["message"]
        .as_str()
        .unwrap()
        .contains("messages: must not be empty"));
    // and the server still answers
    let fine = client(
        "complete",
        &server,
        "none",
        &json!([{"messages": [user("Hello")], "max_tokens": 2}]),
    );
    assert_eq!(fine[0]["usage"]["completion_tokens"], 2, "{fine}");
}

#[test]
fn a_client_that_leaves_cancels_its_request() {
    let server = Server::start(&[]);
    let endless =
        json!({"messages": [user("Go on and on.")], "max_tokens": 30000, "min_tokens": 30000});
    let last = cases()[1].openai.clone();
    let got = client(
        "disconnect",
        &server,
        "none",
        &json!({"long": endless, "read": 5, "waiting": endless, "give_up_after_s": 1.0, "last": last}),
    );
    assert_eq!(got["alone"], "gave up");
    assert_eq!(got["long_pieces"], 5);
    assert_eq!(got["waiting"], "gave up");
    let long_id = got["long_id"].as_str().unwrap();
    let (prefix, n) = long_id.rsplit_once('-').unwrap();
    let n: u64 = n.parse().unwrap();
    let alone_id = format!("{prefix}-{}", n - 1);
    let waiting_id = format!("{prefix}-{}", n + 1);
    // a non-streamed answer writes nothing while it runs: its tokens keep coming, and still
    // the socket is watched
    server.wait_log("the lone request's cancel", |l| {
        l.contains(&format!("{alone_id}: cancelled: the client went away"))
    });
    let line = server.wait_log("the streamed request's cancel", |l| {
        l.contains(&format!("{long_id}: cancelled: the client went away"))
    });
    let generated: usize = line
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(generated < 30000, "{line}");
    // the waiting one was dropped from the queue, or cancelled as soon as it started
    server.wait_log("the waiting request's cancel", |l| {
        l.contains(&format!("{waiting_id}: cancelled"))
    });
    let log = server.log();
    for id in [&alone_id, long_id, &waiting_id] {
        let finished = log
            .lines()
            .any(|l| l.contains(&format!("{id}: ")) && l.contains("completion tokens"));
        assert!(!finished, "{id} was not cut short:\n{log}");
    }
    // the next request is answered, and answered right
    let b = &batch(&[cases()[1].batch.clone()])[0];
    assert_same_answer("after the cancels", &got["last"], b);
}

#[test]
fn eight_clients_twenty_requests_each() {
    // five different requests, half of them streamed: every client sends all twenty
    let base: Vec<Case> = (0..5)
        .map(|i| Case {
            openai: json!({"messages": [user(&format!("Count to {i}."))], "max_tokens": 1 + i % 3, "seed": 100 + i}),
            batch: json!({"question": format!("Count to {i}."), "max_new_tokens": 1 + i % 3, "seed": 100 + i}),
        })
        .collect();
    let expected = batch(&base.iter().map(|c| c.batch.clone()).collect::<Vec<_>>());
    let requests: Vec<Value> = (0..20)
        .map(|j| {
            let mut r = base[j % 5].openai.clone();
            r["stream"] = json!(j % 2 == 1);
            r
        })
        .collect();
    let server = Server::start(&[]);
    let got = client(
        "load",
        &server,
        "none",
        &json!({"clients": 8, "requests": requests}),
    );
    assert_eq!(got["errors"], json!([]), "{}", server.log());
    let results = got["results"].as_array().unwrap();
    assert_eq!(results.len(), 8);
    let mut ids = std::collections::HashSet::new();
    for (c, per_client) in results.iter().enumerate() {
        let per_client = per_client.as_array().unwrap();
        assert_eq!(per_client.len(), 20, "client {c}");
        for (j, r) in per_client.iter().enumerate() {
            assert_same_answer(&format!("client {c} request {j}"), r, &expected[j % 5]);
            assert!(ids.insert(r["id"].as_str().unwrap().to_string()), "{r}");
        }
    }
    assert_eq!(ids.len(), 160, "every request answered once");
}

/// The load of `sixteen_clients_with_cancels_answer_as_one_at_a_time` on `server`: results per
/// client, and seconds.
fn load_with_cancels(server: &Server, requests: &[Vec<Value>]) -> (Vec<Vec<Value>>, f64) {
    let got = client(
        "load_cancels",
        server,
        "none",
        &json!({"clients": requests.len(), "requests": requests}),
    );
    assert_eq!(got["errors"], json!([]), "{}", server.log());
    let results = got["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().clone())
        .collect();
    (results, got["seconds"].as_f64().unwrap())
}

/// 16 clients x 10 requests of mixed lengths (prompts and answers), streamed or not, some of
/// them cancelled midway by closing their connection, against the scheduler (`--max-batch 8`)
/// and one request at a time (`--max-batch 1`): every answer is whole and the one the request
/// gets alone (the batch mode's), nothing is lost or answered twice, and every cancelled
/// request ends on the server.
#[test]
fn sixteen_clients_with_cancels_answer_as_one_at_a_time() {
    let lengths = [2usize, 16, 6, 20, 4, 10];
    let base: Vec<Case> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let q = format!("{} Describe number {i}.", "Please be thorough. ".repeat(i * 3));
            let greedy = i % 3 != 2;
            let mut openai = json!({"messages": [user(&q)], "max_tokens": n, "min_tokens": n / 2, "seed": 40 + i});
            let mut batch = json!({"question": q, "max_new_tokens": n, "min_new_tokens": n / 2, "seed": 40 + i});
            if greedy {
                openai["temperature"] = json!(0);
                batch["do_sample"] = json!(false);
            }
            Case { openai, batch }
        })
        .collect();
    let expected = batch(&base.iter().map(|c| c.batch.clone()).collect::<Vec<_>>());
    let endless = json!({"messages": [user("Go on and on.")], "max_tokens": 30000, "min_tokens": 30000, "cancel_after": 3});
    // (client, request) -> the case asked, or None for a cancelled one
    let plan: Vec<Vec<Option<usize>>> = (0..16)
        .map(|c| {
            (0..10)
                .map(|j| ((c + j) % 7 != 3).then_some((c * 10 + j) % lengths.len()))
                .collect()
        })
        .collect();
    let requests: Vec<Vec<Value>> = plan
        .iter()
        .map(|p| {
            p.iter()
                .enumerate()
                .map(|(j, k)| match k {
                    Some(k) => {
                        let mut r = base[*k].openai.clone();
                        r["stream"] = json!(j % 2 == 1);
                        r
                    }
                    None => endless.clone(),
                })
                .collect()
        })
        .collect();
    let cancels = plan.iter().flatten().filter(|k| k.is_none()).count();
    assert!(cancels >= 16, "{cancels}");
    let mut seconds = Vec::new();
    for max_batch in ["1", "8"] {
        let server = Server::start(&["--max-batch", max_batch]);
        let (results, s) = load_with_cancels(&server, &requests);
        seconds.push(s);
        let mut ids = std::collections::HashSet::new();
        for (c, (per_client, p)) in results.iter().zip(&plan).enumerate() {
            assert_eq!(per_client.len(), 10, "client {c}");
            for (j, (r, k)) in per_client.iter().zip(p).enumerate() {
                let label = format!("--max-batch {max_batch}: client {c} request {j}");
                match k {
                    Some(k) => {
                        assert_same_answer(&label, r, &expected[*k]);
                        assert!(ids.insert(r["id"].as_str().unwrap().to_string()), "{r}");
                    }
                    None => assert_eq!(r["cancelled_after"], 3, "{label}: {r}"),
                }
            }
        }
        assert_eq!(ids.len(), 160 - cancels, "every request answered once");
        // every cancelled request ended on the server, none of them ran to its length
        let t = Instant::now();
        loop {
            let log = server.log();
            let ended = log
                .lines()
                .filter(|l| l.contains(": cancelled: the client went away ("))
                .count();
            if ended == cancels {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{ended} of {cancels} cancels seen:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!(
        "16 clients x 10 requests: {:.2} s one at a time, {:.2} s with --max-batch 8 ({:.2}x)",
        seconds[0],
        seconds[1],
        seconds[0] / seconds[1]
    );
}

fn run_bin(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn remote_one_shot_answers_as_the_local_one_shot() {
    let server = Server::start(&["--api-key", "k1"]);
    let m = model_dir();
    let jpg = format!("{}:2", image("image1.jpg"));
    let asks: [&[&str]; 3] = [
        &[
            "--prompt",
            "Tell me about boats.",
            "--seed",
            "5",
            "--max-new-tokens",
            "12",
        ],
        &[
            "--prompt",
            "Hello",
            "--greedy",
            "--max-new-tokens",
            "9",
            "--system",
            "Be brief.",
        ],
        &[
            "--image",
            &jpg,
            "--prompt",
            "What is this?",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.5",
        ],
    ];
    for ask in asks {
        let mut local = vec!["--model", m.as_str()];
        local.extend(ONE_CPU_THREAD);
        local.extend(ask);
        let want = run_bin(&local);
        assert!(
            want.status.success(),
            "{}",
            String::from_utf8_lossy(&want.stderr)
        );
        let mut remote = vec!["--remote", &server.url, "--api-key", "k1"];
        remote.extend(ask);
        let got = run_bin(&remote);
        assert!(
            got.status.success(),
            "{ask:?}: {}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert_eq!(
            String::from_utf8(got.stdout).unwrap(),
            String::from_utf8(want.stdout).unwrap(),
            "{ask:?}"
        );
    }
    // failures are one line: a wrong key, an unknown model, a video, no server
    let video = fixture("media/videos/video_90.mov").display().to_string();
    let url = server.url.clone();
    let failures: [(Vec<&str>, &str); 4] = [
        (
            vec!["--remote", &url, "--api-key", "bad", "--prompt", "Hi"],
            "HTTP 401: invalid or missing API key",
        ),
        (
            vec![
                "--remote",
                &url,
                "--api-key",
                "k1",
                "--remote-model",
                "x",
                "--prompt",
                "Hi",
            ],
            "no model \"x\" (the server has tiny-qwen2)",
        ),
        (
            vec![
                "--remote",
                &url,
                "--api-key",
                "k1",
                "--video",
                &video,
                "--prompt",
                "Hi",
            ],
            "videos are not supported",
        ),
        (
            vec!["--remote", "http://127.0.0.1:9", "--prompt", "Hi"],
            "cannot reach http://127.0.0.1:9/v1/models",
        ),
    ];
    for (args, want) in failures {
        let o = run_bin(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("internvl-chat: error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn remote_chat_streams_and_cancels() {
    let server = Server::start(&[]);
    let home = tempfile::tempdir().unwrap();
    let args: Vec<String> = [
        "--remote",
        &server.url,
        "--max-new-tokens",
        "30000",
        "--min-new-tokens",
        "30000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = Tmux::start("ivl-remote", home.path(), &args);
    let ready = t.wait("the connection", 60, |s| s.contains("ready"));
    assert!(
        ready.contains("tiny-qwen2 · remote · 127.0.0.1:"),
        "{ready}"
    );
    t.text(&format!("/image {} 2", image("image1.jpg")));
    t.keys(&["Enter"]);
    t.wait("the staged image", 30, |s| {
        s.contains("image1.jpg") && s.contains("1×1 = 1 tiles · 256 tokens")
    });
    t.text("Describe the image.");
    t.keys(&["Enter"]);
    let first = t.wait("tokens", 60, |s| streamed(s) > 5);
    t.wait("more tokens", 60, |s| streamed(s) > streamed(&first) + 5);
    t.keys(&["Escape"]);
    let stopped = t.wait("the cancel", 30, |s| {
        s.contains("stopped") && s.contains("ready")
    });
    assert_eq!(streamed(&stopped), 0);
    // the server saw the stream close and stopped generating
    let line = server.wait_log("the cancel on the server", |l| {
        l.contains(": cancelled: the client went away")
    });
    assert!(line.contains("-1: cancelled"), "{line}");
    // a short answer next, with the cancelled exchange as history
    t.text("/set min_new_tokens 0");
    t.keys(&["Enter"]);
    t.text("/set max_new_tokens 8");
    t.keys(&["Enter"]);
    t.text("And the colours?");
    t.keys(&["Enter"]);
    t.wait("the second answer", 60, |s| {
        s.contains("And the colours?")
            && s.matches("first token after").count() >= 2
            && s.contains("ready")
    });
    let done = server.wait_log("the second request", |l| l.contains("-2: "));
    assert!(
        done.contains("prompt + 8 completion tokens, finish length, streamed"),
        "{done}"
    );
}

#[test]
fn startup_errors_are_one_line_and_a_signal_stops_the_server() {
    let m = model_dir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let failures: [(Vec<&str>, String); 3] = [
        (
            vec!["serve", "--model", &m, "--device", "cpu", "--port", &port],
            format!("cannot listen on 127.0.0.1:{port}"),
        ),
        (
            vec!["serve", "--model", "/nonexistent/model"],
            "/nonexistent/model".into(),
        ),
        (
            vec!["serve", "--model", &m, "--api-key", ""],
            "--api-key: the key must not be empty".into(),
        ),
    ];
    for (args, want) in failures {
        let o = run_bin(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(&want), "{args:?}: {err}");
    }
    // SIGTERM: the server ends at once, taking its pictures folder with it
    let server = Server::start(&["-v"]);
    let got = client("complete", &server, "none", &json!([cases()[2].openai]));
    assert_eq!(got[0]["usage"]["completion_tokens"], 10, "{got}");
    let line = server.wait_log("the pictures folder", |l| {
        l.contains("pictures of requests go to ")
    });
    let dir = PathBuf::from(line.split("go to ").nth(1).unwrap());
    assert!(dir.is_dir(), "{}", dir.display());
    let log = server.log.clone();
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());
    // the last lines may still be on their way from the pipe
    let t = Instant::now();
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("stopping (signal 15)"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the thinking checkpoint writes, whatever it is asked: a think block, then the answer.
const THOUGHT: &str = "Both shapes are cats.";
const ANSWER: &str = "Two of them!";

/// A checkpoint that thinks for real: tiny-qwen2's weights with InternVL3.5's tokenizer
/// (`<think>` 151667, `</think>` 151668), rewritten so that greedy decoding writes
/// `<think>THOUGHT\n</think>\n\nANSWER<|im_end|>`. Every layer's `o_proj` and `down_proj` are
/// zero, so each position's final hidden state is its own token's embedding; the embeddings of
/// the prompt's last token and of each token written are one-hot, and `lm_head` maps each of
/// them to the token that follows it (a bigram table the forward pass really computes).
fn thinking_checkpoint() -> tempfile::TempDir {
    use tch::Tensor;
    let dir = tempfile::tempdir().unwrap();
    let qwen2 = fixture("models/tiny-qwen2");
    let qwen3 = fixture("models/tiny-qwen3");
    for f in [
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(qwen3.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        qwen2.join("generation_config.json"),
        dir.path().join("generation_config.json"),
    )
    .unwrap();
    let vocab = 151936i64;
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(qwen2.join("config.json")).unwrap()).unwrap();
    cfg["llm_config"]["vocab_size"] = json!(vocab);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();

    let tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let text = format!("<think>{THOUGHT}\n</think>\n\n{ANSWER}");
    let mut seq = vec![tokenizer.encode("\n").unwrap()[0]];
    seq.extend(tokenizer.encode(&text).unwrap());
    seq.push(tokenizer.encode("<|im_end|>").unwrap()[0]);
    assert_eq!(seq[1], 151667, "<think> is one token");
    assert!(seq.contains(&151668), "</think> is one token");
    assert_eq!(tokenizer.decode(&seq[1..seq.len() - 1], true), text);
    let inputs = &seq[..seq.len() - 1];
    let mut distinct = inputs.to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        inputs.len(),
        "a bigram table needs distinct inputs: {seq:?}"
    );

    let mut tensors = Tensor::read_safetensors(qwen2.join("model.safetensors")).unwrap();
    let hidden = tensors
        .iter()
        .find(|(n, _)| n == "language_model.model.norm.weight")
        .unwrap()
        .1
        .size()[0];
    assert!(inputs.len() as i64 <= hidden);
    for (name, t) in tensors.iter_mut() {
        let kind = t.kind();
        let grow = |t: &Tensor| {
            let extra = Tensor::zeros([vocab - t.size()[0], hidden], (kind, t.device()));
            Tensor::cat(&[t, &extra], 0)
        };
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            *t = t.zeros_like();
        } else if name == "language_model.model.norm.weight" {
            *t = t.ones_like();
        } else if name == "language_model.model.embed_tokens.weight" {
            let e = grow(t);
            for (i, &id) in inputs.iter().enumerate() {
                let one_hot = Tensor::zeros([hidden], (kind, e.device()));
                let _ = one_hot.get(i as i64).fill_(1.0);
                e.get(id as i64).copy_(&one_hot);
            }
            *t = e;
        } else if name == "language_model.lm_head.weight" {
            let h = Tensor::zeros([vocab, hidden], (kind, t.device()));
            for (i, &next) in seq[1..].iter().enumerate() {
                let _ = h.get(next as i64).get(i as i64).fill_(1.0);
            }
            *t = h;
        }
    }
    Tensor::write_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn thinking_reaches_the_openai_client_as_reasoning_content() {
    let ckpt = thinking_checkpoint();
    let m = ckpt.path().display().to_string();
    let whole = format!("<think>{THOUGHT}\n</think>\n\n{ANSWER}");
    // the local one-shot prints the answer as the model wrote it
    let local = run_bin(&[
        "--model",
        &m,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--think",
        "--greedy",
        "-p",
        "How many cats?",
    ]);
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    assert_eq!(
        String::from_utf8(local.stdout).unwrap(),
        format!("{whole}\n")
    );
    // --think and --system together: a usage error
    let both = run_bin(&["--model", &m, "--think", "--system", "x", "-p", "q"]);
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("'--think' cannot be used with"));

    // batch: the reasoning and the content apart, besides the full response
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines = [
        json!({"id": 1, "question": "How many cats?", "think": true, "do_sample": false}),
        json!({"id": 2, "question": "How many cats?", "think": true, "system": "x"}),
    ];
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&input, text.join("\n")).unwrap();
    let out = Command::new(BIN)
        .args(["batch", "--model", &m])
        .args(ONE_CPU_THREAD)
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    let results: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results[0]["response"], whole.as_str());
    assert_eq!(results[0]["reasoning"], THOUGHT);
    assert_eq!(results[0]["content"], ANSWER);
    assert_eq!(
        results[1]["error"],
        "think: cannot be combined with system (thinking has its own system message)"
    );

    let server = Server::start_with(&m, &["--served-model-name", MODEL]);
    let ask = |extra: Value, stream: bool| {
        let mut r = json!({
            "messages": [user("How many cats?")],
            "temperature": 0,
            "stream": stream,
        });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let spec = json!([
        ask(json!({"reasoning_effort": "high"}), false),
        ask(
            json!({"chat_template_kwargs": {"enable_thinking": true}}),
            true
        ),
        ask(json!({"reasoning": true}), true),
        // not asked, yet the answer has a think block: still given apart
        ask(json!({}), false),
    ]);
    let got = client("complete", &server, "none", &spec);
    for (i, r) in got.as_array().unwrap().iter().enumerate() {
        assert_eq!(r["answer"], ANSWER, "{i}: {r}");
        assert_eq!(r["reasoning_content"], THOUGHT, "{i}: {r}");
        assert_eq!(r["finish_reason"], "stop", "{i}: {r}");
    }
    // streamed as the model wrote it: a delta per token of thinking
    assert!(
        got[1]["reasoning_pieces"].as_u64().unwrap() > 1,
        "{}",
        got[1]
    );
    // a malformed switch names its field; a system message of its own is refused
    let bad = json!([
        {"method": "POST", "path": "/v1/chat/completions",
         "body": ask(json!({"reasoning_effort": 1}), false).to_string()},
        {"method": "POST", "path": "/v1/chat/completions",
         "body": json!({"messages": [{"role": "system", "content": "Be brief."}, user("q")],
                        "reasoning": true}).to_string()},
    ]);
    let errors = client("raw", &server, "none", &bad);
    assert_eq!(errors[0]["status"], 400);
    assert!(errors[0]["body"]["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("reasoning_effort: expected a string"));
    assert_eq!(
        errors[1]["body"]["error"]["message"],
        "reasoning: thinking has its own system message; leave out the system message"
    );

    // --remote --think: the server's reasoning_content comes back as a think block
    let remote = run_bin(&[
        "--remote",
        &server.url,
        "--think",
        "--greedy",
        "-p",
        "How many cats?",
    ]);
    assert!(
        remote.status.success(),
        "{}",
        String::from_utf8_lossy(&remote.stderr)
    );
    assert_eq!(
        String::from_utf8(remote.stdout).unwrap(),
        format!("<think>\n{THOUGHT}\n</think>\n\n{ANSWER}\n"),
        "the local one-shot's shape"
    );
}

#[test]
fn remote_chat_shows_a_servers_thinking_as_local_thinking() {
    let ckpt = thinking_checkpoint();
    let m = ckpt.path().display().to_string();
    let server = Server::start_with(&m, &["--served-model-name", MODEL]);
    let home = tempfile::tempdir().unwrap();
    let args: Vec<String> = ["--remote", &server.url, "--think", "--greedy"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let t = Tmux::start("ivl-think", home.path(), &args);
    let ready = t.wait("the connection", 60, |s| s.contains("ready"));
    assert!(ready.contains("thinking on"), "{ready}");
    t.text("How many cats?");
    t.keys(&["Enter"]);
    let done = t.wait("the answer", 60, |s| {
        s.contains("first token after") && s.contains("ready")
    });
    assert!(
        done.contains("▸ thought for 1 line — F4 to expand"),
        "{done}"
    );
    assert!(done.contains(ANSWER), "{done}");
    assert!(!done.contains(THOUGHT), "collapsed: {done}");
    assert!(!done.contains("<think>"), "{done}");
    t.keys(&["F4"]);
    let open = t.wait("the thinking", 30, |s| s.contains(THOUGHT));
    assert!(open.contains(&format!("│ {THOUGHT}")), "{open}");
    assert!(
        open.contains("▾ thought for 1 line — F4 to collapse"),
        "{open}"
    );
}

/// A TCP connection to `port` on 127.0.0.1 from the loopback address `from` (127.0.0.x), so a
/// test can be another client address than its other connections.
fn connect_from(from: [u8; 4], port: u16) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        // network byte order is the order of the bytes as written
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, plain C structs of the right size; the fd is owned once wrapped
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let src = sockaddr(from, 0);
        let dst = sockaddr([127, 0, 0, 1], port);
        assert_eq!(libc::bind(fd, (&raw const src).cast(), len), 0, "bind");
        assert_eq!(
            libc::connect(fd, (&raw const dst).cast(), len),
            0,
            "connect"
        );
        stream
    }
}

fn port_of(server: &Server) -> u16 {
    server.url.rsplit(':').next().unwrap().parse().unwrap()
}

/// Sends `request` and reads the whole response (the server closes after it), within `secs`.
fn exchange(mut s: std::net::TcpStream, request: &[u8], secs: u64) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    s.write_all(request).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn half_open_connections_from_one_address_do_not_lock_out_another() {
    use std::io::Read;
    let server = Server::start(&["--api-key", "k"]);
    let port = port_of(&server);
    let start = Instant::now();
    let mut half_open = Vec::new();
    for _ in 0..300 {
        let mut s = connect_from([127, 0, 0, 1], port);
        s.write_all(b"POST /v1/chat/comp").unwrap();
        half_open.push(s);
    }
    let t = Instant::now();
    let models = exchange(
        connect_from([127, 0, 0, 2], port),
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nConnection: close\r\n\r\n",
        30,
    );
    let took = t.elapsed();
    assert!(models.starts_with("HTTP/1.1 200 OK\r\n"), "{models}");
    assert!(models.contains("tiny-qwen2"), "{models}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    // the ones over the per-address cap were told so at once
    let mut refused = 0;
    for s in &mut half_open[200..] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains("connections from 127.0.0.1"), "{text}");
        refused += 1;
    }
    assert_eq!(refused, 100);
    // without the key, a request announcing a large body is refused before the body is read
    let t = Instant::now();
    let denied = exchange(
        connect_from([127, 0, 0, 3], port),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n{",
        30,
    );
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // 200 connections held open cost threads, not memory
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(rss_kib < 1 << 20, "server RSS {} MiB", rss_kib >> 10);
    drop(half_open);
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_client_trickling_a_byte_at_a_time_is_cut_at_the_request_deadline() {
    use std::io::Read;
    let server = Server::start(&["--request-timeout", "2"]);
    let mut s = connect_from([127, 0, 0, 1], port_of(&server));
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let request = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 1000\r\n\r\n";
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // a byte each 100 ms: each read is quick, the request is never whole
    for b in request.iter().chain(std::iter::repeat(&b'x')) {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never cut");
    }
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(text.contains("did not arrive within 2 seconds"), "{text}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

#[test]
fn a_huge_message_is_refused_before_it_is_tokenized_with_the_numbers() {
    let server = Server::start(&[]);
    let body = json!({"messages": [user(&"word ".repeat(6 << 20))], "max_tokens": 4}).to_string();
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    let t = Instant::now();
    let response = exchange(connect_from([127, 0, 0, 1], port_of(&server)), &request, 60);
    let took = t.elapsed();
    assert!(response.starts_with("HTTP/1.1 400"), "{:.300}", response);
    assert!(
        response.contains("question of 31457280 bytes is at least")
            && response.contains("exceeds the context window of 32768 tokens"),
        "{response:.500}"
    );
    // 30 MB over loopback and parsed as JSON, but never tokenized
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    // and the server goes on
    let models = exchange(
        connect_from([127, 0, 0, 1], port_of(&server)),
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        30,
    );
    assert!(models.starts_with("HTTP/1.1 200 OK\r\n"), "{models}");
}

/// `serve` of an -hf checkpoint: a greedy request gets transformers' answer (its chat template,
/// no default system message, the answer not stripped).
#[test]
fn serve_takes_hf_checkpoints() {
    let m = fixture("models/tiny-qwen2-hf").display().to_string();
    let server = Server::start_with(&m, &["--dtype", "f32"]);
    let body = json!({"model": "tiny-qwen2-hf", "messages": [user("Hello, who are you?")],
        "max_tokens": 24, "temperature": 0});
    let mut resp = ureq::post(&format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("golden/tiny-qwen2-hf/text_hello.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"], g["turns"][0]["response"],
        "{v}"
    );
}
