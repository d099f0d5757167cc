//! `leverflow generate` and `leverflow candidates`: run orchestration.
//!
//! 1. load and validate every input ([`inputs`]);
//! 2. open the state store (`--state_dir`) and run the timely dataflow on
//!    `--workers` threads: worker 0 reads the previous run's input keys and
//!    the beam data; records are exchanged by query index; a planning stage
//!    keys each query's inputs ([`keys`]), the differential comparison
//!    classifies it (added / changed / removed / unchanged), and only
//!    queries without a stored record for their key go through the stages
//!    ([`stages`]), which take candidate sets and answers from the store
//!    when they can. Worker 0 commits finished queries to the store in
//!    batches (a killed run resumes from there);
//! 3. write the outputs from the store in ascending query order (atomic
//!    temp-file + rename, so a failed run leaves nothing at the output
//!    path), then mark the run complete in the store and print the summary
//!    ([`summary`]).

mod cluster;
pub mod inputs;
pub mod keys;
pub mod meta;
pub mod outputs;
pub mod stages;
pub mod summary;

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leverflow_operators::dataflow::{
    batched, execute_cluster, incremental_front, interleave_previous, run_worker, DriverConfig,
    ErrorSlot, InputChange, SinkFn, SourceItem,
};
use leverflow_operators::sinks::{AtomicFile, OutputConfig, ParquetSink};
use leverflow_operators::source::{count_records, BeamReader};
use leverflow_operators::state::{
    FileDigests, Key, QueryUpdate, StateStore, StoreWriter, StoredOutcome, STATE_FILE,
};
use leverflow_operators::vqa::VqaModel;
use leverflow_schemas::RlRecord;

use crate::cli::GenerateArgs;
use crate::progress::{self, Counters, ProgressStyle, Reporter};
use cluster::{finish_cluster, ProcessTail};
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

/// Makes the VQA backend instance of a process's worker (by local worker
/// index, which picks its device from `--devices`).
pub type VqaFactory = Arc<dyn Fn(usize) -> Result<Box<dyn VqaModel>> + Send + Sync>;

/// Runs `generate` or `candidates` with parsed arguments.
pub fn run(args: GenerateArgs, job: Job) -> Result<()> {
    let started = Instant::now();
    let style = ProgressStyle::parse(&args.progress, args.quiet)?;
    inputs::validate_args(&args)?;
    let with_vqa = job == Job::Generate;
    let (cluster, _devices) = args.cluster()?;
    let multi = cluster.is_multi_process();
    let output_path = args
        .output_path
        .clone()
        .context("missing --output_path (see `leverflow generate --help`)")?;
    // One run per output, before anything loads: a second run on the same
    // outputs fails here (of a multi-process run, process 0 holds them: it
    // writes the JSON and the manifest).
    let holds_outputs = !multi || cluster.process_index == 0;
    let parquet_target = args
        .parquet_path
        .clone()
        .unwrap_or_else(|| output_path.with_extension("parquet"));
    let _output_locks = match holds_outputs {
        true => leverflow_operators::sinks::OutputLock::acquire_all([
            output_path.as_path(),
            parquet_target.as_path(),
        ])?,
        false => Vec::new(),
    };
    // Each process keeps its own store (its queries are routed to it).
    let state_dir = match multi {
        true => state_dir(&args, &output_path).join(format!("process-{}", cluster.process_index)),
        false => state_dir(&args, &output_path),
    };
    // The store of an earlier run is opened before anything loads: it
    // remembers the digests of input files, which need not be read again
    // while they are unchanged. A first run creates its store only once its
    // inputs have loaded (bad inputs leave nothing behind).
    let earlier_store = match state_dir.join(STATE_FILE).is_file() {
        true => Some(StateStore::open(&state_dir)?),
        false => None,
    };
    let digests = Arc::new(match &earlier_store {
        Some(store) => store.file_digests()?,
        None => FileDigests::default(),
    });

    // The VQA backend (model weights or a replay file) loads on its own
    // thread while the dataset, embeddings and checkpoint load here.
    let backend = with_vqa.then(|| {
        progress::phase(style, "loading the VQA backend");
        let a = args.clone();
        let digests = Arc::clone(&digests);
        std::thread::spawn(move || crate::backends::vqa_factory(&a, &digests))
    });
    // Counting the beam records (for progress) reads the whole file: do it
    // while the inputs load.
    let counting = args
        .beam_data
        .clone()
        .map(|p| std::thread::spawn(move || count_records(&p)));
    progress::phase(style, "loading inputs (dataset, embeddings, checkpoint)");
    let inputs = inputs::load(
        &args,
        with_vqa,
        Arc::clone(&digests),
        earlier_store.as_ref().map(|_| state_dir.as_path()),
    );
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
    tracing::debug!(load_s, "inputs loaded");

    let beam_path = args.beam_data.clone().context("missing --beam_data")?;
    let counters = Arc::new(Counters::default());
    let total = counting
        .context("missing --beam_data")?
        .join()
        .map_err(|_| anyhow::anyhow!("counting the beam records panicked"))??;
    let (lo, hi) =
        leverflow_operators::source::slice_bounds(args.start_idx as i64, args.end_idx, total);
    counters
        .queries_total
        .store(hi.saturating_sub(lo), std::sync::atomic::Ordering::Relaxed);

    // The state store: finished work of earlier runs, and the lock that
    // keeps two runs off the same outputs.
    if let Some(dir) = inputs.output_path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the output directory {}", dir.display()))?;
        }
    }
    if multi && args.output_mode == "delta" {
        anyhow::bail!("--output_mode delta needs a single-process run (the part files of a multi-process run are the delta's granularity already)");
    }
    let store = match earlier_store {
        Some(store) => store,
        None => StateStore::open(&state_dir)?,
    };
    tracing::debug!(
        served = digests.served(),
        remembered = digests.fresh().len(),
        "input file digests (served: unchanged since an earlier run, not read)"
    );
    store.remember_file_digests(&digests)?;
    // Joined when `run` returns, whichever way.
    let _snapshot = inputs::write_split_snapshot(&inputs, &state_dir);
    let store = Arc::new(store);
    if multi && cluster.process_index == 0 {
        leverflow_operators::sinks::prepare_dataset_dir(&inputs.parquet_path)?;
    }
    let delta = DeltaPaths::new(&inputs, &args.output_mode);
    for target in [&inputs.output_path, &inputs.parquet_path]
        .into_iter()
        .chain(delta.iter().flat_map(|d| [&d.parquet, &d.retracted]))
        .filter(|_| holds_outputs)
    {
        AtomicFile::remove_stale_temps(target);
    }
    let previous = Arc::new(store.previous_inputs()?);
    let run_keys = Arc::new(keys::RunKeys::new(&args, &inputs, &model_identity, job)?);
    let changes: Arc<Mutex<HashMap<(u64, InputChange), isize>>> = Arc::default();
    // A rerun copies the previous JSON output's unchanged segments while
    // the dataflow runs (single process; a cluster writes part files).
    let prefetch = if multi {
        None
    } else {
        let seen = Arc::clone(&changes);
        let per_segment = inputs.segment_queries;
        outputs::Prefetch::start(
            &store,
            &output_config(&inputs, with_vqa, args.save_prompts),
            move |segment| {
                seen.lock().map_or(true, |m| {
                    m.iter().any(|((q, _), diff)| {
                        *diff != 0
                            && leverflow_operators::sinks::segment_of(*q, per_segment) == segment
                    })
                })
            },
        )?
    };

    let reporter = Reporter::start(
        style,
        Arc::clone(&counters),
        if with_vqa { "generate" } else { "candidates" },
    );
    let dataflow_started = Instant::now();
    let writer = StoreWriter::start(Arc::clone(&store), 2048, Duration::from_secs(1));
    let current: Arc<Mutex<Vec<(u64, Key)>>> = Arc::default();
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
    let root = (cluster.process_index * workers) as u64;
    let peers = cluster.total_workers() as u64;
    let driver = DriverConfig {
        source_batch: (args.batch_size * 8).clamp(64, 1024),
        max_source_batch: 4096,
        max_inflight: 2 * workers as u64 + 2,
        sink_worker: root,
    };
    let errors = ErrorSlot::default();
    let reports: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let tail = multi.then(|| ProcessTail {
        inputs: Arc::clone(&inputs),
        store: Arc::clone(&store),
        current: Arc::clone(&current),
        changes: Arc::clone(&changes),
        counters: Arc::clone(&counters),
        backend_stats: Arc::clone(&backend_stats),
        process: cluster.process_index,
        with_vqa,
        save_prompts,
    });
    let results = {
        let inputs = Arc::clone(&inputs);
        let counters = Arc::clone(&counters);
        let updates = writer.handle();
        let current = Arc::clone(&current);
        let changes = Arc::clone(&changes);
        let backend_stats = Arc::clone(&backend_stats);
        let store = Arc::clone(&store);
        let run_keys = Arc::clone(&run_keys);
        let previous = Arc::clone(&previous);
        let errors = errors.clone();
        let reports = Arc::clone(&reports);
        let tail = tail.map(Arc::new);
        let updates_for_tail = writer.handle();
        let timeouts = args.cluster_timeouts();
        execute_cluster(&cluster, &timeouts, move |worker| -> Result<(), String> {
            let errors = errors.clone();
            let index = worker.index() as u64;
            let previous = Arc::clone(&previous);
            // One reader per process feeds the queries routed to this
            // process's workers (routing is query index modulo workers).
            let mine = move |q: u64| (q % peers) / workers as u64 == root / workers as u64;
            let source = if index == root {
                let reader = BeamReader::open(&beam_path)
                    .and_then(|r| r.with_range(start_idx, end_idx))
                    .map_err(|e| e.to_string())?;
                let reader =
                    reader.filter(move |r| r.as_ref().map_or(true, |b| mine(b.query_index)));
                let work = reader.map(|r| {
                    r.map(|b| QueryWork {
                        query_index: b.query_index,
                        source_beams: b
                            .id_list
                            .iter()
                            .map(|seq| seq[..seq.len().saturating_sub(1)].to_vec())
                            .collect(),
                        input_key: [0; 32],
                    })
                    .map_err(|e| e.to_string())
                });
                Some(interleave_previous(
                    previous.iter().copied().collect::<Vec<_>>(),
                    work,
                    |w: &QueryWork| w.query_index,
                ))
            } else {
                None
            };
            let sink: Option<SinkFn> = if index == root {
                let updates = updates.clone();
                Some(Box::new(move |_q: u64, bytes: Vec<u8>| {
                    let update = QueryUpdate::decode(&bytes)?;
                    updates
                        .as_ref()
                        .ok_or_else(|| "the state store writer stopped".to_string())?
                        .send(update)
                }))
            } else {
                None
            };
            let vqa_model = match &vqa_factory {
                Some(f) => Some(f((index - root) as usize).map_err(|e| format!("{e:#}"))?),
                None => None,
            };
            let inputs = Arc::clone(&inputs);
            let counters = Arc::clone(&counters);
            let vqa_cfg = vqa_cfg.clone();
            let cand_batch = 64;
            let stats = (index as usize, Arc::clone(&backend_stats));
            let e2 = errors.clone();
            let store = Arc::clone(&store);
            let run_keys = Arc::clone(&run_keys);
            let current = Arc::clone(&current);
            let changes = Arc::clone(&changes);
            let outcome = run_worker(
                worker,
                &driver,
                source,
                |s: &SourceItem<QueryWork>| s.query_index(|w| w.query_index),
                move |stream, probe| {
                    let todo = incremental_front(
                        stream,
                        stages::plan(
                            Arc::clone(&inputs),
                            Arc::clone(&run_keys),
                            Arc::clone(&store),
                            with_vqa,
                            current,
                            Arc::clone(&counters),
                        ),
                        cand_batch,
                        move |q, change, diff| {
                            if let Ok(mut m) = changes.lock() {
                                *m.entry((q, change)).or_insert(0) += diff;
                            }
                        },
                        probe,
                        e2.clone(),
                    );
                    let cands = batched(
                        todo,
                        "candidates",
                        cand_batch,
                        stages::candidates(
                            Arc::clone(&inputs),
                            Arc::clone(&run_keys),
                            Arc::clone(&store),
                            include_source,
                            Arc::clone(&counters),
                        ),
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
                                    run_keys,
                                    store,
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
                errors.clone(),
            )
            .map(|_| ());
            match &tail {
                // A multi-process run: each process writes its part files,
                // then every process's report goes to worker 0 (a second
                // dataflow, so every process takes part even after an
                // error and nobody waits forever).
                Some(tail) => {
                    let report = (index == root).then(|| {
                        let r = match (outcome.as_ref().err().cloned(), errors.get()) {
                            (Some(e), _) | (None, Some(e)) => Err(e),
                            (None, None) => updates_for_tail
                                .as_ref()
                                .ok_or_else(|| "the state store writer stopped".to_string())
                                .and_then(|w| w.sync())
                                .and_then(|_| tail.write_parts().map_err(|e| format!("{e:#}"))),
                        };
                        serde_json::to_vec(&r).unwrap_or_default()
                    });
                    let reports = Arc::clone(&reports);
                    let sink: Option<SinkFn> = (index == 0).then(|| {
                        Box::new(move |_q: u64, bytes: Vec<u8>| {
                            reports.lock().map_err(|e| e.to_string())?.push(bytes);
                            Ok(())
                        }) as SinkFn
                    });
                    run_worker(
                        worker,
                        &DriverConfig {
                            source_batch: 1,
                            max_source_batch: 1,
                            max_inflight: 1,
                            sink_worker: 0,
                        },
                        report.map(|r| std::iter::once(Ok((0u64, r)))),
                        |x: &(u64, Vec<u8>)| x.0,
                        |stream, _probe| stream,
                        sink,
                        ErrorSlot::default(),
                    )?;
                    outcome
                }
                None => outcome,
            }
        })
        .map_err(anyhow::Error::msg)?
    };
    reporter.finish();
    // Work finished before an error is kept: a rerun does not redo it.
    let committed = writer.finish();
    if multi {
        for r in results {
            r.map_err(anyhow::Error::msg)?;
        }
        committed?;
        return finish_cluster(
            &args,
            &inputs,
            &reports,
            cluster.process_index,
            &model_identity,
            meta::Timings {
                load_s,
                dataflow_s: dataflow_started.elapsed().as_secs_f64(),
                write_s: 0.0,
                store_s: 0.0,
                total_s: started.elapsed().as_secs_f64(),
            },
            with_vqa,
            style,
        );
    }
    if let Err(e) = &committed {
        // The writer's error explains a sink that could not send.
        anyhow::bail!("{e}");
    }
    for r in results {
        r.map_err(anyhow::Error::msg)?;
    }
    let writer_stats = committed?;
    let dataflow_s = dataflow_started.elapsed().as_secs_f64();
    tracing::debug!(dataflow_s, "dataflow finished");

    let Classified {
        current,
        removed,
        delta_rows,
        incremental,
    } = classify(&inputs, &current, &changes, &counters)?;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);

    tracing::debug!("queries classified");
    progress::phase(style, "writing outputs");
    let write_started = Instant::now();
    let out_cfg = output_config(&inputs, with_vqa, save_prompts);
    let vqa_calls = load(&counters.vqa_calls);
    let backend = sum_stats(&backend_stats);
    let mut timings = meta::Timings {
        load_s,
        dataflow_s,
        write_s: 0.0,
        store_s: writer_stats.commit_s,
        total_s: 0.0,
    };
    let written = outputs::write_outputs(
        &store,
        &out_cfg,
        &current,
        prefetch,
        |summary, skipped, seg| {
            let mut summary = summary.clone();
            summary.vqa_calls = vqa_calls;
            summary.backend = backend.clone();
            summary.incremental = incremental.clone();
            summary.incremental.output_segments_copied = seg.copied as u64;
            summary.incremental.output_segments = seg.total as u64;
            timings.write_s = write_started.elapsed().as_secs_f64();
            timings.total_s = started.elapsed().as_secs_f64();
            meta::build(&args, &inputs, &summary, skipped, &timings, &model_identity)
        },
    )?;
    let mut summary = written.summary;
    summary.vqa_calls = vqa_calls;
    summary.backend = backend;
    summary.incremental = incremental;
    summary.incremental.output_segments_copied = written.segments.copied as u64;
    summary.incremental.output_segments = written.segments.total as u64;
    if let Some(d) = &delta {
        let meta = meta::build(
            &args,
            &inputs,
            &summary,
            &written.skipped,
            &timings,
            &model_identity,
        );
        write_delta(d, &store, &out_cfg, &delta_rows, &removed, &meta)?;
    }
    tracing::debug!("outputs written");
    // Last: this run's input becomes the previous input of the next run.
    store.complete_run(&removed, &current, Some(&written.manifest))?;
    tracing::debug!("run completed in the store");
    summary.print(&inputs, &timings, with_vqa);
    if let Some(d) = &delta {
        println!("  delta Parquet      {}", d.parquet.display());
        println!("  retracted ids      {}", d.retracted.display());
    }
    drop(written.previous);
    tracing::debug!("previous outputs released");
    // Freeing the loaded inputs (the dataset and its scoring index are
    // millions of small allocations) takes ~0.1 s that a finishing run need
    // not wait for: a detached thread frees them while `run` returns, and
    // when the process exits first the OS reclaims the memory at once.
    std::thread::spawn(move || drop(inputs));
    Ok(())
}

/// This run's queries and how they differ from the previous completed run.
struct Classified {
    /// (query, input key), ascending.
    current: Vec<(u64, Key)>,
    /// Queries of the previous run no longer in the input, ascending.
    removed: Vec<u64>,
    /// Added and changed queries with their keys, ascending.
    delta_rows: Vec<(u64, Key)>,
    /// The counts.
    incremental: summary::Incremental,
}

/// Collects what the planning stage and the differential comparison saw.
fn classify(
    inputs: &Inputs,
    current: &Mutex<Vec<(u64, Key)>>,
    changes: &Mutex<HashMap<(u64, InputChange), isize>>,
    counters: &Counters,
) -> Result<Classified> {
    let mut current = std::mem::take(&mut *current.lock().map_err(|e| anyhow::anyhow!("{e}"))?);
    current.sort_unstable_by_key(|(q, _)| *q);
    if let Some(w) = current.windows(2).find(|w| w[0].0 == w[1].0) {
        anyhow::bail!(
            "{}: query {} appears more than once in the beam data",
            inputs.beam_path.display(),
            w[0].0
        );
    }
    let changes = std::mem::take(&mut *changes.lock().map_err(|e| anyhow::anyhow!("{e}"))?);
    let mut removed = Vec::new();
    let mut delta_rows: Vec<(u64, Key)> = Vec::new();
    let mut incremental = summary::Incremental::default();
    let key_of: HashMap<u64, Key> = current.iter().copied().collect();
    for ((q, change), n) in changes {
        if n <= 0 {
            continue;
        }
        match change {
            InputChange::Added => incremental.queries_added += 1,
            InputChange::Changed => incremental.queries_changed += 1,
            InputChange::Removed => {
                incremental.queries_removed += 1;
                removed.push(q);
                continue;
            }
        }
        if let Some(k) = key_of.get(&q) {
            delta_rows.push((q, *k));
        }
    }
    removed.sort_unstable();
    delta_rows.sort_unstable_by_key(|(q, _)| *q);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    incremental.queries_reused = load(&counters.queries_reused);
    incremental.vqa_cached = load(&counters.vqa_cached);
    incremental.candidate_sets_cached = load(&counters.candidate_sets_cached);
    Ok(Classified {
        current,
        removed,
        delta_rows,
        incremental,
    })
}

/// Default `--state_dir`: `<output_path>.state/`.
fn state_dir(args: &GenerateArgs, output_path: &std::path::Path) -> PathBuf {
    args.state_dir.clone().unwrap_or_else(|| {
        let mut s = output_path.as_os_str().to_owned();
        s.push(".state");
        PathBuf::from(s)
    })
}

pub(crate) fn parse_stored(state: &std::path::Path, q: u64, bytes: &[u8]) -> Result<RlRecord> {
    serde_json::from_slice(bytes).map_err(|e| {
        anyhow::anyhow!(
            "state store {}: the record of query {q} does not parse ({e}); the store is corrupt: delete its directory (the next run recomputes everything)",
            state.display()
        )
    })
}

/// Where `--output_mode delta` writes.
struct DeltaPaths {
    parquet: PathBuf,
    retracted: PathBuf,
}

impl DeltaPaths {
    fn new(inputs: &Inputs, mode: &str) -> Option<Self> {
        (mode == "delta").then(|| {
            let stem = |p: &std::path::Path| {
                p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "output".into())
            };
            let parquet = inputs
                .parquet_path
                .with_file_name(format!("{}.delta.parquet", stem(&inputs.parquet_path)));
            let retracted = inputs
                .output_path
                .with_file_name(format!("{}.retracted.json", stem(&inputs.output_path)));
            Self { parquet, retracted }
        })
    }
}

/// Writes the delta Parquet (records of added and changed queries) and the
/// list of retracted query ids.
fn write_delta(
    d: &DeltaPaths,
    store: &StateStore,
    cfg: &OutputConfig,
    rows: &[(u64, Key)],
    removed: &[u64],
    meta: &serde_json::Value,
) -> Result<()> {
    let mut sink = ParquetSink::create(&d.parquet, cfg.parquet_options.clone())?;
    store.visit_records(rows, |q, outcome| -> Result<()> {
        if let StoredOutcome::Record(bytes) = outcome {
            sink.write_record(q, &parse_stored(store.path(), q, &bytes)?)?;
        }
        Ok(())
    })?;
    let mut retracted = AtomicFile::create(&d.retracted)?;
    let body = serde_json::json!({
        "retracted_query_ids": removed,
        "changed_query_ids": rows.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        "created_at": meta.get("created_at"),
    });
    serde_json::to_writer(&mut retracted, &body)?;
    std::io::Write::write_all(&mut retracted, b"\n")?;
    retracted.finish()?;
    sink.finish(meta)?;
    Ok(())
}

/// Sums the numeric counters the workers' backends reported.
pub(crate) fn sum_stats(stats: &stages::BackendStats) -> serde_json::Value {
    let mut total = serde_json::Value::Object(serde_json::Map::new());
    if let Ok(per_worker) = stats.lock() {
        let mut workers: Vec<_> = per_worker.iter().collect();
        workers.sort_by_key(|(w, _)| **w);
        for (_, v) in workers {
            summary::add_counters(&mut total, v);
        }
    }
    total
}

/// Output paths and Parquet options for a run.
pub(crate) fn output_config(inputs: &Inputs, with_vqa: bool, save_prompts: bool) -> OutputConfig {
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
            segment_queries: inputs.segment_queries,
            per_query_pool,
            with_vqa,
            with_prompts: with_vqa && save_prompts,
            shared_pool,
            ..Default::default()
        },
        ..Default::default()
    }
}
