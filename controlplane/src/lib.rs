//! The control plane: one tokio thread that owns the model lifecycle. It loads and validates
//! the config, runs one owner task per model (an actor with an explicit `ModelState`), and
//! publishes every change as a whole new routing snapshot with one store.
//!
//! It must never sit on the request path: workers only read what it publishes and send it
//! requests on a channel that never blocks them. Every fallible step happens before a publish;
//! the publish itself cannot fail.

pub mod config;
mod process;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes_free::to_bytes;
use dataplane::snapshot::json_string;
use dataplane::{
    ControlRequest, Endpoint, ModelRoute, ModelShared, ModelState, Settings, Shared, Snapshot,
};
use slog::{error, info, warn, Logger};
use tokio::sync::mpsc;

use crate::config::{Config, ModelSpec, RuntimeSpec};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("could not start the control-plane runtime: {0}")]
    Runtime(std::io::Error),
    #[error("could not start model server for '{model}': {cause}")]
    Spawn { model: String, cause: String },
    #[error("model server for '{model}' exited while starting ({status}); last output:\n{tail}")]
    ExitedWhileStarting {
        model: String,
        status: String,
        tail: String,
    },
    #[error("model server for '{model}' did not become healthy within {secs} s")]
    StartupTimeout { model: String, secs: u64 },
}

impl ControlError {
    /// Worth trying again later (the next request restarts a failed model).
    pub fn retryable(&self) -> bool {
        !matches!(self, ControlError::Runtime(_))
    }
}

/// A state report from a model owner to the publisher.
#[derive(Debug)]
struct StateEvent {
    model: Arc<str>,
    state: ModelState,
    endpoint: Option<Arc<Endpoint>>,
}

/// What the publisher knows of one model.
struct ModelEntry {
    spec: ModelSpec,
    shared: Arc<ModelShared>,
    state: ModelState,
    endpoints: Vec<Arc<Endpoint>>,
    owner: Option<mpsc::UnboundedSender<process::Command>>,
}

/// Built on the main thread before the workers start, so they see a first snapshot.
pub struct ControlPlane {
    config: Config,
    models: Vec<ModelEntry>,
    generation: u64,
    log: Logger,
}

fn settings(config: &Config) -> Settings {
    let g = &config.gateway;
    let t = &config.timeouts;
    Settings {
        max_body_bytes: g.max_body_bytes,
        max_header_bytes: g.max_header_bytes,
        queue_timeout: g.queue_timeout,
        connect_timeout: t.connect,
        first_byte_timeout: t.first_byte,
        idle_timeout: t.idle,
        header_read_timeout: t.header_read,
        client_idle_timeout: t.client_idle,
        pool_idle_timeout: t.pool_idle,
        retry_attempts: config.retry.attempts,
        retry_backoff: config.retry.backoff,
        retry_multiplier: config.retry.multiplier,
        api_keys: g.api_keys.iter().map(|k| k.as_bytes().into()).collect(),
        admin_token: g.admin_token.as_ref().map(|t| t.as_bytes().into()),
    }
}

mod bytes_free {
    /// serde_json bytes for a snapshot field.
    pub fn to_bytes(value: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(value).unwrap_or_default()
    }
}

impl ControlPlane {
    pub fn new(config: Config, log: Logger) -> Self {
        let models = config
            .models
            .iter()
            .map(|spec| {
                let (state, endpoints) = match &spec.runtime {
                    RuntimeSpec::Static { endpoints } => (
                        ModelState::Ready,
                        endpoints
                            .iter()
                            .map(|e| Arc::new(Endpoint::new(&e.url, e.addr, &e.authority)))
                            .collect(),
                    ),
                    _ => (ModelState::Stopped, Vec::new()),
                };
                ModelEntry {
                    spec: spec.clone(),
                    shared: Arc::new(ModelShared::default()),
                    state,
                    endpoints,
                    owner: None,
                }
            })
            .collect();
        ControlPlane {
            config,
            models,
            generation: 0,
            log,
        }
    }

    /// A whole snapshot of the current state.
    pub fn snapshot(&mut self) -> Snapshot {
        self.generation += 1;
        let settings = Arc::new(settings(&self.config));
        let models = self
            .models
            .iter()
            .map(|m| {
                let spec = &m.spec;
                Arc::new(ModelRoute {
                    name: spec.name.as_str().into(),
                    aliases: spec.aliases.iter().map(|a| a.as_str().into()).collect(),
                    upstream_model: spec.upstream_model.as_str().into(),
                    upstream_model_json: json_string(&spec.upstream_model),
                    endpoints: m.endpoints.clone(),
                    max_concurrent: spec.max_concurrent,
                    max_queue_size: spec.max_queue_size,
                    state: m.state,
                    runtime: spec.runtime_name(),
                    vram_mib: if matches!(spec.runtime, RuntimeSpec::Static { .. }) {
                        0
                    } else {
                        spec.vram_mib
                    },
                    pinned: spec.pinned,
                    startup_timeout: spec.startup_timeout,
                    shared: m.shared.clone(),
                })
            })
            .collect();
        Snapshot {
            generation: self.generation,
            models,
            settings,
            config_json: to_bytes(&self.config.redacted_json()).into(),
            ..Default::default()
        }
        .index()
    }

    /// Run the control plane on its own thread. It returns when the gateway should exit.
    pub fn spawn(
        self,
        shared: Arc<Shared>,
        requests: crossbeam_channel::Receiver<ControlRequest>,
    ) -> std::io::Result<std::thread::JoinHandle<i32>> {
        std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!(self.log, "{}", ControlError::Runtime(e));
                        return 1;
                    }
                };
                runtime.block_on(self.run(shared, requests))
            })
    }

    async fn run(
        mut self,
        shared: Arc<Shared>,
        requests: crossbeam_channel::Receiver<ControlRequest>,
    ) -> i32 {
        // Workers send on a crossbeam channel (no tokio in the data plane); a small thread
        // moves those messages onto the runtime without polling.
        let (request_tx, mut request_rx) = mpsc::unbounded_channel();
        let bridge = std::thread::Builder::new()
            .name("control-bridge".into())
            .spawn(move || {
                while let Ok(request) = requests.recv() {
                    if request_tx.send(request).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = bridge {
            error!(self.log, "could not start the request bridge"; "error" => %e);
            return 1;
        }
        let (event_tx, mut event_rx) = mpsc::unbounded_channel::<StateEvent>();
        let gpu_count = self.config.gpu_vram_mib.len().min(16);
        shared
            .metrics
            .gpu_count
            .store(gpu_count as u64, Ordering::Relaxed);
        for (i, total) in self.config.gpu_vram_mib.iter().take(16).enumerate() {
            shared.metrics.vram_total_mib[i].store(*total, Ordering::Relaxed);
        }

        // One owner task per model that has a server to run.
        for entry in &mut self.models {
            if let RuntimeSpec::Process { .. } = entry.spec.runtime {
                let (tx, rx) = mpsc::unbounded_channel();
                let owner =
                    process::Owner::new(entry.spec.clone(), event_tx.clone(), self.log.clone());
                tokio::spawn(owner.run(rx));
                if entry.spec.pinned || entry.spec.preload {
                    let _ = tx.send(process::Command::Start);
                }
                entry.owner = Some(tx);
            } else if let RuntimeSpec::Docker { .. } = entry.spec.runtime {
                warn!(self.log, "the docker runtime is not available in this build; the model stays stopped"; "model" => &entry.spec.name);
            }
        }
        self.publish_vram(&shared);

        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    error!(self.log, "could not install the SIGTERM handler"; "error" => %e);
                    return 1;
                }
            };
        let mut interrupt =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
                Ok(s) => s,
                Err(e) => {
                    error!(self.log, "could not install the SIGINT handler"; "error" => %e);
                    return 1;
                }
            };

        loop {
            tokio::select! {
                Some(event) = event_rx.recv() => {
                    self.apply(event);
                    self.publish_vram(&shared);
                    shared.publish(self.snapshot());
                }
                Some(request) = request_rx.recv() => self.handle(request),
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        info!(self.log, "shutting down");
        shared.draining.store(true, Ordering::Relaxed);
        shared.publish(self.snapshot());
        self.shutdown().await;
        0
    }

    fn apply(&mut self, event: StateEvent) {
        let Some(entry) = self
            .models
            .iter_mut()
            .find(|m| *m.spec.name == *event.model)
        else {
            return;
        };
        entry.state = event.state;
        entry.endpoints = event.endpoint.into_iter().collect();
        if event.state == ModelState::Starting {
            entry.shared.metrics.starts.fetch_add(1, Ordering::Relaxed);
        }
        info!(self.log, "model state"; "model" => &entry.spec.name, "state" => event.state.as_str());
    }

    fn handle(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Start { model } | ControlRequest::Load { model } => {
                if let Some(owner) = self.owner(&model) {
                    let _ = owner.send(process::Command::Start);
                }
            }
            ControlRequest::Unload { model } => {
                if let Some(owner) = self.owner(&model) {
                    let _ = owner.send(process::Command::Stop);
                }
            }
            ControlRequest::Reload => {
                warn!(self.log, "reload is not available in this build");
            }
        }
    }

    fn owner(&self, model: &str) -> Option<&mpsc::UnboundedSender<process::Command>> {
        self.models
            .iter()
            .find(|m| m.spec.name == model)
            .and_then(|m| m.owner.as_ref())
    }

    /// Per-GPU VRAM held by starting and running models (the contract's accounting).
    fn publish_vram(&self, shared: &Shared) {
        let mut used: HashMap<usize, u64> = HashMap::new();
        for m in &self.models {
            if matches!(m.spec.runtime, RuntimeSpec::Static { .. }) {
                continue;
            }
            if matches!(
                m.state,
                ModelState::Starting | ModelState::Ready | ModelState::Stopping
            ) {
                for gpu in &m.spec.gpus {
                    *used.entry(*gpu).or_default() += m.spec.vram_mib;
                }
            }
        }
        for gpu in 0..self.config.gpu_vram_mib.len().min(16) {
            shared.metrics.vram_used_mib[gpu]
                .store(used.get(&gpu).copied().unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Stop every process model; each owner reaps its child before answering.
    async fn shutdown(&mut self) {
        let mut waits = Vec::new();
        for entry in &mut self.models {
            if let Some(owner) = entry.owner.take() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if owner.send(process::Command::Shutdown(tx)).is_ok() {
                    waits.push(rx);
                }
            }
        }
        for wait in waits {
            let _ = tokio::time::timeout(Duration::from_secs(15), wait).await;
        }
    }
}
