//! Server-sent events, as far as OpenAI-style streams use them: the `data` of each event.
use std::io::{self, BufRead};

pub struct SseReader<R> {
    inner: R,
}

impl<R: BufRead> SseReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The data of the next event (its `data:` lines joined by newlines); comments and other
    /// fields are skipped. `None` at the end of the stream.
    pub fn next_data(&mut self) -> io::Result<Option<String>> {
        let mut data: Option<String> = None;
        let mut raw = Vec::new();
        loop {
            raw.clear();
            if self.inner.read_until(b'\n', &mut raw)? == 0 {
                // an event cut short by the end of the stream still counts
                return Ok(data);
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if data.is_some() {
                    return Ok(data);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            if field == "data" {
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_of_each_event_comments_and_other_fields_skipped() {
        let stream = ": keep-alive\r\n\r\nevent: message\ndata: {\"a\":1}\n\ndata: one\ndata:two\nid: 3\n\n\n\
                      data: [DONE]\n\ndata: cut short";
        let mut r = SseReader::new(stream.as_bytes());
        let mut got = Vec::new();
        while let Some(d) = r.next_data().unwrap() {
            got.push(d);
        }
        assert_eq!(got, ["{\"a\":1}", "one\ntwo", "[DONE]", "cut short"]);
    }
}
