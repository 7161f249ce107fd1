//! The data plane's one error enum, and the single place that maps it to HTTP.

use std::io;

/// Who caused an error: decides logging level and whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Upstream,
    Gateway,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid credentials: send \"Authorization: Bearer <key>\" with one of the gateway's api_keys")]
    Unauthorized,
    #[error("missing or invalid admin token: send \"Authorization: Bearer <admin_token>\"")]
    AdminUnauthorized,
    #[error("model '{model}' does not exist; known models: {known}")]
    ModelNotFound { model: String, known: String },
    #[error("no route for {method} {path}; the gateway serves POST /v1/*, GET /v1/models, /health, /metrics and /gateway/*")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("request body is larger than max_body_bytes ({limit} bytes); send a smaller body or raise max_body_bytes")]
    BodyTooLarge { limit: usize },
    #[error("request head is larger than max_header_bytes ({limit} bytes); send fewer or smaller headers")]
    HeadersTooLarge { limit: usize },
    #[error("the request head did not arrive within header_read_ms ({ms} ms); send the whole head promptly")]
    HeaderTimeout { ms: u64 },
    #[error("model '{model}' has {queued} requests waiting (max_queue_size); retry after {retry_after_s} s, or raise max_queue_size")]
    QueueFull {
        model: String,
        queued: usize,
        retry_after_s: u64,
    },
    #[error("model '{model}' had no free slot within queue_timeout_ms ({ms} ms); retry later, or raise max_concurrent or queue_timeout_ms")]
    QueueTimeout { model: String, ms: u64 },
    #[error("model '{model}' is unavailable: {reason}; retry later and check the gateway log")]
    ModelUnavailable { model: String, reason: String },
    #[error("model '{model}' needs {needed_mib} MiB of VRAM and none could be freed within {secs} s (every other model is busy or pinned); retry later, or free GPU memory")]
    InsufficientVram {
        model: String,
        needed_mib: u64,
        secs: u64,
    },
    #[error("model server for '{model}' is unreachable after {attempts} attempt(s): {cause}; check that it is running")]
    UpstreamUnavailable {
        model: String,
        attempts: u32,
        cause: String,
    },
    #[error("model server for '{model}' sent an invalid response: {cause}")]
    BadUpstreamResponse { model: String, cause: String },
    #[error("model server for '{model}' sent no {phase} within {ms} ms; retry, or raise timeouts")]
    UpstreamTimeout {
        model: String,
        phase: &'static str,
        ms: u64,
    },
    #[error("the gateway is shutting down; retry on another instance or after restart")]
    ShuttingDown,
    #[error("client went away")]
    ClientGone,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl DataplaneError {
    /// The HTTP status, the contract's `code` and OpenAI's `type`.
    pub fn http(&self) -> (u16, &'static str, &'static str) {
        use DataplaneError::*;
        match self {
            BadRequest(_) => (400, "invalid_request", "invalid_request_error"),
            Unauthorized | AdminUnauthorized => (401, "unauthorized", "authentication_error"),
            ModelNotFound { .. } => (404, "model_not_found", "not_found_error"),
            NotFound { .. } => (404, "not_found", "not_found_error"),
            MethodNotAllowed { .. } => (405, "method_not_allowed", "invalid_request_error"),
            HeaderTimeout { .. } => (408, "request_timeout", "invalid_request_error"),
            BodyTooLarge { .. } => (413, "body_too_large", "invalid_request_error"),
            HeadersTooLarge { .. } => (431, "headers_too_large", "invalid_request_error"),
            QueueFull { .. } => (429, "queue_full", "rate_limit_error"),
            QueueTimeout { .. } => (429, "queue_timeout", "rate_limit_error"),
            UpstreamUnavailable { .. } => (502, "upstream_unavailable", "server_error"),
            BadUpstreamResponse { .. } => (502, "bad_upstream_response", "server_error"),
            ModelUnavailable { .. } => (503, "model_unavailable", "server_error"),
            InsufficientVram { .. } => (503, "insufficient_vram", "server_error"),
            ShuttingDown => (503, "shutting_down", "server_error"),
            UpstreamTimeout { .. } => (504, "upstream_timeout", "server_error"),
            ClientGone | Io(_) => (500, "internal_error", "server_error"),
        }
    }

    pub fn source(&self) -> Source {
        use DataplaneError::*;
        match self {
            UpstreamUnavailable { .. } | BadUpstreamResponse { .. } | UpstreamTimeout { .. } => {
                Source::Upstream
            }
            ModelUnavailable { .. } | InsufficientVram { .. } | ShuttingDown | Io(_) => {
                Source::Gateway
            }
            _ => Source::Client,
        }
    }

    /// Whether the same request may succeed if the client sends it again later.
    pub fn retryable(&self) -> bool {
        use DataplaneError::*;
        matches!(
            self,
            QueueFull { .. }
                | QueueTimeout { .. }
                | ModelUnavailable { .. }
                | InsufficientVram { .. }
                | UpstreamUnavailable { .. }
                | UpstreamTimeout { .. }
                | ShuttingDown
        )
    }

    /// `Retry-After` seconds, where the contract sends one.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            DataplaneError::QueueFull { retry_after_s, .. } => Some(*retry_after_s),
            DataplaneError::QueueTimeout { .. } => Some(1),
            _ => None,
        }
    }

    /// The rejection reason label for `gateway_rejected_total`, when this is a rejection.
    pub fn rejection_reason(&self) -> Option<&'static str> {
        use DataplaneError::*;
        match self {
            QueueFull { .. } => Some("queue_full"),
            QueueTimeout { .. } => Some("queue_timeout"),
            ModelUnavailable { .. } => Some("model_unavailable"),
            InsufficientVram { .. } => Some("insufficient_vram"),
            ShuttingDown => Some("shutting_down"),
            BodyTooLarge { .. } => Some("body_too_large"),
            Unauthorized => Some("unauthorized"),
            _ => None,
        }
    }

    /// The OpenAI-shaped error body.
    pub fn body(&self) -> Vec<u8> {
        let (_, code, kind) = self.http();
        error_body(&self.to_string(), kind, code)
    }
}

pub fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    let value = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    // Serialising a json! value cannot fail.
    serde_json::to_vec(&value).unwrap_or_default()
}
