//! What a run reports: its typed [`RunSummary`] (returned to the caller),
//! the `_meta` of its outputs, and the classification of its queries
//! against the previous completed run.

use std::collections::HashMap;
use std::path::PathBuf;

use leverflow_schemas::{Meta, SkippedQuery, Timings};

use super::error::PipelineError;
use super::run::Shared;
use crate::config::{OutputFormat, RunConfig};
use crate::dataflow::InputChange;
use crate::outputs::stats::{add_counters, Incremental, Summary};
use crate::outputs::DeltaPaths;
use crate::stages::vqa::BackendStats;
use crate::stages::{Counters, Inputs};
use crate::state::Key;

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Counts over the records written (and the run's own counts).
    pub summary: Summary,
    /// Wall-clock phases.
    pub timings: Timings,
    /// Whether prompts were answered (`generate`) or not (`candidates`).
    pub with_vqa: bool,
    /// The outputs written, by format.
    pub outputs: Vec<(OutputFormat, PathBuf)>,
    /// The delta outputs, with `output_mode = delta`.
    pub delta: Option<DeltaPaths>,
    /// A multi-process run: this process's index, and on process 0 the
    /// dataset directory with its part-file count.
    pub cluster: Option<ClusterSummary>,
}

/// What a process of a multi-process run reports.
#[derive(Debug, Clone)]
pub struct ClusterSummary {
    /// This process.
    pub process: usize,
    /// On process 0: the Parquet dataset directory and its part files.
    pub dataset: Option<(PathBuf, usize)>,
}

/// Builds `_meta`.
pub fn build_meta(
    cfg: &RunConfig,
    inputs: &Inputs,
    summary: &Summary,
    skipped: &[(u64, String)],
    timings: &Timings,
    model: &serde_json::Value,
) -> Meta {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Meta {
        tool: "leverflow".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        created_at: leverflow_schemas::meta::rfc3339(now),
        args: serde_json::to_value(cfg.recorded()).unwrap_or(serde_json::Value::Null),
        input_sha256: inputs.hashes.clone(),
        pointer_layout: inputs.layout.name().into(),
        vqa_model: model.clone(),
        counts: summary.counts(),
        skipped_queries: skipped
            .iter()
            .map(|(q, why)| SkippedQuery {
                query_id: *q,
                reason: why.clone(),
            })
            .collect(),
        timings: *timings,
    }
}

/// This run's queries and how they differ from the previous completed run.
pub struct Classified {
    /// (query, input key), ascending.
    pub current: Vec<(u64, Key)>,
    /// Queries of the previous run no longer in the input, ascending.
    pub removed: Vec<u64>,
    /// Added and changed queries with their keys, ascending.
    pub delta_rows: Vec<(u64, Key)>,
    /// The counts.
    pub incremental: Incremental,
}

/// Collects what the planning stage and the differential comparison saw:
/// every query with the key of its stored record (its input key, or the
/// provisional key a record with failed prompts was stored under).
pub(super) fn classify(inputs: &Inputs, shared: &Shared) -> Result<Classified, PipelineError> {
    let poisoned = || PipelineError::Internal("a worker panicked".into());
    let (current, changes, counters) = (&shared.current, &shared.changes, &shared.counters);
    let mut current = std::mem::take(&mut *current.lock().map_err(|_| poisoned())?);
    let stored = std::mem::take(&mut *shared.stored_keys.lock().map_err(|_| poisoned())?);
    for (q, key) in current.iter_mut() {
        if let Some(k) = stored.get(q) {
            *key = *k;
        }
    }
    current.sort_unstable_by_key(|(q, _)| *q);
    if let Some(w) = current.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(PipelineError::DuplicateQuery {
            beam: inputs.beam_path.clone(),
            query: w[0].0,
        });
    }
    let changes = std::mem::take(&mut *changes.lock().map_err(|_| poisoned())?);
    let mut removed = Vec::new();
    let mut delta_rows: Vec<(u64, Key)> = Vec::new();
    let mut incremental = Incremental::default();
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
    incremental.queries_reused = Counters::get(&counters.queries_reused);
    incremental.vqa_cached = Counters::get(&counters.vqa_cached);
    incremental.candidate_sets_cached = Counters::get(&counters.candidate_sets_cached);
    Ok(Classified {
        current,
        removed,
        delta_rows,
        incremental,
    })
}

/// Sums the numeric counters the workers' backends reported.
pub fn sum_stats(stats: &BackendStats) -> serde_json::Value {
    let mut total = serde_json::Value::Object(serde_json::Map::new());
    if let Ok(per_worker) = stats.lock() {
        let mut workers: Vec<_> = per_worker.iter().collect();
        workers.sort_by_key(|(w, _)| **w);
        for (_, v) in workers {
            add_counters(&mut total, v);
        }
    }
    total
}
