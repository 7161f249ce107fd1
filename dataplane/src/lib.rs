//! The data plane: thread-per-core monoio workers that accept OpenAI-API requests, route them
//! by `model`, admit them against per-model limits and relay them to model servers, streaming
//! both ways.
//!
//! It owns the request path and nothing else. It must never take a lock on that path (no
//! `Mutex`, no async lock, no dashmap), never use tokio, never block a worker, and never log
//! inside a critical section. It reads one `ArcSwap<Snapshot>` per request; the control plane
//! is the only writer of that snapshot.

pub mod admission;
pub mod error;
pub mod extract;
pub mod http;
pub mod io;
mod local;
pub mod metrics;
pub mod notify;
mod proxy;
pub mod server;
pub mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use error::DataplaneError;
pub use server::{start, DataplaneHandle, Driver, ListenConfig};
pub use snapshot::{Endpoint, ModelRoute, ModelShared, ModelState, Settings, Snapshot};

/// What the data plane asks of the control plane. Sent on an unbounded channel, so a worker
/// never blocks on it.
#[derive(Debug, Clone)]
pub enum ControlRequest {
    /// A request is waiting for this stopped or failed model.
    Start {
        model: Arc<str>,
    },
    Load {
        model: Arc<str>,
    },
    Unload {
        model: Arc<str>,
    },
    /// Re-read the config file; the answer goes into `reply` when one is given.
    Reload {
        reply: Option<Arc<Reply>>,
    },
}

/// A one-shot answer from the control plane to a waiting worker, without a lock: the value
/// goes into a lock-free queue, then the cell fires.
#[derive(Debug, Default)]
pub struct Reply {
    value: crossbeam_queue::SegQueue<(u16, serde_json::Value)>,
    pub done: Arc<notify::WaitCell>,
}

impl Reply {
    pub fn send(&self, status: u16, body: serde_json::Value) {
        self.value.push((status, body));
        self.done.fire();
    }

    pub fn take(&self) -> Option<(u16, serde_json::Value)> {
        self.value.pop()
    }
}

/// The live log level, read by the log drain on every record and changed at run time.
#[derive(Debug)]
pub struct LogLevel(AtomicUsize);

impl LogLevel {
    pub fn new(level: slog::Level) -> Self {
        LogLevel(AtomicUsize::new(level.as_usize()))
    }

    pub fn get(&self) -> slog::Level {
        slog::Level::from_usize(self.0.load(Ordering::Relaxed)).unwrap_or(slog::Level::Info)
    }

    pub fn set(&self, level: slog::Level) {
        self.0.store(level.as_usize(), Ordering::Relaxed);
    }

    #[inline]
    pub fn enabled(&self, level: slog::Level) -> bool {
        level.as_usize() <= self.0.load(Ordering::Relaxed)
    }
}

/// Everything shared between the workers and the control plane.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: metrics::GlobalMetrics,
    pub log_level: Arc<LogLevel>,
    /// Set on shutdown: `/health` turns 503 and new requests get `shutting_down`.
    pub draining: AtomicBool,
    pub control: crossbeam_channel::Sender<ControlRequest>,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        log_level: Arc<LogLevel>,
        control: crossbeam_channel::Sender<ControlRequest>,
    ) -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics: metrics::GlobalMetrics::default(),
            log_level,
            draining: AtomicBool::new(false),
            control,
        }
    }

    /// Publish a new snapshot and wake requests waiting on a model's state.
    pub fn publish(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        let previous = self.snapshot.swap(snapshot.clone());
        // Models that left the snapshot too: their waiters must see that they are gone.
        for model in previous.models.iter().chain(&snapshot.models) {
            model.shared.state_changed.notify_all();
        }
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
