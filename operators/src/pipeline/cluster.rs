//! The end of a multi-process run (`processes > 1`): each process writes the
//! part files of its own queries from its own state store, then reports to
//! process 0 over a second, one-record dataflow (so every process takes
//! part even after an error and nobody waits forever); process 0 writes the
//! manifest (the dataset's commit point) and the single JSON the original
//! training code reads.

use std::sync::{Arc, Mutex};

use leverflow_schemas::Timings;

use super::error::PipelineError;
use super::progress::Progress;
use super::run::{outputs_written, Prepared, Shared};
use super::summary::{build_meta, classify, sum_stats, Classified, ClusterSummary, RunSummary};
use super::write::parse_stored;
use crate::config::{OutputFormat, RunConfig};
use crate::dataflow::{SinkFn, StageError};
use crate::outputs::stats::Summary;
use crate::outputs::{
    merge, resolve_inputs, write_manifest, MergeOutputs, OutputConfig, PartInfo, PartOptions,
    PartWriter,
};
use crate::stages::{Counters, Inputs};
use crate::state::{StateStore, StoredOutcome, WriterHandle};

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
    /// The run's settings.
    pub cfg: RunConfig,
    /// Parquet options of the part files.
    pub output: OutputConfig,
    /// The Parquet dataset directory the part files go into.
    pub parquet_path: std::path::PathBuf,
    /// Inputs.
    pub inputs: Arc<Inputs>,
    /// This process's store.
    pub store: Arc<StateStore>,
    /// What this process's workers saw while the dataflow ran.
    pub(super) shared: Shared,
    /// Process index.
    pub process: usize,
}

impl ProcessTail {
    /// Writes this process's part files from its store (ascending query
    /// order), completes its store's run and returns its report.
    pub fn write_parts(&self) -> Result<ProcessReport, PipelineError> {
        let Classified {
            current,
            removed,
            incremental,
            ..
        } = classify(&self.inputs, &self.shared)?;
        let mut parts = PartWriter::create(
            &self.parquet_path,
            self.process,
            0,
            PartOptions {
                parquet: self.output.parquet_options.clone(),
                ..Default::default()
            },
        )?;
        let mut summary = Summary::default();
        let mut skipped = Vec::new();
        self.store
            .visit_records(&current, |q, outcome| -> Result<(), PipelineError> {
                match outcome {
                    StoredOutcome::Record(bytes) => {
                        let record = parse_stored(self.store.path(), q, &bytes)?;
                        summary.add(&record);
                        parts.write_record(q, &record)?;
                    }
                    StoredOutcome::Skipped(reason) => skipped.push((q, reason)),
                    StoredOutcome::Compressed(_) => {
                        return Err(PipelineError::Internal(
                            "the store returned a compressed record".into(),
                        ))
                    }
                }
                Ok(())
            })?;
        let parts = parts.finish()?;
        self.store.complete_run(&removed, &current, None)?;
        summary.skipped = skipped.len() as u64;
        summary.vqa_calls = Counters::get(&self.shared.counters.vqa_calls);
        summary.backend = sum_stats(&self.shared.backend_stats);
        summary.incremental = incremental;
        Ok(ProcessReport {
            process: self.process,
            parts,
            summary,
            skipped,
        })
    }
}

/// After a process's dataflow: its first worker writes the process's part
/// files and sends its report (or its error) to worker 0 of process 0
/// through `gather` ([`crate::dataflow::gather_at_worker_zero`] on this
/// worker), where it lands in `reports`. Returns the worker's own outcome.
pub(super) fn report_to_process_zero(
    gather: impl FnOnce(Option<Vec<u8>>, Option<SinkFn>) -> Result<(), Arc<StageError>>,
    tail: &ProcessTail,
    (reporting, first_worker): (bool, bool),
    outcome: Result<(), Arc<StageError>>,
    error: Option<Arc<StageError>>,
    updates: Option<WriterHandle>,
    reports: &Arc<Mutex<Vec<Vec<u8>>>>,
) -> Result<(), Arc<StageError>> {
    let report = reporting.then(|| {
        let r: Result<ProcessReport, String> = match (outcome.as_ref().err().cloned(), error) {
            (Some(e), _) | (None, Some(e)) => Err(e.to_string()),
            (None, None) => updates
                .as_ref()
                .ok_or_else(|| "the state store writer stopped".to_string())
                .and_then(|w| w.sync())
                .and_then(|_| tail.write_parts().map_err(|e| e.to_string())),
        };
        serde_json::to_vec(&r).unwrap_or_default()
    });
    let reports = Arc::clone(reports);
    let sink: Option<SinkFn> = first_worker.then(|| {
        Box::new(move |q: u64, bytes: Vec<u8>| {
            reports
                .lock()
                .map_err(|e| StageError::new("report", Some(q), e.to_string()))?
                .push(bytes);
            Ok(())
        }) as SinkFn
    });
    gather(report, sink)?;
    outcome
}

/// On process 0: checks every process's report, writes the manifest and the
/// JSON. Other processes return at once.
pub(super) fn finish_cluster(
    cfg: &RunConfig,
    prep: &Prepared,
    reports: &Mutex<Vec<Vec<u8>>>,
    mut timings: Timings,
    with_vqa: bool,
    progress: &dyn Progress,
) -> Result<RunSummary, PipelineError> {
    let process = prep.cluster.process_index;
    let mut out = RunSummary {
        summary: Summary::default(),
        timings,
        with_vqa,
        outputs: Vec::new(),
        delta: None,
        cluster: Some(ClusterSummary {
            process,
            dataset: None,
        }),
    };
    if process != 0 {
        return Ok(out);
    }
    let poisoned = |_| PipelineError::Internal("a worker panicked".into());
    let raw = std::mem::take(&mut *reports.lock().map_err(poisoned)?);
    let mut got: Vec<ProcessReport> = Vec::with_capacity(raw.len());
    for bytes in raw {
        let r: Result<ProcessReport, String> = serde_json::from_slice(&bytes).map_err(|e| {
            PipelineError::Internal(format!("a process report does not parse: {e}"))
        })?;
        match r {
            Ok(r) => got.push(r),
            Err(e) => return Err(PipelineError::Process(format!("a process failed: {e}"))),
        }
    }
    got.sort_by_key(|r| r.process);
    if got.len() != cfg.processes {
        return Err(PipelineError::Process(format!(
            "only {} of {} processes reported; the run is incomplete (rerun the same command to resume)",
            got.len(),
            cfg.processes
        )));
    }
    progress.phase("writing the manifest and the JSON");
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
    let dataset = &prep.parquet_path;
    timings.write_s = write_started.elapsed().as_secs_f64();
    let identity = prep.model_record();
    let meta = build_meta(cfg, prep.inputs(), &summary, &skipped, &timings, &identity);
    write_manifest(dataset, &parts, &meta.to_value())?;
    if cfg.format.contains(OutputFormat::Json) {
        let merge_inputs = resolve_inputs(std::slice::from_ref(dataset))?;
        merge(
            &merge_inputs,
            &MergeOutputs {
                json: Some(prep.output_path.clone()),
                ..Default::default()
            },
            &mut |_, _| {},
        )?;
    }
    out.summary = summary;
    out.timings = timings;
    out.outputs = outputs_written(cfg, prep);
    out.cluster = Some(ClusterSummary {
        process,
        dataset: Some((dataset.clone(), parts.len())),
    });
    Ok(out)
}
