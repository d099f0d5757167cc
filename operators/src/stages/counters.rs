//! Counters shared by every worker of a run: stages bump them, the caller's
//! progress display reads them (a few times a second, from its own thread),
//! and the summary reports the totals.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every worker of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Queries whose record is finished.
    pub queries_done: AtomicU64,
    /// Candidates finished.
    pub candidates_done: AtomicU64,
    /// Prompts sent to the VQA model.
    pub vqa_calls: AtomicU64,
    /// Queries expected (0 if unknown).
    pub queries_total: AtomicU64,
    /// Queries whose stored record was reused.
    pub queries_reused: AtomicU64,
    /// Answers served from the store.
    pub vqa_cached: AtomicU64,
    /// Candidate sets served from the store.
    pub candidate_sets_cached: AtomicU64,
    /// Prompts the backend failed on (recorded as `eval_failed`).
    pub vqa_failed: AtomicU64,
    /// A remote backend's requests in flight and answers received (for
    /// the progress display; unset for a local model).
    pub vqa_remote: std::sync::OnceLock<std::sync::Arc<crate::models::contract::RemoteGauge>>,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
