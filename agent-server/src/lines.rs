//! Reassembles output lines from the chunks Docker delivers.
//!
//! Invariant: memory per session is bounded by `max` bytes. A line longer than
//! that is cut: its first `max` bytes are returned as a truncated line and the
//! rest, up to the next newline, is counted and dropped.

/// One reassembled line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, newline removed: its bytes as written.
    Whole(Vec<u8>),
    /// The first `max` bytes of a longer line, and its full length.
    Truncated { prefix: Vec<u8>, total_bytes: usize },
}

/// Splits a byte stream into lines.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    /// Bytes seen of the line being dropped, when one is too long.
    overflow: Option<usize>,
}

impl LineBuffer {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            overflow: None,
        }
    }

    /// Feeds a chunk; returns the lines it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        while !chunk.is_empty() {
            let nl = chunk.iter().position(|&b| b == b'\n');
            let (part, rest, complete) = match nl {
                Some(i) => (&chunk[..i], &chunk[i + 1..], true),
                None => (chunk, &[][..], false),
            };
            chunk = rest;
            // The first byte past `max` starts the overflow: keep the prefix, count the rest.
            let mut part = part;
            if self.overflow.is_none() {
                let room = self.max - self.buf.len();
                if part.len() > room {
                    self.buf.extend_from_slice(&part[..room]);
                    self.overflow = Some(self.max);
                    part = &part[room..];
                }
            }
            if let Some(seen) = self.overflow.as_mut() {
                *seen += part.len();
                if complete {
                    let total_bytes = self.overflow.take().unwrap_or(0);
                    out.push(self.take_truncated(total_bytes));
                }
                continue;
            }
            self.buf.extend_from_slice(part);
            if complete {
                let mut line = std::mem::take(&mut self.buf);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if !line.is_empty() {
                    out.push(Line::Whole(line));
                }
            }
        }
        out
    }

    fn take_truncated(&mut self, total_bytes: usize) -> Line {
        let prefix = std::mem::take(&mut self.buf);
        Line::Truncated {
            prefix,
            total_bytes,
        }
    }

    /// The unterminated tail, when the stream ends.
    pub fn finish(&mut self) -> Option<Line> {
        match self.overflow.take() {
            Some(total_bytes) => Some(self.take_truncated(total_bytes)),
            None if self.buf.is_empty() => None,
            None => Some(Line::Whole(std::mem::take(&mut self.buf))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(s: &str) -> Line {
        Line::Whole(s.as_bytes().to_vec())
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut b = LineBuffer::new(1024);
        assert_eq!(b.push(b"{\"a\":"), vec![]);
        assert_eq!(b.push(b"1}\n{\"b\""), vec![whole("{\"a\":1}")]);
        assert_eq!(b.push(b":2}\r\n\n"), vec![whole("{\"b\":2}")]);
        assert_eq!(b.finish(), None);
    }

    #[test]
    fn an_overlong_unterminated_tail_is_reported_truncated() {
        let mut b = LineBuffer::new(4);
        assert_eq!(b.push(b"abcdefg"), vec![]);
        assert_eq!(
            b.finish(),
            Some(Line::Truncated {
                prefix: b"abcd".to_vec(),
                total_bytes: 7
            })
        );
    }

    #[test]
    fn an_unterminated_tail_is_returned_at_the_end() {
        let mut b = LineBuffer::new(1024);
        assert_eq!(b.push(b"one\ntwo"), vec![whole("one")]);
        assert_eq!(b.finish(), Some(whole("two")));
    }

    #[test]
    fn overlong_lines_are_cut_and_counted_and_the_next_line_survives() {
        let mut b = LineBuffer::new(4);
        assert_eq!(b.push(b"abcdef"), vec![]);
        assert_eq!(
            b.push(b"gh\nok\n"),
            vec![
                Line::Truncated {
                    prefix: b"abcd".to_vec(),
                    total_bytes: 8
                },
                whole("ok")
            ]
        );
        assert_eq!(
            b.push(b"123456\n"),
            vec![Line::Truncated {
                prefix: b"1234".to_vec(),
                total_bytes: 6
            }]
        );
    }
}
