//! Prometheus metrics as plain atomics: recorded on the request path without locks, rendered
//! on `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::snapshot::{ModelState, Snapshot};

/// Upper bounds in seconds: from sub-millisecond proxying to multi-minute generations.
const BUCKETS_S: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS_S.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, model: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{model=\"{model}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {count}"
        );
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {count}");
    }
}

pub const REJECT_REASONS: [&str; 7] = [
    "queue_full",
    "queue_timeout",
    "model_unavailable",
    "insufficient_vram",
    "shutting_down",
    "body_too_large",
    "unauthorized",
];

#[derive(Debug)]
pub struct ModelMetrics {
    /// Indexed by HTTP status (100..=599).
    by_status: Box<[AtomicU64]>,
    pub duration: Histogram,
    pub ttfb: Histogram,
    rejected: [AtomicU64; REJECT_REASONS.len()],
    pub upstream_retries: AtomicU64,
    pub starts: AtomicU64,
    pub evictions: AtomicU64,
}

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            duration: Histogram::default(),
            ttfb: Histogram::default(),
            rejected: Default::default(),
            upstream_retries: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }
}

impl ModelMetrics {
    pub fn count_status(&self, status: u16) {
        if let Some(c) = self.by_status.get(status as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count_rejection(&self, reason: &str) {
        if let Some(i) = REJECT_REASONS.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status
            .get(status as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// Gauges and counters owned by the control plane; the data plane only renders them.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    pub reloads_ok: AtomicU64,
    pub reloads_error: AtomicU64,
    /// (total, used) MiB per GPU index; written whole by the control plane.
    pub vram_total_mib: [AtomicU64; 16],
    pub vram_used_mib: [AtomicU64; 16],
    pub gpu_count: AtomicU64,
}

/// The whole `/metrics` page.
pub fn render(snapshot: &Snapshot, global: &GlobalMetrics) -> String {
    let mut out = String::with_capacity(4096 + snapshot.models.len() * 4096);
    let models = &snapshot.models;

    out.push_str("# TYPE gateway_requests_total counter\n");
    for m in models {
        let mm = &m.shared.metrics;
        for status in 100..600u16 {
            let n = mm.status_count(status);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "gateway_requests_total{{model=\"{}\",code=\"{status}\"}} {n}",
                    m.name
                );
            }
        }
    }
    out.push_str("# TYPE gateway_request_duration_seconds histogram\n");
    for m in models {
        m.shared
            .metrics
            .duration
            .render(&mut out, "gateway_request_duration_seconds", &m.name);
    }
    out.push_str("# TYPE gateway_time_to_first_byte_seconds histogram\n");
    for m in models {
        m.shared
            .metrics
            .ttfb
            .render(&mut out, "gateway_time_to_first_byte_seconds", &m.name);
    }
    out.push_str("# TYPE gateway_queue_depth gauge\n");
    for m in models {
        let _ = writeln!(
            out,
            "gateway_queue_depth{{model=\"{}\"}} {}",
            m.name,
            m.shared.admission.queued()
        );
    }
    out.push_str("# TYPE gateway_in_flight gauge\n");
    for m in models {
        let _ = writeln!(
            out,
            "gateway_in_flight{{model=\"{}\"}} {}",
            m.name,
            m.shared.admission.in_flight()
        );
    }
    out.push_str("# TYPE gateway_rejected_total counter\n");
    for m in models {
        for (i, reason) in REJECT_REASONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "gateway_rejected_total{{model=\"{}\",reason=\"{reason}\"}} {}",
                m.name,
                m.shared.metrics.rejected[i].load(Ordering::Relaxed)
            );
        }
    }
    type Counter = fn(&ModelMetrics) -> &AtomicU64;
    let counters: [(&str, Counter); 3] = [
        ("gateway_upstream_retries_total", |m| &m.upstream_retries),
        ("gateway_model_starts_total", |m| &m.starts),
        ("gateway_evictions_total", |m| &m.evictions),
    ];
    for (name, get) in counters {
        let _ = writeln!(out, "# TYPE {name} counter");
        for m in models {
            let _ = writeln!(
                out,
                "{name}{{model=\"{}\"}} {}",
                m.name,
                get(&m.shared.metrics).load(Ordering::Relaxed)
            );
        }
    }
    out.push_str("# TYPE gateway_model_state gauge\n");
    for m in models {
        for state in ModelState::ALL {
            let _ = writeln!(
                out,
                "gateway_model_state{{model=\"{}\",state=\"{}\"}} {}",
                m.name,
                state.as_str(),
                u8::from(m.state == state)
            );
        }
    }
    let gpus = (global.gpu_count.load(Ordering::Relaxed) as usize).min(16);
    out.push_str("# TYPE gateway_vram_total_mib gauge\n");
    for gpu in 0..gpus {
        let _ = writeln!(
            out,
            "gateway_vram_total_mib{{gpu=\"{gpu}\"}} {}",
            global.vram_total_mib[gpu].load(Ordering::Relaxed)
        );
    }
    out.push_str("# TYPE gateway_vram_used_mib gauge\n");
    for gpu in 0..gpus {
        let _ = writeln!(
            out,
            "gateway_vram_used_mib{{gpu=\"{gpu}\"}} {}",
            global.vram_used_mib[gpu].load(Ordering::Relaxed)
        );
    }
    out.push_str("# TYPE gateway_config_reloads_total counter\n");
    let _ = writeln!(
        out,
        "gateway_config_reloads_total{{result=\"ok\"}} {}",
        global.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "gateway_config_reloads_total{{result=\"error\"}} {}",
        global.reloads_error.load(Ordering::Relaxed)
    );
    out
}
