//! Reading the files a user or a client names: only regular files, and never more bytes than a
//! limit checked before reading. A FIFO, a socket, a device or a directory is refused at once
//! (opening a FIFO without a writer would wait forever; `/dev/zero` never ends), and a file
//! larger than its limit is refused from its size, so no read can hang or take all memory.
//!
//! Refusals are `std::io::Error`s (their kind `InvalidInput`, their payload a [`Refused`]), so
//! callers that already name the file around an I/O error need no new variants.
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest picture file read (`--image`, `/image`, batch `images`, `file://` URLs).
pub const MAX_PICTURE_BYTES: u64 = 256 << 20;
/// Largest model metadata file read: `config.json`, tokenizer files.
pub const MAX_METADATA_BYTES: u64 = 64 << 20;
/// Largest saved session or `config.toml` read.
pub const MAX_SESSION_BYTES: u64 = 256 << 20;
/// Longest batch JSONL line.
pub const MAX_JSONL_LINE_BYTES: u64 = 64 << 20;

/// Why a file is not read.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("it is {kind}, not a regular file")]
    NotRegular { kind: &'static str },
    #[error("it is {bytes} bytes, over the limit of {limit} bytes for {what}")]
    TooLarge {
        bytes: u64,
        limit: u64,
        what: &'static str,
    },
}

impl From<Refused> for io::Error {
    fn from(r: Refused) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, r)
    }
}

/// What a file that is not a regular file is, in words.
fn kind_of(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("a special file")
    }
}

/// The metadata of `path` when it is a regular file (symbolic links followed); a directory
/// keeps its own error kind (`IsADirectory`) so callers can say "a folder".
pub fn regular(path: &Path) -> io::Result<Metadata> {
    let meta = std::fs::metadata(path)?;
    match kind_of(&meta) {
        None => Ok(meta),
        Some(kind) if meta.is_dir() => Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            Refused::NotRegular { kind },
        )),
        Some(kind) => Err(Refused::NotRegular { kind }.into()),
    }
}

/// [`regular`], and its size at most `limit` bytes (`what` names the limit in the refusal).
pub fn regular_within(path: &Path, limit: u64, what: &'static str) -> io::Result<Metadata> {
    let meta = regular(path)?;
    if meta.len() > limit {
        return Err(Refused::TooLarge {
            bytes: meta.len(),
            limit,
            what,
        }
        .into());
    }
    Ok(meta)
}

/// The whole of the regular file `path`, at most `limit` bytes (`what` names the limit).
pub fn read(path: &Path, limit: u64, what: &'static str) -> io::Result<Vec<u8>> {
    regular_within(path, limit, what)?;
    // O_NONBLOCK: if the file was swapped for a FIFO since the check, opening does not wait
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if let Some(kind) = kind_of(&meta) {
        return Err(Refused::NotRegular { kind }.into());
    }
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    // a file that grows while read is still cut at the limit
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(Refused::TooLarge {
            bytes: bytes.len() as u64,
            limit,
            what,
        }
        .into());
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64, what: &'static str) -> io::Result<String> {
    String::from_utf8(read(path, limit, what)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()))
}

/// Why a percent-encoded text (a `file://` URL's path) does not decode.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadPercent {
    #[error("malformed escape {0:?} (a % must be followed by two hex digits)")]
    Escape(String),
    #[error("the decoded bytes are not UTF-8")]
    NotUtf8,
}

/// `%XX` escapes decoded, strictly: a `%` not followed by two hex digits (`%+f`, `%4`, `%zz`)
/// and bytes that do not make UTF-8 are errors, where the `percent-encoding` crate (WHATWG's
/// lenient decoding) would keep them as they are.
pub fn percent_decode(s: &str) -> Result<String, BadPercent> {
    let b = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        if hex.is_none() {
            let end = (i + 1..=(i + 3).min(s.len()))
                .rev()
                .find(|&e| s.is_char_boundary(e))
                .unwrap_or(i + 1);
            return Err(BadPercent::Escape(s[i..end].to_string()));
        }
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| BadPercent::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_regular_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let sock = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let cases = [
            (fifo.as_path(), "a FIFO (named pipe)"),
            (Path::new("/dev/zero"), "a character device"),
            (sock.as_path(), "a socket"),
            (dir.path(), "a directory"),
        ];
        for (path, kind) in cases {
            let start = std::time::Instant::now();
            let e = read(path, 10, "tests").unwrap_err();
            assert_eq!(e.to_string(), format!("it is {kind}, not a regular file"));
            assert!(start.elapsed().as_secs() < 2);
        }
        assert_eq!(
            read(dir.path(), 10, "tests").unwrap_err().kind(),
            io::ErrorKind::IsADirectory
        );
    }

    #[test]
    fn reads_up_to_the_limit_and_names_it_beyond() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read(&f, 10, "tests").unwrap(), b"0123456789");
        assert_eq!(read_to_string(&f, 10, "tests").unwrap(), "0123456789");
        let e = read(&f, 9, "tests").unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is 10 bytes, over the limit of 9 bytes for tests"
        );
        assert_eq!(
            read(&dir.path().join("none"), 9, "x").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn percent_decoding_is_strict() {
        assert_eq!(percent_decode("/tmp/a%20b.png").unwrap(), "/tmp/a b.png");
        assert_eq!(percent_decode("/tmp/plain.png").unwrap(), "/tmp/plain.png");
        assert_eq!(percent_decode("%C3%A9t%c3%a9").unwrap(), "été");
        assert_eq!(percent_decode("").unwrap(), "");
        // u8::from_str_radix takes "+f" as 15: a sign is not a hex digit
        assert_eq!(
            percent_decode("/a%+f.png").unwrap_err(),
            BadPercent::Escape("%+f".into())
        );
        assert_eq!(
            percent_decode("/a%4").unwrap_err(),
            BadPercent::Escape("%4".into())
        );
        assert_eq!(
            percent_decode("/a%zz.png").unwrap_err(),
            BadPercent::Escape("%zz".into())
        );
        assert_eq!(
            percent_decode("%").unwrap_err(),
            BadPercent::Escape("%".into())
        );
        assert_eq!(
            percent_decode("%4é").unwrap_err(),
            BadPercent::Escape("%4".into())
        );
        assert_eq!(
            percent_decode("/a%FF.png").unwrap_err(),
            BadPercent::NotUtf8
        );
        assert_eq!(percent_decode("%C3").unwrap_err(), BadPercent::NotUtf8);
        assert_eq!(
            percent_decode("/a%zz").unwrap_err().to_string(),
            "malformed escape \"%zz\" (a % must be followed by two hex digits)"
        );
    }
}
