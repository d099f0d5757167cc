//! Counts over the records of an output: what the run summary, `_meta.counts`
//! and `leverflow stats` report. Kept per output segment ([`RecordStats`])
//! so that a rerun reuses a copied segment's counts without reading its
//! records.

use std::collections::BTreeMap;

use leverflow_schemas::{Counts, MethodCounts, RlRecord};

/// Per-`gen_method` counts.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MethodStats {
    /// Candidates.
    pub candidates: u64,
    /// Sum of `vqa_acc_score`.
    pub acc_sum: f64,
    /// Candidates with `vqa_correct = 1`.
    pub correct: u64,
}

/// Counts over every written record.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Queries written.
    pub queries: u64,
    /// Candidates written.
    pub candidates: u64,
    /// Per generation method.
    pub by_method: BTreeMap<String, MethodStats>,
    /// Queries with at least one correct candidate.
    pub queries_with_correct: u64,
    /// Every reward (for quantiles).
    pub rewards: Vec<f64>,
    /// Queries skipped (missing images).
    pub skipped: u64,
    /// Prompts sent to the VQA backend.
    pub vqa_calls: u64,
    /// The backend's own counters summed over workers (prompts, tokens
    /// prefilled, images encoded / served from the vision cache, seconds).
    pub backend: serde_json::Value,
    /// What the run reused from, and changed in, the state store.
    pub incremental: Incremental,
}

/// The counts of a run of records (an output segment): what
/// [`Summary::add`] collects, kept per segment so that a rerun can reuse a
/// copied segment's counts without reading its records. Sums are taken per
/// segment and then over segments in order, so the totals are the same
/// whether a segment was written or copied.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecordStats {
    /// Records.
    pub queries: u64,
    /// Candidates.
    pub candidates: u64,
    /// Per generation method.
    pub by_method: BTreeMap<String, MethodStats>,
    /// Records with at least one correct candidate.
    pub queries_with_correct: u64,
    /// Every reward, in record order.
    pub rewards: Vec<f64>,
}

impl RecordStats {
    /// Adds one record.
    pub fn add(&mut self, r: &RlRecord) {
        self.queries += 1;
        let mut any = false;
        for c in &r.pointer_candidates {
            self.candidates += 1;
            let m = self.by_method.entry(c.gen_method.clone()).or_default();
            m.candidates += 1;
            m.acc_sum += c.vqa_acc_score.unwrap_or(0.0);
            if c.vqa_correct == Some(1) {
                m.correct += 1;
                any = true;
            }
            if let Some(x) = c.reward {
                self.rewards.push(x);
            }
        }
        if any {
            self.queries_with_correct += 1;
        }
    }
}

/// Adds the numeric fields of `from` to those of `into` (backend counters of
/// several workers or processes); a null `into` becomes an object.
pub fn add_counters(into: &mut serde_json::Value, from: &serde_json::Value) {
    let serde_json::Value::Object(from) = from else {
        return;
    };
    if into.is_null() {
        *into = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(into) = into {
        for (k, x) in from {
            let sum =
                into.get(k).and_then(|t| t.as_f64()).unwrap_or(0.0) + x.as_f64().unwrap_or(0.0);
            into.insert(k.clone(), serde_json::json!(sum));
        }
    }
}

/// The incremental counts of a run (`_meta.counts` keys of the same names).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Incremental {
    /// Queries not in the previous completed run's input.
    pub queries_added: u64,
    /// Queries of the previous completed run no longer in the input
    /// (retracted from the outputs).
    pub queries_removed: u64,
    /// Queries whose inputs changed since the previous completed run.
    pub queries_changed: u64,
    /// Queries whose stored record was reused as is.
    pub queries_reused: u64,
    /// Answers served from the store instead of the model.
    pub vqa_cached: u64,
    /// Candidate sets served from the store instead of the selector.
    pub candidate_sets_cached: u64,
    /// Output segments copied unchanged from the previous outputs.
    pub output_segments_copied: u64,
    /// Output segments written or copied.
    pub output_segments: u64,
}

impl Summary {
    /// Adds another process's summary (a multi-process run).
    pub fn merge(&mut self, o: Summary) {
        self.queries += o.queries;
        self.candidates += o.candidates;
        for (k, m) in o.by_method {
            let e = self.by_method.entry(k).or_default();
            e.candidates += m.candidates;
            e.acc_sum += m.acc_sum;
            e.correct += m.correct;
        }
        self.queries_with_correct += o.queries_with_correct;
        self.rewards.extend(o.rewards);
        self.skipped += o.skipped;
        self.vqa_calls += o.vqa_calls;
        if let (serde_json::Value::Object(into), serde_json::Value::Object(from)) =
            (&mut self.backend, &o.backend)
        {
            for (k, x) in from {
                let sum =
                    into.get(k).and_then(|t| t.as_f64()).unwrap_or(0.0) + x.as_f64().unwrap_or(0.0);
                into.insert(k.clone(), serde_json::json!(sum));
            }
        } else if self.backend.is_null() {
            self.backend = o.backend;
        }
        let (i, j) = (&mut self.incremental, o.incremental);
        i.queries_added += j.queries_added;
        i.queries_removed += j.queries_removed;
        i.queries_changed += j.queries_changed;
        i.queries_reused += j.queries_reused;
        i.vqa_cached += j.vqa_cached;
        i.candidate_sets_cached += j.candidate_sets_cached;
        i.output_segments_copied += j.output_segments_copied;
        i.output_segments += j.output_segments;
    }

    /// Adds one record.
    pub fn add(&mut self, r: &RlRecord) {
        let mut one = RecordStats::default();
        one.add(r);
        self.add_stats(&one);
    }

    /// Adds the counts of a run of records (an output segment).
    pub fn add_stats(&mut self, s: &RecordStats) {
        self.queries += s.queries;
        self.candidates += s.candidates;
        for (k, m) in &s.by_method {
            let e = self.by_method.entry(k.clone()).or_default();
            e.candidates += m.candidates;
            e.acc_sum += m.acc_sum;
            e.correct += m.correct;
        }
        self.queries_with_correct += s.queries_with_correct;
        self.rewards.extend_from_slice(&s.rewards);
    }

    /// The 10th, 50th and 90th percentiles of the rewards (nearest rank),
    /// sorting them once; `None` without rewards.
    pub fn reward_quantiles(&self) -> Option<[f64; 3]> {
        if self.rewards.is_empty() {
            return None;
        }
        let mut v = self.rewards.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Some([at(0.1), at(0.5), at(0.9)])
    }

    /// The counts as `_meta.counts` holds them.
    pub fn counts(&self) -> Counts {
        let by_gen_method = self
            .by_method
            .iter()
            .map(|(k, m)| {
                let mean_acc = if m.candidates > 0 {
                    m.acc_sum / m.candidates as f64
                } else {
                    0.0
                };
                (
                    k.clone(),
                    MethodCounts {
                        candidates: m.candidates,
                        mean_acc,
                        correct: m.correct,
                    },
                )
            })
            .collect();
        let q = self.reward_quantiles();
        let i = &self.incremental;
        Counts {
            queries: self.queries,
            candidates: self.candidates,
            skipped_queries: self.skipped,
            by_gen_method,
            queries_with_correct: self.queries_with_correct,
            reward_mean: self.reward_mean(),
            reward_p10: q.map(|q| q[0]),
            reward_p50: q.map(|q| q[1]),
            reward_p90: q.map(|q| q[2]),
            vqa_calls: self.vqa_calls,
            vqa_cached: i.vqa_cached,
            queries_added: i.queries_added,
            queries_removed: i.queries_removed,
            queries_changed: i.queries_changed,
            queries_reused: i.queries_reused,
            candidate_sets_cached: i.candidate_sets_cached,
            output_segments_copied: i.output_segments_copied,
            output_segments: i.output_segments,
            vqa_backend: self.backend.clone(),
        }
    }

    /// The mean reward (`None` without rewards).
    pub fn reward_mean(&self) -> Option<f64> {
        if self.rewards.is_empty() {
            None
        } else {
            Some(self.rewards.iter().sum::<f64>() / self.rewards.len() as f64)
        }
    }
}
