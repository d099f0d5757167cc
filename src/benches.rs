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
        other => bail!("unknown benchmark `{other}`: expected score, candidates or vqa"),
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
