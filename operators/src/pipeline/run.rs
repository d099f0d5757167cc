//! A run from start to end:
//!
//! 1. load and validate every input and the VQA backend
//!    ([`super::load`], [`crate::backends`]);
//! 2. open the state store and run the dataflow ([`crate::dataflow::rl_graph`]
//!    over the [`crate::stages`]) on the workers of every process: worker 0
//!    of a process reads the previous run's input keys and the beam data;
//!    records are exchanged by query index; only queries without a stored
//!    record for their input key are computed; finished queries are
//!    committed to the store in batches (a killed run resumes from there);
//! 3. write the outputs from the store in ascending query order
//!    ([`crate::outputs::writer`]; atomic, so a failed run leaves nothing
//!    at the output path), then mark the run complete in the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leverflow_schemas::Timings;

use super::cluster::{finish_cluster, ProcessTail};
use super::error::PipelineError;
use super::load::{self, Loaded};
use super::summary::{build_meta, classify, sum_stats, Classified, RunSummary};
use super::write::{write_delta, write_outputs, Prefetch};
use super::Pipeline;
use crate::backends::{self, BackendContext, Device, LoadedBackend};
use crate::config::{OutputFormat, OutputMode, RunConfig};
use crate::dataflow::{
    execute_cluster, gather_at_worker_zero, interleave_previous, rl_graph, run_worker,
    ClusterConfig, ClusterTimeouts, DriverConfig, ErrorSlot, InputChange, RecordStages, SinkFn,
    SourceItem, StageError, Stages, Then, VqaStages,
};
use crate::outputs::{segment_of, DeltaPaths, OutputConfig, OutputLock, ParquetOptions};
use crate::source::{count_records, BeamReader};
use crate::stages::context::Job;
use crate::stages::vqa::BackendStats;
use crate::stages::{self, Counters, Inputs, Pools, QueryWork, StageSettings};
use crate::state::{
    CandidateSettings, FileDigests, Key, QueryUpdate, RecordSettings, RunKeys, StateStore,
    StoreWriter, VqaSettings, WriterHandle, STATE_FILE,
};

/// Queries per plan / candidates batch.
const CANDIDATE_BATCH: usize = 64;

/// Everything a run has loaded before its dataflow starts.
pub(super) struct Prepared {
    /// The processes and workers.
    pub cluster: ClusterConfig,
    /// The loaded inputs.
    pub loaded: Loaded,
    /// The backend (`generate` only).
    pub backend: Option<LoadedBackend>,
    /// The state store (this process's).
    pub store: Arc<StateStore>,
    /// JSON output path.
    pub output_path: PathBuf,
    /// Parquet output path.
    pub parquet_path: PathBuf,
    /// Seconds spent loading.
    pub load_s: f64,
    /// The beam records the run will read (for progress).
    pub queries_total: u64,
    /// The background write of the dataset snapshot (joined when dropped).
    pub snapshot: Option<load::SnapshotWriter>,
    /// The locks on the output paths (released when dropped).
    pub _locks: Vec<OutputLock>,
}

impl Prepared {
    /// The backend's identity (`null` without VQA).
    pub fn model_identity(&self) -> serde_json::Value {
        self.backend
            .as_ref()
            .map_or(serde_json::Value::Null, |b| b.identity.clone())
    }

    /// What `_meta.vqa_model` records (`null` without VQA): the identity,
    /// or more where the backend records more (a server's URL).
    pub fn model_record(&self) -> serde_json::Value {
        self.backend.as_ref().map_or(serde_json::Value::Null, |b| {
            b.recorded.clone().unwrap_or_else(|| b.identity.clone())
        })
    }

    /// The inputs the stages read.
    pub fn inputs(&self) -> &Arc<Inputs> {
        &self.loaded.inputs
    }
}

/// The state shared by every worker of the process while the dataflow runs.
pub(super) struct Shared {
    /// Counters of this process.
    pub counters: Arc<Counters>,
    /// The planning stage's (query, input key) list of this process.
    pub current: Arc<Mutex<Vec<(u64, Key)>>>,
    /// The differential comparison's updates of this process's queries.
    pub changes: Arc<Mutex<HashMap<(u64, InputChange), isize>>>,
    /// Backend counters of this process's workers.
    pub backend_stats: BackendStats,
    /// The key each query computed in this run was stored under (its input
    /// key, or the provisional key of a record with failed prompts).
    pub stored_keys: StoredKeys,
}

/// Query → the key its record was stored under in this run.
pub(super) type StoredKeys = Arc<Mutex<HashMap<u64, Key>>>;

impl Shared {
    fn new() -> Self {
        Self {
            counters: Arc::default(),
            current: Arc::default(),
            changes: Arc::default(),
            backend_stats: Arc::default(),
            stored_keys: Arc::default(),
        }
    }
}

/// Runs a pipeline (see the module docs).
pub(super) fn run(p: &Pipeline) -> Result<RunSummary, PipelineError> {
    let started = Instant::now();
    let cfg = &p.config;
    let prep = prepare(p)?;
    let shared = Shared::new();
    shared
        .counters
        .queries_total
        .store(prep.queries_total, std::sync::atomic::Ordering::Relaxed);
    let multi = prep.cluster.is_multi_process();
    let inputs = Arc::clone(prep.inputs());
    let keys = Arc::new(run_keys(cfg, p.job, &inputs, &prep.model_identity())?);
    let out_cfg = output_config(cfg, &prep, p.job == Job::Generate);
    // A rerun copies the previous JSON output's unchanged segments while
    // the dataflow runs (single process; a cluster writes part files).
    let prefetch = if multi {
        None
    } else {
        let seen = Arc::clone(&shared.changes);
        let per_segment = cfg.segment_queries;
        Prefetch::start(&prep.store, &out_cfg, move |segment| {
            seen.lock().map_or(true, |m| {
                m.iter()
                    .any(|((q, _), diff)| *diff != 0 && segment_of(*q, per_segment) == segment)
            })
        })?
    };
    let dataflow_started = Instant::now();
    let job = match p.job {
        Job::Generate => "generate",
        Job::Candidates => "candidates",
    };
    p.progress.started(Arc::clone(&shared.counters), job);
    let writer = StoreWriter::start(Arc::clone(&prep.store), 2048, Duration::from_secs(1));
    let reports: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let results = execute(p, &prep, &shared, &keys, &writer, &reports);
    p.progress.finished();
    // Work finished before an error is kept: a rerun does not redo it.
    let committed = writer.finish();
    let mut timings = Timings {
        load_s: prep.load_s,
        dataflow_s: dataflow_started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    if multi {
        for r in results? {
            r?;
        }
        committed.map_err(|e| PipelineError::Process(e.to_string()))?;
        timings.total_s = started.elapsed().as_secs_f64();
        return finish_cluster(
            cfg,
            &prep,
            &reports,
            timings,
            p.job == Job::Generate,
            &*p.progress,
        );
    }
    if let Err(e) = &committed {
        // The writer's error explains a sink that could not send.
        return Err(PipelineError::Process(e.to_string()));
    }
    for r in results? {
        r?;
    }
    let writer_stats = committed.map_err(|e| PipelineError::Process(e.to_string()))?;
    timings.store_s = writer_stats.commit_s;
    tracing::debug!(dataflow_s = timings.dataflow_s, "dataflow finished");
    let classified = classify(&inputs, &shared)?;
    p.progress.phase("writing outputs");
    let summary = write_all(
        p, &prep, &shared, &out_cfg, classified, prefetch, timings, started,
    )?;
    release(prep, inputs);
    Ok(summary)
}

/// Ends a run: waits for the snapshot write, closes the store, and frees
/// the loaded inputs on a detached thread (the dataset and its scoring
/// index are millions of small allocations, ~0.1 s that a finishing run
/// need not wait for; when the process exits first the OS reclaims them).
fn release(prep: Prepared, inputs: Arc<Inputs>) {
    let Prepared {
        loaded, snapshot, ..
    } = prep;
    drop(snapshot);
    std::thread::spawn(move || drop((loaded, inputs)));
}

/// Loads everything, opens the store.
fn prepare(p: &Pipeline) -> Result<Prepared, PipelineError> {
    let started = Instant::now();
    let cfg = &p.config;
    cfg.validate()?;
    let with_vqa = p.job == Job::Generate;
    let cluster = ClusterConfig::from_flags(
        cfg.processes,
        cfg.process_index,
        cfg.hostfile.as_deref(),
        cfg.workers,
    )?
    .with_secret_from(cfg.cluster_secret_file.as_deref())?;
    let devices = worker_devices(cfg, &cluster)?;
    let output_path = load::required(&cfg.output_path, "output_path")?.to_path_buf();
    let parquet_path = cfg
        .parquet_path
        .clone()
        .unwrap_or_else(|| output_path.with_extension("parquet"));
    super::outputs_check::check_output_paths(cfg, &output_path, &parquet_path)?;
    // One run per output, before anything loads: a second run on the same
    // outputs fails here (of a multi-process run, process 0 holds them: it
    // writes the JSON and the manifest).
    let holds_outputs = !cluster.is_multi_process() || cluster.process_index == 0;
    let locks = match holds_outputs {
        true => OutputLock::acquire_all([output_path.as_path(), parquet_path.as_path()])?,
        false => Vec::new(),
    };
    if cluster.is_multi_process() && cfg.output_mode == OutputMode::Delta {
        return Err(crate::config::ConfigError::new(
            "output_mode",
            "delta needs a single-process run (the part files of a multi-process run are the delta's granularity already)",
        )
        .into());
    }
    // Each process keeps its own store (its queries are routed to it).
    let mut state_dir = state_dir(cfg, &output_path);
    if cluster.is_multi_process() {
        state_dir = state_dir.join(format!("process-{}", cluster.process_index));
    }
    // The store of an earlier run is opened before anything loads: it
    // remembers the digests of input files, which need not be read again
    // while they are unchanged. A first run creates its store only once its
    // inputs have loaded (bad inputs leave nothing behind).
    let earlier_store = match state_dir.join(STATE_FILE).is_file() {
        true => Some(StateStore::open(&state_dir)?),
        false => None,
    };
    if let Some(v) = earlier_store.as_ref().and_then(StateStore::migrated_from) {
        p.progress.phase(&format!(
            "the state store {} was written by an older leverflow (format {v}): its results are keyed differently and were dropped; this run recomputes them once",
            state_dir.display()
        ));
    }
    let digests = Arc::new(match &earlier_store {
        Some(store) => store.file_digests()?,
        None => FileDigests::default(),
    });
    // The VQA backend (model weights or a replay file) loads on its own
    // thread while the dataset, embeddings and checkpoint load here.
    let backend = with_vqa.then(|| {
        p.progress.phase("loading the VQA backend");
        let (cfg, digests, devices) = (cfg.clone(), Arc::clone(&digests), devices.clone());
        std::thread::spawn(move || {
            backends::load(&BackendContext {
                config: &cfg,
                devices: &devices,
                digests: &digests,
            })
        })
    });
    // Counting the beam records (for progress) reads the whole file: do it
    // while the inputs load.
    let counting = cfg
        .beam_data
        .clone()
        .map(|p| std::thread::spawn(move || count_records(&p)));
    p.progress
        .phase("loading inputs (dataset, embeddings, checkpoint)");
    let loaded = load::load(
        cfg,
        with_vqa,
        Arc::clone(&digests),
        earlier_store.as_ref().map(|_| state_dir.as_path()),
    );
    let panicked = |what: &str| PipelineError::Internal(format!("{what} panicked"));
    let backend = match backend {
        Some(h) => Some(h.join().map_err(|_| panicked("loading the VQA backend"))?),
        None => None,
    };
    let loaded = loaded?;
    let backend = backend.transpose()?;
    let load_s = started.elapsed().as_secs_f64();
    tracing::debug!(load_s, "inputs loaded");
    let total = counting
        .ok_or_else(|| crate::config::ConfigError::new("beam_data", "missing"))?
        .join()
        .map_err(|_| panicked("counting the beam records"))??;
    let (lo, hi) = crate::source::slice_bounds(cfg.start_idx as i64, cfg.end_idx, total);
    // The state store: finished work of earlier runs, and the lock that
    // keeps two runs off the same state.
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
    let prep = Prepared {
        cluster,
        loaded,
        backend,
        store: Arc::new(store),
        output_path,
        parquet_path,
        load_s,
        queries_total: hi.saturating_sub(lo),
        snapshot: None,
        _locks: locks,
    };
    let mut prep = prep;
    // Written in the background; joined when the run ends.
    prep.snapshot = Some(load::write_split_snapshot(&prep.loaded, &state_dir));
    if prep.cluster.is_multi_process() && prep.cluster.process_index == 0 {
        crate::outputs::prepare_dataset_dir(&prep.parquet_path)?;
    }
    if holds_outputs {
        for target in output_targets(cfg, &prep) {
            crate::outputs::AtomicFile::remove_stale_temps(&target);
        }
    }
    Ok(prep)
}

/// Every output path a run writes (for stale temporary files).
fn output_targets(cfg: &RunConfig, prep: &Prepared) -> Vec<PathBuf> {
    let mut out = vec![prep.output_path.clone(), prep.parquet_path.clone()];
    if cfg.output_mode == OutputMode::Delta {
        let d = DeltaPaths::beside(&prep.output_path, &prep.parquet_path);
        out.extend([d.parquet, d.retracted]);
    }
    out
}

/// The device of each local worker (`devices`, round robin, else `device`).
fn worker_devices(cfg: &RunConfig, cluster: &ClusterConfig) -> Result<Vec<Device>, PipelineError> {
    let (setting, spec) = match &cfg.devices {
        Some(spec) => ("devices", spec.as_str()),
        None => ("device", cfg.device.as_str()),
    };
    let list = backends::device::parse_devices(spec)
        .map_err(|e| crate::config::ConfigError::new(setting, e.to_string()))?;
    Ok(backends::device::devices_for_workers(
        &list,
        cluster.workers,
        cluster.process_index,
    ))
}

/// Default state directory: `<output_path>.state/`.
pub fn state_dir(cfg: &RunConfig, output_path: &Path) -> PathBuf {
    cfg.state_dir.clone().unwrap_or_else(|| {
        let mut s = output_path.as_os_str().to_owned();
        s.push(".state");
        PathBuf::from(s)
    })
}

/// The run-wide content keys.
fn run_keys(
    cfg: &RunConfig,
    job: Job,
    inputs: &Inputs,
    model_identity: &serde_json::Value,
) -> Result<RunKeys, PipelineError> {
    let hash = |name: &str| inputs.hashes.get(name).map_or("", String::as_str);
    let mut extra = Vec::with_capacity(3);
    for p in [&cfg.train_path, &cfg.val_ques_path, &cfg.val_ann_path] {
        extra.push(match p {
            Some(p) => inputs.digests.sha256(p)?,
            None => String::new(),
        });
    }
    let reward = inputs.reward;
    let mut stamps = crate::state::ImageStamps::default();
    let shared_pool: Vec<&crate::dataset::VqaItem> = match &inputs.pools {
        Pools::Shared { .. } if !inputs.with_dataset => Vec::new(),
        Pools::Shared { indices, .. } => indices
            .iter()
            .map(|&i| inputs.dataset.get(i))
            .collect::<Result<_, _>>()?,
        Pools::PerQuery { .. } => Vec::new(),
    };
    let on_missing_image = match cfg.on_missing_image {
        crate::config::MissingImagePolicy::Error => "error",
        crate::config::MissingImagePolicy::Skip => "skip",
    };
    Ok(RunKeys::new(
        &CandidateSettings {
            file_hashes: [
                hash("sft_ckpt"),
                hash("cand_emb"),
                hash("candidate_indices"),
                hash("sampler_cache"),
            ],
            num_heads: cfg.num_heads,
            args: &inputs.cand_args,
            include_source_beams: cfg.include_source_beams,
        },
        &VqaSettings {
            model_identity,
            system_prompt: cfg.system_prompt(),
            gt_prob: cfg.gt_prob,
        },
        &RecordSettings {
            job: match job {
                Job::Generate => "generate",
                Job::Candidates => "candidates",
            },
            reward: &reward,
            layout: inputs.layout,
            save_prompts: cfg.save_prompts,
            strict: inputs.strict,
            on_missing_image,
            annotation_hashes: [
                hash("train_ques_path"),
                hash("train_ann_path"),
                &extra[0],
                &extra[1],
                &extra[2],
            ],
        },
        shared_pool,
        (job == Job::Generate).then_some(&mut stamps),
    ))
}

/// Output paths and Parquet options of a run.
pub(super) fn output_config(cfg: &RunConfig, prep: &Prepared, with_vqa: bool) -> OutputConfig {
    let inputs = prep.inputs();
    let shared_pool = match &inputs.pools {
        Pools::Shared { indices, .. } => Some(indices.as_ref().clone()),
        Pools::PerQuery { .. } => None,
    };
    OutputConfig {
        json: cfg
            .format
            .contains(OutputFormat::Json)
            .then(|| prep.output_path.clone()),
        parquet: cfg
            .format
            .contains(OutputFormat::Parquet)
            .then(|| prep.parquet_path.clone()),
        parquet_options: ParquetOptions {
            with_dataset: inputs.with_dataset,
            segment_queries: cfg.segment_queries,
            per_query_pool: shared_pool.is_none(),
            with_vqa,
            with_prompts: with_vqa && cfg.save_prompts,
            shared_pool,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs the dataflow on this process's workers; each worker's result.
#[allow(clippy::type_complexity)]
fn execute(
    p: &Pipeline,
    prep: &Prepared,
    shared: &Shared,
    keys: &Arc<RunKeys>,
    writer: &StoreWriter,
    reports: &Arc<Mutex<Vec<Vec<u8>>>>,
) -> Result<Vec<Result<(), Arc<StageError>>>, PipelineError> {
    let cfg = &p.config;
    let cluster = &prep.cluster;
    let workers = cluster.workers as u64;
    let root = (cluster.process_index * cluster.workers) as u64;
    let peers = cluster.total_workers() as u64;
    let settings = StageSettings::of(cfg, p.job);
    let driver = DriverConfig {
        source_batch: (cfg.batch_size * 8).clamp(64, 1024),
        max_source_batch: 4096,
        max_inflight: 2 * workers + 2,
        sink_worker: root,
    };
    let beam_path = load::required(&cfg.beam_data, "beam_data")?.to_path_buf();
    let (start_idx, end_idx) = (cfg.start_idx as i64, cfg.end_idx);
    let previous = Arc::new(prep.store.previous_inputs()?);
    let factory = prep.backend.as_ref().map(|b| Arc::clone(&b.factory));
    let tail = cluster.is_multi_process().then(|| {
        Arc::new(ProcessTail {
            cfg: cfg.clone(),
            output: output_config(cfg, prep, settings.with_vqa()),
            parquet_path: prep.parquet_path.clone(),
            inputs: Arc::clone(prep.inputs()),
            store: Arc::clone(&prep.store),
            shared: Shared {
                counters: Arc::clone(&shared.counters),
                current: Arc::clone(&shared.current),
                changes: Arc::clone(&shared.changes),
                backend_stats: Arc::clone(&shared.backend_stats),
                stored_keys: Arc::clone(&shared.stored_keys),
            },
            process: cluster.process_index,
        })
    });
    let inputs = Arc::clone(prep.inputs());
    let store = Arc::clone(&prep.store);
    let (counters, current, changes, stats) = (
        Arc::clone(&shared.counters),
        Arc::clone(&shared.current),
        Arc::clone(&shared.changes),
        Arc::clone(&shared.backend_stats),
    );
    let keys = Arc::clone(keys);
    let updates = writer.handle();
    let reports = Arc::clone(reports);
    let stored_keys = Arc::clone(&shared.stored_keys);
    let timeouts = ClusterTimeouts {
        connect: Duration::from_secs(cfg.connect_timeout),
        ..Default::default()
    };
    execute_cluster(cluster, &timeouts, move |worker| {
        let errors = ErrorSlot::default();
        let index = worker.index() as u64;
        // One reader per process feeds the queries routed to this
        // process's workers (routing is query index modulo workers).
        let source = (index == root).then(|| {
            let mine = move |q: u64| (q % peers) / workers == root / workers;
            source_items(&beam_path, start_idx, end_idx, &previous, mine)
        });
        let sink = (index == root).then(|| store_sink(updates.clone(), Arc::clone(&stored_keys)));
        let vqa_model = match &factory {
            Some(f) => Some(
                f((index - root) as usize)
                    .map_err(|e| Arc::new(StageError::new("vqa", None, e)))?,
            ),
            None => None,
        };
        let stages = worker_stages(
            &inputs,
            &keys,
            &store,
            &settings,
            vqa_model,
            (&counters, &current, &stats),
            index as usize,
        );
        let changes = Arc::clone(&changes);
        let on_change = move |q, change, diff| {
            if let Ok(mut m) = changes.lock() {
                *m.entry((q, change)).or_insert(0) += diff;
            }
        };
        let e2 = errors.clone();
        let outcome = run_worker(
            worker,
            &driver,
            source,
            |s: &SourceItem<QueryWork>| s.query_index(|w| w.query_index),
            move |stream, probe| rl_graph(stream, stages, on_change, probe, e2),
            sink,
            errors.clone(),
        )
        .map(|_| ());
        match &tail {
            Some(tail) => super::cluster::report_to_process_zero(
                |report, sink| gather_at_worker_zero(worker, report, sink),
                tail,
                (index == root, index == 0),
                outcome.clone(),
                errors.get(),
                updates.clone(),
                &reports,
            ),
            None => outcome,
        }
    })
    .map_err(PipelineError::Process)
}

/// The source of the process's reading worker: the previous run's keys
/// interleaved with this run's beam records routed to this process.
fn source_items(
    beam_path: &Path,
    start_idx: i64,
    end_idx: i64,
    previous: &[(u64, Key)],
    mine: impl Fn(u64) -> bool + 'static,
) -> Box<dyn Iterator<Item = Result<SourceItem<QueryWork>, StageError>>> {
    let source_error = |e: crate::source::SourceError| StageError::new("source", None, e);
    let reader = match BeamReader::open(beam_path).and_then(|r| r.with_range(start_idx, end_idx)) {
        Ok(r) => r,
        Err(e) => return Box::new(std::iter::once(Err(source_error(e)))),
    };
    let work = reader
        .filter(move |r| r.as_ref().map_or(true, |b| mine(b.query_index)))
        .map(move |r| {
            r.map(|b| QueryWork {
                query_index: b.query_index,
                source_beams: b
                    .id_list
                    .iter()
                    .map(|seq| seq[..seq.len().saturating_sub(1)].to_vec())
                    .collect(),
                input_key: [0; 32],
            })
            .map_err(source_error)
        });
    Box::new(interleave_previous(
        previous.to_vec(),
        work,
        |w: &QueryWork| w.query_index,
    ))
}

/// The sink of the process's first worker: every finished query goes to the
/// state store's writer thread, and the key it is stored under is noted.
fn store_sink(updates: Option<WriterHandle>, stored_keys: StoredKeys) -> SinkFn {
    Box::new(move |q: u64, bytes: Vec<u8>| {
        let fail = |e: String| StageError::new("sink", Some(q), e);
        let update = QueryUpdate::decode(&bytes).map_err(fail)?;
        stored_keys
            .lock()
            .map_err(|_| fail("a worker panicked".into()))?
            .insert(q, update.input_key);
        updates
            .as_ref()
            .ok_or_else(|| fail("the state store writer stopped".into()))?
            .send(update)
            .map_err(fail)
    })
}

/// One worker's stages.
#[allow(clippy::type_complexity)]
fn worker_stages(
    inputs: &Arc<Inputs>,
    keys: &Arc<RunKeys>,
    store: &Arc<StateStore>,
    settings: &StageSettings,
    vqa_model: Option<Box<dyn crate::models::VqaModel>>,
    (counters, current, stats): (&Arc<Counters>, &Arc<Mutex<Vec<(u64, Key)>>>, &BackendStats),
    worker: usize,
) -> Stages<QueryWork, stages::QueryCands, stages::QueryAnswered, stages::QueryScored> {
    let plan = stages::plan::plan(
        Arc::clone(inputs),
        Arc::clone(keys),
        Arc::clone(store),
        settings.with_vqa(),
        Arc::clone(current),
        Arc::clone(counters),
    );
    let candidates = stages::candidates::candidates(
        Arc::clone(inputs),
        Arc::clone(keys),
        Arc::clone(store),
        settings.include_source_beams,
        Arc::clone(counters),
    );
    let then = match vqa_model {
        Some(model) => Then::Vqa(VqaStages {
            vqa_batch: settings.batch_size.div_ceil(8).max(1),
            vqa: stages::vqa::vqa(
                Arc::clone(inputs),
                Arc::clone(keys),
                Arc::clone(store),
                model,
                settings.clone(),
                Arc::clone(counters),
                (worker, Arc::clone(stats)),
            ),
            accuracy: stages::accuracy::accuracy(Arc::clone(inputs)),
            reward: stages::reward::reward(
                Arc::clone(inputs),
                settings.save_prompts,
                Arc::clone(counters),
            ),
        }),
        None => Then::Record(RecordStages {
            record: stages::record::candidates_record(Arc::clone(inputs), Arc::clone(counters)),
        }),
    };
    Stages {
        plan,
        candidates,
        batch: CANDIDATE_BATCH,
        then,
    }
}

/// Writes the outputs of a single-process run from the store, completes
/// the run in the store, and returns its summary.
#[allow(clippy::too_many_arguments)]
fn write_all(
    p: &Pipeline,
    prep: &Prepared,
    shared: &Shared,
    out_cfg: &OutputConfig,
    classified: Classified,
    prefetch: Option<Prefetch>,
    mut timings: Timings,
    started: Instant,
) -> Result<RunSummary, PipelineError> {
    let cfg = &p.config;
    let inputs = prep.inputs();
    let Classified {
        current,
        removed,
        delta_rows,
        incremental,
    } = classified;
    let write_started = Instant::now();
    let vqa_calls = Counters::get(&shared.counters.vqa_calls);
    let backend = sum_stats(&shared.backend_stats);
    let identity = prep.model_record();
    let meta = |summary: &crate::outputs::Summary,
                skipped: &[(u64, String)],
                seg: super::write::SegmentCounts| {
        let mut summary = summary.clone();
        summary.vqa_calls = vqa_calls;
        summary.backend = backend.clone();
        summary.incremental = incremental.clone();
        summary.incremental.output_segments_copied = seg.copied as u64;
        summary.incremental.output_segments = seg.total as u64;
        timings.write_s = write_started.elapsed().as_secs_f64();
        timings.total_s = started.elapsed().as_secs_f64();
        build_meta(cfg, inputs, &summary, skipped, &timings, &identity).to_value()
    };
    let written = write_outputs(&prep.store, out_cfg, &current, prefetch, Box::new(meta))?;
    let mut summary = written.summary;
    summary.vqa_calls = vqa_calls;
    summary.backend = backend;
    summary.incremental = incremental;
    summary.incremental.output_segments_copied = written.segments.copied as u64;
    summary.incremental.output_segments = written.segments.total as u64;
    let delta = (cfg.output_mode == OutputMode::Delta)
        .then(|| DeltaPaths::beside(&prep.output_path, &prep.parquet_path));
    if let Some(d) = &delta {
        let meta = build_meta(cfg, inputs, &summary, &written.skipped, &timings, &identity);
        write_delta(
            d,
            &prep.store,
            out_cfg,
            &delta_rows,
            &removed,
            &meta.to_value(),
        )?;
    }
    tracing::debug!("outputs written");
    // Last: this run's input becomes the previous input of the next run.
    prep.store
        .complete_run(&removed, &current, Some(&written.manifest))?;
    tracing::debug!("run completed in the store");
    drop(written.previous);
    tracing::debug!("previous outputs released");
    Ok(RunSummary {
        summary,
        timings,
        with_vqa: p.job == Job::Generate,
        outputs: outputs_written(cfg, prep),
        delta,
        cluster: None,
    })
}

/// The outputs written, by format (JSON first).
pub(super) fn outputs_written(cfg: &RunConfig, prep: &Prepared) -> Vec<(OutputFormat, PathBuf)> {
    cfg.format
        .distinct()
        .into_iter()
        .map(|f| match f {
            OutputFormat::Json => (f, prep.output_path.clone()),
            OutputFormat::Parquet => (f, prep.parquet_path.clone()),
        })
        .collect()
}
