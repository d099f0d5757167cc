//! The RL-data graph, as one function from the routed source to the stream
//! of finished records (in the style of differential's examples: the
//! computation is a function of its inputs; the driver only feeds them):
//!
//! ```text
//! source ─▶ incremental front (plan, differential comparison) ─▶ candidates ─┬▶ vqa ▶ accuracy ▶ reward ─▶ finished
//!                                                                           └▶ record ──────────────────▶ finished
//! ```
//!
//! The stages are plain batch functions ([`BatchFn`]) built per worker by
//! the caller, so the graph is tested with test-double stages.

use timely::dataflow::{ProbeHandle, StreamVec};

use super::incremental::{incremental_front, Planned, SourceItem};
use super::{batched, batched_pending, BatchFn, ErrorSlot, InputChange, PendingStage};

/// A finished query: its index and its serialised update.
pub type Finished = (u64, Vec<u8>);

/// The per-worker stages of the graph, over work items `W` and candidate
/// sets `C`, answered queries `A` and scored queries `S`.
pub struct Stages<W, C, A, S> {
    /// Keys each query's inputs and decides whether its stored record is
    /// reused.
    pub plan: BatchFn<W, Planned<W>>,
    /// Candidate sets.
    pub candidates: BatchFn<W, C>,
    /// Queries per plan / candidates batch.
    pub batch: usize,
    /// What follows the candidates.
    pub then: Then<C, A, S>,
}

/// What follows the candidate stage.
pub enum Then<C, A, S> {
    /// `generate`: answer, score, reward.
    Vqa(VqaStages<C, A, S>),
    /// `candidates`: the records of the candidates alone.
    Record(RecordStages<C>),
}

/// The stages of a run that answers prompts.
pub struct VqaStages<C, A, S> {
    /// Answers every candidate's prompt (batches may finish later: requests
    /// to a server do not block the worker's other stages).
    pub vqa: Box<dyn PendingStage<C, A>>,
    /// Queries per vqa batch.
    pub vqa_batch: usize,
    /// Scores the answers.
    pub accuracy: BatchFn<A, S>,
    /// Rewards, advantages and the finished record.
    pub reward: BatchFn<S, Finished>,
}

/// The stage of a run that writes candidates only.
pub struct RecordStages<C> {
    /// The finished record.
    pub record: BatchFn<C, Finished>,
}

/// Builds the graph of one worker: from the routed source (previous keys
/// and this run's work) to the finished records. `on_change` receives the
/// differential classification of each query (see [`incremental_front`]).
pub fn rl_graph<'s, W, C, A, S>(
    source: StreamVec<'s, u64, SourceItem<W>>,
    stages: Stages<W, C, A, S>,
    on_change: impl FnMut(u64, InputChange, isize) + 'static,
    probe: &ProbeHandle<u64>,
    errors: ErrorSlot,
) -> StreamVec<'s, u64, Finished>
where
    W: Clone + 'static,
    C: Clone + 'static,
    A: Clone + 'static,
    S: Clone + 'static,
{
    let todo = incremental_front(
        source,
        stages.plan,
        stages.batch,
        on_change,
        probe,
        errors.clone(),
    );
    let cands = batched(
        todo,
        "candidates",
        stages.batch,
        stages.candidates,
        errors.clone(),
    );
    match stages.then {
        Then::Vqa(v) => {
            let answered = batched_pending(cands, "vqa", v.vqa_batch, v.vqa, errors.clone());
            let scored = batched(answered, "accuracy", 1, v.accuracy, errors.clone());
            batched(scored, "reward", 1, v.reward, errors)
        }
        Then::Record(r) => batched(cands, "record", 1, r.record, errors),
    }
}
