//! The process runtime: one owner task per model that spawns its server, waits for health,
//! watches for exits and stops it (SIGTERM to the process group, then SIGKILL).

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::{Endpoint, ModelState};
use slog::{info, warn, Logger};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command as ProcessCommand};
use tokio::sync::{mpsc, oneshot};

use crate::config::{ModelSpec, RuntimeSpec};
use crate::{ControlError, StateEvent};

pub enum Command {
    Start,
    Stop,
    Shutdown(oneshot::Sender<()>),
}

/// Lines of a server's output kept to explain a failed start.
const TAIL_LINES: usize = 20;
/// Time a server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct Owner {
    spec: ModelSpec,
    name: Arc<str>,
    events: mpsc::UnboundedSender<StateEvent>,
    log: Logger,
    failures: u32,
    last_failure: Option<Instant>,
}

struct Running {
    child: Child,
    endpoint: Arc<Endpoint>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Owner {
    pub fn new(spec: ModelSpec, events: mpsc::UnboundedSender<StateEvent>, log: Logger) -> Self {
        let name: Arc<str> = spec.name.as_str().into();
        let log = log.new(slog::o!("model" => spec.name.clone()));
        Owner {
            spec,
            name,
            events,
            log,
            failures: 0,
            last_failure: None,
        }
    }

    fn report(&self, state: ModelState, endpoint: Option<Arc<Endpoint>>) {
        let _ = self.events.send(StateEvent {
            model: self.name.clone(),
            state,
            endpoint,
        });
    }

    /// The owner's loop: the only code that changes this model's state.
    pub async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut running: Option<Running> = None;
        loop {
            let command = match running.as_mut() {
                None => commands.recv().await,
                Some(server) => tokio::select! {
                    command = commands.recv() => command,
                    status = server.child.wait() => {
                        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                        warn!(self.log, "model server exited"; "status" => &status, "output" => tail_text(&server.tail));
                        running = None;
                        self.fail();
                        continue;
                    }
                },
            };
            match command {
                Some(Command::Start) => {
                    if running.is_some() {
                        continue;
                    }
                    self.report(ModelState::Starting, None);
                    // Back off after failures, so a crashing server is not restarted in a storm.
                    if let Some(at) = self.last_failure {
                        let wait = backoff(self.failures).saturating_sub(at.elapsed());
                        if !wait.is_zero() {
                            info!(self.log, "waiting before restart"; "ms" => wait.as_millis() as u64);
                            tokio::time::sleep(wait).await;
                        }
                    }
                    match self.start(&mut commands).await {
                        Ok(Some(server)) => {
                            self.failures = 0;
                            self.report(ModelState::Ready, Some(server.endpoint.clone()));
                            running = Some(server);
                        }
                        Ok(None) => self.report(ModelState::Stopped, None),
                        Err(e) => {
                            warn!(self.log, "model failed to start"; "error" => %e);
                            self.fail();
                        }
                    }
                }
                Some(Command::Stop) => {
                    if let Some(server) = running.take() {
                        self.report(ModelState::Stopping, Some(server.endpoint.clone()));
                        stop(server.child, &self.log).await;
                        self.report(ModelState::Stopped, None);
                    }
                }
                Some(Command::Shutdown(done)) => {
                    if let Some(server) = running.take() {
                        stop(server.child, &self.log).await;
                    }
                    let _ = done.send(());
                    return;
                }
                None => {
                    if let Some(server) = running.take() {
                        stop(server.child, &self.log).await;
                    }
                    return;
                }
            }
        }
    }

    fn fail(&mut self) {
        self.failures += 1;
        self.last_failure = Some(Instant::now());
        self.report(ModelState::Failed, None);
    }

    /// Spawn and wait for health. `Ok(None)`: a stop or shutdown arrived meanwhile.
    async fn start(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<Option<Running>, ControlError> {
        let RuntimeSpec::Process { command, env } = &self.spec.runtime else {
            return Err(self.spawn_error("not a process model".into()));
        };
        let port = free_port().map_err(|e| self.spawn_error(format!("no free port: {e}")))?;
        let fill = |s: &str| {
            s.replace("{port}", &port.to_string())
                .replace("{gateway_exe}", &gateway_exe())
        };
        let argv: Vec<String> = command.iter().map(|a| fill(a)).collect();
        let mut cmd = ProcessCommand::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env.iter().map(|(k, v)| (k, fill(v))))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe. The server dies with the gateway, even on SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| self.spawn_error(format!("{}: {e}", argv[0])))?;
        info!(self.log, "model server spawned"; "pid" => child.id(), "port" => port, "command" => argv.join(" "));
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pipe_lines(
                out,
                self.log.new(slog::o!("stream" => "stdout")),
                tail.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pipe_lines(
                err,
                self.log.new(slog::o!("stream" => "stderr")),
                tail.clone(),
            ));
        }
        let url = format!("http://127.0.0.1:{port}");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let endpoint = Arc::new(Endpoint::new(&url, addr, &format!("127.0.0.1:{port}")));
        let deadline = tokio::time::Instant::now() + self.spec.startup_timeout;
        // Poll fast at first, then ease off: a server that turns healthy is seen within ~25 ms.
        let mut interval = Duration::from_millis(5);
        loop {
            tokio::select! {
                status = child.wait() => {
                    // Let the output pipes drain so the tail is complete.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Err(ControlError::ExitedWhileStarting {
                        model: self.spec.name.clone(),
                        status,
                        tail: tail_text(&tail),
                    });
                }
                command = commands.recv() => match command {
                    Some(Command::Start) => {}
                    Some(Command::Stop) => {
                        self.report(ModelState::Stopping, None);
                        stop(child, &self.log).await;
                        return Ok(None);
                    }
                    Some(Command::Shutdown(done)) => {
                        stop(child, &self.log).await;
                        let _ = done.send(());
                        return Ok(None);
                    }
                    None => {
                        stop(child, &self.log).await;
                        return Ok(None);
                    }
                },
                healthy = probe(addr, &self.spec.health_path) => {
                    if healthy {
                        return Ok(Some(Running { child, endpoint, tail }));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        stop(child, &self.log).await;
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

    fn spawn_error(&self, cause: String) -> ControlError {
        ControlError::Spawn {
            model: self.spec.name.clone(),
            cause,
        }
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(30))
}

fn gateway_exe() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "vllm-gateway".into())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    tail.lock()
        .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

async fn pipe_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    log: Logger,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        info!(log, "{}", line);
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// One health probe: true on a 200.
async fn probe(addr: std::net::SocketAddr, path: &str) -> bool {
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

/// SIGTERM to the process group, SIGKILL after the grace period, then reap.
async fn stop(mut child: Child, log: &Logger) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling a process group we created; a stale id only yields ESRCH.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            info!(log, "model server stopped"; "pid" => pid);
            return;
        }
        warn!(log, "model server ignored SIGTERM; killing it"; "pid" => pid);
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}
