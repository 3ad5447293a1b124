//! Models by name: `org/name[@revision]` resolved through the Hugging Face cache, downloading
//! what is missing with the hf-hub crate.
//!
//! The cache is the standard one shared with Python (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `models--org--name/{blobs,refs,snapshots}`), so a model fetched
//! by `huggingface-cli` or transformers is reused as is. `HF_ENDPOINT` and `HF_TOKEN` are
//! honoured; offline mode (`--offline`, `HF_HUB_OFFLINE=1`) never opens a connection.
//! Every downloaded file is checked against the checksum the Hub gives for it (sha256 for LFS
//! files, the git blob id for small ones); a mismatch deletes the file and is refused.
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The model used when `--model` is absent.
pub const DEFAULT_MODEL: &str = "OpenGVLab/InternVL2_5-1B";

/// A repository on the Hub and the revision wanted (a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    pub id: String,
    pub revision: String,
}

impl RepoSpec {
    /// `org/name` or `org/name@revision`; `None` when `s` does not have that shape.
    pub fn parse(s: &str) -> Option<RepoSpec> {
        let (id, revision) = match s.split_once('@') {
            Some((id, rev)) if !rev.is_empty() && !rev.contains(char::is_whitespace) => {
                (id, rev.to_string())
            }
            Some(_) => return None,
            None => (s, "main".to_string()),
        };
        let (org, name) = id.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (part_ok(org) && part_ok(name)).then(|| RepoSpec {
            id: id.to_string(),
            revision,
        })
    }

    fn folder_name(&self) -> String {
        format!("models--{}", self.id.replace('/', "--"))
    }
}

/// What a command needs from the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `plan`: the config only.
    Config,
    /// Everything the engine loads: configs, weights, tokenizer files.
    Model,
}

impl Need {
    fn wants(self, file: &str) -> bool {
        match self {
            Need::Config => file == "config.json",
            // top-level files only: the InternVL repositories also hold example pictures and
            // videos under examples/, and Python modelling code we do not run; -hf repositories
            // keep their chat template in chat_template.jinja
            Need::Model => {
                !file.contains('/')
                    && [
                        ".json",
                        ".safetensors",
                        ".model",
                        ".txt",
                        ".tiktoken",
                        ".jinja",
                    ]
                    .iter()
                    .any(|ext| file.ends_with(ext))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Never touch the network (`--offline` or `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Progress bars on stderr while downloading.
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env(offline_flag: bool, progress: bool) -> HubOptions {
        HubOptions {
            offline: offline_flag || env_flag("HF_HUB_OFFLINE"),
            progress,
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Result<PathBuf> {
    if let Some(h) = env_path("HF_HOME") {
        return Ok(h);
    }
    if let Some(x) = env_path("XDG_CACHE_HOME") {
        return Ok(x.join("huggingface"));
    }
    let home = directories::BaseDirs::new()
        .ok_or_else(|| anyhow!("no home directory: set HF_HOME or HF_HUB_CACHE"))?;
    Ok(home.home_dir().join(".cache").join("huggingface"))
}

/// Where repositories are cached: `HF_HUB_CACHE`, else `HF_HOME/hub`.
pub fn cache_dir() -> Result<PathBuf> {
    match env_path("HF_HUB_CACHE") {
        Some(c) => Ok(c),
        None => Ok(hf_home()?.join("hub")),
    }
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .map(|e| e.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// `HF_TOKEN`, else the token file `huggingface-cli login` writes.
fn token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Some(t);
        }
    }
    let path = env_path("HF_TOKEN_PATH").or_else(|| hf_home().ok().map(|h| h.join("token")))?;
    let t = std::fs::read_to_string(path).ok()?.trim().to_string();
    (!t.is_empty()).then_some(t)
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached snapshot of `spec`, if the cache has one with the files `need` asks for.
fn cached_snapshot(cache: &Path, spec: &RepoSpec, need: Need) -> Option<PathBuf> {
    let repo = cache.join(spec.folder_name());
    let commit =
        if is_commit(&spec.revision) && repo.join("snapshots").join(&spec.revision).is_dir() {
            spec.revision.clone()
        } else {
            std::fs::read_to_string(repo.join("refs").join(&spec.revision))
                .ok()?
                .trim()
                .to_string()
        };
    let snap = repo.join("snapshots").join(commit);
    let complete = match need {
        Need::Config => snap.join("config.json").is_file(),
        Need::Model => snapshot_complete(&snap),
    };
    complete.then_some(snap)
}

/// A snapshot has its config, a tokenizer and every weight file its index names.
fn snapshot_complete(snap: &Path) -> bool {
    if !snap.join("config.json").is_file() {
        return false;
    }
    let index = snap.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        let Some(map) = v["weight_map"].as_object() else {
            return false;
        };
        map.values()
            .filter_map(|f| f.as_str())
            .all(|f| snap.join(f).is_file())
    } else {
        snap.join("model.safetensors").is_file()
    }
}

/// Resolves `spec` to a local folder holding what `need` asks for, downloading missing files
/// unless offline.
pub fn resolve(spec: &RepoSpec, need: Need, opts: &HubOptions) -> Result<PathBuf> {
    let cache = cache_dir()?;
    let hint = "pass a local checkpoint folder with --model DIR";
    if opts.offline {
        return cached_snapshot(&cache, spec, need).ok_or_else(|| {
            anyhow!(
                "{}@{} is not in the Hugging Face cache ({}) and offline mode forbids downloading it; {hint}",
                spec.id,
                spec.revision,
                cache.display()
            )
        });
    }
    match download(&cache, spec, need, opts) {
        Ok(dir) => Ok(dir),
        // without a connection, a complete cached copy will do (as huggingface_hub does)
        Err(DownloadError::Unreachable(e)) => {
            if let Some(snap) = cached_snapshot(&cache, spec, need) {
                tracing::warn!("{} unreachable ({e}); using the cached copy", endpoint());
                return Ok(snap);
            }
            bail!(
                "{}@{} is not in the Hugging Face cache ({}) and {} cannot be reached ({e}); {hint}",
                spec.id,
                spec.revision,
                cache.display(),
                endpoint()
            )
        }
        Err(DownloadError::Other(e)) => Err(e),
    }
}

enum DownloadError {
    /// No answer from the endpoint at all.
    Unreachable(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for DownloadError {
    fn from(e: anyhow::Error) -> Self {
        DownloadError::Other(e)
    }
}

/// One line for an hf-hub error, with what to do for the usual HTTP statuses.
fn describe(e: &ApiError, spec: &RepoSpec) -> String {
    if let ApiError::RequestError(re) = e {
        if let ureq::Error::StatusCode(code) = **re {
            return match code {
                401 | 403 => format!(
                    "{} refused access (HTTP {code}): the repository is gated or private; set HF_TOKEN",
                    endpoint()
                ),
                404 => format!(
                    "{}@{} not found on {} (HTTP 404)",
                    spec.id,
                    spec.revision,
                    endpoint()
                ),
                _ => format!("{} answered HTTP {code}", endpoint()),
            };
        }
    }
    e.to_string()
}

fn unreachable(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(re) => matches!(
            **re,
            ureq::Error::Io(_)
                | ureq::Error::ConnectionFailed
                | ureq::Error::HostNotFound
                | ureq::Error::Timeout(_)
        ),
        ApiError::IoError(_) => false,
        _ => false,
    }
}

fn download(
    cache: &Path,
    spec: &RepoSpec,
    need: Need,
    opts: &HubOptions,
) -> std::result::Result<PathBuf, DownloadError> {
    let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_endpoint(endpoint())
        .with_token(token())
        .with_progress(opts.progress)
        // an interrupted transfer resumes from where it stopped (HTTP Range), a few times
        .with_retries(3)
        .build()
        .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))?;
    let repo = api.repo(Repo::with_revision(
        spec.id.clone(),
        RepoType::Model,
        spec.revision.clone(),
    ));
    let info = repo.info().map_err(|e| {
        if unreachable(&e) {
            DownloadError::Unreachable(e.to_string())
        } else {
            DownloadError::Other(anyhow!("{}", describe(&e, spec)))
        }
    })?;
    if !is_commit(&info.sha) {
        return Err(anyhow!("{}: the Hub gave no commit for {}", endpoint(), spec.id).into());
    }
    let snap = cache
        .join(spec.folder_name())
        .join("snapshots")
        .join(&info.sha);
    let files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| need.wants(f))
        .collect();
    if !files.contains(&"config.json") {
        return Err(anyhow!(
            "{}@{} has no config.json: not a model repository",
            spec.id,
            spec.revision
        )
        .into());
    }
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !snap.join(f).is_file())
        .collect();
    if !missing.is_empty() && opts.progress {
        eprintln!(
            "downloading {} file(s) of {}@{} into {}",
            missing.len(),
            spec.id,
            spec.revision,
            cache.display()
        );
    }
    for f in missing {
        let path = repo
            .download(f)
            .map_err(|e| anyhow!("downloading {f} of {}: {}", spec.id, describe(&e, spec)))?;
        verify(&path).map_err(|e| anyhow!("{f} of {}: {e}", spec.id))?;
    }
    // the branch now points at this commit even when every file was cached already
    let refs = cache.join(spec.folder_name()).join("refs");
    if !is_commit(&spec.revision) {
        let r = refs.join(&spec.revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent).context("creating the cache's refs folder")?;
        }
        std::fs::write(&r, &info.sha).with_context(|| format!("writing {}", r.display()))?;
    }
    Ok(snap)
}

/// Checks a downloaded snapshot file against the id the Hub stored it under (the blob's name):
/// a sha256 for LFS files, a git blob sha1 for small ones. On mismatch the file is deleted.
fn verify(pointer: &Path) -> Result<()> {
    let blob = std::fs::canonicalize(pointer)
        .with_context(|| format!("{}: cannot read the downloaded file", pointer.display()))?;
    let expected = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let actual = match expected.len() {
        64 => hash_file::<sha2::Sha256>(&blob, None)?,
        40 => {
            let len = std::fs::metadata(&blob)?.len();
            hash_file::<sha1::Sha1>(&blob, Some(format!("blob {len}\0").as_bytes()))?
        }
        // an ETag that is no content hash: nothing to compare with
        _ => return Ok(()),
    };
    if actual != expected {
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(pointer);
        bail!("checksum mismatch: the Hub announced {expected}, the downloaded bytes hash to {actual}; the file was deleted");
    }
    Ok(())
}

fn hash_file<D: sha2::Digest>(path: &Path, prefix: Option<&[u8]>) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut d = D::new();
    if let Some(p) = prefix {
        d.update(p);
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    Ok(d.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_specs() {
        let s = RepoSpec::parse("OpenGVLab/InternVL2_5-1B").unwrap();
        assert_eq!(
            (s.id.as_str(), s.revision.as_str()),
            ("OpenGVLab/InternVL2_5-1B", "main")
        );
        let s = RepoSpec::parse("OpenGVLab/InternVL2_5-1B@v1.0").unwrap();
        assert_eq!(s.revision, "v1.0");
        assert_eq!(s.folder_name(), "models--OpenGVLab--InternVL2_5-1B");
        for bad in [
            "model",
            "./models/x",
            "/abs/path",
            "a/b/c",
            "org/",
            "/name",
            "org/name@",
            "../x",
            "org/na me",
        ] {
            assert_eq!(RepoSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn files_wanted() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "tokenizer.model",
            "merges.txt",
            "chat_template.jinja",
            "preprocessor_config.json",
            "video_preprocessor_config.json",
        ] {
            assert!(Need::Model.wants(f), "{f}");
        }
        for f in [
            "modeling_internvl_chat.py",
            "README.md",
            "examples/image1.jpg",
            ".gitattributes",
        ] {
            assert!(!Need::Model.wants(f), "{f}");
        }
        assert!(Need::Config.wants("config.json"));
        assert!(!Need::Config.wants("model.safetensors"));
    }

    #[test]
    fn git_blob_ids_and_sha256_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        // `git hash-object` of "hello\n"
        let git = blobs.join("ce013625030ba8dba906f756967f9e9ca394464a");
        std::fs::write(&git, "hello\n").unwrap();
        verify(&git).unwrap();
        // sha256 of "hello\n"
        let lfs = blobs.join("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        std::fs::write(&lfs, "hello\n").unwrap();
        verify(&lfs).unwrap();
        let bad = blobs.join("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be04");
        std::fs::write(&bad, "hello\n").unwrap();
        let e = verify(&bad).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(!bad.exists(), "a corrupt download is deleted");
    }
}
