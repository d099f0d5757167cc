//! The end of a multi-process run (`--processes N`): each process writes the
//! part files of its own queries from its own state store, then reports to
//! process 0, which writes the manifest (the dataset's commit point) and the
//! single JSON the original training code reads.

use anyhow::{bail, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use leverflow_operators::dataflow::InputChange;
use leverflow_operators::sinks::{
    merge, resolve_inputs, write_manifest, MergeOutputs, OutputFormat, PartInfo, PartOptions,
    PartWriter,
};
use leverflow_operators::state::{Key, StateStore, StoredOutcome};

use super::inputs::Inputs;
use super::summary::Summary;
use super::{classify, meta, output_config, parse_stored, stages, sum_stats, Classified};
use crate::cli::GenerateArgs;
use crate::progress::{self, Counters, ProgressStyle};

/// What one process did, sent to process 0.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ProcessReport {
    /// Process index.
    pub process: usize,
    /// Its part files.
    pub parts: Vec<PartInfo>,
    /// Its summary (counts over its queries).
    pub summary: Summary,
    /// Its skipped queries.
    pub skipped: Vec<(u64, String)>,
}

/// Everything a process's first worker needs to write its parts.
pub struct ProcessTail {
    /// Inputs.
    pub inputs: Arc<Inputs>,
    /// This process's store.
    pub store: Arc<StateStore>,
    /// The planning stage's (query, input key) list of this process.
    pub current: Arc<Mutex<Vec<(u64, Key)>>>,
    /// The differential comparison's updates of this process's queries.
    pub changes: Arc<Mutex<HashMap<(u64, InputChange), isize>>>,
    /// Counters of this process.
    pub counters: Arc<Counters>,
    /// Backend counters of this process's workers.
    pub backend_stats: stages::BackendStats,
    /// Process index.
    pub process: usize,
    /// Whether the run answers prompts.
    pub with_vqa: bool,
    /// `--save_prompts`.
    pub save_prompts: bool,
}

impl ProcessTail {
    /// Writes this process's part files from its store (ascending query
    /// order), completes its store's run and returns its report.
    pub fn write_parts(&self) -> Result<ProcessReport> {
        let Classified {
            current,
            removed,
            incremental,
            ..
        } = classify(&self.inputs, &self.current, &self.changes, &self.counters)?;
        let cfg = output_config(&self.inputs, self.with_vqa, self.save_prompts);
        let mut parts = PartWriter::create(
            &self.inputs.parquet_path,
            self.process,
            0,
            PartOptions {
                parquet: cfg.parquet_options,
                ..Default::default()
            },
        )?;
        let mut summary = Summary::default();
        let mut skipped = Vec::new();
        self.store
            .visit_records(&current, |q, outcome| -> Result<()> {
                match outcome {
                    StoredOutcome::Record(bytes) => {
                        let record = parse_stored(self.store.path(), q, &bytes)?;
                        summary.add(&record);
                        parts.write_record(q, &record)?;
                    }
                    StoredOutcome::Skipped(reason) => skipped.push((q, reason)),
                    StoredOutcome::Compressed(_) => {
                        anyhow::bail!("internal error: the store returned a compressed record")
                    }
                }
                Ok(())
            })?;
        let parts = parts.finish()?;
        self.store.complete_run(&removed, &current, None)?;
        summary.skipped = skipped.len() as u64;
        summary.vqa_calls = self
            .counters
            .vqa_calls
            .load(std::sync::atomic::Ordering::Relaxed);
        summary.backend = sum_stats(&self.backend_stats);
        summary.incremental = incremental;
        Ok(ProcessReport {
            process: self.process,
            parts,
            summary,
            skipped,
        })
    }
}

/// On process 0: checks every process's report, writes the manifest and the
/// JSON, prints the summary. Other processes print one line.
#[allow(clippy::too_many_arguments)]
pub fn finish_cluster(
    args: &GenerateArgs,
    inputs: &Inputs,
    reports: &Mutex<Vec<Vec<u8>>>,
    process_index: usize,
    model_identity: &serde_json::Value,
    mut timings: meta::Timings,
    with_vqa: bool,
    style: ProgressStyle,
) -> Result<()> {
    if process_index != 0 {
        if style != ProgressStyle::None {
            eprintln!("process {process_index}: done; process 0 writes the manifest and the JSON");
        }
        return Ok(());
    }
    let raw = std::mem::take(&mut *reports.lock().map_err(|e| anyhow::anyhow!("{e}"))?);
    let mut got: Vec<ProcessReport> = Vec::with_capacity(raw.len());
    for bytes in raw {
        let r: Result<ProcessReport, String> = serde_json::from_slice(&bytes)?;
        match r {
            Ok(r) => got.push(r),
            Err(e) => bail!("a process failed: {e}"),
        }
    }
    got.sort_by_key(|r| r.process);
    if got.len() != args.processes {
        bail!(
            "only {} of {} processes reported; the run is incomplete (rerun the same command to resume)",
            got.len(),
            args.processes
        );
    }
    progress::phase(style, "writing the manifest and the JSON");
    let write_started = std::time::Instant::now();
    let mut summary = Summary::default();
    let mut skipped = Vec::new();
    let mut parts = Vec::new();
    for r in got {
        summary.merge(r.summary);
        skipped.extend(r.skipped);
        parts.extend(r.parts);
    }
    skipped.sort();
    let dataset = &inputs.parquet_path;
    timings.write_s = write_started.elapsed().as_secs_f64();
    let meta = meta::build(args, inputs, &summary, &skipped, &timings, model_identity);
    write_manifest(dataset, &parts, &meta)?;
    if inputs.formats.contains(&OutputFormat::Json) {
        let merge_inputs = resolve_inputs(std::slice::from_ref(dataset))?;
        merge(
            &merge_inputs,
            &MergeOutputs {
                json: Some(inputs.output_path.clone()),
                ..Default::default()
            },
            &mut |_, _| {},
        )?;
    }
    summary.print(inputs, &timings, with_vqa);
    println!(
        "  Parquet dataset    {} ({} part files)",
        dataset.display(),
        parts.len()
    );
    Ok(())
}
