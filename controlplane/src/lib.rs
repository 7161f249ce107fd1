//! The control plane: one tokio thread that owns the model lifecycle. It loads and validates
//! the config, runs one owner task per model (an actor with an explicit `ModelState`), and
//! publishes every change as a whole new routing snapshot with one store.
//!
//! It must never sit on the request path: workers only read what it publishes and send it
//! requests on a channel that never blocks them. Every fallible step happens before a publish;
//! the publish itself cannot fail.

pub mod config;
pub mod docker;
mod owner;
mod process;
pub mod vram;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes_free::to_bytes;
use dataplane::snapshot::json_string;
use dataplane::{
    ControlRequest, Endpoint, ModelRoute, ModelShared, ModelState, Settings, Shared, Snapshot,
};
use slog::{error, info, warn, Logger};
use tokio::sync::mpsc;

use crate::config::{Config, ModelSpec, RuntimeSpec};
use crate::docker::DockerRuntime;
use crate::owner::Command;
use crate::vram::{Candidate, GpuProbe};

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
    #[error("docker: {0}")]
    Docker(String),
}

impl ControlError {
    /// Worth trying again later (the next request restarts a failed model).
    pub fn retryable(&self) -> bool {
        !matches!(self, ControlError::Runtime(_))
    }
}

/// A state report from a model owner to the control plane.
#[derive(Debug)]
pub(crate) struct StateEvent {
    model: Arc<str>,
    state: ModelState,
    endpoint: Option<Arc<Endpoint>>,
}

/// Why a model is waiting to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Requests are waiting; give up when none are left.
    Requested,
    /// Pinned, preloaded or loaded by an admin: keep trying.
    Sticky,
}

/// What the control plane knows of one model.
struct ModelEntry {
    spec: ModelSpec,
    shared: Arc<ModelShared>,
    state: ModelState,
    endpoints: Vec<Arc<Endpoint>>,
    owner: Option<mpsc::UnboundedSender<Command>>,
    /// Waiting for VRAM before it may start.
    pending: Option<Want>,
    /// Pending and no eviction can make room now.
    vram_blocked: bool,
    ready_since: Option<Instant>,
}

impl ModelEntry {
    fn is_static(&self) -> bool {
        matches!(self.spec.runtime, RuntimeSpec::Static { .. })
    }

    /// Starting, running and stopping servers hold their VRAM.
    fn holds_vram(&self) -> bool {
        !self.is_static()
            && matches!(
                self.state,
                ModelState::Starting | ModelState::Ready | ModelState::Stopping
            )
            && self.pending.is_none()
    }

    fn busy(&self) -> bool {
        self.shared.admission.in_flight() + self.shared.admission.queued() > 0
    }
}

/// Built on the main thread before the workers start, so they see a first snapshot.
pub struct ControlPlane {
    config: Config,
    models: Vec<ModelEntry>,
    generation: u64,
    probe: Arc<dyn GpuProbe>,
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

/// How often the control plane re-checks pending starts and idle unloads.
const TICK: Duration = Duration::from_millis(100);

impl ControlPlane {
    pub fn new(config: Config, log: Logger) -> Self {
        Self::with_probe(config, vram::detect(), log)
    }

    pub fn with_probe(config: Config, probe: Arc<dyn GpuProbe>, log: Logger) -> Self {
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
                    pending: None,
                    vram_blocked: false,
                    ready_since: None,
                }
            })
            .collect();
        info!(log, "VRAM source"; "source" => probe.name());
        ControlPlane {
            config,
            models,
            generation: 0,
            probe,
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
                // A model waiting for VRAM is on its way to starting, as far as clients see.
                let state = if m.pending.is_some() {
                    ModelState::Starting
                } else {
                    m.state
                };
                Arc::new(ModelRoute {
                    name: spec.name.as_str().into(),
                    aliases: spec.aliases.iter().map(|a| a.as_str().into()).collect(),
                    upstream_model: spec.upstream_model.as_str().into(),
                    upstream_model_json: json_string(&spec.upstream_model),
                    endpoints: m.endpoints.clone(),
                    max_concurrent: spec.max_concurrent,
                    max_queue_size: spec.max_queue_size,
                    state,
                    vram_blocked: m.vram_blocked,
                    runtime: spec.runtime_name(),
                    vram_mib: if m.is_static() { 0 } else { spec.vram_mib },
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

    /// Run the control plane on its own thread. It returns the exit code when the gateway
    /// should exit.
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

        let docker = if self
            .models
            .iter()
            .any(|m| matches!(m.spec.runtime, RuntimeSpec::Docker { .. }))
        {
            match DockerRuntime::connect(self.config.docker_host.as_deref(), self.log.clone()).await
            {
                Ok(d) => Ok(Arc::new(d)),
                Err(e) => {
                    warn!(self.log, "Docker engine not reachable; docker models will fail to start"; "error" => %e);
                    Err(e.to_string())
                }
            }
        } else {
            Err("no docker models".to_string())
        };

        // One owner task per model that has a server to run.
        for entry in &mut self.models {
            if entry.is_static() {
                continue;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let owner = owner::Owner::new(
                entry.spec.clone(),
                docker.clone(),
                event_tx.clone(),
                self.log.clone(),
            );
            tokio::spawn(owner.run(rx));
            entry.owner = Some(tx);
        }
        for i in 0..self.models.len() {
            let spec = &self.models[i].spec;
            if spec.pinned || spec.preload {
                self.want_start(i, Want::Sticky);
            }
        }
        self.publish(&shared);

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
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                Some(event) = event_rx.recv() => {
                    self.apply(event);
                    // Drain what else is ready, so one publish covers it all.
                    while let Ok(event) = event_rx.try_recv() {
                        self.apply(event);
                    }
                    self.schedule();
                    self.publish(&shared);
                }
                Some(request) = request_rx.recv() => {
                    self.handle(request);
                    self.schedule();
                    self.publish(&shared);
                }
                _ = tick.tick() => {
                    if self.housekeeping() {
                        self.publish(&shared);
                    }
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        info!(self.log, "shutting down");
        shared.draining.store(true, Ordering::Relaxed);
        self.publish(&shared);
        self.shutdown().await;
        0
    }

    fn publish(&mut self, shared: &Shared) {
        self.publish_vram(shared);
        let snapshot = self.snapshot();
        shared.publish(snapshot);
    }

    fn apply(&mut self, event: StateEvent) {
        let Some(entry) = self
            .models
            .iter_mut()
            .find(|m| *m.spec.name == *event.model)
        else {
            return;
        };
        if entry.state != event.state {
            info!(self.log, "model state"; "model" => &entry.spec.name, "from" => entry.state.as_str(), "to" => event.state.as_str());
        }
        entry.state = event.state;
        entry.endpoints = event.endpoint.into_iter().collect();
        entry.ready_since = (event.state == ModelState::Ready).then(Instant::now);
    }

    fn handle(&mut self, request: ControlRequest) {
        match request {
            ControlRequest::Start { model } => {
                if let Some(i) = self.index(&model) {
                    self.want_start(i, Want::Requested);
                }
            }
            ControlRequest::Load { model } => {
                if let Some(i) = self.index(&model) {
                    self.want_start(i, Want::Sticky);
                }
            }
            ControlRequest::Unload { model } => {
                if let Some(i) = self.index(&model) {
                    let entry = &mut self.models[i];
                    entry.pending = None;
                    entry.vram_blocked = false;
                    if let Some(owner) = &entry.owner {
                        let _ = owner.send(Command::Stop);
                    }
                }
            }
            ControlRequest::Reload => {
                warn!(self.log, "reload is not available in this build");
            }
        }
    }

    fn index(&self, model: &str) -> Option<usize> {
        self.models.iter().position(|m| m.spec.name == model)
    }

    /// Ask for model `i` to run: it queues for VRAM; `schedule` starts it when it fits.
    fn want_start(&mut self, i: usize, want: Want) {
        let entry = &mut self.models[i];
        if entry.is_static() || entry.owner.is_none() {
            return;
        }
        match entry.state {
            ModelState::Ready | ModelState::Starting if entry.pending.is_none() => return,
            _ => {}
        }
        entry.pending = Some(match (entry.pending, want) {
            (Some(Want::Sticky), _) | (_, Want::Sticky) => Want::Sticky,
            _ => Want::Requested,
        });
    }

    fn ledger(&self) -> vram::Ledger {
        let gpus = self.config.gpu_vram_mib.len();
        let mut held = vec![0u64; gpus];
        for m in self.models.iter().filter(|m| m.holds_vram()) {
            for g in &m.spec.gpus {
                if let Some(h) = held.get_mut(*g) {
                    *h += m.spec.vram_mib;
                }
            }
        }
        let probed = self.probe.memory();
        vram::ledger(&self.config.gpu_vram_mib, &held, probed.as_deref())
    }

    /// Start pending models that fit, evicting idle least-recently-used ones to make room.
    /// Pending models are served in config order; one that cannot fit does not block a
    /// later one that can.
    fn schedule(&mut self) {
        for i in 0..self.models.len() {
            let Some(want) = self.models[i].pending else {
                continue;
            };
            let entry = &self.models[i];
            // A stop in progress must finish before the same model starts again.
            if entry.state == ModelState::Stopping {
                continue;
            }
            if want == Want::Requested && !entry.busy() {
                // Everyone who asked has gone (timed out or disconnected).
                let entry = &mut self.models[i];
                entry.pending = None;
                entry.vram_blocked = false;
                continue;
            }
            let ledger = self.ledger();
            let needed = entry.spec.vram_mib;
            let gpus = entry.spec.gpus.clone();
            let candidates: Vec<Candidate> = self
                .models
                .iter()
                .enumerate()
                .filter(|(j, m)| *j != i && !m.is_static())
                .map(|(j, m)| Candidate {
                    id: j,
                    gpus: m.spec.gpus.clone(),
                    vram_mib: m.spec.vram_mib,
                    state: if m.pending.is_some() {
                        ModelState::Stopped
                    } else {
                        m.state
                    },
                    pinned: m.spec.pinned,
                    busy: m.busy(),
                    last_used_ms: m.shared.last_used_ms.load(Ordering::Relaxed),
                })
                .collect();
            let freeing = self.models.iter().any(|m| {
                m.state == ModelState::Stopping && m.spec.gpus.iter().any(|g| gpus.contains(g))
            });
            match vram::victims(needed, &gpus, &ledger.free_mib, &candidates) {
                Some(victims) if victims.is_empty() => {
                    let entry = &mut self.models[i];
                    entry.pending = None;
                    entry.vram_blocked = false;
                    entry.state = ModelState::Starting;
                    entry.shared.metrics.starts.fetch_add(1, Ordering::Relaxed);
                    if let Some(owner) = &entry.owner {
                        let _ = owner.send(Command::Start);
                    }
                }
                Some(victims) => {
                    for j in victims {
                        let victim = &self.models[j];
                        info!(self.log, "evicting to make room"; "victim" => &victim.spec.name, "for" => &self.models[i].spec.name);
                        let victim = &mut self.models[j];
                        victim.state = ModelState::Stopping;
                        victim
                            .shared
                            .metrics
                            .evictions
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(owner) = &victim.owner {
                            let _ = owner.send(Command::Stop);
                        }
                    }
                    self.models[i].vram_blocked = false;
                }
                None if freeing => self.models[i].vram_blocked = false,
                None => {
                    if !self.models[i].vram_blocked {
                        warn!(self.log, "not enough VRAM; waiting for models to become idle"; "model" => &self.models[i].spec.name, "needed_mib" => needed);
                    }
                    self.models[i].vram_blocked = true;
                }
            }
        }
    }

    /// Periodic work: pending starts (models may have become idle) and idle unloads.
    /// Returns whether anything changed.
    fn housekeeping(&mut self) -> bool {
        let mut changed = false;
        let now_ms = dataplane::unix_ms();
        for entry in &mut self.models {
            let Some(idle_for) = entry.spec.idle_unload else {
                continue;
            };
            if entry.state != ModelState::Ready || entry.busy() || entry.pending.is_some() {
                continue;
            }
            let last_used = entry.shared.last_used_ms.load(Ordering::Relaxed);
            let ready_ms = entry.ready_since.map_or(now_ms, |at| {
                now_ms.saturating_sub(at.elapsed().as_millis() as u64)
            });
            let since = last_used.max(ready_ms);
            if now_ms.saturating_sub(since) >= idle_for.as_millis() as u64 {
                info!(self.log, "unloading idle model"; "model" => &entry.spec.name, "idle_s" => idle_for.as_secs());
                entry.state = ModelState::Stopping;
                if let Some(owner) = &entry.owner {
                    let _ = owner.send(Command::Stop);
                }
                changed = true;
            }
        }
        if self.models.iter().any(|m| m.pending.is_some()) {
            let before: Vec<_> = self
                .models
                .iter()
                .map(|m| (m.pending, m.vram_blocked, m.state))
                .collect();
            self.schedule();
            let after: Vec<_> = self
                .models
                .iter()
                .map(|m| (m.pending, m.vram_blocked, m.state))
                .collect();
            changed |= before != after;
        }
        changed
    }

    /// Per-GPU totals and what starting and running models hold.
    fn publish_vram(&self, shared: &Shared) {
        let ledger = self.ledger();
        let gpus = ledger.total_mib.len().min(16);
        shared
            .metrics
            .gpu_count
            .store(gpus as u64, Ordering::Relaxed);
        let mut used: HashMap<usize, u64> = HashMap::new();
        for m in self.models.iter().filter(|m| m.holds_vram()) {
            for gpu in &m.spec.gpus {
                *used.entry(*gpu).or_default() += m.spec.vram_mib;
            }
        }
        for gpu in 0..gpus {
            shared.metrics.vram_total_mib[gpu].store(ledger.total_mib[gpu], Ordering::Relaxed);
            shared.metrics.vram_used_mib[gpu]
                .store(used.get(&gpu).copied().unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Stop process models and leave containers running; each owner answers when done.
    async fn shutdown(&mut self) {
        let mut waits = Vec::new();
        for entry in &mut self.models {
            if let Some(owner) = entry.owner.take() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if owner.send(Command::Shutdown(tx)).is_ok() {
                    waits.push(rx);
                }
            }
        }
        for wait in waits {
            let _ = tokio::time::timeout(Duration::from_secs(15), wait).await;
        }
    }
}
