//! `vllm-gateway`: the binary. It owns the command line, loading the config, building the
//! logger, and wiring the data plane (monoio workers) to the control plane (a tokio thread).
//! It must never hold request-path logic itself: that lives in `dataplane`.

mod sim;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use controlplane::config::{self, Config, LogFormat};
use dataplane::{LogLevel, Shared};
use slog::{o, Drain, Logger};

const USAGE: &str = "\
usage:
  vllm-gateway [--config PATH]                 serve (default PATH: ./gateway.toml)
  vllm-gateway check --config PATH             validate a config: exit 0, or 2 with every error
  vllm-gateway sim --listen ADDR --model NAME [--ttft-ms N] [--tokens-per-s N] [--startup-ms N]
                                               run the built-in vLLM simulator

environment: GATEWAY_MAX_QUEUE_SIZE, GATEWAY_MAX_CONCURRENT, LOG_LEVEL, GATEWAY_LISTEN
override the file.";

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}\n\n{USAGE}")]
    Usage(String),
}

fn config_path(args: &[String]) -> Result<PathBuf, CliError> {
    let mut path = PathBuf::from("gateway.toml");
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--config" | "-c" => {
                let value = args
                    .get(i + 1)
                    .ok_or_else(|| CliError::Usage("--config needs a path".into()))?;
                path = PathBuf::from(value);
                i += 2;
            }
            other => {
                if let Some(value) = other.strip_prefix("--config=") {
                    path = PathBuf::from(value);
                    i += 1;
                } else {
                    return Err(CliError::Usage(format!("unknown argument '{other}'")));
                }
            }
        }
    }
    Ok(path)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sim") => run_sim(&args[1..]),
        Some("check") => check(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("vllm-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => serve(&args),
    }
}

fn run_sim(args: &[String]) -> ExitCode {
    match sim::SimArgs::parse(args) {
        Ok(parsed) => match sim::run(parsed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Err(sim::SimError::Help) => {
            println!("{}", sim::SimError::Help);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn load(args: &[String]) -> Result<(PathBuf, Config), ExitCode> {
    let path = match config_path(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return Err(ExitCode::from(2));
        }
    };
    match config::load(&path) {
        Ok(config) => Ok((path, config)),
        Err(errors) => {
            eprintln!("{}: {} error(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            Err(ExitCode::from(2))
        }
    }
}

fn check(args: &[String]) -> ExitCode {
    match load(args) {
        Ok((path, config)) => {
            println!("{}: ok ({} model(s))", path.display(), config.models.len());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Drops records below the live level before they reach the async channel, so a disabled
/// level costs one atomic load and nothing is formatted.
struct LevelFilter<D> {
    level: Arc<LogLevel>,
    drain: D,
}

impl<D: Drain> Drain for LevelFilter<D> {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        if self.level.enabled(record.level()) {
            let _ = self.drain.log(record, values);
        }
        Ok(())
    }

    fn is_enabled(&self, level: slog::Level) -> bool {
        self.level.enabled(level)
    }
}

/// An async logger: workers hand records to a logger thread and never block on stderr.
fn logger(format: LogFormat, level: Arc<LogLevel>) -> (Logger, slog_async::AsyncGuard) {
    let (drain, guard) = match format {
        LogFormat::Text => {
            let decorator = slog_term::PlainDecorator::new(std::io::stderr());
            let drain = slog_term::FullFormat::new(decorator).build().fuse();
            slog_async::Async::new(drain)
                .chan_size(16 * 1024)
                .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
                .thread_name("logger".into())
                .build_with_guard()
        }
        LogFormat::Json => {
            let drain = slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse();
            slog_async::Async::new(drain)
                .chan_size(16 * 1024)
                .overflow_strategy(slog_async::OverflowStrategy::DropAndReport)
                .thread_name("logger".into())
                .build_with_guard()
        }
    };
    let filtered = LevelFilter {
        level,
        drain: drain.fuse(),
    };
    (Logger::root(filtered, o!()), guard)
}

fn serve(args: &[String]) -> ExitCode {
    let (path, config) = match load(args) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let level = Arc::new(LogLevel::new(controlplane::slog_level(
        config.gateway.log_level,
    )));
    let (log, log_guard) = logger(config.gateway.log_format, level.clone());
    slog::info!(log, "config loaded"; "path" => %path.display(), "models" => config.models.len());

    let listen = dataplane::ListenConfig {
        listen: config.gateway.listen,
        workers: config.gateway.workers,
        driver: match config.gateway.driver {
            config::Driver::Auto => dataplane::Driver::Auto,
            config::Driver::IoUring => dataplane::Driver::IoUring,
            config::Driver::Epoll => dataplane::Driver::Epoll,
        },
    };
    let (control_tx, control_rx) = crossbeam_channel::unbounded();
    let mut control =
        controlplane::ControlPlane::new(config, path.clone(), log.new(o!("plane" => "control")));
    let shared = Arc::new(Shared::new(control.snapshot(), level, control_tx));
    let handle = match dataplane::start(shared.clone(), listen, log.new(o!("plane" => "data"))) {
        Ok(handle) => handle,
        Err(e) => {
            slog::error!(log, "could not start the data plane"; "error" => %e);
            drop(log);
            drop(log_guard);
            eprintln!("vllm-gateway: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let control = match control.spawn(shared, control_rx, Box::new(handle.stopper())) {
        Ok(thread) => thread,
        Err(e) => {
            eprintln!("vllm-gateway: could not start the control plane: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts and tests read the bound address (port 0 resolves here) from this line; it
    // comes once signals and config edits are being watched.
    println!(
        "vllm-gateway listening on http://{} ({} worker(s), {})",
        handle.local_addr, handle.workers, handle.driver
    );
    let code = control.join().unwrap_or(1);
    slog::info!(log, "exiting"; "code" => code);
    drop(log);
    drop(log_guard);
    ExitCode::from(code.clamp(0, 255) as u8)
}
