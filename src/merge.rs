//! `leverflow merge`: Parquet outputs (a multi-process dataset directory, or
//! `--start_idx/--end_idx` shards) → the single JSON the original training
//! code reads, and optionally one merged Parquet file.  The work is
//! [`leverflow_operators::outputs::merge`]; this is the edge: flags, progress
//! on stderr, error context.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use leverflow_operators::outputs::{merge, resolve_inputs, JsonOptions, MergeOutputs};

use crate::cli::MergeArgs;
use crate::progress::{phase, Counters, ProgressStyle, Reporter};

/// Runs `leverflow merge`.
pub fn run(a: &MergeArgs) -> Result<()> {
    if a.output_path.is_none() && a.parquet_path.is_none() {
        bail!("merge: nothing to write: give --output_path (JSON) and/or --parquet_path");
    }
    if a.batch_rows == 0 {
        bail!("--batch_rows must be at least 1");
    }
    let style = ProgressStyle::of(a.progress, a.quiet);
    // One run per output: a second run on the same outputs fails here.
    let _output_locks = leverflow_operators::outputs::OutputLock::acquire_all(
        [&a.output_path, &a.parquet_path]
            .into_iter()
            .flatten()
            .map(|p| p.as_path()),
    )?;
    phase(
        style,
        &format!("merge: checking {} input(s)", a.inputs.len()),
    );
    let inputs = resolve_inputs(&a.inputs).context("merge: reading the inputs")?;
    let counters = Arc::new(Counters::default());
    if let Some(q) = inputs.expected_queries {
        counters.queries_total.store(q, Ordering::Relaxed);
    }
    let outputs = MergeOutputs {
        json: a.output_path.clone(),
        json_options: JsonOptions { pretty: a.pretty },
        parquet: a.parquet_path.clone(),
        batch_rows: a.batch_rows,
        ..Default::default()
    };
    let reporter = Reporter::start(style, Arc::clone(&counters), "merge");
    let result = merge(&inputs, &outputs, &mut |queries, rows| {
        counters.queries_done.store(queries, Ordering::Relaxed);
        counters.candidates_done.store(rows, Ordering::Relaxed);
    });
    reporter.finish();
    let summary = result.context("merge failed (no output written)")?;
    let written: Vec<String> = [&a.output_path, &a.parquet_path]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string())
        .collect();
    phase(
        style,
        &format!(
            "merged {} queries ({} rows) from {} file(s) into {}",
            summary.queries,
            summary.rows,
            summary.files,
            written.join(" and ")
        ),
    );
    Ok(())
}
