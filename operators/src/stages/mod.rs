//! The stages of the RL-data pipeline, one module each, and the records
//! that flow between them. Each stage is a plain batch function
//! ([`BatchFn`](crate::dataflow::BatchFn)) built per worker; the dataflow
//! ([`crate::dataflow::rl_graph`]) wires them:
//!
//! | stage | module | in → out |
//! |---|---|---|
//! | plan | [`plan`] | [`QueryWork`] → planned (input key; stored record reused?) |
//! | candidates | [`candidates`] | [`QueryWork`] → [`QueryCands`] |
//! | vqa | [`vqa`] | [`QueryCands`] → [`QueryAnswered`] |
//! | accuracy | [`accuracy`] | [`QueryAnswered`] → [`QueryScored`] |
//! | reward | [`reward`] | [`QueryScored`] → finished record |
//! | record | [`record`] | record assembly (and `candidates`' record stage) |
//!
//! Every stage reads the run's loaded [`Inputs`] ([`context`]) and its
//! [`StageSettings`]; results computed here go into the state store through
//! the finished record's update ([`crate::state::QueryUpdate`]).

pub mod accuracy;
pub mod candidates;
pub mod context;
pub mod counters;
pub mod plan;
pub mod record;
pub mod reward;
pub mod vqa;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::candidates::Candidate;
pub use crate::dataflow::{Finished, StageError};
use crate::models::contract::VqaAnswer;
use crate::state::Key;
pub use context::{Inputs, Pools, StageSettings};
pub use counters::Counters;

/// A query routed to a worker: its index and the beam data's own beams.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryWork {
    /// Dataset index of the query.
    pub query_index: u64,
    /// The beam data's ICD sequences (dataset indices, query removed).
    pub source_beams: Vec<Vec<u64>>,
    /// Key of everything the query's record depends on (set by `plan`).
    pub input_key: Key,
}

/// A candidate with its pool positions and dataset indices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandRow {
    /// The generator's output.
    pub cand: Candidate,
    /// Dataset indices of the examples, in pointer order.
    pub indices: Vec<u64>,
}

/// A query with its candidates.
#[derive(Debug, Clone)]
pub struct QueryCands {
    /// Dataset index of the query.
    pub query_index: u64,
    /// The query's own pool (per-query pools only).
    pub pool_ids: Option<Vec<u64>>,
    /// Candidates in generation order.
    pub cands: Vec<CandRow>,
    /// The query's input key.
    pub input_key: Key,
    /// A newly generated candidate set for the store (None: it came from
    /// the store).
    pub new_cands: Option<(Key, Vec<u8>)>,
}

/// One candidate's answer: the model's, or why the backend failed on its
/// prompt (`on_vqa_error = record`; the candidate is then `eval_failed`).
pub type Answer = Result<VqaAnswer, String>;

/// A query with one answer per candidate (or the reason it was skipped).
#[derive(Debug, Clone)]
pub struct QueryAnswered {
    /// Candidates.
    pub base: QueryCands,
    /// One answer per candidate.
    pub answers: Vec<Answer>,
    /// Why the query was skipped (`on_missing_image = skip`).
    pub skipped: Option<String>,
    /// Newly computed answers for the store.
    pub new_vqa: Vec<(Key, Vec<u8>)>,
}

/// A query with answers and scores.
#[derive(Debug, Clone)]
pub struct QueryScored {
    /// Answers.
    pub answered: QueryAnswered,
    /// One score per candidate.
    pub scores: Vec<accuracy::Scores>,
}
