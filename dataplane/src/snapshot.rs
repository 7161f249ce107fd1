//! The routing snapshot: everything a request needs, published whole by the control plane
//! behind one `ArcSwap` and loaded once per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::admission::Admission;
use crate::metrics::ModelMetrics;
use crate::notify::Notifier;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Stopped,
    Starting,
    Ready,
    Stopping,
    Failed,
}

impl ModelState {
    pub const ALL: [ModelState; 5] = [
        ModelState::Stopped,
        ModelState::Starting,
        ModelState::Ready,
        ModelState::Stopping,
        ModelState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Stopped => "stopped",
            ModelState::Starting => "starting",
            ModelState::Ready => "ready",
            ModelState::Stopping => "stopping",
            ModelState::Failed => "failed",
        }
    }
}

/// Gateway-wide request settings, validated by the control plane.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub queue_timeout: Duration,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    pub client_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub retry_attempts: u32,
    pub retry_backoff: Duration,
    pub retry_multiplier: f64,
    pub api_keys: Vec<Box<[u8]>>,
    pub admin_token: Option<Box<[u8]>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_body_bytes: 32 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            queue_timeout: Duration::from_millis(60_000),
            connect_timeout: Duration::from_millis(2_000),
            first_byte_timeout: Duration::from_millis(300_000),
            idle_timeout: Duration::from_millis(60_000),
            header_read_timeout: Duration::from_millis(10_000),
            client_idle_timeout: Duration::from_millis(75_000),
            pool_idle_timeout: Duration::from_millis(4_000),
            retry_attempts: 3,
            retry_backoff: Duration::from_millis(1_000),
            retry_multiplier: 1.5,
            api_keys: Vec::new(),
            admin_token: None,
        }
    }
}

/// One model server address. The same `Arc` is kept across snapshots, so `outstanding`
/// (for least-outstanding balancing) survives reloads.
#[derive(Debug)]
pub struct Endpoint {
    pub url: Box<str>,
    pub addr: SocketAddr,
    /// `host:port`, sent as the `Host` header.
    pub authority: Box<str>,
    pub outstanding: AtomicUsize,
}

impl Endpoint {
    pub fn new(url: &str, addr: SocketAddr, authority: &str) -> Self {
        Endpoint {
            url: url.into(),
            addr,
            authority: authority.into(),
            outstanding: AtomicUsize::new(0),
        }
    }
}

/// Per-model state that outlives snapshots: counters, waiters and metrics. The control plane
/// keeps one per model name and puts the same `Arc` into every snapshot.
#[derive(Debug, Default)]
pub struct ModelShared {
    pub admission: Admission,
    pub last_used_ms: AtomicU64,
    pub metrics: ModelMetrics,
    /// Woken whenever a snapshot changes this model's state (readiness waits).
    pub state_changed: Notifier,
}

impl ModelShared {
    pub fn touch(&self) {
        self.last_used_ms.store(crate::unix_ms(), Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct ModelRoute {
    pub name: Arc<str>,
    pub aliases: Vec<Arc<str>>,
    pub upstream_model: Arc<str>,
    /// `upstream_model` as a JSON string literal, quotes included, ready to splice into bodies.
    pub upstream_model_json: Box<[u8]>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub max_concurrent: usize,
    pub max_queue_size: usize,
    pub state: ModelState,
    /// Waiting to start, and no eviction can make room now: a timeout is `insufficient_vram`.
    pub vram_blocked: bool,
    /// Why the model's last start or run failed.
    pub last_error: Option<Arc<str>>,
    /// How many starts the control plane has issued: a `failed` state belongs to a request's
    /// own start only if this moved past the value it saw when it asked.
    pub start_seq: u64,
    pub runtime: &'static str,
    pub vram_mib: u64,
    pub pinned: bool,
    pub startup_timeout: Duration,
    pub shared: Arc<ModelShared>,
}

impl ModelRoute {
    /// Least outstanding requests; the first endpoint wins ties.
    pub fn pick_endpoint(&self) -> Option<&Arc<Endpoint>> {
        if self.endpoints.len() <= 1 {
            return self.endpoints.first();
        }
        self.endpoints
            .iter()
            .min_by_key(|e| e.outstanding.load(Ordering::Relaxed))
    }
}

/// What a worker reads for each request. Built whole, published with one store.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// Every name and alias.
    pub routes: HashMap<Box<str>, Arc<ModelRoute>>,
    /// Models in config order.
    pub models: Vec<Arc<ModelRoute>>,
    pub settings: Arc<Settings>,
    /// Body of `GET /v1/models`.
    pub models_list_json: Bytes,
    /// Body of `GET /gateway/config` (secrets already redacted).
    pub config_json: Bytes,
    /// "a, b, c": for the 404 message.
    pub known_models: Box<str>,
}

impl Snapshot {
    #[inline]
    pub fn route(&self, model: &str) -> Option<&Arc<ModelRoute>> {
        self.routes.get(model)
    }

    /// The 404 for a name no model or alias has, listing the known ones.
    pub fn unknown_model(&self, model: &str) -> crate::DataplaneError {
        crate::DataplaneError::ModelNotFound {
            model: model.into(),
            known: self.known_models.to_string(),
        }
    }

    /// Fill in the derived fields (routes, lists) from `models`.
    pub fn index(mut self) -> Self {
        let mut routes = HashMap::new();
        let mut names = Vec::new();
        let mut data = Vec::new();
        for m in &self.models {
            routes.insert(Box::<str>::from(&*m.name), m.clone());
            for alias in &m.aliases {
                routes.insert(Box::<str>::from(&**alias), m.clone());
            }
            names.push(m.name.to_string());
            data.push(serde_json::json!({
                "id": &*m.name, "object": "model", "created": 0, "owned_by": "vllm-gateway",
            }));
        }
        self.routes.extend(routes);
        names.sort();
        self.known_models = if names.is_empty() {
            "(none configured)".into()
        } else {
            names.join(", ").into()
        };
        let list = serde_json::json!({"object": "list", "data": data});
        self.models_list_json = Bytes::from(serde_json::to_vec(&list).unwrap_or_default());
        self
    }
}

/// Encode a model name as a JSON string literal.
pub fn json_string(s: &str) -> Box<[u8]> {
    serde_json::to_vec(s).unwrap_or_default().into_boxed_slice()
}
