//! HTTP/1.1 framing for the relay. Heads are parsed with monoio-http's codec; bodies are
//! framed here, because monoio-http's body encoder and client buffer whole bodies.

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName};
use http::{Method, Version};
use monoio_codec::{Decoded, Decoder};
use monoio_http::common::request::RequestHead;
use monoio_http::common::response::ResponseHead;
use monoio_http::h1::codec::decoder::{RequestHeadDecoder, ResponseHeadDecoder};

use crate::error::DataplaneError;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Response only: until the server closes.
    UntilClose,
}

pub struct Request {
    pub head: RequestHead,
    pub body: BodyKind,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// Parse a request head off the front of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_request(
    buf: &mut BytesMut,
    max_head: usize,
) -> Result<Option<Request>, DataplaneError> {
    let before = buf.len();
    let head = match RequestHeadDecoder.decode(buf) {
        Ok(Decoded::Some(_)) if before - buf.len() > max_head => {
            return Err(DataplaneError::HeadersTooLarge { limit: max_head })
        }
        Ok(Decoded::Some(head)) => head,
        Ok(_) => {
            if buf.len() > max_head {
                return Err(DataplaneError::HeadersTooLarge { limit: max_head });
            }
            return Ok(None);
        }
        Err(e) => {
            use monoio_http::h1::codec::decoder::DecodeError;
            return Err(match e {
                DecodeError::Parse(httparse::Error::TooManyHeaders) => {
                    DataplaneError::HeadersTooLarge { limit: max_head }
                }
                other => DataplaneError::BadRequest(format!(
                    "malformed HTTP request head ({other}); send a valid HTTP/1.1 request"
                )),
            });
        }
    };
    let body = request_body_kind(&head.headers)?;
    let keep_alive = keep_alive(head.version, &head.headers);
    let expect_continue = head
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(Request {
        head,
        body,
        keep_alive,
        expect_continue,
    }))
}

fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let connection = headers.get(http::header::CONNECTION).map(|v| v.as_bytes());
    match version {
        Version::HTTP_11 => !connection.is_some_and(|v| has_token(v, b"close")),
        _ => connection.is_some_and(|v| has_token(v, b"keep-alive")),
    }
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Request framing per RFC 9112 §6, strictly: anything ambiguous is refused, because a
/// proxy that guesses differently from its upstream enables request smuggling.
fn request_body_kind(headers: &HeaderMap) -> Result<BodyKind, DataplaneError> {
    let te: Vec<_> = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .collect();
    let cl: Vec<_> = headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err(DataplaneError::BadRequest(
            "both Content-Length and Transfer-Encoding were sent; send exactly one of them".into(),
        ));
    }
    if !te.is_empty() {
        if te.len() == 1
            && te[0]
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return Ok(BodyKind::Chunked);
        }
        return Err(DataplaneError::BadRequest(
            "unsupported Transfer-Encoding; only a single \"chunked\" is accepted".into(),
        ));
    }
    let mut length: Option<u64> = None;
    for value in cl {
        let parsed = std::str::from_utf8(value.as_bytes())
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| {
                DataplaneError::BadRequest(
                    "invalid Content-Length; send a decimal byte count".into(),
                )
            })?;
        if length.is_some_and(|l| l != parsed) {
            return Err(DataplaneError::BadRequest(
                "conflicting Content-Length headers; send exactly one".into(),
            ));
        }
        length = Some(parsed);
    }
    Ok(match length {
        Some(0) | None => BodyKind::None,
        Some(n) => BodyKind::Length(n),
    })
}

pub struct Response {
    pub head: ResponseHead,
    pub body: BodyKind,
    pub keep_alive: bool,
}

pub fn parse_response(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<Response>, String> {
    let head = match ResponseHeadDecoder.decode(buf) {
        Ok(Decoded::Some(head)) => head,
        Ok(_) => {
            if buf.len() > 256 * 1024 {
                return Err("response head over 256 KiB".into());
            }
            return Ok(None);
        }
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = head.status.as_u16();
    let headers = &head.headers;
    let body = if *request_method == Method::HEAD
        || (100..200).contains(&status)
        || status == 204
        || status == 304
    {
        BodyKind::None
    } else if let Some(te) = headers.get(http::header::TRANSFER_ENCODING) {
        if has_token(te.as_bytes(), b"chunked") {
            BodyKind::Chunked
        } else {
            BodyKind::UntilClose
        }
    } else if let Some(cl) = headers.get(http::header::CONTENT_LENGTH) {
        let n = std::str::from_utf8(cl.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or("invalid Content-Length in response")?;
        BodyKind::Length(n)
    } else {
        BodyKind::UntilClose
    };
    let keep_alive = keep_alive(head.version, headers) && body != BodyKind::UntilClose;
    Ok(Some(Response {
        head,
        body,
        keep_alive,
    }))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the gateway rewrites itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "transfer-encoding"
            | "content-length"
            | "host"
            | "expect"
    )
}

/// The head sent upstream. `body` is the framing used upstream, which may differ from the
/// client's (the model rewrite changes lengths).
pub fn write_upstream_head(
    out: &mut Vec<u8>,
    req: &RequestHead,
    authority: &str,
    body: BodyKind,
    strip_authorization: bool,
) {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &req.headers {
        if is_hop_by_hop(name) || (strip_authorization && name == http::header::AUTHORIZATION) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body {
        BodyKind::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyKind::None | BodyKind::UntilClose => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// The head relayed to the client: the server's status and headers, hop-by-hop ones
/// replaced by our own framing.
pub fn write_client_head(out: &mut Vec<u8>, resp: &Response, keep_client: bool) {
    let status = resp.head.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &resp.head.headers {
        if is_hop_by_hop(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match resp.body {
        BodyKind::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        // Chunked bodies are relayed with their framing untouched.
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyKind::None | BodyKind::UntilClose => {}
    }
    if !keep_client {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A complete response generated by the gateway itself.
pub fn simple_response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    keep_alive: bool,
) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa(status as u64).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(itoa(body.len() as u64).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in extra_headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn itoa(mut n: u64) -> String {
    if n == 0 {
        return "0".into();
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n > 0 {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    String::from_utf8_lossy(&digits[i..]).into_owned()
}

/// Incremental chunked-encoding parser. The relay feeds it the raw bytes it forwards, to
/// learn where the body ends without copying; the request path also uses the data ranges.
#[derive(Debug, Clone, Default)]
pub struct ChunkedParser {
    state: ChunkState,
    size: u64,
    size_digits: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    SizeWs,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// What `ChunkedParser::feed` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of `input` consumed; less than its length only when the body ended.
    pub consumed: usize,
    pub done: bool,
}

impl ChunkedParser {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Advance over `input`, calling `on_data` with each run of chunk data.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<Fed, &'static str> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.size_digits >= 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size_digits += 1;
                    }
                    b';' if self.size_digits > 0 => self.state = ChunkState::Extension,
                    b' ' | b'\t' if self.size_digits > 0 => self.state = ChunkState::SizeWs,
                    b'\r' if self.size_digits > 0 => self.state = ChunkState::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                ChunkState::SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = ChunkState::Extension,
                    b'\r' => self.state = ChunkState::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                ChunkState::Extension => {
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if b == b'\n' {
                        return Err("bare LF in chunk extension");
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err("expected LF after chunk size");
                    }
                    self.size_digits = 0;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let take = ((input.len() - i) as u64).min(self.size) as usize;
                    on_data(&input[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err("expected CRLF after chunk data");
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err("expected CRLF after chunk data");
                    }
                    self.state = ChunkState::Size;
                }
                // A bare LF is refused: a peer that ends lines on it would frame differently.
                ChunkState::TrailerStart => {
                    self.state = match b {
                        b'\r' => ChunkState::FinalLf,
                        b'\n' => return Err("bare LF in chunked trailer"),
                        _ => ChunkState::TrailerLine,
                    };
                }
                ChunkState::TrailerLine => match b {
                    b'\r' => self.state = ChunkState::TrailerLf,
                    b'\n' => return Err("bare LF in chunked trailer"),
                    _ => {}
                },
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err("expected LF in trailer");
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::FinalLf => {
                    if b != b'\n' {
                        return Err("expected LF at end of chunked body");
                    }
                    self.state = ChunkState::Done;
                    return Ok(Fed {
                        consumed: i + 1,
                        done: true,
                    });
                }
                ChunkState::Done => {
                    return Ok(Fed {
                        consumed: i,
                        done: true,
                    })
                }
            }
            i += 1;
        }
        Ok(Fed {
            consumed: input.len(),
            done: self.state == ChunkState::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<Option<Request>, DataplaneError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_request(&mut buf, 1024)
    }

    #[test]
    fn request_framing() {
        let r = req("POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Length(5));
        assert!(r.keep_alive);
        let r = req("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.body, BodyKind::Chunked);
        assert!(!r.keep_alive);
        let r = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!r.keep_alive);
        assert!(req("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(req(raw), Err(DataplaneError::BadRequest(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn oversize_head() {
        let raw = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(2000));
        assert!(matches!(
            req(&raw),
            Err(DataplaneError::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn chunked_parser_byte_by_byte() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 1..body.len() {
            let mut p = ChunkedParser::default();
            let mut data = Vec::new();
            let mut total = 0;
            let mut done = false;
            for piece in body.chunks(split) {
                let fed = p.feed(piece, |d| data.extend_from_slice(d)).unwrap();
                total += fed.consumed;
                if fed.done {
                    done = true;
                    break;
                }
            }
            assert!(done);
            assert_eq!(total, body.len() - 4);
            assert_eq!(data, b"hello world");
        }
    }

    #[test]
    fn chunked_parser_rejects_garbage() {
        assert!(ChunkedParser::default().feed(b"zz\r\n", |_| {}).is_err());
        assert!(ChunkedParser::default().feed(b"2\r\nabX", |_| {}).is_err());
        assert!(ChunkedParser::default()
            .feed(b"5 junk\r\n", |_| {})
            .is_err());
        assert!(ChunkedParser::default().feed(b"0\r\n\nX", |_| {}).is_err());
        assert!(ChunkedParser::default()
            .feed(b"0\r\nA: b\nC", |_| {})
            .is_err());
        let ok = b"5 ; x=1\r\nhello\r\n0\r\n\r\n";
        assert!(ChunkedParser::default().feed(ok, |_| {}).is_ok());
    }
}
