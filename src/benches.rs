//! The workloads of `leverflow bench <what>` (see BENCHMARKS.md).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

use leverflow_operators::accuracy::{load_questions_annotations, Normalizer};
use leverflow_operators::candidates::{bench_candidates, CandidateArgs};

use crate::bench::{median, report, time_runs};
use crate::cli::BenchArgs;

/// Runs the benchmark named in `args.what`.
pub fn run(args: &BenchArgs) -> Result<()> {
    match args.what.as_str() {
        "score" => bench_score(args),
        "candidates" => bench_cands(args),
        "vqa" => crate::qwen::bench_vqa(args),
        "pipeline" => bench_pipeline(args),
        other => bail!("unknown benchmark `{other}`: expected score, candidates, vqa or pipeline"),
    }
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Official accuracy: answer evaluations per second on the vqa_eval fixture
/// (normalisation of the prediction + leave-one-out accuracy).
fn bench_score(args: &BenchArgs) -> Result<()> {
    let q = fixture("vqa_eval/questions.json");
    let a = fixture("vqa_eval/annotations.json");
    let p = fixture("vqa_eval/predictions.json");
    let index = load_questions_annotations(&q, &a)?;
    let preds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
    )?;
    let cases: Vec<(u64, String)> = preds["cases"]
        .as_array()
        .context("predictions.json: `cases` must be a list")?
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
fn bench_cands(args: &BenchArgs) -> Result<()> {
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
        let r = bench_candidates(512, 256, 3, args.pool, args.queries, 256, &cargs)?;
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
    let x = leverflow_operators::candidates::splitmix64(((a as u64) << 20) ^ b as u64);
    (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// The whole dataflow with the replay backend on synthetic data: `--queries`
/// queries over a shared pool of 64 candidates (d_model 64, the demo's
/// selector), 5 beams + 2x2 samples + 1 random, both sinks, `--workers`
/// workers. Inputs are prepared once (not timed); each repetition runs
/// `leverflow generate` as a child process. Peak memory: run this under
/// `/usr/bin/time -v` or see BENCHMARKS.md.
fn bench_pipeline(args: &BenchArgs) -> Result<()> {
    use std::io::Write;
    let n = args.queries.max(64);
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo");
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
    {
        let mut b = std::io::BufWriter::new(std::fs::File::create(d.join("beam.json"))?);
        write!(b, "{{")?;
        for i in 0..n {
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
    }
    let common = |out: &Path| -> Vec<String> {
        let p = |s: &str| d.join(s).display().to_string();
        vec![
            "--sft_ckpt".into(),
            demo.join("sft.ckpt").display().to_string(),
            "--beam_data".into(),
            p("beam.json"),
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
        ]
    };
    let exe = std::env::current_exe()?;
    let run = |sub: &str, extra: &[String], out: &Path| -> Result<()> {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg(sub).args(common(out)).args(extra);
        let o = cmd.output()?;
        if !o.status.success() {
            bail!("{sub} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    // Candidates, then a replay file with an answer for every candidate.
    let cands = d.join("cands.json");
    run("candidates", &["--format".into(), "json".into()], &cands)?;
    let replay = d.join("replay.json");
    {
        use leverflow_operators::sinks::{visit_rl_json, JsonOptions, JsonSink};
        let mut sink = JsonSink::create(&replay, JsonOptions::default())?;
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
        })?;
        sink.finish(&serde_json::json!({"bench": "replay source"}))?;
    }
    let out = d.join("rl.json");
    let extra = vec![
        "--vqa_backend".to_string(),
        "replay".into(),
        "--replay_from".into(),
        replay.display().to_string(),
        "--workers".into(),
        args.workers.to_string(),
    ];
    let secs = time_runs(args.reps, || run("generate", &extra, &out))?;
    let written =
        leverflow_operators::sinks::visit_rl_json(&out, |_, _| Ok(()))?.unwrap_or_default();
    let candidates = written["counts"]["candidates"].as_f64().unwrap_or(0.0);
    report(
        "pipeline",
        "candidates",
        candidates,
        &secs,
        serde_json::json!({"queries": n, "workers": args.workers, "candidates": candidates,
            "last_run_timings": written["timings"],
            "note": "wall time of `leverflow generate --vqa_backend replay` (process start, loading, dataflow, JSON + Parquet)"}),
    );
    Ok(())
}
