//! GPU memory: per-GPU totals and free figures (NVML where it loads, else `[gpus]`), and the
//! eviction policy as a pure function.

use std::sync::Arc;

use dataplane::ModelState;

/// Per-GPU memory as a device reports it, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    pub total_mib: u64,
    pub free_mib: u64,
}

/// Where live GPU memory figures come from. A trait so tests can stand in for NVML.
pub trait GpuProbe: Send + Sync {
    /// One entry per GPU, or None when the source is unavailable.
    fn memory(&self) -> Option<Vec<GpuMemory>>;
    fn name(&self) -> &'static str;
}

/// NVML through nvml-wrapper.
pub struct Nvml(nvml_wrapper::Nvml);

impl GpuProbe for Nvml {
    fn memory(&self) -> Option<Vec<GpuMemory>> {
        let count = self.0.device_count().ok()?;
        (0..count)
            .map(|i| {
                let info = self.0.device_by_index(i).ok()?.memory_info().ok()?;
                Some(GpuMemory {
                    total_mib: info.total / (1024 * 1024),
                    free_mib: info.free / (1024 * 1024),
                })
            })
            .collect()
    }

    fn name(&self) -> &'static str {
        "nvml"
    }
}

/// No live source: the configured totals are all there is.
pub struct NoProbe;

impl GpuProbe for NoProbe {
    fn memory(&self) -> Option<Vec<GpuMemory>> {
        None
    }

    fn name(&self) -> &'static str {
        "config"
    }
}

/// NVML when `libnvidia-ml` loads, otherwise the config's figures.
pub fn detect() -> Arc<dyn GpuProbe> {
    match nvml_wrapper::Nvml::init() {
        Ok(nvml) => Arc::new(Nvml(nvml)),
        Err(_) => Arc::new(NoProbe),
    }
}

/// The VRAM ledger for one decision, per GPU index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// The configured totals, capped by what the device reports.
    pub total_mib: Vec<u64>,
    /// The smaller of the device's free figure (or the total without a device) and the
    /// total minus what starting and running models hold: the contract's free VRAM.
    pub free_mib: Vec<u64>,
}

/// Build the ledger from the config totals, what models hold, and the probe's figures.
pub fn ledger(config_total_mib: &[u64], held_mib: &[u64], probe: Option<&[GpuMemory]>) -> Ledger {
    let mut total_mib = Vec::with_capacity(config_total_mib.len());
    let mut free_mib = Vec::with_capacity(config_total_mib.len());
    for (gpu, &configured) in config_total_mib.iter().enumerate() {
        let device = probe.and_then(|p| p.get(gpu));
        let total = device.map_or(configured, |d| d.total_mib.min(configured));
        let device_free = device.map_or(total, |d| d.free_mib);
        let held = held_mib.get(gpu).copied().unwrap_or(0);
        total_mib.push(total);
        free_mib.push(device_free.min(total.saturating_sub(held)));
    }
    Ledger {
        total_mib,
        free_mib,
    }
}

/// What the eviction policy needs to know of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: usize,
    pub gpus: Vec<usize>,
    pub vram_mib: u64,
    pub state: ModelState,
    pub pinned: bool,
    /// Anything in flight or queued.
    pub busy: bool,
    pub last_used_ms: u64,
}

impl Candidate {
    fn evictable(&self) -> bool {
        self.state == ModelState::Ready && !self.pinned && !self.busy && self.vram_mib > 0
    }
}

/// Which models to stop so that `needed_mib` fits on every GPU in `gpus`, given `free_mib`
/// per GPU: least recently used first, never pinned, never busy, never one that is not
/// `ready`, and only models that free memory on a GPU still short. `None` when even every
/// eligible model would not be enough (the caller waits for models to become idle).
/// Pure: no I/O, no logging.
pub fn victims(
    needed_mib: u64,
    gpus: &[usize],
    free_mib: &[u64],
    models: &[Candidate],
) -> Option<Vec<usize>> {
    let mut free: Vec<u64> = free_mib.to_vec();
    let short = |free: &[u64]| {
        gpus.iter()
            .any(|g| free.get(*g).copied().unwrap_or(0) < needed_mib)
    };
    if !short(&free) {
        return Some(Vec::new());
    }
    let mut eligible: Vec<&Candidate> = models.iter().filter(|m| m.evictable()).collect();
    eligible.sort_by_key(|m| (m.last_used_ms, m.id));
    let mut chosen = Vec::new();
    for model in eligible {
        let helps = model
            .gpus
            .iter()
            .any(|g| gpus.contains(g) && free.get(*g).copied().unwrap_or(0) < needed_mib);
        if !helps {
            continue;
        }
        for g in &model.gpus {
            if let Some(f) = free.get_mut(*g) {
                *f += model.vram_mib;
            }
        }
        chosen.push(model.id);
        if !short(&free) {
            return Some(chosen);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model(id: usize, gpus: &[usize], vram: u64, last_used: u64) -> Candidate {
        Candidate {
            id,
            gpus: gpus.to_vec(),
            vram_mib: vram,
            state: ModelState::Ready,
            pinned: false,
            busy: false,
            last_used_ms: last_used,
        }
    }

    #[test]
    fn nothing_to_evict_when_it_fits() {
        assert_eq!(
            victims(10, &[0], &[10], &[model(1, &[0], 5, 1)]),
            Some(vec![])
        );
    }

    #[test]
    fn least_recently_used_first_and_only_as_many_as_needed() {
        let models = [
            model(1, &[0], 10, 300),
            model(2, &[0], 10, 100),
            model(3, &[0], 10, 200),
        ];
        assert_eq!(victims(15, &[0], &[0], &models), Some(vec![2, 3]));
        assert_eq!(victims(5, &[0], &[0], &models), Some(vec![2]));
    }

    #[test]
    fn never_pinned_busy_or_not_ready() {
        let mut pinned = model(1, &[0], 50, 1);
        pinned.pinned = true;
        let mut busy = model(2, &[0], 50, 2);
        busy.busy = true;
        let mut starting = model(3, &[0], 50, 3);
        starting.state = ModelState::Starting;
        let idle = model(4, &[0], 50, 4);
        assert_eq!(
            victims(
                40,
                &[0],
                &[0],
                &[pinned.clone(), busy.clone(), starting.clone(), idle]
            ),
            Some(vec![4])
        );
        assert_eq!(victims(40, &[0], &[0], &[pinned, busy, starting]), None);
    }

    #[test]
    fn only_models_on_the_short_gpus() {
        let models = [model(1, &[1], 100, 1), model(2, &[0], 100, 2)];
        assert_eq!(victims(50, &[0], &[0, 0], &models), Some(vec![2]));
    }

    #[test]
    fn ledger_takes_the_smaller_free_figure() {
        let no_device = ledger(&[100, 100], &[30, 0], None);
        assert_eq!(no_device.free_mib, vec![70, 100]);
        let device = [
            GpuMemory {
                total_mib: 80,
                free_mib: 20,
            },
            GpuMemory {
                total_mib: 200,
                free_mib: 150,
            },
        ];
        let with_device = ledger(&[100, 100], &[30, 0], Some(&device));
        assert_eq!(with_device.total_mib, vec![80, 100]);
        assert_eq!(with_device.free_mib, vec![20, 100]);
    }

    #[test]
    fn the_config_fallback_is_what_detect_gives_without_nvml() {
        // No NVML on this machine: detect() must fall back, not fail.
        let probe = detect();
        if probe.name() == "config" {
            assert_eq!(probe.memory(), None);
        } else {
            assert!(probe.memory().is_some());
        }
    }

    fn candidate() -> impl Strategy<Value = Candidate> {
        (
            prop::collection::vec(0usize..3, 1..3),
            0u64..60,
            prop_oneof![
                Just(ModelState::Ready),
                Just(ModelState::Starting),
                Just(ModelState::Stopped)
            ],
            any::<bool>(),
            any::<bool>(),
            0u64..1000,
        )
            .prop_map(
                |(gpus, vram_mib, state, pinned, busy, last_used_ms)| Candidate {
                    id: 0,
                    gpus,
                    vram_mib,
                    state,
                    pinned,
                    busy,
                    last_used_ms,
                },
            )
    }

    proptest! {
        #[test]
        fn victims_are_safe_sufficient_and_lru(
            needed in 1u64..100,
            gpus in prop::collection::vec(0usize..3, 1..3),
            free in prop::collection::vec(0u64..80, 3),
            mut models in prop::collection::vec(candidate(), 0..8),
        ) {
            for (i, m) in models.iter_mut().enumerate() {
                m.id = i;
            }
            match victims(needed, &gpus, &free, &models) {
                Some(chosen) => {
                    let mut after = free.clone();
                    for id in &chosen {
                        let m = &models[*id];
                        // Never pinned, busy or not ready.
                        prop_assert!(m.state == ModelState::Ready && !m.pinned && !m.busy);
                        for g in &m.gpus { after[*g] += m.vram_mib; }
                    }
                    // Enough on every target GPU.
                    for g in &gpus { prop_assert!(after[*g] >= needed); }
                    // LRU: each victim is no more recently used than any eligible model left
                    // that could have helped the same GPU (ties broken by id).
                    let mut previous: Option<(u64, usize)> = None;
                    for id in &chosen {
                        let key = (models[*id].last_used_ms, *id);
                        prop_assert!(previous.is_none_or(|p| p < key));
                        previous = Some(key);
                    }
                    let dedup: std::collections::HashSet<_> = chosen.iter().collect();
                    prop_assert_eq!(dedup.len(), chosen.len());
                }
                None => {
                    // Even every eligible model on the target GPUs would not be enough.
                    let mut best = free.clone();
                    for m in models.iter().filter(|m| m.state == ModelState::Ready && !m.pinned && !m.busy) {
                        for g in &m.gpus { best[*g] += m.vram_mib; }
                    }
                    prop_assert!(gpus.iter().any(|g| best[*g] < needed));
                }
            }
        }
    }
}
