//! The workloads of `leverflow bench score|candidates|pipeline|rerun|cluster`.

use std::path::{Path, PathBuf};

use super::{median, report, time_runs, BenchError, BenchSettings};
use crate::accuracy::{load_questions_annotations, Normalizer};
use crate::candidates::{bench_candidates, CandidateArgs};

type Result<T> = std::result::Result<T, BenchError>;

fn fixture(s: &BenchSettings, rel: &str) -> PathBuf {
    s.repo.join("tests/fixtures").join(rel)
}

/// Official accuracy: answer evaluations per second on the vqa_eval fixture
/// (normalisation of the prediction + leave-one-out accuracy).
pub(super) fn bench_score(args: &BenchSettings) -> Result<()> {
    let q = fixture(args, "vqa_eval/questions.json");
    let a = fixture(args, "vqa_eval/annotations.json");
    let p = fixture(args, "vqa_eval/predictions.json");
    let index = load_questions_annotations(&q, &a).map_err(BenchError::workload)?;
    let preds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p)?).map_err(BenchError::workload)?;
    let cases: Vec<(u64, String)> = preds["cases"]
        .as_array()
        .ok_or_else(|| BenchError::Run("predictions.json: `cases` must be a list".into()))?
        .iter()
        .filter_map(|c| Some((c["question_id"].as_u64()?, c["pred"].as_str()?.to_string())))
        .collect();
    let rounds = 400;
    let mut norm = Normalizer::new();
    let mut checksum = 0.0;
    let secs = time_runs(args.reps, || {
        for _ in 0..rounds {
            for (qid, pred) in &cases {
                checksum += index.evaluate(*qid, pred, &mut norm).unwrap_or(0.0);
            }
        }
        Ok(())
    })?;
    report(
        "score",
        "evaluations",
        (rounds * cases.len()) as f64,
        &secs,
        serde_json::json!({"cases": cases.len(), "checksum": checksum}),
    );
    Ok(())
}

/// Candidate generation: queries per second for d_model 512, hidden 256,
/// 3 layers, 5 beams + 2x2 samples + 1 random, shot 2, pool `--pool`.
pub(super) fn bench_cands(args: &BenchSettings) -> Result<()> {
    let cargs = CandidateArgs {
        num_beams: 5,
        temps: vec![1.0, 1.3],
        num_samples_per_temp: 2,
        num_random: 1,
        num_retrieval: 0,
        shot_num: 2,
        seed: 0,
    };
    let mut rates = Vec::new();
    let mut prepare = Vec::new();
    for _ in 0..args.reps.max(1) {
        let r = bench_candidates(512, 256, 3, args.pool, args.queries, 256, &cargs)
            .map_err(BenchError::workload)?;
        rates.push(r.queries_per_s);
        prepare.push(r.prepare_s);
    }
    let med = median(&rates);
    println!(
        "{}",
        serde_json::json!({
            "bench": "candidates", "pool": args.pool, "queries": args.queries,
            "reps": rates.len(), "median_queries_per_s": med,
            "min_queries_per_s": rates.iter().copied().fold(f64::INFINITY, f64::min),
            "max_queries_per_s": rates.iter().copied().fold(0.0, f64::max),
            "median_pool_prepare_s": median(&prepare),
        })
    );
    Ok(())
}

/// Writes a little-endian float32 C-order `.npy` file.
fn write_npy(path: &Path, rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Result<()> {
    use std::io::Write;
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let file = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(b"\x93NUMPY\x01\x00")?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for r in 0..rows {
        for c in 0..cols {
            w.write_all(&f(r, c).to_le_bytes())?;
        }
    }
    w.flush()?;
    Ok(())
}

/// A deterministic pseudo-random value in [-0.5, 0.5).
fn noise(a: usize, b: usize) -> f32 {
    let x = crate::candidates::splitmix64(((a as u64) << 20) ^ b as u64);
    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// Synthetic inputs of the pipeline benchmarks, prepared once (not timed):
/// `n` questions with 10 answers each, 64-d embeddings, a shared pool of 64
/// candidates, the demo's selector, beam data for every query, and a replay
/// file with an answer for every candidate.
struct PipelineInputs {
    dir: tempfile::TempDir,
    n: usize,
    replay: PathBuf,
    /// The `leverflow` binary.
    exe: PathBuf,
    /// The embedded demo (its selector checkpoint).
    demo: PathBuf,
}

impl PipelineInputs {
    fn prepare(s: &BenchSettings, n: usize, keep: Option<&Path>) -> Result<Self> {
        use std::io::Write;
        let dir = match keep {
            Some(k) => {
                std::fs::create_dir_all(k)?;
                tempfile::Builder::new()
                    .prefix("bench-")
                    .disable_cleanup(true)
                    .tempdir_in(k)?
            }
            None => tempfile::tempdir()?,
        };
        let d = dir.path();
        let demo = s.repo.join("demo");
        // Dataset: n questions, 10 answers each, one shared image.
        {
            let mut q = std::io::BufWriter::new(std::fs::File::create(d.join("q.json"))?);
            let mut a = std::io::BufWriter::new(std::fs::File::create(d.join("a.json"))?);
            write!(q, "{{\"questions\": [")?;
            write!(a, "{{\"annotations\": [")?;
            let colors = [
                "red", "blue", "green", "teal", "brown", "gray", "black", "yellow",
            ];
            for i in 0..n {
                let sep = if i == 0 { "" } else { "," };
                let ans = colors[i % colors.len()];
                write!(q, "{sep}{{\"image_id\": {}, \"question\": \"what color is shape {i}?\", \"question_id\": {i}}}", i % 97)?;
                let answers: Vec<String> = (1..=10)
                    .map(|k| format!("{{\"answer\": \"{}\", \"answer_confidence\": \"yes\", \"answer_id\": {k}}}", if k <= 7 { ans } else { "white" }))
                    .collect();
                write!(a, "{sep}{{\"question_id\": {i}, \"image_id\": {}, \"answer_type\": \"other\", \"question_type\": \"what color\", \"multiple_choice_answer\": \"{ans}\", \"answers\": [{}]}}", i % 97, answers.join(","))?;
            }
            write!(q, "]}}")?;
            write!(a, "]}}")?;
            q.flush()?;
            a.flush()?;
        }
        std::fs::copy(
            demo.join("data/images/COCO_train2014_000000000000.png"),
            d.join("img.png"),
        )?;
        write_npy(&d.join("query.npy"), n, 64, noise)?;
        let pool: Vec<usize> = (0..64).map(|p| (p * 7919) % n).collect();
        write_npy(&d.join("cand.npy"), 64, 64, |r, c| noise(pool[r], c))?;
        std::fs::write(d.join("pool.json"), serde_json::to_string(&pool)?)?;
        let inputs = Self {
            replay: d.join("replay.json"),
            dir,
            n,
            exe: s.exe.clone(),
            demo: s.repo.join("demo"),
        };
        inputs.write_beams("beam.json", n)?;
        // Candidates, then a replay file with an answer for every candidate.
        let cands = inputs.dir.path().join("cands.json");
        inputs.run(
            "candidates",
            &["--format".into(), "json".into()],
            &cands,
            "beam.json",
        )?;
        {
            use crate::outputs::{visit_rl_json, JsonOptions, JsonSink};
            let mut sink = JsonSink::create(&inputs.replay, JsonOptions::default())
                .map_err(BenchError::workload)?;
            let mut i = 0usize;
            visit_rl_json(&cands, |q, mut rec| {
                for c in &mut rec.pointer_candidates {
                    i += 1;
                    c.vqa_raw_generation = Some(if i.is_multiple_of(3) {
                        "red".into()
                    } else {
                        "blue Question:".into()
                    });
                }
                sink.write_record(q, &rec)
            })
            .map_err(BenchError::workload)?;
            sink.finish(&serde_json::json!({"bench": "replay source"}))
                .map_err(BenchError::workload)?;
        }
        Ok(inputs)
    }

    /// Beam data for the first `queries` queries.
    fn write_beams(&self, name: &str, queries: usize) -> Result<()> {
        use std::io::Write;
        let pool: Vec<usize> = (0..64).map(|p| (p * 7919) % self.n).collect();
        let mut b = std::io::BufWriter::new(std::fs::File::create(self.dir.path().join(name))?);
        write!(b, "{{")?;
        for i in 0..queries {
            let sep = if i == 0 { "" } else { "," };
            let (x, y) = (pool[(i + 1) % 64], pool[(i + 2) % 64]);
            let (x, y) = if x == i || y == i {
                (pool[(i + 3) % 64], pool[(i + 4) % 64])
            } else {
                (x, y)
            };
            write!(
                b,
                "{sep}\"{i}\": {{\"id_list\": [[{x}, {y}, {i}]], \"score_list\": [0.5]}}"
            )?;
        }
        write!(b, "}}")?;
        b.flush()?;
        Ok(())
    }

    /// Runs `leverflow <sub>` as a child process on these inputs.
    fn run(&self, sub: &str, extra: &[String], out: &Path, beams: &str) -> Result<()> {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg(sub);
        self.command(extra, out, beams, &mut cmd);
        let o = cmd.output()?;
        if !o.status.success() {
            return Err(BenchError::Run(format!(
                "{sub} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            )));
        }
        Ok(())
    }

    /// Adds the input flags (and `extra`) to a `leverflow` command.
    fn command(&self, extra: &[String], out: &Path, beams: &str, cmd: &mut std::process::Command) {
        let d = self.dir.path();
        let demo = &self.demo;
        let p = |s: &str| d.join(s).display().to_string();
        let args: Vec<String> = vec![
            "--sft_ckpt".into(),
            demo.join("sft.ckpt").display().to_string(),
            "--beam_data".into(),
            p(beams),
            "--query_emb".into(),
            p("query.npy"),
            "--cand_emb".into(),
            p("cand.npy"),
            "--candidate_indices".into(),
            p("pool.json"),
            "--train_ques_path".into(),
            p("q.json"),
            "--train_ann_path".into(),
            p("a.json"),
            "--train_coco_root".into(),
            d.display().to_string(),
            "--image_pattern".into(),
            "img.png".into(),
            "--output_path".into(),
            out.display().to_string(),
            "--quiet".into(),
        ];
        cmd.args(args)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    }

    /// The replay-backend flags of `generate` with `workers` workers and the
    /// state in `state`.
    fn replay_flags(&self, workers: usize, state: &Path) -> Vec<String> {
        vec![
            "--vqa_backend".to_string(),
            "replay".into(),
            "--replay_from".into(),
            self.replay.display().to_string(),
            "--workers".into(),
            workers.to_string(),
            "--state_dir".into(),
            state.display().to_string(),
        ]
    }
}

/// `_meta` of a JSON output.
fn output_meta(out: &Path) -> Result<serde_json::Value> {
    Ok(crate::outputs::visit_rl_json(out, |_, _| Ok(()))
        .map_err(BenchError::workload)?
        .unwrap_or_default())
}

/// The whole dataflow with the replay backend on synthetic data
/// ([`PipelineInputs`]): `--queries` queries, 5 beams + 2x2 samples + 1
/// random, both sinks, `--workers` workers. Each repetition runs
/// `leverflow generate` as a child process from an empty state store. Peak
/// memory: run this under `/usr/bin/time -v` or see BENCHMARKS.md.
pub(super) fn bench_pipeline(args: &BenchSettings) -> Result<()> {
    let inputs = PipelineInputs::prepare(args, args.queries.max(64), args.keep_dir.as_deref())?;
    let d = inputs.dir.path().to_path_buf();
    let out = d.join("rl.json");
    let mut rep = 0;
    let secs = time_runs(args.reps, || {
        rep += 1;
        let state = d.join(format!("state-{rep}"));
        inputs.run(
            "generate",
            &inputs.replay_flags(args.workers, &state),
            &out,
            "beam.json",
        )
    })?;
    let written = output_meta(&out)?;
    let candidates = written["counts"]["candidates"].as_f64().unwrap_or(0.0);
    report(
        "pipeline",
        "candidates",
        candidates,
        &secs,
        serde_json::json!({"queries": inputs.n, "workers": args.workers, "candidates": candidates,
            "last_run_timings": written["timings"],
            "note": "wall time of `leverflow generate --vqa_backend replay` from an empty state store (process start, loading, dataflow, store commits, JSON + Parquet)"}),
    );
    Ok(())
}

/// An incremental rerun: a full run on 99% of `--queries` queries from an
/// empty store, then a rerun on all of them with that store. Reports both
/// wall times, their ratio, and the VQA calls of each.
pub(super) fn bench_rerun(args: &BenchSettings) -> Result<()> {
    let n = args.queries.max(100);
    let inputs = PipelineInputs::prepare(args, n, args.keep_dir.as_deref())?;
    let base = n - n / 100;
    inputs.write_beams("base.json", base)?;
    let d = inputs.dir.path().to_path_buf();
    let (mut full, mut rerun, mut metas) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..=args.reps.max(1) {
        let state = d.join(format!("state-{rep}"));
        let out = d.join(format!("rl-{rep}.json"));
        let flags = inputs.replay_flags(args.workers, &state);
        let t = std::time::Instant::now();
        inputs.run("generate", &flags, &out, "base.json")?;
        let full_s = t.elapsed().as_secs_f64();
        let full_meta = output_meta(&out)?;
        let t = std::time::Instant::now();
        inputs.run("generate", &flags, &out, "beam.json")?;
        let rerun_s = t.elapsed().as_secs_f64();
        let state_bytes = std::fs::metadata(state.join("state.redb"))?.len();
        if args.keep_dir.is_none() {
            std::fs::remove_dir_all(&state)?;
        }
        if rep == 0 {
            continue; // warm-up
        }
        full.push(full_s);
        rerun.push(rerun_s);
        metas.push((full_meta, output_meta(&out)?, state_bytes));
    }
    let (full_meta, rerun_meta, state_bytes) = metas
        .pop()
        .ok_or_else(|| BenchError::Run("no repetition ran".into()))?;
    let calls = |m: &serde_json::Value| m["counts"]["vqa_calls"].as_f64().unwrap_or(0.0);
    let candidates = full_meta["counts"]["candidates"].as_f64().unwrap_or(0.0);
    let (full_med, rerun_med) = (median(&full), median(&rerun));
    println!(
        "{}",
        serde_json::json!({
            "bench": "rerun",
            "queries_full_run": base,
            "queries_rerun": n,
            "workers": args.workers,
            "reps": full.len(),
            "full_median_s": full_med,
            "rerun_median_s": rerun_med,
            "rerun_over_full_time": rerun_med / full_med,
            "full_vqa_calls": calls(&full_meta),
            "rerun_vqa_calls": calls(&rerun_meta),
            "rerun_over_full_vqa_calls": calls(&rerun_meta) / calls(&full_meta).max(1.0),
            "rerun_counts": {
                "queries_added": rerun_meta["counts"]["queries_added"],
                "queries_reused": rerun_meta["counts"]["queries_reused"],
                "vqa_cached": rerun_meta["counts"]["vqa_cached"],
            },
            "full_timings": full_meta["timings"],
            "rerun_timings": rerun_meta["timings"],
            "store_commit_s_per_candidate": full_meta["timings"]["store_s"].as_f64().unwrap_or(0.0) / candidates.max(1.0),
            "state_bytes_per_candidate": state_bytes as f64 / candidates.max(1.0),
            "full_runs_s": full,
            "reruns_s": rerun,
        })
    );
    Ok(())
}

/// Bytes sent over the loopback interface so far (`/proc/net/dev`).
fn loopback_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("lo:"))?;
    line.split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Cluster mode on this machine: candidates/s of the pipeline (replay, or
/// the model given by `--vqa_model`) for 1 process x 1 worker, 1 x 2 and 2
/// processes x 1 worker (127.0.0.1), and the bytes the processes exchanged
/// per candidate (loopback traffic).
pub(super) fn bench_cluster(args: &BenchSettings) -> Result<()> {
    let inputs = PipelineInputs::prepare(args, args.queries.max(64), args.keep_dir.as_deref())?;
    let d = inputs.dir.path().to_path_buf();
    let exe = args.exe.clone();
    for (processes, workers) in [(1usize, 1usize), (1, 2), (2, 1)] {
        let mut secs = Vec::new();
        let mut bytes = Vec::new();
        let mut candidates = 0.0;
        for rep in 0..=args.reps.max(1) {
            let tag = format!("{processes}x{workers}-{rep}");
            let out = d.join(format!("rl-{tag}.json"));
            let state = d.join(format!("state-{tag}"));
            let mut flags = match &args.vqa_model {
                // The model instead of replay: every prompt is answered.
                Some(model) => vec![
                    "--vqa_model".to_string(),
                    model.display().to_string(),
                    "--batch_size".into(),
                    args.batch_size.to_string(),
                    "--workers".into(),
                    workers.to_string(),
                    "--state_dir".into(),
                    state.display().to_string(),
                ],
                None => inputs.replay_flags(workers, &state),
            };
            let ports: Vec<u16> = (0..processes)
                .map(|_| {
                    std::net::TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .map(|a| a.port())
                })
                .collect::<std::io::Result<_>>()?;
            let hosts = d.join(format!("hosts-{tag}.txt"));
            std::fs::write(
                &hosts,
                ports
                    .iter()
                    .map(|p| format!("127.0.0.1:{p}\n"))
                    .collect::<String>(),
            )?;
            let lo0 = loopback_bytes();
            let t = std::time::Instant::now();
            if processes == 1 {
                inputs.run("generate", &flags, &out, "beam.json")?;
            } else {
                flags.extend(["--hostfile".to_string(), hosts.display().to_string()]);
                flags.extend(["--processes".to_string(), processes.to_string()]);
                let children: Vec<_> = (0..processes)
                    .map(|i| {
                        let mut f = flags.clone();
                        f.extend(["--process_index".to_string(), i.to_string()]);
                        let mut cmd = std::process::Command::new(&exe);
                        cmd.arg("generate");
                        inputs.command(&f, &out, "beam.json", &mut cmd);
                        cmd.spawn()
                    })
                    .collect::<std::io::Result<_>>()?;
                for c in children {
                    let o = c.wait_with_output()?;
                    if !o.status.success() {
                        return Err(BenchError::Run(format!(
                            "cluster run failed: {}",
                            String::from_utf8_lossy(&o.stderr)
                        )));
                    }
                }
            }
            let s = t.elapsed().as_secs_f64();
            let sent = match (lo0, loopback_bytes()) {
                (Some(a), Some(b)) => b.saturating_sub(a) as f64,
                _ => f64::NAN,
            };
            candidates = output_meta(&out)?["counts"]["candidates"]
                .as_f64()
                .unwrap_or(0.0);
            if rep > 0 {
                secs.push(s);
                bytes.push(sent);
            }
        }
        let med = median(&secs);
        println!(
            "{}",
            serde_json::json!({
                "bench": "cluster", "processes": processes, "workers_per_process": workers,
                "backend": args.vqa_model.as_ref().map_or("replay".to_string(), |m| m.display().to_string()),
                "queries": inputs.n, "candidates": candidates, "reps": secs.len(),
                "median_s": med, "candidates_per_s": candidates / med,
                "loopback_bytes_per_candidate": median(&bytes) / candidates.max(1.0),
                "runs_s": secs,
            })
        );
    }
    Ok(())
}
