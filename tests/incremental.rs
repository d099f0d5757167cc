//! Incremental reruns and crash safety (`--state_dir`): new, removed and
//! changed queries, changed generation settings, `kill -9` at random
//! moments, a damaged state file, and `--output_mode delta`.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use leverflow_operators::outputs::{read_rl_parquet, rows_to_records};
use leverflow_operators::tensor_io::load_matrix;

/// The demo beam data restricted to the queries `keep` accepts.
fn beam_subset(dir: &Path, name: &str, keep: impl Fn(u64) -> bool) -> PathBuf {
    let all = read_json(Path::new(&demo("beam_data.json")));
    let mut out = serde_json::Map::new();
    for (k, v) in all.as_object().unwrap() {
        if keep(k.parse().unwrap()) {
            out.insert(k.clone(), v.clone());
        }
    }
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string(&Value::Object(out)).unwrap()).unwrap();
    p
}

/// `generate` with the replay backend on beam file `beam`, state in `state`.
fn run_replay(r: &Replayed, beam: &Path, out: &Path, state: &Path, extra: &[&str]) -> Value {
    let mut args = with_flag(
        replay_args(&r.replay, out),
        "--beam_data",
        &beam.display().to_string(),
    );
    args = with_flag(args, "--state_dir", &state.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(&leverflow(&args));
    counts(out)
}

fn counts(out: &Path) -> Value {
    read_json(out)["_meta"]["counts"].clone()
}

fn n(c: &Value, key: &str) -> u64 {
    c[key]
        .as_u64()
        .unwrap_or_else(|| panic!("counts has no `{key}`: {c}"))
}

/// The Parquet output's records (its `_meta` left out).
fn parquet_records(p: &Path) -> Vec<(u64, String)> {
    let (_meta, rows) = read_rl_parquet(p).unwrap();
    rows_to_records(rows)
        .into_iter()
        .map(|(q, r)| (q, serde_json::to_string(&r).unwrap()))
        .collect()
}

/// Asserts that two runs' JSON and Parquet outputs hold the same records.
fn same_outputs(a: &Path, b: &Path) {
    assert_eq!(
        without_meta(a),
        without_meta(b),
        "{} vs {}",
        a.display(),
        b.display()
    );
    assert_eq!(
        parquet_records(&a.with_extension("parquet")),
        parquet_records(&b.with_extension("parquet"))
    );
}

/// Candidates per query in an output.
fn cands_of(out: &Path) -> std::collections::BTreeMap<u64, usize> {
    let v = read_json(out);
    v.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "_meta")
        .map(|(k, r)| {
            (
                k.parse().unwrap(),
                r["pointer_candidates"].as_array().unwrap().len(),
            )
        })
        .collect()
}

#[test]
fn new_queries_cost_only_their_own_vqa_calls() {
    // (a) 45 queries, then all 48: only the 3 new queries reach the model.
    let r = replay_fixture();
    let d = &r.dir;
    let first = beam_subset(d, "first.json", |q| q < 45);
    let all = PathBuf::from(demo("beam_data.json"));
    let state = d.join("state");
    let out = d.join("rl.json");
    let c1 = run_replay(&r, &first, &out, &state, &[]);
    assert_eq!(n(&c1, "queries_added"), 45);
    assert_eq!(n(&c1, "vqa_cached"), 0);
    let c2 = run_replay(&r, &all, &out, &state, &["--workers", "2"]);
    let per_query = cands_of(&out);
    let new_cands: usize = (45..48).map(|q| per_query[&q]).sum();
    assert_eq!(n(&c2, "queries_added"), 3, "{c2}");
    assert_eq!(n(&c2, "queries_reused"), 45, "{c2}");
    assert_eq!(n(&c2, "queries_removed"), 0);
    assert_eq!(n(&c2, "queries_changed"), 0);
    assert_eq!(n(&c2, "vqa_calls"), new_cands as u64, "{c2}");
    // The same outputs as one run from scratch on the union.
    let fresh = d.join("fresh.json");
    let c3 = run_replay(&r, &all, &fresh, &d.join("fresh-state"), &[]);
    assert_eq!(
        n(&c3, "vqa_calls"),
        per_query.values().sum::<usize>() as u64
    );
    same_outputs(&out, &fresh);
    // Nothing changed: nothing is computed.
    let c4 = run_replay(&r, &all, &out, &state, &[]);
    assert_eq!(n(&c4, "vqa_calls"), 0);
    assert_eq!(n(&c4, "queries_reused"), 48);
    assert_eq!(n(&c4, "queries_added") + n(&c4, "queries_changed"), 0);
    same_outputs(&out, &fresh);
}

/// The Parquet file's bytes up to its `_meta` (the data pages, page
/// indexes and the footer before the key-value metadata holding `_meta`).
fn parquet_without_meta(p: &Path) -> Vec<u8> {
    let bytes = std::fs::read(p).unwrap();
    let cut = bytes
        .windows(b"leverflow_meta".len())
        .rposition(|w| w == b"leverflow_meta")
        .expect("_meta is in the footer");
    bytes[..cut].to_vec()
}

#[test]
fn unchanged_output_segments_are_copied_and_match_a_run_from_scratch() {
    // Segments of 8 queries: 0-7, 8-15, ..., 40-47.
    let r = replay_fixture();
    let d = &r.dir;
    let seg = ["--segment_queries", "8"];
    let first = beam_subset(d, "first.json", |q| q < 45 && q != 9);
    let all = PathBuf::from(demo("beam_data.json"));
    let state = d.join("state");
    let out = d.join("rl.json");
    let c1 = run_replay(&r, &first, &out, &state, &seg);
    assert_eq!(n(&c1, "output_segments"), 6);
    assert_eq!(n(&c1, "output_segments_copied"), 0);
    // Queries 9 and 45..47 are new: segments 1 and 5 are written, the
    // other four are copied from the outputs of the first run.
    let c2 = run_replay(&r, &all, &out, &state, &seg);
    assert_eq!(n(&c2, "queries_added"), 4, "{c2}");
    assert_eq!(n(&c2, "output_segments_copied"), 4, "{c2}");
    let fresh = d.join("fresh.json");
    run_replay(&r, &all, &fresh, &d.join("fresh-state"), &seg);
    assert_eq!(without_meta(&out), without_meta(&fresh));
    let (pq, fresh_pq) = (
        out.with_extension("parquet"),
        fresh.with_extension("parquet"),
    );
    assert_eq!(parquet_without_meta(&pq), parquet_without_meta(&fresh_pq));
    assert_eq!(
        read_json(&out)["_meta"]["counts"]["by_gen_method"],
        read_json(&fresh)["_meta"]["counts"]["by_gen_method"]
    );
    assert_eq!(
        read_json(&out)["_meta"]["counts"]["reward_p50"],
        read_json(&fresh)["_meta"]["counts"]["reward_p50"]
    );
    // Nothing changed: every segment is copied.
    let c3 = run_replay(&r, &all, &out, &state, &seg);
    assert_eq!(n(&c3, "output_segments_copied"), 6, "{c3}");
    assert_eq!(without_meta(&out), without_meta(&fresh));
    // An output edited since (here: in place, same length) is never copied
    // from: everything is written from the store again.
    let text = std::fs::read_to_string(&out).unwrap();
    let edited = text.replacen("\"question\":\"", "\"question\":\"X", 1);
    std::fs::write(&out, &edited[..text.len()]).unwrap();
    let c4 = run_replay(&r, &all, &out, &state, &seg);
    assert_eq!(n(&c4, "output_segments_copied"), 0, "{c4}");
    assert_eq!(without_meta(&out), without_meta(&fresh));
    assert_eq!(parquet_without_meta(&pq), parquet_without_meta(&fresh_pq));
    // A missing Parquet output: written again, not copied.
    std::fs::remove_file(&pq).unwrap();
    let c5 = run_replay(&r, &all, &out, &state, &seg);
    assert_eq!(n(&c5, "output_segments_copied"), 0, "{c5}");
    assert_eq!(parquet_without_meta(&pq), parquet_without_meta(&fresh_pq));
}

#[test]
fn removed_queries_vanish_and_nothing_is_recomputed_with_a_delta() {
    // (b) remove 10 queries, with --output_mode delta.
    let r = replay_fixture();
    let d = &r.dir;
    let all = PathBuf::from(demo("beam_data.json"));
    let gone = |q: u64| (5..15).contains(&q);
    let fewer = beam_subset(d, "fewer.json", |q| !gone(q));
    let state = d.join("state");
    let out = d.join("rl.json");
    run_replay(&r, &all, &out, &state, &[]);
    let c = run_replay(&r, &fewer, &out, &state, &["--output_mode", "delta"]);
    assert_eq!(n(&c, "queries_removed"), 10, "{c}");
    assert_eq!(n(&c, "queries_reused"), 38);
    assert_eq!(n(&c, "vqa_calls"), 0);
    assert_eq!(n(&c, "vqa_cached"), 0, "reused records need no answers");
    assert_eq!(n(&c, "candidate_sets_cached"), 0);
    let keys: Vec<u64> = cands_of(&out).keys().copied().collect();
    assert_eq!(keys.len(), 38);
    assert!(keys.iter().all(|&q| !gone(q)));
    let pq: Vec<u64> = parquet_records(&d.join("rl.parquet"))
        .iter()
        .map(|(q, _)| *q)
        .collect();
    assert_eq!(pq, keys);
    let fresh = d.join("fresh.json");
    run_replay(&r, &fewer, &fresh, &d.join("fresh-state"), &[]);
    same_outputs(&out, &fresh);
    // The delta: the retracted ids, and no changed rows.
    let retracted = read_json(&d.join("rl.retracted.json"));
    let ids: Vec<u64> = retracted["retracted_query_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids, (5..15).collect::<Vec<u64>>());
    assert!(parquet_records(&d.join("rl.delta.parquet")).is_empty());
    // Adding them back: the delta holds exactly their rows.
    let c = run_replay(&r, &all, &out, &state, &["--output_mode", "delta"]);
    assert_eq!(n(&c, "queries_added"), 10);
    let delta: Vec<u64> = parquet_records(&d.join("rl.delta.parquet"))
        .iter()
        .map(|(q, _)| *q)
        .collect();
    assert_eq!(delta, (5..15).collect::<Vec<u64>>());
}

/// Writes the demo query embeddings as `.npy`, with row `changed` replaced
/// by row `from` when given.
fn query_npy(path: &Path, change: Option<(usize, usize)>) {
    let m = load_matrix(Path::new(&demo("query_embeddings.pt"))).unwrap();
    write_npy(path, m.rows, m.cols, |r, c| {
        let r = match change {
            Some((changed, from)) if r == changed => from,
            _ => r,
        };
        m.data[r * m.cols + c]
    });
}

#[test]
fn a_changed_query_alone_is_recomputed() {
    // (c) one query's embedding row changes: only it gets new candidates
    // and only its new prompts reach the model.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x = 7usize;
    let before = d.join("q.npy");
    let after = d.join("q2.npy");
    query_npy(&before, None);
    query_npy(&after, Some((x, 30)));
    // A replay file answering both variants of query x.
    let mut cand_runs = Vec::new();
    for (name, emb) in [("c1.json", &before), ("c2.json", &after)] {
        let out = d.join(name);
        let mut args = vec!["candidates".to_string()];
        args.extend(with_flag(
            demo_args(&out),
            "--query_emb",
            &emb.display().to_string(),
        ));
        ok(&leverflow(&args));
        cand_runs.push(read_json(&out));
    }
    let mut merged = cand_runs[0].clone();
    let extra = cand_runs[1][x.to_string()]["pointer_candidates"]
        .as_array()
        .unwrap()
        .clone();
    merged[x.to_string()]["pointer_candidates"]
        .as_array_mut()
        .unwrap()
        .extend(extra);
    let merged_path = d.join("merged.json");
    std::fs::write(&merged_path, serde_json::to_string(&merged).unwrap()).unwrap();
    let replay = d.join("replay.json");
    make_replay(
        &merged_path,
        &read_json(Path::new(&demo("data/annotations.json"))),
        &replay,
    );
    let r = Replayed {
        _dir: tempfile::tempdir().unwrap(),
        replay,
        dir: d.to_path_buf(),
    };
    let run = |out: &Path, state: &Path, emb: &Path| {
        let args = with_flag(
            replay_args(&r.replay, out),
            "--query_emb",
            &emb.display().to_string(),
        );
        ok(&leverflow(&with_flag(
            args,
            "--state_dir",
            &state.display().to_string(),
        )));
        counts(out)
    };
    let state = d.join("state");
    let out = d.join("rl.json");
    run(&out, &state, &before);
    let old_x: Vec<Value> = read_json(&out)[x.to_string()]["pointer_candidates"]
        .as_array()
        .unwrap()
        .clone();
    let c = run(&out, &state, &after);
    assert_eq!(n(&c, "queries_changed"), 1, "{c}");
    assert_eq!(n(&c, "queries_reused"), 47);
    assert_eq!(
        n(&c, "candidate_sets_cached"),
        0,
        "query {x} gets new candidates"
    );
    let new_x: Vec<Value> = read_json(&out)[x.to_string()]["pointer_candidates"]
        .as_array()
        .unwrap()
        .clone();
    let key = |c: &Value| c["pointer"].to_string();
    let old_keys: std::collections::HashSet<String> = old_x.iter().map(key).collect();
    let unseen = new_x.iter().filter(|c| !old_keys.contains(&key(c))).count();
    assert!(unseen > 0, "the changed row must change the candidates");
    assert_eq!(n(&c, "vqa_calls"), unseen as u64, "{c}");
    assert_eq!(n(&c, "vqa_cached"), (new_x.len() - unseen) as u64);
    let fresh = d.join("fresh.json");
    run(&fresh, &d.join("fresh-state"), &after);
    same_outputs(&out, &fresh);
}

/// `generate` with the tiny Qwen2.5-VL fixture on the first `queries`
/// queries of the demo.
fn tiny_args(out: &Path, state: &Path, queries: usize, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["generate".to_string()];
    args.extend(demo_args(out));
    args.extend(
        [
            "--vqa_model",
            &tiny_model(),
            "--end_idx",
            &queries.to_string(),
            "--batch_size",
            "8",
            "--state_dir",
            &state.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn a_changed_generation_setting_recomputes_answers_but_not_candidates() {
    // (d) with the real model code: --max_new_tokens changes every answer's
    // key; the candidate sets come from the store.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let out = d.join("rl.json");
    ok(&leverflow(&tiny_args(&out, &state, 3, &[])));
    let total: usize = cands_of(&out).values().sum();
    let c = counts(&out);
    assert_eq!(n(&c, "vqa_calls"), total as u64);
    ok(&leverflow(&tiny_args(
        &out,
        &state,
        3,
        &["--max_new_tokens", "3"],
    )));
    let c = counts(&out);
    assert_eq!(n(&c, "queries_changed"), 3, "{c}");
    assert_eq!(
        n(&c, "vqa_calls"),
        total as u64,
        "every answer is recomputed"
    );
    assert_eq!(n(&c, "vqa_cached"), 0);
    assert_eq!(n(&c, "candidate_sets_cached"), 3, "candidates are reused");
    // Back to the first setting: everything comes from the store.
    ok(&leverflow(&tiny_args(&out, &state, 3, &[])));
    let c = counts(&out);
    assert_eq!(n(&c, "vqa_calls"), 0, "{c}");
    assert_eq!(n(&c, "vqa_cached"), total as u64);
    let fresh = d.join("fresh.json");
    ok(&leverflow(&tiny_args(
        &fresh,
        &d.join("fresh-state"),
        3,
        &[],
    )));
    same_outputs(&out, &fresh);
}

/// A small deterministic generator for the kill times.
struct XorShift(u64);

impl XorShift {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn killed_runs_resume_to_identical_outputs() {
    // (e) kill -9 at random moments (at least 10 times), then let the same
    // command finish; compare with a clean run.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let queries = 6;
    let clean = d.join("clean.json");
    let t0 = Instant::now();
    ok(&leverflow(&tiny_args(
        &clean,
        &d.join("clean-state"),
        queries,
        &[],
    )));
    let clean_s = t0.elapsed().as_secs_f64();
    let out = d.join("rl.json");
    let state = d.join("state");
    let args = tiny_args(&out, &state, queries, &[]);
    let mut rng = XorShift(0x5eed_1e7e_4f10);
    let mut kills = 0;
    let mut finished_early = 0;
    // Bounded by attempts, not by wall time: on a busy machine every run
    // is slower, and the kills still land inside them.
    let mut attempts = 0;
    while kills < 10 && attempts < 200 {
        attempts += 1;
        let mut child = Command::new(env!("CARGO_BIN_EXE_leverflow"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_secs_f64(rng.next_f64() * clean_s * 1.1);
        std::thread::sleep(at);
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "a run failed on its own");
                finished_early += 1;
                // Finished: start over from an empty store now and then, so
                // that later kills land in real work again.
                if finished_early % 2 == 0 {
                    std::fs::remove_dir_all(&state).unwrap();
                }
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                // Whatever the moment, the output path holds either nothing
                // or a complete file.
                if out.exists() {
                    read_json(&out);
                }
            }
        }
    }
    assert!(
        kills >= 10,
        "only {kills} kills in {attempts} runs: the others finished before their kill"
    );
    ok(&leverflow(&args));
    same_outputs(&out, &clean);
    let stale: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".tmp") || name.ends_with(".lock")
        })
        .collect();
    assert!(stale.is_empty(), "temporary files left: {stale:?}");
}

#[test]
fn a_damaged_state_file_is_reported_with_the_way_out() {
    // (f) a truncated state file: a clear error naming it, nothing written.
    let r = replay_fixture();
    let d = &r.dir;
    let all = PathBuf::from(demo("beam_data.json"));
    let state = d.join("state");
    let out = d.join("rl.json");
    run_replay(&r, &all, &out, &state, &[]);
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_file(out.with_extension("parquet")).unwrap();
    let file = state.join("state.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let args = with_flag(
        replay_args(&r.replay, &out),
        "--state_dir",
        &state.display().to_string(),
    );
    let o = leverflow(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a damaged store must fail the run");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("delete the state directory"), "{stderr}");
    assert!(!out.exists() && !out.with_extension("parquet").exists());
    // Following the advice works.
    std::fs::remove_dir_all(&state).unwrap();
    run_replay(&r, &all, &out, &state, &[]);
}

#[test]
fn two_runs_cannot_share_a_state_dir_and_bad_modes_are_refused() {
    let r = replay_fixture();
    let d = &r.dir;
    let out = d.join("rl.json");
    let mut args = vec!["generate".to_string()];
    args.extend(demo_args(&out));
    args.extend(["--output_mode".to_string(), "partial".to_string()]);
    let o = leverflow(&args);
    assert!(!o.status.success());
    // The flag's valid values are listed.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("'partial'") && err.contains("--output_mode") && err.contains("full, delta"),
        "{err}"
    );
    // A held store is refused with a clear message.
    let state = d.join("state");
    let _held = leverflow_operators::state::StateStore::open(&state).unwrap();
    let args = with_flag(
        replay_args(&r.replay, &out),
        "--state_dir",
        &state.display().to_string(),
    );
    let o = leverflow(&args);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by another leverflow run"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `run_replay` with `LEVERFLOW_LOG=leverflow=debug`: the counts and the
/// `served=` / `remembered=` numbers of the input-digest diagnostic.
fn run_replay_digests(r: &Replayed, beam: &Path, out: &Path, state: &Path) -> (Value, u64, u64) {
    let mut args = with_flag(
        replay_args(&r.replay, out),
        "--beam_data",
        &beam.display().to_string(),
    );
    args = with_flag(args, "--state_dir", &state.display().to_string());
    let output = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(&args)
        .env("LEVERFLOW_LOG", "leverflow=debug")
        .output()
        .unwrap();
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("input file digests"))
        .unwrap_or_else(|| panic!("no digest diagnostic in:\n{stderr}"));
    let field = |name: &str| -> u64 {
        let rest = &line[line.find(name).unwrap_or_else(|| panic!("{line}")) + name.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap()
    };
    (counts(out), field("served="), field("remembered="))
}

#[test]
fn unchanged_inputs_are_not_hashed_again_and_edited_ones_are() {
    let r = replay_fixture();
    let d = &r.dir;
    // Digests are remembered only for files that have settled (see
    // `state::digests`): let the freshly written replay file settle.
    std::thread::sleep(Duration::from_millis(2100));
    let all = PathBuf::from(demo("beam_data.json"));
    let state = d.join("state");
    let out = d.join("rl.json");
    let (c1, served, remembered) = run_replay_digests(&r, &all, &out, &state);
    assert_eq!(served, 0, "a first run has nothing to serve");
    // checkpoint, beam data, two embeddings, two annotation files, replay
    assert!(remembered >= 5, "{remembered}");
    let total = n(&c1, "vqa_calls");
    assert!(total > 0);
    let (c2, served, remembered) = run_replay_digests(&r, &all, &out, &state);
    assert!(served >= 5, "unchanged inputs are served: {served}");
    assert_eq!(remembered, 0);
    assert_eq!(n(&c2, "vqa_calls"), 0);
    // The replay file (the model's identity) edited in place: same path,
    // same inode, new content. Its digest must be computed again, so every
    // answer is asked of the model again.
    let mut text = std::fs::read(&r.replay).unwrap();
    text.push(b'\n');
    std::fs::write(&r.replay, text).unwrap();
    let (c3, served, _) = run_replay_digests(&r, &all, &out, &state);
    assert_eq!(n(&c3, "vqa_calls"), total, "{c3}");
    assert!(served >= 4, "the other inputs are still served: {served}");
}

/// `generate` with the replay backend and `LEVERFLOW_LOG=leverflow=debug`:
/// the debug log.
fn run_replay_logged(args: &[String]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(args)
        .env("LEVERFLOW_LOG", "leverflow=debug")
        .output()
        .unwrap();
    ok(&output);
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_rerun_restores_the_parsed_split_and_an_edited_file_is_parsed_again() {
    let r = replay_fixture();
    let d = &r.dir;
    let ann = d.join("annotations.json");
    std::fs::copy(demo("data/annotations.json"), &ann).unwrap();
    // Snapshots are keyed by remembered digests, which need settled files.
    std::thread::sleep(Duration::from_millis(2100));
    let state = d.join("state");
    let out = d.join("rl.json");
    let args = with_flag(
        with_flag(
            replay_args(&r.replay, &out),
            "--train_ann_path",
            &ann.display().to_string(),
        ),
        "--state_dir",
        &state.display().to_string(),
    );
    let first_log = run_replay_logged(&args);
    assert!(!first_log.contains("restored from the dataset snapshot"));
    assert!(state.join("dataset.snapshot").is_file(), "{first_log}");
    let first = d.join("first.json");
    std::fs::copy(&out, &first).unwrap();
    std::fs::copy(
        out.with_extension("parquet"),
        first.with_extension("parquet"),
    )
    .unwrap();

    let log = run_replay_logged(&args);
    assert!(
        log.contains("training split restored from the dataset snapshot"),
        "{log}"
    );
    same_outputs(&first, &out);

    // Every answer edited: the snapshot must not be used, and the result is
    // the one a run from scratch on the edited file gives.
    let mut v = read_json(&ann);
    for a in v["annotations"].as_array_mut().unwrap() {
        a["multiple_choice_answer"] = "zzz".into();
        for x in a["answers"].as_array_mut().unwrap() {
            x["answer"] = "zzz".into();
        }
    }
    std::fs::write(&ann, serde_json::to_string(&v).unwrap()).unwrap();
    let log = run_replay_logged(&args);
    assert!(!log.contains("restored from the dataset snapshot"), "{log}");
    let fresh = d.join("fresh.json");
    let scratch = with_flag(
        with_flag(args.clone(), "--output_path", &fresh.display().to_string()),
        "--state_dir",
        &d.join("fresh.state").display().to_string(),
    );
    ok(&leverflow(&scratch));
    same_outputs(&fresh, &out);
    assert_ne!(without_meta(&first), without_meta(&out), "the edit matters");
}
