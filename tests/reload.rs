//! Hot reload, access control on reload, and graceful shutdown, end to end: reloads under
//! load with no failed request, an invalid file changing nothing (API and file watch), a
//! Kubernetes-style `..data` symlink swap, a model removed or restarted while a stream is in
//! flight, limits applied at once, settings that need a restart, SIGHUP, the admin token on
//! `POST /gateway/reload`, and the SIGTERM drain.
//!
//! Where a test needs the exact diff that `POST /gateway/reload` answers, the config file is
//! reached through a symlink in a directory of its own (`unwatched`): the gateway watches the
//! directory of the path it was given, so edits of the target raise no file event there and
//! the API call is the only reload (a racing file-watch reload would answer an empty diff).

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// Start the gateway on a config file that the test keeps editing.
fn spawn_gateway(path: &Path) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(path);
    Proc::spawn(cmd)
}

/// A config file in a fresh directory: the path the gateway is given.
fn config_file(tag: &str, text: &str) -> PathBuf {
    let path = temp_dir(tag).join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A config the file watcher cannot see change: returns (the path for `--config`, a symlink
/// in its own directory; the real file, in another directory, to edit).
fn unwatched(tag: &str, text: &str) -> (PathBuf, PathBuf) {
    let real = temp_dir(&format!("{tag}-real")).join("real.toml");
    std::fs::write(&real, text).unwrap();
    let link = temp_dir(tag).join("gateway.toml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    (link, real)
}

/// Replace `path` atomically: write a temporary file next to it, then rename it over.
fn write_atomic(path: &Path, text: &str) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let tmp = path.with_extension(format!("tmp{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reload(gw: SocketAddr, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    request(gw, "POST", "/gateway/reload", &headers, b"")
}

/// `POST /gateway/reload` that must succeed; returns its JSON.
fn reload_ok(gw: &Proc) -> serde_json::Value {
    let resp = reload(gw.addr, None);
    assert_eq!(
        resp.status,
        200,
        "reload: {}\ngateway log:\n{}",
        resp.text(),
        gw.stderr()
    );
    let body = resp.json();
    assert_eq!(body["result"], "ok", "{body}");
    body
}

fn reloads(gw: SocketAddr, result: &str) -> f64 {
    metric(
        gw,
        &format!("gateway_config_reloads_total{{result=\"{result}\"}}"),
    )
}

fn requests_total(gw: SocketAddr, model: &str, code: u16) -> f64 {
    let page = get(gw, "/metrics").text();
    metric_in(
        &page,
        &format!("gateway_requests_total{{model=\"{model}\",code=\"{code}\"}}"),
    )
    .unwrap_or(0.0)
}

fn models(gw: SocketAddr) -> Vec<serde_json::Value> {
    get(gw, "/gateway/models")
        .json()
        .as_array()
        .unwrap()
        .clone()
}

fn model_names(gw: SocketAddr) -> Vec<String> {
    models(gw)
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

fn names(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// A process model on the simulator; `sim_args` is added to its command.
fn sim_model_args(name: &str, sim_args: &str, extra: &str) -> String {
    process_sim_model(name, 0, sim_args, extra)
}

fn chat_status(gw: SocketAddr, model: &str) -> Response {
    post_json(gw, CHAT, &chat(model, 2, false))
}

fn wait_ready(gw: &Proc, name: &str) {
    assert!(
        eventually(Duration::from_secs(20), || model_field(
            gw.addr, name, "state"
        ) == "ready"),
        "{name} never became ready; gateway log:\n{}",
        gw.stderr()
    );
}

/// A keep-alive client connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> std::io::Result<Response> {
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        self.reader
            .get_mut()
            .write_all(&raw_request(method, path, &[], &bytes))?;
        read_response(&mut self.reader)
    }

    /// Whether the server closed the connection (EOF, or a reset) within a second.
    fn is_closed(&mut self) -> bool {
        let _ = self
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)));
        let mut line = String::new();
        matches!(self.reader.read_line(&mut line), Ok(0) | Err(_)) && !line.starts_with("HTTP/")
    }
}

/// The content tokens and whether `[DONE]` came, from SSE `data:` payloads.
fn tokens_and_done(events: &[String]) -> (usize, bool) {
    let mut tokens = 0;
    let mut done = false;
    for data in events {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(data).unwrap_or_else(|e| panic!("bad SSE payload ({e}): {data}"));
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            tokens += 1;
        }
    }
    (tokens, done)
}

/// A streaming chat request read on a thread: the `data:` payloads and when the last came.
fn stream_in_background(
    gw: SocketAddr,
    model: &str,
    max_tokens: u64,
) -> std::thread::JoinHandle<(Vec<String>, Instant)> {
    let body = chat(model, max_tokens, true);
    std::thread::spawn(move || {
        let events = stream_events(gw, &body);
        let end = Instant::now();
        (events.into_iter().map(|(_, d)| d).collect(), end)
    })
}

/// A streaming chat for `model`, read up to its first token.
fn open_stream_for(gw: SocketAddr, model: &str, max_tokens: u64) -> BufReader<TcpStream> {
    open_stream(gw, &chat(model, max_tokens, true))
}

/// Read the rest of a stream opened by `open_stream_for`: the `data:` payloads after the first
/// one. Stops at `[DONE]`, EOF or an error (a cut stream).
fn read_rest(reader: &mut BufReader<TcpStream>) -> Vec<String> {
    let mut events = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return events,
            Ok(_) => {}
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            events.push(data.to_string());
            if data == "[DONE]" {
                return events;
            }
        }
    }
}

// 1.

const LIMITS: [(u32, u32); 4] = [(1, 8), (2, 16), (4, 8), (8, 32)];

fn load_config(a: SocketAddr, b: SocketAddr, step: Option<usize>) -> String {
    let limits = |(c, q): (u32, u32)| format!("max_concurrent = {c}\nmax_queue_size = {q}");
    let Some(s) = step else {
        return format!(
            "{GATEWAY_HEAD}{}{}",
            static_model("a", "sim-a", a, ""),
            static_model("b", "sim-b", b, "")
        );
    };
    let mut text = format!(
        "{GATEWAY_HEAD}{}{}",
        static_model("a", "sim-a", a, &limits(LIMITS[s % 4])),
        static_model("b", "sim-b", b, &limits(LIMITS[(s / 2) % 4]))
    );
    if with_c(s) {
        text.push_str(&static_model("c", "sim-a", a, ""));
    }
    text
}

fn with_c(step: usize) -> bool {
    step % 6 >= 3
}

/// One client thread of the load test: keep-alive requests until `stop`, 3 non-streaming
/// to 1 streaming, to both models.
fn load_client(
    gw: SocketAddr,
    index: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
) {
    let fail = |what: String| {
        let mut f = failures.lock().unwrap();
        if f.len() < 50 {
            f.push(what);
        }
    };
    let mut conn: Option<Conn> = None;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(gw) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    fail(format!("client {index}: connect: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let model = ["a", "b"][(index + n) % 2];
        let streaming = n % 4 == 3;
        let max_tokens = if streaming { 20 } else { 5 };
        n += 1;
        let resp = match c.send("POST", CHAT, &chat(model, max_tokens, streaming)) {
            Ok(r) => r,
            Err(e) => {
                fail(format!("client {index}: {model} stream={streaming}: {e}"));
                conn = None;
                continue;
            }
        };
        let text = resp.text();
        if resp.status != 200 {
            fail(format!(
                "client {index}: {model} stream={streaming}: {} {text}",
                resp.status
            ));
        } else if streaming {
            let events: Vec<String> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
                .collect();
            let (tokens, finished) = tokens_and_done(&events);
            if tokens != 20 || !finished {
                fail(format!(
                    "client {index}: {model}: stream with {tokens} tokens, [DONE] {finished}: {text}"
                ));
            }
        } else if !resp.json()["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("tok4"))
        {
            fail(format!("client {index}: {model}: incomplete answer {text}"));
        }
        done.fetch_add(1, Ordering::Relaxed);
        if resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            fail(format!(
                "client {index}: {model}: the gateway closed a keep-alive connection"
            ));
            conn = None;
        }
    }
}

#[test]
fn reloads_under_load_fail_no_request() {
    let sim_a = sim("sim-a", 0, 2000);
    let sim_b = sim("sim-b", 0, 2000);
    let path = config_file("load", &load_config(sim_a.addr, sim_b.addr, None));
    let gw = spawn_gateway(&path);
    // The file watch starts a moment after the "listening" line (see
    // `file_written_right_after_start_is_picked_up`).
    std::thread::sleep(Duration::from_millis(500));

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
            let addr = gw.addr;
            std::thread::spawn(move || load_client(addr, i, stop, done, failures))
        })
        .collect();

    let started = Instant::now();
    let mut step = 0;
    while (step < 20 || done.load(Ordering::Relaxed) < 2000)
        && started.elapsed() < Duration::from_secs(120)
    {
        write_atomic(&path, &load_config(sim_a.addr, sim_b.addr, Some(step)));
        if step % 2 == 1 {
            // The API re-reads the file at once (the watcher may also pick the change up).
            let body = reload_ok(&gw);
            assert!(body["restarting"].as_array().unwrap().is_empty(), "{body}");
        }
        // Either way the new file is in force shortly: the file watcher applies it.
        let (c, q) = LIMITS[step % 4];
        assert!(
            eventually(Duration::from_secs(5), || {
                let list = models(gw.addr);
                let a = list.iter().find(|m| m["name"] == "a");
                let has_c = list.iter().any(|m| m["name"] == "c");
                has_c == with_c(step)
                    && a.is_some_and(|a| a["max_concurrent"] == c && a["max_queue_size"] == q)
            }),
            "step {step}: the new config was not applied: {:?}\ngateway log:\n{}",
            models(gw.addr),
            gw.stderr()
        );
        if with_c(step) {
            let resp = chat_status(gw.addr, "c");
            assert_eq!(resp.status, 200, "added model c: {}", resp.text());
        } else {
            let resp = chat_status(gw.addr, "c");
            assert_eq!(resp.status, 404, "removed model c: {}", resp.text());
        }
        step += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let completed = done.load(Ordering::Relaxed);
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "{completed} requests during {step} reloads in {} ms",
        started.elapsed().as_millis()
    );
    assert!(
        failures.is_empty(),
        "{} failure(s) during reloads:\n{}\ngateway log (tail):\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&gw.stderr(), 60)
    );
    assert!(completed >= 2000, "only {completed} requests completed");
    assert!(step >= 20);
    let ok = reloads(gw.addr, "ok");
    assert!(ok >= step as f64, "reloads ok {ok} < {step} reloads");
    assert_eq!(reloads(gw.addr, "error"), 0.0);
    for m in ["a", "b"] {
        assert!(
            eventually(Duration::from_secs(5), || counters_zero(gw.addr, m)),
            "{m}: counters did not return to zero"
        );
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// 2.

#[test]
fn invalid_file_changes_nothing() {
    let sim_proc = sim("sim-m", 0, 1000);
    let good = format!(
        "{GATEWAY_HEAD}{}",
        static_model("m", "sim-m", sim_proc.addr, "max_concurrent = 3")
    );
    let path = config_file("invalid", &good);
    let gw = spawn_gateway(&path);
    assert_eq!(chat_status(gw.addr, "m").status, 200);
    // Every field but the live ones, which the checks' own requests move: the last use, and
    // the counters (a slot is released just after the response's last byte is written).
    let settled = |gw: SocketAddr| {
        let mut list = models(gw);
        for m in &mut list {
            let m = m.as_object_mut().unwrap();
            for live in ["last_used_ms", "in_flight", "queued"] {
                m.remove(live);
            }
        }
        list
    };
    let before = settled(gw.addr);
    let config_before = get(gw.addr, "/gateway/config").json();

    // Each broken file also adds a model "x": it must not appear.
    let syntax = format!(
        "{GATEWAY_HEAD}{}[[models]\nname = \"x\"\n",
        static_model("m", "sim-m", sim_proc.addr, "max_concurrent = 7")
    );
    let semantic = format!(
        "{GATEWAY_HEAD}{}{}",
        static_model("m", "sim-m", sim_proc.addr, "max_concurrent = 0"),
        static_model("x", "sim-m", sim_proc.addr, "colour = \"red\"")
    );
    let unchanged = |what: &str| {
        assert_eq!(settled(gw.addr), before, "{what}: /gateway/models changed");
        assert_eq!(
            get(gw.addr, "/gateway/config").json(),
            config_before,
            "{what}: /gateway/config changed"
        );
        let resp = chat_status(gw.addr, "m");
        assert_eq!(resp.status, 200, "{what}: {}", resp.text());
        let resp = chat_status(gw.addr, "x");
        assert_eq!(resp.status, 404, "{what}: {}", resp.text());
    };

    for (what, text, fields) in [
        ("syntax error", &syntax, &["line"][..]),
        (
            "semantic errors",
            &semantic,
            &["max_concurrent", "colour"][..],
        ),
    ] {
        // The file watch: a broken file is refused within about a second.
        let errors = reloads(gw.addr, "error");
        write_atomic(&path, text);
        assert!(
            eventually(Duration::from_secs(2), || reloads(gw.addr, "error")
                == errors + 1.0),
            "{what}: the file watch did not count a refused reload; gateway log:\n{}",
            gw.stderr()
        );
        unchanged(what);

        // The API: 400 invalid_config with every error.
        let resp = reload(gw.addr, None);
        assert_eq!(resp.status, 400, "{what}: {}", resp.text());
        assert_eq!(resp.error_code(), "invalid_config", "{}", resp.text());
        let body = resp.json();
        let listed = names(&body["errors"]);
        for field in fields {
            assert!(
                listed.iter().any(|e| e.contains(field)),
                "{what}: no error names {field}: {listed:?}"
            );
        }
        assert!(
            listed.len() >= fields.len(),
            "{what}: each error on its own: {listed:?}"
        );
        assert_eq!(reloads(gw.addr, "error"), errors + 2.0, "{what}");
        unchanged(what);
        let log = gw.stderr();
        for field in fields {
            assert!(
                log.lines()
                    .any(|l| l.contains("invalid config") && l.contains(field)),
                "{what}: the log does not name {field}:\n{log}"
            );
        }
    }
    assert_eq!(reloads(gw.addr, "ok"), 0.0);

    // A valid file again: applied by the watch.
    let fixed = format!(
        "{GATEWAY_HEAD}{}{}",
        static_model("m", "sim-m", sim_proc.addr, "max_concurrent = 7"),
        static_model("x", "sim-m", sim_proc.addr, "")
    );
    write_atomic(&path, &fixed);
    assert!(
        eventually(Duration::from_secs(3), || chat_status(gw.addr, "x").status
            == 200),
        "the fixed file was not applied; gateway log:\n{}",
        gw.stderr()
    );
    assert_eq!(model_field(gw.addr, "m", "max_concurrent"), 7);
    assert_eq!(reloads(gw.addr, "ok"), 1.0);
}

// 3.

/// Poll a chat request to `model` until it answers 200; the time from `since`.
fn time_to_routable(gw: &Proc, model: &str, since: Instant) -> Duration {
    loop {
        let status = chat_status(gw.addr, model).status;
        if status == 200 {
            return since.elapsed();
        }
        assert_eq!(status, 404, "{model} before it is routable");
        assert!(
            since.elapsed() < Duration::from_secs(3),
            "{model} not routable 3 s after the file changed; gateway log:\n{}",
            gw.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn models_config(addr: SocketAddr, names: &[&str]) -> String {
    let mut text = GATEWAY_HEAD.to_string();
    for name in names {
        text.push_str(&static_model(name, "sim-m", addr, ""));
    }
    text
}

#[test]
fn configmap_symlink_swap_and_rename_are_picked_up() {
    let sim_proc = sim("sim-m", 0, 1000);
    let all = ["m", "n1", "n2", "n3"];

    // Kubernetes: dir/gateway.toml -> ..data/gateway.toml, dir/..data -> v1.
    let dir = temp_dir("configmap");
    std::fs::create_dir(dir.join("v1")).unwrap();
    std::fs::write(
        dir.join("v1/gateway.toml"),
        models_config(sim_proc.addr, &all[..1]),
    )
    .unwrap();
    std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/gateway.toml", dir.join("gateway.toml")).unwrap();
    let gw = spawn_gateway(&dir.join("gateway.toml"));
    assert_eq!(chat_status(gw.addr, "m").status, 200);
    let mut swaps = Vec::new();
    for round in 1..all.len() {
        let version = format!("v{}", round + 1);
        std::fs::create_dir(dir.join(&version)).unwrap();
        std::fs::write(
            dir.join(&version).join("gateway.toml"),
            models_config(sim_proc.addr, &all[..=round]),
        )
        .unwrap();
        std::os::unix::fs::symlink(&version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let t = time_to_routable(&gw, all[round], Instant::now());
        eprintln!(
            "file write -> routable: {} ms (..data symlink swap)",
            t.as_millis()
        );
        swaps.push(t);
    }
    drop(gw);

    // A regular file replaced by write-temp-then-rename.
    let path = config_file("rename", &models_config(sim_proc.addr, &all[..1]));
    let gw = spawn_gateway(&path);
    assert_eq!(chat_status(gw.addr, "m").status, 200);
    let mut renames = Vec::new();
    for round in 1..all.len() {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, models_config(sim_proc.addr, &all[..=round])).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let t = time_to_routable(&gw, all[round], Instant::now());
        eprintln!(
            "file write -> routable: {} ms (write temp, rename)",
            t.as_millis()
        );
        renames.push(t);
    }
    // And one plain in-place write, for comparison.
    let all5 = ["m", "n1", "n2", "n3", "n4"];
    let t0 = Instant::now();
    std::fs::write(&path, models_config(sim_proc.addr, &all5)).unwrap();
    let t = time_to_routable(&gw, "n4", t0);
    eprintln!("file write -> routable: {} ms (in place)", t.as_millis());
    eprintln!("symlink swaps: {swaps:?}; renames: {renames:?}");
    assert_eq!(reloads(gw.addr, "error"), 0.0);
}

// 4.

#[test]
fn removed_model_finishes_its_stream_then_stops() {
    let keep = sim("sim-keep", 0, 1000);
    let with_gone = format!(
        "{GATEWAY_HEAD}{}{}",
        static_model("keep", "sim-keep", keep.addr, ""),
        sim_model_args("gone", ", \"--tokens-per-s\", \"10\"", "preload = true")
    );
    let (path, real) = unwatched("remove", &with_gone);
    let gw = spawn_gateway(&path);
    wait_ready(&gw, "gone");
    let server = endpoint(gw.addr, "gone");
    assert!(sim_pid(server).is_some(), "no simulator on {server}");

    let stream = stream_in_background(gw.addr, "gone", 30);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(
        &real,
        format!(
            "{GATEWAY_HEAD}{}",
            static_model("keep", "sim-keep", keep.addr, "")
        ),
    )
    .unwrap();
    let body = reload_ok(&gw);
    assert_eq!(names(&body["removed"]), ["gone"], "{body}");
    let asked = Instant::now();
    let resp = chat_status(gw.addr, "gone");
    assert_eq!(resp.status, 404, "{}", resp.text());
    assert_eq!(resp.error_code(), "model_not_found", "{}", resp.text());
    assert!(asked.elapsed() < Duration::from_secs(1));
    assert_eq!(model_names(gw.addr), ["keep"]);
    assert_eq!(chat_status(gw.addr, "keep").status, 200);
    // Its server keeps serving the stream in flight.
    assert!(
        sim_pid(server).is_some(),
        "the removed model's server stopped with a stream in flight"
    );

    let (events, _) = stream.join().unwrap();
    let (tokens, done) = tokens_and_done(&events);
    assert_eq!(
        (tokens, done),
        (30, true),
        "the stream in flight was cut: {events:?}\ngateway log:\n{}",
        gw.stderr()
    );
    assert!(
        eventually(Duration::from_secs(10), || sim_pid(server).is_none()),
        "the removed model's server still runs; gateway log:\n{}",
        gw.stderr()
    );
}

// 5.

#[test]
fn changed_limits_apply_at_once_and_counters_survive() {
    let slow = sim("sim-m", 1000, 1000);
    let config = |queue: u32| {
        format!(
            "{GATEWAY_HEAD}{}{}",
            static_model(
                "m",
                "sim-m",
                slow.addr,
                &format!("max_concurrent = 1\nmax_queue_size = {queue}")
            ),
            static_model("u", "sim-m", slow.addr, "")
        )
    };
    let (path, real) = unwatched("limits", &config(1));
    let gw = spawn_gateway(&path);
    // Three requests at once; their statuses, sorted.
    let burst = || {
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let addr = gw.addr;
                std::thread::spawn(move || post_json(addr, CHAT, &chat("m", 2, false)))
            })
            .collect();
        let mut statuses: Vec<u16> = threads
            .into_iter()
            .map(|t| {
                let r = t.join().unwrap();
                if r.status == 429 {
                    assert_eq!(r.error_code(), "queue_full", "{}", r.text());
                }
                r.status
            })
            .collect();
        statuses.sort();
        statuses
    };
    // One in flight, one queued, one rejected.
    assert_eq!(burst(), [200, 200, 429]);
    let last_used = model_field(gw.addr, "m", "last_used_ms").as_u64().unwrap();
    assert!(last_used > 0);
    assert_eq!(requests_total(gw.addr, "m", 200), 2.0);
    assert_eq!(requests_total(gw.addr, "m", 429), 1.0);

    // An unchanged model with a request in flight across the reload.
    let addr = gw.addr;
    let in_flight = std::thread::spawn(move || post_json(addr, CHAT, &chat("u", 2, false)));
    assert!(eventually(Duration::from_secs(5), || model_field(
        gw.addr,
        "u",
        "in_flight"
    ) == 1));

    std::fs::write(&real, config(5)).unwrap();
    let body = reload_ok(&gw);
    assert_eq!(names(&body["changed"]), ["m"], "{body}");
    assert!(names(&body["restarting"]).is_empty(), "{body}");
    assert_eq!(model_field(gw.addr, "m", "max_queue_size"), 5);
    assert_eq!(
        model_field(gw.addr, "u", "in_flight"),
        1,
        "the unchanged model lost its in-flight count"
    );
    assert_eq!(model_field(gw.addr, "m", "last_used_ms"), last_used);

    let started = Instant::now();
    let addr = gw.addr;
    let watcher = std::thread::spawn(move || {
        eventually(Duration::from_secs(3), || {
            model_field(addr, "m", "queued") == 2 && model_field(addr, "m", "in_flight") == 1
        })
    });
    assert_eq!(burst(), [200, 200, 200]);
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "max_concurrent 1 was not kept: the burst took {:?}",
        started.elapsed()
    );
    assert!(
        watcher.join().unwrap(),
        "never saw two queued and one in flight"
    );
    assert_eq!(in_flight.join().unwrap().status, 200);
    assert_eq!(requests_total(gw.addr, "m", 200), 5.0, "counter was reset");
    assert_eq!(requests_total(gw.addr, "m", 429), 1.0, "counter was reset");
    assert_eq!(requests_total(gw.addr, "u", 200), 1.0);
    assert!(model_field(gw.addr, "m", "last_used_ms").as_u64().unwrap() > last_used);
    assert!(eventually(Duration::from_secs(5), || counters_zero(
        gw.addr, "u"
    )));
    assert!(eventually(Duration::from_secs(5), || counters_zero(
        gw.addr, "m"
    )));
}

// 6.

#[test]
fn changed_runtime_restarts_after_the_stream_in_flight() {
    let config = |ttft: &str| {
        format!(
            "{GATEWAY_HEAD}{}",
            sim_model_args(
                "m",
                &format!(", \"--tokens-per-s\", \"10\", \"--ttft-ms\", \"{ttft}\""),
                "preload = true"
            )
        )
    };
    let (path, real) = unwatched("restart", &config("0"));
    let gw = spawn_gateway(&path);
    wait_ready(&gw, "m");
    let old = endpoint(gw.addr, "m");

    // Limits alone: changed in place, the server keeps running.
    std::fs::write(
        &real,
        config("0").replace("preload = true", "preload = true\nmax_concurrent = 9"),
    )
    .unwrap();
    let body = reload_ok(&gw);
    assert_eq!(names(&body["changed"]), ["m"], "{body}");
    assert!(names(&body["restarting"]).is_empty(), "{body}");
    assert_eq!(model_field(gw.addr, "m", "max_concurrent"), 9);
    assert_eq!(model_field(gw.addr, "m", "state"), "ready");
    assert_eq!(endpoint(gw.addr, "m"), old);
    std::fs::write(&real, config("0")).unwrap();
    reload_ok(&gw);

    let stream = stream_in_background(gw.addr, "m", 20);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&real, config("5")).unwrap();
    let body = reload_ok(&gw);
    assert_eq!(names(&body["restarting"]), ["m"], "{body}");
    assert!(names(&body["changed"]).is_empty(), "{body}");
    assert!(
        sim_pid(old).is_some(),
        "the old server stopped with a stream in flight"
    );

    // A new request waits for the new server.
    let addr = gw.addr;
    let waiting = std::thread::spawn(move || {
        let r = post_json(addr, CHAT, &chat("m", 2, false));
        (r, Instant::now())
    });
    let (events, stream_end) = stream.join().unwrap();
    let (tokens, done) = tokens_and_done(&events);
    assert_eq!(
        (tokens, done),
        (20, true),
        "the stream in flight was cut: {events:?}\ngateway log:\n{}",
        gw.stderr()
    );
    let (resp, answered) = waiting.join().unwrap();
    assert_eq!(
        resp.status,
        200,
        "{}\ngateway log:\n{}",
        resp.text(),
        gw.stderr()
    );
    assert!(
        answered + Duration::from_millis(300) >= stream_end,
        "the new request was answered before the old server finished its stream"
    );
    wait_ready(&gw, "m");
    let new = endpoint(gw.addr, "m");
    assert_ne!(new, old, "the model was not restarted");
    assert!(sim_pid(new).is_some(), "no simulator on {new}");
    assert!(
        eventually(Duration::from_secs(10), || sim_pid(old).is_none()),
        "the old server still runs"
    );
    let resp = chat_status(gw.addr, "m");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "up-m");
}

// 7.

#[test]
fn listen_and_workers_changes_need_a_restart() {
    let sim_proc = sim("sim-m", 0, 1000);
    let model = static_model("m", "sim-m", sim_proc.addr, "");
    let (path, real) = unwatched(
        "restart-required",
        &format!("[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n{model}"),
    );
    let gw = spawn_gateway(&path);
    let elsewhere = dead_addr();
    std::fs::write(
        &real,
        format!(
            "[gateway]\nlisten = \"{elsewhere}\"\nworkers = 1\nlog_level = \"warn\"\n\n{model}"
        ),
    )
    .unwrap();
    let body = reload_ok(&gw);
    let required = names(&body["restart_required"]);
    for key in ["gateway.listen", "gateway.workers"] {
        assert!(required.iter().any(|k| k == key), "{key} not in {body}");
    }
    // The log level is not one of them: it applies at once.
    assert_eq!(required.len(), 2, "{body}");
    assert_eq!(
        get(gw.addr, "/gateway/config").json()["gateway"]["log_level"],
        "warn"
    );
    assert!(
        gw.stderr().contains("restart"),
        "the log does not say a restart is needed:\n{}",
        gw.stderr()
    );
    assert_eq!(get(gw.addr, "/health").status, 200);
    assert_eq!(chat_status(gw.addr, "m").status, 200);
    assert!(
        TcpStream::connect_timeout(&elsewhere, Duration::from_millis(500)).is_err(),
        "the gateway moved to {elsewhere}"
    );
}

// 8.

#[test]
fn sighup_reloads() {
    let sim_proc = sim("sim-m", 0, 1000);
    let (path, real) = unwatched("sighup", &models_config(sim_proc.addr, &["m"]));
    let mut gw = spawn_gateway(&path);
    assert_eq!(reloads(gw.addr, "ok"), 0.0);
    // The signal handlers come a moment after the "listening" line (see
    // `sighup_right_after_start_does_not_kill_the_gateway`).
    std::thread::sleep(Duration::from_millis(500));

    // Unchanged file: still a reload.
    gw.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(3), || reloads(gw.addr, "ok") == 1.0),
        "SIGHUP did not reload; gateway log:\n{}",
        gw.stderr()
    );
    assert_eq!(chat_status(gw.addr, "m").status, 200);

    // A changed file, which the watcher cannot see: SIGHUP applies it.
    std::fs::write(&real, models_config(sim_proc.addr, &["m", "n"])).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(chat_status(gw.addr, "n").status, 404);
    gw.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(3), || chat_status(gw.addr, "n").status
            == 200),
        "SIGHUP did not apply the new model; gateway log:\n{}",
        gw.stderr()
    );
    assert_eq!(reloads(gw.addr, "ok"), 2.0);
    assert_eq!(reloads(gw.addr, "error"), 0.0);
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the gateway"
    );
}

// 9.

#[test]
fn reload_needs_the_admin_token() {
    let sim_proc = sim("sim-m", 0, 1000);
    let model = static_model("m", "sim-m", sim_proc.addr, "");
    let (path, real) = unwatched(
        "admin",
        &format!("{GATEWAY_HEAD}admin_token = \"adm\"\n{model}"),
    );
    let gw = spawn_gateway(&path);
    let resp = reload(gw.addr, None);
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_eq!(resp.error_code(), "unauthorized", "{}", resp.text());
    let resp = reload(gw.addr, Some("wrong"));
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_eq!(resp.error_code(), "unauthorized", "{}", resp.text());
    assert_eq!(reloads(gw.addr, "ok"), 0.0);
    assert_eq!(reloads(gw.addr, "error"), 0.0);

    let resp = reload(gw.addr, Some("adm"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["result"], "ok", "{}", resp.text());
    assert_eq!(reloads(gw.addr, "ok"), 1.0);

    // A reload that changes the token and adds API keys: both guard at once.
    std::fs::write(
        &real,
        format!("{GATEWAY_HEAD}admin_token = \"adm2\"\napi_keys = [\"k1\"]\n{model}"),
    )
    .unwrap();
    let resp = reload(gw.addr, Some("adm"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = reload(gw.addr, Some("adm"));
    assert_eq!(
        resp.status,
        401,
        "the old token still works: {}",
        resp.text()
    );
    let resp = reload(gw.addr, Some("adm2"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = chat_status(gw.addr, "m");
    assert_eq!(resp.status, 401, "api_keys not applied: {}", resp.text());
    assert_eq!(resp.error_code(), "unauthorized");
    let resp = request(
        gw.addr,
        "POST",
        CHAT,
        &[("Authorization", "Bearer k1")],
        chat("m", 2, false).to_string().as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let config = get(gw.addr, "/gateway/config").text();
    assert!(
        !config.contains("adm2") && !config.contains("\"k1\""),
        "secrets leaked: {config}"
    );
}

// 10.

#[test]
fn sigterm_drains_the_stream_in_flight_then_exits() {
    let config = format!(
        "{GATEWAY_HEAD}{}",
        sim_model_args("m", ", \"--tokens-per-s\", \"10\"", "preload = true")
    );
    let path = config_file("drain", &config);
    let mut gw = spawn_gateway(&path);
    wait_ready(&gw, "m");
    let server = endpoint(gw.addr, "m");
    let child = sim_pid(server).expect("the model's simulator");

    // Two keep-alive connections, opened (and used) before the signal.
    let mut health_conn = Conn::open(gw.addr).unwrap();
    let mut chat_conn = Conn::open(gw.addr).unwrap();
    for c in [&mut health_conn, &mut chat_conn] {
        let r = c.send("GET", "/health", &serde_json::Value::Null).unwrap();
        assert_eq!(r.status, 200);
    }

    let mut stream = open_stream_for(gw.addr, "m", 20);
    std::thread::sleep(Duration::from_millis(300));
    gw.signal(libc::SIGTERM);
    let signalled = Instant::now();

    // The listeners close once the drain has begun.
    assert!(
        eventually(Duration::from_secs(2), || TcpStream::connect(gw.addr)
            .is_err()),
        "new connections are still accepted {:?} after SIGTERM",
        signalled.elapsed()
    );
    let r = health_conn
        .send("GET", "/health", &serde_json::Value::Null)
        .expect("health on an open connection while draining");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        health_conn.is_closed(),
        "the keep-alive connection stayed open after its response while draining"
    );
    let r = chat_conn
        .send("POST", CHAT, &chat("m", 2, false))
        .expect("chat on an open connection while draining");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error_code(), "shutting_down", "{}", r.text());

    // Midway through the stream the gateway still runs: it waits for the stream.
    let mut line = String::new();
    let mut tokens = 1; // open_stream_for read the first one
    while tokens < 10 {
        line.clear();
        assert!(stream.read_line(&mut line).unwrap_or(0) > 0, "stream cut");
        if line.starts_with("data: ") {
            tokens += 1;
        }
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the gateway exited {:?} after SIGTERM with a stream in flight",
        signalled.elapsed()
    );
    let rest = read_rest(&mut stream);
    let (more, done) = tokens_and_done(&rest);
    assert_eq!(
        (tokens + more, done),
        (20, true),
        "the stream in flight was cut: {rest:?}\ngateway log:\n{}",
        gw.stderr()
    );
    let stream_end = signalled.elapsed();
    let code = gw.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(Some(0)),
        "the gateway did not exit 0 after the drain; log:\n{}",
        gw.stderr()
    );
    eprintln!(
        "stream ended {} ms after SIGTERM; exited by {} ms",
        stream_end.as_millis(),
        signalled.elapsed().as_millis()
    );
    assert!(
        stream_end >= Duration::from_millis(1200),
        "the stream ended too early ({stream_end:?})"
    );
    assert!(
        eventually(Duration::from_secs(5), || unsafe {
            libc::kill(child, 0) != 0
        } || sim_pid(server).is_none()),
        "the model's simulator (pid {child}) outlived the gateway"
    );
}

#[test]
fn sigterm_grace_cuts_a_long_stream() {
    let slow = sim("sim-m", 0, 10);
    let path = config_file(
        "grace",
        &format!(
            "{GATEWAY_HEAD}shutdown_grace_s = 1\n{}",
            static_model("m", "sim-m", slow.addr, "")
        ),
    );
    let mut gw = spawn_gateway(&path);
    let mut stream = open_stream_for(gw.addr, "m", 100);
    std::thread::sleep(Duration::from_millis(300));
    gw.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let code = gw.wait_exit(Duration::from_secs(8));
    let exited = signalled.elapsed();
    assert_eq!(
        code,
        Some(Some(0)),
        "no exit 0 after the grace; log:\n{}",
        gw.stderr()
    );
    eprintln!("exited {} ms after SIGTERM", exited.as_millis());
    assert!(
        exited >= Duration::from_millis(800) && exited < Duration::from_secs(5),
        "exited {exited:?} after SIGTERM with shutdown_grace_s = 1"
    );
    let rest = read_rest(&mut stream);
    let (tokens, done) = tokens_and_done(&rest);
    assert!(
        !done && tokens < 99,
        "the 10 s stream was not cut: {tokens} tokens, [DONE] {done}"
    );
    assert!(
        gw.stderr().contains("grace"),
        "the log does not say the grace expired:\n{}",
        gw.stderr()
    );
}

// 11.

/// A static model's endpoints are changed in place: new requests go to the new server at
/// once, and the request in flight finishes on the old one.
#[test]
fn static_endpoint_change_applies_at_once() {
    let one = sim("sim-one", 1500, 1000);
    let two = sim("sim-two", 0, 1000);
    let (path, real) = unwatched(
        "endpoints",
        &format!(
            "{GATEWAY_HEAD}{}",
            static_model("m", "sim-one", one.addr, "")
        ),
    );
    let gw = spawn_gateway(&path);
    let addr = gw.addr;
    let in_flight = std::thread::spawn(move || chat_status(addr, "m"));
    assert!(eventually(Duration::from_secs(5), || model_field(
        gw.addr,
        "m",
        "in_flight"
    ) == 1));
    std::fs::write(
        &real,
        format!(
            "{GATEWAY_HEAD}{}",
            static_model("m", "sim-two", two.addr, "")
        ),
    )
    .unwrap();
    let body = reload_ok(&gw);
    assert_eq!(names(&body["changed"]), ["m"], "{body}");
    let started = Instant::now();
    let resp = chat_status(gw.addr, "m");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["model"], "sim-two", "{}", resp.text());
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the new request waited for the old one: {:?}",
        started.elapsed()
    );
    let old = in_flight.join().unwrap();
    assert_eq!(old.status, 200, "{}", old.text());
    assert_eq!(old.json()["model"], "sim-one", "{}", old.text());
    assert!(eventually(Duration::from_secs(5), || counters_zero(
        gw.addr, "m"
    )));
}

/// A request waiting for a process model's cold start, when a reload removes the model: it
/// should be answered soon (served once the server is up, or refused), and the server
/// should stop. The gateway answers it only when `startup_timeout_s` runs out (404), and
/// keeps the model's server running until then.
#[test]

fn removing_a_starting_model_answers_its_queued_request() {
    let keep = sim("sim-keep", 0, 1000);
    let keep_model = static_model("keep", "sim-keep", keep.addr, "");
    let (path, real) = unwatched(
        "remove-starting",
        &format!(
            "{GATEWAY_HEAD}{keep_model}{}",
            sim_model_args("cold", ", \"--startup-ms\", \"2000\"", "")
        ),
    );
    let gw = spawn_gateway(&path);
    let addr = gw.addr;
    let waiting = std::thread::spawn(move || {
        let r = chat_status(addr, "cold");
        (r, Instant::now())
    });
    assert!(eventually(Duration::from_secs(5), || model_field(
        gw.addr, "cold", "queued"
    ) == 1));
    std::fs::write(&real, format!("{GATEWAY_HEAD}{keep_model}")).unwrap();
    let body = reload_ok(&gw);
    assert_eq!(names(&body["removed"]), ["cold"], "{body}");
    let removed = Instant::now();
    let (resp, answered) = waiting.join().unwrap();
    let waited = answered - removed;
    eprintln!(
        "queued request answered {} ms after the removal: {} {}",
        waited.as_millis(),
        resp.status,
        resp.text()
    );
    assert!(
        waited < Duration::from_secs(6),
        "the queued request waited {waited:?} after its model was removed ({} {}); log:\n{}",
        resp.status,
        resp.text(),
        gw.stderr()
    );
}

/// `/gateway/config` is "the effective config", but after a reload that changes `listen`
/// and `workers` (not applied: restart required) it shows the new, unapplied values; a later
/// reload then no longer lists them in `restart_required` either.
#[test]

fn config_endpoint_shows_the_effective_listen_after_reload() {
    let sim_proc = sim("sim-m", 0, 1000);
    let model = static_model("m", "sim-m", sim_proc.addr, "");
    let (path, real) = unwatched(
        "effective",
        &format!("[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n{model}"),
    );
    let gw = spawn_gateway(&path);
    let before = get(gw.addr, "/gateway/config").json()["gateway"].clone();
    let elsewhere = dead_addr();
    std::fs::write(
        &real,
        format!("[gateway]\nlisten = \"{elsewhere}\"\nworkers = 1\n\n{model}"),
    )
    .unwrap();
    reload_ok(&gw);
    let after = get(gw.addr, "/gateway/config").json()["gateway"].clone();
    for key in ["listen", "workers"] {
        assert_eq!(
            after[key], before[key],
            "/gateway/config shows a {key} that is not in effect"
        );
    }
    let again = reload_ok(&gw);
    assert_eq!(names(&again["restart_required"]).len(), 2, "{again}");
}

/// The "listening" line comes before the control plane installs its signal handlers, so a
/// SIGHUP (or SIGTERM) in the first few milliseconds takes the default action and kills the
/// gateway: no reload, no drain, process children orphaned.
#[test]

fn sighup_right_after_start_does_not_kill_the_gateway() {
    let sim_proc = sim("sim-m", 0, 1000);
    for attempt in 0..3 {
        let path = config_file("sighup-early", &models_config(sim_proc.addr, &["m"]));
        let mut gw = spawn_gateway(&path);
        gw.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            gw.child.try_wait().unwrap(),
            None,
            "attempt {attempt}: SIGHUP killed the gateway; log:\n{}",
            gw.stderr()
        );
        assert!(eventually(Duration::from_secs(3), || reloads(
            gw.addr, "ok"
        ) == 1.0));
    }
}

/// The same late start-up: the file watch begins after the "listening" line, and the text it
/// compares against was read before it, so a change written in that window is never applied
/// (until some later event or an explicit reload).
#[test]

fn file_written_right_after_start_is_picked_up() {
    let sim_proc = sim("sim-m", 0, 1000);
    // The window is a few milliseconds: try a few times.
    for attempt in 0..10 {
        let path = config_file("watch-early", &models_config(sim_proc.addr, &["m"]));
        let gw = spawn_gateway(&path);
        write_atomic(&path, &models_config(sim_proc.addr, &["m", "n"]));
        assert!(
            eventually(Duration::from_secs(3), || chat_status(gw.addr, "n").status
                == 200),
            "attempt {attempt}: the change was never applied; log:\n{}",
            gw.stderr()
        );
    }
}
