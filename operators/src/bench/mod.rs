//! The benchmarks of `leverflow bench <what>` (their medians go into
//! BENCHMARKS.md). Speed targets are checked here, never by timed tests:
//! each benchmark runs its workload `reps` times and prints one JSON line
//! with the median, the min/max and the throughput at the median.
//!
//! | benchmark | module | measures |
//! |---|---|---|
//! | `score` | [`workloads`] | official-accuracy evaluations per second |
//! | `candidates` | [`workloads`] | pointer-selector candidate generation |
//! | `pipeline`, `rerun`, `cluster` | [`workloads`] | whole runs of the binary on synthetic inputs |
//! | `vqa` | [`vqa`] | Qwen2.5-VL prompts per second at batch 1 and batch N (with `--synthetic 3b`, at the 3B's full size, [`synthetic_3b`]) |
//! | `vqa --vqa_model <OpenFlamingo dir>` | [`vqa_flamingo`] | OpenFlamingo prompts per second at batch 1 and batch N |
//! | `openai` | [`openai`] | answers per second through a running OpenAI-compatible server, and leverflow's time per request |

pub mod openai;
pub mod synthetic_3b;
pub mod vqa;
pub mod vqa_flamingo;
pub mod workloads;

use std::path::{Path, PathBuf};

/// What a benchmark runs on (the `bench` subcommand's flags).
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Candidate pool size (candidates).
    pub pool: usize,
    /// Queries (candidates, pipeline, rerun, cluster, vqa prompts).
    pub queries: usize,
    /// Repetitions; the median is reported.
    pub reps: usize,
    /// Timely workers (pipeline, rerun, cluster).
    pub workers: usize,
    /// Model directory (vqa, cluster).
    pub vqa_model: Option<PathBuf>,
    /// Prompts per batch (vqa, cluster).
    pub batch_size: usize,
    /// vqa: the device the model runs on.
    pub device: crate::backends::Device,
    /// vqa: decoder layers of the 3B's width on a synthetic checkpoint.
    pub synthetic_3b_layers: Option<usize>,
    /// vqa: a synthetic checkpoint with every shape of a published model.
    pub synthetic: Option<vqa::SyntheticModel>,
    /// vqa: measure only `batch_size` (not batch 1 first), so the line's
    /// peak RSS is that batch size's own.
    pub batch_only: bool,
    /// vqa: the vision-embedding cache kept across batches, in MB (0: off).
    pub vision_cache_mb: usize,
    /// pipeline / rerun / cluster: keep the inputs and outputs here.
    pub keep_dir: Option<PathBuf>,
    /// The `leverflow` binary the whole-run benchmarks start.
    pub exe: PathBuf,
    /// The repository root (the demo and the test fixtures).
    pub repo: PathBuf,
    /// openai: the server and the concurrencies.
    pub openai: openai::OpenAiBench,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An unknown benchmark name.
    #[error(
        "unknown benchmark `{0}`: expected score, candidates, vqa, openai, pipeline, rerun or cluster"
    )]
    Unknown(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// JSON could not be written or read.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A run of the binary failed.
    #[error("{0}")]
    Run(String),
    /// The workload failed.
    #[error(transparent)]
    Workload(Box<dyn std::error::Error + Send + Sync>),
}

impl BenchError {
    /// Wraps a workload's error.
    pub fn workload(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BenchError::Workload(e.into())
    }
}

/// The demo's policy inputs in `repo` (checkpoint, beam data, embeddings)
/// as `generate`/`candidates` flags: shared by the benches that run the
/// binary and by the end-to-end tests.
pub fn demo_policy_flags(repo: &Path) -> Vec<String> {
    let demo = |rel: &str| repo.join("demo").join(rel).display().to_string();
    vec![
        "--sft_ckpt".into(),
        demo("sft.ckpt"),
        "--beam_data".into(),
        demo("beam_data.json"),
        "--query_emb".into(),
        demo("query_embeddings.pt"),
        "--cand_emb".into(),
        demo("candidate_embeddings.pt"),
    ]
}

/// The demo's dataset inputs in `repo` (questions, annotations, images) as
/// `generate` flags.
pub fn demo_data_flags(repo: &Path) -> Vec<String> {
    let demo = |rel: &str| repo.join("demo").join(rel).display().to_string();
    vec![
        "--train_ques_path".into(),
        demo("data/questions.json"),
        "--train_ann_path".into(),
        demo("data/annotations.json"),
        "--train_coco_root".into(),
        demo("data/images"),
        "--image_pattern".into(),
        "COCO_train2014_{image_id:012d}.png".into(),
    ]
}

/// Runs the benchmark `what`.
pub fn run(what: &str, s: &BenchSettings) -> Result<(), BenchError> {
    match what {
        "score" => workloads::bench_score(s),
        "candidates" => workloads::bench_cands(s),
        "vqa" => vqa::bench_vqa(s),
        "openai" => openai::bench_openai(s, &s.openai),
        "pipeline" => workloads::bench_pipeline(s),
        "rerun" => workloads::bench_rerun(s),
        "cluster" => workloads::bench_cluster(s),
        other => Err(BenchError::Unknown(other.to_string())),
    }
}

use std::time::Instant;

/// Times `work` `reps` times (after one warm-up run) and returns the seconds
/// of each run.
pub fn time_runs<F: FnMut() -> Result<(), BenchError>>(
    reps: usize,
    mut work: F,
) -> Result<Vec<f64>, BenchError> {
    work()?;
    let mut secs = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        work()?;
        secs.push(start.elapsed().as_secs_f64());
    }
    Ok(secs)
}

/// The peak resident set size of this process so far, in bytes (`VmHWM`
/// of `/proc/self/status`; `None` where that file does not exist).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

/// Median of a non-empty sample.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints a benchmark result: `items` units of work per run.
pub fn report(name: &str, unit: &str, items: f64, secs: &[f64], extra: serde_json::Value) {
    let med = median(secs);
    let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = secs.iter().copied().fold(0.0, f64::max);
    let mut line = serde_json::json!({
        "bench": name,
        "reps": secs.len(),
        "median_s": med,
        "min_s": min,
        "max_s": max,
        format!("{unit}_per_s"): items / med,
        "items_per_run": items,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    println!("{line}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn peak_rss_is_read_where_proc_exists() {
        if Path::new("/proc/self/status").exists() {
            let rss = peak_rss_bytes().unwrap();
            assert!(rss > 1 << 20, "{rss}");
        }
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
