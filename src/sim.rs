//! Built-in vLLM simulator (`vllm-gateway sim ...`).
//!
//! Owns a tiny HTTP/1.1 server that speaks the slice of the OpenAI API that
//! vLLM serves (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/models`, `/health`, `/metrics`) with deterministic output and
//! configurable timing (time to first token, tokens per second, start-up
//! delay). It is a vLLM stand-in for tests, demos and benchmarks: it lets the
//! gateway run end to end without a GPU and lets tests observe what reached the
//! upstream (model rewrites, cancellations, concurrency).
//!
//! It must never be used as a real model server: it generates no language,
//! checks nothing but the model name and the JSON shape, and has no limits
//! beyond what keeps it from falling over on bad input.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use serde_json::Value;

const USAGE: &str = "\
usage: vllm-gateway sim --listen ADDR --model NAME [options]

A vLLM stand-in for tests, demos and benchmarks (not a model server).

  --listen ADDR        address to bind, e.g. 127.0.0.1:0 (required)
  --model NAME         the only model name accepted (required)
  --ttft-ms N          delay before the first token, ms (default 50)
  --tokens-per-s N     token rate after the first, > 0 (default 100)
  --startup-ms N       /health answers 503 for this long (default 0)
  --help               print this text";

/// Most request-head bytes accepted; bigger heads get 431.
const MAX_HEAD: usize = 64 * 1024;
/// Most request-body bytes accepted; bigger bodies get 413.
const MAX_BODY: usize = 32 * 1024 * 1024;
/// Most tokens one request may ask for, so a silly `max_tokens` cannot
/// exhaust memory building a non-streaming answer.
const MAX_TOKENS: u64 = 1 << 20;
/// How often waits look for a client that went away.
const POLL_STEP: Duration = Duration::from_millis(10);
/// How often the runtime looks at the stop flag set by the signal handler.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Command-line settings of the simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct SimArgs {
    pub listen: String,
    pub model: String,
    pub ttft_ms: u64,
    pub tokens_per_s: f64,
    pub startup_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A bad command line; the message names the flag.
    #[error("sim: {0} (try --help)")]
    Args(String),
    /// `--help` was given; the message is the usage text (print it, exit 0).
    #[error("{USAGE}")]
    Help,
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("io error: {0}")]
    Io(#[from] io::Error),
}

impl SimArgs {
    /// Parses the arguments that follow the word `sim`. Accepts both
    /// `--flag value` and `--flag=value`.
    pub fn parse(args: &[String]) -> Result<SimArgs, SimError> {
        let mut listen = None;
        let mut model = None;
        let mut ttft_ms = 50;
        let mut tokens_per_s = 100.0;
        let mut startup_ms = 0;

        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            if flag == "--help" || flag == "-h" {
                return Err(SimError::Help);
            }
            let mut value = || -> Result<String, SimError> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| SimError::Args(format!("{flag} needs a value"))),
                }
            };
            match flag {
                "--listen" => listen = Some(value()?),
                "--model" => model = Some(value()?),
                "--ttft-ms" => ttft_ms = parse_u64(flag, &value()?)?,
                "--startup-ms" => startup_ms = parse_u64(flag, &value()?)?,
                "--tokens-per-s" => {
                    let v = value()?;
                    let rate: f64 = v
                        .trim()
                        .parse()
                        .map_err(|_| SimError::Args(format!("{flag}: `{v}` is not a number")))?;
                    // The token interval must be a representable Duration.
                    if !(rate > 0.0 && rate.is_finite())
                        || Duration::try_from_secs_f64(1.0 / rate).is_err()
                    {
                        return Err(SimError::Args(format!(
                            "{flag}: `{v}` must be a finite number greater than 0"
                        )));
                    }
                    tokens_per_s = rate;
                }
                _ => return Err(SimError::Args(format!("unknown flag `{arg}`"))),
            }
        }

        let listen = listen.ok_or_else(|| SimError::Args("--listen is required".into()))?;
        let model = model.ok_or_else(|| SimError::Args("--model is required".into()))?;
        if model.is_empty() {
            return Err(SimError::Args("--model must not be empty".into()));
        }
        Ok(SimArgs {
            listen,
            model,
            ttft_ms,
            tokens_per_s,
            startup_ms,
        })
    }
}

fn parse_u64(flag: &str, v: &str) -> Result<u64, SimError> {
    v.trim().parse().map_err(|_| {
        SimError::Args(format!(
            "{flag}: `{v}` is not a whole number of milliseconds"
        ))
    })
}

// ---------------------------------------------------------------------------
// Start-up and shutdown
// ---------------------------------------------------------------------------

/// Set by the SIGTERM/SIGINT handler; polled by the runtime.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    // Only an atomic store: anything else is not async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> io::Result<()> {
    STOP.store(false, Ordering::SeqCst);
    let handler: extern "C" fn(libc::c_int) = on_stop_signal;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores an atomic.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Binds, prints the listening line, and serves until SIGTERM or SIGINT.
pub fn run(args: SimArgs) -> Result<(), SimError> {
    let listener =
        std::net::TcpListener::bind(args.listen.as_str()).map_err(|source| SimError::Bind {
            addr: args.listen.clone(),
            source,
        })?;
    let local = listener.local_addr()?;
    // Before the line: a test may send SIGTERM as soon as it has read it.
    install_signal_handlers()?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "vllm-gateway sim listening on http://{local}")?;
        out.flush()?;
    }
    serve_blocking(listener, &args, &STOP)
}

/// Runs the server on one monoio thread until `stop` is set.
fn serve_blocking(
    listener: std::net::TcpListener,
    args: &SimArgs,
    stop: &'static AtomicBool,
) -> Result<(), SimError> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()?;
    // The legacy (epoll) driver needs a non-blocking listener; io_uring waits
    // in the kernel. monoio's own bind makes the same choice.
    if matches!(rt, monoio::FusionRuntime::Legacy(_)) {
        listener.set_nonblocking(true)?;
    }
    let state = Rc::new(State::new(args));
    rt.block_on(async move {
        let listener = monoio::net::TcpListener::from_std(listener)?;
        monoio::spawn(accept_loop(listener, state));
        while !stop.load(Ordering::SeqCst) {
            monoio::time::sleep(STOP_POLL).await;
        }
        Ok(())
    })
}

async fn accept_loop(listener: monoio::net::TcpListener, state: Rc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Streaming events must leave at once, not wait for Nagle.
                let _ = stream.set_nodelay(true);
                monoio::spawn(serve_conn(stream, state.clone()));
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => monoio::time::sleep(POLL_STEP).await,
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state and counters
// ---------------------------------------------------------------------------

struct State {
    model: String,
    /// The model name as a JSON string literal, quotes included.
    model_json: String,
    /// The model name escaped for a Prometheus label value.
    model_label: String,
    ttft: Duration,
    token_interval: Duration,
    started: Instant,
    startup: Duration,
    running: Cell<u64>,
    total: Cell<u64>,
    completed: Cell<u64>,
    cancelled: Cell<u64>,
    next_id: Cell<u64>,
}

impl State {
    fn new(args: &SimArgs) -> State {
        State {
            model: args.model.clone(),
            model_json: json_str(&args.model),
            model_label: prom_label(&args.model),
            ttft: Duration::from_millis(args.ttft_ms),
            // Validated by parse; fall back to 10 ms if built by hand.
            token_interval: Duration::try_from_secs_f64(1.0 / args.tokens_per_s)
                .unwrap_or(Duration::from_millis(10)),
            started: Instant::now(),
            startup: Duration::from_millis(args.startup_ms),
            running: Cell::new(0),
            total: Cell::new(0),
            completed: Cell::new(0),
            cancelled: Cell::new(0),
            next_id: Cell::new(0),
        }
    }

    fn bump(c: &Cell<u64>) {
        c.set(c.get() + 1);
    }

    fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// When token `i` (0-based) is due for a request that started at `start`.
    fn token_due(&self, start: Instant, i: u64) -> Instant {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        let offset = self
            .ttft
            .saturating_add(self.token_interval.saturating_mul(i));
        // Absurd offsets (u64::MAX ms) cannot be added to an Instant; a
        // century away is "never" for a simulator.
        start
            .checked_add(offset)
            .or_else(|| start.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(start)
    }
}

/// Counts a request in `vllm:num_requests_running` for as long as it lives,
/// whichever way generation ends.
struct Running<'a>(&'a State);

impl<'a> Running<'a> {
    fn new(st: &'a State) -> Self {
        st.running.set(st.running.get() + 1);
        Running(st)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.set(self.0.running.get().saturating_sub(1));
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 request reading
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum BodyKind {
    Length(usize),
    Chunked,
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    http10: bool,
    keep_alive: bool,
    body: Vec<u8>,
}

#[derive(Debug)]
struct Head {
    len: usize,
    req: Request,
    body: BodyKind,
    expect_continue: bool,
}

#[derive(Debug, PartialEq)]
enum ReqError {
    /// The connection failed or closed mid-request: nothing to answer.
    Io,
    /// A broken request: answer with this status and message, then close.
    Http(u16, String),
}

/// Parses a request head from `buf`; `Ok(None)` means more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReqError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ReqError::Http(431, "too many request headers".into()))
        }
        Err(e) => return Err(ReqError::Http(400, format!("malformed request: {e}"))),
    };
    let http10 = r.version == Some(0);
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = false;
    let mut expect_continue = false;
    for h in r.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| ReqError::Http(400, "invalid Content-Length".into()))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ReqError::Http(400, "conflicting Content-Length".into()));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(ReqError::Http(
                    400,
                    format!("unsupported Transfer-Encoding `{value}`"),
                ));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    // Chunked wins over Content-Length (RFC 9112 6.3).
    let body = if chunked {
        BodyKind::Chunked
    } else {
        let n = content_length.unwrap_or(0);
        if n > MAX_BODY {
            return Err(ReqError::Http(413, "request body too large".into()));
        }
        BodyKind::Length(n)
    };
    Ok(Some(Head {
        len,
        req: Request {
            method: r.method.unwrap_or("").to_string(),
            path: r.path.unwrap_or("").to_string(),
            http10,
            // HTTP/1.0 is answered and closed, keep-alive header or not.
            keep_alive: !http10 && !close,
            body: Vec::new(),
        },
        body,
        expect_continue,
    }))
}

/// Decodes a complete chunked body at the start of `buf`, returning it and
/// the bytes it used; `Ok(None)` means more bytes are needed.
fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ReqError> {
    // Scan first without copying: this runs again after every read.
    if scan_chunked(buf, None)?.is_none() {
        return Ok(None);
    }
    let mut body = Vec::new();
    Ok(scan_chunked(buf, Some(&mut body))?.map(|used| (body, used)))
}

/// Walks a chunked body, appending its data to `sink` if given; returns the
/// bytes used once the body (trailers included) is complete.
fn scan_chunked(buf: &[u8], mut sink: Option<&mut Vec<u8>>) -> Result<Option<usize>, ReqError> {
    let bad = || ReqError::Http(400, "malformed chunked body".into());
    let mut pos = 0;
    let mut total = 0usize;
    loop {
        let (used, size) = match httparse::parse_chunk_size(&buf[pos..]) {
            Ok(httparse::Status::Complete(x)) => x,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(bad()),
        };
        pos += used;
        if size == 0 {
            // Skip trailer fields up to the empty line.
            loop {
                let Some(i) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += i + 2;
                if i == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        let size = usize::try_from(size).map_err(|_| bad())?;
        if size > MAX_BODY || total + size > MAX_BODY {
            return Err(ReqError::Http(413, "request body too large".into()));
        }
        if buf.len() - pos < size + 2 {
            return Ok(None);
        }
        if let Some(out) = sink.as_deref_mut() {
            out.extend_from_slice(&buf[pos..pos + size]);
        }
        total += size;
        pos += size;
        if &buf[pos..pos + 2] != b"\r\n" {
            return Err(bad());
        }
        pos += 2;
    }
}

/// One client connection: the socket plus buffers reused across requests.
struct Conn {
    stream: TcpStream,
    fd: RawFd,
    /// Received bytes not yet consumed (pipelined requests stay here).
    inbuf: Vec<u8>,
    /// Reused output buffer, handed to the kernel and back.
    out: Vec<u8>,
}

impl Conn {
    /// Reads more bytes onto the end of `inbuf`; 0 means EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.inbuf.capacity() - self.inbuf.len() < 4096 {
            self.inbuf.reserve(16 * 1024);
        }
        let buf = std::mem::take(&mut self.inbuf);
        let len = buf.len();
        let (res, slice) = self.stream.read(buf.slice_mut(len..)).await;
        self.inbuf = slice.into_inner();
        res
    }

    /// Writes `self.out` in full; false if the peer is gone.
    async fn flush_out(&mut self) -> bool {
        let buf = std::mem::take(&mut self.out);
        let (res, mut buf) = self.stream.write_all(buf).await;
        buf.clear();
        self.out = buf;
        res.is_ok()
    }

    async fn read_request(&mut self) -> Result<Option<Request>, ReqError> {
        let head = loop {
            if !self.inbuf.is_empty() {
                if let Some(h) = parse_head(&self.inbuf)? {
                    break h;
                }
                if self.inbuf.len() > MAX_HEAD {
                    return Err(ReqError::Http(431, "request head too large".into()));
                }
            }
            match self.fill().await {
                Ok(0) if self.inbuf.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(ReqError::Io),
                Ok(_) => {}
            }
        };
        let Head {
            len,
            mut req,
            body,
            expect_continue,
        } = head;
        if let BodyKind::Length(n) = body {
            // One allocation for a large body instead of many small ones.
            self.inbuf
                .reserve((len + n).saturating_sub(self.inbuf.len()));
        }
        let mut sent_continue = false;
        loop {
            let rest = &self.inbuf[len..];
            let done = match body {
                BodyKind::Length(n) if rest.len() >= n => Some((rest[..n].to_vec(), n)),
                BodyKind::Length(_) => None,
                BodyKind::Chunked => decode_chunked(rest)?,
            };
            if let Some((bytes, used)) = done {
                req.body = bytes;
                self.inbuf.drain(..len + used);
                // Do not keep a huge buffer around for a keep-alive client.
                if self.inbuf.capacity() > 1 << 20 && self.inbuf.len() < 16 * 1024 {
                    self.inbuf.shrink_to(16 * 1024);
                }
                return Ok(Some(req));
            }
            if self.inbuf.len() > MAX_HEAD + MAX_BODY + MAX_HEAD {
                return Err(ReqError::Http(413, "request body too large".into()));
            }
            // curl and others wait for this before sending a large body.
            if expect_continue && !sent_continue && !req.http10 {
                self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                if !self.flush_out().await {
                    return Err(ReqError::Io);
                }
                sent_continue = true;
            }
            match self.fill().await {
                Ok(0) | Err(_) => return Err(ReqError::Io),
                Ok(_) => {}
            }
        }
    }

    /// Sends a complete response in one write; false if the peer is gone.
    async fn respond(
        &mut self,
        status: u16,
        content_type: &str,
        body: &[u8],
        keep_alive: bool,
    ) -> bool {
        write_head(
            &mut self.out,
            status,
            content_type,
            Some(body.len()),
            keep_alive,
        );
        self.out.extend_from_slice(body);
        self.flush_out().await
    }
}

/// What the connection loop does after a response.
#[derive(Debug, PartialEq)]
enum Flow {
    KeepAlive,
    Close,
}

fn flow(written: bool, keep_alive: bool) -> Flow {
    if written && keep_alive {
        Flow::KeepAlive
    } else {
        Flow::Close
    }
}

async fn serve_conn(stream: TcpStream, st: Rc<State>) {
    let fd = stream.as_raw_fd();
    let mut conn = Conn {
        stream,
        fd,
        inbuf: Vec::with_capacity(16 * 1024),
        out: Vec::with_capacity(4096),
    };
    loop {
        let req = match conn.read_request().await {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReqError::Io) => return,
            Err(ReqError::Http(status, msg)) => {
                let body = error_json(&msg, status);
                conn.respond(status, JSON, body.as_bytes(), false).await;
                return;
            }
        };
        if handle(&mut conn, &st, &req).await == Flow::Close {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

const JSON: &str = "application/json";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn handle(conn: &mut Conn, st: &State, req: &Request) -> Flow {
    let path = req.path.split('?').next().unwrap_or("");
    let ka = req.keep_alive;
    match (req.method.as_str(), path) {
        ("GET", "/health") => {
            let ready = st.started.elapsed() >= st.startup;
            let (status, body): (u16, &[u8]) = if ready {
                (200, br#"{"status":"ok"}"#)
            } else {
                (503, br#"{"status":"loading"}"#)
            };
            flow(conn.respond(status, JSON, body, ka).await, ka)
        }
        ("GET", "/v1/models") => {
            let body = models_json(&st.model_json);
            flow(conn.respond(200, JSON, body.as_bytes(), ka).await, ka)
        }
        ("GET", "/metrics") => {
            let body = metrics_text(st);
            let ct = "text/plain; version=0.0.4; charset=utf-8";
            flow(conn.respond(200, ct, body.as_bytes(), ka).await, ka)
        }
        ("POST", "/v1/chat/completions") => generate(conn, st, req, Kind::Chat).await,
        ("POST", "/v1/completions") => generate(conn, st, req, Kind::Completion).await,
        ("POST", "/v1/embeddings") => embeddings(conn, st, req).await,
        (
            _,
            "/health"
            | "/v1/models"
            | "/metrics"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings",
        ) => {
            let body = error_json("Method Not Allowed", 405);
            flow(conn.respond(405, JSON, body.as_bytes(), ka).await, ka)
        }
        _ => {
            let body = error_json(&format!("Not Found: {path}"), 404);
            flow(conn.respond(404, JSON, body.as_bytes(), ka).await, ka)
        }
    }
}

/// An OpenAI-style error to send instead of generating.
#[derive(Debug, PartialEq)]
struct ApiError {
    status: u16,
    message: String,
}

#[derive(Debug, PartialEq)]
struct GenParams {
    max_tokens: u64,
    stream: bool,
    include_usage: bool,
    prompt_tokens: u64,
}

/// Checks the body the way vLLM would before it starts generating.
fn parse_body(body: &[u8], model: &str) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bad = |message: String| ApiError {
        status: 400,
        message,
    };
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(bad("the request body must be a JSON object".into()));
    };
    match obj.get("model") {
        Some(Value::String(m)) if m == model => Ok(obj),
        other => {
            let name = match other {
                Some(Value::String(m)) => m.clone(),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            Err(ApiError {
                status: 404,
                message: format!("The model `{name}` does not exist."),
            })
        }
    }
}

fn parse_gen_params(body: &[u8], model: &str) -> Result<GenParams, ApiError> {
    let obj = parse_body(body, model)?;
    let bad = |message: String| ApiError {
        status: 400,
        message,
    };
    // vLLM prefers the newer name when both are present.
    let (name, limit) = match obj.get("max_completion_tokens") {
        Some(v) if !v.is_null() => ("max_completion_tokens", Some(v)),
        _ => ("max_tokens", obj.get("max_tokens").filter(|v| !v.is_null())),
    };
    let max_tokens = match limit {
        None => 16,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_TOKENS).contains(&n) => n,
            _ => {
                return Err(bad(format!(
                    "{name} must be an integer between 1 and {MAX_TOKENS}, got {v}."
                )))
            }
        },
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad(format!("stream must be a boolean, got {v}."))),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(GenParams {
        max_tokens,
        stream,
        include_usage,
        prompt_tokens: body.len() as u64 / 4,
    })
}

/// Sleeps until `due`, looking every few ms for a client that went away;
/// false means it did. Zero waits return at once without touching the timer.
async fn wait_until(fd: RawFd, due: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= due {
            return true;
        }
        if peer_gone(fd) {
            return false;
        }
        monoio::time::sleep((due - now).min(POLL_STEP)).await;
    }
}

/// True when the peer closed or reset the connection. Peeks, so pipelined
/// request bytes stay in the socket for the next read.
fn peer_gone(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv into a valid 1-byte buffer on a socket we own.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

async fn generate(conn: &mut Conn, st: &State, req: &Request, kind: Kind) -> Flow {
    State::bump(&st.total);
    let ka = req.keep_alive;
    let p = match parse_gen_params(&req.body, &st.model) {
        Ok(p) => p,
        Err(e) => {
            let body = error_json(&e.message, e.status);
            return flow(conn.respond(e.status, JSON, body.as_bytes(), ka).await, ka);
        }
    };
    let _running = Running::new(st);
    let start = Instant::now();
    let id = match kind {
        Kind::Chat => format!("chatcmpl-sim-{}", st.next_id()),
        Kind::Completion => format!("cmpl-sim-{}", st.next_id()),
    };

    if !p.stream {
        let due = st.token_due(start, p.max_tokens - 1);
        if !wait_until(conn.fd, due).await {
            State::bump(&st.cancelled);
            return Flow::Close;
        }
        let body = completion_json(kind, &id, &st.model_json, p.max_tokens, p.prompt_tokens);
        if conn.respond(200, JSON, body.as_bytes(), ka).await {
            State::bump(&st.completed);
            return flow(true, ka);
        }
        State::bump(&st.cancelled);
        return Flow::Close;
    }

    // HTTP/1.0 has no chunked encoding: send raw events and close.
    let chunked = !req.http10;
    let ka = ka && chunked;
    write_stream_head(&mut conn.out, chunked, ka);
    if !conn.flush_out().await {
        State::bump(&st.cancelled);
        return Flow::Close;
    }
    for i in 0..p.max_tokens {
        if !wait_until(conn.fd, st.token_due(start, i)).await {
            State::bump(&st.cancelled);
            return Flow::Close;
        }
        let last = i + 1 == p.max_tokens;
        let event = chunk_json(kind, &id, &st.model_json, i, last);
        // One write per token so each event leaves when it is generated.
        push_event(&mut conn.out, &event, chunked);
        if !conn.flush_out().await {
            State::bump(&st.cancelled);
            return Flow::Close;
        }
    }
    if p.include_usage {
        let event = usage_chunk_json(kind, &id, &st.model_json, p.max_tokens, p.prompt_tokens);
        push_event(&mut conn.out, &event, chunked);
    }
    push_event(&mut conn.out, "[DONE]", chunked);
    if chunked {
        conn.out.extend_from_slice(b"0\r\n\r\n");
    }
    if !conn.flush_out().await {
        State::bump(&st.cancelled);
        return Flow::Close;
    }
    State::bump(&st.completed);
    flow(true, ka)
}

async fn embeddings(conn: &mut Conn, st: &State, req: &Request) -> Flow {
    State::bump(&st.total);
    let ka = req.keep_alive;
    if let Err(e) = parse_body(&req.body, &st.model) {
        let body = error_json(&e.message, e.status);
        return flow(conn.respond(e.status, JSON, body.as_bytes(), ka).await, ka);
    }
    let _running = Running::new(st);
    let due = st.token_due(Instant::now(), 0);
    if !wait_until(conn.fd, due).await {
        State::bump(&st.cancelled);
        return Flow::Close;
    }
    let body = embeddings_json(&st.model_json);
    if conn.respond(200, JSON, body.as_bytes(), ka).await {
        State::bump(&st.completed);
        flow(true, ka)
    } else {
        State::bump(&st.cancelled);
        Flow::Close
    }
}

// ---------------------------------------------------------------------------
// Response building (pure)
// ---------------------------------------------------------------------------

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn error_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 431 => "BadRequestError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        _ => "InternalServerError",
    }
}

/// Appends a response head; `content_length` None means chunked.
fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    content_length: Option<usize>,
    keep_alive: bool,
) {
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n",
        reason(status)
    );
    match content_length {
        Some(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        None => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn write_stream_head(out: &mut Vec<u8>, chunked: bool, keep_alive: bool) {
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n",
    );
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one SSE event `data: {payload}\n\n`, as its own HTTP chunk when
/// `chunked`.
fn push_event(out: &mut Vec<u8>, payload: &str, chunked: bool) {
    let len = "data: ".len() + payload.len() + 2;
    if chunked {
        let _ = write!(out, "{len:x}\r\n");
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(payload.as_bytes());
    out.extend_from_slice(b"\n\n");
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Escapes a Prometheus label value (backslash, quote, newline).
fn prom_label(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn error_json(message: &str, status: u16) -> String {
    format!(
        r#"{{"object":"error","message":{},"type":"{}","param":null,"code":{status}}}"#,
        json_str(message),
        error_type(status)
    )
}

fn models_json(model_json: &str) -> String {
    format!(
        r#"{{"object":"list","data":[{{"id":{model_json},"object":"model","created":0,"owned_by":"vllm-gateway-sim"}}]}}"#
    )
}

/// The text of `k` tokens: `tok0 tok1 ...` (each token ends with a space).
fn token_text(k: u64) -> String {
    let mut s = String::with_capacity(k as usize * 7);
    for i in 0..k {
        let _ = write!(s, "tok{i} ");
    }
    s
}

fn completion_json(kind: Kind, id: &str, model_json: &str, k: u64, p: u64) -> String {
    let text = token_text(k);
    let total = p + k;
    let usage = format!(
        r#""usage":{{"prompt_tokens":{p},"completion_tokens":{k},"total_tokens":{total}}}"#
    );
    match kind {
        Kind::Chat => format!(
            r#"{{"id":"{id}","object":"chat.completion","created":0,"model":{model_json},"choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"length"}}],{usage}}}"#
        ),
        Kind::Completion => format!(
            r#"{{"id":"{id}","object":"text_completion","created":0,"model":{model_json},"choices":[{{"index":0,"text":"{text}","finish_reason":"length"}}],{usage}}}"#
        ),
    }
}

fn chunk_json(kind: Kind, id: &str, model_json: &str, i: u64, last: bool) -> String {
    let finish = if last { r#""length""# } else { "null" };
    match kind {
        Kind::Chat => format!(
            r#"{{"id":"{id}","object":"chat.completion.chunk","created":0,"model":{model_json},"choices":[{{"index":0,"delta":{{"content":"tok{i} "}},"finish_reason":{finish}}}]}}"#
        ),
        Kind::Completion => format!(
            r#"{{"id":"{id}","object":"text_completion","created":0,"model":{model_json},"choices":[{{"index":0,"text":"tok{i} ","finish_reason":{finish}}}]}}"#
        ),
    }
}

/// The extra chunk vLLM sends when `stream_options.include_usage` is true.
fn usage_chunk_json(kind: Kind, id: &str, model_json: &str, k: u64, p: u64) -> String {
    let object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    };
    let total = p + k;
    format!(
        r#"{{"id":"{id}","object":"{object}","created":0,"model":{model_json},"choices":[],"usage":{{"prompt_tokens":{p},"completion_tokens":{k},"total_tokens":{total}}}}}"#
    )
}

fn embeddings_json(model_json: &str) -> String {
    format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0]}}],"model":{model_json},"usage":{{"prompt_tokens":1,"total_tokens":1}}}}"#
    )
}

fn metrics_text(st: &State) -> String {
    let label = format!("{{model_name=\"{}\"}}", st.model_label);
    let mut s = String::with_capacity(1024);
    let mut metric = |name: &str, kind: &str, help: &str, labels: &str, value: u64| {
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} {kind}");
        let _ = writeln!(s, "{name}{labels} {value}");
    };
    metric(
        "vllm:num_requests_running",
        "gauge",
        "Number of requests currently being generated.",
        &label,
        st.running.get(),
    );
    metric(
        "vllm:num_requests_waiting",
        "gauge",
        "Number of requests waiting to be processed.",
        &label,
        0,
    );
    metric(
        "sim_requests_total",
        "counter",
        "POST requests received on the /v1 endpoints.",
        "",
        st.total.get(),
    );
    metric(
        "sim_requests_completed_total",
        "counter",
        "Requests answered in full.",
        "",
        st.completed.get(),
    );
    metric(
        "sim_requests_cancelled_total",
        "counter",
        "Requests stopped because the client went away.",
        "",
        st.cancelled.get(),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpStream as StdStream;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn err_text(r: Result<SimArgs, SimError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(a) => panic!("expected an error, got {a:?}"),
        }
    }

    #[test]
    fn parse_defaults_and_forms() {
        let a = SimArgs::parse(&args(&["--listen", "127.0.0.1:0", "--model", "m"])).unwrap();
        assert_eq!(
            a,
            SimArgs {
                listen: "127.0.0.1:0".into(),
                model: "m".into(),
                ttft_ms: 50,
                tokens_per_s: 100.0,
                startup_ms: 0
            }
        );
        let a = SimArgs::parse(&args(&[
            "--model=x",
            "--listen=[::1]:9",
            "--ttft-ms",
            "0",
            "--tokens-per-s=2.5",
            "--startup-ms",
            "700",
        ]))
        .unwrap();
        assert_eq!((a.ttft_ms, a.tokens_per_s, a.startup_ms), (0, 2.5, 700));
        assert_eq!(a.listen, "[::1]:9");
    }

    #[test]
    fn parse_errors_name_the_flag() {
        let base = ["--listen", "a:1", "--model", "m"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            SimArgs::parse(&args(&v))
        };
        assert!(err_text(with(&["--ttft-ms", "x"])).contains("--ttft-ms"));
        assert!(err_text(with(&["--startup-ms", "-1"])).contains("--startup-ms"));
        for bad in ["0", "-3", "abc", "NaN", "inf", "1e-320"] {
            assert!(err_text(with(&["--tokens-per-s", bad])).contains("--tokens-per-s"));
        }
        assert!(err_text(with(&["--frobnicate"])).contains("--frobnicate"));
        assert!(err_text(with(&["--ttft-ms"])).contains("--ttft-ms"));
        assert!(err_text(SimArgs::parse(&args(&["--model", "m"]))).contains("--listen"));
        assert!(err_text(SimArgs::parse(&args(&["--listen", "a:1"]))).contains("--model"));
        assert!(matches!(
            SimArgs::parse(&args(&["--listen", "a:1", "--help"])),
            Err(SimError::Help)
        ));
    }

    #[test]
    fn head_parsing() {
        assert!(parse_head(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .unwrap()
            .is_none());
        let h = parse_head(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nextra")
            .unwrap()
            .unwrap();
        assert_eq!(h.len, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".len());
        assert_eq!(
            (h.req.method.as_str(), h.req.path.as_str()),
            ("GET", "/health")
        );
        assert!(h.req.keep_alive && !h.req.http10);
        assert_eq!(h.body, BodyKind::Length(0));

        let h = parse_head(
            b"POST /v1/x HTTP/1.1\r\ncontent-length: 12\r\nConnection: keep-alive, Close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body, BodyKind::Length(12));
        assert!(!h.req.keep_alive);

        let h = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
        assert!(h.expect_continue);

        let h = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.req.http10 && !h.req.keep_alive);

        let status = |r: Result<Option<Head>, ReqError>| match r {
            Err(ReqError::Http(s, _)) => s,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            status(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")),
            400
        );
        assert_eq!(
            status(parse_head(
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            status(parse_head(
                b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"
            )),
            400
        );
        assert_eq!(status(parse_head(b"\x01\x02 nonsense\r\n\r\n")), 400);
        assert_eq!(
            status(parse_head(
                b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n"
            )),
            413
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..70 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(parse_head(&many)), 431);
    }

    #[test]
    fn chunked_bodies() {
        let full = b"5\r\n{\"mod\r\n3;ext=1\r\nel\"\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (body, used) = decode_chunked(full).unwrap().unwrap();
        assert_eq!(body, b"{\"model\"");
        assert_eq!(&full[used..], b"NEXT");
        // Every proper prefix is incomplete, never an error.
        for cut in 0..used {
            assert_eq!(decode_chunked(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(matches!(
            decode_chunked(b"zz\r\n"),
            Err(ReqError::Http(400, _))
        ));
        assert!(matches!(
            decode_chunked(b"2\r\nabX\r\n"),
            Err(ReqError::Http(400, _))
        ));
        assert!(matches!(
            decode_chunked(b"ffffffffff\r\n"),
            Err(ReqError::Http(413, _))
        ));
    }

    #[test]
    fn generation_params() {
        let p = parse_gen_params(br#"{"model":"m","messages":[]}"#, "m").unwrap();
        assert_eq!(
            (p.max_tokens, p.stream, p.include_usage),
            (16, false, false)
        );
        assert_eq!(
            p.prompt_tokens,
            br#"{"model":"m","messages":[]}"#.len() as u64 / 4
        );
        let p = parse_gen_params(
            br#"{"model":"m","max_tokens":3,"max_completion_tokens":7,"stream":true,"stream_options":{"include_usage":true}}"#,
            "m",
        )
        .unwrap();
        assert_eq!((p.max_tokens, p.stream, p.include_usage), (7, true, true));
        let p = parse_gen_params(
            br#"{"model":"m","max_tokens":3,"max_completion_tokens":null}"#,
            "m",
        )
        .unwrap();
        assert_eq!(p.max_tokens, 3);

        let e = parse_gen_params(br#"{"model":"other"}"#, "m").unwrap_err();
        assert_eq!(e.status, 404);
        assert_eq!(e.message, "The model `other` does not exist.");
        assert_eq!(
            parse_gen_params(br#"{"prompt":"x"}"#, "m")
                .unwrap_err()
                .status,
            404
        );
        for bad in [
            &br#"{"model":"m""#[..],
            br#"[1,2]"#,
            br#"{"model":"m","max_tokens":0}"#,
            br#"{"model":"m","max_tokens":-1}"#,
            br#"{"model":"m","max_tokens":"5"}"#,
            br#"{"model":"m","max_tokens":99999999999}"#,
            br#"{"model":"m","stream":"yes"}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(parse_gen_params(bad, "m").unwrap_err().status, 400);
        }
    }

    #[test]
    fn response_bodies_are_openai_shaped() {
        let model = json_str("we\"ird");
        let v: Value =
            serde_json::from_str(&completion_json(Kind::Chat, "chatcmpl-sim-3", &model, 3, 5))
                .unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "we\"ird");
        assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 tok2 ");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 8);

        let v: Value = serde_json::from_str(&completion_json(
            Kind::Completion,
            "cmpl-sim-1",
            &model,
            1,
            0,
        ))
        .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "tok0 ");

        let v: Value =
            serde_json::from_str(&chunk_json(Kind::Chat, "c", &model, 4, false)).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"]["content"], "tok4 ");
        assert!(v["choices"][0]["finish_reason"].is_null());
        let v: Value =
            serde_json::from_str(&chunk_json(Kind::Completion, "c", &model, 0, true)).unwrap();
        assert_eq!(v["choices"][0]["text"], "tok0 ");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        let v: Value =
            serde_json::from_str(&usage_chunk_json(Kind::Chat, "c", &model, 2, 1)).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 2);

        let v: Value = serde_json::from_str(&error_json("bad \"x\"", 400)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"object":"error","message":"bad \"x\"","type":"BadRequestError","param":null,"code":400})
        );
        let v: Value = serde_json::from_str(&models_json(&model)).unwrap();
        assert_eq!(v["data"][0]["id"], "we\"ird");
        assert_eq!(v["data"][0]["owned_by"], "vllm-gateway-sim");
        let v: Value = serde_json::from_str(&embeddings_json(&model)).unwrap();
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 8);
    }

    #[test]
    fn framing() {
        let mut out = Vec::new();
        push_event(&mut out, "[DONE]", true);
        assert_eq!(out, b"e\r\ndata: [DONE]\n\n\r\n");
        out.clear();
        push_event(&mut out, "{}", false);
        assert_eq!(out, b"data: {}\n\n");
        out.clear();
        write_head(&mut out, 404, JSON, Some(3), false);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn metrics_and_timing() {
        let st = State::new(&SimArgs {
            listen: String::new(),
            model: "a\"b".into(),
            ttft_ms: 100,
            tokens_per_s: 10.0,
            startup_ms: 0,
        });
        {
            let _g = Running::new(&st);
            State::bump(&st.total);
            let m = metrics_text(&st);
            assert!(m.contains("# TYPE vllm:num_requests_running gauge\n"));
            assert!(m.contains("vllm:num_requests_running{model_name=\"a\\\"b\"} 1\n"));
            assert!(m.contains("vllm:num_requests_waiting{model_name=\"a\\\"b\"} 0\n"));
            assert!(m.contains("\nsim_requests_total 1\n"));
            assert!(m.contains("\nsim_requests_completed_total 0\n"));
            assert!(m.contains("\nsim_requests_cancelled_total 0\n"));
        }
        assert_eq!(st.running.get(), 0);
        let t0 = Instant::now();
        assert_eq!(st.token_due(t0, 0) - t0, Duration::from_millis(100));
        assert_eq!(st.token_due(t0, 3) - t0, Duration::from_millis(400));
        assert!(st.token_due(t0, u64::MAX) > t0);
        assert_eq!(token_text(2), "tok0 tok1 ");
    }

    // ---- in-process end to end -------------------------------------------

    /// Starts a simulator on its own thread; returns its address and a stop
    /// function that waits for a clean exit.
    fn start(
        stop: &'static AtomicBool,
        ttft_ms: u64,
        tokens_per_s: f64,
        startup_ms: u64,
    ) -> (std::net::SocketAddr, impl FnOnce()) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let args = SimArgs {
            listen: addr.to_string(),
            model: "m".into(),
            ttft_ms,
            tokens_per_s,
            startup_ms,
        };
        let h = std::thread::spawn(move || serve_blocking(listener, &args, stop));
        let finish = move || {
            stop.store(true, Ordering::SeqCst);
            h.join().unwrap().unwrap();
        };
        (addr, finish)
    }

    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        /// Body, de-chunked; for chunked bodies also each chunk's arrival.
        body: Vec<u8>,
        chunks: Vec<(Instant, Vec<u8>)>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    fn read_resp(r: &mut BufReader<StdStream>) -> Resp {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            chunks: Vec::new(),
        };
        if let Some(n) = resp.header("content-length") {
            let mut body = vec![0; n.parse().unwrap()];
            r.read_exact(&mut body).unwrap();
            resp.body = body;
        } else {
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                let n = usize::from_str_radix(line.trim_end(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                r.read_exact(&mut chunk).unwrap();
                chunk.truncate(n);
                if n == 0 {
                    break;
                }
                resp.body.extend_from_slice(&chunk);
                resp.chunks.push((Instant::now(), chunk));
            }
        }
        resp
    }

    fn send(s: &mut StdStream, method: &str, path: &str, body: &str) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
    }

    fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
        let mut s = StdStream::connect(addr).unwrap();
        send(&mut s, "GET", "/metrics", "");
        let resp = read_resp(&mut BufReader::new(s));
        let text = String::from_utf8(resp.body).unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Polls `cond` for up to 2 s.
    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached in 2 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn e2e_keep_alive_health_and_generation() {
        static STOP: AtomicBool = AtomicBool::new(false);
        let (addr, finish) = start(&STOP, 0, 1000.0, 300);
        let s = StdStream::connect(addr).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);

        send(&mut w, "GET", "/health", "");
        let resp = read_resp(&mut r);
        assert_eq!(
            (resp.status, resp.body.as_slice()),
            (503, &br#"{"status":"loading"}"#[..])
        );
        std::thread::sleep(Duration::from_millis(350));
        send(&mut w, "GET", "/health", "");
        assert_eq!(read_resp(&mut r).status, 200);

        // Two pipelined requests in one write, same connection.
        let body = r#"{"model":"m","max_tokens":2}"#;
        let one = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        w.write_all(format!("{one}{one}").as_bytes()).unwrap();
        for _ in 0..2 {
            let resp = read_resp(&mut r);
            assert_eq!(resp.status, 200);
            let v: Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 ");
        }
        send(&mut w, "POST", "/v1/completions", r#"{"model":"x"}"#);
        assert_eq!(read_resp(&mut r).status, 404);
        send(&mut w, "POST", "/v1/embeddings", "{");
        assert_eq!(read_resp(&mut r).status, 400);
        send(&mut w, "GET", "/nothing", "");
        assert_eq!(read_resp(&mut r).status, 404);
        assert_eq!(metric(addr, "sim_requests_total"), 4);
        assert_eq!(metric(addr, "sim_requests_completed_total"), 2);
        finish();
    }

    #[test]
    fn e2e_streaming_timing_and_cancel() {
        static STOP: AtomicBool = AtomicBool::new(false);
        let (addr, finish) = start(&STOP, 100, 20.0, 0);
        let s = StdStream::connect(addr).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let t0 = Instant::now();
        send(
            &mut w,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"m","max_tokens":3,"stream":true}"#,
        );
        let resp = read_resp(&mut r);
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        assert_eq!(resp.chunks.len(), 4);
        let at = |i: usize| resp.chunks[i].0 - t0;
        assert!(at(0) >= Duration::from_millis(100), "{:?}", at(0));
        assert!(at(1) >= Duration::from_millis(150));
        assert!(at(2) >= Duration::from_millis(200));
        for (i, (_, c)) in resp.chunks.iter().take(3).enumerate() {
            let text = std::str::from_utf8(c).unwrap();
            let json = text
                .strip_prefix("data: ")
                .unwrap()
                .strip_suffix("\n\n")
                .unwrap();
            let v: Value = serde_json::from_str(json).unwrap();
            assert_eq!(v["choices"][0]["delta"]["content"], format!("tok{i} "));
            assert_eq!(v["choices"][0]["finish_reason"].is_null(), i < 2);
        }
        assert_eq!(resp.chunks[3].1, b"data: [DONE]\n\n");

        // A client that leaves during the first-token wait is noticed fast.
        let mut c = StdStream::connect(addr).unwrap();
        send(
            &mut c,
            "POST",
            "/v1/completions",
            r#"{"model":"m","max_tokens":50}"#,
        );
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(metric(addr, "vllm:num_requests_running"), 1);
        let left = Instant::now();
        drop(c);
        wait_for(|| metric(addr, "sim_requests_cancelled_total") == 1);
        // Generous bound for a loaded CI box; the poll step is 10 ms.
        assert!(left.elapsed() < Duration::from_millis(500));
        assert_eq!(metric(addr, "vllm:num_requests_running"), 0);

        // And one that leaves mid-stream.
        let mut c = StdStream::connect(addr).unwrap();
        send(
            &mut c,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"m","max_tokens":50,"stream":true}"#,
        );
        std::thread::sleep(Duration::from_millis(180));
        drop(c);
        wait_for(|| metric(addr, "sim_requests_cancelled_total") == 2);
        assert_eq!(metric(addr, "vllm:num_requests_running"), 0);
        assert_eq!(metric(addr, "sim_requests_completed_total"), 1);
        finish();
    }
}
