//! A read filter that cuts elements nested deeper than a limit out of the
//! incoming XML byte stream, before any parser sees them.
//!
//! xso's element builder (under tokio-xmpp's stream parser) recurses once
//! per open element for every event, so a stanza nested 50,000 levels deep
//! costs O(depth²) time and overflows the stack of the task parsing it:
//! one hostile stanza would crash the component. This filter keeps the
//! stream well-formed and every element up to `max` levels (the stream
//! root is level 1) and drops deeper subtrees whole; the stanza that held
//! them is then refused by [`crate::xmltree::too_deep`].
//!
//! XMPP forbids comments, CDATA, processing instructions and DTDs inside a
//! stream, so outside tags a `<` always starts a tag; inside a tag, `>`
//! ends it unless quoted. UTF-8 multi-byte sequences never contain ASCII
//! bytes, so a byte scanner is exact.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// `<name ...>` or `<name .../>`
    Start,
    /// `</name>`
    End,
    /// `<?...?>` and anything else that opens no element.
    Other,
}

#[derive(Debug, Clone, Copy)]
struct InTag {
    kind: Tag,
    keep: bool,
    quote: Option<u8>,
    prev: u8,
}

/// The filter's state across reads.
#[derive(Debug)]
pub struct Scanner {
    max: usize,
    /// Open elements.
    depth: usize,
    /// A `<` whose tag kind is not known yet (it ended the last chunk).
    pending_lt: bool,
    tag: Option<InTag>,
}

impl Scanner {
    pub fn new(max: usize) -> Scanner {
        Scanner {
            max,
            depth: 0,
            pending_lt: false,
            tag: None,
        }
    }

    /// Append the kept bytes of `input` to `out`.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.pending_lt {
                self.pending_lt = false;
                let kind = match b {
                    b'/' => Tag::End,
                    b'?' | b'!' => Tag::Other,
                    _ => Tag::Start,
                };
                let keep = match kind {
                    Tag::Start => self.depth < self.max,
                    Tag::End | Tag::Other => self.depth <= self.max,
                };
                if kind == Tag::End {
                    self.depth = self.depth.saturating_sub(1);
                }
                if keep {
                    out.push(b'<');
                    out.push(b);
                }
                self.tag = Some(InTag {
                    kind,
                    keep,
                    quote: None,
                    prev: b,
                });
                continue;
            }
            if let Some(mut t) = self.tag {
                let mut end = false;
                match (t.quote, b) {
                    (None, b'"') | (None, b'\'') => t.quote = Some(b),
                    (Some(q), c) if c == q => t.quote = None,
                    (None, b'>') => end = true,
                    _ => {}
                }
                if t.keep {
                    out.push(b);
                }
                if end {
                    if t.kind == Tag::Start && t.prev != b'/' {
                        self.depth += 1;
                    }
                    self.tag = None;
                } else {
                    t.prev = b;
                    self.tag = Some(t);
                }
                continue;
            }
            if b == b'<' {
                self.pending_lt = true;
            } else if self.depth <= self.max {
                // Text belongs to the innermost open element.
                out.push(b);
            }
        }
    }
}

/// Wraps a transport: reads are filtered, writes pass through.
pub struct DepthLimit<T> {
    inner: T,
    scanner: Scanner,
    /// Filtered bytes not yet handed to the reader.
    ready: Vec<u8>,
    offset: usize,
    scratch: Box<[u8]>,
}

impl<T> DepthLimit<T> {
    pub fn new(inner: T, max: usize) -> DepthLimit<T> {
        DepthLimit {
            inner,
            scanner: Scanner::new(max),
            ready: Vec::new(),
            offset: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DepthLimit<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.offset < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.offset);
                buf.put_slice(&this.ready[this.offset..this.offset + n]);
                this.offset += n;
                if this.offset == this.ready.len() {
                    this.ready.clear();
                    this.offset = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = raw.filled();
                    if got.is_empty() {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    this.scanner.filter(got, &mut this.ready);
                    // Everything may have been cut: read on.
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DepthLimit<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: usize, chunks: &[&[u8]]) -> String {
        let mut s = Scanner::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.filter(c, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn keeps_shallow_streams_byte_for_byte() {
        let xml = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' a=\"x>y\">\
                   <message to='b' id='1'><body>1 &gt; 0 é</body><x xmlns='u'/></message>";
        assert_eq!(run(3, &[xml.as_bytes()]), xml);
        // Split anywhere, the same.
        let b = xml.as_bytes();
        for cut in 1..b.len() {
            assert_eq!(run(3, &[&b[..cut], &b[cut..]]), xml, "cut at {cut}");
        }
    }

    #[test]
    fn cuts_deeper_subtrees_whole() {
        let xml = "<s><m id='1'><a><b><c>t</c><c/></b>tail</a></m><m id='2'/></s>";
        // Levels: s=1 m=2 a=3 b=4 c=5.
        assert_eq!(
            run(3, &[xml.as_bytes()]),
            "<s><m id='1'><a>tail</a></m><m id='2'/></s>"
        );
        assert_eq!(
            run(4, &[xml.as_bytes()]),
            "<s><m id='1'><a><b></b>tail</a></m><m id='2'/></s>"
        );
        let deep = format!(
            "<s><m>{}{}</m><m id='after'/>",
            "<a>".repeat(100_000),
            "</a>".repeat(100_000)
        );
        let out = run(4, &[deep.as_bytes()]);
        assert_eq!(out, "<s><m><a><a></a></a></m><m id='after'/>");
    }

    #[test]
    fn a_tag_start_split_across_reads() {
        assert_eq!(run(2, &[b"<s><m><", b"a/></m></s>"]), "<s><m></m></s>");
        assert_eq!(
            run(3, &[b"<s><m><", b"a/></m><", b"/s>"]),
            "<s><m><a/></m></s>"
        );
    }
}
