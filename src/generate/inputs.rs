//! Loading and validating every input of a run before the dataflow starts,
//! so bad input fails fast with the file and the place named.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use leverflow_operators::accuracy::{load_questions_annotations, AccuracyError, ScoringIndex};
use leverflow_operators::candidates::CandidateArgs;
use leverflow_operators::dataset::snapshot::{self, ParsedSplit, SNAPSHOT_FILE};
use leverflow_operators::dataset::{DatasetConfig, DatasetKind, DatasetScoringError, VqaDataset};
use leverflow_operators::pointer_selector::{DefaultBackend, PointerSelector, PreparedPool};
use leverflow_operators::reward::{CorrectnessMode, RewardConfig, RewardMode};
use leverflow_operators::sinks::OutputFormat;
use leverflow_operators::source::{load_candidate_indices, load_sampler_cache};
use leverflow_operators::state::FileDigests;
use leverflow_operators::tensor_io::{load_matrix, Matrix};
use leverflow_schemas::PointerLayout;

use crate::cli::GenerateArgs;

/// The backend the pointer selector runs on.
pub type Sel = DefaultBackend;

/// Where a query's candidates come from.
pub enum Pools {
    /// One pool for every query: the whole candidate matrix.
    Shared {
        /// The prepared pool (pool-only work done once).
        pool: Arc<PreparedPool<Sel>>,
        /// Dataset index of each pool position.
        indices: Arc<Vec<u64>>,
        /// Pool position of each dataset index present in the pool.
        position_of: Arc<HashMap<u64, usize>>,
    },
    /// Per-query pools (`--sampler_cache`): candidate embedding row i is
    /// dataset index i.
    PerQuery {
        /// Pool (dataset indices) of each query.
        pools: Arc<BTreeMap<u64, Vec<u64>>>,
    },
}

/// Everything a run reads, loaded once and shared by all workers.
pub struct Inputs {
    /// The training split (queries and examples).
    pub dataset: Arc<VqaDataset>,
    /// Official scoring indices: train first, then validation.
    pub scoring: Vec<(&'static str, Arc<ScoringIndex>)>,
    /// Query embeddings (row = dataset index).
    pub query_emb: Arc<Matrix>,
    /// Candidate embeddings.
    pub cand_emb: Arc<Matrix>,
    /// The SFT pointer selector.
    pub model: Arc<PointerSelector<Sel>>,
    /// Candidate pools.
    pub pools: Pools,
    /// Pointer layout of the JSON output.
    pub layout: PointerLayout,
    /// Candidate generation settings.
    pub cand_args: CandidateArgs,
    /// Reward settings.
    pub reward: RewardConfig,
    /// Output formats.
    pub formats: Vec<OutputFormat>,
    /// JSON output path.
    pub output_path: PathBuf,
    /// Parquet output path.
    pub parquet_path: PathBuf,
    /// Strict evaluation.
    pub strict: bool,
    /// SHA-256 of each input file, for `_meta`.
    pub hashes: BTreeMap<String, String>,
    /// Digests of input files (remembered across runs by file identity):
    /// every file hash of the run goes through it.
    pub digests: Arc<FileDigests>,
    /// `--query_emb`, for messages.
    pub query_emb_path: PathBuf,
    /// `--beam_data`, for messages.
    pub beam_path: PathBuf,
    /// `--segment_queries`: queries per output segment.
    pub segment_queries: u64,
    /// How the training split was read.
    pub split: SplitSource,
}

/// How the training split was read: parsed from its files, or restored from
/// the state directory's snapshot of an earlier parse
/// (`leverflow_operators::dataset::snapshot`).
#[derive(Debug, Clone)]
pub struct SplitSource {
    /// The split's files and settings.
    pub cfg: DatasetConfig,
    /// Whether the split's scoring index is part of the parse.
    pub with_scoring: bool,
    /// Restored from the snapshot (then there is nothing to write).
    pub from_snapshot: bool,
}

impl SplitSource {
    /// The snapshot key of this split, given each file's SHA-256 (`None`
    /// when `digest` has none for one of the files).
    fn key_with(
        &self,
        digest: impl Fn(&Path) -> Option<String>,
    ) -> Option<leverflow_operators::state::Key> {
        let q = match &self.cfg.questions {
            Some(p) => Some(digest(p)?),
            None => None,
        };
        let a = digest(&self.cfg.annotations)?;
        Some(snapshot::snapshot_key(
            &self.cfg,
            self.with_scoring,
            q.as_deref(),
            &a,
        ))
    }
}

/// Writes the snapshot of the split `inputs` parsed into `state_dir` (in the
/// background: a first run does not wait for it, see [`SnapshotWriter`]).
/// Nothing when the split came from the snapshot.
pub fn write_split_snapshot(inputs: &Arc<Inputs>, state_dir: &Path) -> SnapshotWriter {
    if inputs.split.from_snapshot {
        return SnapshotWriter(None);
    }
    let inputs = Arc::clone(inputs);
    let path = state_dir.join(SNAPSHOT_FILE);
    leverflow_operators::sinks::AtomicFile::remove_stale_temps(&path);
    SnapshotWriter(Some(std::thread::spawn(move || {
        let split = &inputs.split;
        let key = split
            .key_with(|p| inputs.digests.sha256(p).ok())
            .context("a file of the split could not be hashed");
        let index = split
            .with_scoring
            .then(|| inputs.scoring.iter().find(|(name, _)| *name == "train"))
            .flatten()
            .map(|(_, index)| &**index);
        let written = key.and_then(|key| {
            snapshot::write_snapshot(&path, &key, &inputs.dataset, index).map_err(Into::into)
        });
        match written {
            Ok(()) => tracing::debug!(path = %path.display(), "dataset snapshot written"),
            // A cache: the next run parses the files instead.
            Err(e) => tracing::warn!("dataset snapshot not written: {e:#}"),
        }
    })))
}

/// The background write of a dataset snapshot; dropping it waits for the
/// write to finish, so the process never exits with half of one (which the
/// temporary name would hide anyway).
pub struct SnapshotWriter(Option<std::thread::JoinHandle<()>>);

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

fn required<'a>(value: &'a Option<PathBuf>, flag: &str) -> Result<&'a Path> {
    value
        .as_deref()
        .with_context(|| format!("missing --{flag} (see `leverflow generate --help`)"))
}

/// Checks the arguments that do not need any file.
pub fn validate_args(args: &GenerateArgs) -> Result<()> {
    if let Some(t) = args.temps.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        bail!("--temps: every temperature must be > 0, got {t}");
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.shot_num == Some(0) {
        bail!("--shot_num must be at least 1");
    }
    if !matches!(args.output_mode.as_str(), "full" | "delta") {
        bail!("--output_mode {}: expected full or delta", args.output_mode);
    }
    if !matches!(args.on_missing_image.as_str(), "error" | "skip") {
        bail!(
            "--on_missing_image {}: expected error or skip",
            args.on_missing_image
        );
    }
    Ok(())
}

/// Loads and cross-checks every input. `state_dir`: the state directory of
/// an earlier run, whose dataset snapshot is used when it matches.
pub fn load(
    args: &GenerateArgs,
    with_vqa: bool,
    digests: Arc<FileDigests>,
    state_dir: Option<&Path>,
) -> Result<Inputs> {
    validate_args(args)?;
    let formats = OutputFormat::parse_list(&args.format).map_err(anyhow::Error::msg)?;
    let output_path = required(&args.output_path, "output_path")?.to_path_buf();
    let parquet_path = args
        .parquet_path
        .clone()
        .unwrap_or_else(|| output_path.with_extension("parquet"));
    let sft = required(&args.sft_ckpt, "sft_ckpt")?;
    let beam = required(&args.beam_data, "beam_data")?;
    let query_emb_path = required(&args.query_emb, "query_emb")?;
    let cand_emb_path = required(&args.cand_emb, "cand_emb")?;

    let hash_inputs = || -> Result<BTreeMap<String, String>> {
        let mut hashes = BTreeMap::new();
        for (name, path) in [
            ("sft_ckpt", Some(sft)),
            ("beam_data", Some(beam)),
            ("query_emb", Some(query_emb_path)),
            ("cand_emb", Some(cand_emb_path)),
            ("candidate_indices", args.candidate_indices.as_deref()),
            ("sampler_cache", args.sampler_cache.as_deref()),
            ("train_ques_path", args.train_ques_path.as_deref()),
            ("train_ann_path", args.train_ann_path.as_deref()),
        ] {
            if let Some(p) = path {
                hashes.insert(name.to_string(), digests.sha256(p)?);
            }
        }
        Ok(hashes)
    };
    // The input files are hashed, and the validation scoring index loaded,
    // on threads of their own while the training split is parsed (the
    // dataset and its scoring index from one parse). Errors are reported in
    // the order of the steps: hashes, dataset, scoring.
    let (hashes, loaded, val) = std::thread::scope(|s| {
        let hashing = s.spawn(hash_inputs);
        let val = s.spawn(|| load_val_scoring(args, with_vqa));
        let loaded = load_dataset(args, with_vqa, &digests, state_dir);
        let hashes = join(hashing);
        (hashes, loaded, join(val))
    });
    let hashes = hashes?;
    let ((dataset, train_index), split) = loaded?;
    let dataset = Arc::new(dataset);
    let scoring = load_scoring(args, with_vqa, train_index, val)?;
    tracing::debug!("dataset, scoring indices and input digests loaded");
    let strict = !args.no_strict_eval;
    if with_vqa && strict && scoring.is_empty() {
        bail!("strict evaluation needs official annotation files: pass --train_ques_path and --train_ann_path (or --val_*), or --no_strict_eval to allow the fallback match");
    }

    let query_emb = Arc::new(load_matrix(query_emb_path)?);
    let cand_emb = Arc::new(load_matrix(cand_emb_path)?);
    let device = Default::default();
    let model = PointerSelector::<Sel>::load(sft, args.num_heads, &device)?;
    let d_model = model.d_model();
    for (what, path, m) in [
        ("query", query_emb_path, &query_emb),
        ("candidate", cand_emb_path, &cand_emb),
    ] {
        if m.cols != d_model {
            bail!(
                "{}: {what} embeddings have dimension {}, but the checkpoint {} has d_model {d_model}",
                path.display(),
                m.cols,
                sft.display()
            );
        }
    }

    tracing::debug!("embeddings and checkpoint loaded");
    let (pools, layout) = match &args.sampler_cache {
        Some(path) => {
            let cache = load_sampler_cache(path)?;
            for (q, pool) in &cache {
                if let Some(bad) = pool.iter().find(|&&id| id as usize >= cand_emb.rows) {
                    bail!(
                        "{}: query {q}: candidate id {bad} is outside the candidate embeddings ({} rows, {})",
                        path.display(),
                        cand_emb.rows,
                        cand_emb_path.display()
                    );
                }
            }
            (
                Pools::PerQuery {
                    pools: Arc::new(cache),
                },
                PointerLayout::PerQueryPool,
            )
        }
        None => {
            let indices: Vec<u64> = match &args.candidate_indices {
                Some(path) => {
                    let v = load_candidate_indices(path)?;
                    if v.len() != cand_emb.rows {
                        bail!(
                            "{}: {} indices for {} candidate embedding rows ({})",
                            path.display(),
                            v.len(),
                            cand_emb.rows,
                            cand_emb_path.display()
                        );
                    }
                    v
                }
                None => (0..cand_emb.rows as u64).collect(),
            };
            let mut position_of = HashMap::with_capacity(indices.len());
            for (pos, &idx) in indices.iter().enumerate() {
                if position_of.insert(idx, pos).is_some() {
                    bail!("candidate indices: dataset index {idx} appears twice (position {pos})");
                }
                if idx as usize >= dataset.len() {
                    bail!(
                        "candidate position {pos} is dataset index {idx}, outside the dataset ({} items)",
                        dataset.len()
                    );
                }
            }
            let positions_are_indices = indices.iter().enumerate().all(|(p, &i)| p as u64 == i);
            let pool = model.prepare_pool(&cand_emb)?;
            (
                Pools::Shared {
                    pool: Arc::new(pool),
                    indices: Arc::new(indices),
                    position_of: Arc::new(position_of),
                },
                PointerLayout::SharedPool {
                    positions_are_indices,
                },
            )
        }
    };

    let cand_args = CandidateArgs {
        num_beams: args.num_beams,
        temps: args.temps.clone(),
        num_samples_per_temp: args.num_samples_per_temp,
        num_random: args.num_random,
        num_retrieval: args.num_retrieval,
        shot_num: args.shot_num.unwrap_or(2),
        seed: args.seed,
    };
    // Settings that only depend on the pool size fail before any work.
    match &pools {
        Pools::Shared { indices, .. } => cand_args
            .validate(indices.len(), 0)
            .map_err(|e| anyhow::anyhow!("{e} (--cand_emb {})", cand_emb_path.display()))?,
        Pools::PerQuery { pools } => {
            if let Some((q, pool)) = pools
                .iter()
                .find(|(_, p)| cand_args.validate(p.len(), 1).is_err())
            {
                cand_args
                    .validate(pool.len(), 1)
                    .map_err(|e| anyhow::anyhow!("{e} (pool of query {q} in the sampler cache)"))?;
            }
        }
    }
    let reward = reward_config(args)?;
    tracing::debug!("candidate pools ready");
    Ok(Inputs {
        dataset,
        scoring,
        query_emb,
        cand_emb,
        model: Arc::new(model),
        pools,
        layout,
        cand_args,
        reward,
        formats,
        output_path,
        parquet_path,
        strict,
        hashes,
        digests,
        query_emb_path: query_emb_path.to_path_buf(),
        beam_path: beam.to_path_buf(),
        segment_queries: args.segment_queries,
        split,
    })
}

fn dataset_kind(name: &str) -> Result<DatasetKind> {
    match name {
        "okvqa_local" | "okvqa" => Ok(DatasetKind::OkvqaLocal),
        "vqav2_local" | "vqav2" => Ok(DatasetKind::Vqav2Local),
        other => bail!("--dataset {other}: expected okvqa_local or vqav2_local"),
    }
}

/// Loads the training split and, when VQA answers are scored with official
/// files (`--train_ques_path` and `--train_ann_path`), their scoring index
/// from the same parse of those files.
fn load_dataset(
    args: &GenerateArgs,
    with_vqa: bool,
    digests: &FileDigests,
    state_dir: Option<&Path>,
) -> Result<(ParsedSplit, SplitSource)> {
    let kind = dataset_kind(&args.dataset)?;
    let (questions, annotations) = match (&args.train_ques_path, &args.train_ann_path, &args.train_path) {
        (q, Some(a), _) => (q.clone(), a.clone()),
        (None, None, Some(merged)) => (None, merged.clone()),
        _ => bail!("the training split is needed for queries and examples: pass --train_ques_path and --train_ann_path (official VQA files) or --train_path (merged vqav2-style file)"),
    };
    let image_root = args
        .train_coco_root
        .clone()
        .context("missing --train_coco_root (the directory of the training images)")?;
    let cfg = DatasetConfig {
        kind,
        questions,
        annotations,
        image_root,
        image_pattern: args.image_pattern.clone(),
    };
    // Here the split's files are exactly the scoring files of `load_scoring`.
    let with_scoring = with_vqa && args.train_ques_path.is_some() && args.train_ann_path.is_some();
    let mut split = SplitSource {
        cfg,
        with_scoring,
        from_snapshot: false,
    };
    // Only remembered digests: reading the files to key the snapshot would
    // cost what the snapshot saves.
    let key = state_dir.map(|dir| (dir, split.key_with(|p| digests.remembered(p))));
    if let Some((_, None)) = key {
        tracing::debug!(
            "dataset snapshot not used: the split's files changed since they were hashed"
        );
    }
    if let Some((dir, Some(key))) = key {
        let path = dir.join(SNAPSHOT_FILE);
        let started = std::time::Instant::now();
        match snapshot::read_snapshot(&path, &key) {
            Ok(parsed) if parsed.1.is_some() == with_scoring => {
                let secs = started.elapsed().as_secs_f64();
                tracing::debug!(secs, "training split restored from the dataset snapshot");
                split.from_snapshot = true;
                return Ok((parsed, split));
            }
            Ok(_) => tracing::debug!("dataset snapshot without the scoring index: not used"),
            Err(miss) => tracing::debug!(?miss, "dataset snapshot not used"),
        }
    }
    let parsed = if with_scoring {
        VqaDataset::load_with_scoring(&split.cfg).map_err(|e| match e {
            DatasetScoringError::Dataset(e) => anyhow::Error::from(e),
            DatasetScoringError::Scoring(e) => anyhow::Error::from(e),
        })?
    } else {
        (VqaDataset::load(&split.cfg)?, None)
    };
    Ok((parsed, split))
}

/// The result of a scoped thread (its panic goes on in the caller).
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The validation scoring index (`--val_ques_path` and `--val_ann_path`),
/// when VQA answers are scored.
fn load_val_scoring(
    args: &GenerateArgs,
    with_vqa: bool,
) -> Option<Result<ScoringIndex, AccuracyError>> {
    match (&args.val_ques_path, &args.val_ann_path) {
        (Some(q), Some(a)) if with_vqa => Some(load_questions_annotations(q, a)),
        _ => None,
    }
}

/// The official scoring indices, train first: `train` is the index
/// [`load_dataset`] built with the split (loaded here when it did not), `val`
/// the result of [`load_val_scoring`].
fn load_scoring(
    args: &GenerateArgs,
    with_vqa: bool,
    train: Option<ScoringIndex>,
    val: Option<Result<ScoringIndex, AccuracyError>>,
) -> Result<Vec<(&'static str, Arc<ScoringIndex>)>> {
    let mut out = Vec::new();
    if !with_vqa {
        return Ok(out);
    }
    if let (Some(q), Some(a)) = (&args.train_ques_path, &args.train_ann_path) {
        let index = match train {
            Some(index) => index,
            None => load_questions_annotations(q, a)?,
        };
        out.push(("train", Arc::new(index)));
    }
    if let Some(val) = val {
        out.push(("val", Arc::new(val?)));
    }
    Ok(out)
}

fn reward_config(args: &GenerateArgs) -> Result<RewardConfig> {
    let mode: RewardMode = args
        .reward_mode
        .parse()
        .map_err(|e| anyhow::anyhow!("--reward_mode: {e}"))?;
    let correctness_mode: CorrectnessMode = args
        .correctness_mode
        .parse()
        .map_err(|e| anyhow::anyhow!("--correctness_mode: {e}"))?;
    let mut cfg = RewardConfig {
        mode,
        hard_weight: args.hard_weight,
        soft_weight: args.soft_weight,
        alpha: args.reward_alpha,
        beta: args.reward_beta,
        correctness_mode,
        use_logprob: args.use_logprob,
        ..RewardConfig::default()
    };
    if let Some(w) = args.rel_weight {
        cfg.rel_weight = w;
    }
    Ok(cfg)
}
