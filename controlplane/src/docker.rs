//! The Docker runtime through bollard. Owns container create/start/inspect/stop/remove,
//! adoption and crash watching. Must never block the control plane thread or touch the
//! request path: every call here is async I/O to the engine, bounded where a stuck engine could
//! otherwise hold a caller forever.
//!
//! Containers carry two labels, [`MODEL_LABEL`] (the model's name) and [`HASH_LABEL`] (a hash of
//! everything that defines the container, see [`DockerRuntime::spec_hash`]), so that a restarted
//! gateway can adopt a container that is still right for its model instead of restarting it.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, DeviceRequest, HostConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use slog::{debug, info, warn, Logger};

use crate::config::{ModelSpec, RuntimeSpec};
use crate::ControlError;

/// Label holding the model's name.
pub const MODEL_LABEL: &str = "vllm-gateway.model";
/// Label holding [`DockerRuntime::spec_hash`] of the spec the container was made from.
pub const HASH_LABEL: &str = "vllm-gateway.spec-hash";
/// Set to `0` to launch containers without GPU device requests (a host with no GPU, tests).
pub const GPUS_ENV: &str = "VLLM_GATEWAY_DOCKER_GPUS";

/// How long `connect` waits for the engine to answer before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-request timeout of the engine client (until the response head; streams are unbounded).
const REQUEST_TIMEOUT_S: u64 = 120;
/// Seconds `stop` gives the container between SIGTERM and SIGKILL.
const STOP_GRACE_S: i32 = 10;
/// How long `logs_tail` may take; it only feeds failure messages.
const LOGS_TIMEOUT: Duration = Duration::from_secs(5);
/// Times `wait_exit` re-arms its wait after losing the stream while the container still runs.
const WAIT_RETRIES: u32 = 5;

/// The engine client. Cheap to clone (one shared connection pool).
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    log: Logger,
}

/// A running container and the host address its server is published on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub addr: SocketAddr,
}

/// The docker-specific parts of a spec.
struct DockerParts<'a> {
    image: &'a str,
    args: &'a [String],
    container_port: u16,
    env: &'a BTreeMap<String, String>,
}

fn docker_parts(spec: &ModelSpec) -> Option<DockerParts<'_>> {
    match &spec.runtime {
        RuntimeSpec::Docker {
            image,
            args,
            container_port,
            env,
        } => Some(DockerParts {
            image,
            args,
            container_port: *container_port,
            env,
        }),
        _ => None,
    }
}

/// An error about one model's container.
fn docker_error(model: &str, cause: impl Into<String>) -> ControlError {
    ControlError::Docker {
        model: model.to_string(),
        cause: cause.into(),
    }
}

/// The engine cannot be reached at all.
fn unavailable(host: &str, cause: impl std::fmt::Display) -> ControlError {
    ControlError::DockerUnavailable {
        host: host.to_string(),
        cause: cause.to_string(),
    }
}

fn status_code(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &BollardError) -> bool {
    status_code(e) == Some(404)
}

/// One line for an engine error: the daemon's own message where there is one.
fn describe(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{} (HTTP {status_code})", message.trim()),
        BollardError::SocketNotFoundError(path) => {
            format!("no Docker socket at {path}; is the Docker engine running?")
        }
        BollardError::RequestTimeoutError => {
            format!("the Docker engine did not answer within {REQUEST_TIMEOUT_S} s")
        }
        other => other.to_string(),
    }
}

/// The first 12 characters of an id, as `docker ps` shows it.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The container name for a model: `vllm-gateway-<model>` with every character outside
/// docker's name charset (`[a-zA-Z0-9_.-]`) replaced by `-`. When that changed the name (or it is
/// very long), a short hash of the real name is appended, so two models never share a name.
pub fn container_name(model: &str) -> String {
    const MAX_MODEL_CHARS: usize = 100;
    let clean: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean == model && clean.len() <= MAX_MODEL_CHARS {
        format!("vllm-gateway-{clean}")
    } else {
        let digest = Sha256::digest(model.as_bytes());
        let truncated: String = clean.chars().take(MAX_MODEL_CHARS).collect();
        format!("vllm-gateway-{truncated}-{}", &hex(&digest)[..8])
    }
}

/// Whether launches add GPU device requests: not when `VLLM_GATEWAY_DOCKER_GPUS=0`.
fn gpus_enabled() -> bool {
    std::env::var(GPUS_ENV).map_or(true, |v| v.trim() != "0")
}

/// The create request for a spec. Pure, so its shape is unit-tested.
fn create_body(
    spec: &ModelSpec,
    parts: &DockerParts<'_>,
    hash: &str,
    gpus: bool,
) -> ContainerCreateBody {
    let port = parts.container_port.to_string();
    let port_key = format!("{port}/tcp");
    let cmd: Vec<String> = parts
        .args
        .iter()
        .map(|a| a.replace("{port}", &port))
        .collect();
    let env: Vec<String> = parts
        .env
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace("{port}", &port)))
        .collect();
    let labels = HashMap::from([
        (MODEL_LABEL.to_string(), spec.name.clone()),
        (HASH_LABEL.to_string(), hash.to_string()),
    ]);
    let port_bindings = HashMap::from([(
        port_key.clone(),
        Some(vec![PortBinding {
            host_ip: Some(Ipv4Addr::LOCALHOST.to_string()),
            // Empty: the daemon picks a free port; `launch` reads it back.
            host_port: Some(String::new()),
        }]),
    )]);
    let device_requests = (gpus && !spec.gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".to_string()),
            device_ids: Some(spec.gpus.iter().map(usize::to_string).collect()),
            capabilities: Some(vec![vec!["gpu".to_string()]]),
            ..Default::default()
        }]
    });
    ContainerCreateBody {
        image: Some(parts.image.to_string()),
        // No args: keep the image's own CMD.
        cmd: (!cmd.is_empty()).then_some(cmd),
        env: Some(env),
        labels: Some(labels),
        exposed_ports: Some(vec![port_key]),
        host_config: Some(HostConfig {
            // tini as PID 1 forwards SIGTERM, so stop takes 0.2 s rather than the full grace.
            init: Some(true),
            port_bindings: Some(port_bindings),
            device_requests,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The published host port for `container_port/tcp` in an inspect answer.
fn published_port(inspect: &ContainerInspectResponse, container_port: u16) -> Option<u16> {
    let key = format!("{container_port}/tcp");
    let bindings = inspect
        .network_settings
        .as_ref()?
        .ports
        .as_ref()?
        .get(&key)?
        .as_ref()?;
    // Prefer the IPv4 loopback binding we asked for; take any other as a fallback.
    let all: Vec<(bool, u16)> = bindings
        .iter()
        .filter_map(|b| {
            let port = b.host_port.as_deref()?.parse::<u16>().ok()?;
            Some((b.host_ip.as_deref() == Some("127.0.0.1"), port))
        })
        .collect();
    all.iter()
        .find(|(loopback, _)| *loopback)
        .or_else(|| all.first())
        .map(|&(_, port)| port)
}

fn is_running(inspect: &ContainerInspectResponse) -> bool {
    inspect
        .state
        .as_ref()
        .is_some_and(|s| s.running == Some(true))
}

/// "exited with code 137 (SIGKILL)" and the like.
fn exit_text(code: i64, oom_killed: bool, error: Option<&str>) -> String {
    let mut text = format!("exited with code {code}");
    let signal = match code - 128 {
        1 => Some("SIGHUP"),
        2 => Some("SIGINT"),
        6 => Some("SIGABRT"),
        9 => Some("SIGKILL"),
        11 => Some("SIGSEGV"),
        15 => Some("SIGTERM"),
        _ => None,
    };
    if oom_killed {
        text.push_str(" (out of memory)");
    } else if let Some(signal) = signal {
        text.push_str(&format!(" ({signal})"));
    }
    if let Some(error) = error.map(str::trim).filter(|e| !e.is_empty()) {
        text.push_str(&format!(": {}", one_line(error)));
    }
    text
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Feeds one length-prefixed field into the hash, so no two different specs share a byte stream.
fn hash_field(h: &mut Sha256, tag: &str, value: &[u8]) {
    h.update(tag.as_bytes());
    h.update((value.len() as u64).to_le_bytes());
    h.update(value);
}

impl DockerRuntime {
    /// host: None = DOCKER_HOST or the local socket; Some("unix:///path") or Some("tcp://h:p").
    /// Negotiates the API version. Fails fast when no daemon.
    pub async fn connect(host: Option<&str>, log: Logger) -> Result<DockerRuntime, ControlError> {
        let host = host
            .map(str::to_string)
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .filter(|h| !h.trim().is_empty());
        let shown = host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
        let docker = match host.as_deref() {
            None => Docker::connect_with_unix(
                "/var/run/docker.sock",
                REQUEST_TIMEOUT_S,
                API_DEFAULT_VERSION,
            ),
            // A bare socket path.
            Some(path) if path.starts_with('/') => {
                Docker::connect_with_unix(path, REQUEST_TIMEOUT_S, API_DEFAULT_VERSION)
            }
            Some(h) => Docker::connect_with_host(h)
                .map(|d| d.with_timeout(Duration::from_secs(REQUEST_TIMEOUT_S))),
        }
        .map_err(|e| unavailable(&shown, describe(&e)))?;
        let docker = match tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version()).await {
            Ok(Ok(docker)) => docker,
            Ok(Err(e)) => return Err(unavailable(&shown, describe(&e))),
            Err(_) => {
                return Err(unavailable(
                    &shown,
                    format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                ))
            }
        };
        let version = docker.client_version();
        info!(log, "connected to the Docker engine"; "host" => &shown, "api" => %version);
        Ok(DockerRuntime { docker, log })
    }

    /// A stable hex hash of everything that defines the container: image, args, env,
    /// container_port, gpus, name. Not vram/limits.
    pub fn spec_hash(spec: &ModelSpec) -> String {
        let mut h = Sha256::new();
        hash_field(&mut h, "v", b"1");
        hash_field(&mut h, "name", spec.name.as_bytes());
        if let Some(parts) = docker_parts(spec) {
            hash_field(&mut h, "image", parts.image.as_bytes());
            hash_field(&mut h, "args", &(parts.args.len() as u64).to_le_bytes());
            for arg in parts.args {
                hash_field(&mut h, "arg", arg.as_bytes());
            }
            hash_field(&mut h, "env", &(parts.env.len() as u64).to_le_bytes());
            // BTreeMap: sorted by key, so the order in the file does not matter.
            for (k, v) in parts.env {
                hash_field(&mut h, "key", k.as_bytes());
                hash_field(&mut h, "value", v.as_bytes());
            }
            hash_field(
                &mut h,
                "container_port",
                &parts.container_port.to_le_bytes(),
            );
        } else {
            hash_field(&mut h, "runtime", spec.runtime_name().as_bytes());
        }
        hash_field(&mut h, "gpus", &(spec.gpus.len() as u64).to_le_bytes());
        for gpu in &spec.gpus {
            hash_field(&mut h, "gpu", &(*gpu as u64).to_le_bytes());
        }
        hex(&h.finalize())
    }

    /// At gateway start-up: a RUNNING container labelled vllm-gateway.model=<name> whose
    /// vllm-gateway.spec-hash label matches → Some (its published port read with inspect).
    /// Containers for this model that are stopped or whose hash differs are removed (force).
    /// None if nothing adoptable.
    pub async fn adopt(&self, spec: &ModelSpec) -> Result<Option<Container>, ControlError> {
        let Some(parts) = docker_parts(spec) else {
            return Ok(None);
        };
        let hash = Self::spec_hash(spec);
        let filters = HashMap::from([("label", vec![format!("{MODEL_LABEL}={}", spec.name)])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| {
                docker_error(
                    &spec.name,
                    format!("could not list containers: {}", describe(&e)),
                )
            })?;
        let mut adopted = None;
        for summary in found {
            let Some(id) = summary.id else { continue };
            let running = summary.state == Some(ContainerSummaryStateEnum::RUNNING);
            let same_spec = summary
                .labels
                .as_ref()
                .and_then(|l| l.get(HASH_LABEL))
                .is_some_and(|h| *h == hash);
            let reason = if adopted.is_some() {
                "another container for this model was adopted"
            } else if !same_spec {
                "its spec changed"
            } else if !running {
                "it is not running"
            } else {
                match self.docker.inspect_container(&id, None).await {
                    Ok(inspect) if is_running(&inspect) => {
                        match published_port(&inspect, parts.container_port) {
                            Some(port) => {
                                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                                info!(self.log, "adopted running container";
                                    "model" => &spec.name, "id" => short_id(&id), "addr" => %addr);
                                adopted = Some(Container { id, addr });
                                continue;
                            }
                            None => "its container port is not published",
                        }
                    }
                    Ok(_) => "it is not running",
                    Err(e) if is_not_found(&e) => continue,
                    Err(e) => {
                        return Err(docker_error(
                            &spec.name,
                            format!(
                                "could not inspect container {}: {}",
                                short_id(&id),
                                describe(&e)
                            ),
                        ))
                    }
                }
            };
            info!(self.log, "removing container that cannot be adopted";
                "model" => &spec.name, "id" => short_id(&id), "reason" => reason);
            self.remove(&id).await;
        }
        Ok(adopted)
    }

    /// Create and start a container for `spec` (see the module docs for labels and name), and
    /// return the 127.0.0.1 address its `container_port` is published on. A container that
    /// exits at once is reported as `ExitedWhileStarting` with its last output, and removed.
    pub async fn launch(&self, spec: &ModelSpec) -> Result<Container, ControlError> {
        let model = spec.name.as_str();
        let parts = docker_parts(spec).ok_or_else(|| {
            docker_error(
                model,
                format!("not a docker model (runtime \"{}\")", spec.runtime_name()),
            )
        })?;
        let started = Instant::now();
        let name = container_name(model);
        // A leftover from an earlier run would make the create fail with a name conflict.
        match self.docker.remove_container(&name, Some(force())).await {
            Ok(()) => {
                info!(self.log, "removed leftover container"; "model" => model, "name" => &name)
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                warn!(self.log, "could not remove leftover container"; "model" => model, "name" => &name, "error" => describe(&e))
            }
        }
        let body = create_body(spec, &parts, &Self::spec_hash(spec), gpus_enabled());
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                let cause = if is_not_found(&e) {
                    format!(
                        "image {} is not available locally (pull it first: docker pull {}): {}",
                        parts.image,
                        parts.image,
                        describe(&e)
                    )
                } else {
                    format!("could not create container {name}: {}", describe(&e))
                };
                docker_error(model, cause)
            })?;
        let id = created.id;
        for warning in created.warnings.iter().filter(|w| !w.is_empty()) {
            warn!(self.log, "docker create warning"; "model" => model, "warning" => warning);
        }
        if let Err(e) = self.docker.start_container(&id, None).await {
            self.remove(&id).await;
            return Err(docker_error(
                model,
                format!("could not start container {name}: {}", describe(&e)),
            ));
        }
        let inspect = match self.docker.inspect_container(&id, None).await {
            Ok(inspect) => inspect,
            Err(e) => {
                self.remove(&id).await;
                return Err(docker_error(
                    model,
                    format!("could not inspect container {name}: {}", describe(&e)),
                ));
            }
        };
        let port = published_port(&inspect, parts.container_port);
        let port = match port {
            Some(port) if is_running(&inspect) => port,
            _ => {
                let state = inspect.state.as_ref();
                let status = if is_running(&inspect) {
                    format!(
                        "running, but port {}/tcp is not published",
                        parts.container_port
                    )
                } else {
                    exit_text(
                        state.and_then(|s| s.exit_code).unwrap_or(-1),
                        state.and_then(|s| s.oom_killed).unwrap_or(false),
                        state.and_then(|s| s.error.as_deref()),
                    )
                };
                let tail = self.logs_tail(&id, 20).await;
                self.remove(&id).await;
                return Err(ControlError::ExitedWhileStarting {
                    model: model.to_string(),
                    status,
                    tail,
                });
            }
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        info!(self.log, "container started"; "model" => model, "id" => short_id(&id),
            "addr" => %addr, "ms" => started.elapsed().as_millis() as u64);
        Ok(Container { id, addr })
    }

    /// Resolves when the container stops or disappears, and says how in one line (with the exit
    /// code). Uses the engine's wait endpoint (condition `not-running`), so nothing polls; it is
    /// cancel-safe, so it can sit in a `select!` and be re-created.
    pub async fn wait_exit(&self, id: &str) -> String {
        let short = short_id(id);
        let mut retries = 0;
        loop {
            let options = WaitContainerOptionsBuilder::new()
                .condition("not-running")
                .build();
            let outcome = self.docker.wait_container(id, Some(options)).next().await;
            let code = match outcome {
                Some(Ok(answer)) => answer.status_code,
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => code,
                Some(Err(e)) if is_not_found(&e) => {
                    return format!("container {short} no longer exists")
                }
                other => {
                    // The stream broke (engine restart, connection lost): is it still running?
                    let cause = match other {
                        Some(Err(e)) => describe(&e),
                        _ => "the wait stream ended without an answer".to_string(),
                    };
                    match self.docker.inspect_container(id, None).await {
                        Ok(inspect) if is_running(&inspect) && retries < WAIT_RETRIES => {
                            retries += 1;
                            warn!(self.log, "lost the wait on a running container; waiting again";
                                "id" => short, "error" => &cause);
                            tokio::time::sleep(Duration::from_millis(200 << retries)).await;
                            continue;
                        }
                        Ok(inspect) if !is_running(&inspect) => {
                            return self.exit_description(id, None, Some(inspect)).await
                        }
                        Err(e) if is_not_found(&e) => {
                            return format!("container {short} no longer exists")
                        }
                        _ => {
                            return format!(
                                "lost contact with the Docker engine while watching container \
                                 {short}: {}",
                                one_line(&cause)
                            )
                        }
                    }
                }
            };
            return self.exit_description(id, Some(code), None).await;
        }
    }

    /// "container abc exited with code 1", with OOM and error details from inspect when the
    /// container still exists.
    async fn exit_description(
        &self,
        id: &str,
        code: Option<i64>,
        inspect: Option<ContainerInspectResponse>,
    ) -> String {
        let short = short_id(id);
        let inspect = match inspect {
            Some(inspect) => Some(inspect),
            None => self.docker.inspect_container(id, None).await.ok(),
        };
        let state = inspect.as_ref().and_then(|i| i.state.as_ref());
        let code = code
            .or_else(|| state.and_then(|s| s.exit_code))
            .unwrap_or(-1);
        let oom = state.and_then(|s| s.oom_killed).unwrap_or(false);
        let error = state.and_then(|s| s.error.as_deref());
        let mut text = format!("container {short} {}", exit_text(code, oom, error));
        match state.and_then(|s| s.status) {
            None => text.push_str(" and was removed"),
            Some(ContainerStateStatusEnum::REMOVING) => text.push_str(" and is being removed"),
            _ => {}
        }
        text
    }

    /// The last `lines` lines of the container's stdout+stderr, for failure messages. Never
    /// fails: a problem reading them is described in the text.
    pub async fn logs_tail(&self, id: &str, lines: usize) -> String {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        let collect = async {
            let mut out = Vec::new();
            let mut stream = self.docker.logs(id, Some(options));
            while let Some(item) = stream.next().await {
                out.extend_from_slice(&item?.into_bytes());
            }
            Ok::<_, BollardError>(out)
        };
        let bytes = match tokio::time::timeout(LOGS_TIMEOUT, collect).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                return format!("(could not read the container's output: {})", describe(&e))
            }
            Err(_) => return "(could not read the container's output: timed out)".to_string(),
        };
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.trim_end().lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stop (timeout 10 s) and remove. Errors are logged, not returned (a vanished container is
    /// fine).
    pub async fn stop(&self, id: &str) {
        let started = Instant::now();
        let options = StopContainerOptionsBuilder::new().t(STOP_GRACE_S).build();
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {
                debug!(self.log, "container already gone"; "id" => short_id(id));
                return;
            }
            // remove(force) below kills it anyway.
            Err(e) => {
                warn!(self.log, "could not stop container"; "id" => short_id(id), "error" => describe(&e))
            }
        }
        self.remove(id).await;
        info!(self.log, "container stopped and removed"; "id" => short_id(id),
            "ms" => started.elapsed().as_millis() as u64);
    }

    /// Force-remove; a container that is gone or already being removed is fine.
    async fn remove(&self, id: &str) {
        match self.docker.remove_container(id, Some(force())).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            // "removal of container ... is already in progress"
            Err(e) if status_code(&e) == Some(409) => {
                debug!(self.log, "container removal already in progress"; "id" => short_id(id))
            }
            Err(e) => {
                warn!(self.log, "could not remove container"; "id" => short_id(id), "error" => describe(&e))
            }
        }
    }
}

fn force() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new().force(true).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, gpus: Vec<usize>) -> ModelSpec {
        ModelSpec {
            name: name.to_string(),
            aliases: Vec::new(),
            upstream_model: name.to_string(),
            runtime: RuntimeSpec::Docker {
                image: "img:1".to_string(),
                args: vec!["--port".into(), "{port}".into()],
                container_port: 8000,
                env: BTreeMap::from([("URL".to_string(), "http://x:{port}/".to_string())]),
            },
            vram_mib: 100,
            gpus,
            pinned: false,
            preload: false,
            idle_unload: None,
            startup_timeout: Duration::from_secs(60),
            health_path: "/health".to_string(),
            max_concurrent: 1,
            max_queue_size: 1,
        }
    }

    #[test]
    fn names_keep_docker_charset_and_never_collide() {
        assert_eq!(
            container_name("llama-8b_v1.2"),
            "vllm-gateway-llama-8b_v1.2"
        );
        let a = container_name("org/model:tag");
        let b = container_name("org:model/tag");
        assert!(a.starts_with("vllm-gateway-org-model-tag-"), "{a}");
        assert_ne!(a, b);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
        assert!(container_name(&"x".repeat(500)).len() < 130);
    }

    #[test]
    fn create_body_substitutes_the_port_and_publishes_on_loopback() {
        let s = spec("m", vec![1, 3]);
        let parts = docker_parts(&s).unwrap();
        let body = create_body(&s, &parts, "h", true);
        assert_eq!(body.cmd.unwrap(), vec!["--port", "8000"]);
        assert_eq!(body.env.unwrap(), vec!["URL=http://x:8000/"]);
        let labels = body.labels.unwrap();
        assert_eq!(labels[MODEL_LABEL], "m");
        assert_eq!(labels[HASH_LABEL], "h");
        assert_eq!(body.exposed_ports.unwrap(), vec!["8000/tcp"]);
        let host = body.host_config.unwrap();
        assert_eq!(host.init, Some(true));
        let binding = &host.port_bindings.unwrap()["8000/tcp"].clone().unwrap()[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(binding.host_port.as_deref(), Some(""));
        let devices = host.device_requests.unwrap();
        assert_eq!(devices[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(devices[0].device_ids.clone().unwrap(), vec!["1", "3"]);
        assert_eq!(
            devices[0].capabilities.clone().unwrap(),
            vec![vec!["gpu".to_string()]]
        );
    }

    #[test]
    fn no_device_requests_without_gpus_or_when_disabled() {
        let s = spec("m", vec![0]);
        let parts = docker_parts(&s).unwrap();
        assert!(create_body(&s, &parts, "h", false)
            .host_config
            .unwrap()
            .device_requests
            .is_none());
        let s = spec("m", vec![]);
        let parts = docker_parts(&s).unwrap();
        assert!(create_body(&s, &parts, "h", true)
            .host_config
            .unwrap()
            .device_requests
            .is_none());
    }

    #[test]
    fn spec_hash_covers_the_container_and_nothing_else() {
        let base = spec("m", vec![0]);
        let h = DockerRuntime::spec_hash(&base);
        assert_eq!(h.len(), 64);
        assert_eq!(h, DockerRuntime::spec_hash(&base.clone()));
        let mut other = base.clone();
        other.vram_mib = 1;
        other.max_concurrent = 9;
        other.startup_timeout = Duration::from_secs(1);
        assert_eq!(h, DockerRuntime::spec_hash(&other));
        let mut other = base.clone();
        other.gpus = vec![1];
        assert_ne!(h, DockerRuntime::spec_hash(&other));
        let mut other = base.clone();
        other.name = "n".into();
        assert_ne!(h, DockerRuntime::spec_hash(&other));
        // Field boundaries matter: ["ab"] and ["a", "b"] differ.
        let mut a = base.clone();
        let mut b = base.clone();
        if let RuntimeSpec::Docker { args, .. } = &mut a.runtime {
            *args = vec!["ab".into()];
        }
        if let RuntimeSpec::Docker { args, .. } = &mut b.runtime {
            *args = vec!["a".into(), "b".into()];
        }
        assert_ne!(DockerRuntime::spec_hash(&a), DockerRuntime::spec_hash(&b));
    }

    #[test]
    fn exit_text_names_signals_and_oom() {
        assert_eq!(exit_text(0, false, None), "exited with code 0");
        assert_eq!(
            exit_text(137, false, None),
            "exited with code 137 (SIGKILL)"
        );
        assert_eq!(
            exit_text(137, true, None),
            "exited with code 137 (out of memory)"
        );
        assert_eq!(
            exit_text(1, false, Some("boom\nagain")),
            "exited with code 1: boom again"
        );
    }
}
