//! Just enough HTTP/1.1 for an API server: requests with a `Content-Length` body (parsed by
//! `httparse`), keep-alive, plain and chunked responses, and a look at the socket to see whether
//! the client is still there.
//!
//! Time limits: a kept-alive connection waits at most [`IDLE`] for the first byte of its next
//! request; from that byte the whole request, head and body, must arrive within the request
//! deadline (not per read, so trickling a byte at a time does not keep a connection).
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Longest request head (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// How long a kept-alive connection may sit idle, and a write may wait for the client.
pub const IDLE: Duration = Duration::from_secs(120);
/// How long a client has for a whole request (head and body) from its first byte, by default.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// HTTP/1.1 (else 1.0).
    http11: bool,
}

impl Request {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The length of the body the head announces, at most `max_body`.
    pub fn body_length(&self, max_body: usize) -> Result<usize, ReadError> {
        if self.header("transfer-encoding").is_some() {
            return Err(ReadError::LengthRequired);
        }
        let length = match self.header("content-length") {
            None => 0,
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| ReadError::Malformed(format!("Content-Length {v:?}")))?,
        };
        if length > max_body {
            return Err(ReadError::TooLarge { limit: max_body });
        }
        Ok(length)
    }

    /// Whether the connection stays open after the response.
    pub fn keep_alive(&self) -> bool {
        let conn = self.header("connection").map(str::to_ascii_lowercase);
        match conn.as_deref() {
            Some(c) if c.contains("close") => false,
            Some(c) if c.contains("keep-alive") => true,
            _ => self.http11,
        }
    }
}

/// A request head (request line and headers, up to and including the blank line) as a
/// [`Request`] without its body.
pub fn parse_head(head: &[u8]) -> Result<Request, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ReadError::Malformed("incomplete request head".into()))
        }
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    }
    let target = parsed.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    Ok(Request {
        method: parsed.method.unwrap_or("").to_string(),
        path,
        headers: parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect(),
        body: Vec::new(),
        http11: parsed.version == Some(1),
    })
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("a request body needs a Content-Length (chunked request bodies are not supported)")]
    LengthRequired,
    #[error("the request did not arrive within {} seconds", .0.as_secs_f64())]
    Timeout(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The socket as requests are read from it: no read waits past `deadline`.
struct Timed {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf).map_err(|e| match e.kind() {
            // what a socket's read timeout gives on Linux
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }
}

/// One client connection.
pub struct Conn {
    reader: BufReader<Timed>,
    stream: TcpStream,
    /// Time for a whole request from its first byte.
    request_time: Duration,
}

impl Conn {
    pub fn new(stream: TcpStream) -> io::Result<Conn> {
        Conn::with_deadline(stream, REQUEST_DEADLINE)
    }

    /// A connection whose requests must arrive whole within `request_time`.
    pub fn with_deadline(stream: TcpStream, request_time: Duration) -> io::Result<Conn> {
        // small writes (one SSE event per token) go out at once
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(IDLE))?;
        Ok(Conn {
            reader: BufReader::new(Timed {
                stream: stream.try_clone()?,
                deadline: Instant::now() + IDLE,
            }),
            stream,
            request_time,
        })
    }

    /// The socket (to close it from another thread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Waits up to [`IDLE`] for the first byte of the next request; `false` when the client
    /// closed the connection (or never sent one in time).
    pub fn wait_for_request(&mut self) -> io::Result<bool> {
        if !self.reader.buffer().is_empty() {
            return Ok(true);
        }
        self.reader.get_mut().deadline = Instant::now() + IDLE;
        match self.reader.fill_buf() {
            Ok(b) => Ok(!b.is_empty()),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next request, or `None` when the client closed the connection between requests.
    pub fn read_request(&mut self, max_body: usize) -> Result<Option<Request>, ReadError> {
        if !self.wait_for_request()? {
            return Ok(None);
        }
        let Some(mut request) = self.read_head()? else {
            return Ok(None);
        };
        self.read_body(&mut request, max_body)?;
        Ok(Some(request))
    }

    /// The head of the next request (its body left unread, see [`Conn::read_body`]); `None`
    /// when the client closed the connection before a request. The request deadline starts.
    pub fn read_head(&mut self) -> Result<Option<Request>, ReadError> {
        self.reader.get_mut().deadline = Instant::now() + self.request_time;
        let timeout = ReadError::Timeout(self.request_time);
        let mut head = Vec::new();
        loop {
            // bounded, so a line that never ends cannot take all memory
            let room = (MAX_HEAD + 1).saturating_sub(head.len()) as u64;
            let n = match (&mut self.reader).take(room).read_until(b'\n', &mut head) {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(timeout),
                r => r?,
            };
            if n == 0 {
                if head.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                return Err(ReadError::Malformed(
                    "the connection closed mid-request".into(),
                ));
            }
            if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
                // blank lines before a request are allowed (RFC 9112 2.2)
                if head.iter().all(u8::is_ascii_whitespace) {
                    head.clear();
                    continue;
                }
                break;
            }
            if head.len() > MAX_HEAD {
                return Err(ReadError::Malformed(format!(
                    "request head longer than {MAX_HEAD} bytes"
                )));
            }
        }
        parse_head(&head).map(Some)
    }

    /// The body of `request`, whose head [`Conn::read_head`] read, within the same deadline.
    pub fn read_body(&mut self, request: &mut Request, max_body: usize) -> Result<(), ReadError> {
        let length = request.body_length(max_body)?;
        if length > 0 {
            if request
                .header("expect")
                .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
            {
                self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            // grown as the bytes come, not allocated on the client's word
            match (&mut self.reader)
                .take(length as u64)
                .read_to_end(&mut request.body)
            {
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(ReadError::Timeout(self.request_time))
                }
                r => r?,
            };
            if request.body.len() < length {
                return Err(ReadError::Malformed(
                    "the connection closed before the body ended".into(),
                ));
            }
        }
        Ok(())
    }

    /// A whole response with a body.
    pub fn respond(
        &mut self,
        status: u16,
        content_type: &str,
        body: &[u8],
        keep_alive: bool,
    ) -> io::Result<()> {
        let mut out = head(status, keep_alive);
        out.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes)
    }

    /// Starts a response whose body follows in [`Conn::chunk`]s.
    pub fn start_chunked(&mut self, status: u16, content_type: &str) -> io::Result<()> {
        let mut out = head(status, true);
        out.push_str(&format!(
            "Content-Type: {content_type}\r\nCache-Control: no-cache\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        ));
        self.stream.write_all(out.as_bytes())
    }

    /// One piece of a chunked body, sent at once.
    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&out)
    }

    /// Ends a chunked body.
    pub fn end_chunked(&mut self) -> io::Result<()> {
        self.stream.write_all(b"0\r\n\r\n")
    }

    /// Whether the client has closed the connection (or it broke). Bytes of a next request
    /// waiting on the socket mean it is still there.
    pub fn client_gone(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut byte = [0u8; 1];
        let gone = match self.stream.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        };
        gone || self.stream.set_nonblocking(false).is_err()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn head(status: u16, keep_alive: bool) -> String {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!(
        "HTTP/1.1 {status} {}\r\nServer: internvl-chat\r\nConnection: {connection}\r\n",
        reason(status)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};

    /// A connected pair: the server's `Conn` and the client's socket.
    fn pair() -> (Conn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (Conn::new(server).unwrap(), client)
    }

    #[test]
    fn reads_pipelined_requests_with_bodies_then_the_close() {
        let (mut conn, mut client) = pair();
        client
            .write_all(
                b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
                  Authorization:  Bearer k \r\n\r\nhelloGET /v1/models HTTP/1.0\r\n\r\n",
            )
            .unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let r = conn.read_request(100).unwrap().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/v1/chat/completions", &b"hello"[..])
        );
        assert_eq!(r.header("authorization"), Some("Bearer k"));
        assert!(r.keep_alive());
        let r = conn.read_request(100).unwrap().unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/models"));
        assert!(!r.keep_alive(), "HTTP/1.0 closes by default");
        assert!(conn.read_request(100).unwrap().is_none());
    }

    #[test]
    fn refuses_large_chunked_and_malformed_requests() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
                "larger than 100 bytes",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Content-Length",
            ),
            (b"BAD\x01 / HTTP/1.1\r\n\r\n", "malformed HTTP request"),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
                "closed before the body ended",
            ),
        ];
        for (bytes, want) in cases {
            let (mut conn, mut client) = pair();
            client.write_all(bytes).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let e = conn.read_request(100).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        // a head that never ends is cut off at its limit
        let (mut conn, mut client) = pair();
        let endless = vec![b'a'; MAX_HEAD + 10];
        std::thread::spawn(move || {
            let _ = client.write_all(&endless);
            std::thread::sleep(Duration::from_secs(5));
        });
        let e = conn.read_request(100).unwrap_err().to_string();
        assert!(e.contains("request head longer than"), "{e}");
    }

    #[test]
    fn every_prefix_of_the_fuzz_seeds_parses_or_is_refused_with_a_reason() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/http_request");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for n in 0..=bytes.len() {
                match parse_head(&bytes[..n]) {
                    Ok(r) => {
                        assert!(!r.path.contains(['?', '#']));
                        if let Ok(len) = r.body_length(100) {
                            assert!(len <= 100);
                        }
                    }
                    Err(e) => assert!(!e.to_string().is_empty()),
                }
            }
            seeds += 1;
        }
        assert!(seeds >= 5, "{}", dir.display());
        let get = std::fs::read(dir.join("get-models")).unwrap();
        let r = parse_head(&get).unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/models"));
        let post = std::fs::read(dir.join("post-with-length")).unwrap();
        let r = parse_head(&post).unwrap();
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.body_length(100).unwrap(), 52);
        assert!(matches!(
            r.body_length(51),
            Err(ReadError::TooLarge { limit: 51 })
        ));
        let huge = std::fs::read(dir.join("huge-length")).unwrap();
        let e = parse_head(&huge).unwrap().body_length(100).unwrap_err();
        assert!(e.to_string().contains("Content-Length"), "{e}");
    }

    #[test]
    fn a_trickling_client_is_cut_at_the_request_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let mut conn = Conn::with_deadline(server, Duration::from_millis(400)).unwrap();
        let trickle = std::thread::spawn(move || {
            // one byte every 50 ms: every single read is quick, the request never ends
            for b in b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
                .iter()
                .cycle()
            {
                if client.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let e = conn.read_request(1000).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, ReadError::Timeout(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "the request did not arrive within 0.4 seconds"
        );
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "{took:?}"
        );
        drop(conn);
        trickle.join().unwrap();
    }

    #[test]
    fn chunked_responses_and_a_client_that_leaves() {
        let (mut conn, mut client) = pair();
        conn.start_chunked(200, "text/event-stream").unwrap();
        conn.chunk(b"data: 1\n\n").unwrap();
        conn.end_chunked().unwrap();
        assert!(!conn.client_gone());
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.ends_with("Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n"),
            "{text:?}"
        );
        drop(client);
        let mut waited = 0;
        while !conn.client_gone() {
            // the FIN may take a moment to arrive
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
            assert!(waited < 500, "the close was never seen");
        }
    }
}
