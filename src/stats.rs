//! `leverflow stats OUTPUT`: the run summary of any leverflow output (JSON or
//! Parquet), streamed, so it works on outputs of any size.

use anyhow::Result;
use std::path::Path;

use leverflow_operators::outputs::{visit_rl_json, visit_rl_parquet, Summary};
use leverflow_schemas::RlRecord;

/// Computes the summary of the output at `path` (Parquet by extension, else
/// JSON) and the `_meta` it holds.
pub fn summarise(path: &Path) -> Result<(Summary, Option<serde_json::Value>)> {
    let mut summary = Summary::default();
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let meta = if is_parquet {
        // Rows come grouped by query (ascending): rebuild one record at a time.
        let mut current: Option<RlRecord> = None;
        let meta = visit_rl_parquet(path, |row| {
            let same = current
                .as_ref()
                .is_some_and(|r| r.query.query_id == row.query.query_id);
            if !same {
                if let Some(done) = current.take() {
                    summary.add(&done);
                }
                current = Some(RlRecord {
                    query: row.query.clone(),
                    candidate_pool_ids: row.candidate_pool_ids.clone(),
                    pointer_candidates: Vec::new(),
                });
            }
            if let Some(r) = current.as_mut() {
                r.pointer_candidates.push(row.candidate);
            }
            Ok(())
        })?;
        if let Some(done) = current.take() {
            summary.add(&done);
        }
        meta
    } else {
        visit_rl_json(path, |_, r| {
            summary.add(&r);
            Ok(())
        })?
    };
    if let Some(m) = &meta {
        let counts = &m["counts"];
        summary.vqa_calls = counts["vqa_calls"].as_u64().unwrap_or(0);
        summary.skipped = counts["skipped_queries"].as_u64().unwrap_or(0);
        summary.backend = counts["vqa_backend"].clone();
    }
    Ok((summary, meta))
}

/// Prints the summary of `path` (human text, or JSON with `json`), and
/// draws it to `plot` (SVG) when given.
pub fn run(path: &Path, json: bool, plot: Option<&Path>) -> Result<()> {
    let (summary, _meta) = summarise(path)?;
    if let Some(out) = plot {
        crate::plot::write_svg(&summary, &path.display().to_string(), out)?;
    }
    let with_vqa =
        summary.by_method.is_empty() || summary.rewards.len() as u64 == summary.candidates;
    if json {
        println!("{}", serde_json::to_string(&summary.counts())?);
    } else {
        crate::report::print_counts(&summary, with_vqa, None);
        println!("  file               {}", path.display());
        if let Some(out) = plot {
            println!("  plot               {}", out.display());
        }
    }
    Ok(())
}
