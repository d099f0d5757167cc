//! Multi-process runs on 127.0.0.1 (timely's cluster mode): the merged
//! output equals a one-process run; strangers connecting during the set-up
//! (garbage, a forged handshake, a silent client) are rejected without
//! stopping it; a killed process stops the others quickly and a rerun
//! completes with identical output; a run across hosts needs a private
//! secret.
//!
//! Nothing here waits on a timer: the tests watch the processes' stderr for
//! the events they log (`LEVERFLOW_LOG`), with generous upper bounds that
//! only a hang reaches.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long an awaited event may take to come: only a hang reaches this.
const EVENT_LIMIT: Duration = Duration::from_secs(600);

/// The log filter that makes the processes report the set-up's events
/// (`cluster_listening`, `cluster_connected`, rejected connections).
const CLUSTER_LOG: &str = "leverflow_operators::dataflow::cluster=info";

/// A hostfile with `n` free local ports.
fn hostfile(dir: &Path, n: usize) -> PathBuf {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let text: String = listeners
        .iter()
        .map(|l| format!("{}\n", l.local_addr().unwrap()))
        .collect();
    let p = dir.join("hosts.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn hosts_of(hostfile: &Path) -> Vec<String> {
    std::fs::read_to_string(hostfile)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `leverflow` with `args` and the cluster's events on stderr; no secret
/// from the environment unless `env` gives one.
fn command(args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_leverflow"));
    c.args(args)
        .env("LEVERFLOW_LOG", CLUSTER_LOG)
        .env_remove("LEVERFLOW_CLUSTER_SECRET");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// A running process whose stderr is read line by line on a thread, so
/// that a test can wait for an event in it.
struct Watched {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
    stdout: std::thread::JoinHandle<String>,
}

impl Watched {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Self {
        let mut child = command(args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Watched {
            child,
            lines,
            stderr: Vec::new(),
            stdout,
        }
    }

    /// Waits for the next stderr line containing `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let until = Instant::now() + EVENT_LIMIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no {needle:?} on stderr within {EVENT_LIMIT:?}:\n{}",
                    self.stderr.join("\n")
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "the process closed its stderr without {needle:?}:\n{}",
                    self.stderr.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit: its status, stderr and stdout.
    fn finish(self) -> (ExitStatus, String, String) {
        self.finish_within(EVENT_LIMIT)
    }

    /// `finish`, failing the test if the process has not closed its stderr
    /// (exited) within `limit`.
    fn finish_within(mut self, limit: Duration) -> (ExitStatus, String, String) {
        let until = Instant::now() + limit;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stderr.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("still running after {limit:?}:\n{}", self.stderr.join("\n"));
                }
            }
        }
        let status = self.child.wait().unwrap();
        let stdout = self.stdout.join().unwrap();
        (status, self.stderr.join("\n"), stdout)
    }

    /// `finish`, asserting success.
    fn succeed(self, what: &str) -> String {
        let (status, stderr, stdout) = self.finish();
        assert!(
            status.success(),
            "{what} failed:\nstdout: {stdout}\nstderr: {stderr}"
        );
        stderr
    }
}

fn cluster_args(
    base: &[String],
    hosts: &Path,
    processes: usize,
    index: usize,
    workers: usize,
) -> Vec<String> {
    let mut a = base.to_vec();
    a.extend([
        "--processes".to_string(),
        processes.to_string(),
        "--process_index".into(),
        index.to_string(),
        "--hostfile".into(),
        hosts.display().to_string(),
        "--workers".into(),
        workers.to_string(),
    ]);
    a
}

/// Runs every process of a cluster to completion; all must succeed.
fn run_cluster(base: &[String], dir: &Path, processes: usize, workers: usize) {
    let hosts = hostfile(dir, processes);
    let children: Vec<Watched> = (0..processes)
        .map(|i| Watched::spawn(&cluster_args(base, &hosts, processes, i, workers), &[]))
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        c.succeed(&format!("process {i}"));
    }
}

fn parquet_rows(files: &[PathBuf]) -> Vec<(u64, String)> {
    let mut all = Vec::new();
    for f in files {
        let (_meta, rows) = leverflow_operators::outputs::read_rl_parquet(f).unwrap();
        all.extend(
            leverflow_operators::outputs::rows_to_records(rows)
                .into_iter()
                .map(|(q, r)| (q, serde_json::to_string(&r).unwrap())),
        );
    }
    all.sort();
    all
}

#[test]
fn two_processes_give_the_one_process_output() {
    let r = replay_fixture();
    let d = &r.dir;
    let one = d.join("one.json");
    ok(&leverflow(&replay_args(&r.replay, &one)));
    let two = d.join("two.json");
    run_cluster(&replay_args(&r.replay, &two), d, 2, 2);
    // Process 0's JSON, and `leverflow merge` of the part files.
    assert_eq!(without_meta(&two), without_meta(&one));
    let merged = d.join("merged.json");
    ok(&leverflow(&[
        "merge".to_string(),
        d.join("two.parquet").display().to_string(),
        "--output_path".into(),
        merged.display().to_string(),
        "--quiet".into(),
    ]));
    assert_eq!(without_meta(&merged), without_meta(&one));
    // The dataset: a manifest, and each process wrote its own parts.
    let manifest = read_json(&d.join("two.parquet/_manifest.json"));
    let parts: Vec<PathBuf> = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| d.join("two.parquet").join(p["file"].as_str().unwrap()))
        .collect();
    let names: Vec<String> = parts
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("part-00000-")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("part-00001-")),
        "{names:?}"
    );
    assert_eq!(parquet_rows(&parts), parquet_rows(&[d.join("one.parquet")]));
    assert_eq!(manifest["_meta"]["counts"]["queries"], 48);
    // A rerun of the cluster reuses each process's store.
    run_cluster(&replay_args(&r.replay, &two), d, 2, 2);
    let meta = read_json(&two)["_meta"].clone();
    assert_eq!(meta["counts"]["queries_reused"], 48, "{meta}");
    assert_eq!(meta["counts"]["vqa_calls"], 0);
    assert_eq!(without_meta(&two), without_meta(&one));
}

fn tiny_args(out: &Path) -> Vec<String> {
    let mut args = vec!["generate".to_string()];
    args.extend(demo_args(out));
    args.extend([
        "--vqa_model".to_string(),
        root()
            .join("tests/fixtures/qwen2_5_vl_tiny")
            .display()
            .to_string(),
        "--end_idx".into(),
        "32".into(),
        "--batch_size".into(),
        "4".into(),
    ]);
    args
}

#[test]
fn a_killed_process_stops_the_other_and_a_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let one = d.join("one.json");
    ok(&leverflow(&tiny_args(&one)));
    let two = d.join("two.json");
    let base = tiny_args(&two);
    let hosts = hostfile(d, 2);
    let mut p0 = Watched::spawn(&cluster_args(&base, &hosts, 2, 0, 1), &[]);
    let mut p1 = Watched::spawn(&cluster_args(&base, &hosts, 2, 1, 1), &[]);
    // Kill process 1 once both are connected (then it is in the dataflow,
    // which process 0 cannot finish without it).
    p0.wait_for("cluster_connected");
    p1.wait_for("cluster_connected");
    p1.child.kill().unwrap(); // SIGKILL
    let (status1, stderr1, _) = p1.finish();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status1.signal(),
            Some(9),
            "process 1 ended before the kill: {stderr1}"
        );
    }
    #[cfg(not(unix))]
    let _ = (status1, stderr1);
    // Process 0 stops on its own, in a fraction of a second; the bound is
    // far above that (its --connect_timeout, 60 s, is not involved: it is
    // connected).
    let (status, stderr, _) = p0.finish_within(Duration::from_secs(60));
    assert!(!status.success(), "process 0 must fail when its peer dies");
    assert!(
        stderr.contains("lost the connection to process 1"),
        "{stderr}"
    );
    assert!(!two.exists(), "no JSON from an incomplete run");
    // The same command again completes, with the one-process output.
    run_cluster(&base, d, 2, 1);
    assert_eq!(without_meta(&two), without_meta(&one));
}

/// The handshake of a process claiming to be process 1 of a 2 × 1 run.
fn forged_hello() -> Vec<u8> {
    let mut hello = b"LVRFLOW2".to_vec();
    for word in [1u64, 2, 1] {
        hello.extend(word.to_be_bytes());
    }
    hello.extend([7u8; 32]);
    hello
}

#[test]
fn strangers_during_the_set_up_do_not_stop_the_run() {
    let r = replay_fixture();
    let d = &r.dir;
    let one = d.join("one.json");
    ok(&leverflow(&replay_args(&r.replay, &one)));
    let two = d.join("two.json");
    let base = replay_args(&r.replay, &two);
    let hosts_file = hostfile(d, 2);
    let hosts = hosts_of(&hosts_file);
    // Process 0 reads the secret from its file, process 1 from the
    // environment.
    let secret_text = "c2VjcmV0IG9mIHRoaXMgdGVzdCBydW4gb25seSE=";
    let secret = d.join("cluster.secret");
    std::fs::write(&secret, format!("{secret_text}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut args0 = cluster_args(&base, &hosts_file, 2, 0, 1);
    args0.extend(["--cluster_secret_file".into(), secret.display().to_string()]);
    let mut p0 = Watched::spawn(&args0, &[]);
    p0.wait_for("cluster_listening");

    // 32 bytes of garbage (the old handshake's length), then closed:
    // process 0 closes its end.
    let mut garbage = TcpStream::connect(&hosts[0]).unwrap();
    garbage.write_all(&[0xab; 32]).unwrap();
    garbage.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = garbage.read_to_end(&mut Vec::new());
    // A forged handshake: the right magic and shape, a wrong MAC. Process
    // 0 answers its challenge, then closes without acknowledging.
    let mut forged = TcpStream::connect(&hosts[0]).unwrap();
    forged.write_all(&forged_hello()).unwrap();
    let mut reply = [0u8; 96];
    forged.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..8], b"LVRFLOW2");
    forged.write_all(&[0x42; 32]).unwrap();
    let mut rest = Vec::new();
    let _ = forged.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a forged handshake is never acknowledged");
    // A client that says nothing, connected until the run is over.
    let silent = TcpStream::connect(&hosts[0]).unwrap();
    let first = p0.wait_for("rejected a connection");
    let second = p0.wait_for("rejected a connection");
    let rejections = format!("{first}\n{second}");
    assert!(
        rejections.contains("closed after 32 of 64 bytes"),
        "{rejections}"
    );
    assert!(rejections.contains("authentication failed"), "{rejections}");

    let p1 = Watched::spawn(
        &cluster_args(&base, &hosts_file, 2, 1, 1),
        &[("LEVERFLOW_CLUSTER_SECRET", secret_text)],
    );
    p0.succeed("process 0");
    p1.succeed("process 1");
    drop(silent);
    assert_eq!(without_meta(&two), without_meta(&one));
}

#[test]
fn a_run_across_hosts_needs_a_private_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = tiny_args(&d.join("out.json"));
    // 192.0.2.0/24 is TEST-NET-1: not loopback, and never contacted (the
    // check comes before any connection or input).
    let hosts = d.join("hosts.txt");
    std::fs::write(&hosts, "127.0.0.1:2101\n192.0.2.1:2101\n").unwrap();
    let args = cluster_args(&base, &hosts, 2, 0, 1);
    let run = |args: &[String], env: &[(&str, &str)]| {
        let o = command(args, env).output().unwrap();
        assert!(!o.status.success(), "expected a failure");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run(&args, &[]);
    for needle in [
        "192.0.2.1:2101",
        "not loopback",
        "head -c 32 /dev/urandom | base64 > cluster.secret && chmod 600 cluster.secret",
        "--cluster_secret_file",
        "LEVERFLOW_CLUSTER_SECRET",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    // A secret file other users can read is refused.
    let secret = d.join("cluster.secret");
    std::fs::write(&secret, "c2VjcmV0IG9mIHRoaXMgdGVzdCBydW4gb25seSE=\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut with_file = args.clone();
        with_file.extend(["--cluster_secret_file".into(), secret.display().to_string()]);
        let err = run(&with_file, &[]);
        assert!(
            err.contains("can be read or written by other users (mode 644)")
                && err.contains(&format!("chmod 600 {}", secret.display())),
            "{err}"
        );
    }
    // An empty or short secret in the environment is refused.
    for short in ["", "too short"] {
        let err = run(&args, &[("LEVERFLOW_CLUSTER_SECRET", short)]);
        assert!(
            err.contains("LEVERFLOW_CLUSTER_SECRET") && err.contains("at least 16"),
            "{err}"
        );
    }
    assert!(!d.join("out.json").exists());
}
