//! Models by name against a local server on 127.0.0.1 that serves fixture checkpoints in the
//! Hub's URL layout (`/api/models/{id}/revision/{rev}`, `/{id}/resolve/{rev}/{file}` with
//! `X-Repo-Commit`, `ETag`/`X-Linked-Etag` and HTTP ranges): download into the standard cache,
//! resume after a cut transfer, refuse a checksum mismatch, reuse the cache offline.
use internvl_chat::testutil::fixture;
use serde_json::{json, Value};
use sha1::Digest as _;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct Behaviour {
    /// The first full transfer of this file stops after this many bytes.
    cut: Option<(String, usize)>,
    /// This file is served with one byte changed (its announced checksum stays right).
    corrupt: Option<String>,
    /// Requests without `Authorization: Bearer <token>` get 401.
    token: Option<String>,
}

struct Hub {
    url: String,
    /// "GET <path> <range or ->" per request.
    log: Arc<Mutex<Vec<String>>>,
}

struct RepoFiles {
    id: String,
    folder: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Hub {
    fn start(repos: Vec<RepoFiles>, behaviour: Behaviour) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(behaviour));
        let repos: Arc<HashMap<String, PathBuf>> =
            Arc::new(repos.into_iter().map(|r| (r.id, r.folder)).collect());
        let l2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (log, state, repos) = (l2.clone(), state.clone(), repos.clone());
                std::thread::spawn(move || serve(conn, &repos, &state, &log));
            }
        });
        Hub { url, log }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

fn serve(
    mut conn: TcpStream,
    repos: &HashMap<String, PathBuf>,
    state: &Mutex<Behaviour>,
    log: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let range = headers.get("range").cloned();
    log.lock().unwrap().push(format!(
        "GET {path} {}",
        range.clone().unwrap_or_else(|| "-".into())
    ));
    let json_hdr = vec![("Content-Type".to_string(), "application/json".to_string())];
    if let Some(t) = &state.lock().unwrap().token {
        if headers.get("authorization") != Some(&format!("Bearer {t}")) {
            let body = br#"{"error":"Invalid credentials"}"#;
            respond(&mut conn, "401 Unauthorized", &json_hdr, body);
            return;
        }
    }
    let not_found = |conn: &mut TcpStream| {
        let body = br#"{"error":"Repository not found"}"#;
        respond(conn, "404 Not Found", &json_hdr, body);
    };
    // /api/models/{org}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.split('/').collect();
        let id = format!("{}/{}", parts[0], parts.get(1).unwrap_or(&""));
        let Some(folder) = repos.get(&id) else {
            return not_found(&mut conn);
        };
        let mut siblings: Vec<Value> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| json!({"rfilename": e.unwrap().file_name().to_string_lossy()}))
            .collect();
        // files a real InternVL repository has and we must not fetch (this server lacks them)
        for extra in [
            "modeling_internvl_chat.py",
            "README.md",
            "examples/image1.jpg",
        ] {
            siblings.push(json!({ "rfilename": extra }));
        }
        let body = json!({"id": id, "sha": COMMIT, "siblings": siblings}).to_string();
        respond(&mut conn, "200 OK", &json_hdr, body.as_bytes());
        return;
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return not_found(&mut conn);
    }
    let id = format!("{}/{}", parts[0], parts[1]);
    let file = parts[4].to_string();
    let Some(data) = repos
        .get(&id)
        .and_then(|folder| std::fs::read(folder.join(&file)).ok())
    else {
        return not_found(&mut conn);
    };
    let mut hdrs = vec![("X-Repo-Commit".to_string(), COMMIT.to_string())];
    if file.ends_with(".safetensors") {
        let sha = hex(&sha2::Sha256::digest(&data));
        hdrs.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
        hdrs.push(("ETag".into(), "\"lfs-pointer-etag\"".into()));
    } else {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", data.len()).as_bytes());
        h.update(&data);
        hdrs.push(("ETag".into(), format!("\"{}\"", hex(&h.finalize()))));
    }
    let mut body = data.clone();
    if state.lock().unwrap().corrupt.as_deref() == Some(file.as_str()) {
        let mid = body.len() / 2;
        body[mid] ^= 0xff;
    }
    let total = body.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse().unwrap()
            };
            (a, b.min(total - 1))
        });
    let (status, lo, hi) = match start {
        Some((a, b)) => ("206 Partial Content", a, b),
        None => ("200 OK", 0, total - 1),
    };
    if start.is_some() {
        hdrs.push(("Content-Range".into(), format!("bytes {lo}-{hi}/{total}")));
    }
    hdrs.push(("Content-Length".into(), (hi + 1 - lo).to_string()));
    let mut slice = &body[lo..=hi];
    // a transfer that breaks off (the first full download of the chosen file only)
    {
        let mut st = state.lock().unwrap();
        if let Some((f, n)) = &st.cut {
            if *f == file && hi + 1 - lo > 1 {
                slice = &slice[..*n];
                st.cut = None;
            }
        }
    }
    respond(&mut conn, status, &hdrs, slice);
    let _ = conn.flush();
    // drain nothing more; closing the socket ends the (possibly short) body
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let mut sink = Vec::new();
    let _ = reader.read_to_end(&mut sink);
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("internvl-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The binary with a clean Hub environment: cache under `home`, endpoint `endpoint`.
fn bin(home: &Path, endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_internvl-chat"));
    for v in [
        "INTERNVL_MODEL",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(v);
    }
    c.env("HF_HOME", home).env("HF_ENDPOINT", endpoint);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

const ASK: [&str; 9] = [
    "--dtype",
    "f32",
    "--device",
    "cpu",
    "--greedy",
    "--max-new-tokens",
    "24",
    "--prompt",
    "Hello, who are you?",
];

fn run(mut c: Command, args: &[&str]) -> Output {
    c.args(args);
    c.args(ASK);
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn golden_answer(model: &str) -> String {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("golden/{model}/text_hello.json"))).unwrap(),
    )
    .unwrap();
    format!("{}\n", g["turns"][0]["response"].as_str().unwrap())
}

fn assert_one_line_error(o: &Output, what: &[&str]) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("internvl-chat: error: "), "{err}");
    for w in what {
        assert!(err.contains(w), "{err:?} should mention {w:?}");
    }
}

fn repo(id: &str, model: &str) -> RepoFiles {
    RepoFiles {
        id: id.into(),
        folder: fixture(&format!("models/{model}")),
    }
}

/// Downloads a sharded checkpoint by name into HF_HOME's cache in the Hub's layout, answers as
/// the local folder does, then answers again offline (flag and HF_HUB_OFFLINE) with no request.
#[test]
fn download_by_name_then_reuse_offline() {
    let hub = Hub::start(
        vec![repo("test-org/tiny-internlm2", "tiny-internlm2")],
        Behaviour::default(),
    );
    let home = tmpdir("download");
    let o = run(
        bin(&home, &hub.url),
        &["--model", "test-org/tiny-internlm2"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), golden_answer("tiny-internlm2"));

    let repo_dir = home.join("hub/models--test-org--tiny-internlm2");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let snap = repo_dir.join("snapshots").join(COMMIT);
    for f in std::fs::read_dir(fixture("models/tiny-internlm2")).unwrap() {
        let name = f.unwrap().file_name();
        let p = snap.join(&name);
        assert!(p.is_symlink(), "{} is a pointer into blobs/", p.display());
        let want = std::fs::read(fixture("models/tiny-internlm2").join(&name)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want, "{name:?}");
    }
    let reqs = hub.requests();
    assert!(
        !reqs
            .iter()
            .any(|r| r.contains(".py") || r.contains("README") || r.contains("examples/")),
        "fetched files the engine does not use: {reqs:?}"
    );

    let before = hub.requests().len();
    let o = run(
        bin(&home, &hub.url),
        &["--model", "test-org/tiny-internlm2", "--offline"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), golden_answer("tiny-internlm2"));
    let mut c = bin(&home, &hub.url);
    c.env("HF_HUB_OFFLINE", "1");
    let o = run(c, &["--model", "test-org/tiny-internlm2"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), golden_answer("tiny-internlm2"));
    assert_eq!(
        hub.requests().len(),
        before,
        "offline runs touched the network"
    );

    // online again: the commit is asked for, nothing is downloaded twice
    let o = run(
        bin(&home, &hub.url),
        &["--model", "test-org/tiny-internlm2"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let new: Vec<String> = hub.requests()[before..].to_vec();
    assert!(
        new.iter().all(|r| r.starts_with("GET /api/models/")),
        "cached files fetched again: {new:?}"
    );
}

/// A transfer that breaks off is resumed with an HTTP range from where it stopped.
#[test]
fn an_interrupted_download_resumes() {
    let cut = 3_000_000;
    let hub = Hub::start(
        vec![repo("test-org/tiny-qwen2", "tiny-qwen2")],
        Behaviour {
            cut: Some(("model.safetensors".into(), cut)),
            ..Default::default()
        },
    );
    let home = tmpdir("resume");
    let o = run(bin(&home, &hub.url), &["--model", "test-org/tiny-qwen2"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), golden_answer("tiny-qwen2"));
    let resumed = format!("GET /test-org/tiny-qwen2/resolve/main/model.safetensors bytes={cut}-");
    let reqs = hub.requests();
    assert!(
        reqs.contains(&resumed),
        "no request resumed at byte {cut}: {reqs:?}"
    );
}

/// Bytes that do not hash to what the Hub announced are deleted and refused.
#[test]
fn a_checksum_mismatch_is_refused() {
    let hub = Hub::start(
        vec![repo("test-org/tiny-qwen2", "tiny-qwen2")],
        Behaviour {
            corrupt: Some("model.safetensors".into()),
            ..Default::default()
        },
    );
    let home = tmpdir("checksum");
    let o = run(bin(&home, &hub.url), &["--model", "test-org/tiny-qwen2"]);
    assert_one_line_error(&o, &["model.safetensors", "checksum mismatch"]);
    let snap = home
        .join("hub/models--test-org--tiny-qwen2/snapshots")
        .join(COMMIT);
    assert!(!snap.join("model.safetensors").exists());
    // a later run does not take the bad file from the cache either
    let o = run(
        bin(&home, &hub.url),
        &["--model", "test-org/tiny-qwen2", "--offline"],
    );
    assert_one_line_error(
        &o,
        &["test-org/tiny-qwen2", "not in the Hugging Face cache"],
    );
}

/// Without --model the default model is fetched by name; HF_HUB_CACHE moves the cache.
#[test]
fn the_default_model_comes_from_the_hub() {
    let hub = Hub::start(
        vec![repo("OpenGVLab/InternVL2_5-1B", "tiny-qwen2")],
        Behaviour::default(),
    );
    let home = tmpdir("default");
    let cache = home.join("elsewhere");
    let mut c = bin(&home, &hub.url);
    c.env("HF_HUB_CACHE", &cache);
    let o = run(c, &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), golden_answer("tiny-qwen2"));
    assert!(cache
        .join("models--OpenGVLab--InternVL2_5-1B/snapshots")
        .join(COMMIT)
        .join("config.json")
        .is_file());
    assert!(!home.join("hub").exists());
}

/// No network and no cached copy: one line naming the model and the way out.
#[test]
fn no_network_and_no_cache_says_how_to_pass_a_folder() {
    let home = tmpdir("nonet");
    let o = run(bin(&home, "http://127.0.0.1:9"), &[]);
    assert_one_line_error(
        &o,
        &[
            "OpenGVLab/InternVL2_5-1B",
            "cannot be reached",
            "--model DIR",
        ],
    );
    let o = run(bin(&home, "http://127.0.0.1:9"), &["--offline"]);
    assert_one_line_error(&o, &["OpenGVLab/InternVL2_5-1B", "offline", "--model DIR"]);
    let o = run(
        bin(&home, "http://127.0.0.1:9"),
        &["--model", "no/such/place"],
    );
    assert_one_line_error(&o, &["no/such/place", "no such checkpoint folder"]);
}

/// A gated repository needs HF_TOKEN (sent as a bearer token); `plan` fetches the config only;
/// `@revision` is honoured and recorded under refs/.
#[test]
fn token_revision_and_config_only_plan() {
    let hub = Hub::start(
        vec![repo("test-org/tiny-qwen2", "tiny-qwen2")],
        Behaviour {
            token: Some("hf_secret".into()),
            ..Default::default()
        },
    );
    let home = tmpdir("token");
    let o = bin(&home, &hub.url)
        .args(["plan", "--model", "test-org/tiny-qwen2@v1.0"])
        .output()
        .unwrap();
    assert_one_line_error(&o, &["HTTP 401", "HF_TOKEN"]);

    let mut c = bin(&home, &hub.url);
    c.env("HF_TOKEN", "hf_secret");
    let o = c
        .args(["plan", "--model", "test-org/tiny-qwen2@v1.0", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(plan["fits"].as_bool().unwrap());
    let reqs = hub.requests();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /api/models/test-org/tiny-qwen2/revision/v1.0")),
        "{reqs:?}"
    );
    let downloads: Vec<&String> = reqs.iter().filter(|r| r.contains("/resolve/")).collect();
    assert!(
        downloads
            .iter()
            .all(|r| r.contains("/resolve/v1.0/config.json")),
        "plan fetched more than config.json: {downloads:?}"
    );
    let repo_dir = home.join("hub/models--test-org--tiny-qwen2");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v1.0")).unwrap(),
        COMMIT
    );
}

/// An -hf checkpoint by name: its chat template and processor configs come down with the
/// weights (chat_template.jinja included), and the answer is transformers' (not stripped).
#[test]
fn an_hf_checkpoint_by_name() {
    let hub = Hub::start(
        vec![repo("test-org/tiny-qwen2-hf", "tiny-qwen2-hf")],
        Behaviour::default(),
    );
    let home = tmpdir("hf");
    let o = run(bin(&home, &hub.url), &["--model", "test-org/tiny-qwen2-hf"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), golden_answer("tiny-qwen2-hf"));
    let snap = home
        .join("hub/models--test-org--tiny-qwen2-hf/snapshots")
        .join(COMMIT);
    for f in [
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        assert!(snap.join(f).is_file(), "{f} downloaded");
    }
}
