//! Authentication of the connections between the processes of a run.
//!
//! Every connection starts with a mutual HMAC-SHA256 challenge–response
//! before any dataflow byte, keyed by the run's shared secret
//! ([`ClusterSecret`]; without one, on loopback addresses only, a key
//! derived from the run's shape, see [`auth_key`]):
//!
//! ```text
//! connector (higher index)                     acceptor (lower index)
//!   hello_c = MAGIC ‖ index ‖ processes ‖ workers ‖ nonce_c   (64 bytes)  ──▶
//!   ◀──  hello_a = MAGIC ‖ index ‖ processes ‖ workers ‖ nonce_a ‖ mac_a  (64 + 32 bytes)
//!   mac_c  (32 bytes)                                                       ──▶
//!   ◀──  ack  (1 byte: 0 accepted, 1 refused: that process index is taken)
//! mac_a = HMAC(key, DOMAIN ‖ "acceptor"  ‖ hello_c ‖ hello_a)
//! mac_c = HMAC(key, DOMAIN ‖ "connector" ‖ hello_c ‖ hello_a)
//! ```
//!
//! Each side sends a fresh random nonce and proves knowledge of the key over
//! both nonces, both process indices and both claimed run shapes
//! (processes, workers); MACs are compared in constant time
//! (`verify_slice`).  Only an authenticated peer's shape is compared with
//! ours: a stranger can never make a run fail, and a member with other
//! `--processes`/`--workers` gets the same precise error as before.
//!
//! The exchange has no encryption and does not protect the stream after
//! it: see the README's Security section.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::TryRngCore;
use sha2::{Digest, Sha256};

use super::{ClusterConfig, ClusterError};

type HmacSha256 = Hmac<Sha256>;

/// The environment variable that may hold the cluster secret itself (when
/// no secret file is given).
pub const CLUSTER_SECRET_ENV: &str = "LEVERFLOW_CLUSTER_SECRET";

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// The longest secret (file) accepted, in bytes.
const MAX_SECRET_BYTES: usize = 4096;

/// How to make a secret (quoted by the error messages).
pub const MAKE_SECRET: &str =
    "head -c 32 /dev/urandom | base64 > cluster.secret && chmod 600 cluster.secret";

pub(super) const MAGIC: [u8; 8] = *b"LVRFLOW2";
pub(super) const NONCE_LEN: usize = 32;
/// magic, index, processes, workers, nonce.
pub(super) const HELLO_LEN: usize = 8 + 3 * 8 + NONCE_LEN;
pub(super) const MAC_LEN: usize = 32;
pub(super) const ACCEPTED: u8 = 0;
pub(super) const REFUSED: u8 = 1;
const DOMAIN: &[u8] = b"leverflow cluster handshake v2\0";

/// The shared secret of a multi-process run: every connection between its
/// processes is authenticated with it.  Its `Debug` output does not show
/// it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} bytes, redacted)", self.0.len())
    }
}

fn secret_error(msg: String) -> ClusterError {
    ClusterError::Secret(msg)
}

impl ClusterSecret {
    /// A secret from its bytes (trailing whitespace, such as the newline of
    /// a file, is not part of it): at least [`MIN_SECRET_BYTES`] bytes.
    /// `origin` names where it came from, for the error.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self, ClusterError> {
        let secret = bytes.trim_ascii_end();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(secret_error(format!(
                "{origin}: the cluster secret is {} byte(s) long; it needs at least {MIN_SECRET_BYTES} (make one with `{MAKE_SECRET}`)",
                secret.len()
            )));
        }
        if secret.len() > MAX_SECRET_BYTES {
            return Err(secret_error(format!(
                "{origin}: the cluster secret is {} bytes long; at most {MAX_SECRET_BYTES} are accepted (make one with `{MAKE_SECRET}`)",
                secret.len()
            )));
        }
        Ok(ClusterSecret(secret.to_vec()))
    }

    /// Reads a secret file (its content without trailing whitespace).  A
    /// file that users other than its owner may read or write (mode & 0o077
    /// != 0) is refused.
    pub fn from_file(path: &Path) -> Result<Self, ClusterError> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| {
            secret_error(format!("{shown}: cannot read the cluster secret file: {e}"))
        })?;
        if !meta.is_file() {
            return Err(secret_error(format!(
                "{shown}: the cluster secret file is not a regular file"
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(secret_error(format!(
                    "{shown}: the cluster secret file can be read or written by other users (mode {mode:03o}); make it private with `chmod 600 {shown}`"
                )));
            }
        }
        if meta.len() > MAX_SECRET_BYTES as u64 {
            return Err(secret_error(format!(
                "{shown}: the cluster secret file is {} bytes long; at most {MAX_SECRET_BYTES} are accepted (make one with `{MAKE_SECRET}`)",
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| {
            secret_error(format!("{shown}: cannot read the cluster secret file: {e}"))
        })?;
        Self::from_bytes(&bytes, &shown.to_string())
    }

    /// The secret of `file` when given, else of the environment variable
    /// [`CLUSTER_SECRET_ENV`] when set (an empty value is refused), else
    /// none.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>, ClusterError> {
        if let Some(file) = file {
            return Self::from_file(file).map(Some);
        }
        match std::env::var_os(CLUSTER_SECRET_ENV) {
            Some(value) => {
                #[cfg(unix)]
                let bytes = std::os::unix::ffi::OsStrExt::as_bytes(value.as_os_str()).to_vec();
                #[cfg(not(unix))]
                let bytes = value.to_string_lossy().into_owned().into_bytes();
                Self::from_bytes(&bytes, CLUSTER_SECRET_ENV).map(Some)
            }
            None => Ok(None),
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

fn loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

/// Whether a hostfile entry `host:port` is a loopback address: `localhost`,
/// 127.0.0.0/8, `::1`, or a name that resolves to loopback addresses only.
/// A name that does not resolve counts as not loopback.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return loopback_ip(ip);
    }
    match host_port.to_socket_addrs() {
        Ok(addrs) => {
            let ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            !ips.is_empty() && ips.into_iter().all(loopback_ip)
        }
        Err(_) => false,
    }
}

/// The HMAC key of a run: its secret; without one, when every host is a
/// loopback address, a key derived from the run's hosts (it keeps out
/// garbage and processes of other runs, not a local user who can read the
/// hostfile: use a secret on a shared machine).  Without a secret and with any other address: an error that
/// says how to make and pass a secret.
pub fn auth_key(config: &ClusterConfig) -> Result<Vec<u8>, ClusterError> {
    if let Some(secret) = &config.secret {
        return Ok(secret.bytes().to_vec());
    }
    let remote: Vec<&str> = config
        .hosts
        .iter()
        .map(String::as_str)
        .filter(|h| !is_loopback_host(h))
        .collect();
    if !remote.is_empty() {
        return Err(secret_error(format!(
            "the hostfile lists address(es) that are not loopback ({}): a run across hosts needs a shared cluster secret, so that nobody else on the network can join it or feed it records. Make one with `{MAKE_SECRET}`, copy it to every host, and pass `cluster_secret_file` cluster.secret to every process (or put the secret itself in the environment variable {CLUSTER_SECRET_ENV})",
            remote.join(", ")
        )));
    }
    // From the hosts only: the shapes are compared after authentication, so
    // that a process with other --workers gets that error, not a MAC error.
    let mut h = Sha256::new();
    h.update(b"leverflow cluster default key v1\0");
    for host in &config.hosts {
        h.update(host.as_bytes());
        h.update(b"\n");
    }
    Ok(h.finalize().to_vec())
}

/// One side's opening message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hello {
    pub index: u64,
    pub processes: u64,
    pub workers: u64,
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    /// This process's hello with a fresh nonce from the operating system.
    pub fn new(config: &ClusterConfig) -> io::Result<Self> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| io::Error::other(format!("no random numbers for the handshake: {e}")))?;
        Ok(Hello {
            index: config.process_index as u64,
            processes: config.processes as u64,
            workers: config.workers as u64,
            nonce,
        })
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.index.to_be_bytes());
        b[16..24].copy_from_slice(&self.processes.to_be_bytes());
        b[24..32].copy_from_slice(&self.workers.to_be_bytes());
        b[32..].copy_from_slice(&self.nonce);
        b
    }

    /// `None` when the bytes do not start with the magic.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Self> {
        if b[..8] != MAGIC {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(w)
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&b[32..]);
        Some(Hello {
            index: word(8),
            processes: word(16),
            workers: word(24),
            nonce,
        })
    }
}

/// The MAC of one role over the transcript (both hellos as sent).
pub(super) fn transcript_mac(
    key: &[u8],
    role: &[u8],
    connector: &[u8; HELLO_LEN],
    acceptor: &[u8; HELLO_LEN],
) -> io::Result<HmacSha256> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .map_err(|e| io::Error::other(format!("HMAC key: {e}")))?;
    mac.update(DOMAIN);
    mac.update(role);
    mac.update(b"\0");
    mac.update(connector);
    mac.update(acceptor);
    Ok(mac)
}

/// Compares an authenticated peer's run shape with ours.
pub(super) fn check_shape(config: &ClusterConfig, peer: &Hello) -> Result<(), String> {
    if peer.processes != config.processes as u64 || peer.workers != config.workers as u64 {
        return Err(format!(
            "process {} runs with `processes` {} `workers` {}, this one with `processes` {} `workers` {}: every process needs the same values",
            peer.index, peer.processes, peer.workers, config.processes, config.workers
        ));
    }
    Ok(())
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the handshake timed out")
}

/// `read_exact` that gives up at `deadline` however slowly the bytes come.
pub(super) fn read_exact_by(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the connection closed after {got} of {} bytes", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline`.
pub(super) fn write_all_by(s: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    s.set_write_timeout(Some(left))?;
    s.write_all(buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
        _ => e,
    })?;
    s.flush()
}

/// What the accepting side made of a connection.
pub(super) enum Accepted {
    /// An authenticated process of this run with the same shape, not yet
    /// acknowledged (the caller sends [`ACCEPTED`] or [`REFUSED`]).
    Member(usize, TcpStream),
    /// Not a process of this run (garbage, a wrong MAC, silence, a closed
    /// connection): closed; the run goes on.
    Rejected(String),
    /// An authenticated process of this run that cannot take part (another
    /// shape, an impossible index): the run cannot go on.
    Fatal(String),
}

/// The accepting side of the handshake on a fresh connection, within
/// `timeout`.
pub(super) fn accept_handshake(
    mut s: TcpStream,
    config: &ClusterConfig,
    key: &[u8],
    timeout: Duration,
) -> Accepted {
    let deadline = Instant::now() + timeout;
    let io_reason = |e: io::Error| format!("handshake: {e}");
    let run = |s: &mut TcpStream| -> Result<Hello, String> {
        s.set_nonblocking(false).map_err(io_reason)?;
        let _ = s.set_nodelay(true);
        let mut hello = [0u8; HELLO_LEN];
        read_exact_by(s, &mut hello, deadline).map_err(io_reason)?;
        let theirs = Hello::decode(&hello)
            .ok_or_else(|| "not a leverflow cluster handshake (wrong magic bytes)".to_string())?;
        let ours = Hello::new(config).map_err(io_reason)?.encode();
        let mac_a = transcript_mac(key, b"acceptor", &hello, &ours)
            .map_err(io_reason)?
            .finalize()
            .into_bytes();
        let mut reply = [0u8; HELLO_LEN + MAC_LEN];
        reply[..HELLO_LEN].copy_from_slice(&ours);
        reply[HELLO_LEN..].copy_from_slice(&mac_a);
        write_all_by(s, &reply, deadline).map_err(io_reason)?;
        let mut proof = [0u8; MAC_LEN];
        read_exact_by(s, &mut proof, deadline).map_err(io_reason)?;
        transcript_mac(key, b"connector", &hello, &ours)
            .map_err(io_reason)?
            .verify_slice(&proof)
            .map_err(|_| {
                "authentication failed (the peer does not know this run's cluster secret)"
                    .to_string()
            })?;
        Ok(theirs)
    };
    let theirs = match run(&mut s) {
        Ok(h) => h,
        Err(why) => return Accepted::Rejected(why),
    };
    if let Err(e) = check_shape(config, &theirs) {
        return Accepted::Fatal(e);
    }
    let me = config.process_index;
    let index = usize::try_from(theirs.index).unwrap_or(usize::MAX);
    if index <= me || index >= config.processes {
        return Accepted::Fatal(format!(
            "process {index} connected to process {me}, but only processes {}..{} do: are the processes started with the same `hostfile` and distinct `process_index`?",
            me + 1,
            config.processes
        ));
    }
    Accepted::Member(index, s)
}

/// Why the connecting side's handshake failed.
pub(super) enum ConnectFailure {
    /// Worth another try (the peer is starting, a connection broke).
    Retry(String),
    /// The peer is not this run's process `j` or cannot take part.
    Fatal(String),
}

/// The connecting side of the handshake with process `j`, within
/// `deadline`.
pub(super) fn connect_handshake(
    s: &mut TcpStream,
    config: &ClusterConfig,
    key: &[u8],
    j: usize,
    deadline: Instant,
) -> Result<(), ConnectFailure> {
    use ConnectFailure::{Fatal, Retry};
    let retry = |e: io::Error| Retry(format!("handshake: {e}"));
    let host = config.hosts.get(j).map(String::as_str).unwrap_or("?");
    let ours = Hello::new(config).map_err(retry)?.encode();
    write_all_by(s, &ours, deadline).map_err(retry)?;
    let mut reply = [0u8; HELLO_LEN + MAC_LEN];
    read_exact_by(s, &mut reply, deadline).map_err(retry)?;
    let mut head = [0u8; HELLO_LEN];
    head.copy_from_slice(&reply[..HELLO_LEN]);
    let theirs = Hello::decode(&head).ok_or_else(|| {
        Fatal(format!(
            "{host} (process {j} in the hostfile) is not a leverflow process of a cluster run of this version"
        ))
    })?;
    transcript_mac(key, b"acceptor", &ours, &head)
        .map_err(retry)?
        .verify_slice(&reply[HELLO_LEN..])
        .map_err(|_| {
            Fatal(format!(
                "process {j} at {host} failed authentication: it does not use this process's cluster secret (every process needs the same `cluster_secret_file` or {CLUSTER_SECRET_ENV})"
            ))
        })?;
    if theirs.index != j as u64 {
        return Err(Fatal(format!(
            "expected process {j} at {host}, found process {}",
            theirs.index
        )));
    }
    let proof = transcript_mac(key, b"connector", &ours, &head)
        .map_err(retry)?
        .finalize()
        .into_bytes();
    write_all_by(s, &proof, deadline).map_err(retry)?;
    // After the proof: the acceptor, too, learns of another shape from an
    // authenticated peer, and stops with this error.
    check_shape(config, &theirs).map_err(Fatal)?;
    let mut ack = [0u8; 1];
    read_exact_by(s, &mut ack, deadline).map_err(retry)?;
    if ack[0] != ACCEPTED {
        return Err(Fatal(format!(
            "process {j} at {host} refused this connection: it is already connected to a process {}: are two processes running with the same `process_index`?",
            config.process_index
        )));
    }
    s.set_read_timeout(None).map_err(retry)?;
    s.set_write_timeout(None).map_err(retry)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn config(index: usize, hosts: &[&str], workers: usize) -> ClusterConfig {
        ClusterConfig::new(
            hosts.len(),
            index,
            hosts.iter().map(|h| h.to_string()).collect(),
            workers,
        )
        .unwrap()
    }

    #[test]
    fn loopback_addresses_are_recognised() {
        for h in [
            "127.0.0.1:2101",
            "127.1.2.3:80",
            "[::1]:2101",
            "localhost:2101",
            "LOCALHOST:9",
            "[::ffff:127.0.0.1]:5",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "10.0.0.1:2101",
            "192.0.2.7:2101",
            "[2001:db8::1]:2101",
            "0.0.0.0:2101",
            "no-such-host.invalid:2101",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn a_non_loopback_hostfile_needs_a_secret() {
        let c = config(0, &["127.0.0.1:2101", "192.0.2.7:2101"], 1);
        let err = auth_key(&c).unwrap_err().to_string();
        assert!(
            err.contains("192.0.2.7:2101")
                && err.contains("head -c 32 /dev/urandom")
                && err.contains("`cluster_secret_file`")
                && err.contains(CLUSTER_SECRET_ENV),
            "{err}"
        );
        assert!(!err.contains("127.0.0.1:2101"), "{err}");
        let err = c.clone().with_secret(None).unwrap_err().to_string();
        assert!(err.contains("cluster secret"), "{err}");
        let secret = ClusterSecret::from_bytes(b"0123456789abcdef0123\n", "test").unwrap();
        let c = c.with_secret(Some(secret)).unwrap();
        assert_eq!(auth_key(&c).unwrap(), b"0123456789abcdef0123");
        // Loopback only: a default key, the same for every process of the
        // run, another for other hosts.
        let a = auth_key(&config(0, &["127.0.0.1:1", "localhost:2"], 1)).unwrap();
        let b = auth_key(&config(1, &["127.0.0.1:1", "localhost:2"], 1)).unwrap();
        let other = auth_key(&config(1, &["127.0.0.1:1", "localhost:3"], 1)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert!(config(0, &["127.0.0.1:1", "localhost:2"], 1)
            .with_secret(None)
            .is_ok());
    }

    #[test]
    fn short_empty_and_shared_secrets_are_refused() {
        for bad in [&b""[..], b"\n", b"short secret\n", b"fifteen bytes..\n"] {
            let err = ClusterSecret::from_bytes(bad, "X").unwrap_err().to_string();
            assert!(
                err.contains("at least 16") && err.contains(MAKE_SECRET),
                "{err}"
            );
        }
        assert!(ClusterSecret::from_bytes(&[b'x'; 5000], "X").is_err());
        let s = ClusterSecret::from_bytes(b"sixteen bytes ok\r\n", "X").unwrap();
        assert_eq!(s.bytes(), b"sixteen bytes ok");
        assert!(!format!("{s:?}").contains("sixteen"), "{s:?}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0IQ==\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
                let err = ClusterSecret::from_file(&path).unwrap_err().to_string();
                assert!(
                    err.contains("other users") && err.contains("chmod 600"),
                    "{mode:o}: {err}"
                );
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let s = ClusterSecret::from_file(&path).unwrap();
        assert_eq!(s.bytes(), b"c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0IQ==");
        assert_eq!(
            ClusterSecret::from_file_or_env(Some(&path)).unwrap(),
            Some(s)
        );
        let err = ClusterSecret::from_file(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("cannot read"),
            "{err}"
        );
        let err = ClusterSecret::from_file(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn hellos_round_trip_and_garbage_does_not_decode() {
        let c = config(1, &["127.0.0.1:1", "127.0.0.1:2"], 3);
        let h = Hello::new(&c).unwrap();
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        assert_ne!(Hello::new(&c).unwrap().nonce, h.nonce, "fresh nonces");
        assert_eq!(Hello::decode(&[0x5a; HELLO_LEN]), None);
    }

    /// Runs the accepting side on one connection made by `client` (on a
    /// thread of its own, returned).
    fn accept_one(
        config: &ClusterConfig,
        key: &[u8],
        timeout: Duration,
        client: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (Accepted, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let c = std::thread::spawn(move || client(TcpStream::connect(addr).unwrap()));
        let (s, _) = listener.accept().unwrap();
        (accept_handshake(s, config, key, timeout), c)
    }

    fn rejected(out: &Accepted) -> &str {
        match out {
            Accepted::Rejected(why) => why,
            Accepted::Member(i, _) => panic!("accepted as process {i}"),
            Accepted::Fatal(e) => panic!("fatal: {e}"),
        }
    }

    fn connect_error(r: Result<(), ConnectFailure>) -> String {
        match r {
            Ok(()) => panic!("the handshake succeeded"),
            Err(ConnectFailure::Retry(e)) => format!("retry: {e}"),
            Err(ConnectFailure::Fatal(e)) => format!("fatal: {e}"),
        }
    }

    #[test]
    fn the_acceptor_rejects_garbage_forgeries_and_silence() {
        let hosts = ["127.0.0.1:1", "127.0.0.1:2"];
        let c0 = config(0, &hosts, 1);
        let c1 = config(1, &hosts, 1);
        let key = b"the right key, 32 bytes long....".to_vec();
        let t = Duration::from_secs(60);
        // 32 bytes of garbage, then the connection closes.
        let (out, c) = accept_one(&c0, &key, t, |mut s| {
            s.write_all(&[0x17; 32]).unwrap();
        });
        c.join().unwrap();
        assert!(rejected(&out).contains("closed"), "{}", rejected(&out));
        // A full-length hello with the wrong magic.
        let (out, c) = accept_one(&c0, &key, t, |mut s| {
            s.write_all(&[0x17; HELLO_LEN]).unwrap();
        });
        c.join().unwrap();
        assert!(rejected(&out).contains("magic"), "{}", rejected(&out));
        // The right magic and shape, a wrong MAC: rejected, and never
        // acknowledged.
        let c = c1.clone();
        let (out, client) = accept_one(&c0, &key, t, move |mut s| {
            let hello = Hello::new(&c).unwrap().encode();
            s.write_all(&hello).unwrap();
            let mut reply = [0u8; HELLO_LEN + MAC_LEN];
            s.read_exact(&mut reply).unwrap();
            s.write_all(&[0u8; MAC_LEN]).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty(), "no acknowledgement for a forgery");
        });
        assert!(rejected(&out).contains("authentication failed"));
        drop(out);
        client.join().unwrap();
        // A process with another key: each side refuses the other.
        let c = c1.clone();
        let (out, client) = accept_one(&c0, &key, t, move |mut s| {
            let r = connect_handshake(&mut s, &c, b"another key", 0, Instant::now() + t);
            let e = connect_error(r);
            assert!(
                e.starts_with("fatal: process 0 at 127.0.0.1:1 failed authentication"),
                "{e}"
            );
        });
        client.join().unwrap();
        assert!(rejected(&out).contains("closed"), "{}", rejected(&out));
        // Silence: rejected at the handshake's own deadline.
        let (out, client) = accept_one(&c0, &key, Duration::from_millis(300), |mut s| {
            // Hold the connection until the acceptor closes it.
            let _ = s.read_to_end(&mut Vec::new());
        });
        assert!(rejected(&out).contains("timed out"), "{}", rejected(&out));
        drop(out);
        client.join().unwrap();
    }

    #[test]
    fn members_authenticate_and_shapes_are_compared_only_then() {
        let hosts = ["127.0.0.1:1", "127.0.0.1:2"];
        let c0 = config(0, &hosts, 2);
        let key = b"0123456789abcdef".to_vec();
        let t = Duration::from_secs(60);
        // The real process 1, acknowledged.
        let (c, k) = (config(1, &hosts, 2), key.clone());
        let (out, client) = accept_one(&c0, &key, t, move |mut s| {
            connect_handshake(&mut s, &c, &k, 0, Instant::now() + t)
                .map_err(|e| connect_error(Err(e)))
                .unwrap();
        });
        match out {
            Accepted::Member(1, mut s) => s.write_all(&[ACCEPTED]).unwrap(),
            other => panic!("{}", rejected(&other)),
        }
        client.join().unwrap();
        // Refused by the acceptor (its process 1 is connected already).
        let (c, k) = (config(1, &hosts, 2), key.clone());
        let (out, client) = accept_one(&c0, &key, t, move |mut s| {
            let e = connect_error(connect_handshake(&mut s, &c, &k, 0, Instant::now() + t));
            assert!(
                e.contains("fatal") && e.contains("same `process_index`"),
                "{e}"
            );
        });
        match out {
            Accepted::Member(1, mut s) => s.write_all(&[REFUSED]).unwrap(),
            other => panic!("{}", rejected(&other)),
        }
        client.join().unwrap();
        // Authenticated, with other --workers: fatal for both.
        let (c, k) = (config(1, &hosts, 3), key.clone());
        let (out, client) = accept_one(&c0, &key, t, move |mut s| {
            let e = connect_error(connect_handshake(&mut s, &c, &k, 0, Instant::now() + t));
            assert!(e.contains("fatal") && e.contains("`workers` 2"), "{e}");
        });
        match &out {
            Accepted::Fatal(e) => assert!(e.contains("same values"), "{e}"),
            other => panic!("{}", rejected(other)),
        }
        drop(out);
        client.join().unwrap();
        // Authenticated, claiming to be process 0 (the acceptor itself).
        let (c, k) = (config(0, &hosts, 2), key.clone());
        let (out, client) = accept_one(&c0, &key, t, move |mut s| {
            let e = connect_error(connect_handshake(&mut s, &c, &k, 0, Instant::now() + t));
            assert!(e.contains("retry"), "{e}");
        });
        match &out {
            Accepted::Fatal(e) => assert!(e.contains("process 0 connected to process 0"), "{e}"),
            other => panic!("{}", rejected(other)),
        }
        drop(out);
        client.join().unwrap();
    }
}
