//! Pictures of a request as files the engine reads: `data:` URLs are written to files in the
//! server's private folder that live as long as the request, `file://` URLs are local paths,
//! and http(s) URLs are downloaded only when the server allows it.
use super::openai::{ApiError, ImageRef};
use crate::engine::protocol::Attachment;
use base64::Engine as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::NamedTempFile;

/// A picture written for a request: deleted when dropped.
pub struct TempPicture {
    pub file: NamedTempFile,
    /// Where the picture is in the request (`messages[1].content[0]`).
    pub at: String,
}

/// Largest picture downloaded from an http(s) URL.
const MAX_DOWNLOAD: u64 = 64 << 20;

/// Where a server keeps the pictures of its requests: a private folder, removed when dropped.
pub struct Pictures {
    dir: tempfile::TempDir,
    allow_remote: bool,
}

impl Pictures {
    /// `allow_remote`: fetch http(s) URLs.
    pub fn new(allow_remote: bool) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("internvl-serve-")
            .tempdir()?;
        Ok(Self { dir, allow_remote })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The attachment for `image`; files written for it are added to `files`.
    pub fn resolve(
        &self,
        image: &ImageRef,
        files: &mut Vec<TempPicture>,
    ) -> Result<Attachment, ApiError> {
        let at = &image.at;
        let url = image.url.trim();
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        let store =
            |bytes: &[u8], files: &mut Vec<TempPicture>| temp_file(self.dir(), bytes, at, files);
        let path = match scheme.as_deref() {
            Some("data") => store(&data_url(url, at)?, files)?,
            Some("file") => file_url(url, at)?,
            Some("http" | "https") if self.allow_remote => store(&download(url, at)?, files)?,
            Some("http" | "https") => {
                return Err(ApiError::invalid(format!(
                    "{at}: remote image URLs are off (start the server with \
                     --allow-remote-images, or send the picture as a data: URL)"
                )))
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "{at}: unsupported image URL {:?} (expected data:, file:// or http(s)://)",
                    short(url)
                )))
            }
        };
        Ok(Attachment::Image {
            path,
            max_tiles: image.max_tiles,
        })
    }
}

/// The start of a long URL, for messages.
fn short(url: &str) -> String {
    match url.char_indices().nth(48) {
        Some((i, _)) => format!("{}…", &url[..i]),
        None => url.to_string(),
    }
}

/// The bytes of `data:[<media type>];base64,<data>`.
fn data_url(url: &str, at: &str) -> Result<Vec<u8>, ApiError> {
    let rest = &url["data:".len()..];
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::invalid(format!(
            "{at}: a data: URL needs a comma"
        )));
    };
    let mut meta = meta.split(';');
    let media = meta.next().unwrap_or("").trim();
    if !(media.is_empty() || media.to_ascii_lowercase().starts_with("image/")) {
        return Err(ApiError::invalid(format!(
            "{at}: a data: URL of {media:?}: only pictures (image/*) are supported"
        )));
    }
    if !meta.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::invalid(format!(
            "{at}: only base64 data: URLs are supported (data:image/...;base64,...)"
        )));
    }
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(compact.as_bytes())
        .map_err(|e| ApiError::invalid(format!("{at}: invalid base64 in the data: URL: {e}")))?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(format!("{at}: the data: URL is empty")));
    }
    Ok(bytes)
}

fn temp_file(
    dir: &Path,
    bytes: &[u8],
    at: &str,
    files: &mut Vec<TempPicture>,
) -> Result<PathBuf, ApiError> {
    let failed = |e: std::io::Error| {
        ApiError::new(
            500,
            "server_error",
            format!("{at}: cannot store the picture: {e}"),
        )
    };
    let mut f = tempfile::Builder::new()
        .prefix("picture-")
        .tempfile_in(dir)
        .map_err(failed)?;
    f.write_all(bytes).map_err(failed)?;
    f.flush().map_err(failed)?;
    let path = f.path().to_path_buf();
    files.push(TempPicture {
        file: f,
        at: at.to_string(),
    });
    Ok(path)
}

/// `file:///abs/path` or `file://localhost/abs/path`, percent-decoded; the file must exist.
fn file_url(url: &str, at: &str) -> Result<PathBuf, ApiError> {
    let rest = &url["file:".len()..];
    let path = match rest.strip_prefix("//") {
        Some(r) if r.starts_with('/') => r,
        Some(r) if r.to_ascii_lowercase().starts_with("localhost/") => &r["localhost".len()..],
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "{at}: a file:// URL must name a local absolute path (file:///path)"
            )))
        }
        None if rest.starts_with('/') => rest,
        None => {
            return Err(ApiError::invalid(format!(
                "{at}: a file: URL must name an absolute path"
            )))
        }
    };
    let path = PathBuf::from(crate::files::percent_decode(path).map_err(|e| {
        ApiError::invalid(format!(
            "{at}: bad percent-encoding in {:?}: {e}",
            short(url)
        ))
    })?);
    match crate::files::regular_within(&path, crate::files::MAX_PICTURE_BYTES, "a picture") {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::invalid(format!(
                "{at}: {}: no such file",
                path.display()
            )))
        }
        Err(e) => {
            return Err(ApiError::invalid(format!(
                "{at}: {}: cannot read: {e}",
                path.display()
            )))
        }
    }
    Ok(path)
}

fn download(url: &str, at: &str) -> Result<Vec<u8>, ApiError> {
    let fail =
        |what: String| ApiError::invalid(format!("{at}: cannot fetch {}: {what}", short(url)));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let mut bytes = Vec::new();
    resp.body_mut()
        .with_config()
        .limit(MAX_DOWNLOAD)
        .reader()
        .read_to_end(&mut bytes)
        .map_err(|e| fail(e.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(url: &str) -> ImageRef {
        ImageRef {
            url: url.into(),
            max_tiles: Some(3),
            at: "messages[0].content[1]".into(),
        }
    }

    fn refused(url: &str, allow_remote: bool) -> String {
        let mut files = Vec::new();
        let e = Pictures::new(allow_remote)
            .unwrap()
            .resolve(&image(url), &mut files)
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(files.is_empty());
        assert!(e.message.starts_with("messages[0].content[1]: "), "{e:?}");
        e.message
    }

    #[test]
    fn a_data_url_becomes_a_private_file_with_its_bytes() {
        let bytes = b"\x89PNG\r\n\x1a\nnot really";
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut files = Vec::new();
        let pictures = Pictures::new(false).unwrap();
        let a = pictures
            .resolve(&image(&format!("data:image/png;base64,{b64}")), &mut files)
            .unwrap();
        let Attachment::Image { path, max_tiles } = a else {
            panic!("an image")
        };
        assert_eq!(max_tiles, Some(3));
        assert_eq!(path.parent(), Some(pictures.dir()));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        drop(files);
        assert!(!path.exists(), "gone with the request");
        let dir = pictures.dir().to_path_buf();
        drop(pictures);
        assert!(!dir.exists(), "the folder goes with the server");
    }

    #[test]
    fn file_urls_are_local_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a b.jpg");
        std::fs::write(&p, b"x").unwrap();
        let url = format!("file://{}", p.display()).replace(' ', "%20");
        let mut files = Vec::new();
        let a = Pictures::new(false)
            .unwrap()
            .resolve(&image(&url), &mut files)
            .unwrap();
        assert_eq!(a.path(), p);
        assert!(files.is_empty());
        let missing = format!("file://{}/none.png", dir.path().display());
        assert!(refused(&missing, false).ends_with("none.png: no such file"));
        // only regular files: a FIFO would hang the engine's read, a device never ends
        let fifo = dir.path().join("pipe.png");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = refused(&format!("file://{}", fifo.display()), false);
        assert!(
            e.ends_with("pipe.png: cannot read: it is a FIFO (named pipe), not a regular file"),
            "{e}"
        );
        let e = refused("file:///dev/zero", false);
        assert!(
            e.ends_with("/dev/zero: cannot read: it is a character device, not a regular file"),
            "{e}"
        );
        let e = refused(&format!("file://{}", dir.path().display()), false);
        assert!(
            e.ends_with("cannot read: it is a directory, not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn bad_and_remote_urls_are_refused() {
        assert!(refused("http://example.com/a.png", false).contains("--allow-remote-images"));
        assert!(refused("https://example.com/a.png", false).contains("--allow-remote-images"));
        assert!(refused("data:image/png;base64,!!!", false).contains("invalid base64"));
        assert!(refused("data:image/png,abc", false).contains("only base64"));
        assert!(refused("data:text/plain;base64,YQ==", false).contains("only pictures"));
        assert!(refused("data:image/png;base64,", false).contains("empty"));
        assert!(refused("ftp://x/a.png", false).contains("unsupported image URL"));
        assert!(refused("file://host/a.png", false).contains("local absolute path"));
        // malformed escapes are refused, not read as a literal '%' or "+f" = 15
        assert_eq!(
            refused("file:///tmp/a%+f.png", false),
            "messages[0].content[1]: bad percent-encoding in \"file:///tmp/a%+f.png\": \
             malformed escape \"%+f\" (a % must be followed by two hex digits)"
        );
        assert!(refused("file:///tmp/a%zz.png", false)
            .ends_with("malformed escape \"%zz\" (a % must be followed by two hex digits)"));
        assert!(refused("file:///tmp/a%FF.png", false).ends_with("the decoded bytes are not UTF-8"));
        // a server that cannot be reached: a clear 400, not a hang or a panic
        assert!(refused("http://127.0.0.1:9/a.png", true).contains("cannot fetch"));
    }
}
