//! One owner task per model: the only code that changes a model's lifecycle state. It takes
//! commands (start, stop, shutdown) from the control plane, runs the server through its
//! runtime, waits for health, watches for exits, and reports each state change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataplane::{Endpoint, ModelState};
use slog::{info, warn, Logger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ModelSpec, RuntimeSpec};
use crate::docker::{Container, DockerRuntime};
use crate::process::{self, ProcessServer};
use crate::{ControlError, StateEvent};

pub enum Command {
    Start,
    Stop,
    /// The gateway is exiting: stop processes, leave containers for the next gateway.
    Shutdown(oneshot::Sender<()>),
    /// The model left the config or its runtime changed: stop the server for good, answer
    /// `done` once it is stopped (its VRAM is free), and exit.
    Retire(oneshot::Sender<()>),
}

/// How often a ready server's health is checked, and how many failures in a row fail it.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
const HEALTH_FAILURES: u32 = 3;

/// A running model server, whatever its runtime.
enum Server {
    Process(ProcessServer),
    Docker {
        runtime: Arc<DockerRuntime>,
        container: Container,
        /// One watcher per container for its whole life: re-creating the engine's wait
        /// request on every select iteration would let a fast health probe always win.
        exit: tokio::task::JoinHandle<String>,
    },
}

impl Server {
    fn docker(runtime: Arc<DockerRuntime>, container: Container) -> Server {
        let exit = tokio::spawn({
            let runtime = runtime.clone();
            let id = container.id.clone();
            async move { runtime.wait_exit(&id).await }
        });
        Server::Docker {
            runtime,
            container,
            exit,
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::Process(p) => p.addr,
            Server::Docker { container, .. } => container.addr,
        }
    }

    async fn exited(&mut self) -> String {
        match self {
            Server::Process(p) => p.exited().await,
            Server::Docker { exit, .. } => exit
                .await
                .unwrap_or_else(|e| format!("the exit watcher failed: {e}")),
        }
    }

    async fn tail(&self) -> String {
        match self {
            Server::Process(p) => p.tail().await,
            Server::Docker {
                runtime, container, ..
            } => runtime.logs_tail(&container.id, 20).await,
        }
    }

    async fn stop(self, log: &Logger) {
        match self {
            Server::Process(p) => p.stop(log).await,
            Server::Docker {
                runtime,
                container,
                exit,
            } => {
                exit.abort();
                runtime.stop(&container.id).await
            }
        }
    }

    /// On gateway exit: processes are stopped; containers keep running for the next gateway
    /// to adopt (a vLLM load takes minutes).
    async fn detach(self, log: &Logger) {
        match self {
            Server::Process(p) => p.stop(log).await,
            Server::Docker {
                container, exit, ..
            } => {
                exit.abort();
                info!(log, "leaving container running"; "id" => &container.id)
            }
        }
    }
}

pub struct Owner {
    spec: ModelSpec,
    name: Arc<str>,
    /// Tells this owner's reports from those of an owner it replaced (after a reload).
    id: u64,
    docker: Option<Arc<DockerRuntime>>,
    docker_error: Option<String>,
    events: mpsc::UnboundedSender<StateEvent>,
    log: Logger,
    failures: u32,
    last_failure: Option<Instant>,
}

enum Started {
    Ready(Server),
    /// A stop arrived while starting.
    Stopped,
    /// The owner must exit (after answering `done`, if given).
    Exit(Option<oneshot::Sender<()>>),
}

impl Owner {
    pub fn new(
        spec: ModelSpec,
        id: u64,
        docker: Result<Arc<DockerRuntime>, String>,
        events: mpsc::UnboundedSender<StateEvent>,
        log: Logger,
    ) -> Self {
        let name: Arc<str> = spec.name.as_str().into();
        let log = log.new(slog::o!("model" => spec.name.clone()));
        let (docker, docker_error) = match docker {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        };
        Owner {
            spec,
            name,
            id,
            docker,
            docker_error,
            events,
            log,
            failures: 0,
            last_failure: None,
        }
    }

    fn report(&self, state: ModelState, endpoint: Option<SocketAddr>) {
        let endpoint = endpoint.map(|addr| {
            Arc::new(Endpoint::new(
                &format!("http://{addr}"),
                addr,
                &addr.to_string(),
            ))
        });
        let _ = self.events.send(StateEvent {
            model: self.name.clone(),
            owner: self.id,
            state,
            endpoint,
            error: None,
        });
    }

    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut running: Option<Server> = None;
        if let Some(server) = self.adopt().await {
            self.report(ModelState::Starting, None);
            let started = self.wait_healthy(server, &mut commands).await;
            match self.settle(started) {
                Ok(server) => running = server,
                Err(()) => return,
            }
        }
        let mut health_failures = 0u32;
        'owner: loop {
            let command = match running.as_mut() {
                None => commands.recv().await,
                Some(server) => tokio::select! {
                    biased;
                    command = commands.recv() => command,
                    status = server.exited() => {
                        let tail = server.tail().await;
                        warn!(self.log, "model server exited"; "status" => &status, "output" => tail);
                        running = None;
                        self.fail(format!("its server exited ({status})"));
                        continue;
                    }
                    _ = tokio::time::sleep(HEALTH_INTERVAL) => {
                        if probe(server.addr(), &self.spec.health_path).await {
                            health_failures = 0;
                        } else {
                            health_failures += 1;
                            warn!(self.log, "health check failed"; "failures" => health_failures);
                            if health_failures >= HEALTH_FAILURES {
                                health_failures = 0;
                                if let Some(server) = running.take() {
                                    server.stop(&self.log).await;
                                }
                                self.fail(format!("its server failed {HEALTH_FAILURES} health checks in a row"));
                            }
                        }
                        continue;
                    }
                },
            };
            match command {
                Some(Command::Start) => {
                    if let Some(server) = &running {
                        // Already running (adopted, say): say so, so the control plane's view
                        // cannot stay at `starting`.
                        self.report(ModelState::Ready, Some(server.addr()));
                        continue;
                    }
                    self.report(ModelState::Starting, None);
                    // Back off after failures, so a crashing server is not restarted in a storm.
                    if let Some(at) = self.last_failure {
                        let wait = backoff(self.failures).saturating_sub(at.elapsed());
                        if !wait.is_zero() {
                            info!(self.log, "waiting before restart"; "ms" => wait.as_millis() as u64);
                            let until = tokio::time::Instant::now() + wait;
                            loop {
                                tokio::select! {
                                    _ = tokio::time::sleep_until(until) => break,
                                    command = commands.recv() => match command {
                                        Some(Command::Start) => {}
                                        Some(Command::Stop) => {
                                            self.report(ModelState::Stopped, None);
                                            continue 'owner;
                                        }
                                        Some(Command::Shutdown(done)) => {
                                            let _ = done.send(());
                                            return;
                                        }
                                        Some(Command::Retire(done)) => {
                                            let _ = done.send(());
                                            return;
                                        }
                                        None => return,
                                    },
                                }
                            }
                        }
                    }
                    let started = match self.launch().await {
                        Ok(server) => self.wait_healthy(server, &mut commands).await,
                        Err(e) => Err(e),
                    };
                    match self.settle(started) {
                        Ok(server) => {
                            health_failures = 0;
                            running = server;
                        }
                        Err(()) => return,
                    }
                }
                Some(Command::Stop) => {
                    if let Some(server) = running.take() {
                        self.report(ModelState::Stopping, Some(server.addr()));
                        server.stop(&self.log).await;
                    }
                    self.report(ModelState::Stopped, None);
                }
                Some(Command::Shutdown(done)) => {
                    if let Some(server) = running.take() {
                        server.detach(&self.log).await;
                    }
                    let _ = done.send(());
                    return;
                }
                Some(Command::Retire(done)) => {
                    if let Some(server) = running.take() {
                        server.stop(&self.log).await;
                    }
                    let _ = done.send(());
                    return;
                }
                None => {
                    if let Some(server) = running.take() {
                        server.detach(&self.log).await;
                    }
                    return;
                }
            }
        }
    }

    /// Report how a start ended. `Ok(Some)`: running; `Ok(None)`: not running;
    /// `Err`: the owner must exit now.
    fn settle(&mut self, started: Result<Started, ControlError>) -> Result<Option<Server>, ()> {
        match started {
            Ok(Started::Ready(server)) => {
                self.failures = 0;
                self.report(ModelState::Ready, Some(server.addr()));
                Ok(Some(server))
            }
            Ok(Started::Stopped) => {
                self.report(ModelState::Stopped, None);
                Ok(None)
            }
            Ok(Started::Exit(done)) => {
                if let Some(done) = done {
                    let _ = done.send(());
                }
                Err(())
            }
            Err(e) => {
                warn!(self.log, "model failed to start"; "error" => %e);
                // The first line: the output tail stays in the log.
                let reason = e.to_string();
                self.fail(reason.lines().next().unwrap_or_default().to_string());
                Ok(None)
            }
        }
    }

    fn fail(&mut self, reason: String) {
        self.failures += 1;
        self.last_failure = Some(Instant::now());
        let _ = self.events.send(StateEvent {
            model: self.name.clone(),
            owner: self.id,
            state: ModelState::Failed,
            endpoint: None,
            error: Some(reason),
        });
    }

    async fn adopt(&self) -> Option<Server> {
        let RuntimeSpec::Docker { .. } = self.spec.runtime else {
            return None;
        };
        let runtime = self.docker.clone()?;
        match runtime.adopt(&self.spec).await {
            Ok(Some(container)) => {
                info!(self.log, "adopting running container"; "id" => &container.id, "addr" => %container.addr);
                Some(Server::docker(runtime, container))
            }
            Ok(None) => None,
            Err(e) => {
                warn!(self.log, "could not look for a container to adopt"; "error" => %e);
                None
            }
        }
    }

    async fn launch(&self) -> Result<Server, ControlError> {
        match &self.spec.runtime {
            RuntimeSpec::Process { .. } => {
                Ok(Server::Process(process::launch(&self.spec, &self.log)?))
            }
            RuntimeSpec::Docker { .. } => {
                let Some(runtime) = self.docker.clone() else {
                    return Err(ControlError::Spawn {
                        model: self.spec.name.clone(),
                        cause: self
                            .docker_error
                            .clone()
                            .unwrap_or_else(|| "the Docker engine is not reachable".into()),
                    });
                };
                let container = runtime.launch(&self.spec).await?;
                Ok(Server::docker(runtime, container))
            }
            RuntimeSpec::Static { .. } => Err(ControlError::Spawn {
                model: self.spec.name.clone(),
                cause: "static models have no server to start".into(),
            }),
        }
    }

    /// Poll health until 200, racing the server's exit, the startup timeout and commands.
    async fn wait_healthy(
        &self,
        mut server: Server,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<Started, ControlError> {
        let deadline = tokio::time::Instant::now() + self.spec.startup_timeout;
        let addr = server.addr();
        // Poll fast at first, then ease off: a server that turns healthy is seen within ~25 ms.
        let mut interval = Duration::from_millis(5);
        loop {
            tokio::select! {
                // An exit must win over a probe that fails fast on a closed port.
                biased;
                status = server.exited() => {
                    return Err(ControlError::ExitedWhileStarting {
                        model: self.spec.name.clone(),
                        status,
                        tail: server.tail().await,
                    });
                }
                command = commands.recv() => match command {
                    Some(Command::Start) => {}
                    Some(Command::Stop) => {
                        self.report(ModelState::Stopping, None);
                        server.stop(&self.log).await;
                        return Ok(Started::Stopped);
                    }
                    Some(Command::Shutdown(done)) => {
                        server.detach(&self.log).await;
                        return Ok(Started::Exit(Some(done)));
                    }
                    Some(Command::Retire(done)) => {
                        server.stop(&self.log).await;
                        return Ok(Started::Exit(Some(done)));
                    }
                    None => {
                        server.detach(&self.log).await;
                        return Ok(Started::Exit(None));
                    }
                },
                healthy = probe(addr, &self.spec.health_path) => {
                    if healthy {
                        return Ok(Started::Ready(server));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        let tail = server.tail().await;
                        server.stop(&self.log).await;
                        warn!(self.log, "startup timed out"; "output" => tail);
                        return Err(ControlError::StartupTimeout {
                            model: self.spec.name.clone(),
                            secs: self.spec.startup_timeout.as_secs(),
                        });
                    }
                    tokio::time::sleep(interval).await;
                    interval = (interval * 2).min(Duration::from_millis(25));
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(30))
}

/// One health probe: true on a 200.
pub async fn probe(addr: SocketAddr, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 16];
        let n = stream.read(&mut head).await.ok()?;
        Some(head[..n].starts_with(b"HTTP/1.1 200") || head[..n].starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
