//! Bad input against the real gateway: malformed bodies and heads, smuggling shapes, limits,
//! slow clients, auth, the gateway's own endpoints, `check` and environment overrides; and
//! that a bad client never disturbs the others.
// The harness's `read_request` return type trips clippy::type_complexity.
mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHAT: &str = "/v1/chat/completions";

/// A simulator serving "sim-m" and a gateway routing model "m" to it, plus `gateway_extra`
/// (keys for the `[gateway]` table) and `tail` (more tables) in the config.
fn setup(gateway_extra: &str, tail: &str) -> (Proc, Proc) {
    let sim_proc = sim("sim-m", 0, 1000);
    let config = format!(
        "{GATEWAY_HEAD}{gateway_extra}\n{}{tail}",
        static_model("m", "sim-m", sim_proc.addr, "")
    );
    let gw = gateway(&config);
    (sim_proc, gw)
}

fn chat_body(model: &str) -> Vec<u8> {
    chat(model, 4, false).to_string().into_bytes()
}

/// A normal chat request on a fresh connection succeeds: bad clients disturb nobody.
fn assert_others_ok(gw: SocketAddr) {
    let resp = request(gw, "POST", CHAT, &[], &chat_body("m"));
    assert_eq!(resp.status, 200, "a normal request failed: {}", resp.text());
    assert_eq!(resp.json()["object"], "chat.completion", "{}", resp.text());
}

/// The response is the contract's error: `status`, `{"error":{"message","type","code"}}`
/// with exactly those keys, a non-empty message and `code`. Returns the message.
fn assert_error(resp: &Response, status: u16, code: &str) -> String {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    let v = resp.json();
    let top = v.as_object().expect("error body is an object");
    assert_eq!(top.len(), 1, "only `error` at the top level: {v}");
    let err = v["error"].as_object().expect("`error` is an object");
    let mut keys: Vec<_> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "type"], "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap_or("").to_string();
    assert!(!message.is_empty(), "empty message: {v}");
    message
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Write `bytes` on a fresh connection; return the first response and the reader.
fn send_raw(addr: SocketAddr, bytes: &[u8]) -> (Response, BufReader<TcpStream>) {
    let mut stream = connect(addr);
    // The gateway may answer (and close) before reading everything; that is its right.
    let _ = stream.write_all(bytes);
    let mut reader = BufReader::new(stream);
    let resp = read_response(&mut reader).expect("read response");
    (resp, reader)
}

/// The server closed the connection: a read sees EOF or a reset, not a timeout.
fn is_closed(reader: &mut BufReader<TcpStream>) -> bool {
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut byte = [0u8; 1];
    match reader.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Run a command that should exit by itself; returns (exit code, stdout, stderr).
fn run_to_exit(mut cmd: Command) -> (Option<i32>, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), out, err)
}

// 1.
#[test]
fn malformed_json_is_400_invalid_request() {
    let (_sim, gw) = setup("", "");
    let bodies: [&[u8]; 6] = [
        b"not json",
        br#"{"messages": [{"role": "user", "#,
        br#"{"model": "#,
        br#"[{"model": "m"}]"#,
        b"\"m\"",
        br#"{"model": m}"#,
    ];
    for body in bodies {
        let resp = request(gw.addr, "POST", CHAT, &[], body);
        let text = String::from_utf8_lossy(body);
        assert_eq!(resp.status, 400, "body {text:?} -> {}", resp.text());
        assert_error(&resp, 400, "invalid_request");
        assert_others_ok(gw.addr);
    }
}

/// JSON that breaks off after a valid `model`: the contract's 400 `invalid_request`.
#[test]
fn truncated_json_after_model_is_400_invalid_request() {
    let (_sim, gw) = setup("", "");
    let resp = request(gw.addr, "POST", CHAT, &[], br#"{"model": "m", "#);
    assert_error(&resp, 400, "invalid_request");
}

// 2.
#[test]
fn missing_model_is_400_naming_model() {
    let (_sim, gw) = setup("", "");
    for body in [
        &br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#[..],
        br#"{}"#,
        br#"{"options":{"model":"m"}}"#,
    ] {
        let resp = request(gw.addr, "POST", CHAT, &[], body);
        let message = assert_error(&resp, 400, "invalid_request");
        assert!(message.contains("model"), "message: {message}");
        assert_others_ok(gw.addr);
    }
}

// 3.
#[test]
fn unknown_model_is_404_listing_known_models() {
    let sim_proc = sim("sim-m", 0, 1000);
    let config = format!(
        "{GATEWAY_HEAD}{}{}",
        static_model("m", "sim-m", sim_proc.addr, ""),
        static_model("other", "sim-m", sim_proc.addr, "aliases = [\"o\"]"),
    );
    let gw = gateway(&config);
    let resp = request(gw.addr, "POST", CHAT, &[], &chat_body("nope"));
    let message = assert_error(&resp, 404, "model_not_found");
    let words: Vec<&str> = message
        .split(|c: char| !(c.is_alphanumeric() || "-_/.".contains(c)))
        .map(|w| w.trim_end_matches('.'))
        .collect();
    for name in ["nope", "m", "other"] {
        assert!(words.contains(&name), "{name} not in message: {message}");
    }
    assert_others_ok(gw.addr);
    // The alias routes.
    let resp = request(gw.addr, "POST", CHAT, &[], &chat_body("o"));
    assert_eq!(resp.status, 200, "{}", resp.text());
}

// 4.
#[test]
fn body_over_max_body_bytes_is_413() {
    let (_sim, gw) = setup("max_body_bytes = 1024\n", "");
    let mut body = br#"{"model":"m","messages":[{"role":"user","content":""#.to_vec();
    body.resize(2048 - 4, b'a');
    body.extend_from_slice(br#""}]}"#);
    assert_eq!(body.len(), 2048);
    let (resp, _reader) = send_raw(gw.addr, &raw_request("POST", CHAT, &[], &body));
    assert_error(&resp, 413, "body_too_large");
    assert_others_ok(gw.addr);
    // At the limit is fine.
    let small = chat_body("m");
    assert!(small.len() <= 1024);
    assert_eq!(request(gw.addr, "POST", CHAT, &[], &small).status, 200);
}

// 5.
#[test]
fn smuggling_shapes_are_400_and_close() {
    let (_sim, gw) = setup("", "");
    let body = chat_body("m");
    let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");

    let mut cl_and_te = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        chunked.len()
    )
    .into_bytes();
    cl_and_te.extend_from_slice(&chunked);
    // A smuggled second request, which must never be answered.
    cl_and_te.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");

    let mut two_cl = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\n",
        body.len(),
        body.len() + 5
    )
    .into_bytes();
    two_cl.extend_from_slice(&body);
    two_cl.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");

    for (what, bytes) in [("CL + TE", cl_and_te), ("two CLs", two_cl)] {
        let (resp, mut reader) = send_raw(gw.addr, &bytes);
        assert_eq!(resp.status, 400, "{what}: {}", resp.text());
        assert_error(&resp, 400, "invalid_request");
        assert!(is_closed(&mut reader), "{what}: the connection stayed open");
        assert_others_ok(gw.addr);
    }
}

// 6.
#[test]
fn oversize_headers_are_431() {
    let (_sim, gw) = setup("max_header_bytes = 4096\n", "");
    // The head is not finished: the gateway must stop buffering it at the limit.
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n",
        "a".repeat(8 * 1024)
    );
    let (resp, mut reader) = send_raw(gw.addr, head.as_bytes());
    assert_error(&resp, 431, "headers_too_large");
    assert!(is_closed(&mut reader), "the connection stayed open");
    assert_others_ok(gw.addr);
}

/// A whole request whose head is over the limit, sent in one write.
#[test]
fn oversize_complete_head_is_431() {
    let (_sim, gw) = setup("max_header_bytes = 4096\n", "");
    let big = "a".repeat(8 * 1024);
    let (resp, _reader) = send_raw(
        gw.addr,
        &raw_request("POST", CHAT, &[("X-Big", &big)], &chat_body("m")),
    );
    assert_error(&resp, 431, "headers_too_large");
    assert_others_ok(gw.addr);
}

/// The same limit when the head trickles in, so it is never seen whole in one read.
#[test]
fn oversize_headers_in_pieces_are_431() {
    let (_sim, gw) = setup("max_header_bytes = 4096\n", "");
    let mut stream = connect(gw.addr);
    stream.set_nodelay(true).unwrap();
    stream
        .write_all(format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .unwrap();
    for i in 0..16 {
        // Stop writing once the gateway has answered and closed.
        if stream
            .write_all(format!("X-H{i}: {}\r\n", "b".repeat(500)).as_bytes())
            .is_err()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut reader = BufReader::new(stream);
    let resp = read_response(&mut reader).expect("read response");
    assert_error(&resp, 431, "headers_too_large");
    assert_others_ok(gw.addr);
}

/// A head split over two reads is one head.
#[test]
fn head_split_across_reads_is_parsed() {
    let (_sim, gw) = setup("", "");
    let bytes = raw_request("POST", CHAT, &[], &chat_body("m"));
    let mut stream = connect(gw.addr);
    stream.set_nodelay(true).unwrap();
    stream.write_all(&bytes[..20]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stream.write_all(&bytes[20..]).unwrap();
    let resp = read_response(&mut BufReader::new(stream)).expect("read response");
    assert_eq!(resp.status, 200, "{}", resp.text());
}

// 7.
#[test]
fn slow_headers_get_408_and_others_are_served() {
    let (_sim, gw) = setup("", "[timeouts]\nheader_read_ms = 300\n");
    let mut slow = connect(gw.addr);
    let started = Instant::now();
    slow.write_all(format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\n").as_bytes())
        .unwrap();
    // While the slow head is pending, another client is served.
    assert_others_ok(gw.addr);
    let mut reader = BufReader::new(slow);
    let resp = read_response(&mut reader).expect("a 408 response");
    let elapsed = started.elapsed();
    assert_error(&resp, 408, "request_timeout");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(2),
        "408 after {elapsed:?}"
    );
    assert!(is_closed(&mut reader), "the connection stayed open");
    assert_others_ok(gw.addr);
}

// 8.
#[test]
fn keep_alive_survives_a_handled_error() {
    let (_sim, gw) = setup("", "");
    let stream = connect(gw.addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(&raw_request("POST", CHAT, &[], &chat_body("nope")))
        .unwrap();
    let resp = read_response(&mut reader).expect("404 response");
    assert_error(&resp, 404, "model_not_found");
    writer
        .write_all(&raw_request("POST", CHAT, &[], &chat_body("m")))
        .unwrap();
    let resp = read_response(&mut reader).expect("second response on the same connection");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["object"], "chat.completion");
}

/// After a proxied 200 the connection carries the next request.
#[test]
fn keep_alive_after_a_proxied_response() {
    let (_sim, gw) = setup("", "");
    let stream = connect(gw.addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..2 {
        writer
            .write_all(&raw_request("POST", CHAT, &[], &chat_body("m")))
            .unwrap();
        let resp = read_response(&mut reader).expect("a response on the same connection");
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    writer
        .write_all(&raw_request("GET", "/health", &[], b""))
        .unwrap();
    assert_eq!(read_response(&mut reader).expect("health").status, 200);
}

// 9.
#[test]
fn chunked_request_body_is_routed_and_rewritten() {
    let (_sim, gw) = setup("", "");
    let body = chat_body("m");
    let (a, b) = body.split_at(body.len() / 2);
    let mut bytes =
        format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for piece in [a, b] {
        bytes.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        bytes.extend_from_slice(piece);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    let (resp, _reader) = send_raw(gw.addr, &bytes);
    // The sim answers 404 unless the model was rewritten to "sim-m".
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["object"], "chat.completion");
    assert_eq!(resp.json()["model"], "sim-m");
}

// 10.
#[test]
fn expect_100_continue() {
    let (_sim, gw) = setup("", "");
    let body = chat_body("m");
    let stream = connect(gw.addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(
            format!(
                "POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    // No body yet: the interim response must come first.
    let mut line = String::new();
    reader.read_line(&mut line).expect("100 Continue");
    assert!(line.starts_with("HTTP/1.1 100"), "got {line:?}");
    let mut blank = String::new();
    reader.read_line(&mut blank).unwrap();
    assert_eq!(blank, "\r\n");
    writer.write_all(&body).unwrap();
    let resp = read_response(&mut reader).expect("final response");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["object"], "chat.completion");
}

/// Each request an upstream received: its headers (lower-cased names) and body.
type Seen = Arc<Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>;

/// An upstream that answers each request with its exact body, and records what it got.
fn echo_upstream() -> (SocketAddr, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let addr = fake_upstream(move |stream| {
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        while let Some((_line, headers, body)) = read_request(&mut reader) {
            let mut resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            resp.extend_from_slice(&body);
            record.lock().unwrap().push((headers, body));
            if writer.write_all(&resp).is_err() {
                return;
            }
        }
    });
    (addr, seen)
}

// 11.
#[test]
fn model_rewrite_passes_every_other_byte() {
    let (up, seen) = echo_upstream();
    let config = format!(
        "{GATEWAY_HEAD}{}",
        static_model("alias-test", "org/Real-Model-1", up, "aliases = [\"a1\"]")
    );
    let gw = gateway(&config);
    let cases: [(&str, &str); 3] = [
        (
            r#"{ "messages":[{"role":"user","content":"h\u00e9llo \"q\" {}[] ü 🦀","model":"x"}], "model" :  "alias-test" ,"temperature":0.2, "n": {"a":[1,{"b":"\"model\":\"alias-test\""}]}}"#,
            r#""alias-test""#,
        ),
        (
            "{\n\t\"model\":\"a1\",\r\n \"stop\": [\"}\", \"\\\\\"], \"x\": null }",
            r#""a1""#,
        ),
        // An escaped spelling of the same name.
        (
            r#"{"model":"alias\u002dtest","messages":[]}"#,
            r#""alias\u002dtest""#,
        ),
    ];
    for (original, literal) in cases {
        let expected = original.replacen(literal, r#""org/Real-Model-1""#, 1);
        assert_ne!(expected, original);
        let resp = request(gw.addr, "POST", CHAT, &[], original.as_bytes());
        assert_eq!(resp.status, 200, "{original}: {}", resp.text());
        assert_eq!(resp.text(), expected, "the forwarded body differs");
        let (headers, body) = seen
            .lock()
            .unwrap()
            .pop()
            .expect("upstream saw the request");
        assert_eq!(String::from_utf8_lossy(&body), expected);
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.clone());
        assert_eq!(length, Some(expected.len().to_string()), "{headers:?}");
        assert_eq!(
            resp.header("content-length"),
            Some(&*expected.len().to_string())
        );
    }
}

// 12.
#[test]
fn upstream_errors_pass_through_unchanged() {
    let sim_proc = sim("sim-m", 0, 1000);
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}",
        static_model("m", "wrong", sim_proc.addr, "")
    ));
    let via_gateway = request(gw.addr, "POST", CHAT, &[], &chat_body("m"));
    let direct = request(sim_proc.addr, "POST", CHAT, &[], &chat_body("wrong"));
    assert_eq!(direct.status, 404, "{}", direct.text());
    assert_eq!(via_gateway.status, 404, "{}", via_gateway.text());
    assert_eq!(via_gateway.text(), direct.text());
    let v = via_gateway.json();
    assert_eq!(v["object"], "error", "{v}");
    assert_eq!(v["type"], "NotFoundError", "{v}");
    assert!(
        v.get("error").is_none(),
        "the gateway rewrote the body: {v}"
    );
}

// 13.
#[test]
fn gateway_endpoints() {
    let sim_proc = sim("sim-m", 0, 1000);
    let config = format!(
        "{GATEWAY_HEAD}admin_token = \"s3cret-admin\"\napi_keys = [\"k-123\"]\n{}{}",
        static_model("m", "sim-m", sim_proc.addr, ""),
        static_model("dead", "dead", dead_addr(), ""),
    );
    let gw = gateway(&config);

    let health = get(gw.addr, "/health");
    assert_eq!(health.status, 200, "{}", health.text());

    let models = request(
        gw.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer k-123")],
        b"",
    );
    assert_eq!(models.status, 200, "{}", models.text());
    let v = models.json();
    assert_eq!(v["object"], "list", "{v}");
    let mut ids: Vec<_> = v["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model", "{m}");
            m["id"].as_str().unwrap_or("").to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["dead", "m"]);

    let listing = get(gw.addr, "/gateway/models");
    assert_eq!(listing.status, 200, "{}", listing.text());
    let v = listing.json();
    let arr = v.as_array().expect("a JSON array");
    assert_eq!(arr.len(), 2, "{v}");
    for m in arr {
        for key in [
            "name",
            "state",
            "in_flight",
            "queued",
            "endpoints",
            "vram_mib",
            "pinned",
            "last_used_ms",
        ] {
            assert!(m.get(key).is_some(), "{key} missing in {m}");
        }
        assert_eq!(m["state"], "ready", "static models are ready: {m}");
        assert!(m["endpoints"].is_array(), "{m}");
        assert!(m["in_flight"].is_u64() && m["queued"].is_u64(), "{m}");
    }

    let config_resp = get(gw.addr, "/gateway/config");
    assert_eq!(config_resp.status, 200, "{}", config_resp.text());
    let text = config_resp.text();
    assert_eq!(
        config_resp.json()["gateway"]["log_level"],
        "debug",
        "{text}"
    );
    assert!(!text.contains("s3cret-admin"), "admin_token leaked: {text}");
    assert!(!text.contains("k-123"), "an api key leaked: {text}");

    let missing = get(gw.addr, "/no/such/path");
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert!(
        missing.json()["error"]["message"].is_string(),
        "{}",
        missing.text()
    );

    let delete = request(gw.addr, "DELETE", "/health", &[], b"");
    assert_eq!(delete.status, 405, "{}", delete.text());
    assert!(
        delete.json()["error"]["message"].is_string(),
        "{}",
        delete.text()
    );
}

// 14.
#[test]
fn api_keys_guard_v1() {
    let (_sim, gw) = setup("api_keys = [\"k-123\"]\n", "");
    let body = chat_body("m");
    let resp = request(gw.addr, "POST", CHAT, &[], &body);
    assert_error(&resp, 401, "unauthorized");
    let resp = request(
        gw.addr,
        "POST",
        CHAT,
        &[("Authorization", "Bearer wrong")],
        &body,
    );
    assert_error(&resp, 401, "unauthorized");
    let resp = request(
        gw.addr,
        "POST",
        CHAT,
        &[("Authorization", "Bearer k-123")],
        &body,
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(get(gw.addr, "/health").status, 200);
}

/// The contract puts all of `/v1/*` behind `api_keys`, the model list included.
#[test]
fn api_keys_guard_v1_models() {
    let (_sim, gw) = setup("api_keys = [\"k-123\"]\n", "");
    let resp = get(gw.addr, "/v1/models");
    assert_error(&resp, 401, "unauthorized");
    let resp = request(
        gw.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer k-123")],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
}

// 15.
#[test]
fn log_level_needs_admin_token() {
    let (_sim, gw) = setup("admin_token = \"tok\"\n", "");
    let put = |headers: &[(&str, &str)], body: &[u8]| {
        request(gw.addr, "PUT", "/gateway/log-level", headers, body)
    };
    let trace = br#"{"level":"trace"}"#;
    assert_error(&put(&[], trace), 401, "unauthorized");
    assert_error(
        &put(&[("Authorization", "Bearer nope")], trace),
        401,
        "unauthorized",
    );
    assert_eq!(
        get(gw.addr, "/gateway/config").json()["gateway"]["log_level"],
        "debug"
    );

    let resp = put(&[("Authorization", "Bearer tok")], trace);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let config = get(gw.addr, "/gateway/config");
    assert!(
        config.text().contains(r#""log_level":"trace""#),
        "{}",
        config.text()
    );
    assert!(!config.text().contains("\"tok\""), "admin_token leaked");

    let resp = put(&[("Authorization", "Bearer tok")], br#"{"level":"loud"}"#);
    assert_error(&resp, 400, "invalid_request");
    let resp = put(&[("Authorization", "Bearer tok")], b"not json");
    assert_error(&resp, 400, "invalid_request");
    assert_eq!(
        get(gw.addr, "/gateway/config").json()["gateway"]["log_level"],
        "trace"
    );
    assert_others_ok(gw.addr);
}

// 16.
fn check(config: &str) -> (Option<i32>, String, String) {
    let dir = temp_dir("check");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("check").arg("--config").arg(&path);
    run_to_exit(cmd)
}

const DUPLICATE_MODELS: &str = "\
[[models]]\nname = \"a\"\nruntime = \"static\"\nendpoints = [\"https://x:1\"]\n\n\
[[models]]\nname = \"a\"\nruntime = \"static\"\nendpoints = [\"http://127.0.0.1:1\"]\n";

#[test]
fn check_reports_every_error() {
    let good = format!(
        "{GATEWAY_HEAD}{}",
        static_model("m", "sim-m", dead_addr(), "")
    );
    let (code, out, err) = check(&good);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");

    let bad = format!("[gateway]\nmax_concurrent = 0\n\n{DUPLICATE_MODELS}");
    let (code, out, err) = check(&bad);
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    for field in [
        "gateway.max_concurrent",
        "models[0].endpoints",
        "models[1].name",
    ] {
        assert!(err.contains(field), "stderr does not name {field}:\n{err}");
    }

    let (code, out, err) = check("[gateway]\nfoo = 1\n");
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("gateway.foo"), "stderr: {err}");
}

/// An unknown key must not hide the file's other errors.
#[test]
fn check_reports_unknown_keys_with_other_errors() {
    let bad = format!("[gateway]\nmax_concurrent = 0\nfoo = 1\n\n{DUPLICATE_MODELS}");
    let (code, out, err) = check(&bad);
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    for field in ["gateway.max_concurrent", "foo", "endpoints", "name"] {
        assert!(err.contains(field), "stderr does not name {field}:\n{err}");
    }
}

// 17.
#[test]
fn env_overrides() {
    let sim_proc = sim("sim-m", 0, 1000);
    let config = format!(
        "{GATEWAY_HEAD}{}{}",
        static_model("m", "sim-m", sim_proc.addr, ""),
        static_model(
            "own",
            "sim-m",
            sim_proc.addr,
            "max_concurrent = 3\nmax_queue_size = 4"
        ),
    );
    let gw = gateway_with_env(
        &config,
        &[
            ("GATEWAY_MAX_CONCURRENT", "7"),
            ("GATEWAY_MAX_QUEUE_SIZE", "9"),
            ("LOG_LEVEL", "warn"),
            ("GATEWAY_LISTEN", "127.0.0.1:0"),
        ],
    );
    let models = get(gw.addr, "/gateway/models").json();
    let find = |name: &str| {
        models
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {models}"))
            .clone()
    };
    let m = find("m");
    assert_eq!(m["max_concurrent"], 7, "{m}");
    assert_eq!(m["max_queue_size"], 9, "{m}");
    let own = find("own");
    assert_eq!(own["max_concurrent"], 3, "per-model overrides win: {own}");
    assert_eq!(own["max_queue_size"], 4, "per-model overrides win: {own}");
    let config = get(gw.addr, "/gateway/config").json();
    assert_eq!(config["gateway"]["log_level"], "warn", "{config}");
    assert_eq!(config["gateway"]["max_concurrent"], 7, "{config}");
    assert_others_ok(gw.addr);

    let dir = temp_dir("env");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config_text_for_bad_env(sim_proc.addr)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("--config")
        .arg(&path)
        .env("GATEWAY_MAX_CONCURRENT", "abc");
    let (code, out, err) = run_to_exit(cmd);
    assert_eq!(code, Some(2), "stdout: {out}\nstderr: {err}");
    assert!(err.contains("GATEWAY_MAX_CONCURRENT"), "stderr: {err}");
    assert!(!out.contains("listening on"), "it served anyway: {out}");
}

fn config_text_for_bad_env(addr: SocketAddr) -> String {
    format!("{GATEWAY_HEAD}{}", static_model("m", "sim-m", addr, ""))
}
