//! Black-box test harness: starts the real `vllm-gateway` binary and simulator processes on
//! 127.0.0.1:0 ports and talks to them over real TCP with a small HTTP/1.1 client.
#![allow(dead_code, clippy::type_complexity)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vllm-gateway")
}

/// A fresh directory for one test's files.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vgw-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything the process wrote to stderr so far.
    pub stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawn and wait for the "... listening on http://ADDR" line on stdout.
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn process");
        let stdout = child.stdout.take().expect("stdout");
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let sink = stderr_text.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("VGW_TEST_VERBOSE").is_some() {
                    eprintln!("[child] {line}");
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "process did not print its address; stderr:\n{}",
                    stderr_text.lock().unwrap()
                );
            }
        };
        Proc {
            child,
            addr,
            stderr: stderr_text,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for exit up to `timeout`; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The built-in simulator on a port-0 listener.
pub fn sim(model: &str, ttft_ms: u64, tokens_per_s: u64) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(["sim", "--listen", "127.0.0.1:0", "--model", model])
        .args(["--ttft-ms", &ttft_ms.to_string()])
        .args(["--tokens-per-s", &tokens_per_s.to_string()]);
    Proc::spawn(cmd)
}

/// The gateway on `config` (a TOML text; `listen` should be 127.0.0.1:0).
pub fn gateway(config: &str) -> Proc {
    gateway_with_env(config, &[])
}

pub fn gateway_with_env(config: &str, env: &[(&str, &str)]) -> Proc {
    let dir = temp_dir("gw");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(bin());
    cmd.arg("--config").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(cmd)
}

/// A `[[models]]` table for a static model at `addr`.
pub fn static_model(name: &str, upstream: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\nupstream_model = \"{upstream}\"\nruntime = \"static\"\nendpoints = [\"http://{addr}\"]\n{extra}\n"
    )
}

pub const GATEWAY_HEAD: &str =
    "[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 2\nlog_level = \"debug\"\n";

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The contract's error `code`.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Read one response from a buffered stream (content-length, chunked, or until close).
pub fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "no response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if status == 100 {
        return read_response(reader);
    }
    if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(std::io::Error::other)?;
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(std::io::Error::other)?;
            if size == 0 {
                let mut end = String::new();
                reader.read_line(&mut end)?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if status != 204 && status != 304 {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn raw_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(&raw_request(method, path, headers, body))
        .expect("write");
    read_response(&mut BufReader::new(stream)).expect("read response")
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"")
}

pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Response {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

pub fn chat(model: &str, max_tokens: u64, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// A streaming request: returns each SSE `data:` payload with its arrival time since the
/// request was sent.
pub fn stream_events(addr: SocketAddr, body: &serde_json::Value) -> Vec<(Duration, String)> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let sent = Instant::now();
    stream
        .write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            &[],
            body.to_string().as_bytes(),
        ))
        .unwrap();
    let mut events = Vec::new();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            events.push((sent.elapsed(), data.to_string()));
            if data == "[DONE]" {
                break;
            }
        }
        line.clear();
    }
    events
}

/// One sample from a Prometheus page: `series` is the name with its labels, exactly as
/// rendered, e.g. `gateway_in_flight{model="a"}`.
pub fn metric(addr: SocketAddr, series: &str) -> f64 {
    let page = get(addr, "/metrics").text();
    metric_in(&page, series).unwrap_or_else(|| panic!("{series} not in /metrics:\n{page}"))
}

pub fn metric_in(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Poll `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The gateway's per-model counters are both zero.
pub fn counters_zero(gw: SocketAddr, model: &str) -> bool {
    let page = get(gw, "/metrics").text();
    metric_in(&page, &format!("gateway_in_flight{{model=\"{model}\"}}")) == Some(0.0)
        && metric_in(&page, &format!("gateway_queue_depth{{model=\"{model}\"}}")) == Some(0.0)
}

/// A port nothing listens on (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A tiny in-test upstream: each accepted connection is handed to `handler` on its own thread.
pub fn fake_upstream<F>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let handler = handler.clone();
            std::thread::spawn(move || handler(stream));
        }
    });
    addr
}

/// Read one request (head + content-length body) from a raw upstream connection.
pub fn read_request(
    reader: &mut BufReader<TcpStream>,
) -> Option<(String, Vec<(String, String)>, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_lowercase(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((line.trim_end().to_string(), headers, body))
}

/// A process-runtime model running the built-in simulator as `up-NAME`; `sim_args` is added
/// to its command, e.g. `, "--tokens-per-s", "5"`.
pub fn process_sim_model(name: &str, startup_ms: u64, sim_args: &str, extra: &str) -> String {
    format!(
        r#"[[models]]
name = "{name}"
upstream_model = "up-{name}"
runtime = "process"
command = ["{{gateway_exe}}", "sim", "--listen", "127.0.0.1:{{port}}", "--model", "up-{name}", "--ttft-ms", "0", "--startup-ms", "{startup_ms}"{sim_args}]
startup_timeout_s = 20
{extra}
"#
    )
}

/// The model's object in `GET /gateway/models`.
pub fn model_entry(gw: SocketAddr, name: &str) -> serde_json::Value {
    let models = get(gw, "/gateway/models").json();
    models
        .as_array()
        .expect("/gateway/models is an array")
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in /gateway/models: {models}"))
        .clone()
}

/// One field of one model in `GET /gateway/models`.
pub fn model_field(gw: SocketAddr, name: &str, field: &str) -> serde_json::Value {
    model_entry(gw, name)[field].clone()
}

/// The model's (single) server address from `/gateway/models`.
pub fn endpoint(gw: SocketAddr, name: &str) -> SocketAddr {
    let endpoints = model_field(gw, name, "endpoints");
    let url = endpoints[0]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no endpoint: {endpoints}"));
    url.trim_start_matches("http://").parse().unwrap()
}

/// The pid of the simulator listening on `addr`, found by its command line.
pub fn sim_pid(addr: SocketAddr) -> Option<i32> {
    let listen = addr.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_sim = args.iter().any(|a| *a == b"sim");
        let listens = args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == listen.as_bytes());
        if is_sim && listens {
            return Some(pid);
        }
    }
    None
}

/// The per-model counters reach zero within a few seconds. A slot is released just after a
/// response's last byte is written, so a client can see the response a moment before.
pub fn counters_settle(gw: SocketAddr, model: &str) -> bool {
    eventually(Duration::from_secs(3), || counters_zero(gw, model))
}

/// Send a streaming chat request and read up to the first SSE `data:` line; the caller reads
/// the rest or drops the connection.
pub fn open_stream(gw: SocketAddr, body: &serde_json::Value) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(gw).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(&raw_request(
            "POST",
            "/v1/chat/completions",
            &[],
            body.to_string().as_bytes(),
        ))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read stream");
        assert!(n > 0, "stream closed before any data");
        if line.starts_with("data: ") {
            return reader;
        }
    }
}
