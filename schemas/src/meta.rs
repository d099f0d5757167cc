//! The `_meta` object of an output: which tool and settings made it, the
//! inputs' digests, the counts of what it holds and how long it took.
//!
//! Field order is serialisation order (serde derives), so `_meta` is
//! byte-identical between identical runs apart from `created_at` and
//! `timings`. Readers should treat unknown keys as allowed (`$defs/meta` of
//! the JSON Schema is any object): a merged output adds `merged_from`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `_meta` object written last in the JSON output and under
/// [`crate::PARQUET_META_KEY`] in the Parquet key-value metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Always `"leverflow"`.
    pub tool: String,
    /// leverflow's version.
    pub version: String,
    /// When the output was written (RFC 3339, UTC).
    pub created_at: String,
    /// Every setting of the run, by its command-line flag name.
    pub args: serde_json::Value,
    /// SHA-256 of each input file, by setting name.
    pub input_sha256: BTreeMap<String, String>,
    /// How candidates' pointers are laid out (`SharedPool { .. }` or
    /// `PerQueryPool`).
    pub pointer_layout: String,
    /// The VQA model's identity (backend, files, generation settings);
    /// `null` without VQA.
    pub vqa_model: serde_json::Value,
    /// Counts over the output's records and the run.
    pub counts: Counts,
    /// Queries without a record, and why.
    pub skipped_queries: Vec<SkippedQuery>,
    /// Wall-clock phases of the run.
    pub timings: Timings,
}

/// Counts of a run (`_meta.counts`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Records written.
    pub queries: u64,
    /// Candidates written.
    pub candidates: u64,
    /// Queries skipped (listed in `skipped_queries`).
    pub skipped_queries: u64,
    /// Per `gen_method`.
    pub by_gen_method: BTreeMap<String, MethodCounts>,
    /// Records with at least one correct candidate.
    pub queries_with_correct: u64,
    /// Mean reward (`null` without rewards).
    pub reward_mean: Option<f64>,
    /// 10th percentile of the rewards (nearest rank).
    pub reward_p10: Option<f64>,
    /// Median reward (nearest rank).
    pub reward_p50: Option<f64>,
    /// 90th percentile of the rewards (nearest rank).
    pub reward_p90: Option<f64>,
    /// Prompts sent to the VQA backend by this run.
    pub vqa_calls: u64,
    /// Answers served from the state store.
    pub vqa_cached: u64,
    /// Queries not in the previous completed run's input.
    pub queries_added: u64,
    /// Queries of the previous completed run no longer in the input.
    pub queries_removed: u64,
    /// Queries whose inputs changed since the previous completed run.
    pub queries_changed: u64,
    /// Queries whose stored record was reused as is.
    pub queries_reused: u64,
    /// Candidate sets served from the state store.
    pub candidate_sets_cached: u64,
    /// Output segments copied unchanged from the previous outputs.
    pub output_segments_copied: u64,
    /// Output segments written or copied.
    pub output_segments: u64,
    /// The backend's own counters summed over workers (prompts, tokens
    /// prefilled, images encoded and served from the vision cache, seconds).
    pub vqa_backend: serde_json::Value,
}

/// Counts of one `gen_method`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodCounts {
    /// Candidates.
    pub candidates: u64,
    /// Mean `vqa_acc_score` (0 without candidates).
    pub mean_acc: f64,
    /// Candidates with `vqa_correct = 1`.
    pub correct: u64,
}

/// A query without a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedQuery {
    /// Dataset index of the query.
    pub query_id: u64,
    /// Why it was skipped.
    pub reason: String,
}

/// Wall-clock phases of a run, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Loading inputs and models.
    pub load_s: f64,
    /// The dataflow.
    pub dataflow_s: f64,
    /// Writing outputs.
    pub write_s: f64,
    /// Durable commits to the state store (part of the dataflow time).
    pub store_s: f64,
    /// Everything.
    pub total_s: f64,
}

impl Meta {
    /// `_meta` as a JSON value (what the writers store).
    pub fn to_value(&self) -> serde_json::Value {
        // A struct of plain fields always serialises.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Formats a UNIX time as RFC 3339 UTC (`2026-11-21T23:51:05Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_065), "2026-11-21T23:51:05Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn meta_keys_keep_their_order() {
        let m = Meta {
            tool: "leverflow".into(),
            version: "0".into(),
            created_at: rfc3339(0),
            args: serde_json::json!({"b": 1, "a": 2}),
            input_sha256: BTreeMap::new(),
            pointer_layout: "PerQueryPool".into(),
            vqa_model: serde_json::Value::Null,
            counts: Counts::default(),
            skipped_queries: vec![SkippedQuery {
                query_id: 3,
                reason: "missing image x".into(),
            }],
            timings: Timings::default(),
        };
        let text = serde_json::to_string(&m.to_value()).unwrap();
        let keys = [
            "\"tool\"",
            "\"version\"",
            "\"created_at\"",
            "\"args\"",
            "\"input_sha256\"",
            "\"pointer_layout\"",
            "\"vqa_model\"",
            "\"counts\"",
            "\"skipped_queries\":[{\"query_id\":3,\"reason\":\"missing image x\"}]",
            "\"timings\"",
        ];
        let at: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.contains("{\"b\":1,\"a\":2}"), "{text}");
    }
}
