//! The process runtime with the built-in simulator: start-up of preloaded models, cold starts
//! on demand (counted as queued), failures reported at once with the server's own output, the
//! startup timeout, and children stopped when the gateway exits.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn sim_model(name: &str, startup_ms: u64, extra: &str) -> String {
    process_sim_model(name, startup_ms, "", extra)
}

#[test]
fn preloaded_model_starts_with_the_gateway_and_others_stay_stopped() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}",
        sim_model("pre", 0, "preload = true"),
        sim_model("lazy", 0, "")
    ));
    assert!(
        eventually(Duration::from_secs(10), || model_field(
            gw.addr, "pre", "state"
        ) == "ready"),
        "preloaded model never became ready:\n{}",
        gw.stderr()
    );
    assert_eq!(model_field(gw.addr, "lazy", "state"), "stopped");
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat("pre", 2, false));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "up-pre");
    assert!(
        model_field(gw.addr, "pre", "last_used_ms")
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn cold_start_on_request_counts_as_queued() {
    let gw = gateway(&format!("{GATEWAY_HEAD}{}", sim_model("cold", 1200, "")));
    assert_eq!(model_field(gw.addr, "cold", "state"), "stopped");
    let addr = gw.addr;
    let started = Instant::now();
    let request = std::thread::spawn(move || {
        post_json(addr, "/v1/chat/completions", &chat("cold", 1, false))
    });
    assert!(
        eventually(Duration::from_secs(5), || {
            metric(gw.addr, "gateway_queue_depth{model=\"cold\"}") == 1.0
                && model_field(gw.addr, "cold", "state") == "starting"
        }),
        "the waiting request was not counted as queued while the model started"
    );
    let resp = request.join().unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    // The simulator's --startup-ms is the floor of a cold start.
    assert!(started.elapsed() >= Duration::from_millis(1100));
    assert_eq!(model_field(gw.addr, "cold", "state"), "ready");
    assert_eq!(
        metric(gw.addr, "gateway_model_starts_total{model=\"cold\"}"),
        1.0
    );
    assert!(counters_settle(gw.addr, "cold"));
}

#[test]
fn server_exiting_while_starting_fails_waiters_at_once_with_its_output() {
    let config = format!(
        r#"{GATEWAY_HEAD}
[[models]]
name = "broken"
runtime = "process"
command = ["sh", "-c", "echo 'CUDA out of memory on port {{port}}' >&2; sleep 0.3; exit 3"]
startup_timeout_s = 60
"#
    );
    let gw = gateway(&config);
    let started = Instant::now();
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat("broken", 1, false));
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.error_code(), "model_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(3), || gw
            .stderr()
            .contains("CUDA out of memory")),
        "the server's own output is not in the gateway log:\n{}",
        gw.stderr()
    );
    assert_eq!(model_field(gw.addr, "broken", "state"), "failed");
    assert!(counters_settle(gw.addr, "broken"));
}

#[test]
fn startup_timeout_gives_503() {
    let config = format!(
        "{GATEWAY_HEAD}{}",
        sim_model("slow", 30_000, "").replace("startup_timeout_s = 20", "startup_timeout_s = 1")
    );
    let gw = gateway(&config);
    let started = Instant::now();
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat("slow", 1, false));
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.error_code(), "model_unavailable");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    assert!(counters_settle(gw.addr, "slow"));
}

#[test]
fn children_are_stopped_when_the_gateway_exits() {
    let mut gw = gateway(&format!(
        "{GATEWAY_HEAD}{}",
        sim_model("pre", 0, "preload = true")
    ));
    assert!(eventually(Duration::from_secs(10), || model_field(
        gw.addr, "pre", "state"
    ) == "ready"));
    let endpoint = model_field(gw.addr, "pre", "endpoints")[0]
        .as_str()
        .unwrap()
        .to_string();
    let sim_addr: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    assert_eq!(get(sim_addr, "/health").status, 200);
    gw.signal(libc::SIGTERM);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(15)),
        Some(Some(0)),
        "gateway did not exit 0"
    );
    assert!(
        eventually(Duration::from_secs(3), || std::net::TcpStream::connect(
            sim_addr
        )
        .is_err()),
        "the simulator child still listens after the gateway exited"
    );
}

#[test]
fn default_config_serves_both_simulated_models() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.toml");
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["--config", config])
        .env("GATEWAY_LISTEN", "127.0.0.1:0");
    let gw = Proc::spawn(cmd);
    for model in ["sim-chat", "chat", "sim-code"] {
        let resp = post_json(gw.addr, "/v1/chat/completions", &chat(model, 2, false));
        assert_eq!(resp.status, 200, "{model}: {}", resp.text());
    }
    let events = stream_events(gw.addr, &chat("sim-chat", 3, true));
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
    assert_eq!(events.len(), 4);
}

#[test]
fn shipped_configs_pass_check() {
    for file in [
        "gateway.toml",
        "examples/docker-gpu.toml",
        "examples/process-vllm.toml",
    ] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(bin())
            .args(["check", "--config", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
