//! `leverflow merge`: many sorted Parquet files → the single JSON file the
//! original training code reads (and optionally one merged Parquet file).
//!
//! Inputs ([`resolve_inputs`]) are any mix of
//!
//! * a dataset directory with a manifest (a multi-process run, see
//!   [`parts`](super::parts)): its parts, checked against the manifest;
//! * a directory without manifest holding plain single-file Parquet outputs
//!   (the original's `--start_idx/--end_idx` manual sharding): every
//!   `*.parquet` in it.  A directory with part files but no manifest is an
//!   error: the run that wrote them did not complete;
//! * a single-file Parquet output.
//!
//! Every file must be sorted by query index (leverflow writes them so).
//! [`merge`] runs a k-way merge: one [`ParquetRecordReader`] per file holds
//! one record batch of decoded rows, a binary heap holds each file's next
//! record, and records leave in ascending query index straight into the
//! [`JsonSink`] / [`ParquetSink`].  Memory is bounded by files × batch rows,
//! whatever the total size.  A query index found in two files is an error
//! naming both.
//!
//! The JSON is byte for byte what [`JsonSink`] writes for the same records
//! and `_meta` (the records are rebuilt from the rows as
//! [`rows_to_records`](super::rows_to_records) does).  `_meta` comes from
//! [`merged_meta`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use leverflow_schemas::{vqa_column_names, RlRecord};
use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
use serde_json::Value;

use super::parquet::{file_meta, open_reader_builder, read_batch};
use super::parts::{has_part_files, read_dataset, schema_to_json, MANIFEST_NAME};
use super::{JsonOptions, JsonSink, ParquetOptions, ParquetRow, ParquetSink, SinkError};

/// One Parquet file to merge.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeFile {
    /// Its path.
    pub path: PathBuf,
    /// Rows the manifest lists for it (checked after reading), if known.
    pub expected_rows: Option<u64>,
}

/// The `_meta` of one input (a manifest's, or a plain file's key-value one).
#[derive(Debug, Clone, PartialEq)]
pub struct InputMeta {
    /// The input as given (directory or file).
    pub input: PathBuf,
    /// Its `_meta`, if it has one.
    pub meta: Option<Value>,
}

/// The resolved inputs of a merge.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MergeInputs {
    /// Every file, in input order.
    pub files: Vec<MergeFile>,
    /// One entry per dataset or plain file, in input order.
    pub metas: Vec<InputMeta>,
    /// Total queries when every input is a dataset with a manifest.
    pub expected_queries: Option<u64>,
}

fn plain_file(path: &Path) -> Result<(MergeFile, InputMeta), SinkError> {
    let builder = open_reader_builder(path)?;
    let meta = file_meta(path, builder.metadata())?;
    Ok((
        MergeFile {
            path: path.to_path_buf(),
            expected_rows: None,
        },
        InputMeta {
            input: path.to_path_buf(),
            meta,
        },
    ))
}

/// Resolves the command-line inputs (see the module documentation).  A
/// file listed twice (directly or through directories) is an error.
pub fn resolve_inputs(inputs: &[PathBuf]) -> Result<MergeInputs, SinkError> {
    let mut out = MergeInputs::default();
    let mut expected = Some(0u64);
    if inputs.is_empty() {
        return Err(SinkError::invalid(Path::new("."), "no input to merge"));
    }
    for input in inputs {
        if input.is_dir() {
            if input.join(MANIFEST_NAME).exists() {
                let dataset = read_dataset(input)?;
                for (p, path) in dataset.manifest.parts.iter().zip(dataset.part_paths()) {
                    out.files.push(MergeFile {
                        path,
                        expected_rows: Some(p.rows),
                    });
                }
                expected = expected.map(|e| e + dataset.manifest.queries);
                out.metas.push(InputMeta {
                    input: input.clone(),
                    meta: Some(dataset.manifest.meta),
                });
                continue;
            }
            if has_part_files(input)? {
                return Err(SinkError::invalid(
                    &input.join(MANIFEST_NAME),
                    "the directory holds part files but no manifest: the run that wrote them did not complete (the manifest is written last)",
                ));
            }
            expected = None;
            let mut names: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| SinkError::io(input, "listing", e))?
                .map(|e| {
                    e.map(|e| e.path())
                        .map_err(|e| SinkError::io(input, "listing", e))
                })
                .collect::<Result<_, _>>()?;
            names.retain(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                p.is_file() && name.is_some_and(|n| !n.starts_with('.') && n.ends_with(".parquet"))
            });
            names.sort();
            if names.is_empty() {
                return Err(SinkError::invalid(
                    input,
                    "no manifest and no .parquet file in the directory",
                ));
            }
            for path in names {
                let (file, meta) = plain_file(&path)?;
                out.files.push(file);
                out.metas.push(meta);
            }
        } else {
            expected = None;
            let (file, meta) = plain_file(input)?;
            out.files.push(file);
            out.metas.push(meta);
        }
    }
    let mut seen = std::collections::HashSet::new();
    for f in &out.files {
        let key = std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
        if !seen.insert(key) {
            return Err(SinkError::invalid(&f.path, "input file given twice"));
        }
    }
    out.expected_queries = expected;
    Ok(out)
}

/// The `_meta` of the merged output:
///
/// * no input has a `_meta` → `{}`;
/// * one distinct `_meta` among the inputs (one dataset, or shards whose
///   `_meta`s are equal) → that `_meta`, unchanged;
/// * several distinct ones (e.g. `--start_idx/--end_idx` shards, whose
///   counts and timings differ) → the first input's `_meta` with the key
///   `merged_from` set to `[{"input": path, "_meta": meta}, ...]` for every
///   input in order (`_meta` `null` when an input has none).
pub fn merged_meta(metas: &[InputMeta]) -> Value {
    let mut distinct: Vec<&Value> = Vec::new();
    for m in metas.iter().filter_map(|m| m.meta.as_ref()) {
        if !distinct.contains(&m) {
            distinct.push(m);
        }
    }
    match distinct.as_slice() {
        [] => Value::Object(Default::default()),
        [one] => (*one).clone(),
        [first, ..] => {
            let mut base = match first {
                Value::Object(o) => o.clone(),
                _ => Default::default(),
            };
            let from: Vec<Value> = metas
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "input": m.input.display().to_string(),
                        "_meta": m.meta.clone().unwrap_or(Value::Null),
                    })
                })
                .collect();
            base.insert("merged_from".into(), Value::Array(from));
            Value::Object(base)
        }
    }
}

/// One record read back from Parquet rows.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRecord {
    /// The query index (`query_id`).
    pub query_index: u64,
    /// The record, pointer fields in the JSON layout.
    pub record: RlRecord,
    /// Pool positions of each candidate's demonstrations (the `pointer_pos`
    /// column), which the JSON layout may leave out.
    pub positions: Vec<Vec<u64>>,
}

impl ReadRecord {
    /// The record as a [`ParquetSink`] takes it without a shared-pool list:
    /// shared-pool candidates carry their positions in `pointer_pos`.
    pub fn for_parquet(&self) -> RlRecord {
        let mut r = self.record.clone();
        if r.candidate_pool_ids.is_none() {
            for (c, p) in r.pointer_candidates.iter_mut().zip(&self.positions) {
                c.pointer_pos = Some(p.clone());
            }
        }
        r
    }
}

/// Reads the records of one sorted Parquet file, one record batch of rows in
/// memory at a time; checks that query indices strictly ascend.
pub struct ParquetRecordReader {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    schema: SchemaRef,
    meta: Option<Value>,
    rows: VecDeque<ParquetRow>,
    batch: usize,
    rows_read: u64,
    last: Option<u64>,
    exhausted: bool,
}

impl ParquetRecordReader {
    /// Opens `path`, decoding `batch_rows` rows at a time.
    pub fn open(path: impl AsRef<Path>, batch_rows: usize) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let pq = |what: &str, e| SinkError::Parquet {
            path: path.clone(),
            what: what.to_string(),
            source: e,
        };
        let builder = open_reader_builder(&path)?;
        let meta = file_meta(&path, builder.metadata())?;
        let schema = builder.schema().clone();
        let reader = builder
            .with_batch_size(batch_rows.max(1))
            .build()
            .map_err(|e| pq("opening reader", e))?;
        Ok(ParquetRecordReader {
            path,
            reader,
            schema,
            meta,
            rows: VecDeque::new(),
            batch: 0,
            rows_read: 0,
            last: None,
            exhausted: false,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's Arrow schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The file's `_meta` (key-value metadata), if any.
    pub fn meta(&self) -> Option<&Value> {
        self.meta.as_ref()
    }

    /// Decoded rows buffered (at most one record batch).
    pub fn buffered_rows(&self) -> usize {
        self.rows.len()
    }

    /// Rows read so far.
    pub fn rows_read(&self) -> u64 {
        self.rows_read
    }

    /// Makes sure a row is buffered unless the file is exhausted.
    fn fill(&mut self) -> Result<(), SinkError> {
        while self.rows.is_empty() && !self.exhausted {
            match self.reader.next() {
                None => self.exhausted = true,
                Some(batch) => {
                    let b = self.batch;
                    self.batch += 1;
                    let batch = batch.map_err(|e| SinkError::Arrow {
                        path: self.path.clone(),
                        what: format!("reading record batch {b}"),
                        source: e,
                    })?;
                    let rows = &mut self.rows;
                    read_batch(&self.path, b, &batch, &mut |row| {
                        rows.push_back(row);
                        Ok(())
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The next record, or `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<ReadRecord>, SinkError> {
        self.fill()?;
        let Some(first) = self.rows.pop_front() else {
            return Ok(None);
        };
        self.rows_read += 1;
        let q = first.query.query_id;
        if let Some(last) = self.last {
            if q <= last {
                let what = if q == last {
                    format!("query index {q} appears in two separate runs of rows")
                } else {
                    format!("query index {q} after {last}: the file is not sorted by query index")
                };
                return Err(SinkError::invalid(&self.path, what));
            }
        }
        if first.candidate_index != 0 {
            return Err(SinkError::invalid(
                &self.path,
                format!(
                    "query {q}: first row has candidate_index {}",
                    first.candidate_index
                ),
            ));
        }
        let mut positions = vec![first.pointer_pos];
        let mut record = RlRecord {
            query: first.query,
            candidate_pool_ids: first.candidate_pool_ids,
            pointer_candidates: vec![first.candidate],
        };
        loop {
            self.fill()?;
            match self.rows.front() {
                Some(r) if r.query.query_id == q && r.candidate_index != 0 => {}
                _ => break,
            }
            let Some(row) = self.rows.pop_front() else {
                break;
            };
            self.rows_read += 1;
            positions.push(row.pointer_pos);
            record.pointer_candidates.push(row.candidate);
        }
        self.last = Some(q);
        Ok(Some(ReadRecord {
            query_index: q,
            record,
            positions,
        }))
    }
}

/// Where and how [`merge`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOutputs {
    /// The merged JSON (the original format), if wanted.
    pub json: Option<PathBuf>,
    /// JSON options.
    pub json_options: JsonOptions,
    /// A merged single Parquet file, if wanted.
    pub parquet: Option<PathBuf>,
    /// Rows decoded at a time per input file (the memory bound).
    pub batch_rows: usize,
    /// Row-group size and zstd level of the merged Parquet (schema flags
    /// come from the inputs).
    pub parquet_options: ParquetOptions,
}

impl Default for MergeOutputs {
    fn default() -> Self {
        MergeOutputs {
            json: None,
            json_options: JsonOptions::default(),
            parquet: None,
            batch_rows: 1024,
            parquet_options: ParquetOptions::default(),
        }
    }
}

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    /// Records (queries) written.
    pub queries: u64,
    /// Parquet rows (candidates) read.
    pub rows: u64,
    /// Input files.
    pub files: usize,
    /// The `_meta` written.
    pub meta: Value,
}

/// Merges `inputs` into `outputs` (see the module documentation), calling
/// `progress(queries, rows)` after each record.  Nothing appears at an
/// output path unless the whole merge succeeds.
pub fn merge(
    inputs: &MergeInputs,
    outputs: &MergeOutputs,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeSummary, SinkError> {
    if outputs.json.is_none() && outputs.parquet.is_none() {
        return Err(SinkError::invalid(
            Path::new("."),
            "merge: no output requested",
        ));
    }
    let mut readers = Vec::with_capacity(inputs.files.len());
    let mut first_schema: Option<(PathBuf, Value)> = None;
    for f in &inputs.files {
        let reader = ParquetRecordReader::open(&f.path, outputs.batch_rows)?;
        let schema = schema_to_json(reader.schema());
        match &first_schema {
            None => first_schema = Some((f.path.clone(), schema)),
            Some((p, s)) if *s != schema => {
                return Err(SinkError::invalid(
                    &f.path,
                    format!("columns differ from those of {}", p.display()),
                ))
            }
            Some(_) => {}
        }
        readers.push(reader);
    }
    let meta = merged_meta(&inputs.metas);

    let mut json = match &outputs.json {
        Some(p) => Some(JsonSink::create(p, outputs.json_options.clone())?),
        None => None,
    };
    let mut parquet = match (&outputs.parquet, readers.first()) {
        (Some(p), first) => {
            let has = |name: &str| {
                first.is_some_and(|r| r.schema().fields().iter().any(|f| f.name() == name))
            };
            let vqa = vqa_column_names();
            let options = ParquetOptions {
                per_query_pool: has("candidate_pool_ids"),
                with_vqa: vqa.iter().any(|n| has(n)),
                with_prompts: has("prompt_text"),
                shared_pool: None,
                ..outputs.parquet_options.clone()
            };
            Some(ParquetSink::create(p, options)?)
        }
        (None, _) => None,
    };

    let mut heads: Vec<Option<ReadRecord>> = Vec::with_capacity(readers.len());
    let mut heap = BinaryHeap::new();
    for (i, r) in readers.iter_mut().enumerate() {
        let head = r.next_record()?;
        if let Some(h) = &head {
            heap.push(Reverse((h.query_index, i)));
        }
        heads.push(head);
    }
    let (mut queries, mut rows) = (0u64, 0u64);
    while let Some(Reverse((q, i))) = heap.pop() {
        if let Some(Reverse((q2, j))) = heap.peek() {
            if *q2 == q {
                return Err(SinkError::invalid(
                    readers[i].path(),
                    format!(
                        "query index {q} is also in {}: the inputs overlap",
                        readers[*j].path().display()
                    ),
                ));
            }
        }
        let Some(rec) = heads[i].take() else {
            continue;
        };
        if let Some(p) = parquet.as_mut() {
            p.write_record(q, &rec.for_parquet())?;
        }
        if let Some(j) = json.as_mut() {
            j.write_record(q, &rec.record)?;
        }
        queries += 1;
        rows += rec.record.pointer_candidates.len() as u64;
        progress(queries, rows);
        let next = readers[i].next_record()?;
        if let Some(n) = &next {
            heap.push(Reverse((n.query_index, i)));
        }
        heads[i] = next;
    }
    for (f, r) in inputs.files.iter().zip(&readers) {
        if let Some(want) = f.expected_rows {
            if r.rows_read() != want {
                return Err(SinkError::invalid(
                    &f.path,
                    format!("read {} rows but the manifest lists {want}", r.rows_read()),
                ));
            }
        }
    }
    if let Some(want) = inputs.expected_queries {
        if queries != want {
            return Err(SinkError::invalid(
                &inputs
                    .files
                    .first()
                    .map(|f| f.path.clone())
                    .unwrap_or_default(),
                format!("merged {queries} queries but the manifests list {want}"),
            ));
        }
    }
    if let Some(j) = json {
        j.finish(&meta)?;
    }
    if let Some(p) = parquet {
        p.finish(&meta)?;
    }
    Ok(MergeSummary {
        queries,
        rows,
        files: inputs.files.len(),
        meta,
    })
}
