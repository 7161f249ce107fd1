//! Helpers shared by the tests that need a real Docker engine. Include with
//! `#[path = "common/docker.rs"] mod docker_support;`.
//!
//! - [`docker_or_skip`]: the engine, or `None` (and a "skipping" line) when there is none; with
//!   `VLLM_GATEWAY_REQUIRE_DOCKER` set, a missing engine fails the test instead.
//! - [`sim_image`]: a `FROM scratch` image holding a static `vllm-gateway`, entrypoint the binary,
//!   so a container runs the simulator with `args = sim_args(..)`.
//! - [`Cleanup`]: force-removes every container labelled with a model, when made and when
//!   dropped, so a failing test leaves nothing running.
//!
//! Everything here is blocking and safe to call from inside a tokio test: engine calls run on a
//! fresh runtime on their own thread.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;

/// Set (to anything) to make a missing engine a failure rather than a skip.
pub const REQUIRE_ENV: &str = "VLLM_GATEWAY_REQUIRE_DOCKER";
/// The label the Docker runtime puts the model's name in.
pub const MODEL_LABEL: &str = "vllm-gateway.model";
/// The port the simulator listens on inside its container.
pub const SIM_PORT: u16 = 8000;
/// The image name; the tag is a hash of the binary.
pub const SIM_REPO: &str = "vllm-gateway-sim";
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Run `make()`'s future to completion on a fresh current-thread runtime on a new thread, so it
/// works from plain tests and from inside a tokio runtime alike.
pub fn block_on<F, T>(make: impl FnOnce() -> F + Send + 'static) -> T
where
    F: Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(make())
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A client for the engine at DOCKER_HOST (or the local socket), or `None` when it is not there.
/// Panics instead when `VLLM_GATEWAY_REQUIRE_DOCKER` is set.
pub fn docker_or_skip() -> Option<Docker> {
    let connected = block_on(|| async {
        let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version()).await {
            Ok(Ok(docker)) => Ok(docker),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 5 s".to_string()),
        }
    });
    match connected {
        Ok(docker) => Some(docker),
        Err(why) if std::env::var_os(REQUIRE_ENV).is_some() => panic!(
            "Docker is required in CI: {REQUIRE_ENV} is set but the engine is not available \
             ({why}); start dockerd or unset {REQUIRE_ENV}"
        ),
        Err(why) => {
            eprintln!("skipping: Docker engine not available ({why})");
            None
        }
    }
}

/// The simulator's container args: it listens on `0.0.0.0:{port}` (the runtime fills in the
/// container port) and answers for `model`.
pub fn sim_args(model: &str) -> Vec<String> {
    [
        "sim",
        "--listen",
        "0.0.0.0:{port}",
        "--model",
        model,
        "--ttft-ms",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The simulator image's tag, built once per test process (and reused when an image with that
/// tag already exists). The tag is a hash of the binary, so a rebuilt binary gets a new image.
pub fn sim_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(build_sim_image).clone()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_relative() { root.join(d) } else { d })
        .unwrap_or_else(|| root.join("target"))
}

/// An exclusive `flock` on a file, released when dropped (or when the process dies).
struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        FileLock(file)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn build_sim_image() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = target_dir(root);
    std::fs::create_dir_all(&target).expect("create target dir");
    // One builder at a time across test binaries; cargo would serialise the build anyway, but
    // not the image build that follows.
    let _lock = FileLock::acquire(&target.join("docker-sim-image.lock"));

    let started = Instant::now();
    let binary = build_static_binary(root);
    let bytes = std::fs::read(&binary).unwrap_or_else(|e| panic!("read {}: {e}", binary.display()));
    let tag = {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same on every run of the same toolchain.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        format!("{SIM_REPO}:{:016x}", h.finish())
    };
    let docker = docker_or_skip().expect("sim_image needs the Docker engine");
    let tag_for_build = tag.clone();
    let reused = block_on(move || async move {
        if docker.inspect_image(&tag_for_build).await.is_ok() {
            return true;
        }
        let archive = image_context(&bytes);
        let options = BuildImageOptionsBuilder::new()
            .t(&tag_for_build)
            .rm(true)
            .forcerm(true)
            .build();
        let mut stream =
            docker.build_image(options, None, Some(bollard::body_full(archive.into())));
        let mut output = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(line) = info.stream {
                        output.push_str(&line);
                    }
                    if let Some(detail) = info.error_detail {
                        panic!("building {tag_for_build} failed: {detail:?}\n{output}");
                    }
                }
                Err(e) => panic!("building {tag_for_build} failed: {e}\n{output}"),
            }
        }
        docker
            .inspect_image(&tag_for_build)
            .await
            .unwrap_or_else(|e| panic!("{tag_for_build} missing after build: {e}\n{output}"));
        false
    });
    eprintln!(
        "sim image {tag} {} in {:.1} s",
        if reused { "reused" } else { "built" },
        started.elapsed().as_secs_f64()
    );
    tag
}

/// `cargo build` the static binary (debug, its own target triple directory) and return its path.
fn build_static_binary(root: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args([
            "build",
            "--target",
            TRIPLE,
            "--bin",
            "vllm-gateway",
            "--message-format=json-render-diagnostics",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // These would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run cargo build for the static simulator binary");
    let mut executable = None;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let Ok(line) = line else { break };
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && message["target"]["name"] == "vllm-gateway" {
            if let Some(path) = message["executable"].as_str() {
                executable = Some(PathBuf::from(path));
            }
        }
    }
    let status = child.wait().expect("wait for cargo build");
    assert!(
        status.success(),
        "static build of vllm-gateway failed ({status}); see the compiler output above"
    );
    executable.expect("cargo build reported no vllm-gateway executable")
}

/// The build context: a Dockerfile and the binary, as an in-memory tar.
fn image_context(binary: &[u8]) -> Vec<u8> {
    let dockerfile =
        b"FROM scratch\nCOPY vllm-gateway /vllm-gateway\nENTRYPOINT [\"/vllm-gateway\"]\n";
    let mut archive = tar::Builder::new(Vec::with_capacity(binary.len() + 4096));
    for (name, data, mode) in [
        ("Dockerfile", &dockerfile[..], 0o644),
        ("vllm-gateway", binary, 0o755),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        archive
            .append_data(&mut header, name, data)
            .expect("append to tar");
    }
    archive.into_inner().expect("finish tar")
}

/// Force-remove every container (running or not) labelled with `model`; returns how many.
pub fn remove_model_containers(docker: &Docker, model: &str) -> usize {
    let docker = docker.clone();
    let filter = format!("{MODEL_LABEL}={model}");
    block_on(move || async move {
        let filters = HashMap::from([("label", vec![filter])]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let found = docker
            .list_containers(Some(options))
            .await
            .unwrap_or_default();
        let mut removed = 0;
        for id in found.into_iter().filter_map(|c| c.id) {
            let force = RemoveContainerOptionsBuilder::new().force(true).build();
            if docker.remove_container(&id, Some(force)).await.is_ok() {
                removed += 1;
            }
        }
        removed
    })
}

/// Removes the model's containers when made (leftovers of an earlier run) and when dropped
/// (this test's, pass or fail).
pub struct Cleanup {
    docker: Docker,
    model: String,
}

impl Cleanup {
    pub fn new(docker: &Docker, model: &str) -> Cleanup {
        remove_model_containers(docker, model);
        Cleanup {
            docker: docker.clone(),
            model: model.to_string(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_model_containers(&self.docker, &self.model);
    }
}
