//! Fault and admission tests: exact burst accounting, queue timeouts, client aborts at every
//! stage, connect retries, stale pooled connections, upstream timeouts and resets, streaming
//! latency, backpressure on large bodies, and least-outstanding balancing.
mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIM_MODEL: &str = "sim-m";
const CHAT: &str = "/v1/chat/completions";

/// A gateway config: `GATEWAY_HEAD`, extra `[gateway]` keys, other tables, then the models.
fn config(gateway_keys: &str, tables: &str, models: &str) -> String {
    format!("{GATEWAY_HEAD}{gateway_keys}\n{tables}\n{models}")
}

/// A sample from a `/metrics` page, 0 when the series is absent (counters render lazily).
fn metric_or_zero(addr: SocketAddr, series: &str) -> f64 {
    metric_in(&get(addr, "/metrics").text(), series).unwrap_or(0.0)
}

fn in_flight(gw: SocketAddr) -> f64 {
    metric(gw, "gateway_in_flight{model=\"m\"}")
}

fn queue_depth(gw: SocketAddr) -> f64 {
    metric(gw, "gateway_queue_depth{model=\"m\"}")
}

fn retries(gw: SocketAddr) -> f64 {
    metric_or_zero(gw, "gateway_upstream_retries_total{model=\"m\"}")
}

fn sim_running(sim: SocketAddr) -> f64 {
    metric(
        sim,
        &format!("vllm:num_requests_running{{model_name=\"{SIM_MODEL}\"}}"),
    )
}

/// Open a connection and send one chat request on it without reading anything.
fn send_chat(addr: SocketAddr, body: &serde_json::Value) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .write_all(&raw_request(
            "POST",
            CHAT,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        ))
        .expect("write request");
    stream
}

/// Read the status line and headers; returns the status and the raw head text.
fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read head");
        assert!(n > 0, "connection closed inside the head: {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad head {head:?}"));
    (status, head)
}

/// Read until EOF or error; returns the bytes read and whether the read ended by a
/// timeout (a hang) rather than a close or reset.
fn read_until_close(reader: &mut impl Read) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let hang = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                return (out, hang);
            }
        }
    }
}

/// A fake upstream that reads one request and then holds the connection, saying nothing,
/// until the gateway closes it. `prefix` is written after the request is read.
fn stalling_upstream(prefix: &'static [u8]) -> SocketAddr {
    fake_upstream(move |stream| {
        let mut reader = BufReader::new(stream);
        if read_request(&mut reader).is_none() {
            return;
        }
        let mut stream = reader.get_ref().try_clone().unwrap();
        if stream.write_all(prefix).is_err() {
            return;
        }
        let _ = stream.flush();
        // Hold the connection until the peer goes away (or a long safety limit).
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut sink = [0u8; 1024];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    })
}

fn assert_counters_zero(gw: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(5), || counters_zero(gw, "m")),
        "counters did not return to zero:\n{}",
        get(gw, "/metrics").text()
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
fn burst_accounting_is_exact() {
    let sim = sim(SIM_MODEL, 1500, 1000);
    let gw = gateway(&config(
        "queue_timeout_ms = 20000\n",
        "",
        &static_model(
            "m",
            SIM_MODEL,
            sim.addr,
            "max_concurrent = 2\nmax_queue_size = 3",
        ),
    ));
    let body = chat("m", 1, false);

    // Open every connection first, then send all nine requests back to back.
    let mut streams: Vec<TcpStream> = (0..9)
        .map(|_| {
            let s = TcpStream::connect(gw.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    let req = raw_request(
        "POST",
        CHAT,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    for s in &mut streams {
        s.write_all(&req).expect("write");
    }
    let sent = Instant::now();

    let readers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                let r = read_response(&mut BufReader::new(s)).expect("read response");
                (sent.elapsed(), r)
            })
        })
        .collect();
    let results: Vec<(Duration, Response)> =
        readers.into_iter().map(|h| h.join().unwrap()).collect();

    let ok: Vec<_> = results.iter().filter(|(_, r)| r.status == 200).collect();
    let rejected: Vec<_> = results.iter().filter(|(_, r)| r.status == 429).collect();
    let statuses: Vec<_> = results.iter().map(|(t, r)| (r.status, *t)).collect();
    assert_eq!(ok.len(), 5, "expected 5 x 200: {statuses:?}");
    assert_eq!(rejected.len(), 4, "expected 4 x 429: {statuses:?}");
    for (t, r) in &rejected {
        assert_eq!(r.error_code(), "queue_full", "{}", r.text());
        assert!(
            r.header("Retry-After").is_some(),
            "429 without Retry-After: {:?}",
            r.headers
        );
        assert!(
            *t < Duration::from_secs(1),
            "429 took {t:?}: it must be answered at once"
        );
    }
    for (t, _) in &ok {
        // The fastest 200 needs the sim's full time to first token.
        assert!(*t >= Duration::from_millis(1400), "200 after only {t:?}");
    }

    let page = get(gw.addr, "/metrics").text();
    assert_eq!(
        metric_in(&page, "gateway_requests_total{model=\"m\",code=\"429\"}"),
        Some(4.0),
        "{page}"
    );
    assert_eq!(
        metric_in(
            &page,
            "gateway_rejected_total{model=\"m\",reason=\"queue_full\"}"
        ),
        Some(4.0),
        "{page}"
    );
    assert_eq!(metric(sim.addr, "sim_requests_total"), 5.0);
    assert_counters_zero(gw.addr);
}

#[test]
fn queue_timeout_answers_429() {
    let sim = sim(SIM_MODEL, 2000, 1000);
    let gw = gateway(&config(
        "queue_timeout_ms = 300\n",
        "",
        &static_model(
            "m",
            SIM_MODEL,
            sim.addr,
            "max_concurrent = 1\nmax_queue_size = 5",
        ),
    ));
    let first = send_chat(gw.addr, &chat("m", 1, false));
    assert!(eventually(Duration::from_secs(2), || in_flight(gw.addr) == 1.0));

    let start = Instant::now();
    let second = post_json(gw.addr, CHAT, &chat("m", 1, false));
    let took = start.elapsed();
    assert_eq!(second.status, 429, "{}", second.text());
    assert_eq!(second.error_code(), "queue_timeout", "{}", second.text());
    assert!(
        took >= Duration::from_millis(250) && took <= Duration::from_millis(1500),
        "queue timeout after {took:?}, configured 300 ms"
    );
    assert_eq!(metric(gw.addr, "gateway_queue_depth{model=\"m\"}"), 0.0);

    let r = read_response(&mut BufReader::new(first)).expect("first response");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_counters_zero(gw.addr);
    assert_eq!(metric(sim.addr, "sim_requests_total"), 1.0);
}

#[test]
fn abort_before_response_cancels_upstream() {
    let sim = sim(SIM_MODEL, 3000, 1000);
    let gw = gateway(&config("", "", &static_model("m", SIM_MODEL, sim.addr, "")));
    let sent = Instant::now();
    let stream = send_chat(gw.addr, &chat("m", 1, false));
    assert!(
        eventually(Duration::from_millis(1000), || sim_running(sim.addr) == 1.0),
        "the request never reached the sim"
    );
    std::thread::sleep(Duration::from_millis(300).saturating_sub(sent.elapsed()));
    drop(stream);
    let dropped = Instant::now();

    assert!(
        eventually(Duration::from_secs(2), || counters_zero(gw.addr, "m")),
        "gateway counters not zero 2 s after the client left:\n{}",
        get(gw.addr, "/metrics").text()
    );
    assert!(
        eventually(Duration::from_secs(2), || {
            metric(sim.addr, "sim_requests_cancelled_total") == 1.0 && sim_running(sim.addr) == 0.0
        }),
        "the sim kept generating after the client left (upstream not cancelled):\n{}",
        get(sim.addr, "/metrics").text()
    );
    let seen = sent.elapsed();
    assert!(
        seen < Duration::from_millis(2800),
        "cancellation seen only {seen:?} after sending ({:?} after the abort); ttft is 3 s",
        dropped.elapsed()
    );
    assert_eq!(metric(sim.addr, "sim_requests_completed_total"), 0.0);
}

#[test]
fn abort_mid_stream_cancels_upstream() {
    let sim = sim(SIM_MODEL, 0, 10);
    let gw = gateway(&config("", "", &static_model("m", SIM_MODEL, sim.addr, "")));
    let stream = send_chat(gw.addr, &chat("m", 100, true));
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    let mut events = 0;
    let mut line = String::new();
    while events < 2 {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read event") > 0,
            "stream ended early"
        );
        if line.starts_with("data: ") {
            events += 1;
        }
    }
    assert_eq!(in_flight(gw.addr), 1.0);
    drop(reader);

    assert_counters_zero(gw.addr);
    assert!(
        eventually(Duration::from_secs(3), || {
            metric(sim.addr, "sim_requests_cancelled_total") == 1.0 && sim_running(sim.addr) == 0.0
        }),
        "the sim kept streaming after the client left:\n{}",
        get(sim.addr, "/metrics").text()
    );
    assert_eq!(metric(sim.addr, "sim_requests_completed_total"), 0.0);
}

#[test]
fn abort_while_queued_releases_queue_slot() {
    let sim = sim(SIM_MODEL, 3000, 1000);
    let gw = gateway(&config(
        "queue_timeout_ms = 20000\n",
        "",
        &static_model(
            "m",
            SIM_MODEL,
            sim.addr,
            "max_concurrent = 1\nmax_queue_size = 5",
        ),
    ));
    let first = send_chat(gw.addr, &chat("m", 1, false));
    assert!(eventually(Duration::from_secs(2), || in_flight(gw.addr) == 1.0));
    let started = Instant::now();
    let second = send_chat(gw.addr, &chat("m", 1, false));
    assert!(
        eventually(Duration::from_secs(2), || queue_depth(gw.addr) == 1.0),
        "second request not queued:\n{}",
        get(gw.addr, "/metrics").text()
    );
    drop(second);

    assert!(
        eventually(Duration::from_millis(1500), || queue_depth(gw.addr) == 0.0),
        "queue depth stuck after the queued client left:\n{}",
        get(gw.addr, "/metrics").text()
    );
    assert!(
        started.elapsed() < Duration::from_millis(2800),
        "queue only drained after {:?}, when the first request was about to finish",
        started.elapsed()
    );
    assert_eq!(
        in_flight(gw.addr),
        1.0,
        "the first request must still be in flight"
    );

    let r = read_response(&mut BufReader::new(first)).expect("first response");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_counters_zero(gw.addr);
    // Give a wrongly dequeued request time to reach the sim before checking it never did.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        metric(sim.addr, "sim_requests_total"),
        1.0,
        "the aborted queued request was forwarded anyway"
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn connect_failures_are_retried_then_502() {
    let dead = dead_addr();
    let gw = gateway(&config(
        "",
        "[retry]\nattempts = 3\nbackoff_ms = 50\nmultiplier = 2.0\n[timeouts]\nconnect_ms = 500\n",
        &static_model("m", SIM_MODEL, dead, ""),
    ));
    let start = Instant::now();
    let r = post_json(gw.addr, CHAT, &chat("m", 1, false));
    let took = start.elapsed();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.error_code(), "upstream_unavailable", "{}", r.text());
    assert!(
        took >= Duration::from_millis(140),
        "502 after {took:?}: backoff 50 + 100 ms skipped"
    );
    assert!(took < Duration::from_secs(3), "502 took {took:?}");
    assert_eq!(retries(gw.addr), 2.0);
    assert_eq!(
        metric_or_zero(gw.addr, "gateway_requests_total{model=\"m\",code=\"502\"}"),
        1.0
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn connect_retry_then_success() {
    let addr = dead_addr();
    let gw = gateway(&config(
        "",
        "[retry]\nattempts = 8\nbackoff_ms = 100\n",
        &static_model("m", SIM_MODEL, addr, ""),
    ));
    // The upstream appears only once the gateway has counted a failed connect, so the first
    // attempt fails however slow the machine is.
    let gw_addr = gw.addr;
    let server = std::thread::spawn(move || {
        assert!(
            eventually(Duration::from_secs(10), || retries(gw_addr) >= 1.0),
            "no connect retry was counted"
        );
        let listener = TcpListener::bind(addr).expect("rebind the dead address");
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream);
        let req = read_request(&mut reader).expect("request");
        let mut stream = reader.into_inner();
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        stream.flush().unwrap();
        req
    });
    let r = post_json(gw.addr, CHAT, &chat("m", 1, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"{}");
    let (line, _, body) = server.join().unwrap();
    assert!(line.starts_with("POST /v1/chat/completions"), "{line}");
    let forwarded: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(forwarded["model"], SIM_MODEL);
    assert!(
        retries(gw.addr) >= 1.0,
        "the first connect cannot have succeeded"
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn stale_pooled_connection_is_retried() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let upstream = fake_upstream(move |stream| {
        count.fetch_add(1, Ordering::SeqCst);
        let mut reader = BufReader::new(stream);
        if read_request(&mut reader).is_none() {
            return;
        }
        let mut stream = reader.into_inner();
        // Keep-alive by default in HTTP/1.1, no "Connection: close": then close anyway.
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        let _ = stream.flush();
        std::thread::sleep(Duration::from_millis(50));
        drop(stream);
    });
    // One worker, so both requests meet the same per-worker pool.
    let head = GATEWAY_HEAD.replace("workers = 2", "workers = 1");
    assert_ne!(head, GATEWAY_HEAD);
    let gw = gateway(&format!(
        "{head}\n[timeouts]\npool_idle_ms = 10000\n{}",
        static_model("m", SIM_MODEL, upstream, "")
    ));

    let body = chat("m", 1, false);
    let r1 = post_json(gw.addr, CHAT, &body);
    assert_eq!(r1.status, 200, "{}", r1.text());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // The upstream has closed the pooled connection by now, without saying so in its head.
    std::thread::sleep(Duration::from_millis(200));
    let r2 = post_json(gw.addr, CHAT, &body);
    assert_eq!(
        r2.status,
        200,
        "second request over a stale pooled connection: {}",
        r2.text()
    );
    assert_eq!(r2.body, b"{}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a fresh upstream connection was expected"
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn first_byte_timeout_gives_504() {
    let upstream = stalling_upstream(b"");
    let gw = gateway(&config(
        "",
        "[timeouts]\nfirst_byte_ms = 300\n",
        &static_model("m", SIM_MODEL, upstream, ""),
    ));
    let start = Instant::now();
    let r = post_json(gw.addr, CHAT, &chat("m", 1, false));
    let took = start.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.error_code(), "upstream_timeout", "{}", r.text());
    assert!(
        took >= Duration::from_millis(280) && took <= Duration::from_millis(1500),
        "504 after {took:?}, first_byte_ms = 300"
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn idle_timeout_mid_stream_closes_client() {
    let upstream = stalling_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: x\n\n\r\n",
    );
    let gw = gateway(&config(
        "",
        "[timeouts]\nidle_ms = 300\n",
        &static_model("m", SIM_MODEL, upstream, ""),
    ));
    let stream = send_chat(gw.addr, &chat("m", 1, true));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let (status, head) = read_head(&mut reader);
    assert_eq!(status, 200, "{head}");
    // Read until the first event arrives (chunk framing lines come before it).
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read event") > 0,
            "closed before the event"
        );
        if line.trim_end() == "data: x" {
            break;
        }
    }
    let event_at = Instant::now();
    let (rest, hang) = read_until_close(&mut reader);
    let took = event_at.elapsed();
    assert!(
        !hang,
        "gateway kept the stalled stream open past {took:?}; idle_ms = 300"
    );
    assert!(
        took <= Duration::from_millis(1500),
        "closed only after {took:?}"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("0\r\n\r\n"),
        "a timed-out stream must not end with a clean terminating chunk: {rest:?}"
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn upstream_reset_mid_response_truncates() {
    let upstream = fake_upstream(|stream| {
        let mut reader = BufReader::new(stream);
        if read_request(&mut reader).is_none() {
            return;
        }
        let mut stream = reader.into_inner();
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789");
        let _ = stream.flush();
        std::thread::sleep(Duration::from_millis(50));
        // Dropping closes the connection with 990 bytes still owed.
    });
    let gw = gateway(&config("", "", &static_model("m", SIM_MODEL, upstream, "")));
    let stream = send_chat(gw.addr, &chat("m", 1, false));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut reader = BufReader::new(stream);
    let (status, head) = read_head(&mut reader);
    let (body, hang) = read_until_close(&mut reader);
    let took = start.elapsed();
    assert!(
        !hang,
        "client hung for {took:?} after the upstream reset (head {head:?})"
    );
    // The head went out when it arrived; then the client gets what there was, and a close.
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 1000"),
        "relayed head should keep the length so the client can see truncation: {head}"
    );
    assert_eq!(body, b"0123456789", "the bytes sent before the reset");
    assert!(took < Duration::from_secs(3), "close took {took:?}");
    assert!(
        eventually(Duration::from_secs(2), || metric_or_zero(
            gw.addr,
            "gateway_requests_total{model=\"m\",code=\"502\"}"
        ) == 1.0),
        "a truncated response should count as an upstream failure:\n{}",
        get(gw.addr, "/metrics").text()
    );
    assert_counters_zero(gw.addr);
}

#[test]
fn sse_timing_matches_direct() {
    let sim = sim(SIM_MODEL, 100, 10);
    let gw = gateway(&config("", "", &static_model("m", SIM_MODEL, sim.addr, "")));
    let mut worst = Vec::new();
    // Timing on a shared machine is noisy: one clean run out of three proves no batching delay.
    for _ in 0..3 {
        let direct = stream_events(sim.addr, &chat(SIM_MODEL, 5, true));
        let via = stream_events(gw.addr, &chat("m", 5, true));
        assert_eq!(direct.len(), via.len(), "direct {direct:?}\nvia {via:?}");
        assert!(via.len() >= 5, "{via:?}");
        assert_eq!(via.last().unwrap().1, "[DONE]");
        let gap = via[4].0.saturating_sub(via[1].0);
        assert!(
            gap >= Duration::from_millis(250),
            "events batched: 1 -> 4 in {gap:?}: {via:?}"
        );
        let diffs: Vec<i128> = direct
            .iter()
            .zip(&via)
            .map(|((d, _), (v, _))| v.as_millis() as i128 - d.as_millis() as i128)
            .collect();
        if diffs.iter().all(|d| d.abs() <= 30) {
            assert_counters_zero(gw.addr);
            return;
        }
        worst.push(diffs);
    }
    panic!("gateway event times differ from direct by more than 30 ms (ms per event): {worst:?}");
}

#[test]
fn large_response_is_not_buffered() {
    const LEN: usize = 104_857_600;
    let upstream = fake_upstream(|stream| {
        let mut reader = BufReader::new(stream);
        if read_request(&mut reader).is_none() {
            return;
        }
        let mut stream = reader.into_inner();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {LEN}\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        let zeros = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < LEN {
            let n = zeros.len().min(LEN - sent);
            if stream.write_all(&zeros[..n]).is_err() {
                return;
            }
            sent += n;
        }
    });
    let gw = gateway(&config("", "", &static_model("m", SIM_MODEL, upstream, "")));
    // Warm up so the baseline includes the pools and buffers a first request allocates.
    let warm = get(gw.addr, "/metrics");
    assert_eq!(warm.status, 200);
    let rss_before = gw.rss_kib();
    assert!(rss_before > 0, "no RSS for the gateway");

    let start = Instant::now();
    let stream = send_chat(gw.addr, &chat("m", 1, false));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::with_capacity(1024, stream);
    let (status, head) = read_head(&mut reader);
    let ttfb = start.elapsed();
    assert_eq!(status, 200, "{head}");
    assert!(ttfb < Duration::from_secs(1), "head took {ttfb:?}");

    // Stall: a trickle of a few KiB over about a second.
    let mut total = reader.buffer().len();
    reader.consume(total);
    let mut stream = reader.into_inner();
    let mut small = [0u8; 1024];
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(250));
        let n = stream.read(&mut small).expect("trickle read");
        assert!(n > 0, "closed early");
        total += n;
    }
    let rss_stalled = gw.rss_kib();
    let grew_kib = rss_stalled.saturating_sub(rss_before);
    eprintln!("gateway RSS {rss_before} KiB -> {rss_stalled} KiB while stalled; ttfb {ttfb:?}");
    assert!(
        grew_kib < 30 * 1024,
        "gateway RSS grew {grew_kib} KiB ({rss_before} -> {rss_stalled}) while the client read {total} bytes: it buffers"
    );

    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf).expect("read body");
        if n == 0 {
            break;
        }
        total += n;
        if total >= LEN {
            break;
        }
    }
    assert_eq!(total, LEN, "body length");
    assert_counters_zero(gw.addr);
}

#[test]
fn least_outstanding_spreads_load() {
    let a = sim(SIM_MODEL, 1000, 1000);
    let b = sim(SIM_MODEL, 1000, 1000);
    let models = format!(
        "[[models]]\nname = \"m\"\nupstream_model = \"{SIM_MODEL}\"\nruntime = \"static\"\nendpoints = [\"http://{}\", \"http://{}\"]\n",
        a.addr, b.addr
    );
    let gw = gateway(&config("", "", &models));
    let streams: Vec<TcpStream> = (0..4)
        .map(|_| send_chat(gw.addr, &chat("m", 1, false)))
        .collect();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || read_response(&mut BufReader::new(s)).expect("response"))
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (na, nb) = (
        metric(a.addr, "sim_requests_total"),
        metric(b.addr, "sim_requests_total"),
    );
    assert_eq!(
        (na, nb),
        (2.0, 2.0),
        "4 concurrent requests over two endpoints"
    );
    assert_counters_zero(gw.addr);
}

/// Two proxied requests, one after the other, on one keep-alive client connection.
#[test]
fn client_keep_alive_survives_proxied_request() {
    let sim = sim(SIM_MODEL, 0, 1000);
    let gw = gateway(&config("", "", &static_model("m", SIM_MODEL, sim.addr, "")));
    let mut client = TcpStream::connect(gw.addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let req = raw_request(
        "POST",
        CHAT,
        &[],
        chat("m", 1, false).to_string().as_bytes(),
    );
    client.write_all(&req).unwrap();
    let r1 = read_response(&mut reader).expect("first response");
    assert_eq!(r1.status, 200, "{}", r1.text());
    assert!(
        r1.header("Connection")
            .is_none_or(|v| !v.eq_ignore_ascii_case("close")),
        "the gateway announced a close: fine, but then this test is moot"
    );
    client.write_all(&req).unwrap();
    let r2 = read_response(&mut reader).expect("second response on the same connection");
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(metric(sim.addr, "sim_requests_total"), 2.0);
}

#[test]
fn final_response_buffered_behind_an_interim_one_is_relayed() {
    let upstream = fake_upstream(|stream| {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        if read_request(&mut reader).is_some() {
            let mut w = stream;
            // Interim and final heads in one write: the final one is already buffered.
            let _ = w.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
            );
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}",
        static_model("m", "m", upstream, "")
    ));
    let started = Instant::now();
    let resp = post_json(gw.addr, "/v1/chat/completions", &chat("m", 1, false));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"{}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_error_answered_before_the_body_is_read_reaches_the_client() {
    let sim = sim("m", 0, 1000);
    let gw = gateway(&format!(
        "{GATEWAY_HEAD}{}",
        static_model("m", "m", sim.addr, "")
    ));
    // `model` comes first, so the gateway answers 404 after the first bytes, while the rest
    // of the 2 MB body is still on its way.
    let filler = "x".repeat(2 * 1024 * 1024);
    let body = format!(r#"{{"model":"nope","messages":[{{"role":"user","content":"{filler}"}}]}}"#);
    let mut stream = std::net::TcpStream::connect(gw.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body.as_bytes()[..1024]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The client carries on sending; the gateway must not reset the connection on it.
    let _ = stream.write_all(&body.as_bytes()[1024..]);
    let resp = read_response(&mut BufReader::new(stream)).expect("the 404 was lost to a reset");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.error_code(), "model_not_found");
}
