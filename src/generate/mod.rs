//! `leverflow generate` and `leverflow candidates`: run orchestration.
//!
//! 1. load and validate every input ([`inputs`]);
//! 2. run the timely dataflow on `--workers` threads: the beam reader feeds
//!    worker 0, records are exchanged by query index to the stages
//!    ([`stages`]) and the finished records to worker 0's sorted spill;
//! 3. write the outputs from the spill in ascending query order (atomic
//!    temp-file + rename, so a failed run leaves nothing at the output path)
//!    and print the summary ([`summary`]).

pub mod inputs;
pub mod meta;
pub mod stages;
pub mod summary;

use anyhow::{Context, Result};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use leverflow_operators::dataflow::{
    batched, execute_threads, run_worker, DriverConfig, ErrorSlot, SinkFn,
};
use leverflow_operators::sinks::{JsonSink, OutputConfig, ParquetSink, SinkError, SortedSpill};
use leverflow_operators::source::{count_records, BeamReader};
use leverflow_operators::vqa::VqaModel;
use leverflow_schemas::RlRecord;

use crate::cli::GenerateArgs;
use crate::progress::{self, Counters, ProgressStyle, Reporter};
use inputs::Inputs;
use stages::{QueryWork, VqaStageConfig};

/// Which job to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Candidates, VQA, accuracy, rewards.
    Generate,
    /// Candidates only.
    Candidates,
}

/// Makes one VQA backend instance per worker.
pub type VqaFactory = Arc<dyn Fn() -> Result<Box<dyn VqaModel>> + Send + Sync>;

/// Runs `generate` or `candidates` with parsed arguments.
pub fn run(args: GenerateArgs, job: Job) -> Result<()> {
    let started = Instant::now();
    let style = ProgressStyle::parse(&args.progress, args.quiet)?;
    inputs::validate_args(&args)?;
    let with_vqa = job == Job::Generate;

    // The VQA backend (model weights or a replay file) loads on its own
    // thread while the dataset, embeddings and checkpoint load here.
    let backend = with_vqa.then(|| {
        progress::phase(style, "loading the VQA backend");
        let a = args.clone();
        std::thread::spawn(move || crate::backends::vqa_factory(&a))
    });
    progress::phase(style, "loading inputs (dataset, embeddings, checkpoint)");
    let inputs = inputs::load(&args, with_vqa);
    let backend = match backend {
        Some(h) => Some(
            h.join()
                .map_err(|_| anyhow::anyhow!("loading the VQA backend panicked"))?,
        ),
        None => None,
    };
    let inputs = Arc::new(inputs?);
    let (vqa_factory, model_identity) = match backend {
        Some(b) => {
            let (f, id) = b?;
            (Some(f), id)
        }
        None => (None, serde_json::Value::Null),
    };
    let load_s = started.elapsed().as_secs_f64();

    let beam_path = args.beam_data.clone().context("missing --beam_data")?;
    let counters = Arc::new(Counters::default());
    let total = count_records(&beam_path)?;
    let (lo, hi) =
        leverflow_operators::source::slice_bounds(args.start_idx as i64, args.end_idx, total);
    counters
        .queries_total
        .store(hi.saturating_sub(lo), std::sync::atomic::Ordering::Relaxed);

    let spill_dir = inputs
        .output_path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&spill_dir)
        .with_context(|| format!("cannot create the output directory {}", spill_dir.display()))?;

    let reporter = Reporter::start(
        style,
        Arc::clone(&counters),
        if with_vqa { "generate" } else { "candidates" },
    );
    let dataflow_started = Instant::now();
    let spill_slot: Arc<Mutex<Option<SortedSpill>>> = Arc::default();
    let skipped: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let backend_stats: stages::BackendStats = Arc::default();
    let workers = args.workers;
    let vqa_cfg = VqaStageConfig {
        batch_size: args.batch_size,
        system_prompt: args
            .system_prompt
            .clone()
            .unwrap_or_else(|| leverflow_operators::vqa::DEFAULT_SYSTEM_PROMPT.to_string()),
        gt_prob: args.gt_prob,
        skip_missing_images: args.on_missing_image == "skip",
    };
    let include_source = args.include_source_beams;
    let save_prompts = args.save_prompts;
    let start_idx = args.start_idx as i64;
    let end_idx = args.end_idx;
    let driver = DriverConfig {
        source_batch: (args.batch_size * 8).clamp(64, 1024),
        max_inflight: 2 * workers as u64 + 2,
    };
    let results = {
        let inputs = Arc::clone(&inputs);
        let counters = Arc::clone(&counters);
        let spill_slot = Arc::clone(&spill_slot);
        let skipped = Arc::clone(&skipped);
        let backend_stats = Arc::clone(&backend_stats);
        let spill_dir = spill_dir.clone();
        execute_threads(workers, move |worker| -> Result<(), String> {
            let errors = ErrorSlot::default();
            let index = worker.index();
            let source = if index == 0 {
                let reader = BeamReader::open(&beam_path)
                    .and_then(|r| r.with_range(start_idx, end_idx))
                    .map_err(|e| e.to_string())?;
                Some(reader.map(|r| {
                    r.map(|b| QueryWork {
                        query_index: b.query_index,
                        source_beams: b
                            .id_list
                            .iter()
                            .map(|seq| seq[..seq.len().saturating_sub(1)].to_vec())
                            .collect(),
                    })
                    .map_err(|e| e.to_string())
                }))
            } else {
                None
            };
            let sink: Option<SinkFn> = if index == 0 {
                let spill = SortedSpill::create(&spill_dir).map_err(|e| e.to_string())?;
                let slot = Arc::clone(&spill_slot);
                *slot.lock().map_err(|e| e.to_string())? = Some(spill);
                let skipped = Arc::clone(&skipped);
                Some(Box::new(move |q: u64, bytes: Vec<u8>| {
                    if bytes.is_empty() {
                        skipped
                            .lock()
                            .map_err(|e| e.to_string())?
                            .push((q, "skipped".into()));
                        return Ok(());
                    }
                    let mut guard = slot.lock().map_err(|e| e.to_string())?;
                    let spill = guard.as_mut().ok_or("internal error: spill missing")?;
                    spill.push_bytes(q, &bytes).map_err(|e| e.to_string())
                }))
            } else {
                None
            };
            let vqa_model = match &vqa_factory {
                Some(f) => Some(f().map_err(|e| format!("{e:#}"))?),
                None => None,
            };
            let inputs = Arc::clone(&inputs);
            let counters = Arc::clone(&counters);
            let vqa_cfg = vqa_cfg.clone();
            let cand_batch = 64;
            let stats = (index, Arc::clone(&backend_stats));
            let e2 = errors.clone();
            run_worker(
                worker,
                &driver,
                source,
                |w: &QueryWork| w.query_index,
                move |stream| {
                    let cands = batched(
                        stream,
                        "candidates",
                        cand_batch,
                        stages::candidates(Arc::clone(&inputs), include_source),
                        e2.clone(),
                    );
                    match vqa_model {
                        Some(model) => {
                            let answered = batched(
                                cands,
                                "vqa",
                                vqa_cfg.batch_size.div_ceil(8).max(1),
                                stages::vqa(
                                    Arc::clone(&inputs),
                                    model,
                                    vqa_cfg,
                                    Arc::clone(&counters),
                                    stats,
                                ),
                                e2.clone(),
                            );
                            let scored = batched(
                                answered,
                                "accuracy",
                                1,
                                stages::accuracy_stage(Arc::clone(&inputs)),
                                e2.clone(),
                            );
                            batched(
                                scored,
                                "reward",
                                1,
                                stages::reward_stage(Arc::clone(&inputs), save_prompts, counters),
                                e2,
                            )
                        }
                        None => batched(
                            cands,
                            "record",
                            1,
                            stages::candidates_record_stage(Arc::clone(&inputs), counters),
                            e2,
                        ),
                    }
                },
                sink,
                errors,
            )
            .map(|_| ())
        })
        .map_err(anyhow::Error::msg)?
    };
    reporter.finish();
    for r in results {
        r.map_err(anyhow::Error::msg)?;
    }
    let dataflow_s = dataflow_started.elapsed().as_secs_f64();

    let spill = spill_slot
        .lock()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .take()
        .context("internal error: the sink's spill is missing")?;
    progress::phase(style, "writing outputs");
    let write_started = Instant::now();
    let out_cfg = output_config(&inputs, with_vqa, save_prompts);
    let mut writer = Outputs::create(&out_cfg)?;
    let mut summary = summary::Summary::default();
    let mut records = spill.finish()?;
    while let Some(item) = records.next_with_bytes() {
        let (q, record, bytes) = item?;
        summary.add(&record);
        writer.write(q, record, &bytes)?;
    }
    let skipped = std::mem::take(&mut *skipped.lock().map_err(|e| anyhow::anyhow!("{e}"))?);
    summary.skipped = skipped.len() as u64;
    summary.vqa_calls = counters
        .vqa_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    summary.backend = sum_stats(&backend_stats);
    let timings = meta::Timings {
        load_s,
        dataflow_s,
        write_s: write_started.elapsed().as_secs_f64(),
        total_s: started.elapsed().as_secs_f64(),
    };
    let meta = meta::build(
        &args,
        &inputs,
        &summary,
        &skipped,
        &timings,
        &model_identity,
    );
    writer.finish(&meta)?;
    summary.print(&inputs, &timings, with_vqa);
    Ok(())
}

/// The outputs of a run: JSON written on this thread from the records'
/// already serialised bytes, Parquet encoded (zstd) on a second thread fed
/// through a bounded channel, so the two formats are written in parallel.
/// Nothing appears at an output path unless [`Outputs::finish`] succeeds.
struct Outputs {
    json: Option<JsonSink>,
    parquet: Option<ParquetThread>,
}

/// The channel into the Parquet writer thread and the thread's handle.
type ParquetThread = (
    std::sync::mpsc::SyncSender<(u64, RlRecord)>,
    std::thread::JoinHandle<Result<ParquetSink, SinkError>>,
);

impl Outputs {
    fn create(cfg: &OutputConfig) -> Result<Self> {
        let json = match &cfg.json {
            Some(p) => Some(JsonSink::create(p, cfg.json_options.clone())?),
            None => None,
        };
        let parquet = match &cfg.parquet {
            Some(p) => {
                let mut sink = ParquetSink::create(p, cfg.parquet_options.clone())?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, RlRecord)>(1024);
                let handle = std::thread::spawn(move || {
                    for (q, r) in rx {
                        sink.write_record(q, &r)?;
                    }
                    Ok(sink)
                });
                Some((tx, handle))
            }
            None => None,
        };
        Ok(Self { json, parquet })
    }

    fn write(&mut self, q: u64, record: RlRecord, bytes: &[u8]) -> Result<()> {
        if let Some(j) = self.json.as_mut() {
            j.write_serialised(q, &record, bytes)?;
        }
        if let Some((tx, _)) = &self.parquet {
            if tx.send((q, record)).is_err() {
                // The writer thread stopped: its error is reported by finish.
                return self.fail_parquet();
            }
        }
        Ok(())
    }

    fn fail_parquet(&mut self) -> Result<()> {
        match self.parquet.take() {
            Some((tx, handle)) => {
                drop(tx);
                match handle.join() {
                    Ok(Err(e)) => Err(e.into()),
                    Ok(Ok(_)) => Err(anyhow::anyhow!(
                        "internal error: the Parquet writer stopped early"
                    )),
                    Err(_) => Err(anyhow::anyhow!("the Parquet writer thread panicked")),
                }
            }
            None => Ok(()),
        }
    }

    fn finish(mut self, meta: &serde_json::Value) -> Result<()> {
        let parquet = match self.parquet.take() {
            Some((tx, handle)) => {
                drop(tx);
                Some(
                    handle
                        .join()
                        .map_err(|_| anyhow::anyhow!("the Parquet writer thread panicked"))??,
                )
            }
            None => None,
        };
        if let Some(j) = self.json.take() {
            j.finish(meta)?;
        }
        if let Some(p) = parquet {
            p.finish(meta)?;
        }
        Ok(())
    }
}

/// Sums the numeric counters the workers' backends reported.
fn sum_stats(stats: &stages::BackendStats) -> serde_json::Value {
    let mut total = serde_json::Map::new();
    if let Ok(per_worker) = stats.lock() {
        let mut workers: Vec<_> = per_worker.iter().collect();
        workers.sort_by_key(|(w, _)| **w);
        for (_, v) in workers {
            if let serde_json::Value::Object(m) = v {
                for (k, x) in m {
                    let sum = total.get(k).and_then(|t| t.as_f64()).unwrap_or(0.0)
                        + x.as_f64().unwrap_or(0.0);
                    total.insert(k.clone(), serde_json::json!(sum));
                }
            }
        }
    }
    serde_json::Value::Object(total)
}

/// Output paths and Parquet options for a run.
fn output_config(inputs: &Inputs, with_vqa: bool, save_prompts: bool) -> OutputConfig {
    use leverflow_operators::sinks::{OutputFormat, ParquetOptions};
    let per_query_pool = matches!(inputs.pools, inputs::Pools::PerQuery { .. });
    let shared_pool = match &inputs.pools {
        inputs::Pools::Shared { indices, .. } => Some(indices.as_ref().clone()),
        inputs::Pools::PerQuery { .. } => None,
    };
    OutputConfig {
        json: inputs
            .formats
            .contains(&OutputFormat::Json)
            .then(|| inputs.output_path.clone()),
        parquet: inputs
            .formats
            .contains(&OutputFormat::Parquet)
            .then(|| inputs.parquet_path.clone()),
        parquet_options: ParquetOptions {
            per_query_pool,
            with_vqa,
            with_prompts: with_vqa && save_prompts,
            shared_pool,
            ..Default::default()
        },
        ..Default::default()
    }
}
