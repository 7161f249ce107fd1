//! The same proxy behaviour on both monoio drivers: io_uring and the legacy epoll driver.

mod common;
use common::*;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

fn exercise(driver: &str) {
    let sim = sim("up", 0, 200);
    let gw = gateway(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nworkers = 1\ndriver = \"{driver}\"\n{}",
        static_model("m", "up", sim.addr, "")
    ));
    assert!(
        gw.stderr().contains(&format!("driver: {driver}"))
            || eventually(Duration::from_secs(2), || gw.stderr().contains(driver)),
        "the gateway did not report driver {driver}:\n{}",
        gw.stderr()
    );
    // Keep-alive: three requests on one connection.
    let stream = TcpStream::connect(gw.addr).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..3 {
        let body = chat("m", 2, false).to_string();
        writer
            .write_all(&raw_request(
                "POST",
                "/v1/chat/completions",
                &[],
                body.as_bytes(),
            ))
            .unwrap();
        let resp = read_response(&mut reader).unwrap();
        assert_eq!(resp.status, 200, "{driver}: {}", resp.text());
        assert_eq!(resp.json()["model"], "up");
    }
    // Streaming, event by event.
    let events = stream_events(gw.addr, &chat("m", 5, true));
    assert_eq!(events.len(), 6, "{driver}: {events:?}");
    assert!(
        events[4].0 - events[0].0 >= Duration::from_millis(15),
        "{driver}: events were batched"
    );
    // A client abort mid-stream cancels upstream and leaves the counters at zero.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    let body = chat("m", 1000, true).to_string();
    s.write_all(&raw_request(
        "POST",
        "/v1/chat/completions",
        &[],
        body.as_bytes(),
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    assert!(eventually(Duration::from_secs(5), || counters_zero(
        gw.addr, "m"
    )));
    assert!(eventually(Duration::from_secs(5), || {
        metric(sim.addr, "sim_requests_cancelled_total") == 1.0
    }));
}

#[test]
fn io_uring_driver() {
    exercise("io_uring");
}

#[test]
fn epoll_driver() {
    exercise("epoll");
}
