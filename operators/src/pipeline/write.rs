//! Writing a run's outputs from the state store, segment by segment,
//! copying the segments that did not change since the previous completed
//! run's outputs instead of rewriting them ([`write_outputs`]), and the
//! delta outputs of `output_mode = delta` ([`write_delta`]).
//!
//! An output *segment* is the run of queries with the same
//! `query index / segment_queries` (8,192 by default): a Parquet row group
//! never spans two segments, and a segment's JSON entries are one byte
//! range. After writing, the run stores an [`OutputManifest`] in the state
//! store: per segment, a digest of its (query, input key) list, where its
//! entries and row groups lie, and its summary counts; plus the identity
//! (device, inode, size, modification time) of each output file. The next
//! run copies a segment from the existing outputs when its digest is
//! unchanged and the files are still the ones the manifest describes, so a
//! rerun that adds 1 % of the queries encodes about 1 % of the rows. A
//! record's bytes depend only on its input key, and row-group boundaries
//! only on query indices, so the outputs are byte-identical to a run from
//! scratch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use leverflow_schemas::RlRecord;
use serde_json::Value;

use crate::outputs::parquet::{segment_of, ParquetSource};
use crate::outputs::rl_json::{JsonMark, JsonSink};
use crate::outputs::stats::{RecordStats, Summary};
use crate::outputs::{AtomicFile, DeltaPaths, OutputConfig, OutputWriter, SinkError};
use crate::state::{
    decode_value_compressed, encode_value_compressed, FileIdentity, Key, KeyHasher, StateError,
    StateStore, StoredOutcome,
};

/// Errors of writing a run's outputs.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// An output file could not be written.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The state store could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// A stored record does not parse: the store is damaged.
    #[error("state store {}: the record of query {query} does not parse ({message}); the store is corrupt: delete its directory (the next run recomputes everything)", .store.display())]
    CorruptRecord {
        /// The state directory.
        store: PathBuf,
        /// The query.
        query: u64,
        /// serde's message.
        message: String,
    },
    /// A broken invariant of the writer (a bug, never bad input).
    #[error("internal error while writing the outputs: {0}")]
    Internal(String),
}

/// Parses a record as the store holds it (the JSON output's bytes).
pub fn parse_stored(store: &Path, query: u64, bytes: &[u8]) -> Result<RlRecord, WriteError> {
    serde_json::from_slice(bytes).map_err(|e| WriteError::CorruptRecord {
        store: store.to_path_buf(),
        query,
        message: e.to_string(),
    })
}

/// Version of [`OutputManifest`]'s encoding; another version is ignored
/// (the outputs are then rewritten in full).
const MANIFEST_VERSION: u32 = 2;

/// One output segment as written by a run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SegmentEntry {
    /// Segment number (query index / segment_queries).
    segment: u64,
    /// Digest of the segment's (query, input key) list.
    digest: Key,
    /// First and last query with a record (not skipped), if any.
    records: Option<(u64, u64)>,
    /// Byte range of the segment's JSON entries.
    json: Option<(u64, u64)>,
    /// First row group and row-group count in the Parquet output.
    parquet: Option<(u32, u32)>,
    /// Summary counts of the segment's records.
    stats: RecordStats,
    /// Skipped queries and why.
    skipped: Vec<(u64, String)>,
}

/// What a completed run wrote to its outputs (stored in the state store).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OutputManifest {
    version: u32,
    /// Digest of the output settings (paths, formats, writer options).
    options: Key,
    /// Identity of the JSON output as written: an atomic rename gives every
    /// written output a new inode, and an edit in place changes its size or
    /// times (its status-change time cannot be set back), so a file with
    /// this identity is the one described here.
    json: Option<FileIdentity>,
    /// Identity of the Parquet output as written (as `json`).
    parquet: Option<FileIdentity>,
    segments: Vec<SegmentEntry>,
}

/// A segment of this run: its queries (a range of `current`) and, when
/// unchanged, the previous run's entry to copy.
struct SegmentPlan {
    segment: u64,
    digest: Key,
    queries: std::ops::Range<usize>,
    reuse: Option<SegmentEntry>,
}

/// What [`write_outputs`] did.
pub struct Written {
    /// Summary counts of every record written or copied.
    pub summary: Summary,
    /// Skipped queries and why, in query order.
    pub skipped: Vec<(u64, String)>,
    /// The manifest to store with the completed run.
    pub manifest: Vec<u8>,
    /// Segments copied and written.
    pub segments: SegmentCounts,
    /// The previous outputs' last handles. They are unlinked by now, and the
    /// file system frees their blocks as the last handle closes (0.3 s for a
    /// 379 MB JSON on a file system mounted with `discard`), after which
    /// every `fsync` waits for that: drop them once the store has committed
    /// the run.
    pub previous: Vec<std::fs::File>,
}

/// How many output segments a run copied from the previous outputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SegmentCounts {
    /// Copied unchanged.
    pub copied: usize,
    /// All segments of the outputs.
    pub total: usize,
}

/// The digest of everything about the output files that a copied segment
/// depends on: leverflow's version, the paths and every writer option,
/// encoded field by field (never through `Debug` text).
fn options_digest(cfg: &OutputConfig) -> Key {
    let mut h = KeyHasher::new("leverflow/output-options/v2");
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    let o = &cfg.parquet_options;
    h.str(env!("CARGO_PKG_VERSION"))
        .opt_str(path(&cfg.json).as_deref())
        .u64(cfg.json_options.pretty as u64)
        .opt_str(path(&cfg.parquet).as_deref())
        .u64(o.per_query_pool as u64)
        .u64(o.with_vqa as u64)
        .u64(o.with_prompts as u64)
        .u64(o.shared_pool.is_some() as u64)
        .u64s(o.shared_pool.as_deref().unwrap_or(&[]))
        .u64(o.batch_rows as u64)
        .u64(o.row_group_rows as u64)
        .u64(o.segment_queries)
        .u64(o.zstd_level as i64 as u64);
    h.finish()
}

fn segment_digest(queries: &[(u64, Key)]) -> Key {
    let mut h = KeyHasher::new("leverflow/output-segment/v1");
    for (q, k) in queries {
        h.u64(*q).key(k);
    }
    h.finish()
}

/// The previous outputs, when they can be copied from.
struct Previous {
    segments: HashMap<u64, SegmentEntry>,
    json: Option<std::fs::File>,
    parquet: Option<ParquetSource>,
}

/// Opens the previous outputs that `manifest` describes, if they are still
/// those files and were written with the same settings.
fn previous_outputs(manifest: Option<Vec<u8>>, cfg: &OutputConfig) -> Option<Previous> {
    let m: OutputManifest = decode_value_compressed(&manifest?)?;
    if m.version != MANIFEST_VERSION || m.options != options_digest(cfg) {
        tracing::debug!("output manifest: other version or output settings");
        return None;
    }
    let json = match &cfg.json {
        Some(p) => {
            if m.json.is_none() || FileIdentity::of(p) != m.json {
                tracing::debug!(
                    "output manifest: {} is not the file it describes ({:?} vs {:?})",
                    p.display(),
                    FileIdentity::of(p),
                    m.json
                );
                return None;
            }
            Some(std::fs::File::open(p).ok()?)
        }
        None => None,
    };
    let parquet = match &cfg.parquet {
        Some(p) => {
            if m.parquet.is_none() || FileIdentity::of(p) != m.parquet {
                tracing::debug!(
                    "output manifest: {} is not the file it describes",
                    p.display()
                );
                return None;
            }
            Some(ParquetSource::open(p).ok()?)
        }
        None => None,
    };
    Some(Previous {
        segments: m.segments.into_iter().map(|s| (s.segment, s)).collect(),
        json,
        parquet,
    })
}

/// Reads `len` bytes at `offset` of `file`.
fn read_at(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; len];
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, offset)?;
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek};
        let mut f = file;
        f.seek(std::io::SeekFrom::Start(offset))?;
        f.read_exact(&mut buf)?;
    }
    Ok(buf)
}

/// Whether the previous entry `e` can be copied: its JSON range starts with
/// its first query's key and is followed by a separator, and its row groups
/// exist.
fn copyable(e: &SegmentEntry, prev: &Previous, pretty: bool) -> bool {
    if let Some(f) = &prev.json {
        match (e.records, e.json) {
            (None, None) => {}
            (Some((first, _)), Some((start, end))) if end > start => {
                let key = match pretty {
                    true => format!("\n  \"{first}\": "),
                    false => format!("\"{first}\":"),
                };
                let head = read_at(f, start, key.len() as u64);
                let tail = read_at(f, end - 1, 2);
                let ok = head.is_ok_and(|h| h == key.as_bytes())
                    && tail.is_ok_and(|t| t[0] == b'}' && t[1] == b',');
                if !ok {
                    return false;
                }
            }
            _ => return false,
        }
    }
    if let Some(src) = &prev.parquet {
        match e.parquet {
            Some((first, count)) => {
                if first as usize + count as usize > src.num_row_groups() {
                    return false;
                }
                if count > 0 && e.records.is_none() {
                    return false;
                }
                let rows: u64 = (first..first + count)
                    .filter_map(|i| src.row_group_rows(i as usize))
                    .sum();
                if rows != e.stats.candidates {
                    return false;
                }
            }
            None => return false,
        }
    }
    true
}

/// Plans the segments of `current` (ascending by query).
fn plan(current: &[(u64, Key)], cfg: &OutputConfig, prev: Option<&Previous>) -> Vec<SegmentPlan> {
    let n = cfg.parquet_options.segment_queries;
    let pretty = cfg.json_options.pretty;
    let mut out = Vec::new();
    let mut start = 0;
    while start < current.len() {
        let segment = segment_of(current[start].0, n);
        let end = start
            + current[start..]
                .iter()
                .take_while(|(q, _)| segment_of(*q, n) == segment)
                .count();
        let digest = segment_digest(&current[start..end]);
        let reuse = prev.and_then(|p| {
            p.segments
                .get(&segment)
                .filter(|e| e.digest == digest && copyable(e, p, pretty))
                .cloned()
        });
        out.push(SegmentPlan {
            segment,
            digest,
            queries: start..end,
            reuse,
        });
        start = end;
    }
    out
}

/// Copying the previous JSON output's segments into this run's JSON output
/// while the dataflow still runs (a rerun's dataflow waits on messages
/// between workers much of the time, and the copy is the longest step of
/// writing the outputs). Segments are copied in order until one is not
/// copyable, `stop` is set, or `changed(segment)` says the dataflow has
/// seen a changed, added or removed query in it. [`write_outputs`] then
/// keeps the copied prefix that its own plan would have copied, cuts the
/// rest away ([`JsonSink::rollback`]) and goes on from there, so the output
/// is exactly the one it would have written without the head start.
pub struct Prefetch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Prefetched, WriteError>>>,
}

/// What the prefetch copied: the sink, where it stood before the first
/// segment, and each copied segment with its range and the sink's mark
/// after it.
struct Prefetched {
    sink: JsonSink,
    start: JsonMark,
    segments: Vec<CopiedAhead>,
}

/// A segment the prefetch copied: its number and digest, its byte range in
/// the new JSON output, and the sink's mark after it.
type CopiedAhead = (u64, Key, Option<(u64, u64)>, JsonMark);

impl Prefetch {
    /// Starts copying, when the store describes previous outputs that can be
    /// copied from and the run writes JSON. Call only while holding the
    /// store (the run's lock), after stale temporary files were removed.
    pub fn start(
        store: &StateStore,
        cfg: &OutputConfig,
        changed: impl Fn(u64) -> bool + Send + 'static,
    ) -> Result<Option<Self>, WriteError> {
        let Some(path) = cfg.json.clone() else {
            return Ok(None);
        };
        let Some(prev) = previous_outputs(store.output_manifest()?, cfg) else {
            return Ok(None);
        };
        let Some(prev_json) = prev.json.as_ref().and_then(|f| f.try_clone().ok()) else {
            return Ok(None);
        };
        let mut sink = JsonSink::create(&path, cfg.json_options.clone())?;
        let pretty = cfg.json_options.pretty;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_copying = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let start = sink.mark();
            let mut order: Vec<&SegmentEntry> = prev.segments.values().collect();
            order.sort_by_key(|e| e.segment);
            let mut segments = Vec::new();
            for e in order {
                if stop_copying.load(std::sync::atomic::Ordering::Relaxed)
                    || changed(e.segment)
                    || !copyable(e, &prev, pretty)
                {
                    break;
                }
                // The JSON half of the copy `write_outputs` makes (Parquet is
                // copied there, in order with the segments it writes).
                let range = copy_json(e, &mut sink, &prev_json)?;
                sink.start_writeback()?;
                segments.push((e.segment, e.digest, range, sink.mark()));
            }
            Ok(Prefetched {
                sink,
                start,
                segments,
            })
        });
        Ok(Some(Prefetch {
            stop,
            handle: Some(handle),
        }))
    }

    /// Stops copying and takes what was copied (`None` after an error: the
    /// outputs are then written without it).
    fn finish(mut self) -> Option<Prefetched> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let done = self.handle.take()?.join().ok()?;
        match done {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::debug!("copying the previous JSON output ahead failed: {e:#}");
                None
            }
        }
    }
}

impl Drop for Prefetch {
    /// A run that fails before writing its outputs stops the copy and
    /// removes its temporary file (the sink's own drop).
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Streams the stored records of `queries` (ascending) from a thread.
type RecordStream = (
    std::sync::mpsc::Receiver<Result<(u64, StoredOutcome), StateError>>,
    std::thread::JoinHandle<()>,
);

fn stream_records(store: Arc<StateStore>, queries: Vec<(u64, Key)>) -> RecordStream {
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    let handle = std::thread::spawn(move || {
        let sent = store.visit_records(&queries, |q, outcome| -> Result<(), StateError> {
            // A closed channel means the consumer stopped on an error of
            // its own; stop quietly.
            let _ = tx.send(Ok((q, outcome)));
            Ok(())
        });
        if let Err(e) = sent {
            let _ = tx.send(Err(e));
        }
    });
    (rx, handle)
}

/// The `_meta` of a run's outputs, built once the counts are known: given
/// the summary, the skipped queries and the segments copied.
pub type MetaFn<'a> = Box<dyn FnOnce(&Summary, &[(u64, String)], SegmentCounts) -> Value + 'a>;

/// Writes the outputs of `current` (ascending (query, input key)) from the
/// store, copying unchanged segments from the previous outputs, then
/// `_meta` from `meta`. Nothing appears at an output path unless every
/// output is complete.
///
/// `prefetch`: the JSON segments copied while the dataflow ran (see
/// [`Prefetch`]); the prefix of them that this plan copies is kept.
pub fn write_outputs(
    store: &Arc<StateStore>,
    cfg: &OutputConfig,
    current: &[(u64, Key)],
    prefetch: Option<Prefetch>,
    meta: MetaFn<'_>,
) -> Result<Written, WriteError> {
    let prev = previous_outputs(store.output_manifest()?, cfg);
    let plans = plan(current, cfg, prev.as_ref());
    // The leading segments the prefetch copied exactly as planned here.
    let mut prefetched = prefetch.and_then(Prefetch::finish);
    let mut ahead: Vec<Option<(u64, u64)>> = Vec::new();
    if let Some(p) = prefetched.as_mut() {
        let kept = plans
            .iter()
            .zip(&p.segments)
            .take_while(|(plan, (segment, digest, _, _))| {
                plan.reuse
                    .as_ref()
                    .is_some_and(|old| old.segment == *segment && old.digest == *digest)
            })
            .count();
        let mark = match kept {
            0 => p.start,
            k => p.segments[k - 1].3,
        };
        p.sink.rollback(mark)?;
        ahead = p.segments[..kept].iter().map(|s| s.2).collect();
        tracing::debug!(
            copied_ahead = p.segments.len(),
            kept,
            "JSON segments copied while the dataflow ran"
        );
    }
    let (prev_json, prev_parquet) = match prev {
        Some(p) => (p.json, p.parquet),
        None => (None, None),
    };
    // A handle on the previous Parquet output outlives its reader (which
    // the writer thread consumes), so that it too is freed after the
    // store's commit (see `Written::previous`).
    let prev_parquet_file = match (&prev_parquet, &cfg.parquet) {
        (Some(_), Some(p)) => std::fs::File::open(p).ok(),
        _ => None,
    };
    let to_read: Vec<(u64, Key)> = plans
        .iter()
        .filter(|p| p.reuse.is_none())
        .flat_map(|p| current[p.queries.clone()].iter().copied())
        .collect();
    let mut out = OutputWriter::open(cfg, prefetched.map(|p| p.sink), prev_parquet)?;
    // Reading and decompressing the stored records runs on its own thread,
    // overlapping with parsing and writing here.
    tracing::debug!(segments = plans.len(), "output segments planned");
    let (rx, reader) = stream_records(Arc::clone(store), to_read);
    let mut summary = Summary::default();
    let mut skipped_all = Vec::new();
    let mut entries = Vec::with_capacity(plans.len());
    let mut copied = 0;
    let result = (|| -> Result<(), WriteError> {
        for (i, p) in plans.iter().enumerate() {
            let entry = match &p.reuse {
                // Its JSON entries are in the output already (and started
                // on their way to disk by the prefetch).
                Some(old) if i < ahead.len() => {
                    copied += 1;
                    copy_parquet(old, &out);
                    out.end_copied_segment();
                    SegmentEntry {
                        json: ahead[i],
                        ..old.clone()
                    }
                }
                Some(old) => {
                    copied += 1;
                    let json = match (out.json(), prev_json.as_ref()) {
                        (Some(sink), Some(file)) => copy_json(old, sink, file)?,
                        (Some(_), None) => {
                            return Err(WriteError::Internal(
                                "no previous JSON output to copy from".into(),
                            ))
                        }
                        (None, _) => None,
                    };
                    copy_parquet(old, &out);
                    out.end_segment()?;
                    SegmentEntry {
                        json,
                        ..old.clone()
                    }
                }
                None => {
                    let entry = write_segment(p, current, &rx, store.path(), &mut out)?;
                    out.end_segment()?;
                    entry
                }
            };
            summary.add_stats(&entry.stats);
            skipped_all.extend(entry.skipped.iter().cloned());
            entries.push(SegmentEntry {
                segment: p.segment,
                digest: p.digest,
                ..entry
            });
        }
        Ok(())
    })();
    drop(rx);
    let _ = reader.join();
    summary.skipped = skipped_all.len() as u64;
    let counts = SegmentCounts {
        copied,
        total: plans.len(),
    };
    tracing::debug!(copied, "output segments written or copied");
    result?;
    let meta = meta(&summary, &skipped_all, counts);
    // Both outputs complete and fsynced before either is published.
    let sealed = out.seal(&meta)?;
    tracing::debug!("outputs sealed");
    if cfg.parquet.is_some() {
        if sealed.parquet_segments.len() != entries.len() {
            return Err(WriteError::Internal(
                "the Parquet writer saw a different segment count".into(),
            ));
        }
        for (e, r) in entries.iter_mut().zip(&sealed.parquet_segments) {
            e.parquet = Some(*r);
        }
    }
    sealed.publish()?;
    tracing::debug!("outputs published");
    let previous: Vec<std::fs::File> = prev_json.into_iter().chain(prev_parquet_file).collect();
    let manifest = OutputManifest {
        version: MANIFEST_VERSION,
        options: options_digest(cfg),
        json: cfg.json.as_deref().and_then(FileIdentity::of),
        parquet: cfg.parquet.as_deref().and_then(FileIdentity::of),
        segments: entries,
    };
    let manifest = encode_value_compressed(&manifest);
    tracing::debug!(bytes = manifest.len(), "output manifest encoded");
    Ok(Written {
        summary,
        skipped: skipped_all,
        manifest,
        segments: counts,
        previous,
    })
}

/// Copies a previous segment's JSON entries into `sink`; returns their
/// byte range in the new output.
fn copy_json(
    old: &SegmentEntry,
    sink: &mut JsonSink,
    prev_json: &std::fs::File,
) -> Result<Option<(u64, u64)>, WriteError> {
    match (old.records, old.json) {
        (Some((first, last)), Some((start, end))) => {
            let range = sink.append_entries_from(first, last, prev_json, start..end)?;
            Ok(Some((range.start, range.end)))
        }
        _ => Ok(None),
    }
}

/// Copies a previous segment's Parquet row groups.
fn copy_parquet(old: &SegmentEntry, out: &OutputWriter) {
    if let (Some((first_query, last_query)), Some((first, count))) = (old.records, old.parquet) {
        out.copy_parquet(first, count, first_query, last_query);
    }
}

/// Writes a segment from the stored records.
fn write_segment(
    p: &SegmentPlan,
    current: &[(u64, Key)],
    rx: &std::sync::mpsc::Receiver<Result<(u64, StoredOutcome), StateError>>,
    state: &Path,
    out: &mut OutputWriter,
) -> Result<SegmentEntry, WriteError> {
    let mut stats = RecordStats::default();
    let mut skipped = Vec::new();
    let mut records: Option<(u64, u64)> = None;
    let mut json_range: Option<(u64, u64)> = None;
    for &(want, _) in &current[p.queries.clone()] {
        let (q, outcome) = rx
            .recv()
            .map_err(|_| WriteError::Internal("the store reader stopped early".into()))??;
        if q != want {
            return Err(WriteError::Internal(format!(
                "the store returned query {q}, expected {want}"
            )));
        }
        match outcome {
            StoredOutcome::Record(bytes) => {
                let record = parse_stored(state, q, &bytes)?;
                stats.add(&record);
                out.write_serialised(q, record, &bytes)?;
                if let Some(j) = out.json() {
                    let start = json_range.map_or(j.last_entry_start(), |r| r.0);
                    json_range = Some((start, j.bytes_written()));
                }
                records = Some((records.map_or(q, |r| r.0), q));
            }
            StoredOutcome::Skipped(reason) => skipped.push((q, reason)),
            StoredOutcome::Compressed(_) => {
                return Err(WriteError::Internal(
                    "the store returned a compressed record".into(),
                ))
            }
        }
    }
    Ok(SegmentEntry {
        segment: p.segment,
        digest: p.digest,
        records,
        json: json_range,
        parquet: None,
        stats,
        skipped,
    })
}

/// Writes the delta Parquet (records of added and changed queries, `rows`
/// ascending) and the list of retracted query ids, with the Parquet options
/// of `cfg`.
pub fn write_delta(
    d: &DeltaPaths,
    store: &StateStore,
    cfg: &OutputConfig,
    rows: &[(u64, Key)],
    removed: &[u64],
    meta: &Value,
) -> Result<(), WriteError> {
    let mut out = OutputWriter::create(&OutputConfig {
        json: None,
        parquet: Some(d.parquet.clone()),
        parquet_options: cfg.parquet_options.clone(),
        ..Default::default()
    })?;
    store.visit_records(rows, |q, outcome| -> Result<(), WriteError> {
        if let StoredOutcome::Record(bytes) = outcome {
            out.write(q, &parse_stored(store.path(), q, &bytes)?)?;
        }
        Ok(())
    })?;
    let mut retracted = AtomicFile::create(&d.retracted)?;
    let body = serde_json::json!({
        "retracted_query_ids": removed,
        "changed_query_ids": rows.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        "created_at": meta.get("created_at"),
    });
    let write = |f: &mut AtomicFile| -> std::io::Result<()> {
        serde_json::to_writer(&mut *f, &body)?;
        std::io::Write::write_all(f, b"\n")
    };
    write(&mut retracted).map_err(|e| SinkError::io(&d.retracted, "writing", e))?;
    retracted.finish()?;
    out.finish(meta)?;
    Ok(())
}
