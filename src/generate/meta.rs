//! The `_meta` object: tool version, every argument, input hashes, counts and
//! timings. Only `created_at` and `timings` differ between identical runs.

use std::time::{SystemTime, UNIX_EPOCH};

use super::inputs::Inputs;
use super::summary::Summary;
use crate::cli::GenerateArgs;

/// Wall-clock phases of a run, in seconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
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

/// Builds `_meta`.
pub fn build(
    args: &GenerateArgs,
    inputs: &Inputs,
    summary: &Summary,
    skipped: &[(u64, String)],
    timings: &Timings,
    model: &serde_json::Value,
) -> serde_json::Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({
        "tool": "leverflow",
        "version": env!("CARGO_PKG_VERSION"),
        "created_at": rfc3339(now),
        "args": args,
        "input_sha256": inputs.hashes,
        "pointer_layout": format!("{:?}", inputs.layout),
        "vqa_model": model,
        "counts": summary.to_json(),
        "skipped_queries": skipped.iter().map(|(q, why)| serde_json::json!({"query_id": q, "reason": why})).collect::<Vec<_>>(),
        "timings": timings,
    })
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_065), "2026-11-21T23:51:05Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
