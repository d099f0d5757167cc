//! Part-file datasets: the Parquet output of a multi-process run.
//!
//! A dataset is a directory holding
//!
//! * part files `part-<process>-<worker>-<seq>.parquet` (zero-padded: `part-00001-00003-000002.parquet`),
//!   one series per timely worker, each written by a [`PartWriter`]: every
//!   part is sorted by query index, rolls to the next `seq` after
//!   [`PartOptions::rows_per_part`] rows (at a query boundary: a query's rows
//!   never straddle two parts), and is written atomically (temporary file +
//!   rename, [`AtomicFile`]);
//! * the manifest [`MANIFEST_NAME`] (`_manifest.json`), written last by
//!   [`write_manifest`]: format version, the part list with row and query
//!   counts and min / max query index, the Arrow schema as JSON and the run's
//!   `_meta`.
//!
//! **The manifest is the commit point.**  Part files appear one by one while
//! a run goes on, and a run that dies leaves some of them behind; only a
//! manifest says the dataset is complete and which files belong to it.
//! Readers must go through the manifest ([`read_dataset`]), never list the
//! directory; `leverflow merge` refuses a directory with part files but no
//! manifest.  [`prepare_dataset_dir`] removes an earlier manifest before a
//! new run writes parts, so a stale manifest never vouches for new files.
//!
//! Each process writes only its own parts (the names carry process and
//! worker), so processes never write the same file; one process (process 0)
//! writes the manifest once every worker has finished its parts.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::{Array, UInt64Array};
use arrow::datatypes::Schema;
use leverflow_schemas::RlRecord;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{AtomicFile, ParquetOptions, ParquetSink, SinkError};

/// File name of a dataset's manifest (the commit point).
pub const MANIFEST_NAME: &str = "_manifest.json";

/// Value of the manifest's `format` key.
pub const MANIFEST_FORMAT: &str = "leverflow-parts";

/// Version of the manifest layout this code writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// The file name of part `seq` of `worker` in `process`:
/// `part-<process:05>-<worker:05>-<seq:06>.parquet` (wider numbers are
/// written in full).
pub fn part_file_name(process: usize, worker: usize, seq: usize) -> String {
    format!("part-{process:05}-{worker:05}-{seq:06}.parquet")
}

/// Parses a part file name into `(process, worker, seq)`; `None` for any
/// other name (temporary files, the manifest, foreign files).
pub fn parse_part_file_name(name: &str) -> Option<(usize, usize, usize)> {
    let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let mut it = stem.split('-');
    let mut num = || -> Option<usize> {
        let s = it.next()?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let parsed = (num()?, num()?, num()?);
    if it.next().is_some() {
        return None;
    }
    Some(parsed)
}

/// One part file as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// File name, relative to the dataset directory.
    pub file: String,
    /// Timely process that wrote it.
    pub process: usize,
    /// Worker (index within its process) that wrote it.
    pub worker: usize,
    /// Sequence number within the worker's parts.
    pub seq: usize,
    /// Parquet rows (one per candidate).
    pub rows: u64,
    /// Queries (records).
    pub queries: u64,
    /// Smallest query index (`None` for an empty part).
    pub min_query: Option<u64>,
    /// Largest query index (`None` for an empty part).
    pub max_query: Option<u64>,
}

/// Options of [`PartWriter`].
#[derive(Debug, Clone, PartialEq)]
pub struct PartOptions {
    /// Parquet writer options (schema flags, batch and row-group sizes).
    pub parquet: ParquetOptions,
    /// A part is closed, and the next record starts part `seq + 1`, once it
    /// holds at least this many rows.
    pub rows_per_part: u64,
}

impl Default for PartOptions {
    fn default() -> Self {
        PartOptions {
            parquet: ParquetOptions::default(),
            rows_per_part: 1 << 20,
        }
    }
}

/// The part being written.
struct OpenPart {
    sink: ParquetSink,
    info: PartInfo,
}

/// Writes one worker's part files into a dataset directory.
///
/// Records go in with [`PartWriter::write_record`], strictly ascending in
/// query index *within a part*.  Two ways to feed it:
///
/// * the worker's records sorted by query index,
///   then one ascending pass: parts ascend across `seq` too;
/// * sorted runs as they complete (e.g. the records of a finished timely
///   round, sorted), with [`PartWriter::roll`] between runs: parts may
///   overlap in query range, which `merge` handles (a k-way merge).
///
/// A record without candidates is refused: Parquet has one row per
/// candidate, so it could not be read back.  Dropping the writer without
/// [`PartWriter::finish`] removes the part in progress (finished parts stay,
/// but no manifest lists them).
pub struct PartWriter {
    dir: PathBuf,
    process: usize,
    worker: usize,
    options: PartOptions,
    current: Option<OpenPart>,
    done: Vec<PartInfo>,
    next_seq: usize,
}

impl PartWriter {
    /// Opens the writer of `worker` in `process`, creating `dir` if needed
    /// and removing part files of this (process, worker) left in `dir` by an
    /// earlier run.  No file is created until the first record (or
    /// [`PartWriter::finish`]).
    pub fn create(
        dir: impl AsRef<Path>,
        process: usize,
        worker: usize,
        options: PartOptions,
    ) -> Result<Self, SinkError> {
        let dir = dir.as_ref().to_path_buf();
        if options.rows_per_part == 0 {
            return Err(SinkError::invalid(&dir, "rows_per_part must be at least 1"));
        }
        fs::create_dir_all(&dir)
            .map_err(|e| SinkError::io(&dir, "creating the dataset directory", e))?;
        for entry in read_dir_names(&dir)? {
            if let Some((p, w, _)) = parse_part_file_name(&entry) {
                if p == process && w == worker {
                    let path = dir.join(&entry);
                    fs::remove_file(&path).map_err(|e| {
                        SinkError::io(&path, "removing a part of an earlier run", e)
                    })?;
                }
            }
        }
        Ok(PartWriter {
            dir,
            process,
            worker,
            options,
            current: None,
            done: Vec::new(),
            next_seq: 0,
        })
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open_part(&mut self) -> Result<OpenPart, SinkError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let file = part_file_name(self.process, self.worker, seq);
        let sink = ParquetSink::create(self.dir.join(&file), self.options.parquet.clone())?;
        Ok(OpenPart {
            sink,
            info: PartInfo {
                file,
                process: self.process,
                worker: self.worker,
                seq,
                rows: 0,
                queries: 0,
                min_query: None,
                max_query: None,
            },
        })
    }

    /// Appends the record of `query_index` (strictly greater than the
    /// previous one of the current part, equal to `record.query.query_id`,
    /// with at least one candidate).
    pub fn write_record(&mut self, query_index: u64, record: &RlRecord) -> Result<(), SinkError> {
        if record.pointer_candidates.is_empty() {
            let file = part_file_name(self.process, self.worker, self.next_seq);
            return Err(SinkError::invalid(
                &self.dir.join(file),
                format!(
                    "query {query_index} has no candidates: a Parquet part holds one row per candidate, so the record could not be read back"
                ),
            ));
        }
        let mut part = match self.current.take() {
            Some(p) => p,
            None => self.open_part()?,
        };
        if let Err(e) = part.sink.write_record(query_index, record) {
            // The sink checks a record before writing any of it: the part
            // is intact, keep it.
            self.current = Some(part);
            return Err(e);
        }
        let info = &mut part.info;
        info.rows += record.pointer_candidates.len() as u64;
        info.queries += 1;
        info.min_query.get_or_insert(query_index);
        info.max_query = Some(query_index);
        if info.rows >= self.options.rows_per_part {
            self.close(part)?;
        } else {
            self.current = Some(part);
        }
        Ok(())
    }

    fn close(&mut self, part: OpenPart) -> Result<(), SinkError> {
        let meta =
            json!({"part": {"process": self.process, "worker": self.worker, "seq": part.info.seq}});
        part.sink.finish(&meta)?;
        self.done.push(part.info);
        Ok(())
    }

    /// Closes the current part (if any records went in since the last
    /// roll); the next record starts a new part, so it may have a smaller
    /// query index than the previous one.
    pub fn roll(&mut self) -> Result<(), SinkError> {
        match self.current.take() {
            Some(p) => self.close(p),
            None => Ok(()),
        }
    }

    /// Closes the last part and returns every part written, in `seq` order.
    /// A worker that wrote no record writes one empty part, so the manifest
    /// shows that it ran.
    pub fn finish(mut self) -> Result<Vec<PartInfo>, SinkError> {
        self.roll()?;
        if self.done.is_empty() {
            let part = self.open_part()?;
            self.close(part)?;
        }
        Ok(std::mem::take(&mut self.done))
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, SinkError> {
    let mut names = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| SinkError::io(dir, "listing", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| SinkError::io(dir, "listing", e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Makes `dir` ready for a new run: creates it, and removes an earlier
/// run's manifest (so it cannot vouch for the new run's part files).  Call
/// it once (process 0) before the workers open their [`PartWriter`]s.
pub fn prepare_dataset_dir(dir: impl AsRef<Path>) -> Result<(), SinkError> {
    let dir = dir.as_ref();
    fs::create_dir_all(dir).map_err(|e| SinkError::io(dir, "creating the dataset directory", e))?;
    let manifest = dir.join(MANIFEST_NAME);
    match fs::remove_file(&manifest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SinkError::io(
            &manifest,
            "removing the manifest of an earlier run",
            e,
        )),
    }
}

/// The Arrow schema as JSON, for the manifest: its fields (name, type as
/// Arrow prints it, nullability, field metadata sorted by key).  Schema-level
/// metadata (which includes each file's `_meta`) is left out.
pub fn schema_to_json(schema: &Schema) -> Value {
    let fields: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| {
            let meta: BTreeMap<&String, &String> = f.metadata().iter().collect();
            json!({
                "name": f.name(),
                "data_type": f.data_type().to_string(),
                "nullable": f.is_nullable(),
                "metadata": meta,
            })
        })
        .collect();
    json!({ "fields": fields })
}

/// What a part file's footer and `query_id` column say.
#[derive(Debug, Clone, PartialEq)]
pub struct PartFileSummary {
    /// Rows in the footer.
    pub rows: u64,
    /// The schema as [`schema_to_json`] writes it.
    pub schema: Value,
}

/// Reads the row count and schema from a Parquet file's footer.
pub fn part_file_summary(path: &Path) -> Result<PartFileSummary, SinkError> {
    let builder = super::parquet::open_reader_builder(path)?;
    let rows = builder.metadata().file_metadata().num_rows();
    let rows = u64::try_from(rows)
        .map_err(|_| SinkError::invalid(path, format!("negative row count {rows} in footer")))?;
    Ok(PartFileSummary {
        rows,
        schema: schema_to_json(builder.schema()),
    })
}

/// Describes an existing part file of `dir` by reading it (footer and the
/// `query_id` column): for a process that did not receive the
/// [`PartInfo`]s of the other processes' writers and lists the directory
/// instead (trusting it holds no other run's parts).
pub fn describe_part(dir: &Path, file: &str) -> Result<PartInfo, SinkError> {
    let path = dir.join(file);
    let Some((process, worker, seq)) = parse_part_file_name(file) else {
        return Err(SinkError::invalid(
            &path,
            "not a part file name (part-<process>-<worker>-<seq>.parquet)",
        ));
    };
    let f = File::open(&path).map_err(|e| SinkError::io(&path, "opening", e))?;
    let pq = |what: &str, e| SinkError::Parquet {
        path: path.clone(),
        what: what.to_string(),
        source: e,
    };
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| pq("reading footer", e))?;
    let Some(col) = builder
        .schema()
        .fields()
        .iter()
        .position(|f| f.name() == "query_id")
    else {
        return Err(SinkError::invalid(&path, "no query_id column"));
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), [col]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| pq("opening reader", e))?;
    let (mut rows, mut queries) = (0u64, 0u64);
    let (mut min, mut max): (Option<u64>, Option<u64>) = (None, None);
    for (b, batch) in reader.enumerate() {
        let batch = batch.map_err(|e| SinkError::Arrow {
            path: path.clone(),
            what: format!("reading record batch {b}"),
            source: e,
        })?;
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| SinkError::invalid(&path, "query_id is not UInt64"))?;
        for q in ids.values().iter().copied() {
            rows += 1;
            if max != Some(q) {
                if let Some(m) = max {
                    if q < m {
                        return Err(SinkError::invalid(
                            &path,
                            format!("row {}: query index {q} after {m}: a part must be sorted by query index", rows - 1),
                        ));
                    }
                }
                queries += 1;
                min.get_or_insert(q);
                max = Some(q);
            }
        }
    }
    Ok(PartInfo {
        file: file.to_string(),
        process,
        worker,
        seq,
        rows,
        queries,
        min_query: min,
        max_query: max,
    })
}

/// Lists and describes (with [`describe_part`]) every part file in `dir`,
/// in (process, worker, seq) order.
pub fn scan_parts(dir: impl AsRef<Path>) -> Result<Vec<PartInfo>, SinkError> {
    let dir = dir.as_ref();
    let mut parts = Vec::new();
    for name in read_dir_names(dir)? {
        if parse_part_file_name(&name).is_some() {
            parts.push(describe_part(dir, &name)?);
        }
    }
    parts.sort_by_key(|p| (p.process, p.worker, p.seq));
    Ok(parts)
}

/// The manifest of a dataset (`_manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Total rows over the parts.
    pub rows: u64,
    /// Total queries over the parts.
    pub queries: u64,
    /// The parts, in (process, worker, seq) order.
    pub parts: Vec<PartInfo>,
    /// The Arrow schema of every part ([`schema_to_json`]).
    pub schema: Value,
    /// The run's `_meta` (a JSON object), written last.
    #[serde(rename = "_meta")]
    pub meta: Value,
}

/// Writes the manifest of `dir` listing `parts`, with the run's `meta`,
/// atomically.  Call it last, once every part is finished: it is the
/// commit point.  Checks first that every part exists with the listed row
/// count and that all parts share one schema; errors name the file.
pub fn write_manifest(
    dir: impl AsRef<Path>,
    parts: &[PartInfo],
    meta: &Value,
) -> Result<Manifest, SinkError> {
    let dir = dir.as_ref();
    let path = dir.join(MANIFEST_NAME);
    super::check_meta(&path, meta)?;
    if parts.is_empty() {
        return Err(SinkError::invalid(&path, "no part files to list"));
    }
    let mut parts = parts.to_vec();
    parts.sort_by_key(|p| (p.process, p.worker, p.seq));
    let mut names = BTreeSet::new();
    let mut schema: Option<(String, Value)> = None;
    for p in &parts {
        if !names.insert(p.file.as_str()) {
            return Err(SinkError::invalid(
                &path,
                format!("part {} listed twice", p.file),
            ));
        }
        let summary = check_part(dir, p)?;
        match &schema {
            None => schema = Some((p.file.clone(), summary.schema)),
            Some((first, s)) if *s != summary.schema => {
                return Err(SinkError::invalid(
                    &dir.join(&p.file),
                    format!("schema differs from that of {first}"),
                ))
            }
            Some(_) => {}
        }
    }
    let schema = schema.map(|(_, s)| s).unwrap_or(Value::Null);
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        version: MANIFEST_VERSION,
        rows: parts.iter().map(|p| p.rows).sum(),
        queries: parts.iter().map(|p| p.queries).sum(),
        parts,
        schema,
        meta: meta.clone(),
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| SinkError::json(&path, "serialising the manifest", e))?;
    let mut out = AtomicFile::create(&path)?;
    out.write_all(&text)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(|e| SinkError::io(&path, "writing", e))?;
    out.finish()?;
    Ok(manifest)
}

/// Checks that part `p` of `dir` exists and has `p.rows` rows.
fn check_part(dir: &Path, p: &PartInfo) -> Result<PartFileSummary, SinkError> {
    let file = dir.join(&p.file);
    if parse_part_file_name(&p.file).is_none() || p.file.contains(['/', '\\']) {
        return Err(SinkError::invalid(&file, "not a part file name"));
    }
    if !file.is_file() {
        return Err(SinkError::invalid(
            &file,
            "part file listed in the manifest is missing",
        ));
    }
    let summary = part_file_summary(&file)?;
    if summary.rows != p.rows {
        return Err(SinkError::invalid(
            &file,
            format!(
                "has {} rows but the manifest lists {}",
                summary.rows, p.rows
            ),
        ));
    }
    Ok(summary)
}

/// Reads and checks the manifest of `dir` (format and version only; see
/// [`read_dataset`] for the files).
pub fn read_manifest(dir: impl AsRef<Path>) -> Result<Manifest, SinkError> {
    let path = dir.as_ref().join(MANIFEST_NAME);
    let text = fs::read(&path).map_err(|e| SinkError::io(&path, "reading the manifest", e))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| SinkError::json(&path, "parsing the manifest", e))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(SinkError::invalid(
            &path,
            format!(
                "format is {:?}, expected {MANIFEST_FORMAT:?}",
                manifest.format
            ),
        ));
    }
    if manifest.version != MANIFEST_VERSION {
        return Err(SinkError::invalid(
            &path,
            format!(
                "manifest version {} is not supported (this leverflow reads version {MANIFEST_VERSION})",
                manifest.version
            ),
        ));
    }
    Ok(manifest)
}

/// A checked dataset: its directory and manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The dataset directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Dataset {
    /// The paths of the part files, in manifest order.
    pub fn part_paths(&self) -> Vec<PathBuf> {
        self.manifest
            .parts
            .iter()
            .map(|p| self.dir.join(&p.file))
            .collect()
    }
}

/// Opens a dataset through its manifest and checks every listed part:
/// present, with the listed row count and the manifest's schema.  Errors
/// name the file.  This is how readers list a dataset (never by listing the
/// directory: the manifest is the commit point).
pub fn read_dataset(dir: impl AsRef<Path>) -> Result<Dataset, SinkError> {
    let dir = dir.as_ref();
    let manifest = read_manifest(dir)?;
    let manifest_path = dir.join(MANIFEST_NAME);
    let mut names = BTreeSet::new();
    for p in &manifest.parts {
        if !names.insert(p.file.as_str()) {
            return Err(SinkError::invalid(
                &manifest_path,
                format!("part {} listed twice", p.file),
            ));
        }
        let summary = check_part(dir, p)?;
        if summary.schema != manifest.schema {
            return Err(SinkError::invalid(
                &dir.join(&p.file),
                "schema differs from the manifest's",
            ));
        }
    }
    let rows: u64 = manifest.parts.iter().map(|p| p.rows).sum();
    if rows != manifest.rows {
        return Err(SinkError::invalid(
            &manifest_path,
            format!(
                "parts hold {rows} rows but the manifest total is {}",
                manifest.rows
            ),
        ));
    }
    Ok(Dataset {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// Whether `dir` holds part files (of any run).
pub fn has_part_files(dir: &Path) -> Result<bool, SinkError> {
    Ok(read_dir_names(dir)?
        .iter()
        .any(|n| parse_part_file_name(n).is_some()))
}
