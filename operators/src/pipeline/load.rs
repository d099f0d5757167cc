//! Loading and validating every input of a run before the dataflow starts,
//! so bad input fails fast with the file and the place named.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use leverflow_schemas::PointerLayout;

use super::error::PipelineError;
use crate::accuracy::{load_questions_annotations, AccuracyError, ScoringIndex};
use crate::config::{ConfigError, RunConfig};
use crate::dataset::{DatasetConfig, DatasetKind, DatasetScoringError, VqaDataset};
use crate::models::pointer_selector::PointerSelector;
use crate::source::{load_candidate_indices, load_sampler_cache};
use crate::stages::context::Sel;
use crate::stages::{Inputs, Pools};
use crate::state::snapshot::{self, ParsedSplit, SNAPSHOT_FILE};
use crate::state::FileDigests;
use crate::tensor_io::load_matrix;

/// Inputs that do not fit each other (dimensions, pools, indices).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", .path.display())]
pub struct MismatchError {
    /// The file the mismatch is found in.
    pub path: PathBuf,
    /// What does not fit.
    pub message: String,
}

fn mismatch(path: &Path, message: String) -> PipelineError {
    PipelineError::Mismatch(MismatchError {
        path: path.to_path_buf(),
        message,
    })
}

/// How the training split was read: parsed from its files, or restored from
/// the state directory's snapshot of an earlier parse
/// ([`crate::state::snapshot`]).
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
    pub fn key_with(&self, digest: impl Fn(&Path) -> Option<String>) -> Option<crate::state::Key> {
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

/// A run's loaded inputs: what the stages read, and how the training split
/// was obtained (for its snapshot).
pub struct Loaded {
    /// What the stages read.
    pub inputs: Arc<Inputs>,
    /// How the training split was read.
    pub split: SplitSource,
}

/// Writes the snapshot of the split `loaded` parsed into `state_dir` (in the
/// background: a first run does not wait for it, see [`SnapshotWriter`]).
/// Nothing when the split came from the snapshot.
pub fn write_split_snapshot(loaded: &Loaded, state_dir: &Path) -> SnapshotWriter {
    if loaded.split.from_snapshot {
        return SnapshotWriter(None);
    }
    let inputs = Arc::clone(&loaded.inputs);
    let split = loaded.split.clone();
    let path = state_dir.join(SNAPSHOT_FILE);
    crate::outputs::AtomicFile::remove_stale_temps(&path);
    SnapshotWriter(Some(std::thread::spawn(move || {
        let index = split
            .with_scoring
            .then(|| inputs.scoring.iter().find(|(name, _)| *name == "train"))
            .flatten()
            .map(|(_, index)| &**index);
        let written = match split.key_with(|p| inputs.digests.sha256(p).ok()) {
            Some(key) => snapshot::write_snapshot(&path, &key, &inputs.dataset, index)
                .map_err(|e| e.to_string()),
            None => Err("a file of the split could not be hashed".to_string()),
        };
        match written {
            Ok(()) => tracing::debug!(path = %path.display(), "dataset snapshot written"),
            // A cache: the next run parses the files instead.
            Err(e) => tracing::warn!("dataset snapshot not written: {e}"),
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

/// A required path setting.
pub fn required<'a>(
    value: &'a Option<PathBuf>,
    setting: &'static str,
) -> Result<&'a Path, ConfigError> {
    value
        .as_deref()
        .ok_or_else(|| ConfigError::new(setting, "missing"))
}

/// Loads and cross-checks every input. `state_dir`: the state directory of
/// an earlier run, whose dataset snapshot is used when it matches.
pub fn load(
    cfg: &RunConfig,
    with_vqa: bool,
    digests: Arc<FileDigests>,
    state_dir: Option<&Path>,
) -> Result<Loaded, PipelineError> {
    cfg.validate()?;
    let sft = required(&cfg.sft_ckpt, "sft_ckpt")?;
    let beam = required(&cfg.beam_data, "beam_data")?;
    let query_emb_path = required(&cfg.query_emb, "query_emb")?;
    let cand_emb_path = required(&cfg.cand_emb, "cand_emb")?;

    let hash_inputs = || -> Result<BTreeMap<String, String>, PipelineError> {
        let mut hashes = BTreeMap::new();
        for (name, path) in [
            ("sft_ckpt", Some(sft)),
            ("beam_data", Some(beam)),
            ("query_emb", Some(query_emb_path)),
            ("cand_emb", Some(cand_emb_path)),
            ("candidate_indices", cfg.candidate_indices.as_deref()),
            ("sampler_cache", cfg.sampler_cache.as_deref()),
            ("train_ques_path", cfg.train_ques_path.as_deref()),
            ("train_ann_path", cfg.train_ann_path.as_deref()),
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
        let val = s.spawn(|| load_val_scoring(cfg, with_vqa));
        let loaded = load_dataset(cfg, with_vqa, &digests, state_dir);
        let hashes = join(hashing);
        (hashes, loaded, join(val))
    });
    let hashes = hashes?;
    let (with_dataset, ((dataset, train_index), split)) = match loaded? {
        Some(loaded) => (true, loaded),
        None => (false, without_dataset(cfg)?),
    };
    let dataset = Arc::new(dataset);
    let scoring = load_scoring(cfg, with_vqa, train_index, val)?;
    tracing::debug!("dataset, scoring indices and input digests loaded");
    if with_vqa && cfg.strict() && scoring.is_empty() {
        return Err(PipelineError::NoAnnotations);
    }

    let query_emb = Arc::new(load_matrix(query_emb_path)?);
    let cand_emb = Arc::new(load_matrix(cand_emb_path)?);
    let device = Default::default();
    let model = PointerSelector::<Sel>::load(sft, cfg.num_heads, &device)?;
    let d_model = model.d_model();
    for (what, path, m) in [
        ("query", query_emb_path, &query_emb),
        ("candidate", cand_emb_path, &cand_emb),
    ] {
        if m.cols != d_model {
            return Err(mismatch(
                path,
                format!(
                    "{what} embeddings have dimension {}, but the checkpoint {} has d_model {d_model}",
                    m.cols,
                    sft.display()
                ),
            ));
        }
    }
    tracing::debug!("embeddings and checkpoint loaded");
    let (pools, layout) = match &cfg.sampler_cache {
        Some(path) => {
            let cache = load_sampler_cache(path)?;
            for (q, pool) in &cache {
                if let Some(bad) = pool.iter().find(|&&id| id as usize >= cand_emb.rows) {
                    return Err(mismatch(
                        path,
                        format!(
                            "query {q}: candidate id {bad} is outside the candidate embeddings ({} rows, {})",
                            cand_emb.rows,
                            cand_emb_path.display()
                        ),
                    ));
                }
            }
            (
                Pools::PerQuery {
                    pools: Arc::new(cache),
                },
                PointerLayout::PerQueryPool,
            )
        }
        None => shared_pool(
            cfg,
            &model,
            &cand_emb,
            cand_emb_path,
            with_dataset.then_some(&*dataset),
        )?,
    };

    let cand_args = cfg.candidate_args();
    // Settings that only depend on the pool size fail before any work.
    match &pools {
        Pools::Shared { indices, .. } => cand_args
            .validate(indices.len(), 0)
            .map_err(|e| mismatch(cand_emb_path, e.to_string()))?,
        Pools::PerQuery { pools } => {
            if let Some((q, pool)) = pools
                .iter()
                .find(|(_, p)| cand_args.validate(p.len(), 1).is_err())
            {
                if let Err(e) = cand_args.validate(pool.len(), 1) {
                    let path = cfg.sampler_cache.as_deref().unwrap_or(cand_emb_path);
                    return Err(mismatch(path, format!("{e} (pool of query {q})")));
                }
            }
        }
    }
    tracing::debug!("candidate pools ready");
    let inputs = Inputs {
        dataset,
        with_dataset,
        scoring,
        query_emb,
        cand_emb,
        model: Arc::new(model),
        pools,
        layout,
        cand_args,
        reward: cfg.reward(),
        strict: cfg.strict(),
        hashes,
        digests,
        query_emb_path: query_emb_path.to_path_buf(),
        beam_path: beam.to_path_buf(),
    };
    Ok(Loaded {
        inputs: Arc::new(inputs),
        split,
    })
}

/// The shared pool: the whole candidate matrix, its rows mapped to dataset
/// indices by `candidate_indices` (default: row = index).
fn shared_pool(
    cfg: &RunConfig,
    model: &PointerSelector<Sel>,
    cand_emb: &crate::tensor_io::Matrix,
    cand_emb_path: &Path,
    dataset: Option<&VqaDataset>,
) -> Result<(Pools, PointerLayout), PipelineError> {
    let indices: Vec<u64> = match &cfg.candidate_indices {
        Some(path) => {
            let v = load_candidate_indices(path)?;
            if v.len() != cand_emb.rows {
                return Err(mismatch(
                    path,
                    format!(
                        "{} indices for {} candidate embedding rows ({})",
                        v.len(),
                        cand_emb.rows,
                        cand_emb_path.display()
                    ),
                ));
            }
            v
        }
        None => (0..cand_emb.rows as u64).collect(),
    };
    let index_file = cfg.candidate_indices.as_deref().unwrap_or(cand_emb_path);
    let mut position_of = HashMap::with_capacity(indices.len());
    for (pos, &idx) in indices.iter().enumerate() {
        if position_of.insert(idx, pos).is_some() {
            return Err(mismatch(
                index_file,
                format!("candidate indices: dataset index {idx} appears twice (position {pos})"),
            ));
        }
        if let Some(dataset) = dataset.filter(|d| idx as usize >= d.len()) {
            return Err(mismatch(
                index_file,
                format!(
                    "candidate position {pos} is dataset index {idx}, outside the dataset ({} items)",
                    dataset.len()
                ),
            ));
        }
    }
    let positions_are_indices = indices.iter().enumerate().all(|(p, &i)| p as u64 == i);
    let pool = model.prepare_pool(cand_emb)?;
    Ok((
        Pools::Shared {
            pool: Arc::new(pool),
            indices: Arc::new(indices),
            position_of: Arc::new(position_of),
        },
        PointerLayout::SharedPool {
            positions_are_indices,
        },
    ))
}

fn dataset_kind(name: &str) -> Result<DatasetKind, ConfigError> {
    match name {
        "okvqa_local" | "okvqa" => Ok(DatasetKind::OkvqaLocal),
        "vqav2_local" | "vqav2" => Ok(DatasetKind::Vqav2Local),
        other => Err(ConfigError::new(
            "dataset",
            format!("{other}: expected okvqa_local or vqav2_local"),
        )),
    }
}

/// Loads the training split and, when VQA answers are scored with official
/// files (`train_ques_path` and `train_ann_path`), their scoring index
/// from the same parse of those files.
fn load_dataset(
    cfg: &RunConfig,
    with_vqa: bool,
    digests: &FileDigests,
    state_dir: Option<&Path>,
) -> Result<Option<(ParsedSplit, SplitSource)>, PipelineError> {
    let kind = dataset_kind(&cfg.dataset)?;
    let (questions, annotations) =
        match (&cfg.train_ques_path, &cfg.train_ann_path, &cfg.train_path) {
            (q, Some(a), _) => (q.clone(), a.clone()),
            (None, None, Some(merged)) => (None, merged.clone()),
            // Candidates alone can be inspected from the checkpoint and the
            // embeddings: the records then carry the query index only.
            (None, None, None) if !with_vqa => return Ok(None),
            _ => return Err(PipelineError::NoTrainingSplit),
        };
    let image_root = cfg.train_coco_root.clone().ok_or_else(|| {
        ConfigError::new(
            "train_coco_root",
            "missing (the directory of the training images)",
        )
    })?;
    let dataset_cfg = DatasetConfig {
        kind,
        questions,
        annotations,
        image_root,
        image_pattern: cfg.image_pattern.clone(),
    };
    // Here the split's files are exactly the scoring files of `load_scoring`.
    let with_scoring = with_vqa && cfg.train_ques_path.is_some() && cfg.train_ann_path.is_some();
    let mut split = SplitSource {
        cfg: dataset_cfg,
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
                return Ok(Some((parsed, split)));
            }
            Ok(_) => tracing::debug!("dataset snapshot without the scoring index: not used"),
            Err(miss) => tracing::debug!(?miss, "dataset snapshot not used"),
        }
    }
    let parsed = if with_scoring {
        VqaDataset::load_with_scoring(&split.cfg).map_err(|e| match e {
            DatasetScoringError::Dataset(e) => PipelineError::from(e),
            DatasetScoringError::Scoring(e) => PipelineError::from(e),
        })?
    } else {
        (VqaDataset::load(&split.cfg)?, None)
    };
    Ok(Some((parsed, split)))
}

/// The split of a run without the training split's files: no items, and
/// nothing to snapshot.
fn without_dataset(cfg: &RunConfig) -> Result<(ParsedSplit, SplitSource), PipelineError> {
    let kind = dataset_kind(&cfg.dataset)?;
    let split = SplitSource {
        cfg: DatasetConfig {
            kind,
            questions: None,
            annotations: PathBuf::new(),
            image_root: PathBuf::new(),
            image_pattern: cfg.image_pattern.clone(),
        },
        with_scoring: false,
        from_snapshot: true,
    };
    Ok(((VqaDataset::empty(kind), None), split))
}

/// The result of a scoped thread (its panic goes on in the caller).
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// The validation scoring index (`val_ques_path` and `val_ann_path`),
/// when VQA answers are scored.
fn load_val_scoring(
    cfg: &RunConfig,
    with_vqa: bool,
) -> Option<Result<ScoringIndex, AccuracyError>> {
    match (&cfg.val_ques_path, &cfg.val_ann_path) {
        (Some(q), Some(a)) if with_vqa => Some(load_questions_annotations(q, a)),
        _ => None,
    }
}

/// The official scoring indices, train first: `train` is the index
/// [`load_dataset`] built with the split (loaded here when it did not), `val`
/// the result of [`load_val_scoring`].
fn load_scoring(
    cfg: &RunConfig,
    with_vqa: bool,
    train: Option<ScoringIndex>,
    val: Option<Result<ScoringIndex, AccuracyError>>,
) -> Result<Vec<(&'static str, Arc<ScoringIndex>)>, PipelineError> {
    let mut out = Vec::new();
    if !with_vqa {
        return Ok(out);
    }
    if let (Some(q), Some(a)) = (&cfg.train_ques_path, &cfg.train_ann_path) {
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
