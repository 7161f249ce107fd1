//! Criterion benches of the request hot path, each beside a naive baseline:
//! model extraction (vs a full serde_json parse), snapshot lookup (vs `Mutex<HashMap>`),
//! admission acquire + release across two threads (vs a `Mutex`-guarded counter map), and
//! the whole path (extract + lookup + admit + release) on a 1 KB body.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use dataplane::admission::{Acquire, Admission};
use dataplane::extract::{check_rest, find_model, Extract};
use dataplane::snapshot::json_string;
use dataplane::{ModelRoute, ModelShared, ModelState, Snapshot};

fn body(size: usize, model_last: bool) -> Vec<u8> {
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(size / 45 + 1);
    let mut messages = Vec::new();
    let mut used = 0;
    while used < size.saturating_sub(120) {
        let take = (size - 120 - used).min(400);
        messages.push(serde_json::json!({"role": "user", "content": &filler[..take]}));
        used += take + 32;
    }
    let text = if model_last {
        format!(
            r#"{{"messages":{},"max_tokens":64,"model":"llama-8b"}}"#,
            serde_json::to_string(&messages).unwrap()
        )
    } else {
        format!(
            r#"{{"model":"llama-8b","messages":{},"max_tokens":64}}"#,
            serde_json::to_string(&messages).unwrap()
        )
    };
    text.into_bytes()
}

fn extract(b: &[u8]) -> usize {
    match find_model(b) {
        Extract::Found { model, .. } => model.len(),
        _ => 0,
    }
}

fn naive_extract(b: &[u8]) -> usize {
    let v: serde_json::Value = serde_json::from_slice(b).unwrap();
    v["model"].as_str().map_or(0, str::len)
}

fn route(name: &str) -> Arc<ModelRoute> {
    Arc::new(ModelRoute {
        name: name.into(),
        aliases: vec![],
        upstream_model: name.into(),
        upstream_model_json: json_string(name),
        endpoints: vec![],
        max_concurrent: 1_000_000,
        max_queue_size: 1_000_000,
        state: ModelState::Ready,
        vram_blocked: false,
        last_error: None,
        start_seq: 0,
        runtime: "static",
        vram_mib: 0,
        pinned: false,
        startup_timeout: Duration::from_secs(1),
        shared: Arc::new(ModelShared::default()),
    })
}

fn snapshot() -> ArcSwap<Snapshot> {
    let names = [
        "llama-8b",
        "qwen-32b",
        "mistral-7b",
        "gemma-9b",
        "phi-4",
        "embed-small",
    ];
    let snap = Snapshot {
        models: names.iter().map(|n| route(n)).collect(),
        ..Default::default()
    }
    .index();
    ArcSwap::from_pointee(snap)
}

fn bench_extract(c: &mut Criterion) {
    let mut g = c.benchmark_group("extract_model");
    for (label, size) in [("1KB", 1024), ("100KB", 100 * 1024)] {
        for last in [false, true] {
            let b = body(size, last);
            let pos = if last { "last" } else { "first" };
            g.bench_function(format!("scan/{label}/model_{pos}"), |bench| {
                bench.iter(|| extract(black_box(&b)))
            });
            g.bench_function(format!("serde_json/{label}/model_{pos}"), |bench| {
                bench.iter(|| naive_extract(black_box(&b)))
            });
        }
    }
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot_lookup");
    let swap = snapshot();
    g.bench_function("arcswap_load_and_get", |b| {
        b.iter(|| {
            let snap = swap.load();
            black_box(snap.route(black_box("gemma-9b")).map(|r| r.max_concurrent))
        })
    });
    let naive: Mutex<HashMap<String, Arc<ModelRoute>>> = Mutex::new(
        swap.load()
            .routes
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    );
    g.bench_function("mutex_hashmap_get", |b| {
        b.iter(|| {
            let map = naive.lock().unwrap();
            black_box(map.get(black_box("gemma-9b")).map(|r| r.max_concurrent))
        })
    });
    g.finish();
}

/// Run `op` here while a second thread runs it in a loop on the same state: the cost under
/// cross-core contention.
fn contended<S: Send + Sync + 'static>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    state: Arc<S>,
    op: fn(&S),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (state, stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                op(&state);
            }
        })
    };
    c.bench_function(name, |b| b.iter(|| op(&state)));
    stop.store(true, Ordering::Relaxed);
    other.join().unwrap();
}

fn admit_release(adm: &Admission) {
    match adm.acquire(1_000_000, 1_000_000) {
        Acquire::Granted(slot) => drop(black_box(slot)),
        _ => unreachable!("the limits are never reached here"),
    }
}

fn naive_admit_release(map: &Mutex<HashMap<String, (usize, usize)>>) {
    {
        let mut m = map.lock().unwrap();
        let c = m.entry("llama-8b".to_string()).or_default();
        c.0 += 1;
    }
    let mut m = map.lock().unwrap();
    if let Some(c) = m.get_mut("llama-8b") {
        c.0 -= 1;
    }
}

fn bench_admission(c: &mut Criterion) {
    let mut g = c.benchmark_group("admission_acquire_release");
    g.bench_function("atomic/1_thread", |b| {
        let adm = Admission::default();
        b.iter(|| admit_release(&adm))
    });
    contended(
        &mut g,
        "atomic/2_threads",
        Arc::new(Admission::default()),
        admit_release,
    );
    contended(
        &mut g,
        "mutex_hashmap/2_threads",
        Arc::new(Mutex::new(HashMap::new())),
        naive_admit_release,
    );
    g.finish();
}

/// What the data plane does for one request before and after forwarding it.
fn one_request(swap: &ArcSwap<Snapshot>, body: &[u8], check_tail: bool) -> bool {
    let Extract::Found { model, span } = find_model(body) else {
        unreachable!("the bench body has a model")
    };
    if check_tail {
        check_rest(body, span.1).unwrap();
    }
    let snap = swap.load();
    let route = snap.route(&model).unwrap();
    let admission = &route.shared.admission;
    let granted = match admission.acquire(route.max_concurrent, route.max_queue_size) {
        Acquire::Granted(slot) => {
            drop(black_box(slot));
            true
        }
        _ => false,
    };
    granted
}

fn bench_hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_path_1KB");
    let swap = snapshot();
    let b1k = body(1024, false);
    g.bench_function("extract+lookup+admit+release", |b| {
        b.iter(|| one_request(&swap, black_box(&b1k), false))
    });
    g.bench_function("extract+check_rest+lookup+admit+release", |b| {
        b.iter(|| one_request(&swap, black_box(&b1k), true))
    });
    let naive: Mutex<HashMap<String, (usize, usize)>> = Mutex::new(HashMap::new());
    let names: Mutex<HashMap<String, usize>> = Mutex::new(
        ["llama-8b", "qwen-32b"]
            .iter()
            .map(|n| (n.to_string(), 50))
            .collect(),
    );
    g.bench_function("naive: serde_json+mutex_lookup+mutex_counters", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&b1k)).unwrap();
            let model = v["model"].as_str().unwrap().to_string();
            let limit = *names.lock().unwrap().get(&model).unwrap();
            black_box(limit);
            naive_admit_release(&naive);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = bench_extract, bench_lookup, bench_admission, bench_hot_path
}
criterion_main!(benches);
