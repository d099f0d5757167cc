//! End-to-end tests of `leverflow merge`: a dataset of part files from
//! three processes (one with no rows) → byte-identical JSON; refused inputs
//! leave no output; `--start_idx/--end_idx` shards of a real demo run merge
//! back into the unsharded output.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use leverflow_operators::outputs::{
    write_manifest, JsonOptions, JsonSink, PartOptions, PartWriter, MANIFEST_NAME,
};
use leverflow_schemas::{CandidateRecord, PointerLayout, QueryRecord, RlRecord};
use serde_json::{json, Value};

fn leverflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(args)
        .output()
        .expect("run leverflow")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "leverflow failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn record(q: u64) -> RlRecord {
    let pointer_candidates = (0..1 + q % 3)
        .map(|k| {
            let pos = [(q + k) % 64, (q * 3 + k + 1) % 64];
            let mut c = CandidateRecord::new(
                &pos,
                &pos,
                PointerLayout::SharedPool {
                    positions_are_indices: true,
                },
                "beam",
                -0.25 * k as f64,
            )
            .unwrap();
            c.beam_rank = Some(k as u32);
            c.beam_score = Some(1.0 / (k as f64 + 3.0));
            c
        })
        .collect();
    RlRecord {
        query: QueryRecord {
            query_id: q,
            question_id: Some(q * 10),
            image_id: Some(1000 + q),
            question: Some(format!("what is \"{q}\"?\n")),
            gt_answers_raw: Some(vec!["a".into()]),
            gt_answers_norm: Some(vec!["a".into()]),
        },
        candidate_pool_ids: None,
        pointer_candidates,
    }
}

/// A dataset of 3 processes × 2 workers, query q on process q % 2 (process
/// 2 gets none), small parts; returns its directory.
fn dataset(root: &Path, meta: &Value) -> PathBuf {
    let dir = root.join("rl_parquet");
    let mut parts = Vec::new();
    for p in 0..3usize {
        for w in 0..2usize {
            let mut writer = PartWriter::create(
                &dir,
                p,
                w,
                PartOptions {
                    rows_per_part: 7,
                    ..Default::default()
                },
            )
            .unwrap();
            for q in (0..60u64).filter(|q| q % 2 == p as u64 && (q / 2) % 2 == w as u64) {
                writer.write_record(q, &record(q)).unwrap();
            }
            parts.extend(writer.finish().unwrap());
        }
    }
    write_manifest(&dir, &parts, meta).unwrap();
    dir
}

fn reference(root: &Path, ids: impl Iterator<Item = u64>, meta: &Value) -> Vec<u8> {
    let path = root.join("reference.json");
    let mut sink = JsonSink::create(&path, JsonOptions::default()).unwrap();
    for q in ids {
        sink.write_record(q, &record(q)).unwrap();
    }
    sink.finish(meta).unwrap();
    std::fs::read(path).unwrap()
}

fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn merge_of_a_three_process_dataset_is_the_json_sink_output() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = json!({"tool": "leverflow", "counts": {"queries": 60}});
    let dir = dataset(tmp.path(), &meta);
    let out = tmp.path().join("rl.json");
    let pq = tmp.path().join("merged.parquet");
    let o = leverflow(&[
        "merge",
        s(&dir),
        "--output_path",
        s(&out),
        "--parquet_path",
        s(&pq),
        "--progress",
        "json",
    ]);
    ok(&o);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        reference(tmp.path(), 0..60, &meta)
    );
    assert!(pq.exists());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("\"event\":\"progress\"") && stderr.contains("merged 60 queries"),
        "{stderr}"
    );
    assert!(hidden_files(tmp.path()).is_empty());

    // The merged Parquet merges again into the same JSON.
    let again = tmp.path().join("again.json");
    ok(&leverflow(&[
        "merge",
        s(&pq),
        "--output_path",
        s(&again),
        "--quiet",
    ]));
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());
}

#[test]
fn refused_inputs_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = dataset(tmp.path(), &json!({}));
    let out = tmp.path().join("rl.json");
    let expect_failure = |args: &[&str], needles: &[&str]| {
        let o = leverflow(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&o.stderr);
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: {n:?} not in {stderr}");
        }
        assert!(!out.exists(), "{args:?}: no output on failure");
        assert!(
            hidden_files(tmp.path()).is_empty(),
            "{args:?}: no temp file"
        );
    };
    // No output requested; no input.
    expect_failure(&["merge", s(&dir)], &["--output_path"]);
    // A corrupt part file.
    let part = dir.join("part-00001-00000-000000.parquet");
    let good = std::fs::read(&part).unwrap();
    std::fs::write(&part, b"not parquet").unwrap();
    expect_failure(
        &["merge", s(&dir), "--output_path", s(&out), "--quiet"],
        &["part-00001-00000-000000.parquet"],
    );
    std::fs::write(&part, &good).unwrap();
    // Parts without manifest: the run did not complete.
    let manifest = std::fs::read(dir.join(MANIFEST_NAME)).unwrap();
    std::fs::remove_file(dir.join(MANIFEST_NAME)).unwrap();
    expect_failure(
        &["merge", s(&dir), "--output_path", s(&out), "--quiet"],
        &["no manifest", "did not complete"],
    );
    std::fs::write(dir.join(MANIFEST_NAME), manifest).unwrap();
    // The same dataset twice: every query twice.
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    expect_failure(
        &[
            "merge",
            s(&dir),
            s(&copy),
            "--output_path",
            s(&out),
            "--quiet",
        ],
        &["query index 0 is also in", "rl_parquet", "copy"],
    );
}

fn candidates(out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["candidates".into()];
    args.extend(common::demo_args(out));
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    leverflow(&refs)
}

/// The records of an RL JSON file without `_meta` (the first top-level
/// `"_meta"`: a merged `_meta` holds more), as text.
fn without_meta(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let cut = text.find(",\"_meta\":").expect("_meta is written last");
    text[..cut].to_string()
}

#[test]
fn start_end_shards_of_a_demo_run_merge_into_the_unsharded_output() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.json");
    ok(&candidates(&full, &[]));
    let shards = tmp.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    for (name, start, end) in [("a", "0", "17"), ("b", "17", "30"), ("c", "30", "-1")] {
        let out = shards.join(format!("{name}.json"));
        ok(&candidates(
            &out,
            &[
                "--start_idx",
                start,
                "--end_idx",
                end,
                "--format",
                "parquet",
            ],
        ));
    }
    let merged = tmp.path().join("merged.json");
    ok(&leverflow(&[
        "merge",
        s(&shards),
        "--output_path",
        s(&merged),
        "--quiet",
    ]));
    assert_eq!(without_meta(&merged), without_meta(&full));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    assert_eq!(
        meta["_meta"]["merged_from"].as_array().map(Vec::len),
        Some(3)
    );
}
