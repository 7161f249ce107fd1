//! Endpoints the gateway answers itself: health, metrics, model lists, config, log level.

use std::sync::atomic::Ordering;

use monoio::io::AsyncWriteRentExt;
use monoio::net::tcp::TcpOwnedWriteHalf;

use crate::error::DataplaneError;
use crate::http::{self, BodyKind, ChunkedParser, Request};
use crate::io::ClientReader;
use crate::proxy::{bearer, ct_eq, reply_error, Outcome};
use crate::server::Worker;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::snapshot::{ModelState, Snapshot};
use crate::ControlRequest;

/// Admin request bodies are small JSON documents.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

pub async fn handle(
    worker: &Worker,
    snap: &Snapshot,
    req: Request,
    reader: &mut ClientReader,
    writer: &mut TcpOwnedWriteHalf,
) -> Outcome {
    let method = req.head.method.clone();
    let path = req.head.uri.path().to_owned();
    // The body is read first, so the connection stays in step whatever we answer.
    let body = match read_small_body(reader, &req, snap.settings.idle_timeout).await {
        Ok(body) => body,
        Err(e) => return reply_error(worker, writer, None, e, false).await,
    };
    let keep = req.keep_alive;
    if path.starts_with("/v1/") {
        if let Err(e) = crate::proxy::check_api_key(snap, &req) {
            return reply_error(worker, writer, None, e, keep).await;
        }
    }
    let draining = worker.shared.draining.load(Ordering::Relaxed);
    let (status, content_type, payload): (u16, &str, Vec<u8>) =
        match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/health") if draining => (
                503,
                "application/json",
                br#"{"status":"draining"}"#.to_vec(),
            ),
            ("GET" | "HEAD", "/health") => {
                (200, "application/json", br#"{"status":"ok"}"#.to_vec())
            }
            ("GET", "/metrics") => (
                200,
                "text/plain; version=0.0.4",
                crate::metrics::render(snap, &worker.shared.metrics).into_bytes(),
            ),
            ("GET", "/v1/models") => (200, "application/json", snap.models_list_json.to_vec()),
            ("GET", "/gateway/config") => {
                let mut config: serde_json::Value =
                    serde_json::from_slice(&snap.config_json).unwrap_or(serde_json::json!({}));
                // The live level, which PUT /gateway/log-level may have changed.
                if let Some(gateway) = config.get_mut("gateway").and_then(|g| g.as_object_mut()) {
                    gateway.insert(
                        "log_level".into(),
                        level_name(worker.shared.log_level.get()).into(),
                    );
                }
                (
                    200,
                    "application/json",
                    serde_json::to_vec(&config).unwrap_or_default(),
                )
            }
            ("GET", "/gateway/models") => (200, "application/json", models_json(snap)),
            ("POST", "/gateway/reload") => {
                if let Err(e) = check_admin(snap, &req) {
                    return reply_error(worker, writer, None, e, keep).await;
                }
                let reply = Arc::new(crate::Reply::default());
                let request = ControlRequest::Reload {
                    reply: Some(reply.clone()),
                };
                if worker.shared.control.send(request).is_err() {
                    let e = DataplaneError::ModelUnavailable {
                        model: "(reload)".into(),
                        reason: "the control plane is not running".into(),
                    };
                    return reply_error(worker, writer, None, e, false).await;
                }
                let _ = monoio::time::timeout(Duration::from_secs(30), reply.done.wait()).await;
                match reply.take() {
                    Some((status, body)) => (
                        status,
                        "application/json",
                        serde_json::to_vec(&body).unwrap_or_default(),
                    ),
                    None => (
                        504,
                        "application/json",
                        crate::error::error_body(
                            "the reload did not finish within 30 s; check the gateway log",
                            "server_error",
                            "reload_timeout",
                        ),
                    ),
                }
            }
            ("POST", p) if p.starts_with("/gateway/models/") => {
                if let Err(e) = check_admin(snap, &req) {
                    return reply_error(worker, writer, None, e, keep).await;
                }
                match load_or_unload(worker, snap, p).await {
                    Ok((status, body)) => (status, "application/json", body),
                    Err(e) => return reply_error(worker, writer, None, e, keep).await,
                }
            }
            ("PUT", "/gateway/log-level") => {
                if let Err(e) = check_admin(snap, &req) {
                    return reply_error(worker, writer, None, e, keep).await;
                }
                match set_log_level(worker, &body) {
                    Ok(level) => (
                        200,
                        "application/json",
                        serde_json::to_vec(&serde_json::json!({"level": level}))
                            .unwrap_or_default(),
                    ),
                    Err(e) => return reply_error(worker, writer, None, e, keep).await,
                }
            }
            (
                _,
                "/health" | "/metrics" | "/v1/models" | "/gateway/config" | "/gateway/models"
                | "/gateway/log-level" | "/gateway/reload",
            ) => {
                let e = DataplaneError::MethodNotAllowed {
                    method: method.to_string(),
                    path,
                };
                return reply_error(worker, writer, None, e, keep).await;
            }
            _ => {
                let e = DataplaneError::NotFound {
                    method: method.to_string(),
                    path,
                };
                return reply_error(worker, writer, None, e, keep).await;
            }
        };
    let mut response = http::simple_response(status, content_type, &payload, &[], keep);
    if method == ::http::Method::HEAD {
        // Same head as GET (length included), no body: the client reads none.
        response.truncate(response.len() - payload.len());
    }
    let written =
        monoio::time::timeout(snap.settings.idle_timeout, writer.write_all(response)).await;
    Outcome::keep(keep && matches!(written, Ok((Ok(_), _))))
}

/// `POST /gateway/models/{name}/load|unload`: ask the control plane, then wait (bounded) for
/// the model to get there. 200 when it did, 202 when it is still on its way.
async fn load_or_unload(
    worker: &Worker,
    snap: &Snapshot,
    path: &str,
) -> Result<(u16, Vec<u8>), DataplaneError> {
    let rest = &path["/gateway/models/".len()..];
    let (name, action) = rest
        .rsplit_once('/')
        .ok_or_else(|| DataplaneError::NotFound {
            method: "POST".into(),
            path: path.into(),
        })?;
    let route = snap.route(name).ok_or_else(|| snap.unknown_model(name))?;
    if route.runtime == "static" {
        return Err(DataplaneError::BadRequest(format!(
            "model '{}' is static: someone else runs its servers, so it cannot be loaded or unloaded",
            route.name
        )));
    }
    let (request, done, limit): (_, fn(ModelState) -> bool, _) = match action {
        "load" => (
            ControlRequest::Load {
                model: route.name.clone(),
            },
            |s| matches!(s, ModelState::Ready | ModelState::Failed),
            route.startup_timeout,
        ),
        "unload" => (
            ControlRequest::Unload {
                model: route.name.clone(),
            },
            |s| matches!(s, ModelState::Stopped | ModelState::Failed),
            Duration::from_secs(30),
        ),
        _ => {
            return Err(DataplaneError::NotFound {
                method: "POST".into(),
                path: path.into(),
            })
        }
    };
    let shared = route.shared.clone();
    let name = route.name.clone();
    let asked_at = snap.generation;
    let starts_before = route.start_seq;
    worker
        .shared
        .control
        .send(request)
        .map_err(|_| DataplaneError::ModelUnavailable {
            model: name.to_string(),
            reason: "the control plane is not running".into(),
        })?;
    let deadline = Instant::now() + limit;
    loop {
        let cell = shared.state_changed.subscribe();
        let now = worker.snapshot();
        let current = now.route(&name);
        let state = current.map_or(ModelState::Stopped, |r| r.state);
        // A failure only counts once a start was issued after this request.
        let stale_failure = state == ModelState::Failed
            && action == "load"
            && current.is_some_and(|r| r.start_seq <= starts_before);
        let finished = now.generation > asked_at && done(state) && !stale_failure;
        let left = deadline.saturating_duration_since(Instant::now());
        if finished && state == ModelState::Failed {
            return Err(DataplaneError::ModelUnavailable {
                model: name.to_string(),
                reason: "its server failed to start".into(),
            });
        }
        if finished || left.is_zero() {
            let body = serde_json::json!({"name": &*name, "state": state.as_str()});
            let status = if finished { 200 } else { 202 };
            return Ok((status, serde_json::to_vec(&body).unwrap_or_default()));
        }
        let _ = monoio::time::timeout(left, cell.wait()).await;
    }
}

pub fn check_admin(snap: &Snapshot, req: &Request) -> Result<(), DataplaneError> {
    match &snap.settings.admin_token {
        None => Ok(()),
        Some(token) => match bearer(req) {
            Some(presented) if ct_eq(presented, token) => Ok(()),
            _ => Err(DataplaneError::AdminUnauthorized),
        },
    }
}

fn set_log_level(worker: &Worker, body: &[u8]) -> Result<&'static str, DataplaneError> {
    let bad =
        || DataplaneError::BadRequest("send {\"level\":\"error|warn|info|debug|trace\"}".into());
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad())?;
    let level = match value.get("level").and_then(|l| l.as_str()) {
        Some("error") => slog::Level::Error,
        Some("warn") => slog::Level::Warning,
        Some("info") => slog::Level::Info,
        Some("debug") => slog::Level::Debug,
        Some("trace") => slog::Level::Trace,
        _ => return Err(bad()),
    };
    worker.shared.log_level.set(level);
    Ok(level_name(level))
}

pub fn level_name(level: slog::Level) -> &'static str {
    match level {
        slog::Level::Critical | slog::Level::Error => "error",
        slog::Level::Warning => "warn",
        slog::Level::Info => "info",
        slog::Level::Debug => "debug",
        slog::Level::Trace => "trace",
    }
}

fn models_json(snap: &Snapshot) -> Vec<u8> {
    let models: Vec<_> = snap
        .models
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": &*m.name,
                "aliases": m.aliases.iter().map(|a| &**a).collect::<Vec<_>>(),
                "upstream_model": &*m.upstream_model,
                "runtime": m.runtime,
                "state": m.state.as_str(),
                "in_flight": m.shared.admission.in_flight(),
                "queued": m.shared.admission.queued(),
                "max_concurrent": m.max_concurrent,
                "max_queue_size": m.max_queue_size,
                "endpoints": m.endpoints.iter().map(|e| &*e.url).collect::<Vec<_>>(),
                "vram_mib": m.vram_mib,
                "pinned": m.pinned,
                "last_used_ms": m.shared.last_used_ms.load(Ordering::Relaxed),
                "last_error": m.last_error.as_deref(),
            })
        })
        .collect();
    serde_json::to_vec(&models).unwrap_or_default()
}

/// More bytes from the client within `limit`; false when it went away or stalled.
async fn fill_within(reader: &mut ClientReader, limit: Duration) -> bool {
    matches!(monoio::time::timeout(limit, reader.fill()).await, Ok(Ok(n)) if n > 0)
}

/// Read a whole small body, de-chunked, each read bounded by `limit`.
async fn read_small_body(
    reader: &mut ClientReader,
    req: &Request,
    limit: Duration,
) -> Result<Vec<u8>, DataplaneError> {
    let too_large = DataplaneError::BodyTooLarge {
        limit: ADMIN_BODY_LIMIT,
    };
    match req.body {
        BodyKind::None | BodyKind::UntilClose => Ok(Vec::new()),
        BodyKind::Length(n) if n as usize > ADMIN_BODY_LIMIT => Err(too_large),
        BodyKind::Length(n) => loop {
            let buf = reader.buffer().ok_or(DataplaneError::ClientGone)?;
            if buf.len() >= n as usize {
                return Ok(buf.split_to(n as usize).to_vec());
            }
            if !fill_within(reader, limit).await {
                return Err(DataplaneError::ClientGone);
            }
        },
        BodyKind::Chunked => {
            let mut parser = ChunkedParser::default();
            let mut body = Vec::new();
            loop {
                let buf = reader.buffer().ok_or(DataplaneError::ClientGone)?;
                let fed = parser
                    .feed(buf, |d| body.extend_from_slice(d))
                    .map_err(|why| {
                        DataplaneError::BadRequest(format!("bad chunked body: {why}"))
                    })?;
                let _ = buf.split_to(fed.consumed);
                if body.len() > ADMIN_BODY_LIMIT {
                    return Err(too_large);
                }
                if fed.done {
                    return Ok(body);
                }
                if !fill_within(reader, limit).await {
                    return Err(DataplaneError::ClientGone);
                }
            }
        }
    }
}
