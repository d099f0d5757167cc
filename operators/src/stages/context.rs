//! What every stage reads: the run's loaded inputs ([`Inputs`], shared by
//! all workers) and its settings ([`StageSettings`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use leverflow_schemas::PointerLayout;

use crate::accuracy::ScoringIndex;
use crate::candidates::CandidateArgs;
use crate::config::{MissingImagePolicy, RunConfig, VqaErrorPolicy};
use crate::dataset::VqaDataset;
use crate::models::pointer_selector::{DefaultBackend, PointerSelector, PreparedPool};
use crate::reward::RewardConfig;
use crate::state::FileDigests;
use crate::tensor_io::Matrix;

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
    /// Per-query pools (`sampler_cache`): candidate embedding row i is
    /// dataset index i.
    PerQuery {
        /// Pool (dataset indices) of each query.
        pools: Arc<BTreeMap<u64, Vec<u64>>>,
    },
}

impl Pools {
    /// The query's own pool (per-query pools only).
    pub fn of_query(&self, query_index: u64) -> Option<&Vec<u64>> {
        match self {
            Pools::Shared { .. } => None,
            Pools::PerQuery { pools } => pools.get(&query_index),
        }
    }
}

/// Everything a run reads, loaded once and shared by all workers.
pub struct Inputs {
    /// The training split (queries and examples); empty when
    /// `with_dataset` is false.
    pub dataset: Arc<VqaDataset>,
    /// Whether the training split was given. A `candidates` run may go
    /// without it: its records then carry `query.query_id` only.
    pub with_dataset: bool,
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
    /// Strict evaluation (official metric only).
    pub strict: bool,
    /// SHA-256 of each input file, by setting name (`_meta.input_sha256`).
    pub hashes: BTreeMap<String, String>,
    /// Digests of input files (remembered across runs by file identity):
    /// every file hash of the run goes through it.
    pub digests: Arc<FileDigests>,
    /// The query embeddings file, for messages.
    pub query_emb_path: PathBuf,
    /// The beam data file, for messages.
    pub beam_path: PathBuf,
}

impl Inputs {
    /// The query's embedding row, or an error naming the files.
    pub fn query_row(&self, query_index: u64) -> Result<&[f32], QueryOutsideEmbeddings> {
        let m = &self.query_emb;
        match usize::try_from(query_index) {
            Ok(q) if q < m.rows => Ok(m.row(q)),
            _ => Err(QueryOutsideEmbeddings {
                beam: self.beam_path.clone(),
                query: query_index,
                embeddings: self.query_emb_path.clone(),
                rows: m.rows,
            }),
        }
    }
}

/// A query of the beam data has no row in the query embeddings.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: query {query} is outside the query embeddings {} ({rows} rows)", .beam.display(), .embeddings.display())]
pub struct QueryOutsideEmbeddings {
    /// The beam data file.
    pub beam: PathBuf,
    /// The query.
    pub query: u64,
    /// The query embeddings file.
    pub embeddings: PathBuf,
    /// Its rows.
    pub rows: usize,
}

/// Which job a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Candidates, VQA, accuracy, rewards.
    Generate,
    /// Candidates only.
    Candidates,
}

/// The settings the stages act on.
#[derive(Debug, Clone)]
pub struct StageSettings {
    /// The job.
    pub job: Job,
    /// Add the beam data's own beams as candidates.
    pub include_source_beams: bool,
    /// Keep each candidate's rendered prompt.
    pub save_prompts: bool,
    /// Ask for the ground-truth answer probability.
    pub gt_prob: bool,
    /// The system prompt of every VQA prompt.
    pub system_prompt: String,
    /// Prompts per model call.
    pub batch_size: usize,
    /// A missing image: fail, or skip the query.
    pub missing_images: MissingImagePolicy,
    /// A failed prompt: fail, or record the candidate as `eval_failed`.
    pub vqa_errors: VqaErrorPolicy,
}

impl StageSettings {
    /// The stage settings of `cfg` for `job`.
    pub fn of(cfg: &RunConfig, job: Job) -> Self {
        Self {
            job,
            include_source_beams: cfg.include_source_beams,
            save_prompts: cfg.save_prompts,
            gt_prob: cfg.gt_prob,
            system_prompt: cfg.system_prompt().to_string(),
            batch_size: cfg.batch_size.max(1),
            missing_images: cfg.on_missing_image,
            vqa_errors: cfg.on_vqa_error,
        }
    }

    /// Whether the run answers prompts.
    pub fn with_vqa(&self) -> bool {
        self.job == Job::Generate
    }
}
