//! The Docker runtime (`controlplane::docker`) through its public API against the real engine,
//! with the simulator in a `FROM scratch` image: launch (labels, published port, health),
//! spec hashing, adoption, crash watching, logs and stop. Skipped when there is no engine unless
//! `VLLM_GATEWAY_REQUIRE_DOCKER` is set. Each test uses its own model name, so they run in
//! parallel, and a `Cleanup` guard removes its containers even when it fails.

#[path = "common/docker.rs"]
mod docker_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::query_parameters::{KillContainerOptionsBuilder, StopContainerOptionsBuilder};
use bollard::Docker;
use controlplane::config::{ModelSpec, RuntimeSpec};
use controlplane::docker::{Container, DockerRuntime, HASH_LABEL, MODEL_LABEL};
use controlplane::ControlError;
use docker_support::{docker_or_skip, sim_args, sim_image, Cleanup, SIM_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// A docker model running the simulator. `gpus = [0]`, so a launch would ask for an nvidia
/// device unless `VLLM_GATEWAY_DOCKER_GPUS=0` turns that off (this machine has no GPU).
fn sim_spec(name: &str, image: &str) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        aliases: Vec::new(),
        upstream_model: name.to_string(),
        runtime: RuntimeSpec::Docker {
            image: image.to_string(),
            args: sim_args(name),
            container_port: SIM_PORT,
            env: BTreeMap::from([("SIM_PORT_SEEN".to_string(), "port={port}".to_string())]),
        },
        vram_mib: 1024,
        gpus: vec![0],
        pinned: false,
        preload: false,
        idle_unload: None,
        startup_timeout: Duration::from_secs(30),
        health_path: "/health".to_string(),
        max_concurrent: 4,
        max_queue_size: 4,
    }
}

fn set_args(spec: &mut ModelSpec, f: impl FnOnce(&mut Vec<String>)) {
    match &mut spec.runtime {
        RuntimeSpec::Docker { args, .. } => f(args),
        _ => unreachable!(),
    }
}

struct Env {
    docker: Docker,
    runtime: DockerRuntime,
    image: String,
    _cleanup: Cleanup,
}

/// The engine, the image and a runtime, or `None` to skip. Removes `model`'s leftovers now and
/// its containers when the returned value drops.
async fn setup(model: &str) -> Option<Env> {
    // No GPU here: the daemon would reject nvidia device requests.
    std::env::set_var("VLLM_GATEWAY_DOCKER_GPUS", "0");
    let docker = docker_or_skip()?;
    let image = sim_image();
    let cleanup = Cleanup::new(&docker, model);
    let runtime = DockerRuntime::connect(None, log())
        .await
        .expect("connect to the engine");
    Some(Env {
        docker,
        runtime,
        image,
        _cleanup: cleanup,
    })
}

/// The status code of `GET path`, or `None` when the connection fails or closes early.
async fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// Waits (up to `within`) for `GET /health` to answer 200; returns how long it took.
async fn wait_healthy(addr: SocketAddr, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if get_status(addr, "/health").await == Some(200) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/health at {addr} did not answer 200 within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exists(docker: &Docker, id: &str) -> bool {
    match docker.inspect_container(id, None).await {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(e) => panic!("inspect {id}: {e}"),
    }
}

async fn launch(env: &Env, spec: &ModelSpec) -> Container {
    let started = Instant::now();
    let container = env
        .runtime
        .launch(spec)
        .await
        .unwrap_or_else(|e| panic!("launch {}: {e}", spec.name));
    eprintln!(
        "launch of {} took {} ms",
        spec.name,
        started.elapsed().as_millis()
    );
    container
}

#[tokio::test]
async fn launch_starts_a_labelled_container_that_serves_health() {
    let model = "drt-launch";
    let Some(env) = setup(model).await else {
        return;
    };
    let spec = sim_spec(model, &env.image);
    let c = launch(&env, &spec).await;
    assert!(c.addr.ip().is_loopback(), "{c:?}");
    assert_ne!(c.addr.port(), 0);

    let took = wait_healthy(c.addr, Duration::from_secs(5)).await;
    eprintln!(
        "{model}: healthy {} ms after launch returned",
        took.as_millis()
    );

    let inspect = env.docker.inspect_container(&c.id, None).await.unwrap();
    assert_eq!(inspect.name.as_deref(), Some("/vllm-gateway-drt-launch"));
    let config = inspect.config.unwrap();
    let labels = config.labels.unwrap();
    assert_eq!(labels[MODEL_LABEL], model);
    assert_eq!(labels[HASH_LABEL], DockerRuntime::spec_hash(&spec));
    // `{port}` is the container port inside the container, in args and env values alike.
    assert_eq!(
        config.cmd.unwrap(),
        vec![
            "sim",
            "--listen",
            "0.0.0.0:8000",
            "--model",
            model,
            "--ttft-ms",
            "0"
        ]
    );
    assert!(
        config
            .env
            .unwrap()
            .contains(&"SIM_PORT_SEEN=port=8000".to_string()),
        "env not substituted"
    );
    let host = inspect.host_config.unwrap();
    assert_eq!(host.init, Some(true));
    assert!(host.device_requests.unwrap_or_default().is_empty());
    let binding = &host.port_bindings.unwrap()["8000/tcp"].clone().unwrap()[0];
    assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn spec_hash_is_stable_and_tracks_image_args_and_env() {
    // Pure: needs no engine.
    let base = sim_spec("drt-hash", "img:1");
    let hash = DockerRuntime::spec_hash(&base);
    assert!(
        hash.len() >= 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{hash}"
    );
    assert_eq!(
        hash,
        DockerRuntime::spec_hash(&sim_spec("drt-hash", "img:1"))
    );

    // Limits and VRAM do not define the container.
    let mut same = base.clone();
    same.vram_mib = 1;
    same.max_concurrent = 99;
    same.max_queue_size = 99;
    same.pinned = true;
    same.startup_timeout = Duration::from_secs(1);
    assert_eq!(hash, DockerRuntime::spec_hash(&same));

    let mut args = base.clone();
    set_args(&mut args, |a| a.push("--tokens-per-s=5".into()));
    let image = sim_spec("drt-hash", "img:2");
    let mut env = base.clone();
    if let RuntimeSpec::Docker { env, .. } = &mut env.runtime {
        env.insert("HF_TOKEN".into(), "x".into());
    }
    let mut port = base.clone();
    if let RuntimeSpec::Docker { container_port, .. } = &mut port.runtime {
        *container_port = 9000;
    }
    let mut gpus = base.clone();
    gpus.gpus = vec![1];
    let name = sim_spec("drt-hash-2", "img:1");
    let all = [
        hash.clone(),
        DockerRuntime::spec_hash(&args),
        DockerRuntime::spec_hash(&image),
        DockerRuntime::spec_hash(&env),
        DockerRuntime::spec_hash(&port),
        DockerRuntime::spec_hash(&gpus),
        DockerRuntime::spec_hash(&name),
    ];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b, "two different specs hash the same");
        }
    }
}

#[tokio::test]
async fn adopt_keeps_a_matching_container_and_removes_a_changed_one() {
    let model = "drt-adopt";
    let Some(env) = setup(model).await else {
        return;
    };
    let spec = sim_spec(model, &env.image);
    let c = launch(&env, &spec).await;
    wait_healthy(c.addr, Duration::from_secs(5)).await;

    let started = Instant::now();
    let adopted = env.runtime.adopt(&spec).await.expect("adopt");
    eprintln!("adopt (match) took {} ms", started.elapsed().as_millis());
    assert_eq!(
        adopted.as_ref(),
        Some(&c),
        "the running container is adopted as is"
    );
    assert_eq!(get_status(c.addr, "/health").await, Some(200));

    // A changed spec: the old container is not adoptable and is removed.
    let mut changed = spec.clone();
    set_args(&mut changed, |a| a.push("--tokens-per-s=1000".into()));
    let started = Instant::now();
    let adopted = env.runtime.adopt(&changed).await.expect("adopt");
    eprintln!(
        "adopt (changed, remove) took {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(adopted, None);
    assert!(
        !exists(&env.docker, &c.id).await,
        "stale container was not removed"
    );

    // Nothing left: nothing to adopt.
    assert_eq!(env.runtime.adopt(&spec).await.expect("adopt"), None);
}

#[tokio::test]
async fn adopt_removes_a_stopped_container_with_the_same_spec() {
    let model = "drt-adopt-stopped";
    let Some(env) = setup(model).await else {
        return;
    };
    let spec = sim_spec(model, &env.image);
    let c = launch(&env, &spec).await;
    env.docker
        .stop_container(&c.id, Some(StopContainerOptionsBuilder::new().t(5).build()))
        .await
        .expect("stop from outside");
    assert!(exists(&env.docker, &c.id).await);
    assert_eq!(env.runtime.adopt(&spec).await.expect("adopt"), None);
    assert!(
        !exists(&env.docker, &c.id).await,
        "stopped container was not removed"
    );
}

#[tokio::test]
async fn wait_exit_reports_a_kill_from_outside_promptly() {
    let model = "drt-wait";
    let Some(env) = setup(model).await else {
        return;
    };
    let c = launch(&env, &sim_spec(model, &env.image)).await;
    wait_healthy(c.addr, Duration::from_secs(5)).await;

    let runtime = env.runtime.clone();
    let id = c.id.clone();
    let waiter = tokio::spawn(async move { runtime.wait_exit(&id).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "wait_exit resolved while the container ran"
    );

    let killed = Instant::now();
    env.docker
        .kill_container(
            &c.id,
            Some(KillContainerOptionsBuilder::new().signal("SIGKILL").build()),
        )
        .await
        .expect("kill from outside");
    let text = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("wait_exit did not resolve within 2 s of the kill")
        .unwrap();
    eprintln!(
        "wait_exit resolved {} ms after the kill: {text}",
        killed.elapsed().as_millis()
    );
    assert!(text.contains("exit"), "{text}");
    assert!(text.contains("137"), "the exit code is missing: {text}");
    assert!(!text.contains('\n'), "not one line: {text}");
}

#[tokio::test]
async fn wait_exit_resolves_when_the_container_is_removed() {
    let model = "drt-wait-removed";
    let Some(env) = setup(model).await else {
        return;
    };
    let c = launch(&env, &sim_spec(model, &env.image)).await;

    let runtime = env.runtime.clone();
    let id = c.id.clone();
    let waiter = tokio::spawn(async move { runtime.wait_exit(&id).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    docker_support::remove_model_containers(&env.docker, model);
    let text = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("wait_exit did not resolve within 2 s of the removal")
        .unwrap();
    assert!(
        text.contains("exit") || text.contains("no longer exists"),
        "{text}"
    );

    // A container that is already gone: at once.
    let started = Instant::now();
    let text = env.runtime.wait_exit(&c.id).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(text.contains("no longer exists"), "{text}");
}

#[tokio::test]
async fn stop_removes_the_container_quickly() {
    let model = "drt-stop";
    let Some(env) = setup(model).await else {
        return;
    };
    let c = launch(&env, &sim_spec(model, &env.image)).await;
    wait_healthy(c.addr, Duration::from_secs(5)).await;

    let started = Instant::now();
    env.runtime.stop(&c.id).await;
    let took = started.elapsed();
    eprintln!("stop took {} ms", took.as_millis());
    assert!(
        took < Duration::from_secs(3),
        "stop took {took:?} (init: true should make it fast)"
    );
    assert!(
        !exists(&env.docker, &c.id).await,
        "container still exists after stop"
    );
    assert_eq!(get_status(c.addr, "/health").await, None);

    // Stopping a vanished container is fine (logged, not an error).
    env.runtime.stop(&c.id).await;
}

#[tokio::test]
async fn logs_tail_has_the_listening_line() {
    let model = "drt-logs";
    let Some(env) = setup(model).await else {
        return;
    };
    let c = launch(&env, &sim_spec(model, &env.image)).await;
    wait_healthy(c.addr, Duration::from_secs(5)).await;
    let tail = env.runtime.logs_tail(&c.id, 20).await;
    assert!(tail.contains("listening on"), "{tail}");
    let last = env.runtime.logs_tail(&c.id, 1).await;
    assert_eq!(last.lines().count(), 1, "{last}");
}

#[tokio::test]
async fn launch_replaces_a_leftover_container_with_the_same_name() {
    let model = "drt-leftover";
    let Some(env) = setup(model).await else {
        return;
    };
    let spec = sim_spec(model, &env.image);
    let first = launch(&env, &spec).await;
    let second = launch(&env, &spec).await;
    assert_ne!(first.id, second.id);
    assert!(
        !exists(&env.docker, &first.id).await,
        "leftover not removed"
    );
    wait_healthy(second.addr, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn launch_of_a_missing_image_fails_clearly_and_leaves_nothing() {
    let model = "drt-no-image";
    let Some(env) = setup(model).await else {
        return;
    };
    let spec = sim_spec(model, "vllm-gateway-test-no-such-image:never");
    let err = env
        .runtime
        .launch(&spec)
        .await
        .expect_err("launch must fail");
    let text = err.to_string();
    assert!(
        text.contains("vllm-gateway-test-no-such-image:never"),
        "{text}"
    );
    assert_eq!(
        docker_support::remove_model_containers(&env.docker, model),
        0
    );
}

#[tokio::test]
async fn a_server_that_exits_at_once_is_reported_with_its_output() {
    let model = "drt-exits";
    let Some(env) = setup(model).await else {
        return;
    };
    let mut spec = sim_spec(model, &env.image);
    set_args(&mut spec, |a| {
        *a = vec!["sim".into(), "--no-such-flag".into()]
    });
    match env.runtime.launch(&spec).await {
        // Exited before launch looked: reported with its output, and removed.
        Err(ControlError::ExitedWhileStarting { status, tail, .. }) => {
            eprintln!("exited before launch returned: {status}");
            assert!(status.contains("exited with code"), "{status}");
            assert!(tail.contains("--no-such-flag"), "{tail}");
            assert_eq!(
                docker_support::remove_model_containers(&env.docker, model),
                0
            );
        }
        // Still running when launch looked: the watcher reports the exit.
        Ok(c) => {
            eprintln!("still running when launch returned");
            let text = tokio::time::timeout(Duration::from_secs(5), env.runtime.wait_exit(&c.id))
                .await
                .expect("wait_exit");
            assert!(text.contains("exited with code"), "{text}");
            let tail = env.runtime.logs_tail(&c.id, 20).await;
            assert!(tail.contains("--no-such-flag"), "{tail}");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[tokio::test]
async fn connect_fails_fast_without_an_engine() {
    for host in ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"] {
        let started = Instant::now();
        let result = DockerRuntime::connect(Some(host), log()).await;
        let err = result
            .err()
            .unwrap_or_else(|| panic!("connect to {host} succeeded"));
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "connect to {host} took {:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains("Docker engine"), "{err}");
    }
}
