//! The gateway with docker models, end to end: the real binary, a real Docker engine, and the
//! simulator in a `FROM scratch` image. Cold start in a container, adoption of a running
//! container by a restarted gateway, replacement of a container whose spec changed, crash
//! detection and restart, unload, and a clear 503 when the engine is missing.
//!
//! Skipped when there is no engine unless `VLLM_GATEWAY_REQUIRE_DOCKER` is set (except the
//! missing-engine test, which needs none). Each test has its own model name, so they run in
//! parallel; a `Cleanup` guard removes that model's containers before and after, pass or fail.

mod common;
#[path = "common/docker.rs"]
mod docker_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::models::{ContainerInspectResponse, ContainerSummary};
use bollard::query_parameters::{KillContainerOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use common::*;
use docker_support::{block_on, docker_or_skip, sim_image, Cleanup, MODEL_LABEL, SIM_PORT};

const HASH_LABEL: &str = "vllm-gateway.spec-hash";
/// This machine has no GPU: without this the runtime asks the daemon for nvidia devices.
const NO_GPUS: &[(&str, &str)] = &[("VLLM_GATEWAY_DOCKER_GPUS", "0")];

/// A docker model running the simulator in `image`, answering as `name`.
fn docker_model(name: &str, image: &str, ttft_ms: u64, extra: &str) -> String {
    format!(
        r#"[[models]]
name = "{name}"
runtime = "docker"
image = "{image}"
args = ["sim", "--listen", "0.0.0.0:{{port}}", "--model", "{name}", "--ttft-ms", "{ttft_ms}"]
container_port = {SIM_PORT}
startup_timeout_s = 60
{extra}
"#
    )
}

fn config(models: &str) -> String {
    format!("{GATEWAY_HEAD}{models}")
}

fn state(gw: SocketAddr, name: &str) -> String {
    model_entry(gw, name)["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Waits up to `within` for the model to be `ready`; returns how long it took.
fn wait_ready(gw: &Proc, name: &str, within: Duration) -> Duration {
    let started = Instant::now();
    assert!(
        eventually(within, || state(gw.addr, name) == "ready"),
        "{name} not ready within {within:?} (state {}); gateway stderr:\n{}",
        state(gw.addr, name),
        gw.stderr()
    );
    started.elapsed()
}

/// Every container (running or not) labelled with `model`.
fn containers(docker: &Docker, model: &str) -> Vec<ContainerSummary> {
    let docker = docker.clone();
    let filter = format!("{MODEL_LABEL}={model}");
    block_on(move || async move {
        let filters = std::collections::HashMap::from([("label", vec![filter])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        docker
            .list_containers(Some(options))
            .await
            .expect("list containers")
    })
}

/// The id of the one container labelled with `model`.
fn only_container(docker: &Docker, model: &str) -> String {
    let found = containers(docker, model);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one container for {model}: {found:#?}"
    );
    found[0].id.clone().expect("container id")
}

/// Inspect a container; `None` when it does not exist.
fn inspect(docker: &Docker, id: &str) -> Option<ContainerInspectResponse> {
    let docker = docker.clone();
    let id = id.to_string();
    block_on(move || async move {
        match docker.inspect_container(&id, None).await {
            Ok(inspect) => Some(inspect),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(e) => panic!("inspect {id}: {e}"),
        }
    })
}

fn running(inspect: &ContainerInspectResponse) -> bool {
    inspect
        .state
        .as_ref()
        .is_some_and(|s| s.running == Some(true))
}

/// `(Created, State.StartedAt)`: both change if the container is recreated or restarted.
fn created_and_started(inspect: &ContainerInspectResponse) -> (String, String) {
    (
        format!("{:?}", inspect.created),
        format!(
            "{:?}",
            inspect.state.as_ref().and_then(|s| s.started_at.clone())
        ),
    )
}

fn label(inspect: &ContainerInspectResponse, key: &str) -> Option<String> {
    inspect.config.as_ref()?.labels.as_ref()?.get(key).cloned()
}

/// The host address `container_port/tcp` is published on.
fn published(inspect: &ContainerInspectResponse) -> SocketAddr {
    let bindings = inspect
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref())
        .and_then(|p| p.get(&format!("{SIM_PORT}/tcp")).cloned().flatten())
        .unwrap_or_else(|| panic!("{SIM_PORT}/tcp not published: {inspect:#?}"));
    let binding = bindings
        .iter()
        .find(|b| b.host_ip.as_deref() == Some("127.0.0.1"))
        .unwrap_or_else(|| panic!("no 127.0.0.1 binding: {bindings:?}"));
    let port: u16 = binding
        .host_port
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("host port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn kill(docker: &Docker, id: &str) {
    let docker = docker.clone();
    let id = id.to_string();
    block_on(move || async move {
        docker
            .kill_container(
                &id,
                Some(KillContainerOptionsBuilder::new().signal("SIGKILL").build()),
            )
            .await
            .expect("docker kill")
    })
}

fn ask(gw: SocketAddr, model: &str) -> Response {
    post_json(gw, "/v1/chat/completions", &chat(model, 2, false))
}

/// A request answered 200 by the simulator for `model`.
fn assert_served(gw: &Proc, model: &str) {
    let resp = ask(gw.addr, model);
    assert_eq!(
        resp.status,
        200,
        "{}\ngateway stderr:\n{}",
        resp.text(),
        gw.stderr()
    );
    assert_eq!(resp.json()["model"], model, "{}", resp.text());
}

/// SIGTERM; the gateway must exit 0.
fn stop_gateway(mut gw: Proc) {
    gw.signal(libc::SIGTERM);
    let code = gw.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(Some(0)),
        "gateway did not exit 0 on SIGTERM; stderr:\n{}",
        gw.stderr()
    );
}

#[test]
fn cold_start_runs_the_model_in_a_labelled_container() {
    let Some(docker) = docker_or_skip() else {
        return;
    };
    let model = "dkg-cold";
    let image = sim_image();
    let _cleanup = Cleanup::new(&docker, model);
    let gw = gateway_with_env(&config(&docker_model(model, &image, 0, "")), NO_GPUS);
    assert_eq!(state(gw.addr, model), "stopped");
    assert!(containers(&docker, model).is_empty(), "started too early");

    let started = Instant::now();
    assert_served(&gw, model);
    eprintln!(
        "{model}: cold start + first request took {} ms",
        started.elapsed().as_millis()
    );

    let id = only_container(&docker, model);
    let c = inspect(&docker, &id).expect("the container exists");
    assert!(running(&c), "container not running: {:?}", c.state);
    assert_eq!(c.name.as_deref(), Some("/vllm-gateway-dkg-cold"));
    assert_eq!(label(&c, MODEL_LABEL).as_deref(), Some(model));
    let hash = label(&c, HASH_LABEL).expect("spec-hash label");
    assert!(
        hash.len() >= 16 && hash.chars().all(|ch| ch.is_ascii_hexdigit()),
        "{hash}"
    );
    let host = c.host_config.as_ref().expect("host config");
    assert_eq!(host.init, Some(true), "containers run with an init process");
    assert!(
        host.device_requests.clone().unwrap_or_default().is_empty(),
        "VLLM_GATEWAY_DOCKER_GPUS=0 must drop device requests"
    );
    assert_eq!(
        c.config.as_ref().and_then(|cfg| cfg.cmd.clone()),
        Some(
            [
                "sim",
                "--listen",
                "0.0.0.0:8000",
                "--model",
                model,
                "--ttft-ms",
                "0"
            ]
            .map(String::from)
            .to_vec()
        )
    );

    let entry = model_entry(gw.addr, model);
    assert_eq!(entry["state"], "ready", "{entry}");
    let addr = published(&c);
    assert_eq!(
        entry["endpoints"],
        serde_json::json!([format!("http://{addr}")]),
        "the endpoint is the container's published port"
    );
    assert_eq!(
        metric(
            gw.addr,
            &format!("gateway_model_starts_total{{model=\"{model}\"}}")
        ),
        1.0
    );
    assert!(
        eventually(Duration::from_secs(5), || counters_zero(gw.addr, model)),
        "counters did not return to zero"
    );
}

#[test]
fn a_restarted_gateway_adopts_the_running_container() {
    let Some(docker) = docker_or_skip() else {
        return;
    };
    let model = "dkg-adopt";
    let image = sim_image();
    let _cleanup = Cleanup::new(&docker, model);
    let cfg = config(&docker_model(model, &image, 0, "preload = true"));

    let gw1 = gateway_with_env(&cfg, NO_GPUS);
    let fresh = wait_ready(&gw1, model, Duration::from_secs(60));
    assert_served(&gw1, model);
    let id = only_container(&docker, model);
    let before = inspect(&docker, &id).expect("container");
    let addr = published(&before);

    stop_gateway(gw1);
    let after_exit = inspect(&docker, &id).expect("the container was removed on gateway exit");
    assert!(
        running(&after_exit),
        "containers must be left running on exit: {:?}",
        after_exit.state
    );
    // Still serving, with no gateway in front of it.
    assert_eq!(get(addr, "/health").status, 200);

    let gw2 = gateway_with_env(&cfg, NO_GPUS);
    let adopted = wait_ready(&gw2, model, Duration::from_secs(10));
    eprintln!(
        "{model}: fresh start to ready {} ms; adoption to ready {} ms",
        fresh.as_millis(),
        adopted.as_millis()
    );
    assert!(
        adopted < Duration::from_secs(5),
        "adoption took {adopted:?}"
    );
    assert_eq!(
        only_container(&docker, model),
        id,
        "the container was recreated instead of adopted"
    );
    let now = inspect(&docker, &id).expect("container");
    assert!(running(&now));
    assert_eq!(
        created_and_started(&now),
        created_and_started(&before),
        "the adopted container was restarted"
    );
    assert_eq!(
        model_entry(gw2.addr, model)["endpoints"],
        serde_json::json!([format!("http://{addr}")])
    );
    assert_served(&gw2, model);
}

#[test]
fn a_changed_spec_replaces_the_container_instead_of_adopting_it() {
    let Some(docker) = docker_or_skip() else {
        return;
    };
    let model = "dkg-changed";
    let image = sim_image();
    let _cleanup = Cleanup::new(&docker, model);

    let gw1 = gateway_with_env(
        &config(&docker_model(model, &image, 0, "preload = true")),
        NO_GPUS,
    );
    wait_ready(&gw1, model, Duration::from_secs(60));
    let old = only_container(&docker, model);
    let old_hash = label(&inspect(&docker, &old).unwrap(), HASH_LABEL).unwrap();
    stop_gateway(gw1);
    assert!(inspect(&docker, &old).is_some_and(|c| running(&c)));

    // Same model, different args, not preloaded: the stale container goes at start-up (it
    // would hold a GPU the gateway no longer accounts for), and a request starts a new one.
    let gw2 = gateway_with_env(&config(&docker_model(model, &image, 1, "")), NO_GPUS);
    assert!(
        eventually(Duration::from_secs(10), || inspect(&docker, &old).is_none()),
        "the container with the old spec was not removed; gateway stderr:\n{}",
        gw2.stderr()
    );
    assert_eq!(state(gw2.addr, model), "stopped");

    assert_served(&gw2, model);
    let new = only_container(&docker, model);
    assert_ne!(new, old, "the old container was adopted");
    let c = inspect(&docker, &new).unwrap();
    assert!(running(&c));
    let new_hash = label(&c, HASH_LABEL).unwrap();
    assert_ne!(new_hash, old_hash, "a changed spec must change the hash");
    let cmd = c.config.and_then(|cfg| cfg.cmd).unwrap_or_default();
    assert_eq!(cmd.last().map(String::as_str), Some("1"), "{cmd:?}");
    assert_eq!(state(gw2.addr, model), "ready");
}

#[test]
fn a_container_killed_from_outside_fails_the_model_and_the_next_request_restarts_it() {
    let Some(docker) = docker_or_skip() else {
        return;
    };
    let model = "dkg-crash";
    let image = sim_image();
    let _cleanup = Cleanup::new(&docker, model);
    let gw = gateway_with_env(
        &config(&docker_model(model, &image, 0, "preload = true")),
        NO_GPUS,
    );
    wait_ready(&gw, model, Duration::from_secs(60));
    let old = only_container(&docker, model);

    let killed = Instant::now();
    kill(&docker, &old);
    assert!(
        eventually(Duration::from_secs(3), || state(gw.addr, model) == "failed"),
        "the kill was not noticed within 3 s (state {}); gateway stderr:\n{}",
        state(gw.addr, model),
        gw.stderr()
    );
    eprintln!(
        "{model}: failed {} ms after docker kill",
        killed.elapsed().as_millis()
    );
    assert_eq!(
        model_entry(gw.addr, model)["endpoints"],
        serde_json::json!([]),
        "a failed model keeps no endpoint"
    );

    let restarted = Instant::now();
    assert_served(&gw, model);
    eprintln!(
        "{model}: restart (with backoff) + request took {} ms",
        restarted.elapsed().as_millis()
    );
    let new = only_container(&docker, model);
    assert_ne!(new, old, "the request was served without a new container");
    assert!(inspect(&docker, &new).is_some_and(|c| running(&c)));
    assert!(
        inspect(&docker, &old).is_none(),
        "the dead container was left behind"
    );
    assert_eq!(state(gw.addr, model), "ready");
}

#[test]
fn unload_stops_and_removes_the_container() {
    let Some(docker) = docker_or_skip() else {
        return;
    };
    let model = "dkg-unload";
    let image = sim_image();
    let _cleanup = Cleanup::new(&docker, model);
    let gw = gateway_with_env(
        &config(&docker_model(model, &image, 0, "preload = true")),
        NO_GPUS,
    );
    wait_ready(&gw, model, Duration::from_secs(60));
    let id = only_container(&docker, model);

    let started = Instant::now();
    let resp = post_json(
        gw.addr,
        &format!("/gateway/models/{model}/unload"),
        &serde_json::json!({}),
    );
    let took = started.elapsed();
    eprintln!("{model}: unload took {} ms", took.as_millis());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["state"], "stopped", "{}", resp.text());
    assert!(
        took < Duration::from_secs(5),
        "unload took {took:?} (init: true should make the stop fast)"
    );
    assert!(
        inspect(&docker, &id).is_none(),
        "the container still exists after unload"
    );
    assert!(containers(&docker, model).is_empty());
    let entry = model_entry(gw.addr, model);
    assert_eq!(entry["state"], "stopped", "{entry}");
    assert_eq!(entry["endpoints"], serde_json::json!([]), "{entry}");

    // A request after the unload starts it again, in a new container.
    assert_served(&gw, model);
    assert_ne!(only_container(&docker, model), id);
}

#[test]
fn a_missing_engine_gives_a_prompt_503_that_names_docker() {
    // Needs no engine: the gateway is pointed at a socket that does not exist.
    let model = "dkg-no-engine";
    let cfg = format!(
        "{GATEWAY_HEAD}[docker]\nhost = \"unix:///nonexistent.sock\"\n{}",
        docker_model(model, "vllm-gateway-sim:never-pulled", 0, "")
    );
    let gw = gateway_with_env(&cfg, NO_GPUS);
    let started = Instant::now();
    let resp = ask(gw.addr, model);
    let took = started.elapsed();
    eprintln!(
        "{model}: {} after {} ms: {}",
        resp.status,
        took.as_millis(),
        resp.text()
    );
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.error_code(), "model_unavailable", "{}", resp.text());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(state(gw.addr, model), "failed");
    let stderr = gw.stderr();
    assert!(
        stderr.contains("Docker"),
        "the gateway's log does not mention Docker:\n{stderr}"
    );
}

#[test]
fn a_container_that_dies_while_starting_fails_its_waiters_at_once() {
    let Some(docker) = docker_or_skip() else {
        return;
    };
    let model = "dkg-dies";
    let image = sim_image();
    let _cleanup = Cleanup::new(&docker, model);
    // The simulator answers /health with 503 for 30 s: the model stays `starting`.
    let spec = docker_model(model, &image, 0, "").replace(
        r#""--ttft-ms", "0"]"#,
        r#""--ttft-ms", "0", "--startup-ms", "30000"]"#,
    );
    let gw = gateway_with_env(&config(&spec), NO_GPUS);
    let addr = gw.addr;
    let waiter = std::thread::spawn(move || ask(addr, "dkg-dies"));
    assert!(
        eventually(Duration::from_secs(30), || !containers(&docker, model)
            .is_empty()
            && state(gw.addr, model) == "starting"),
        "the container never started; gateway stderr:\n{}",
        gw.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    kill(&docker, &only_container(&docker, model));
    let resp = waiter.join().unwrap();
    let answered = killed.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.error_code(), "model_unavailable");
    // Not the 60 s startup timeout: the exit is seen while health is still failing.
    assert!(
        answered < Duration::from_secs(5),
        "answered {answered:?} after the kill"
    );
    eprintln!(
        "{model}: waiter answered {} ms after the kill",
        answered.as_millis()
    );
}
