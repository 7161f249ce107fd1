//! The process runtime: spawn a model server as a child in its own process group, log its
//! output tagged with the model, and stop it (SIGTERM to the group, SIGKILL after a grace).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slog::{info, warn, Logger};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as ProcessCommand};

use crate::config::{ModelSpec, RuntimeSpec};
use crate::ControlError;

/// Lines of a server's output kept to explain a failure.
const TAIL_LINES: usize = 20;
/// Time a server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct ProcessServer {
    child: Child,
    /// The process group (the child's pid), kept because `Child::id` is gone once reaped.
    group: i32,
    pub addr: SocketAddr,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ProcessServer {
    /// The last lines of output; waits a moment first, so the pipes of a process that just
    /// exited are drained.
    pub async fn tail(&self) -> String {
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Resolves when the child exits.
    pub async fn exited(&mut self) -> String {
        // Cancel-safe: the wait is the only await, so a select that drops this loses nothing.
        let status = self.child.wait().await;
        // The leader is gone; helpers it started in its group (vLLM's engine workers) must
        // not keep the GPU.
        kill_group(self.group, libc::SIGKILL);
        status.map_or_else(|e| e.to_string(), |s| s.to_string())
    }

    /// SIGTERM to the process group, SIGKILL after the grace period, then reap.
    pub async fn stop(mut self, log: &Logger) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling a process group we created; a stale id only yields ESRCH.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGTERM);
            }
            if tokio::time::timeout(STOP_GRACE, self.child.wait())
                .await
                .is_ok()
            {
                // Whatever else is left in the group goes too.
                kill_group(self.group, libc::SIGKILL);
                info!(log, "model server stopped"; "pid" => pid);
                return;
            }
            warn!(log, "model server ignored SIGTERM; killing it"; "pid" => pid);
            // SAFETY: as above.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        let _ = self.child.kill().await;
    }
}

/// Spawn the model's command with `{port}` (and `{gateway_exe}`) filled in.
pub fn launch(spec: &ModelSpec, log: &Logger) -> Result<ProcessServer, ControlError> {
    let spawn_error = |cause: String| ControlError::Spawn {
        model: spec.name.clone(),
        cause,
    };
    let RuntimeSpec::Process { command, env } = &spec.runtime else {
        return Err(spawn_error("not a process model".into()));
    };
    let port = free_port().map_err(|e| spawn_error(format!("no free port: {e}")))?;
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
        .map_err(|e| spawn_error(format!("{}: {e}", argv[0])))?;
    info!(log, "model server spawned"; "pid" => child.id(), "port" => port, "command" => argv.join(" "));
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pipe_lines(
            out,
            log.new(slog::o!("stream" => "stdout")),
            tail.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pipe_lines(
            err,
            log.new(slog::o!("stream" => "stderr")),
            tail.clone(),
        ));
    }
    let group = child.id().map_or(0, |pid| pid as i32);
    Ok(ProcessServer {
        child,
        group,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        tail,
    })
}

/// This binary. `/proc/self/exe` still reaches it after the file was replaced on disk (an
/// upgrade or a rebuild while running), where the path would name a deleted file.
/// Signal a process group we created; a group that is already gone only yields ESRCH.
fn kill_group(group: i32, signal: i32) {
    if group > 0 {
        // SAFETY: plain kill(2) on a negative pid, i.e. the group we made with process_group(0).
        unsafe {
            libc::kill(-group, signal);
        }
    }
}

fn gateway_exe() -> String {
    if std::path::Path::new("/proc/self/exe").exists() {
        return "/proc/self/exe".into();
    }
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "vllm-gateway".into())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn pipe_lines(
    stream: impl tokio::io::AsyncRead + Unpin,
    log: Logger,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    // Bytes, not `lines()`: a non-UTF-8 line must not end the reading, or the child would
    // die of SIGPIPE on its next write.
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw).trim_end().to_string();
        info!(log, "{}", line);
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}
