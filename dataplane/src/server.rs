//! Worker threads: one monoio runtime per core, each with its own SO_REUSEPORT listener,
//! connection pool and cached snapshot handle.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use monoio::io::Splitable;
use monoio::net::{TcpListener, TcpStream};
use slog::{debug, error, info, Logger};

use crate::error::DataplaneError;
use crate::http;
use crate::io::{ClientReader, Pool};
use crate::proxy::{self, reply_error, Outcome};
use crate::snapshot::Snapshot;
use crate::Shared;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub listen: SocketAddr,
    /// 0: one per CPU core.
    pub workers: usize,
    pub driver: Driver,
}

pub struct DataplaneHandle {
    pub local_addr: SocketAddr,
    pub workers: usize,
    /// The driver each worker ended up with ("io_uring" or "epoll").
    pub driver: &'static str,
    threads: Vec<JoinHandle<()>>,
    listener_fds: Vec<std::os::fd::RawFd>,
}

impl DataplaneHandle {
    /// A call that makes every worker stop accepting connections (for a graceful drain);
    /// connections already open carry on.
    pub fn stopper(&self) -> impl FnOnce() + Send + 'static {
        let fds = self.listener_fds.clone();
        move || {
            for fd in fds {
                // SAFETY: the workers own these listeners until the process exits; shutting a
                // listening socket down wakes its pending accept with an error.
                unsafe {
                    libc::shutdown(fd, libc::SHUT_RDWR);
                }
            }
        }
    }

    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A worker's handle on a snapshot. The `Rc` layer is deliberate: cloning it per request
/// touches no shared cache line, where cloning the `Arc` would contend across cores.
#[derive(Clone)]
#[allow(clippy::redundant_allocation)]
pub struct LocalSnapshot(Rc<Arc<Snapshot>>);

impl std::ops::Deref for LocalSnapshot {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

/// Per-thread state. Nothing here is shared with other workers.
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Pool,
    pub log: Logger,
    cached: RefCell<LocalSnapshot>,
}

impl Worker {
    /// The current snapshot. One atomic load; the `Arc` is only cloned when it changed, and
    /// in-flight requests keep the one they started with.
    pub fn snapshot(&self) -> LocalSnapshot {
        let current = self.shared.snapshot.load();
        let mut cached = self.cached.borrow_mut();
        if !Arc::ptr_eq(&current, &cached.0) {
            *cached = LocalSnapshot(Rc::new(arc_swap::Guard::into_inner(current)));
        }
        cached.clone()
    }
}

fn listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Bind the listeners and start the workers. Returns once every worker runs.
pub fn start(
    shared: Arc<Shared>,
    config: ListenConfig,
    log: Logger,
) -> std::io::Result<DataplaneHandle> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = if config.workers == 0 {
        cores
    } else {
        config.workers
    };
    let first = listener(config.listen)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    use std::os::fd::AsRawFd;
    for _ in 1..workers {
        // Port 0 resolved by the first bind, so every worker shares the same port.
        listeners.push(listener(local_addr)?);
    }
    let uring = match config.driver {
        Driver::Epoll => false,
        Driver::IoUring => true,
        Driver::Auto => {
            monoio::utils::detect_uring()
                && std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_none()
        }
    };
    if config.driver == Driver::IoUring && !monoio::utils::detect_uring() {
        return Err(std::io::Error::other(
            "driver = \"io_uring\" but io_uring is not available on this kernel; use \"auto\" or \"epoll\"",
        ));
    }
    let listener_fds = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<std::io::Result<()>>(workers);
    let mut threads = Vec::with_capacity(workers);
    for (index, std_listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let log = log.new(slog::o!("worker" => index));
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dp-worker-{index}"))
            .spawn(move || {
                if let Err(e) = monoio::utils::bind_to_cpu_set([index % cores]) {
                    debug!(log, "could not pin worker to a core"; "error" => ?e);
                }
                let result = run_worker(uring, shared, std_listener, log, ready.clone());
                if let Err(e) = result {
                    let _ = ready.send(Err(e));
                }
            })?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::other(
                    "a worker thread exited during start-up",
                ))
            }
        }
    }
    let driver = if uring { "io_uring" } else { "epoll" };
    info!(log, "data plane started"; "listen" => %local_addr, "workers" => workers, "driver" => driver);
    Ok(DataplaneHandle {
        local_addr,
        workers,
        driver,
        threads,
        listener_fds,
    })
}

fn run_worker(
    uring: bool,
    shared: Arc<Shared>,
    std_listener: std::net::TcpListener,
    log: Logger,
    ready: crossbeam_channel::Sender<std::io::Result<()>>,
) -> std::io::Result<()> {
    let main = worker_main(shared, std_listener, log, ready);
    if uring {
        // COOP_TASKRUN: completions are processed on our next entry into the kernel instead
        // of interrupting the worker with an IPI; on this kind of VM it cut the proxy's CPU per
        // request by about a third. Kernels before 5.19 refuse it: fall back to the default.
        let mut coop = io_uring::IoUring::builder();
        coop.setup_coop_taskrun();
        let mut runtime = match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(coop)
            .with_entries(4096)
            .enable_timer()
            .build()
        {
            Ok(runtime) => runtime,
            Err(_) => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(4096)
                .enable_timer()
                .build()?,
        };
        runtime.block_on(main)
    } else {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(main)
    }
}

async fn worker_main(
    shared: Arc<Shared>,
    std_listener: std::net::TcpListener,
    log: Logger,
    ready: crossbeam_channel::Sender<std::io::Result<()>>,
) -> std::io::Result<()> {
    let listener = TcpListener::from_std(std_listener)?;
    let snapshot = shared.snapshot.load_full();
    let worker = Rc::new(Worker {
        shared,
        pool: Pool::default(),
        log,
        cached: RefCell::new(LocalSnapshot(Rc::new(snapshot))),
    });
    let _ = ready.send(Ok(()));
    drop(ready);
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let worker = worker.clone();
                monoio::spawn(async move { serve_connection(worker, stream).await });
            }
            Err(_)
                if worker
                    .shared
                    .draining
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                // The listener was shut for a drain: serve what is open until the exit.
                info!(worker.log, "stopped accepting connections");
                std::future::pending::<()>().await;
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!(worker.log, "accept failed"; "error" => %e);
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(worker: Rc<Worker>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (read_half, mut writer) = stream.into_split();
    let mut reader = ClientReader::new(read_half);
    loop {
        let snap = worker.snapshot();
        let req = match read_request(&mut reader, &snap).await {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                if reply_error(&worker, &mut writer, None, e, false)
                    .await
                    .linger
                {
                    linger(&mut reader).await;
                }
                return;
            }
        };
        let is_proxied =
            req.head.method == ::http::Method::POST && req.head.uri.path().starts_with("/v1/");
        let outcome: Outcome = if is_proxied {
            proxy::proxy(&worker, snap, req, &mut reader, &mut writer).await
        } else {
            crate::local::handle(&worker, &snap, req, &mut reader, &mut writer).await
        };
        if outcome.linger {
            linger(&mut reader).await;
        }
        // While draining, a connection ends with its current response.
        if !outcome.keep_alive
            || worker
                .shared
                .draining
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
    }
}

/// After answering an error on a connection we close, read and drop what the client still
/// sends (bounded in time and bytes): closing with unread bytes makes the kernel send a reset,
/// which can destroy the answer before the client reads it.
async fn linger(reader: &mut ClientReader) {
    const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
    const LINGER_BYTES: usize = 8 * 1024 * 1024;
    let deadline = Instant::now() + LINGER;
    let mut discarded = 0usize;
    while discarded < LINGER_BYTES {
        if let Some(buf) = reader.buffer() {
            discarded += buf.len();
            buf.clear();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(left, reader.fill()).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Wait for a whole request head: up to `client_idle` for its first byte, then
/// `header_read` for the rest. `Ok(None)`: the client closed or idled out.
async fn read_request(
    reader: &mut ClientReader,
    snap: &Snapshot,
) -> Result<Option<http::Request>, DataplaneError> {
    let settings = &snap.settings;
    let mut head_started: Option<Instant> = None;
    loop {
        if reader.buffer().is_none() {
            // The previous request's disconnect watch left a read running: wait for it,
            // for as long as an idle client may wait.
            match monoio::time::timeout(settings.client_idle_timeout, reader.settle()).await {
                Ok(true) => {}
                _ => return Ok(None),
            }
        }
        let Some(buf) = reader.buffer() else {
            return Ok(None);
        };
        if !buf.is_empty() {
            if let Some(req) = http::parse_request(buf, settings.max_header_bytes)? {
                return Ok(Some(req));
            }
            head_started.get_or_insert_with(Instant::now);
        }
        if reader.is_eof() {
            return Ok(None);
        }
        let wait = match head_started {
            None => settings.client_idle_timeout,
            Some(at) => settings.header_read_timeout.saturating_sub(at.elapsed()),
        };
        match monoio::time::timeout(wait, reader.fill()).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Ok(None),
            Err(_) if head_started.is_some() => {
                return Err(DataplaneError::HeaderTimeout {
                    ms: settings.header_read_timeout.as_millis() as u64,
                })
            }
            Err(_) => return Ok(None),
        }
    }
}
