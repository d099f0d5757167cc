//! Multi-process runs: `--processes N --process_index i --hostfile FILE`
//! (timely's `-n/-p/-h`) with `--workers W` timely workers per process, and
//! the `--devices` assignment of devices to workers.
//!
//! [`execute_cluster`] does not use timely's own connection set-up, which
//! retries a connection forever (once a second, printing to stdout) and
//! panics in its communication threads when a peer goes away: it connects
//! the processes itself, with a deadline and a handshake that authenticates
//! every connection both ways with the run's shared secret (`auth`:
//! strangers on the network can neither join the run nor stop it) and
//! checks that every process runs the same `--processes` / `--workers`,
//! hands the
//! sockets to timely, and watches the run, so that when a process dies or a
//! connection breaks the others stop within seconds with one clear error
//! instead of hanging or printing panics.

mod auth;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub use auth::{
    auth_key, is_loopback_host, ClusterSecret, CLUSTER_SECRET_ENV, MAKE_SECRET, MIN_SECRET_BYTES,
};
use auth::{Accepted, ConnectFailure};

use crate::panics;

use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::Hooks;
use timely::{CommunicationConfig, WorkerConfig};

/// Errors of the cluster configuration and of connecting the processes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The hostfile could not be read.
    #[error("{}: cannot read the hostfile: {source}", .path.display())]
    ReadHostfile {
        /// The hostfile.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A bad line in the hostfile.
    #[error("{}:{line}: {what}", .path.display())]
    Hostfile {
        /// The hostfile.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// Inconsistent flags.
    #[error("{0}")]
    Invalid(String),
    /// Connecting the processes failed.
    #[error("{0}")]
    Connect(String),
    /// The cluster secret is missing, unreadable, too short or not private.
    #[error("{0}")]
    Secret(String),
}

/// Where this process stands in a run: how many processes, which one this
/// is, every process's `host:port`, and timely workers per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Number of processes (`--processes`).
    pub processes: usize,
    /// This process (`--process_index`), `< processes`.
    pub process_index: usize,
    /// `host:port` of every process, in process order (empty for one process
    /// without hostfile).
    pub hosts: Vec<String>,
    /// Timely workers per process (`--workers`); every process must use the
    /// same number.
    pub workers: usize,
    /// The shared secret that authenticates the connections between the
    /// processes (`--cluster_secret_file` or `LEVERFLOW_CLUSTER_SECRET`):
    /// required when a host is not a loopback address (see
    /// [`ClusterConfig::with_secret`]).
    pub secret: Option<ClusterSecret>,
}

/// Parses a hostfile: one `host:port` per line, in process order; blank
/// lines and lines starting with `#` (after spaces) are ignored, as is
/// anything after a `#`.  Errors name `path` and the line.
pub fn parse_hostfile(text: &str, path: &Path) -> Result<Vec<String>, ClusterError> {
    let mut hosts: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let bad = |what: String| ClusterError::Hostfile {
            path: path.to_path_buf(),
            line,
            what,
        };
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if content.split_whitespace().count() > 1 {
            return Err(bad(format!("{content:?}: expected one host:port per line")));
        }
        let Some((host, port)) = content.rsplit_once(':') else {
            return Err(bad(format!("{content:?}: expected host:port")));
        };
        if host.is_empty() || host == "[]" {
            return Err(bad(format!("{content:?}: empty host")));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => {
                return Err(bad(format!(
                    "{content:?}: port {port:?} is not a number in 1..=65535"
                )))
            }
        }
        if let Some((first, _)) = hosts.iter().find(|(_, h)| h == content) {
            return Err(bad(format!(
                "{content} is also on line {first}: each process needs its own host:port"
            )));
        }
        hosts.push((line, content.to_string()));
    }
    Ok(hosts.into_iter().map(|(_, h)| h).collect())
}

/// Reads and parses a hostfile ([`parse_hostfile`]).
pub fn read_hostfile(path: &Path) -> Result<Vec<String>, ClusterError> {
    let text = std::fs::read_to_string(path).map_err(|e| ClusterError::ReadHostfile {
        path: path.to_path_buf(),
        source: e,
    })?;
    parse_hostfile(&text, path)
}

impl ClusterConfig {
    /// One process with `workers` threads.
    pub fn single_process(workers: usize) -> Self {
        ClusterConfig {
            processes: 1,
            process_index: 0,
            hosts: Vec::new(),
            workers: workers.max(1),
            secret: None,
        }
    }

    /// Checks and builds a configuration: `processes >= 1`, `workers >= 1`,
    /// `process_index < processes`, and one host per process (no hosts is
    /// allowed for a single process).
    pub fn new(
        processes: usize,
        process_index: usize,
        hosts: Vec<String>,
        workers: usize,
    ) -> Result<Self, ClusterError> {
        if processes == 0 {
            return Err(ClusterError::Invalid(
                "`processes` must be at least 1".into(),
            ));
        }
        if workers == 0 {
            return Err(ClusterError::Invalid("`workers` must be at least 1".into()));
        }
        if process_index >= processes {
            return Err(ClusterError::Invalid(format!(
                "`process_index` {process_index} is out of range: with `processes` {processes} it must be 0..={}",
                processes - 1
            )));
        }
        if !(hosts.len() == processes || (processes == 1 && hosts.is_empty())) {
            return Err(ClusterError::Invalid(format!(
                "`processes` {processes} but {} host(s) given: the hostfile needs one host:port per process",
                hosts.len()
            )));
        }
        Ok(ClusterConfig {
            processes,
            process_index,
            hosts,
            workers,
            secret: None,
        })
    }

    /// From the flags: `--processes`, `--process_index`, `--hostfile`
    /// (required when `processes > 1`; its host count must equal
    /// `processes`) and `--workers`.
    pub fn from_flags(
        processes: usize,
        process_index: usize,
        hostfile: Option<&Path>,
        workers: usize,
    ) -> Result<Self, ClusterError> {
        let hosts = match hostfile {
            Some(path) => {
                let hosts = read_hostfile(path)?;
                if hosts.len() != processes {
                    return Err(ClusterError::Invalid(format!(
                        "{} lists {} host(s) but `processes` is {processes}: one host:port line per process",
                        path.display(),
                        hosts.len()
                    )));
                }
                hosts
            }
            None if processes > 1 => {
                return Err(ClusterError::Invalid(format!(
                    "`processes` {processes} needs `hostfile` (one host:port line per process)"
                )))
            }
            None => Vec::new(),
        };
        Self::new(processes, process_index, hosts, workers)
    }

    /// Sets the shared secret and checks that the run is authenticated: a
    /// run whose hostfile lists an address that is not loopback
    /// ([`is_loopback_host`]) needs a secret (the error says how to make
    /// one).  A run on loopback addresses only may go without: a key derived
    /// from its hosts and shape then authenticates its connections.
    pub fn with_secret(mut self, secret: Option<ClusterSecret>) -> Result<Self, ClusterError> {
        self.secret = secret;
        if self.is_multi_process() {
            auth::auth_key(&self)?;
        }
        Ok(self)
    }

    /// [`ClusterConfig::with_secret`] with the secret of `file`
    /// (`--cluster_secret_file`), else of the environment variable
    /// [`CLUSTER_SECRET_ENV`] ([`ClusterSecret::from_file_or_env`]).  A
    /// single process reads neither.
    pub fn with_secret_from(self, file: Option<&Path>) -> Result<Self, ClusterError> {
        if !self.is_multi_process() {
            return Ok(self);
        }
        let secret = ClusterSecret::from_file_or_env(file)?;
        self.with_secret(secret)
    }

    /// More than one process.
    pub fn is_multi_process(&self) -> bool {
        self.processes > 1
    }

    /// Workers over all processes (timely's `worker.peers()`).
    pub fn total_workers(&self) -> usize {
        self.processes * self.workers
    }

    /// Timely's index of local worker `local` (`worker.index()`): processes
    /// number their workers consecutively.
    pub fn global_worker(&self, local: usize) -> usize {
        self.process_index * self.workers + local
    }

    /// The equivalent plain timely configuration (timely's own connection
    /// set-up: no deadline; [`execute_cluster`] does better).
    pub fn timely_config(&self) -> timely::Config {
        if !self.is_multi_process() {
            return timely::Config::process(self.workers);
        }
        timely::Config {
            communication: CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process_index,
                addresses: self.hosts.clone(),
                report: false,
                zerocopy: false,
            },
            worker: WorkerConfig::default(),
        }
    }
}

/// Deadlines of [`execute_cluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTimeouts {
    /// How long to wait for every other process to be reachable.
    pub connect: Duration,
    /// After a failure, how long to wait for the local workers to stop
    /// before returning anyway (their threads are then left behind: exit
    /// the process).
    pub stop: Duration,
    /// TCP keepalive idle time on the connections (probes every quarter of
    /// it; Linux gives up after 9 unanswered probes): a host that vanishes
    /// without closing them is noticed after about `keepalive * 3.25`.
    pub keepalive: Duration,
    /// How long one incoming connection may take to authenticate (each on
    /// a thread of its own, so a silent one blocks nobody), and how long one
    /// attempt to authenticate to another process may take.
    pub handshake: Duration,
}

impl Default for ClusterTimeouts {
    fn default() -> Self {
        ClusterTimeouts {
            connect: Duration::from_secs(60),
            stop: Duration::from_secs(5),
            keepalive: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
        }
    }
}

fn keepalive(stream: &TcpStream, t: Duration) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(t)
        .with_interval(t / 4);
    // Best effort: a platform without these options keeps the defaults.
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Handshakes in progress at most on the accepting side; connections beyond
/// are closed at once.
const MAX_PENDING_HANDSHAKES: usize = 32;

/// Connects this process to every other one before `timeouts.connect`:
/// connects to the lower-indexed processes (retrying while they start),
/// accepts the higher-indexed ones, and authenticates every connection both
/// ways (`auth`: HMAC-SHA256 challenge–response with the run's secret)
/// before checking that the peer runs the same `--processes` /
/// `--workers`.  Returns one stream per process, `None` at this process's
/// index.
///
/// Each incoming connection's handshake runs on a thread of its own with
/// its own deadline (`timeouts.handshake`): a connection that sends garbage,
/// fails authentication or says nothing is logged (`tracing::warn`) and
/// closed, and the run goes on waiting for the real process until
/// `timeouts.connect`, never blocked by it.
///
/// Logs `event = "cluster_listening"` when it listens and `event =
/// "cluster_connected"` when every process is connected (`tracing`, info).
pub fn connect_peers(
    config: &ClusterConfig,
    timeouts: &ClusterTimeouts,
) -> Result<Vec<Option<TcpStream>>, ClusterError> {
    let me = config.process_index;
    let n = config.processes;
    let key = Arc::new(auth::auth_key(config)?);
    let deadline = Instant::now() + timeouts.connect;
    let listener = TcpListener::bind(config.hosts[me].as_str()).map_err(|e| {
        ClusterError::Connect(format!(
            "process {me}: cannot listen on {} (its line in the hostfile): {e}",
            config.hosts[me]
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ClusterError::Connect(format!("process {me}: listener: {e}")))?;
    tracing::info!(
        event = "cluster_listening",
        process = me,
        processes = n,
        address = %config.hosts[me],
        authenticated_by = if config.secret.is_some() { "cluster secret" } else { "loopback default key" },
        "listening for the other processes"
    );
    // Set by either side when the run cannot start, so the other stops too.
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let config = config.clone();
        let key = Arc::clone(&key);
        let stop = Arc::clone(&stop);
        let handshake = timeouts.handshake;
        let connect = timeouts.connect;
        std::thread::Builder::new()
            .name("leverflow:accept".into())
            .spawn(move || {
                let r = accept_members(listener, &config, key, deadline, connect, handshake, &stop);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                r
            })
            .map_err(|e| ClusterError::Connect(format!("spawning the acceptor: {e}")))?
    };

    let mut out: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut connect_error = None;
    for (j, slot) in out.iter_mut().enumerate().take(me) {
        match connect_one(config, &key, j, deadline, timeouts.handshake, &stop) {
            Ok(s) => *slot = Some(s),
            Err(e) => {
                connect_error = e;
                // No need to wait for the others: the run cannot start.
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    let accepted = match acceptor.join() {
        Ok(r) => r,
        Err(_) => Err(format!("process {me}: the acceptor thread panicked")),
    };
    if let Some(e) = connect_error {
        return Err(ClusterError::Connect(e));
    }
    let accepted = accepted.map_err(ClusterError::Connect)?;
    if out.iter().take(me).any(Option::is_none) {
        return Err(ClusterError::Connect(format!(
            "process {me}: stopped connecting"
        )));
    }
    for (j, s) in accepted.into_iter().enumerate() {
        if s.is_some() {
            out[j] = s;
        }
    }
    for s in out.iter().flatten() {
        let _ = s.set_nodelay(true);
        keepalive(s, timeouts.keepalive);
    }
    tracing::info!(
        event = "cluster_connected",
        process = me,
        processes = n,
        "all processes connected"
    );
    Ok(out)
}

/// Whether the peer closed `s` (or it broke): a member stored earlier whose
/// connection died may be replaced by its retry.
fn is_closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let r = s.peek(&mut b);
    let _ = s.set_nonblocking(false);
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}

/// The accepting side of [`connect_peers`]: waits for processes
/// `me + 1..n`, each connection's handshake on a thread of its own.
fn accept_members(
    listener: TcpListener,
    config: &ClusterConfig,
    key: Arc<Vec<u8>>,
    deadline: Instant,
    connect: Duration,
    handshake: Duration,
    stop: &AtomicBool,
) -> Result<Vec<Option<TcpStream>>, String> {
    let me = config.process_index;
    let n = config.processes;
    let mut got: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut missing = n - me - 1;
    let (tx, rx) = mpsc::channel::<(SocketAddr, Accepted)>();
    let pending = Arc::new(AtomicUsize::new(0));
    let mut rejected = 0usize;
    let mut last_rejection = String::new();
    let mut reject = |from: SocketAddr, why: &str| {
        tracing::warn!(process = me, from = %from, "rejected a connection: {why}");
        rejected += 1;
        last_rejection = format!("{from}: {why}");
    };
    while missing > 0 {
        // New connections: each handshake on a thread of its own.
        loop {
            match listener.accept() {
                Ok((s, from)) => {
                    if pending.load(Ordering::Relaxed) >= MAX_PENDING_HANDSHAKES {
                        reject(from, "too many handshakes in progress");
                        continue;
                    }
                    pending.fetch_add(1, Ordering::Relaxed);
                    let (tx, key, done, config) = (
                        tx.clone(),
                        Arc::clone(&key),
                        Arc::clone(&pending),
                        config.clone(),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("leverflow:handshake".into())
                        .spawn(move || {
                            let outcome = auth::accept_handshake(s, &config, &key, handshake);
                            done.fetch_sub(1, Ordering::Relaxed);
                            // The set-up may be over: then the stream just closes.
                            let _ = tx.send((from, outcome));
                        });
                    if let Err(e) = spawned {
                        pending.fetch_sub(1, Ordering::Relaxed);
                        reject(from, &format!("no thread for its handshake: {e}"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // A connection that went away before it was accepted.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => return Err(format!("process {me}: accepting connections: {e}")),
            }
        }
        // Finished handshakes.
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok((from, Accepted::Member(index, mut s))) => {
                if got[index].as_ref().is_some_and(|old| !is_closed(old)) {
                    let _ = s.write_all(&[auth::REFUSED]);
                    return Err(format!(
                        "process {me}: a second process {index} connected ({from}): are two processes running with the same `process_index`?"
                    ));
                }
                let acked = s
                    .set_write_timeout(Some(handshake))
                    .and_then(|()| s.write_all(&[auth::ACCEPTED]))
                    .and_then(|()| s.set_write_timeout(None))
                    .and_then(|()| s.set_read_timeout(None));
                match acked {
                    Ok(()) => {
                        tracing::debug!(process = me, peer = index, from = %from, "process connected");
                        if got[index].replace(s).is_none() {
                            missing -= 1;
                        }
                    }
                    // It retries.
                    Err(e) => reject(from, &format!("process {index}: acknowledging: {e}")),
                }
            }
            Ok((from, Accepted::Rejected(why))) => reject(from, &why),
            Ok((from, Accepted::Fatal(why))) => {
                return Err(format!("process {me}: connection from {from}: {why}"))
            }
            Err(_) => {}
        }
        if stop.load(Ordering::Relaxed) {
            // The connecting side failed; its error is the one reported.
            return Ok(got);
        }
        if missing > 0 && Instant::now() >= deadline {
            let absent: Vec<String> = (me + 1..n)
                .filter(|&j| got[j].is_none())
                .map(|j| format!("{j} ({})", config.hosts[j]))
                .collect();
            let rejections = match rejected {
                0 => String::new(),
                r => format!(
                    "; {r} connection(s) were rejected, the last from {last_rejection} (a process with another cluster secret?)"
                ),
            };
            return Err(format!(
                "process {me}: process(es) {} did not connect within {connect:?}: not started, or started with another `hostfile`?{rejections}",
                absent.join(", "),
            ));
        }
    }
    Ok(got)
}

/// Connects to process `j` and authenticates it, retrying until `deadline`
/// (or until `stop`: then `Err(None)`).
fn connect_one(
    config: &ClusterConfig,
    key: &[u8],
    j: usize,
    deadline: Instant,
    handshake: Duration,
    stop: &AtomicBool,
) -> Result<TcpStream, Option<String>> {
    let me = config.process_index;
    let host = &config.hosts[j];
    let mut last = String::from("not tried");
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(None);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Some(format!(
                "process {me}: could not reach process {j} at {host} within the connect timeout ({last}): is it running, with the same `hostfile`?"
            )));
        }
        let attempt = (|| -> Result<TcpStream, ConnectFailure> {
            let addrs: Vec<_> = host
                .to_socket_addrs()
                .map_err(|e| ConnectFailure::Retry(format!("resolving {host}: {e}")))?
                .collect();
            let mut err = ConnectFailure::Retry(format!("{host} resolves to no address"));
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                let t = left.clamp(Duration::from_millis(10), Duration::from_secs(2));
                match TcpStream::connect_timeout(&a, t) {
                    Ok(mut s) => {
                        let _ = s.set_nodelay(true);
                        let by = (Instant::now() + handshake).min(deadline);
                        match auth::connect_handshake(&mut s, config, key, j, by) {
                            Ok(()) => return Ok(s),
                            Err(ConnectFailure::Retry(e)) => {
                                err = ConnectFailure::Retry(format!("{a}: {e}"))
                            }
                            Err(fatal) => return Err(fatal),
                        }
                    }
                    Err(e) => err = ConnectFailure::Retry(format!("{a}: {e}")),
                }
            }
            Err(err)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(ConnectFailure::Fatal(e)) => return Err(Some(format!("process {me}: {e}"))),
            Err(ConnectFailure::Retry(e)) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Explains the first real failure (not the "MergeQueue poisoned" panics
/// that follow it in the other threads).
fn explain(config: &ClusterConfig, failures: &[String]) -> String {
    let me = config.process_index;
    let first = failures
        .iter()
        .find(|m| !m.contains("MergeQueue poisoned"))
        .or(failures.first());
    let Some(first) = first else {
        return format!("process {me}: a timely worker failed");
    };
    // "<thread>\t<message>"
    let (thread, msg) = first.split_once('\t').unwrap_or(("", first.as_str()));
    let remote = thread
        .strip_prefix("timely:recv-")
        .or_else(|| thread.strip_prefix("timely:send-"))
        .and_then(|r| r.parse::<usize>().ok());
    match remote {
        Some(r) => format!(
            "process {me}: lost the connection to process {r} ({}): it died, or the network failed; stopping ({msg})",
            config.hosts.get(r).map(String::as_str).unwrap_or("?")
        ),
        None => format!("process {me}: {thread} failed: {msg}"),
    }
}

/// Runs `build` on `config.workers` timely workers in each of
/// `config.processes` processes (one call per process, each with its own
/// `process_index`) and returns this process's worker results in order.
///
/// A single process is [`execute_threads`](super::execute_threads).  With
/// several: connects to the other processes ([`connect_peers`], deadline
/// `timeouts.connect`), then runs timely over those connections.  When a
/// process dies or a connection breaks, timely's communication threads and
/// then the workers panic; this function notices the first such panic,
/// shuts every connection down (so the other processes notice at once too)
/// and returns `Err` with one explanation (which process, which host)
/// within about `timeouts.stop`.  After an `Err` some timely threads may be
/// left behind: the caller should report the error and exit the process.
///
/// While it runs, the panics of timely's threads (workers: message and
/// location) are recorded for that explanation instead of printed; other
/// threads' panics go to the process's panic hook as usual.
pub fn execute_cluster<T, F>(
    config: &ClusterConfig,
    timeouts: &ClusterTimeouts,
    build: F,
) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    if !config.is_multi_process() {
        return super::execute_threads(config.workers, build);
    }
    let sockets = connect_peers(config, timeouts).map_err(|e| e.to_string())?;
    let mut handles = Vec::new();
    for s in sockets.iter().flatten() {
        handles.push(
            s.try_clone()
                .map_err(|e| format!("process {}: socket: {e}", config.process_index))?,
        );
    }
    let shutdown_all = |handles: &[TcpStream]| {
        for h in handles {
            let _ = h.shutdown(std::net::Shutdown::Both);
        }
    };
    let failures = panics::Recorded::default();
    // Workers record their own panics (their thread handler); this one
    // takes those of timely's communication threads.  (Two executors in one
    // process, as in tests, cannot tell their communication threads apart:
    // each records the other's panics too.)
    let recorded = failures.clone();
    let comm_panics = panics::on_any_thread(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("");
        let ours = name.starts_with("timely:");
        if ours {
            recorded.push(format!("{name}\t{}", panics::describe(info)));
        }
        ours
    });
    let build = super::recording_worker_panics(build, failures.clone());
    let hooks = Hooks::default();
    let process_allocators =
        ProcessBuilder::new_typed_vector(config.workers, hooks.refill.clone(), hooks.spill.clone());
    let (builders, comms) = initialize_networking_from_sockets(
        process_allocators,
        sockets,
        config.process_index,
        config.workers,
        hooks,
    )
    .map_err(|e| {
        format!(
            "process {}: starting timely networking: {e}",
            config.process_index
        )
    })?;
    let builders = builders.into_iter().map(AllocatorBuilder::Tcp).collect();
    let guards =
        match timely::execute::execute_from(builders, Box::new(()), WorkerConfig::default(), build)
        {
            Ok(g) => g,
            Err(e) => {
                shutdown_all(&handles);
                std::mem::forget(comms);
                drop(comm_panics);
                return Err(format!(
                    "process {}: starting timely workers: {e}",
                    config.process_index
                ));
            }
        };
    let mut failed_at: Option<Instant> = None;
    loop {
        let all_done = guards.guards().iter().all(|g| g.is_finished());
        if all_done {
            break;
        }
        if failed_at.is_none() && !failures.all().is_empty() {
            failed_at = Some(Instant::now());
            shutdown_all(&handles);
        }
        if failed_at.is_some_and(|t| t.elapsed() >= timeouts.stop) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_done = guards.guards().iter().all(|g| g.is_finished());
    if !failures.all().is_empty() || !all_done {
        shutdown_all(&handles);
        if all_done {
            let _ = guards.join();
        } else {
            // Joining would wait for workers that may never return.
            std::mem::forget(guards);
        }
        // Its drop joins the communication threads and panics on the ones
        // that panicked.
        std::mem::forget(comms);
        let message = explain(config, &failures.all());
        drop(comm_panics);
        return Err(message);
    }
    let results = guards.join();
    // Clean shutdown: the communication threads end once every process has
    // finished (a peer that dies now makes its receive thread panic).
    let comms_closed = {
        // Its drop re-raises a communication thread's panic here: caught,
        // and explained by what that thread recorded.
        let _quiet = panics::on_this_thread(|_| true);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(comms)))
    };
    let failed = failures.all();
    drop(comm_panics);
    if comms_closed.is_err() || !failed.is_empty() || results.iter().any(Result::is_err) {
        return Err(explain(config, &failed));
    }
    Ok(results.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn p() -> PathBuf {
        PathBuf::from("hosts.txt")
    }

    #[test]
    fn hostfile_lines_comments_and_errors() {
        let text = "# cluster\n\nnode0:2101\n  node1:2101   # second\n[::1]:2102\n";
        assert_eq!(
            parse_hostfile(text, &p()).unwrap(),
            ["node0:2101", "node1:2101", "[::1]:2102"]
        );
        for (text, line, needle) in [
            ("a:1\nb\n", 2, "expected host:port"),
            ("a:1\n\nb:0\n", 3, "not a number"),
            ("a:70000\n", 1, "not a number"),
            ("a:x\n", 1, "not a number"),
            (":80\n", 1, "empty host"),
            ("a:1 b:2\n", 1, "one host:port per line"),
            ("a:1\nb:2\na:1\n", 3, "also on line 1"),
        ] {
            let err = parse_hostfile(text, &p()).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, ClusterError::Hostfile { line: l, .. } if l == line),
                "{text:?}: {msg}"
            );
            assert!(
                msg.starts_with(&format!("hosts.txt:{line}: ")) && msg.contains(needle),
                "{text:?}: {msg}"
            );
        }
    }

    #[test]
    fn flags_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts.txt");
        std::fs::write(&hosts, "127.0.0.1:2101\n127.0.0.1:2102\n").unwrap();
        let c = ClusterConfig::from_flags(2, 1, Some(&hosts), 3).unwrap();
        assert_eq!(c.hosts.len(), 2);
        assert!(c.is_multi_process());
        assert_eq!(c.total_workers(), 6);
        assert_eq!(c.global_worker(2), 5);
        assert!(matches!(
            c.timely_config().communication,
            CommunicationConfig::Cluster {
                threads: 3,
                process: 1,
                ..
            }
        ));
        let err = |r: Result<ClusterConfig, ClusterError>| r.unwrap_err().to_string();
        assert!(err(ClusterConfig::from_flags(3, 0, Some(&hosts), 1))
            .contains("lists 2 host(s) but `processes` is 3"));
        assert!(err(ClusterConfig::from_flags(2, 2, Some(&hosts), 1))
            .contains("`process_index` 2 is out of range"));
        assert!(err(ClusterConfig::from_flags(2, 0, None, 1)).contains("needs `hostfile`"));
        assert!(err(ClusterConfig::from_flags(0, 0, None, 1)).contains("at least 1"));
        assert!(err(ClusterConfig::from_flags(2, 0, Some(&hosts), 0)).contains("`workers`"));
        let missing = dir.path().join("nope.txt");
        assert!(err(ClusterConfig::from_flags(2, 0, Some(&missing), 1)).contains("nope.txt"));
        let single = ClusterConfig::from_flags(1, 0, None, 4).unwrap();
        assert_eq!(single, ClusterConfig::single_process(4));
        assert!(!single.is_multi_process());
    }

    fn free_ports(n: usize) -> Vec<String> {
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        ls.iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect()
    }

    #[test]
    fn an_unreachable_peer_is_an_error_after_the_deadline() {
        let hosts = free_ports(2);
        let t = ClusterTimeouts {
            connect: Duration::from_millis(800),
            ..Default::default()
        };
        // Process 1 connects to process 0, which never starts.
        let c1 = ClusterConfig::new(2, 1, hosts.clone(), 1).unwrap();
        let start = Instant::now();
        let err = connect_peers(&c1, &t).unwrap_err().to_string();
        // The deadline holds (a bound far above it: never a timing race).
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(
            err.contains("could not reach process 0") && err.contains(&hosts[0]),
            "{err}"
        );
        // Process 0 waits for process 1, which never starts.
        let c0 = ClusterConfig::new(2, 0, hosts.clone(), 1).unwrap();
        let err = connect_peers(&c0, &t).unwrap_err().to_string();
        assert!(
            err.contains("did not connect") && err.contains(&hosts[1]),
            "{err}"
        );
    }

    #[test]
    fn mismatched_workers_are_refused_by_the_handshake() {
        let hosts = free_ports(2);
        let t = ClusterTimeouts {
            connect: Duration::from_secs(5),
            ..Default::default()
        };
        let c0 = ClusterConfig::new(2, 0, hosts.clone(), 2).unwrap();
        let c1 = ClusterConfig::new(2, 1, hosts, 3).unwrap();
        let t0 = t.clone();
        let h = std::thread::spawn(move || connect_peers(&c0, &t0).map(|_| ()));
        let e1 = connect_peers(&c1, &t).unwrap_err().to_string();
        let e0 = h.join().unwrap().unwrap_err().to_string();
        for e in [e0, e1] {
            assert!(e.contains("`workers`") && e.contains("same values"), "{e}");
        }
    }

    /// Held by the tests that run two executors in this process: their
    /// communication threads cannot be told apart (each executor records
    /// the panics of every `timely:` thread without a handler of its own),
    /// so one test's lost connections must not land in another's run.
    static EXECUTORS: Mutex<()> = Mutex::new(());

    fn executors() -> std::sync::MutexGuard<'static, ()> {
        EXECUTORS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Two "processes" as threads of this test: a distributed count over
    /// 2 × 2 workers.
    #[test]
    fn two_processes_run_a_dataflow() {
        use timely::dataflow::operators::{Exchange, Inspect, ToStream};
        let _one_at_a_time = executors();
        let hosts = free_ports(2);
        let t = ClusterTimeouts::default();
        let run = |index: usize| {
            let c = ClusterConfig::new(2, index, hosts.clone(), 2).unwrap();
            let t = t.clone();
            std::thread::spawn(move || {
                execute_cluster(&c, &t, |worker| {
                    let seen = Arc::new(Mutex::new(0u64));
                    let s = Arc::clone(&seen);
                    let me = worker.index() as u64;
                    worker.dataflow::<u64, _, _>(|scope| {
                        (0..100u64)
                            .filter(move |x| x % 4 == me)
                            .collect::<Vec<_>>()
                            .to_stream(scope)
                            .container::<Vec<_>>()
                            .exchange(|x| *x)
                            .inspect(move |_| *s.lock().unwrap() += 1);
                    });
                    while worker.step() {}
                    let n = *seen.lock().unwrap();
                    n
                })
            })
        };
        let a = run(0);
        let b = run(1);
        let ra = a.join().unwrap().unwrap();
        let rb = b.join().unwrap().unwrap();
        assert_eq!(ra.len(), 2);
        assert_eq!(ra.iter().chain(&rb).sum::<u64>(), 100);
    }

    /// Connects to `addr`, retrying while the listener starts.
    fn connect_when_listening(addr: &str) -> TcpStream {
        loop {
            if let Ok(s) = TcpStream::connect(addr) {
                return s;
            }
            std::thread::yield_now();
        }
    }

    /// A stray client sending garbage, a forged handshake (right magic and
    /// shape, wrong MAC) and a silent client, all during the set-up: the
    /// real processes still connect, and nobody waits for the silent one.
    #[test]
    fn strangers_are_rejected_without_stopping_the_set_up() {
        use std::io::Read;
        let hosts = free_ports(2);
        let t = ClusterTimeouts {
            // A silent client would hold a serial acceptor for this long.
            handshake: Duration::from_secs(3600),
            ..Default::default()
        };
        let secret = ClusterSecret::from_bytes(b"a secret of this run only", "test").unwrap();
        let c0 = ClusterConfig::new(2, 0, hosts.clone(), 1)
            .unwrap()
            .with_secret(Some(secret.clone()))
            .unwrap();
        let c1 = ClusterConfig::new(2, 1, hosts.clone(), 1)
            .unwrap()
            .with_secret(Some(secret))
            .unwrap();
        let t0 = t.clone();
        let p0 = std::thread::spawn(move || connect_peers(&c0, &t0));
        // Garbage (32 bytes, as the old handshake's length), then closed:
        // process 0 closes the connection.
        let mut garbage = connect_when_listening(&hosts[0]);
        garbage.write_all(&[0xab; 32]).unwrap();
        garbage.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(garbage.read_to_end(&mut Vec::new()).unwrap(), 0);
        // A forged handshake: process 0 answers, then closes the connection
        // without acknowledging it.
        let mut forged = connect_when_listening(&hosts[0]);
        let hello = auth::Hello {
            index: 1,
            processes: 2,
            workers: 1,
            nonce: [7; auth::NONCE_LEN],
        };
        forged.write_all(&hello.encode()).unwrap();
        let mut reply = [0u8; auth::HELLO_LEN + auth::MAC_LEN];
        forged.read_exact(&mut reply).unwrap();
        forged.write_all(&[0x42; auth::MAC_LEN]).unwrap();
        let mut rest = Vec::new();
        let _ = forged.read_to_end(&mut rest);
        assert!(rest.is_empty(), "a forgery is never acknowledged");
        // Silent, and held open until the end.
        let silent = connect_when_listening(&hosts[0]);
        // The real process 1.
        let s1 = connect_peers(&c1, &t).unwrap();
        let s0 = p0.join().unwrap().unwrap();
        assert!(s0[1].is_some() && s0[0].is_none());
        assert!(s1[0].is_some() && s1[1].is_none());
        drop(silent);
    }

    #[test]
    fn a_process_with_another_secret_is_refused() {
        let hosts = free_ports(2);
        let t = ClusterTimeouts {
            connect: Duration::from_secs(3),
            ..Default::default()
        };
        let secret = |s: &[u8]| Some(ClusterSecret::from_bytes(s, "test").unwrap());
        let c0 = ClusterConfig::new(2, 0, hosts.clone(), 1)
            .unwrap()
            .with_secret(secret(b"the secret of process 0"))
            .unwrap();
        let c1 = ClusterConfig::new(2, 1, hosts.clone(), 1)
            .unwrap()
            .with_secret(secret(b"the secret of process 1"))
            .unwrap();
        let t0 = t.clone();
        let p0 = std::thread::spawn(move || connect_peers(&c0, &t0));
        // Process 1 retries while process 0 starts, then fails at once.
        let e1 = connect_peers(&c1, &t).unwrap_err().to_string();
        assert!(
            e1.contains("process 0 at") && e1.contains("failed authentication"),
            "{e1}"
        );
        // Process 0 waits for a real process 1 until its deadline.
        let e0 = p0.join().unwrap().unwrap_err().to_string();
        assert!(
            e0.contains("did not connect") && e0.contains("rejected"),
            "{e0}"
        );
    }

    /// A worker that panics: its process reports the message and location;
    /// the other process loses the connection.
    #[test]
    fn a_worker_panic_is_reported_with_its_message_and_location() {
        let _one_at_a_time = executors();
        let hosts = free_ports(2);
        let t = ClusterTimeouts {
            stop: Duration::from_secs(2),
            ..Default::default()
        };
        let run = |index: usize| {
            let c = ClusterConfig::new(2, index, hosts.clone(), 1).unwrap();
            let t = t.clone();
            std::thread::spawn(move || {
                execute_cluster(&c, &t, move |worker| {
                    if index == 0 {
                        panic!("cluster worker exploded");
                    }
                    use timely::dataflow::operators::{Exchange, ToStream};
                    worker.dataflow::<u64, _, _>(|scope| {
                        (0..10u64)
                            .to_stream(scope)
                            .container::<Vec<_>>()
                            .exchange(|x| *x);
                    });
                    while worker.step_or_park(Some(Duration::from_millis(10))) {}
                })
            })
        };
        let a = run(0);
        let b = run(1);
        let e0 = a.join().unwrap().unwrap_err();
        assert!(
            e0.starts_with("process 0: timely worker 0 failed: cluster worker exploded (at ")
                && e0.contains("cluster.rs:"),
            "{e0}"
        );
        let e1 = b.join().unwrap().unwrap_err();
        assert!(e1.contains("process 1"), "{e1}");
    }
}
