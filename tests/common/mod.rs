//! Helpers shared by the end-to-end tests: the demo inputs, running the
//! binary, replay fixtures.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn demo(rel: &str) -> String {
    root().join("demo").join(rel).display().to_string()
}

/// The demo's policy inputs: checkpoint, beam data and embeddings.
pub fn demo_policy_args() -> Vec<String> {
    leverflow_operators::bench::demo_policy_flags(&root())
}

/// The flags every demo run needs, with `out` as output path.
pub fn demo_args(out: &Path) -> Vec<String> {
    let mut args = demo_policy_args();
    args.extend(leverflow_operators::bench::demo_data_flags(&root()));
    args.extend([
        "--output_path".to_string(),
        out.display().to_string(),
        "--quiet".to_string(),
    ]);
    args
}

pub fn leverflow(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(args)
        .output()
        .expect("run leverflow")
}

pub fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "leverflow failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The record without `_meta`, as canonical text.
pub fn without_meta(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap();
    let cut = text.rfind(",\"_meta\"").expect("_meta is written last");
    text[..cut].to_string()
}

/// Writes a replay file from a `candidates` output: every candidate gets a
/// raw generation (the query's answer for some, a wrong one for others).
pub fn make_replay(cands: &Path, answers: &Value, replay: &Path) {
    let mut v = read_json(cands);
    let obj = v.as_object_mut().unwrap();
    let by_qid: std::collections::HashMap<u64, String> = answers["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["question_id"].as_u64().unwrap(),
                a["multiple_choice_answer"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (k, rec) in obj.iter_mut() {
        if k == "_meta" {
            continue;
        }
        let qid = rec["query"]["question_id"].as_u64().unwrap();
        for (i, c) in rec["pointer_candidates"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            let raw = if i % 3 == 0 {
                format!("{} Question: more", by_qid[&qid])
            } else {
                "purple".to_string()
            };
            c["vqa_raw_generation"] = Value::String(raw);
        }
    }
    std::fs::write(replay, serde_json::to_string(&v).unwrap()).unwrap();
}

pub struct Replayed {
    pub _dir: tempfile::TempDir,
    pub replay: PathBuf,
    pub dir: PathBuf,
}

pub fn replay_fixture() -> Replayed {
    let dir = tempfile::tempdir().unwrap();
    let cands = dir.path().join("cands.json");
    let mut args = vec!["candidates".to_string()];
    args.extend(demo_args(&cands));
    ok(&leverflow(&args));
    let answers = read_json(Path::new(&demo("data/annotations.json")));
    let replay = dir.path().join("replay.json");
    make_replay(&cands, &answers, &replay);
    Replayed {
        replay,
        dir: dir.path().to_path_buf(),
        _dir: dir,
    }
}

/// `generate` on the demo answered by the replay file `replay`.
pub fn replay_args(replay: &Path, out: &Path) -> Vec<String> {
    let mut args = vec!["generate".to_string()];
    args.extend(demo_args(out));
    args.extend([
        "--vqa_backend".to_string(),
        "replay".into(),
        "--replay_from".into(),
        replay.display().to_string(),
    ]);
    args
}

pub fn generate_replay(r: &Replayed, out: &Path, extra: &[&str]) -> Output {
    let mut args = replay_args(&r.replay, out);
    args.extend(extra.iter().map(|s| s.to_string()));
    leverflow(&args)
}

/// Sets `flag` to `value` (replacing its value, or appending both).
pub fn with_flag(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    if let Some(i) = args.iter().position(|a| a == flag) {
        args[i + 1] = value.to_string();
    } else {
        args.push(flag.to_string());
        args.push(value.to_string());
    }
    args
}

/// The tiny Qwen2.5-VL test fixture (random weights, real architecture).
pub fn tiny_model() -> String {
    root()
        .join("tests/fixtures/qwen2_5_vl_tiny")
        .display()
        .to_string()
}

pub fn write_npy(path: &Path, rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for r in 0..rows {
        for c in 0..cols {
            bytes.extend_from_slice(&f(r, c).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}
