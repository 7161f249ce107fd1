//! The model lifecycle through the process runtime and the built-in simulator: least recently
//! used eviction, pinned and busy models never evicted, waiting for VRAM and its 503
//! `insufficient_vram`, a crashed server marked `failed` and restarted by the next request,
//! idle unloads, the admin load/unload endpoints, the VRAM gauges, and cold-start and swap
//! latency.

mod common;
use common::*;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn sim_model(name: &str, startup_ms: u64, extra: &str) -> String {
    process_sim_model(name, startup_ms, "", extra)
}

/// `[gpus]` with one GPU of `total_mib`.
fn gpus(total_mib: u64) -> String {
    format!("[gpus]\nvram_mib = [{total_mib}]\n")
}

/// Every model's state, as `/gateway/models` shows it.
fn states(gw: SocketAddr) -> Vec<(String, String)> {
    get(gw, "/gateway/models")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_states(gw: &Proc, want: &[(&str, &str)]) {
    let got = states(gw.addr);
    for (name, state) in want {
        let actual = got
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_str())
            .unwrap_or("<missing>");
        assert_eq!(
            actual,
            *state,
            "model {name}: all states {got:?}\ngateway log:\n{}",
            gw.stderr()
        );
    }
}

fn wait_state(gw: &Proc, name: &str, state: &str, timeout: Duration) {
    assert!(
        eventually(timeout, || model_field(gw.addr, name, "state") == state),
        "{name} never became {state} (now {}); gateway log:\n{}",
        model_field(gw.addr, name, "state"),
        gw.stderr()
    );
}

fn ok_chat(gw: &Proc, model: &str) -> Response {
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat(model, 1, false));
    assert_eq!(
        resp.status,
        200,
        "{model}: {}\ngateway log:\n{}",
        resp.text(),
        gw.stderr()
    );
    resp
}

fn evictions(gw: SocketAddr, model: &str) -> f64 {
    metric(gw, &format!("gateway_evictions_total{{model=\"{model}\"}}"))
}

fn starts(gw: SocketAddr, model: &str) -> f64 {
    metric(
        gw,
        &format!("gateway_model_starts_total{{model=\"{model}\"}}"),
    )
}

fn vram_used(gw: SocketAddr) -> f64 {
    metric(gw, "gateway_vram_used_mib{gpu=\"0\"}")
}

fn port_closed(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()
}

fn admin(gw: SocketAddr, path: &str, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    request(gw, "POST", path, &headers, b"")
}

#[test]
fn least_recently_used_idle_model_is_evicted() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}{}{}",
        gpus(30_000),
        sim_model("a", 0, "vram_mib = 12000"),
        sim_model("b", 0, "vram_mib = 12000"),
        sim_model("c", 0, "vram_mib = 12000"),
    ));
    assert_states(&gw, &[("a", "stopped"), ("b", "stopped"), ("c", "stopped")]);

    ok_chat(&gw, "a");
    assert_states(&gw, &[("a", "ready"), ("b", "stopped"), ("c", "stopped")]);
    std::thread::sleep(Duration::from_millis(30));
    ok_chat(&gw, "b");
    assert_states(&gw, &[("a", "ready"), ("b", "ready"), ("c", "stopped")]);
    assert_eq!(vram_used(gw.addr), 24_000.0);

    // a used again: b is now the least recently used.
    std::thread::sleep(Duration::from_millis(30));
    ok_chat(&gw, "a");
    std::thread::sleep(Duration::from_millis(30));
    let resp = ok_chat(&gw, "c");
    assert_eq!(resp.json()["model"], "up-c");
    assert_states(&gw, &[("a", "ready"), ("b", "stopped"), ("c", "ready")]);
    assert_eq!(evictions(gw.addr, "a"), 0.0);
    assert_eq!(evictions(gw.addr, "b"), 1.0);
    assert_eq!(evictions(gw.addr, "c"), 0.0);
    assert_eq!(vram_used(gw.addr), 24_000.0);

    // a was last used before c: a goes now.
    std::thread::sleep(Duration::from_millis(30));
    ok_chat(&gw, "b");
    assert_states(&gw, &[("a", "stopped"), ("b", "ready"), ("c", "ready")]);
    assert_eq!(evictions(gw.addr, "a"), 1.0);
    assert_eq!(evictions(gw.addr, "b"), 1.0);
    assert_eq!(evictions(gw.addr, "c"), 0.0);
    assert_eq!(starts(gw.addr, "a"), 1.0);
    assert_eq!(starts(gw.addr, "b"), 2.0);
    assert_eq!(starts(gw.addr, "c"), 1.0);
    assert_eq!(vram_used(gw.addr), 24_000.0);
    for m in ["a", "b", "c"] {
        assert!(counters_settle(gw.addr, m), "{m}");
    }
}

#[test]
fn pinned_model_is_never_evicted() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}{}",
        gpus(20_000),
        sim_model("p", 0, "vram_mib = 12000\npinned = true"),
        sim_model("x", 0, "vram_mib = 12000")
            .replace("startup_timeout_s = 20", "startup_timeout_s = 2"),
    ));
    wait_state(&gw, "p", "ready", Duration::from_secs(10));
    assert_eq!(model_field(gw.addr, "p", "pinned"), true);
    // p has never served a request, so it is the least recently used: still not a victim.
    let started = Instant::now();
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat("x", 1, false));
    let waited = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.error_code(), "insufficient_vram", "{}", resp.text());
    assert!(
        waited >= Duration::from_millis(1800) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    assert_states(&gw, &[("p", "ready")]);
    assert_eq!(evictions(gw.addr, "p"), 0.0);
    assert_eq!(starts(gw.addr, "p"), 1.0);
    assert_eq!(starts(gw.addr, "x"), 0.0);
    wait_state(&gw, "x", "stopped", Duration::from_secs(3));
    assert_eq!(vram_used(gw.addr), 12_000.0);
    assert!(counters_settle(gw.addr, "p"));
    assert!(counters_settle(gw.addr, "x"));
    // p still serves.
    ok_chat(&gw, "p");
}

#[test]
fn busy_model_is_not_evicted_until_its_stream_ends() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}{}",
        gpus(20_000),
        process_sim_model(
            "a",
            0,
            r#", "--tokens-per-s", "5""#,
            "vram_mib = 12000\npreload = true"
        ),
        sim_model("b", 0, "vram_mib = 12000"),
    ));
    wait_state(&gw, "a", "ready", Duration::from_secs(10));
    let addr = gw.addr;
    // 40 tokens at 5 tokens/s: about 8 s of stream.
    let stream = std::thread::spawn(move || {
        let events = stream_events(addr, &chat("a", 40, true));
        (events, Instant::now())
    });
    assert!(
        eventually(Duration::from_secs(5), || metric(
            gw.addr,
            "gateway_in_flight{model=\"a\"}"
        ) == 1.0),
        "the stream never went in flight"
    );
    let waiter = std::thread::spawn(move || {
        let resp = post_json(addr, "/v1/chat/completions", &chat("b", 1, false));
        (resp, Instant::now())
    });
    assert!(
        eventually(Duration::from_secs(3), || metric(
            gw.addr,
            "gateway_queue_depth{model=\"b\"}"
        ) == 1.0),
        "b's request was not counted as queued"
    );
    // While the stream flows: b waits as `starting`, a keeps running and is not evicted.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        assert_states(&gw, &[("a", "ready"), ("b", "starting")]);
        assert_eq!(evictions(gw.addr, "a"), 0.0);
        assert_eq!(metric(gw.addr, "gateway_queue_depth{model=\"b\"}"), 1.0);
        assert_eq!(metric(gw.addr, "gateway_in_flight{model=\"a\"}"), 1.0);
        assert_eq!(vram_used(gw.addr), 12_000.0);
    }
    assert!(!stream.is_finished(), "the stream ended early");
    assert!(!waiter.is_finished(), "b's request did not wait");

    let (events, stream_done) = stream.join().unwrap();
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("[DONE]"),
        "stream cut: {} events",
        events.len()
    );
    assert_eq!(events.len(), 41, "40 tokens and [DONE]");
    let (resp, answered) = waiter.join().unwrap();
    assert_eq!(resp.status, 200, "{}\n{}", resp.text(), gw.stderr());
    assert_eq!(resp.json()["model"], "up-b");
    assert!(answered >= stream_done - Duration::from_millis(100));
    assert_states(&gw, &[("a", "stopped"), ("b", "ready")]);
    assert_eq!(evictions(gw.addr, "a"), 1.0);
    assert_eq!(evictions(gw.addr, "b"), 0.0);
    assert_eq!(vram_used(gw.addr), 12_000.0);
    assert!(counters_settle(gw.addr, "a"));
    assert!(counters_settle(gw.addr, "b"));
}

#[test]
fn waiting_for_vram_held_by_a_busy_model_gives_503_insufficient_vram() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}{}",
        gpus(20_000),
        process_sim_model(
            "a",
            0,
            r#", "--tokens-per-s", "5""#,
            "vram_mib = 12000\npreload = true"
        ),
        sim_model("w", 0, "vram_mib = 12000")
            .replace("startup_timeout_s = 20", "startup_timeout_s = 2"),
    ));
    wait_state(&gw, "a", "ready", Duration::from_secs(10));
    // A long stream (100 tokens at 5/s: 20 s) keeps a busy.
    let stream = open_stream(gw.addr, &chat("a", 100, true));
    assert_eq!(metric(gw.addr, "gateway_in_flight{model=\"a\"}"), 1.0);

    let started = Instant::now();
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat("w", 1, false));
    let waited = started.elapsed();
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(resp.error_code(), "insufficient_vram", "{}", resp.text());
    assert!(
        waited >= Duration::from_millis(1800) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_states(&gw, &[("a", "ready")]);
    assert_eq!(evictions(gw.addr, "a"), 0.0);
    assert_eq!(starts(gw.addr, "w"), 0.0);
    assert!(counters_settle(gw.addr, "w"));
    wait_state(&gw, "w", "stopped", Duration::from_secs(3));

    // The client drops the stream: a's counters come back to zero and a stays ready.
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || counters_zero(gw.addr, "a")),
        "a's counters did not return to zero after the client left"
    );
    assert!(counters_settle(gw.addr, "w"));
    assert_states(&gw, &[("a", "ready"), ("w", "stopped")]);
    assert_eq!(vram_used(gw.addr), 12_000.0);
}

#[test]
fn crashed_server_becomes_failed_and_the_next_request_restarts_it() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}",
        gpus(30_000),
        sim_model("m", 0, "vram_mib = 12000"),
    ));
    ok_chat(&gw, "m");
    assert_states(&gw, &[("m", "ready")]);
    let sim = endpoint(gw.addr, "m");
    let pid = sim_pid(sim).unwrap_or_else(|| panic!("no simulator process listens on {sim}"));
    // SAFETY: a simulator child of the gateway that this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    assert!(
        eventually(Duration::from_secs(3), || model_field(
            gw.addr, "m", "state"
        ) == "failed"),
        "m is not failed after its server was killed: {}\n{}",
        model_field(gw.addr, "m", "state"),
        gw.stderr()
    );
    assert_eq!(
        metric(gw.addr, "gateway_model_state{model=\"m\",state=\"failed\"}"),
        1.0
    );
    assert_eq!(
        metric(gw.addr, "gateway_model_state{model=\"m\",state=\"ready\"}"),
        0.0
    );
    assert_eq!(
        model_field(gw.addr, "m", "endpoints"),
        serde_json::json!([])
    );
    assert_eq!(vram_used(gw.addr), 0.0);

    let started = Instant::now();
    let resp = ok_chat(&gw, "m");
    eprintln!("restart after crash: {} ms", started.elapsed().as_millis());
    assert_eq!(resp.json()["model"], "up-m");
    assert_states(&gw, &[("m", "ready")]);
    assert_eq!(starts(gw.addr, "m"), 2.0);
    assert_eq!(
        metric(gw.addr, "gateway_model_state{model=\"m\",state=\"ready\"}"),
        1.0
    );
    assert_eq!(get(endpoint(gw.addr, "m"), "/health").status, 200);
    assert!(counters_settle(gw.addr, "m"));
}

#[test]
fn idle_model_is_unloaded_and_cold_starts_again() {
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}",
        gpus(30_000),
        sim_model("m", 0, "vram_mib = 12000\nidle_unload_s = 1"),
    ));
    ok_chat(&gw, "m");
    let sim = endpoint(gw.addr, "m");
    assert_eq!(vram_used(gw.addr), 12_000.0);
    let used_at = Instant::now();
    wait_state(&gw, "m", "stopped", Duration::from_secs(3));
    assert!(
        used_at.elapsed() >= Duration::from_millis(900),
        "unloaded after {:?}",
        used_at.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(3), || port_closed(sim)),
        "the simulator still listens on {sim} after the unload"
    );
    assert_eq!(vram_used(gw.addr), 0.0);
    assert_eq!(evictions(gw.addr, "m"), 0.0);

    ok_chat(&gw, "m");
    assert_states(&gw, &[("m", "ready")]);
    assert_eq!(starts(gw.addr, "m"), 2.0);
    assert_eq!(vram_used(gw.addr), 12_000.0);
    assert!(counters_settle(gw.addr, "m"));
}

#[test]
fn admin_load_and_unload() {
    let upstream = sim("up-s", 0, 1000);
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}admin_token = \"adm\"\n{}{}{}",
        gpus(30_000),
        sim_model("m", 0, "vram_mib = 12000"),
        static_model("s", "up-s", upstream.addr, ""),
    ));
    assert_states(&gw, &[("m", "stopped"), ("s", "ready")]);

    let resp = admin(gw.addr, "/gateway/models/m/load", None);
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_eq!(resp.error_code(), "unauthorized");
    let resp = admin(gw.addr, "/gateway/models/m/load", Some("wrong"));
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_states(&gw, &[("m", "stopped")]);

    let resp = admin(gw.addr, "/gateway/models/m/load", Some("adm"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json(),
        serde_json::json!({"name": "m", "state": "ready"})
    );
    assert_states(&gw, &[("m", "ready")]);
    let sim = endpoint(gw.addr, "m");
    assert_eq!(get(sim, "/health").status, 200);
    assert_eq!(vram_used(gw.addr), 12_000.0);
    // Loading a ready model again is a no-op.
    let resp = admin(gw.addr, "/gateway/models/m/load", Some("adm"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["state"], "ready");
    assert_eq!(starts(gw.addr, "m"), 1.0);
    ok_chat(&gw, "m");

    let resp = admin(gw.addr, "/gateway/models/m/unload", None);
    assert_eq!(resp.status, 401, "{}", resp.text());
    let resp = admin(gw.addr, "/gateway/models/m/unload", Some("adm"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json(),
        serde_json::json!({"name": "m", "state": "stopped"})
    );
    assert_states(&gw, &[("m", "stopped")]);
    assert!(
        eventually(Duration::from_secs(3), || port_closed(sim)),
        "the simulator still listens on {sim} after the unload"
    );
    assert_eq!(vram_used(gw.addr), 0.0);
    assert_eq!(evictions(gw.addr, "m"), 0.0);

    for action in ["load", "unload"] {
        let resp = admin(gw.addr, &format!("/gateway/models/s/{action}"), Some("adm"));
        assert_eq!(resp.status, 400, "{action}: {}", resp.text());
        assert_eq!(resp.error_code(), "invalid_request", "{}", resp.text());
        let resp = admin(
            gw.addr,
            &format!("/gateway/models/nope/{action}"),
            Some("adm"),
        );
        assert_eq!(resp.status, 404, "{action}: {}", resp.text());
        assert_eq!(resp.error_code(), "model_not_found", "{}", resp.text());
    }
    assert_states(&gw, &[("m", "stopped"), ("s", "ready")]);
}

#[test]
fn vram_gauges_follow_running_models() {
    let upstream = sim("up-s", 0, 1000);
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}{}",
        gpus(30_000),
        sim_model("m", 0, "vram_mib = 12000"),
        static_model("s", "up-s", upstream.addr, "vram_mib = 5000"),
    ));
    assert_eq!(
        metric(gw.addr, "gateway_vram_total_mib{gpu=\"0\"}"),
        30_000.0
    );
    // A static model holds nothing in the accounting.
    assert_eq!(vram_used(gw.addr), 0.0);
    ok_chat(&gw, "s");
    assert_eq!(vram_used(gw.addr), 0.0);
    ok_chat(&gw, "m");
    assert_eq!(vram_used(gw.addr), 12_000.0);
    assert_eq!(
        metric(gw.addr, "gateway_vram_total_mib{gpu=\"0\"}"),
        30_000.0
    );
    assert_eq!(model_field(gw.addr, "m", "vram_mib"), 12_000);
    assert_eq!(model_field(gw.addr, "s", "vram_mib"), 0);
}

#[test]
fn vram_gauges_are_there_as_soon_as_the_gateway_listens() {
    // A Docker socket that accepts and never answers holds the control plane in its Docker
    // connect (5 s) before its first publish: the gauges must be there all the same once the
    // gateway announces its address (they were missing until that publish before 634f7cf).
    let dir = temp_dir("docker-sock");
    let sock = dir.join("docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let gw = gateway(&format!(
        r#"{GATEWAY_HEAD}{}
[docker]
host = "{}"

[[models]]
name = "d"
runtime = "docker"
image = "never-pulled:latest"
container_port = 8000
vram_mib = 1000
"#,
        gpus(30_000),
        sock.display()
    ));
    let page = get(gw.addr, "/metrics").text();
    assert_eq!(
        metric_in(&page, "gateway_vram_total_mib{gpu=\"0\"}"),
        Some(30_000.0),
        "{page}"
    );
    assert_eq!(
        metric_in(&page, "gateway_vram_used_mib{gpu=\"0\"}"),
        Some(0.0),
        "{page}"
    );
}

#[test]
fn cold_start_and_swap_latency() {
    const STARTUP_MS: u64 = 500;
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}{}{}{}",
        gpus(20_000),
        sim_model("cold", STARTUP_MS, ""),
        sim_model("a", 0, "vram_mib = 12000\npreload = true"),
        sim_model("b", STARTUP_MS, "vram_mib = 12000"),
    ));
    wait_state(&gw, "a", "ready", Duration::from_secs(10));

    let started = Instant::now();
    ok_chat(&gw, "cold");
    let cold = started.elapsed();
    eprintln!("cold start: {} ms", cold.as_millis());
    assert!(
        cold >= Duration::from_millis(STARTUP_MS),
        "faster than the simulator's start-up: {cold:?}"
    );
    assert!(
        cold < Duration::from_millis(STARTUP_MS + 400),
        "cold start took {cold:?}"
    );

    // a is ready and idle; b needs its room.
    assert_states(&gw, &[("a", "ready"), ("b", "stopped")]);
    let started = Instant::now();
    ok_chat(&gw, "b");
    let swap = started.elapsed();
    eprintln!("swap: {} ms", swap.as_millis());
    assert_states(&gw, &[("a", "stopped"), ("b", "ready")]);
    assert_eq!(evictions(gw.addr, "a"), 1.0);
    assert!(
        swap >= Duration::from_millis(STARTUP_MS),
        "faster than the simulator's start-up: {swap:?}"
    );
    assert!(
        swap < Duration::from_millis(STARTUP_MS + 600),
        "swap took {swap:?}"
    );
}
