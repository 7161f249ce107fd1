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
mod reload;
pub mod vram;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    #[error("docker container for '{model}': {cause}")]
    Docker { model: String, cause: String },
    #[error("could not reach the Docker engine at {host}: {cause}")]
    DockerUnavailable { host: String, cause: String },
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
    /// Which owner sent it: reports from an owner replaced by a reload are ignored.
    owner: u64,
    state: ModelState,
    endpoint: Option<Arc<Endpoint>>,
    /// Why, for `failed`.
    error: Option<String>,
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
    owner_id: u64,
    /// Removed by a reload: takes no new requests, stops once its in-flight ones finish.
    retiring: bool,
    /// A reload changed its runtime: this spec replaces it once its in-flight ones finish.
    replacement: Option<ModelSpec>,
    /// Waiting for VRAM before it may start.
    pending: Option<Want>,
    /// Pending and no eviction can make room now.
    vram_blocked: bool,
    ready_since: Option<Instant>,
    /// Why the last start or run failed, shown to clients and in /gateway/models.
    last_error: Option<Arc<str>>,
    /// Starts sent to the owner.
    starts_sent: u64,
    /// Set once the owner was told to retire: fires when its server has stopped. Until then
    /// the entry stays (as `stopping`), so its VRAM stays in the ledger.
    retired: Option<tokio::sync::oneshot::Receiver<()>>,
    /// A replaced model was running: start its replacement at once.
    restart_after: bool,
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
    }

    fn busy(&self) -> bool {
        self.shared.admission.in_flight() + self.shared.admission.queued() > 0
    }

    fn new(spec: ModelSpec, shared: Arc<ModelShared>) -> Self {
        let (state, endpoints) = match &spec.runtime {
            RuntimeSpec::Static { endpoints } => (ModelState::Ready, static_endpoints(endpoints)),
            _ => (ModelState::Stopped, Vec::new()),
        };
        ModelEntry {
            spec,
            shared,
            state,
            endpoints,
            owner: None,
            owner_id: 0,
            retiring: false,
            replacement: None,
            pending: None,
            vram_blocked: false,
            ready_since: None,
            last_error: None,
            starts_sent: 0,
            retired: None,
            restart_after: false,
        }
    }
}

fn static_endpoints(endpoints: &[config::EndpointSpec]) -> Vec<Arc<Endpoint>> {
    endpoints
        .iter()
        .map(|e| Arc::new(Endpoint::new(&e.url, e.addr, &e.authority)))
        .collect()
}

/// Whether a reload changed how the model's server is run (so it must restart).
fn runtime_changed(old: &ModelSpec, new: &ModelSpec) -> bool {
    old.runtime != new.runtime || old.gpus != new.gpus || old.health_path != new.health_path
}

/// The slog level for a configured one.
pub fn slog_level(level: config::LogLevel) -> slog::Level {
    match level {
        config::LogLevel::Error => slog::Level::Error,
        config::LogLevel::Warn => slog::Level::Warning,
        config::LogLevel::Info => slog::Level::Info,
        config::LogLevel::Debug => slog::Level::Debug,
        config::LogLevel::Trace => slog::Level::Trace,
    }
}

/// Built on the main thread before the workers start, so they see a first snapshot.
pub struct ControlPlane {
    config: Config,
    /// The config file, re-read on reload.
    path: PathBuf,
    /// The text last loaded (or refused), so a file event without a change does nothing.
    loaded_text: String,
    models: Vec<ModelEntry>,
    generation: u64,
    owner_seq: u64,
    probe: Arc<dyn GpuProbe>,
    docker: Option<Result<Arc<DockerRuntime>, String>>,
    events: Option<mpsc::UnboundedSender<StateEvent>>,
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

/// How often the control plane re-checks pending starts and idle unloads.
const TICK: Duration = Duration::from_millis(100);
/// How long file events must settle before a reload.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(150);

impl ControlPlane {
    pub fn new(config: Config, path: PathBuf, log: Logger) -> Self {
        Self::with_probe(config, path, vram::detect(), log)
    }

    pub fn with_probe(
        config: Config,
        path: PathBuf,
        probe: Arc<dyn GpuProbe>,
        log: Logger,
    ) -> Self {
        let models = config
            .models
            .iter()
            .map(|spec| ModelEntry::new(spec.clone(), Arc::new(ModelShared::default())))
            .collect();
        info!(log, "VRAM source"; "source" => probe.name());
        let loaded_text = std::fs::read_to_string(&path).unwrap_or_default();
        ControlPlane {
            config,
            path,
            loaded_text,
            models,
            generation: 0,
            owner_seq: 0,
            probe,
            docker: None,
            events: None,
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
            .filter(|m| !m.retiring)
            .map(|m| {
                let spec = &m.spec;
                // A model waiting for VRAM is on its way to starting, as far as clients see;
                // one about to be replaced takes no new requests (they wait for the new one).
                let state = if m.replacement.is_some() {
                    ModelState::Stopping
                } else if m.pending.is_some() {
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
                    last_error: m.last_error.clone(),
                    start_seq: m.starts_sent,
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
            config_json: serde_json::to_vec(&self.config.redacted_json())
                .unwrap_or_default()
                .into(),
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
        stop_accepting: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<std::thread::JoinHandle<i32>> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
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
                runtime.block_on(self.run(shared, requests, stop_accepting, ready_tx))
            })?;
        // Return once signal handlers and the file watcher are in place, so that a signal or
        // an edit right after the gateway announces itself is never lost.
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        Ok(thread)
    }

    async fn run(
        mut self,
        shared: Arc<Shared>,
        requests: crossbeam_channel::Receiver<ControlRequest>,
        stop_accepting: Box<dyn FnOnce() + Send>,
        ready: std::sync::mpsc::Sender<()>,
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
        self.events = Some(event_tx);
        for i in 0..self.models.len() {
            self.spawn_owner(i).await;
        }
        for i in 0..self.models.len() {
            let spec = &self.models[i].spec;
            if spec.pinned || spec.preload {
                self.want_start(i, Want::Sticky);
            }
        }
        self.schedule();
        self.publish(&shared);

        let (file_tx, mut file_rx) = mpsc::unbounded_channel::<()>();
        let _watcher = match reload::watch(&self.path, file_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(self.log, "cannot watch the config file; reload with SIGHUP or POST /gateway/reload"; "path" => %self.path.display(), "error" => %e);
                None
            }
        };
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (mut terminate, mut interrupt, mut hangup) = match signals {
            (Ok(t), Ok(i), Ok(h)) => (t, i, h),
            _ => {
                error!(self.log, "could not install signal handlers");
                return 1;
            }
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // File events come in bursts (one save is several events): reload once they settle.
        let mut reload_due: Option<tokio::time::Instant> = None;
        // An edit made between the first read and the watcher's start is caught here, before
        // the gateway announces itself; anything later comes through the watcher.
        self.reload(&shared, "file", false).await;
        let _ = ready.send(());

        loop {
            let debounce = async {
                match reload_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
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
                    if let ControlRequest::Reload { reply } = request {
                        let (status, body) = self.reload(&shared, "api", true).await;
                        if let Some(reply) = reply {
                            reply.send(status, body);
                        }
                    } else {
                        self.handle(request);
                        self.schedule();
                        self.publish(&shared);
                    }
                }
                Some(()) = file_rx.recv() => {
                    reload_due = Some(tokio::time::Instant::now() + RELOAD_DEBOUNCE);
                }
                _ = debounce => {
                    reload_due = None;
                    self.reload(&shared, "file", false).await;
                }
                _ = hangup.recv() => {
                    self.reload(&shared, "SIGHUP", true).await;
                }
                _ = tick.tick() => {
                    if self.housekeeping().await {
                        self.publish(&shared);
                    }
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        self.drain(&shared, stop_accepting, &mut event_rx).await;
        self.shutdown().await;
        0
    }

    /// Graceful shutdown: refuse new work, let in-flight requests finish within the grace.
    async fn drain(
        &mut self,
        shared: &Shared,
        stop_accepting: Box<dyn FnOnce() + Send>,
        events: &mut mpsc::UnboundedReceiver<StateEvent>,
    ) {
        let grace = self.config.gateway.shutdown_grace;
        info!(self.log, "draining"; "grace_s" => grace.as_secs());
        shared.draining.store(true, Ordering::Relaxed);
        self.publish(shared);
        stop_accepting();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let busy: usize = self
                .models
                .iter()
                .map(|m| m.shared.admission.in_flight() + m.shared.admission.queued())
                .sum();
            if busy == 0 {
                info!(self.log, "drained");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(self.log, "shutdown grace expired with requests in flight"; "requests" => busy);
                break;
            }
            // Keep applying lifecycle events: a request waiting for a model that turns ready
            // during the drain is served, not cut off at the end of the grace.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                Some(event) = events.recv() => {
                    self.apply(event);
                    self.publish(shared);
                }
            }
        }
    }

    /// Start the owner task of model `i` (none for static models).
    async fn spawn_owner(&mut self, i: usize) {
        if self.models[i].is_static() {
            return;
        }
        let Some(events) = self.events.clone() else {
            return;
        };
        if matches!(self.models[i].spec.runtime, RuntimeSpec::Docker { .. })
            && self.docker.is_none()
        {
            let connected = match DockerRuntime::connect(
                self.config.docker_host.as_deref(),
                self.log.clone(),
            )
            .await
            {
                Ok(d) => Ok(Arc::new(d)),
                Err(e) => {
                    warn!(self.log, "Docker engine not reachable; docker models will fail to start"; "error" => %e);
                    Err(e.to_string())
                }
            };
            self.docker = Some(connected);
        }
        let docker = self
            .docker
            .clone()
            .unwrap_or_else(|| Err("no docker models".to_string()));
        self.owner_seq += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = &mut self.models[i];
        let owner = owner::Owner::new(
            entry.spec.clone(),
            self.owner_seq,
            docker,
            events,
            self.log.clone(),
        );
        tokio::spawn(owner.run(rx));
        entry.owner = Some(tx);
        entry.owner_id = self.owner_seq;
        entry.state = ModelState::Stopped;
        entry.endpoints.clear();
    }

    /// Re-read the config file and apply it as a diff. An invalid file changes nothing.
    async fn reload(
        &mut self,
        shared: &Shared,
        trigger: &str,
        forced: bool,
    ) -> (u16, serde_json::Value) {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                shared.metrics.reloads_error.fetch_add(1, Ordering::Relaxed);
                let message = format!("cannot read {}: {e}", self.path.display());
                warn!(self.log, "reload failed"; "trigger" => trigger, "error" => &message);
                return (
                    400,
                    reload::error_body(&message, std::slice::from_ref(&message)),
                );
            }
        };
        if !forced && text == self.loaded_text {
            return (200, serde_json::json!({"result": "unchanged"}));
        }
        self.loaded_text = text.clone();
        let started = Instant::now();
        let mut new = match config::parse_str(&text, &|k| std::env::var(k).ok()) {
            Ok(c) => c,
            Err(errors) => {
                shared.metrics.reloads_error.fetch_add(1, Ordering::Relaxed);
                let lines: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                for line in &lines {
                    warn!(self.log, "reload refused: invalid config"; "trigger" => trigger, "error" => line);
                }
                return (
                    400,
                    reload::error_body("the config file is invalid; nothing was changed", &lines),
                );
            }
        };
        let mut diff = reload::Diff::default();
        let old = &self.config;
        for (key, changed) in [
            ("gateway.listen", old.gateway.listen != new.gateway.listen),
            (
                "gateway.workers",
                old.gateway.workers != new.gateway.workers,
            ),
            ("gateway.driver", old.gateway.driver != new.gateway.driver),
            (
                "gateway.log_format",
                old.gateway.log_format != new.gateway.log_format,
            ),
        ] {
            if changed {
                diff.restart_required.push(key.to_string());
            }
        }
        if old.gateway.log_level != new.gateway.log_level {
            shared.log_level.set(slog_level(new.gateway.log_level));
        }
        if old.docker_host != new.docker_host {
            diff.restart_required.push("docker.host".into());
        }
        // Not half-applied: the running values stay, and stay what /gateway/config shows.
        new.keep_restart_settings_from(old);
        // Removed models: no new requests; they stop once their in-flight requests finish.
        for entry in &mut self.models {
            if !entry.retiring && !new.models.iter().any(|m| m.name == entry.spec.name) {
                entry.retiring = true;
                entry.pending = None;
                entry.replacement = None;
                diff.removed.push(entry.spec.name.clone());
            }
        }
        let mut order = Vec::with_capacity(new.models.len());
        for spec in &new.models {
            match self
                .models
                .iter()
                .position(|m| !m.retiring && m.spec.name == spec.name)
            {
                Some(i) => {
                    let entry = &mut self.models[i];
                    // A replacement still waiting from an earlier reload is what this one
                    // changes, or undoes.
                    let pending_replacement = entry.replacement.take();
                    if entry.spec == *spec {
                        // Unchanged: keeps running and keeps its counters.
                    } else if pending_replacement.as_ref() == Some(spec) {
                        entry.replacement = pending_replacement;
                    } else if entry.is_static()
                        || matches!(spec.runtime, RuntimeSpec::Static { .. })
                    {
                        if let RuntimeSpec::Static { endpoints } = &spec.runtime {
                            if entry.is_static() && entry.spec.runtime != spec.runtime {
                                entry.endpoints = static_endpoints(endpoints);
                            }
                        }
                        if entry.is_static() != matches!(spec.runtime, RuntimeSpec::Static { .. }) {
                            entry.replacement = Some(spec.clone());
                            diff.restarting.push(spec.name.clone());
                        } else {
                            entry.spec = spec.clone();
                            diff.changed.push(spec.name.clone());
                        }
                    } else if runtime_changed(&entry.spec, spec) {
                        entry.replacement = Some(spec.clone());
                        diff.restarting.push(spec.name.clone());
                    } else {
                        entry.spec = spec.clone();
                        diff.changed.push(spec.name.clone());
                    }
                    order.push(i);
                }
                None => {
                    self.models.push(ModelEntry::new(
                        spec.clone(),
                        Arc::new(ModelShared::default()),
                    ));
                    let i = self.models.len() - 1;
                    self.spawn_owner(i).await;
                    if spec.pinned || spec.preload {
                        self.want_start(i, Want::Sticky);
                    }
                    diff.added.push(spec.name.clone());
                    order.push(i);
                }
            }
        }
        // Config order first, then the retiring ones.
        let mut taken: Vec<Option<ModelEntry>> = std::mem::take(&mut self.models)
            .into_iter()
            .map(Some)
            .collect();
        for i in &order {
            if let Some(entry) = taken[*i].take() {
                self.models.push(entry);
            }
        }
        self.models.extend(taken.into_iter().flatten());
        self.config = new;
        shared.metrics.reloads_ok.fetch_add(1, Ordering::Relaxed);
        self.retire_idle().await;
        self.schedule();
        self.publish(shared);
        info!(self.log, "config reloaded"; "trigger" => trigger, "added" => ?diff.added, "removed" => ?diff.removed,
            "changed" => ?diff.changed, "restarting" => ?diff.restarting, "restart_required" => ?diff.restart_required,
            "us" => started.elapsed().as_micros() as u64);
        if !diff.restart_required.is_empty() {
            warn!(self.log, "some changed settings only take effect after a restart"; "settings" => ?diff.restart_required);
        }
        (200, diff.to_json())
    }

    /// Retire removed models and replace changed ones once nothing of theirs is in flight.
    /// The old server is stopped first; the entry leaves (or its replacement starts) only once
    /// the owner confirms, so the VRAM it held is never counted free too early.
    /// Returns whether anything changed.
    async fn retire_idle(&mut self) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i < self.models.len() {
            let entry = &mut self.models[i];
            let leaving = entry.retiring || entry.replacement.is_some();
            if !leaving {
                i += 1;
                continue;
            }
            let idle = entry.shared.admission.in_flight() == 0
                && (entry.replacement.is_some() || entry.shared.admission.queued() == 0);
            if entry.retired.is_none() {
                if !idle {
                    i += 1;
                    continue;
                }
                entry.restart_after =
                    matches!(entry.state, ModelState::Ready | ModelState::Starting);
                // Static models have no server to stop: they leave at once.
                if let Some(owner) = entry.owner.take() {
                    let (done, stopped) = tokio::sync::oneshot::channel();
                    if owner.send(Command::Retire(done)).is_ok() {
                        entry.retired = Some(stopped);
                        if entry.holds_vram() {
                            entry.state = ModelState::Stopping;
                        }
                        changed = true;
                        i += 1;
                        continue;
                    }
                }
            } else if let Some(stopped) = entry.retired.as_mut() {
                if matches!(
                    stopped.try_recv(),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty)
                ) {
                    i += 1;
                    continue;
                }
            }
            // The old server is gone.
            changed = true;
            if entry.retiring {
                info!(self.log, "removed model retired"; "model" => &entry.spec.name);
                self.models.remove(i);
                continue;
            }
            let restart = entry.restart_after;
            if let Some(spec) = entry.replacement.take() {
                let shared = entry.shared.clone();
                *entry = ModelEntry::new(spec, shared);
            }
            info!(self.log, "restarting model with its new spec"; "model" => &self.models[i].spec.name);
            self.spawn_owner(i).await;
            let spec = &self.models[i].spec;
            if restart || spec.pinned || spec.preload {
                self.want_start(i, Want::Sticky);
            } else if self.models[i].busy() {
                self.want_start(i, Want::Requested);
            }
            i += 1;
        }
        changed
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
            .find(|m| *m.spec.name == *event.model && m.owner_id == event.owner)
        else {
            return;
        };
        if entry.state != event.state {
            info!(self.log, "model state"; "model" => &entry.spec.name, "from" => entry.state.as_str(), "to" => event.state.as_str());
        }
        entry.state = event.state;
        entry.endpoints = event.endpoint.into_iter().collect();
        if matches!(event.state, ModelState::Starting | ModelState::Ready) {
            // It runs (an adopted container, say): whatever start was pending is moot.
            entry.pending = None;
            entry.vram_blocked = false;
        }
        entry.ready_since = (event.state == ModelState::Ready).then(Instant::now);
        if event.state == ModelState::Failed {
            entry.last_error = event.error.map(Arc::from);
        } else if event.state == ModelState::Ready {
            entry.last_error = None;
        }
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
            // Answered in the run loop, which can await the reload.
            ControlRequest::Reload { .. } => {}
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
            // A stop in progress (or a replacement) must finish before the model starts again.
            if entry.state == ModelState::Stopping || entry.replacement.is_some() || entry.retiring
            {
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
            // Stops already under way will free their VRAM: count it, so a second stop
            // event does not pick yet another victim while the first is still stopping.
            let mut free_after_stops = ledger.free_mib.clone();
            for m in self
                .models
                .iter()
                .filter(|m| m.state == ModelState::Stopping && m.holds_vram())
            {
                for g in &m.spec.gpus {
                    if let Some(f) = free_after_stops.get_mut(*g) {
                        *f += m.spec.vram_mib;
                    }
                }
            }
            let freeing = free_after_stops != ledger.free_mib;
            let fits_now = gpus
                .iter()
                .all(|g| ledger.free_mib.get(*g).copied().unwrap_or(0) >= needed);
            if fits_now {
                let entry = &mut self.models[i];
                entry.pending = None;
                entry.vram_blocked = false;
                entry.state = ModelState::Starting;
                entry.starts_sent += 1;
                entry.shared.metrics.starts.fetch_add(1, Ordering::Relaxed);
                if let Some(owner) = &entry.owner {
                    let _ = owner.send(Command::Start);
                }
                continue;
            }
            match vram::victims(needed, &gpus, &free_after_stops, &candidates) {
                // Enough is already being freed: wait for those stops.
                Some(victims) if victims.is_empty() => self.models[i].vram_blocked = false,
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
    async fn housekeeping(&mut self) -> bool {
        let mut changed = self.retire_idle().await;
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
        // All owners stop in parallel, under one deadline (a stop's own grace is 10 s).
        let all = futures_util::future::join_all(waits);
        if tokio::time::timeout(Duration::from_secs(15), all)
            .await
            .is_err()
        {
            warn!(self.log, "some model servers did not stop within 15 s");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vram::{GpuMemory, GpuProbe};

    /// Stands in for NVML: reports what a test says the device has.
    struct FakeNvml(Vec<GpuMemory>);

    impl GpuProbe for FakeNvml {
        fn memory(&self) -> Option<Vec<GpuMemory>> {
            Some(self.0.clone())
        }
        fn name(&self) -> &'static str {
            "fake"
        }
    }

    fn plane(probe: Arc<dyn GpuProbe>) -> ControlPlane {
        let text = r#"
[gpus]
vram_mib = [24000, 16000]
[[models]]
name = "a"
runtime = "process"
command = ["x", "{port}"]
vram_mib = 10000
"#;
        let config = config::parse_str(text, &|_| None).unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        ControlPlane::with_probe(config, PathBuf::from("/nonexistent"), probe, log)
    }

    #[test]
    fn without_nvml_the_config_totals_are_the_ledger() {
        let mut cp = plane(Arc::new(vram::NoProbe));
        assert_eq!(cp.ledger().free_mib, vec![24000, 16000]);
        cp.models[0].state = ModelState::Ready;
        assert_eq!(cp.ledger().free_mib, vec![14000, 16000]);
    }

    #[test]
    fn with_nvml_the_smaller_figure_wins() {
        let probe = FakeNvml(vec![
            GpuMemory {
                total_mib: 81920,
                free_mib: 12000,
            },
            GpuMemory {
                total_mib: 8000,
                free_mib: 7000,
            },
        ]);
        let mut cp = plane(Arc::new(probe));
        let ledger = cp.ledger();
        // GPU 0: the device has less free than the config says; GPU 1 is capped by the device.
        assert_eq!(ledger.total_mib, vec![24000, 8000]);
        assert_eq!(ledger.free_mib, vec![12000, 7000]);
        cp.models[0].state = ModelState::Starting;
        assert_eq!(cp.ledger().free_mib, vec![12000, 7000]);
        cp.models[0].state = ModelState::Stopped;
        cp.models[0].pending = Some(Want::Requested);
        assert_eq!(cp.ledger().free_mib, vec![12000, 7000]);
    }
}
