//! Multi-process runs on 127.0.0.1 (timely's cluster mode): the merged
//! output equals a one-process run; a killed process stops the others
//! quickly and a rerun completes with identical output.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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
    let children: Vec<Child> = (0..processes)
        .map(|i| spawn(&cluster_args(base, &hosts, processes, i, workers)))
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "process {i} failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
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
    let t = Instant::now();
    ok(&leverflow(&tiny_args(&one)));
    // Kill well inside the run: each process does about half the work.
    let kill_after = t.elapsed().mul_f64(0.2);
    let two = d.join("two.json");
    let base = tiny_args(&two);
    let hosts = hostfile(d, 2);
    let mut p0 = spawn(&cluster_args(&base, &hosts, 2, 0, 1));
    let mut p1 = spawn(&cluster_args(&base, &hosts, 2, 1, 1));
    std::thread::sleep(kill_after);
    assert!(
        p0.try_wait().unwrap().is_none() && p1.try_wait().unwrap().is_none(),
        "the run finished before the kill; make it longer"
    );
    p1.kill().unwrap(); // SIGKILL
    p1.wait().unwrap();
    let killed_at = Instant::now();
    let status = loop {
        if let Some(s) = p0.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "process 0 still runs 10 s after its peer died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = p0.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!status.success(), "process 0 must fail when its peer dies");
    assert!(stderr.contains("process 1"), "{stderr}");
    assert!(!two.exists(), "no JSON from an incomplete run");
    // The same command again completes, with the one-process output.
    run_cluster(&base, d, 2, 1);
    assert_eq!(without_meta(&two), without_meta(&one));
}
