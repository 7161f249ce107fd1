//! One proxied request: find `model`, admit, forward with retries, relay the response.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::tcp::TcpOwnedWriteHalf;
use monoio::net::TcpStream;
use slog::{debug, warn};

use crate::admission::Acquire;
use crate::error::DataplaneError;
use crate::extract::{check_rest, find_model, rewrite, Extract};
use crate::http::{self, BodyKind, ChunkedParser, Request};
use crate::io::{race, read_more, ClientReader, Either};
use crate::server::{LocalSnapshot, Worker};
use crate::snapshot::{Endpoint, ModelRoute, ModelState, Snapshot};
use crate::ControlRequest;

/// How a request ended, for the connection loop.
pub struct Outcome {
    pub keep_alive: bool,
    /// Read and discard what the client still sends for a moment before closing, so the
    /// kernel does not answer it with a reset that destroys the response just written.
    pub linger: bool,
}

impl Outcome {
    pub fn close() -> Self {
        Outcome {
            keep_alive: false,
            linger: false,
        }
    }

    pub fn keep(keep_alive: bool) -> Self {
        Outcome {
            keep_alive,
            linger: false,
        }
    }
}

/// A gateway error answer is small; a client that cannot take it in this long is gone.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The request body as the gateway forwards it: a (possibly rewritten) prefix held in memory,
/// then `remaining` bytes still to stream from the client.
struct Body {
    prefix: Bytes,
    remaining: u64,
    upstream_len: u64,
}

/// Counts one outstanding request on an endpoint, for least-outstanding balancing.
struct Outstanding<'a>(&'a Endpoint);

impl<'a> Outstanding<'a> {
    fn new(endpoint: &'a Endpoint) -> Self {
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(endpoint)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Write `data` within `limit`: a peer that stops reading must not hold a slot forever.
async fn write_within<W: AsyncWriteRent, T: monoio::buf::IoBuf + 'static>(
    io: &mut W,
    data: T,
    limit: Duration,
) -> bool {
    matches!(
        monoio::time::timeout(limit, io.write_all(data)).await,
        Ok((Ok(_), _))
    )
}

/// `now + limit`, saturating: a huge configured timeout must not overflow.
pub fn far_deadline(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Constant-time comparison, so a key cannot be guessed byte by byte from timings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn bearer(req: &Request) -> Option<&[u8]> {
    let value = req
        .head
        .headers
        .get(::http::header::AUTHORIZATION)?
        .as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

/// `/v1/*` needs one of `api_keys` when any are configured.
pub fn check_api_key(snap: &Snapshot, req: &Request) -> Result<(), DataplaneError> {
    let keys = &snap.settings.api_keys;
    if keys.is_empty() {
        return Ok(());
    }
    let presented = bearer(req).unwrap_or_default();
    // Check every key, so the time taken does not say which one matched.
    let ok = keys
        .iter()
        .fold(false, |ok, key| ok | ct_eq(presented, key));
    if ok {
        Ok(())
    } else {
        Err(DataplaneError::Unauthorized)
    }
}

pub async fn proxy(
    worker: &Worker,
    snap: LocalSnapshot,
    req: Request,
    reader: &mut ClientReader,
    writer: &mut TcpOwnedWriteHalf,
) -> Outcome {
    let started = Instant::now();
    let settings = &snap.settings;
    if let Err(e) = check_api_key(&snap, &req) {
        return reply_error(worker, writer, None, e, false).await;
    }
    if worker.shared.draining.load(Ordering::Relaxed) {
        return reply_error(worker, writer, None, DataplaneError::ShuttingDown, false).await;
    }
    if let BodyKind::Length(n) = req.body {
        if n > settings.max_body_bytes as u64 {
            let e = DataplaneError::BodyTooLarge {
                limit: settings.max_body_bytes,
            };
            return reply_error(worker, writer, None, e, false).await;
        }
    }
    // Invite the body only once it is known to be acceptable so far.
    if req.expect_continue && req.body != BodyKind::None {
        let (res, _) = writer
            .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
            .await;
        if res.is_err() {
            return Outcome::close();
        }
    }
    let length = match req.body {
        BodyKind::Length(n) => n,
        BodyKind::Chunked => match read_chunked(&snap, reader).await {
            Ok(n) => n,
            Err(e) => return reply_error(worker, writer, None, e, false).await,
        },
        _ => {
            let e = DataplaneError::BadRequest(
                "the request has no body; send a JSON object with a \"model\" field".into(),
            );
            return reply_error(worker, writer, None, e, req.keep_alive).await;
        }
    };

    // Read until the model is known; the rest of the body streams later. The prefix is
    // rescanned only when it doubled (or is whole), so a trickled body costs O(n log n).
    let mut scanned = 0usize;
    let (route_name, body) = loop {
        let Some(buf) = reader.buffer() else {
            return Outcome::close();
        };
        let available = buf.len().min(length as usize);
        let verdict = if available as u64 == length || available >= scanned * 2 {
            scanned = available;
            find_model(&buf[..available])
        } else {
            Extract::Incomplete
        };
        match verdict {
            Extract::Found { model, span } => {
                let Some(route) = snap.route(&model) else {
                    let e = snap.unknown_model(&model);
                    let whole = available as u64 == length;
                    if whole {
                        let _ = buf.split_to(available);
                    }
                    return reply_error(worker, writer, None, e, whole && req.keep_alive).await;
                };
                if available as u64 == length {
                    if let Err(why) = check_rest(&buf[..available], span.1) {
                        let e =
                            DataplaneError::BadRequest(format!("{why}; send a valid JSON object"));
                        return reply_error(worker, writer, None, e, false).await;
                    }
                }
                let needs_rewrite =
                    *model != *route.upstream_model || buf[span.0..span.1].contains(&b'\\');
                let prefix = buf.split_to(available).freeze();
                let body = if needs_rewrite {
                    let replacement = &route.upstream_model_json;
                    let rewritten = rewrite(&prefix, span, replacement);
                    Body {
                        upstream_len: length - (span.1 - span.0) as u64 + replacement.len() as u64,
                        prefix: Bytes::from(rewritten),
                        remaining: length - available as u64,
                    }
                } else {
                    Body {
                        prefix,
                        remaining: length - available as u64,
                        upstream_len: length,
                    }
                };
                break (route.name.clone(), body);
            }
            Extract::Incomplete if (available as u64) < length => {
                let filled = monoio::time::timeout(settings.idle_timeout, reader.fill()).await;
                match filled {
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => return Outcome::close(),
                }
            }
            Extract::Incomplete => {
                let e = DataplaneError::BadRequest(
                    "malformed JSON: the body ends before the object does; send complete JSON"
                        .into(),
                );
                return reply_error(worker, writer, None, e, false).await;
            }
            Extract::Missing => {
                let e = DataplaneError::BadRequest(
                    "the JSON body has no \"model\" field; add one naming a model from GET /v1/models"
                        .into(),
                );
                return reply_error(worker, writer, None, e, false).await;
            }
            Extract::Invalid(why) => {
                let e = DataplaneError::BadRequest(format!("{why}; send a valid JSON object"));
                return reply_error(worker, writer, None, e, false).await;
            }
        }
    };

    // A body left unread on the socket means the connection cannot carry another request.
    let keep_after_error = req.keep_alive && body.remaining == 0;
    let (snap, route) = match wait_until_ready(worker, &route_name, reader).await {
        Ok(found) => found,
        Err((snap, e)) => {
            let route = snap.route(&route_name).cloned();
            return reply_error(worker, writer, route.as_deref(), e, keep_after_error).await;
        }
    };
    let route: &ModelRoute = &route;
    let settings = &snap.settings;
    route.shared.touch();

    let admission = &route.shared.admission;
    let _slot = match admission.acquire(route.max_concurrent, route.max_queue_size) {
        Acquire::Granted(slot) => slot,
        Acquire::Full { queued } => {
            let e = DataplaneError::QueueFull {
                model: route.name.to_string(),
                queued,
                retry_after_s: 1,
            };
            return reply_error(worker, writer, Some(route), e, keep_after_error).await;
        }
        Acquire::Queued(waiting) => {
            match race(
                monoio::time::timeout(settings.queue_timeout, waiting),
                reader.gone(),
            )
            .await
            {
                Either::Left(Ok(slot)) => slot,
                Either::Left(Err(_)) => {
                    let e = DataplaneError::QueueTimeout {
                        model: route.name.to_string(),
                        ms: settings.queue_timeout.as_millis() as u64,
                    };
                    return reply_error(worker, writer, Some(route), e, keep_after_error).await;
                }
                Either::Right(()) => {
                    record(worker, route, 499, started);
                    return Outcome::close();
                }
            }
        }
    };
    route.shared.touch();

    let Some(endpoint) = route.pick_endpoint() else {
        let e = DataplaneError::ModelUnavailable {
            model: route.name.to_string(),
            reason: "it has no endpoint".into(),
        };
        return reply_error(worker, writer, Some(route), e, keep_after_error).await;
    };
    let _outstanding = Outstanding::new(endpoint);
    let outcome = forward(
        worker, &snap, route, endpoint, &req, body, reader, writer, started,
    )
    .await;
    route.shared.touch();
    outcome
}

/// Wait, counted as queued, while the model is starting; ask for a start when it is stopped.
/// Returns the snapshot in which the model is ready.
async fn wait_until_ready(
    worker: &Worker,
    name: &str,
    reader: &mut ClientReader,
) -> Result<(LocalSnapshot, Arc<ModelRoute>), (LocalSnapshot, DataplaneError)> {
    // The body may have taken a while: decide on the snapshot of now.
    let mut snap = worker.snapshot();
    let Some(route) = snap.route(name).cloned() else {
        let e = snap.unknown_model(name);
        return Err((snap, e));
    };
    if route.state == ModelState::Ready {
        return Ok((snap, route));
    }
    let deadline = far_deadline(route.startup_timeout);
    let shared = route.shared.clone();
    let _place = match shared.admission.hold_queue_place(route.max_queue_size) {
        Ok(place) => place,
        Err(queued) => {
            let e = DataplaneError::QueueFull {
                model: name.into(),
                queued,
                retry_after_s: 1,
            };
            return Err((snap, e));
        }
    };
    // The model's start count when we asked for a start: a `failed` after a later start is
    // this attempt's failure; one from before is the previous attempt's.
    let mut asked: Option<u64> = None;
    loop {
        snap = worker.snapshot();
        let Some(route) = snap.route(name).cloned() else {
            let e = snap.unknown_model(name);
            return Err((snap, e));
        };
        // Subscribe on the model as it is now (a reload may have replaced it), then make sure
        // no snapshot was published in between, or a wake-up could be missed.
        let cell = route.shared.state_changed.subscribe();
        if worker.snapshot().generation != snap.generation {
            continue;
        }
        match route.state {
            ModelState::Ready => return Ok((snap, route)),
            ModelState::Starting => {}
            ModelState::Stopped | ModelState::Failed | ModelState::Stopping if asked.is_none() => {
                asked = Some(route.start_seq);
                let request = ControlRequest::Start {
                    model: route.name.clone(),
                };
                if worker.shared.control.send(request).is_err() {
                    let e = DataplaneError::ModelUnavailable {
                        model: name.into(),
                        reason: "the control plane is not running".into(),
                    };
                    return Err((snap, e));
                }
            }
            ModelState::Failed if asked.is_some_and(|at| route.start_seq > at) => {
                let e = DataplaneError::ModelUnavailable {
                    model: name.into(),
                    reason: route.last_error.as_deref().map_or_else(
                        || "its server failed to start".to_string(),
                        |why| format!("its server failed to start: {why}"),
                    ),
                };
                return Err((snap, e));
            }
            ModelState::Stopped | ModelState::Stopping | ModelState::Failed => {}
        }
        let now = Instant::now();
        if now >= deadline && route.vram_blocked {
            let e = DataplaneError::InsufficientVram {
                model: name.into(),
                needed_mib: route.vram_mib,
                secs: route.startup_timeout.as_secs(),
            };
            return Err((snap, e));
        }
        if now >= deadline {
            let e = DataplaneError::ModelUnavailable {
                model: name.into(),
                reason: format!(
                    "it did not become ready within startup_timeout_s ({} s)",
                    route.startup_timeout.as_secs()
                ),
            };
            return Err((snap, e));
        }
        match race(
            monoio::time::timeout(deadline - now, cell.wait()),
            reader.gone(),
        )
        .await
        {
            Either::Left(_) => {}
            Either::Right(()) => return Err((snap, DataplaneError::ClientGone)),
        }
    }
}

/// A chunked request body is read whole (bounded by `max_body_bytes`) and put back in the
/// client buffer de-chunked, so it can be forwarded with a Content-Length and replayed.
async fn read_chunked(snap: &Snapshot, reader: &mut ClientReader) -> Result<u64, DataplaneError> {
    let limit = snap.settings.max_body_bytes;
    let mut parser = ChunkedParser::default();
    let mut body = BytesMut::new();
    loop {
        let buf = reader.buffer().ok_or(DataplaneError::ClientGone)?;
        let mut too_large = false;
        let fed = parser
            .feed(buf, |data| {
                if body.len() + data.len() > limit {
                    too_large = true;
                } else {
                    body.extend_from_slice(data);
                }
            })
            .map_err(|why| DataplaneError::BadRequest(format!("bad chunked body: {why}")))?;
        if too_large {
            return Err(DataplaneError::BodyTooLarge { limit });
        }
        let _ = buf.split_to(fed.consumed);
        if fed.done {
            let len = body.len() as u64;
            body.extend_from_slice(buf);
            *buf = body;
            return Ok(len);
        }
        match monoio::time::timeout(snap.settings.idle_timeout, reader.fill()).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(DataplaneError::ClientGone),
        }
    }
}

enum Attempt {
    Done(Outcome),
    /// Nothing of the response arrived; the request may go again.
    Retry {
        stale: bool,
        error: String,
    },
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    worker: &Worker,
    snap: &Snapshot,
    route: &ModelRoute,
    endpoint: &Endpoint,
    req: &Request,
    mut body: Body,
    reader: &mut ClientReader,
    writer: &mut TcpOwnedWriteHalf,
    started: Instant,
) -> Outcome {
    let settings = &snap.settings;
    let strip_auth = !settings.api_keys.is_empty();
    let mut head = Vec::with_capacity(512 + body.prefix.len());
    http::write_upstream_head(
        &mut head,
        &req.head,
        &endpoint.authority,
        BodyKind::Length(body.upstream_len),
        strip_auth,
    );
    let head_len = head.len();
    // Small bodies go in the same write as the head.
    if body.prefix.len() <= 64 * 1024 {
        head.extend_from_slice(&body.prefix);
    }
    let head = Bytes::from(head);

    let mut connect_failures = 0u32;
    let mut backoff = settings.retry_backoff;
    let mut stale_retry_used = false;
    loop {
        // A body still streaming from the client cannot be replayed, so check the pooled
        // connection first; a buffered one is simply retried if the connection was stale.
        let pooled = worker.pool.take(
            endpoint.addr,
            settings.pool_idle_timeout,
            body.remaining > 0,
        );
        let reused = pooled.is_some();
        let conn = match pooled {
            Some(conn) => conn,
            None => match connect(endpoint, settings.connect_timeout).await {
                Ok(conn) => conn,
                Err(error) => {
                    connect_failures += 1;
                    if connect_failures >= settings.retry_attempts {
                        let e = DataplaneError::UpstreamUnavailable {
                            model: route.name.to_string(),
                            attempts: connect_failures,
                            cause: error,
                        };
                        return reply_error(
                            worker,
                            writer,
                            Some(route),
                            e,
                            body.remaining == 0 && req.keep_alive,
                        )
                        .await;
                    }
                    route
                        .shared
                        .metrics
                        .upstream_retries
                        .fetch_add(1, Ordering::Relaxed);
                    if let Either::Right(()) =
                        race(monoio::time::sleep(backoff), reader.gone()).await
                    {
                        record(worker, route, 499, started);
                        return Outcome::close();
                    }
                    // Bounded, so a large multiplier cannot overflow (and panic) after retries.
                    backoff = Duration::try_from_secs_f64(
                        backoff.as_secs_f64() * settings.retry_multiplier,
                    )
                    .unwrap_or(Duration::MAX)
                    .min(Duration::from_secs(60));
                    continue;
                }
            },
        };
        // Once part of a streamed body has been sent, it cannot be sent again.
        let replayable = body.remaining == 0;
        match attempt(
            worker, snap, route, endpoint, req, &head, head_len, &mut body, conn, reader, writer,
            started,
        )
        .await
        {
            Attempt::Done(outcome) => return outcome,
            Attempt::Retry { stale, error } => {
                if stale && reused && replayable && !stale_retry_used {
                    stale_retry_used = true;
                    route
                        .shared
                        .metrics
                        .upstream_retries
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(worker.log, "retrying on a fresh connection"; "model" => &*route.name, "error" => &error);
                    // A fresh connection next time: drop idle ones that are likely stale too.
                    while worker
                        .pool
                        .take(endpoint.addr, Duration::ZERO, false)
                        .is_some()
                    {}
                    continue;
                }
                let e = DataplaneError::UpstreamUnavailable {
                    model: route.name.to_string(),
                    attempts: connect_failures + 1,
                    cause: error,
                };
                return reply_error(worker, writer, Some(route), e, false).await;
            }
        }
    }
}

async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<TcpStream, String> {
    match monoio::time::timeout(timeout, TcpStream::connect_addr(endpoint.addr)).await {
        Ok(Ok(stream)) => {
            // Latency matters more than packet count for small JSON and SSE events.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(format!("connect to {}: {e}", endpoint.url)),
        Err(_) => Err(format!(
            "connect to {} timed out after {} ms",
            endpoint.url,
            timeout.as_millis()
        )),
    }
}

/// Send the request on `conn` and relay the response.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    worker: &Worker,
    snap: &Snapshot,
    route: &ModelRoute,
    endpoint: &Endpoint,
    req: &Request,
    head: &Bytes,
    head_len: usize,
    body: &mut Body,
    mut conn: TcpStream,
    reader: &mut ClientReader,
    writer: &mut TcpOwnedWriteHalf,
    started: Instant,
) -> Attempt {
    let settings = &snap.settings;
    let model = &*route.name;
    let retry = |error: String| Attempt::Retry { stale: true, error };

    // Request: head (+ small prefix), then the rest of the body from the client.
    if !write_within(&mut conn, head.clone(), settings.idle_timeout).await {
        return retry(format!("could not write the request to {}", endpoint.url));
    }
    if head.len() == head_len
        && !body.prefix.is_empty()
        && !write_within(&mut conn, body.prefix.clone(), settings.idle_timeout).await
    {
        return retry(format!("could not write the request to {}", endpoint.url));
    }
    while body.remaining > 0 {
        // A disconnect watch may have left a read running: it completes with more body.
        if reader.buffer().is_none() {
            match monoio::time::timeout(settings.idle_timeout, reader.settle()).await {
                Ok(true) => {}
                _ => {
                    record(worker, route, 499, started);
                    return Attempt::Done(Outcome::close());
                }
            }
        }
        let chunk = {
            let Some(buf) = reader.buffer() else {
                return Attempt::Done(Outcome::close());
            };
            if buf.is_empty() {
                None
            } else {
                let take = buf.len().min(body.remaining as usize);
                Some(buf.split_to(take).freeze())
            }
        };
        match chunk {
            Some(chunk) => {
                body.remaining -= chunk.len() as u64;
                if !write_within(&mut conn, chunk, settings.idle_timeout).await {
                    let e = DataplaneError::UpstreamUnavailable {
                        model: model.into(),
                        attempts: 1,
                        cause: format!(
                            "could not write the request body to {} within idle_ms",
                            endpoint.url
                        ),
                    };
                    return Attempt::Done(reply_error(worker, writer, Some(route), e, false).await);
                }
            }
            None => match monoio::time::timeout(settings.idle_timeout, reader.fill()).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    record(worker, route, 499, started);
                    return Attempt::Done(Outcome::close());
                }
            },
        }
    }

    // Response head, bounded by first_byte_ms, abandoned if the client leaves.
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut saw_interim = false;
    let response = 'head: loop {
        let read = race(
            monoio::time::timeout(settings.first_byte_timeout, read_more(&mut conn, buf)),
            reader.gone(),
        )
        .await;
        let (res, returned) = match read {
            Either::Left(Ok(result)) => result,
            Either::Left(Err(_)) => {
                let e = DataplaneError::UpstreamTimeout {
                    model: model.into(),
                    phase: "response",
                    ms: settings.first_byte_timeout.as_millis() as u64,
                };
                return Attempt::Done(reply_error(worker, writer, Some(route), e, false).await);
            }
            Either::Right(()) => {
                debug!(worker.log, "client went away while waiting; cancelling upstream"; "model" => model);
                record(worker, route, 499, started);
                return Attempt::Done(Outcome::close());
            }
        };
        buf = returned;
        match res {
            Ok(0) if buf.is_empty() && !saw_interim => {
                return retry(format!(
                    "{} closed the connection before responding",
                    endpoint.url
                ))
            }
            Err(e) if buf.is_empty() && !saw_interim => {
                return retry(format!("read from {}: {e}", endpoint.url))
            }
            Ok(0) | Err(_) => {
                let e = DataplaneError::BadUpstreamResponse {
                    model: model.into(),
                    cause: "connection closed inside the response head".into(),
                };
                return Attempt::Done(reply_error(worker, writer, Some(route), e, false).await);
            }
            Ok(_) => {}
        }
        // Interim (1xx) heads are dropped; the final head may already be buffered behind one.
        loop {
            match http::parse_response(&mut buf, &req.head.method) {
                Ok(Some(resp)) if resp.head.status.as_u16() < 200 => saw_interim = true,
                Ok(Some(resp)) => break 'head resp,
                Ok(None) => break,
                Err(cause) => {
                    let e = DataplaneError::BadUpstreamResponse {
                        model: model.into(),
                        cause,
                    };
                    return Attempt::Done(reply_error(worker, writer, Some(route), e, false).await);
                }
            }
        }
    };
    let status = response.head.status.as_u16();
    route.shared.metrics.ttfb.observe(started.elapsed());

    // Relay: the head and whatever body bytes came with it, then chunk by chunk.
    let keep_client = req.keep_alive && response.body != BodyKind::UntilClose;
    let mut out = Vec::with_capacity(512 + buf.len());
    http::write_client_head(&mut out, &response, keep_client);
    let mut framing = Framing::new(response.body);
    let (body_len, done) = match framing.advance(&buf) {
        Ok(step) => step,
        Err(why) => {
            warn!(worker.log, "bad upstream body framing"; "model" => model, "error" => why);
            return Attempt::Done(Outcome::close());
        }
    };
    out.extend_from_slice(&buf[..body_len]);
    let trailing_garbage = body_len < buf.len();
    if !write_within(writer, out, settings.idle_timeout).await {
        record(worker, route, 499, started);
        return Attempt::Done(Outcome::close());
    }
    let mut finished = done;
    buf.clear();
    while !finished {
        let read = race(
            monoio::time::timeout(settings.idle_timeout, read_more(&mut conn, buf)),
            reader.gone(),
        )
        .await;
        let (res, returned) = match read {
            Either::Left(Ok(result)) => result,
            Either::Left(Err(_)) => {
                warn!(worker.log, "upstream idle timeout mid-response"; "model" => model, "idle_ms" => settings.idle_timeout.as_millis() as u64);
                record(worker, route, 504, started);
                return Attempt::Done(Outcome::close());
            }
            Either::Right(()) => {
                debug!(worker.log, "client went away mid-response; cancelling upstream"; "model" => model);
                record(worker, route, 499, started);
                return Attempt::Done(Outcome::close());
            }
        };
        buf = returned;
        match res {
            Ok(0) if framing.kind == BodyKind::UntilClose => break,
            Ok(0) | Err(_) => {
                warn!(worker.log, "upstream closed mid-response"; "model" => model);
                record(worker, route, 502, started);
                return Attempt::Done(Outcome::close());
            }
            Ok(_) => {}
        }
        let (n, done) = match framing.advance(&buf) {
            Ok(step) => step,
            Err(why) => {
                warn!(worker.log, "bad upstream body framing"; "model" => model, "error" => why);
                return Attempt::Done(Outcome::close());
            }
        };
        finished = done;
        if n < buf.len() {
            buf.truncate(n);
            if !write_within(writer, buf, settings.idle_timeout).await {
                record(worker, route, 499, started);
                return Attempt::Done(Outcome::close());
            }
            drop(conn);
            record(worker, route, status, started);
            return Attempt::Done(Outcome::keep(keep_client));
        }
        // Backpressure: the next upstream read waits for this write, bounded by idle_ms.
        match monoio::time::timeout(settings.idle_timeout, writer.write_all(buf)).await {
            Ok((Ok(_), returned)) => {
                buf = returned;
                buf.clear();
            }
            _ => {
                record(worker, route, 499, started);
                return Attempt::Done(Outcome::close());
            }
        }
    }
    if response.keep_alive && !trailing_garbage && framing.kind != BodyKind::UntilClose {
        worker.pool.put(endpoint.addr, conn);
    }
    record(worker, route, status, started);
    Attempt::Done(Outcome::keep(keep_client))
}

/// Where the relayed response body ends.
struct Framing {
    kind: BodyKind,
    remaining: u64,
    chunked: ChunkedParser,
}

impl Framing {
    fn new(kind: BodyKind) -> Self {
        let remaining = match kind {
            BodyKind::Length(n) => n,
            _ => 0,
        };
        Framing {
            kind,
            remaining,
            chunked: ChunkedParser::default(),
        }
    }

    /// How many bytes of `data` belong to the body, and whether it is complete.
    fn advance(&mut self, data: &[u8]) -> Result<(usize, bool), &'static str> {
        match self.kind {
            BodyKind::None => Ok((0, true)),
            BodyKind::Length(_) => {
                let n = (data.len() as u64).min(self.remaining) as usize;
                self.remaining -= n as u64;
                Ok((n, self.remaining == 0))
            }
            BodyKind::Chunked => {
                let fed = self.chunked.feed(data, |_| {})?;
                Ok((fed.consumed, fed.done))
            }
            BodyKind::UntilClose => Ok((data.len(), false)),
        }
    }
}

fn record(worker: &Worker, route: &ModelRoute, status: u16, started: Instant) {
    let metrics = &route.shared.metrics;
    metrics.count_status(status);
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed);
    debug!(worker.log, "request"; "model" => &*route.name, "status" => status, "us" => elapsed.as_micros() as u64);
}

/// Send a gateway error, count it, and say whether the connection may carry on.
pub async fn reply_error(
    worker: &Worker,
    writer: &mut TcpOwnedWriteHalf,
    route: Option<&ModelRoute>,
    error: DataplaneError,
    keep_alive: bool,
) -> Outcome {
    if matches!(error, DataplaneError::ClientGone) {
        return Outcome::close();
    }
    let (status, _, _) = error.http();
    if let Some(route) = route {
        let metrics = &route.shared.metrics;
        metrics.count_status(status);
        if let Some(reason) = error.rejection_reason() {
            metrics.count_rejection(reason);
        }
    }
    if error.source() != crate::error::Source::Client {
        warn!(worker.log, "request failed"; "status" => status, "error" => %error);
    } else {
        debug!(worker.log, "request refused"; "status" => status, "error" => %error);
    }
    let retry_after = error.retry_after_s().map(|s| s.to_string());
    let extra: Vec<(&str, &str)> = retry_after
        .as_deref()
        .map(|s| vec![("retry-after", s)])
        .unwrap_or_default();
    let response = http::simple_response(
        status,
        "application/json",
        &error.body(),
        &extra,
        keep_alive,
    );
    if !write_within(writer, response, ERROR_WRITE_TIMEOUT).await {
        return Outcome::close();
    }
    if !keep_alive {
        let _ = writer.shutdown().await;
    }
    Outcome {
        keep_alive,
        // Unread request bytes would make the close a reset that destroys this answer.
        linger: !keep_alive,
    }
}
