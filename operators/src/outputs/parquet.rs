//! Parquet output for analytics: one row per candidate with the query fields
//! repeated (schema: [`leverflow_schemas::arrow_schema`]).  Unlike the JSON,
//! `pointer` is always dataset indices and `pointer_pos` always pool
//! positions.  Rows are buffered into record batches of
//! [`ParquetOptions::batch_rows`] rows, compressed with zstd, with page-level
//! statistics; `_meta` is stored as a JSON string in the file key-value
//! metadata under [`PARQUET_META_KEY`].  Writes go through an [`AtomicFile`].

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float64Array, Float64Builder, ListArray,
    ListBuilder, StringArray, StringBuilder, UInt32Array, UInt32Builder, UInt64Array,
    UInt64Builder, UInt8Array, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use leverflow_schemas::{
    arrow_schema_of, CandidateRecord, QueryRecord, RlRecord, PARQUET_META_KEY,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnWriter, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::KeyValue;
use parquet::file::metadata::{
    PageIndexPolicy, ParquetMetaData, ParquetMetaDataOptions, ParquetMetaDataReader,
};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use serde_json::Value;

use super::{AtomicFile, SealedFile, SinkError};

/// Default queries per output segment (see [`ParquetOptions::segment_queries`]):
/// about 70,000 rows at ~8 candidates per query, a good row-group size for
/// analytics, while a rerun that adds 1 % new queries re-encodes only the
/// segments they fall in.
pub const DEFAULT_SEGMENT_QUERIES: u64 = 8192;

/// The output segment of query `q` with `segment_queries` queries per
/// segment (0: one segment).
pub fn segment_of(q: u64, segment_queries: u64) -> u64 {
    q.checked_div(segment_queries).unwrap_or(0)
}

/// Options of [`ParquetSink`]; the four flags pick the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetOptions {
    /// The query's dataset columns (`question_id`, `image_id`, `question`,
    /// `gt_answers_raw`, `gt_answers_norm`); without them (a `candidates`
    /// run without the training split) records carry `query_id` only.
    pub with_dataset: bool,
    /// Per-query pools (`--sampler_cache`): adds `candidate_pool_ids`; records
    /// must carry `candidate_pool_ids` and `pointer_global`.
    pub per_query_pool: bool,
    /// Adds the VQA / reward columns.  Without it, a record with any VQA field
    /// is an error (nothing is dropped silently).
    pub with_vqa: bool,
    /// Adds `prompt_text`.  Without it, a record with a prompt is an error.
    pub with_prompts: bool,
    /// Shared pool with `--candidate_indices`: the dataset index at each pool
    /// position.  Needed to fill `pointer_pos` when records omit it.
    pub shared_pool: Option<Vec<u64>>,
    /// Rows per record batch.
    pub batch_rows: usize,
    /// Most rows per row group (the writer holds one row group in memory).
    pub row_group_rows: usize,
    /// Queries per output segment: a row group never holds queries of two
    /// segments (segment = query index / `segment_queries`; 0: no segment
    /// cuts). Segments are the unit a rerun copies unchanged from the
    /// previous output ([`ParquetSink::copy_row_groups`]), and since they
    /// depend only on query indices, an output's row groups are the same
    /// however the run was reached.
    pub segment_queries: u64,
    /// zstd compression level (1..=22).
    pub zstd_level: i32,
}

impl Default for ParquetOptions {
    fn default() -> Self {
        ParquetOptions {
            with_dataset: true,
            per_query_pool: false,
            with_vqa: false,
            with_prompts: false,
            shared_pool: None,
            batch_rows: 8192,
            row_group_rows: 128 * 1024,
            segment_queries: DEFAULT_SEGMENT_QUERIES,
            zstd_level: 3,
        }
    }
}

fn list_builder<T: arrow::array::ArrayBuilder>(values: T, item: DataType) -> ListBuilder<T> {
    ListBuilder::new(values).with_field(Arc::new(Field::new_list_field(item, false)))
}

/// The VQA / reward column builders.
struct VqaColumns {
    raw_generation: StringBuilder,
    pred_answer: StringBuilder,
    correct: UInt8Builder,
    acc_score: Float64Builder,
    gt_prob: Float64Builder,
    rel_token_f1: Float64Builder,
    rel_edit_sim: Float64Builder,
    rel_score: Float64Builder,
    eval_mode: StringBuilder,
    eval_split_used: StringBuilder,
    eval_failed: BooleanBuilder,
    reward: Float64Builder,
    advantage: Float64Builder,
}

impl VqaColumns {
    fn new() -> Self {
        VqaColumns {
            raw_generation: StringBuilder::new(),
            pred_answer: StringBuilder::new(),
            correct: UInt8Builder::new(),
            acc_score: Float64Builder::new(),
            gt_prob: Float64Builder::new(),
            rel_token_f1: Float64Builder::new(),
            rel_edit_sim: Float64Builder::new(),
            rel_score: Float64Builder::new(),
            eval_mode: StringBuilder::new(),
            eval_split_used: StringBuilder::new(),
            eval_failed: BooleanBuilder::new(),
            reward: Float64Builder::new(),
            advantage: Float64Builder::new(),
        }
    }

    fn append(&mut self, c: &CandidateRecord) {
        self.raw_generation
            .append_option(c.vqa_raw_generation.as_deref());
        self.pred_answer.append_option(c.vqa_pred_answer.as_deref());
        self.correct.append_option(c.vqa_correct);
        self.acc_score.append_option(c.vqa_acc_score);
        self.gt_prob.append_option(c.vqa_gt_prob);
        self.rel_token_f1.append_option(c.vqa_rel_token_f1);
        self.rel_edit_sim.append_option(c.vqa_rel_edit_sim);
        self.rel_score.append_option(c.vqa_rel_score);
        self.eval_mode.append_option(c.vqa_eval_mode.as_deref());
        self.eval_split_used
            .append_option(c.eval_split_used.as_deref());
        self.eval_failed.append_option(c.eval_failed);
        self.reward.append_option(c.reward);
        self.advantage.append_option(c.advantage);
    }

    fn finish(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.raw_generation.finish()));
        out.push(Arc::new(self.pred_answer.finish()));
        out.push(Arc::new(self.correct.finish()));
        out.push(Arc::new(self.acc_score.finish()));
        out.push(Arc::new(self.gt_prob.finish()));
        out.push(Arc::new(self.rel_token_f1.finish()));
        out.push(Arc::new(self.rel_edit_sim.finish()));
        out.push(Arc::new(self.rel_score.finish()));
        out.push(Arc::new(self.eval_mode.finish()));
        out.push(Arc::new(self.eval_split_used.finish()));
        out.push(Arc::new(self.eval_failed.finish()));
        out.push(Arc::new(self.reward.finish()));
        out.push(Arc::new(self.advantage.finish()));
    }
}

/// The query's dataset column builders.
struct DatasetColumns {
    question_id: UInt64Builder,
    image_id: UInt64Builder,
    question: StringBuilder,
    gt_answers_raw: ListBuilder<StringBuilder>,
    gt_answers_norm: ListBuilder<StringBuilder>,
}

impl DatasetColumns {
    fn new() -> Self {
        Self {
            question_id: UInt64Builder::new(),
            image_id: UInt64Builder::new(),
            question: StringBuilder::new(),
            gt_answers_raw: list_builder(StringBuilder::new(), DataType::Utf8),
            gt_answers_norm: list_builder(StringBuilder::new(), DataType::Utf8),
        }
    }

    /// Appends the fields of `q` (checked present by the sink).
    fn append(&mut self, q: &QueryRecord) {
        self.question_id.append_option(q.question_id);
        self.image_id.append_option(q.image_id);
        self.question.append_option(q.question.as_deref());
        let strs = |v: &Option<Vec<String>>| -> Vec<Option<String>> {
            v.iter().flatten().map(|s| Some(s.clone())).collect()
        };
        self.gt_answers_raw.append_value(strs(&q.gt_answers_raw));
        self.gt_answers_norm.append_value(strs(&q.gt_answers_norm));
    }

    fn finish(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.question_id.finish()));
        out.push(Arc::new(self.image_id.finish()));
        out.push(Arc::new(self.question.finish()));
        out.push(Arc::new(self.gt_answers_raw.finish()));
        out.push(Arc::new(self.gt_answers_norm.finish()));
    }
}

/// Column builders for one record batch, in schema order.
struct Columns {
    query_id: UInt64Builder,
    dataset: Option<DatasetColumns>,
    candidate_pool_ids: Option<ListBuilder<UInt64Builder>>,
    candidate_index: UInt32Builder,
    pointer: ListBuilder<UInt64Builder>,
    pointer_pos: ListBuilder<UInt64Builder>,
    gen_method: StringBuilder,
    beam_rank: UInt32Builder,
    beam_score: Float64Builder,
    logprob_score: Float64Builder,
    temperature: Float64Builder,
    sample_logprob_tempered: Float64Builder,
    vqa: Option<VqaColumns>,
    prompt_text: Option<StringBuilder>,
    rows: usize,
}

impl Columns {
    fn new(o: &ParquetOptions) -> Self {
        Columns {
            query_id: UInt64Builder::new(),
            dataset: o.with_dataset.then(DatasetColumns::new),
            candidate_pool_ids: o
                .per_query_pool
                .then(|| list_builder(UInt64Builder::new(), DataType::UInt64)),
            candidate_index: UInt32Builder::new(),
            pointer: list_builder(UInt64Builder::new(), DataType::UInt64),
            pointer_pos: list_builder(UInt64Builder::new(), DataType::UInt64),
            gen_method: StringBuilder::new(),
            beam_rank: UInt32Builder::new(),
            beam_score: Float64Builder::new(),
            logprob_score: Float64Builder::new(),
            temperature: Float64Builder::new(),
            sample_logprob_tempered: Float64Builder::new(),
            vqa: o.with_vqa.then(VqaColumns::new),
            prompt_text: o.with_prompts.then(StringBuilder::new),
            rows: 0,
        }
    }

    fn append(
        &mut self,
        q: &QueryRecord,
        pool: Option<&[u64]>,
        index: u32,
        c: &CandidateRecord,
        dataset_indices: &[u64],
        positions: &[u64],
    ) {
        self.query_id.append_value(q.query_id);
        if let Some(d) = self.dataset.as_mut() {
            d.append(q);
        }
        if let (Some(b), Some(pool)) = (self.candidate_pool_ids.as_mut(), pool) {
            b.append_value(pool.iter().map(|&x| Some(x)));
        }
        self.candidate_index.append_value(index);
        self.pointer
            .append_value(dataset_indices.iter().map(|&x| Some(x)));
        self.pointer_pos
            .append_value(positions.iter().map(|&x| Some(x)));
        self.gen_method.append_value(&c.gen_method);
        self.beam_rank.append_option(c.beam_rank);
        self.beam_score.append_option(c.beam_score);
        self.logprob_score.append_value(c.logprob_score);
        self.temperature.append_option(c.temperature);
        self.sample_logprob_tempered
            .append_option(c.sample_logprob_tempered);
        if let Some(v) = self.vqa.as_mut() {
            v.append(c);
        }
        if let Some(p) = self.prompt_text.as_mut() {
            p.append_option(c.prompt_text.as_deref());
        }
        self.rows += 1;
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        let mut out: Vec<ArrayRef> = vec![Arc::new(self.query_id.finish())];
        if let Some(d) = self.dataset.as_mut() {
            d.finish(&mut out);
        }
        if let Some(b) = self.candidate_pool_ids.as_mut() {
            out.push(Arc::new(b.finish()));
        }
        out.push(Arc::new(self.candidate_index.finish()));
        out.push(Arc::new(self.pointer.finish()));
        out.push(Arc::new(self.pointer_pos.finish()));
        out.push(Arc::new(self.gen_method.finish()));
        out.push(Arc::new(self.beam_rank.finish()));
        out.push(Arc::new(self.beam_score.finish()));
        out.push(Arc::new(self.logprob_score.finish()));
        out.push(Arc::new(self.temperature.finish()));
        out.push(Arc::new(self.sample_logprob_tempered.finish()));
        if let Some(v) = self.vqa.as_mut() {
            v.finish(&mut out);
        }
        if let Some(p) = self.prompt_text.as_mut() {
            out.push(Arc::new(p.finish()));
        }
        self.rows = 0;
        out
    }
}

/// Streaming writer of the Parquet output.
///
/// Row groups are encoded with parquet's column writers directly (not
/// `ArrowWriter`) so that already encoded row groups of an earlier output
/// can be spliced in between freshly written ones
/// ([`ParquetSink::copy_row_groups`]).
pub struct ParquetSink {
    writer: SerializedFileWriter<AtomicFile>,
    factory: ArrowRowGroupWriterFactory,
    /// The row group being encoded.
    group: Option<OpenGroup>,
    schema: SchemaRef,
    columns: Columns,
    options: ParquetOptions,
    /// Shared pool: dataset index → position.
    position_of: Option<HashMap<u64, u64>>,
    path: PathBuf,
    last: Option<u64>,
    positions: Vec<u64>,
}

/// The column writers of the row group being encoded.
struct OpenGroup {
    writers: Vec<ArrowColumnWriter>,
    rows: usize,
}

/// An earlier Parquet output opened for copying row groups
/// ([`ParquetSink::copy_row_groups`]): the file and its footer, page
/// indexes included.
pub struct ParquetSource {
    file: std::fs::File,
    meta: ParquetMetaData,
    path: PathBuf,
}

impl ParquetSource {
    /// Opens `path` and reads its footer and page indexes.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| SinkError::io(&path, "opening", e))?;
        // Everything the writer put in each column chunk's metadata is kept
        // (page encoding statistics in full, not as the reader's default
        // bitmask), so a copied row group is described exactly as when it
        // was encoded.
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .with_metadata_options(Some(
                ParquetMetaDataOptions::new().with_encoding_stats_as_mask(false),
            ))
            .parse_and_finish(&file)
            .map_err(|e| SinkError::Parquet {
                path: path.clone(),
                what: "reading the footer".into(),
                source: e,
            })?;
        Ok(Self { file, meta, path })
    }

    /// Number of row groups.
    pub fn num_row_groups(&self) -> usize {
        self.meta.num_row_groups()
    }

    /// Rows of row group `i`.
    pub fn row_group_rows(&self, i: usize) -> Option<u64> {
        self.meta
            .row_groups()
            .get(i)
            .map(|rg| rg.num_rows().max(0) as u64)
    }
}

impl ParquetSink {
    /// Opens the output (a temporary file until [`ParquetSink::finish`]).
    pub fn create(path: impl AsRef<Path>, options: ParquetOptions) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        if options.batch_rows == 0 || options.row_group_rows == 0 {
            return Err(SinkError::invalid(
                &path,
                "batch_rows and row_group_rows must be at least 1",
            ));
        }
        let position_of = match &options.shared_pool {
            Some(pool) => {
                let mut map = HashMap::with_capacity(pool.len());
                for (pos, &idx) in pool.iter().enumerate() {
                    if map.insert(idx, pos as u64).is_some() {
                        return Err(SinkError::invalid(
                            &path,
                            format!("shared pool lists dataset index {idx} twice (position {pos})"),
                        ));
                    }
                }
                Some(map)
            }
            None => None,
        };
        let schema = Arc::new(arrow_schema_of(
            options.with_dataset,
            options.per_query_pool,
            options.with_vqa,
            options.with_prompts,
        ));
        let level = ZstdLevel::try_new(options.zstd_level).map_err(|e| SinkError::Parquet {
            path: path.clone(),
            what: "zstd level".into(),
            source: e,
        })?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(options.row_group_rows))
            .build();
        let out = AtomicFile::create(&path)?;
        let pq = |what: &str| {
            let path = path.clone();
            let what = what.to_string();
            move |source| SinkError::Parquet { path, what, source }
        };
        // ArrowWriter sets up the Parquet schema and the embedded Arrow
        // schema; the row groups are then written through its parts.
        let (writer, factory) = ArrowWriter::try_new(out, schema.clone(), Some(props))
            .map_err(pq("creating writer"))?
            .into_serialized_writer()
            .map_err(pq("creating writer"))?;
        Ok(ParquetSink {
            writer,
            factory,
            group: None,
            schema,
            columns: Columns::new(&options),
            options,
            position_of,
            path,
            last: None,
            positions: Vec::new(),
        })
    }

    /// The schema being written.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Appends one row per candidate of `record` (`query_index` strictly
    /// greater than the previous one and equal to `record.query.query_id`,
    /// which is what the `query_id` column stores).
    pub fn write_record(&mut self, query_index: u64, record: &RlRecord) -> Result<(), SinkError> {
        super::check_next(&self.path, self.last, query_index, record)?;
        if let Some(last) = self.last {
            let n = self.options.segment_queries;
            if segment_of(last, n) != segment_of(query_index, n) {
                self.cut_row_group()?;
            }
        }
        let q = &record.query;
        let complete = q.question_id.is_some()
            && q.image_id.is_some()
            && q.question.is_some()
            && q.gt_answers_raw.is_some()
            && q.gt_answers_norm.is_some();
        let bare = !q.has_dataset_fields() && q.question.is_none() && q.gt_answers_raw.is_none();
        if (self.options.with_dataset && !complete) || (!self.options.with_dataset && !bare) {
            return Err(SinkError::invalid(
                &self.path,
                format!(
                    "query {query_index}: the sink was opened {} the dataset's query fields, but the record {} them",
                    if self.options.with_dataset { "with" } else { "without" },
                    if complete { "has" } else if bare { "lacks" } else { "has some of" }
                ),
            ));
        }
        let pool = record.candidate_pool_ids.as_deref();
        if pool.is_some() != self.options.per_query_pool {
            return Err(SinkError::invalid(
                &self.path,
                format!(
                    "query {query_index}: record {} candidate_pool_ids but the sink was opened for {} pools",
                    if pool.is_some() { "has" } else { "lacks" },
                    if self.options.per_query_pool { "per-query" } else { "a shared pool" }
                ),
            ));
        }
        // Check every candidate before appending any row, so a bad record
        // leaves the batch untouched.
        let mut all_positions = std::mem::take(&mut self.positions);
        all_positions.clear();
        let checked = record
            .pointer_candidates
            .iter()
            .enumerate()
            .try_for_each(|(k, c)| {
                self.check_candidate(query_index, k, pool, c, &mut all_positions)
            });
        if let Err(e) = checked {
            self.positions = all_positions;
            return Err(e);
        }
        let mut start = 0;
        for (k, c) in record.pointer_candidates.iter().enumerate() {
            let n = c.pointer.len();
            let positions = &all_positions[start..start + n];
            start += n;
            let index = u32::try_from(k).unwrap_or(u32::MAX);
            self.columns.append(
                &record.query,
                pool,
                index,
                c,
                c.dataset_indices(),
                positions,
            );
            if self.columns.rows >= self.options.batch_rows {
                if let Err(e) = self.flush_batch() {
                    self.positions = all_positions;
                    return Err(e);
                }
            }
        }
        self.positions = all_positions;
        self.last = Some(query_index);
        Ok(())
    }

    /// Validates candidate `k` against the options and appends its pool positions to `out`.
    fn check_candidate(
        &self,
        query_index: u64,
        k: usize,
        pool: Option<&[u64]>,
        c: &CandidateRecord,
        out: &mut Vec<u64>,
    ) -> Result<(), SinkError> {
        let bad = |what: String| {
            SinkError::invalid(
                &self.path,
                format!("query {query_index}, candidate {k}: {what}"),
            )
        };
        if !self.options.with_vqa && c.has_vqa_fields() {
            return Err(bad(
                "has VQA fields but the sink was opened without VQA columns".into(),
            ));
        }
        if !self.options.with_prompts && c.prompt_text.is_some() {
            return Err(bad(
                "has prompt_text but the sink was opened without prompts".into(),
            ));
        }
        match pool {
            Some(pool) => {
                let Some(global) = c.pointer_global.as_deref() else {
                    return Err(bad("per-query pool candidate without pointer_global".into()));
                };
                if global.len() != c.pointer.len() {
                    return Err(bad("pointer and pointer_global differ in length".into()));
                }
                for (&p, &g) in c.pointer.iter().zip(global) {
                    let in_pool = usize::try_from(p).ok().and_then(|p| pool.get(p));
                    if in_pool != Some(&g) {
                        return Err(bad(format!(
                            "pool position {p} does not hold dataset index {g} in candidate_pool_ids"
                        )));
                    }
                }
                out.extend_from_slice(&c.pointer);
            }
            None => {
                if c.pointer_global.is_some() {
                    return Err(bad("shared-pool candidate with pointer_global".into()));
                }
                if let Some(pos) = c.pointer_pos.as_deref() {
                    if pos.len() != c.pointer.len() {
                        return Err(bad("pointer and pointer_pos differ in length".into()));
                    }
                    out.extend_from_slice(pos);
                } else if let Some(map) = &self.position_of {
                    for &g in &c.pointer {
                        let Some(&p) = map.get(&g) else {
                            return Err(bad(format!(
                                "dataset index {g} is not in the shared pool"
                            )));
                        };
                        out.push(p);
                    }
                } else {
                    return Err(bad(
                        "no pointer_pos and no shared pool index list to find the positions".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn pq_err(&self, what: &str) -> impl FnOnce(::parquet::errors::ParquetError) -> SinkError {
        let path = self.path.clone();
        let what = what.to_string();
        move |source| SinkError::Parquet { path, what, source }
    }

    fn flush_batch(&mut self) -> Result<(), SinkError> {
        if self.columns.rows == 0 {
            return Ok(());
        }
        let arrays = self.columns.finish();
        let batch =
            RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| SinkError::Arrow {
                path: self.path.clone(),
                what: "building a record batch".into(),
                source: e,
            })?;
        self.write_batch(batch)
    }

    /// Encodes `batch` into the open row group, closing it whenever it
    /// reaches `row_group_rows`.
    fn write_batch(&mut self, mut rest: RecordBatch) -> Result<(), SinkError> {
        let cap = self.options.row_group_rows;
        while rest.num_rows() > 0 {
            let group = match &mut self.group {
                Some(g) => g,
                None => {
                    let index = self.writer.flushed_row_groups().len();
                    let writers = self
                        .factory
                        .create_column_writers(index)
                        .map_err(self.pq_err("creating column writers"))?;
                    self.group.insert(OpenGroup { writers, rows: 0 })
                }
            };
            let take = (cap - group.rows).min(rest.num_rows());
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            let mut writers = group.writers.iter_mut();
            for (field, array) in self.schema.fields().iter().zip(part.columns()) {
                let leaves = compute_leaves(field, array).map_err({
                    let path = self.path.clone();
                    move |source| SinkError::Parquet {
                        path,
                        what: "encoding a record batch".into(),
                        source,
                    }
                })?;
                for leaf in leaves {
                    let w = writers.next().ok_or_else(|| {
                        SinkError::invalid(
                            &self.path,
                            "internal error: fewer column writers than leaves",
                        )
                    })?;
                    w.write(&leaf).map_err({
                        let path = self.path.clone();
                        move |source| SinkError::Parquet {
                            path,
                            what: "writing a record batch".into(),
                            source,
                        }
                    })?;
                }
            }
            group.rows += take;
            if group.rows >= cap {
                self.close_group()?;
            }
        }
        Ok(())
    }

    /// Closes the open row group (if any) into the file.
    fn close_group(&mut self) -> Result<(), SinkError> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        let err = self.pq_err("closing a row group");
        let result = (|| {
            let mut rg = self.writer.next_row_group()?;
            for w in group.writers {
                w.close()?.append_to_row_group(&mut rg)?;
            }
            rg.close().map(|_| ())
        })();
        result.map_err(err)
    }

    /// Ends the current row group here: rows written after this start a
    /// new one.
    pub fn cut_row_group(&mut self) -> Result<(), SinkError> {
        self.flush_batch()?;
        self.close_group()
    }

    /// Row groups completed so far (a row group is completed by
    /// [`ParquetSink::cut_row_group`], a segment change, the row cap, or a
    /// copy).
    pub fn row_groups_written(&self) -> usize {
        self.writer.flushed_row_groups().len()
    }

    /// Appends row groups `first..first + count` of `src` as they are (their
    /// encoded pages, statistics and page indexes; nothing is decoded), for
    /// queries `first_query..=last_query`, which must follow every query
    /// written so far. The current row group is closed first. `src` must
    /// have been written with the same options (schema) as this sink.
    pub fn copy_row_groups(
        &mut self,
        src: &ParquetSource,
        first: usize,
        count: usize,
        first_query: u64,
        last_query: u64,
    ) -> Result<(), SinkError> {
        if self.last.is_some_and(|l| first_query <= l) || last_query < first_query {
            return Err(SinkError::invalid(
                &self.path,
                format!(
                    "copied queries {first_query}..={last_query} do not follow query {:?}",
                    self.last
                ),
            ));
        }
        if src.meta.file_metadata().schema_descr().root_schema()
            != self.writer.schema_descr().root_schema()
        {
            return Err(SinkError::invalid(
                &src.path,
                "cannot copy row groups: the schema differs from the output's",
            ));
        }
        if first + count > src.num_row_groups() {
            return Err(SinkError::invalid(
                &src.path,
                format!(
                    "row groups {first}..{} asked for, the file has {}",
                    first + count,
                    src.num_row_groups()
                ),
            ));
        }
        self.cut_row_group()?;
        let err = {
            let path = self.path.clone();
            let from = src.path.display().to_string();
            move |source| SinkError::Parquet {
                path,
                what: format!("copying row groups from {from}"),
                source,
            }
        };
        let result = (|| {
            for i in first..first + count {
                let rg = &src.meta.row_groups()[i];
                let page_index = src.meta.page_index_for_row_group(i);
                let mut out = self.writer.next_row_group()?;
                for (j, column) in rg.columns().iter().enumerate() {
                    let close = ColumnCloseResult {
                        bytes_written: column.compressed_size() as u64,
                        rows_written: rg.num_rows() as u64,
                        metadata: column.clone(),
                        bloom_filter: None,
                        column_index: page_index.column_index(j).cloned(),
                        offset_index: page_index.offset_index(j).cloned(),
                    };
                    out.append_column(&src.file, close)?;
                }
                out.close()?;
            }
            Ok(())
        })();
        result.map_err(err)?;
        self.last = Some(last_query);
        Ok(())
    }

    /// Writes the last batch and `_meta` (key-value metadata
    /// [`PARQUET_META_KEY`]), closes the file and moves it into place.
    /// `meta` must be a JSON object.
    pub fn finish(self, meta: &Value) -> Result<(), SinkError> {
        self.seal(meta)?.publish()
    }

    /// Like [`ParquetSink::finish`], but leaves the complete, fsynced file
    /// under its temporary name until [`SealedFile::publish`].
    pub fn seal(mut self, meta: &Value) -> Result<SealedFile, SinkError> {
        super::check_meta(&self.path, meta)?;
        self.cut_row_group()?;
        let meta_text = serde_json::to_string(meta)
            .map_err(|e| SinkError::json(&self.path, "serialising _meta", e))?;
        self.writer
            .append_key_value_metadata(KeyValue::new(PARQUET_META_KEY.to_string(), meta_text));
        let err = self.pq_err("closing");
        let out = self.writer.into_inner().map_err(err)?;
        out.seal()
    }
}

/// One row of the Parquet output (one candidate).
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetRow {
    /// The query fields.
    pub query: QueryRecord,
    /// The query's pool (per-query pools only).
    pub candidate_pool_ids: Option<Vec<u64>>,
    /// Order of the candidate within its query.
    pub candidate_index: u32,
    /// Dataset indices of the demonstrations (the `pointer` column).
    pub pointer: Vec<u64>,
    /// Pool positions of the demonstrations (the `pointer_pos` column).
    pub pointer_pos: Vec<u64>,
    /// The candidate, its pointer fields rebuilt in the JSON layout: per-query
    /// pool when `candidate_pool_ids` is present; else shared pool, with
    /// `pointer_pos` kept only where positions equal dataset indices.
    pub candidate: CandidateRecord,
}

/// Opens a Parquet file and reads its footer (errors name the file).
pub(crate) fn open_reader_builder(
    path: &Path,
) -> Result<ParquetRecordBatchReaderBuilder<File>, SinkError> {
    let file = File::open(path).map_err(|e| SinkError::io(path, "opening", e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| SinkError::Parquet {
        path: path.to_path_buf(),
        what: "reading footer".into(),
        source: e,
    })
}

/// Streams a Parquet output: calls `on_row` for every row in file order
/// (one record batch in memory at a time) and returns `_meta` (if present).
pub fn visit_rl_parquet<F>(
    path: impl AsRef<Path>,
    mut on_row: F,
) -> Result<Option<Value>, SinkError>
where
    F: FnMut(ParquetRow) -> Result<(), SinkError>,
{
    let path = path.as_ref();
    let pq = |what: &str, e: parquet::errors::ParquetError| SinkError::Parquet {
        path: path.to_path_buf(),
        what: what.to_string(),
        source: e,
    };
    let builder = open_reader_builder(path)?;
    let meta = file_meta(path, builder.metadata())?;
    let reader = builder.build().map_err(|e| pq("opening reader", e))?;
    for (b, batch) in reader.enumerate() {
        let batch = batch.map_err(|e| SinkError::Arrow {
            path: path.to_path_buf(),
            what: format!("reading record batch {b}"),
            source: e,
        })?;
        read_batch(path, b, &batch, &mut on_row)?;
    }
    Ok(meta)
}

/// The `_meta` stored in a Parquet file's key-value metadata (if any).
pub(crate) fn file_meta(
    path: &Path,
    metadata: &parquet::file::metadata::ParquetMetaData,
) -> Result<Option<Value>, SinkError> {
    match metadata
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == PARQUET_META_KEY))
        .and_then(|k| k.value.as_deref())
    {
        Some(text) => Ok(Some(serde_json::from_str(text).map_err(|e| {
            SinkError::json(path, format!("key-value metadata {PARQUET_META_KEY}"), e)
        })?)),
        None => Ok(None),
    }
}

/// A whole Parquet output: `_meta` (if present) and the rows in file order.
pub type RlParquet = (Option<Value>, Vec<ParquetRow>);

/// Reads a Parquet output: `(_meta, rows in file order)`.
pub fn read_rl_parquet(path: impl AsRef<Path>) -> Result<RlParquet, SinkError> {
    let mut rows = Vec::new();
    let meta = visit_rl_parquet(path, |row| {
        rows.push(row);
        Ok(())
    })?;
    Ok((meta, rows))
}

/// Groups rows (as read, consecutive per query) back into `(query_id, record)`.
pub fn rows_to_records(rows: Vec<ParquetRow>) -> Vec<(u64, RlRecord)> {
    let mut out: Vec<(u64, RlRecord)> = Vec::new();
    for row in rows {
        match out.last_mut() {
            Some((id, rec)) if *id == row.query.query_id && row.candidate_index != 0 => {
                rec.pointer_candidates.push(row.candidate);
            }
            _ => out.push((
                row.query.query_id,
                RlRecord {
                    query: row.query,
                    candidate_pool_ids: row.candidate_pool_ids,
                    pointer_candidates: vec![row.candidate],
                },
            )),
        }
    }
    out
}

fn column<'a, T: 'static>(
    path: &Path,
    b: usize,
    batch: &'a RecordBatch,
    name: &str,
) -> Result<Option<&'a T>, SinkError> {
    let Some(col) = batch.column_by_name(name) else {
        return Ok(None);
    };
    col.as_any().downcast_ref::<T>().map(Some).ok_or_else(|| {
        SinkError::invalid(
            path,
            format!("batch {b}: column {name} has type {}", col.data_type()),
        )
    })
}

fn required<'a, T: 'static>(
    path: &Path,
    b: usize,
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a T, SinkError> {
    column(path, b, batch, name)?
        .ok_or_else(|| SinkError::invalid(path, format!("batch {b}: missing column {name}")))
}

fn opt_f64(a: Option<&Float64Array>, i: usize) -> Option<f64> {
    a.and_then(|a| (!a.is_null(i)).then(|| a.value(i)))
}

fn opt_str(a: Option<&StringArray>, i: usize) -> Option<String> {
    a.and_then(|a| (!a.is_null(i)).then(|| a.value(i).to_string()))
}

fn list_u64(
    path: &Path,
    b: usize,
    name: &str,
    a: &ListArray,
    i: usize,
) -> Result<Vec<u64>, SinkError> {
    let v = a.value(i);
    let v = v.as_any().downcast_ref::<UInt64Array>().ok_or_else(|| {
        SinkError::invalid(path, format!("batch {b}: {name} items are not UInt64"))
    })?;
    Ok(v.values().to_vec())
}

fn list_str(
    path: &Path,
    b: usize,
    name: &str,
    a: &ListArray,
    i: usize,
) -> Result<Vec<String>, SinkError> {
    let v = a.value(i);
    let v = v
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| SinkError::invalid(path, format!("batch {b}: {name} items are not Utf8")))?;
    Ok(v.iter()
        .map(|s| s.unwrap_or_default().to_string())
        .collect())
}

pub(crate) fn read_batch<F>(
    path: &Path,
    b: usize,
    batch: &RecordBatch,
    on_row: &mut F,
) -> Result<(), SinkError>
where
    F: FnMut(ParquetRow) -> Result<(), SinkError>,
{
    let query_id = required::<UInt64Array>(path, b, batch, "query_id")?;
    // The dataset's query fields, absent in a `candidates` output made
    // without the training split.
    let question_id = column::<UInt64Array>(path, b, batch, "question_id")?;
    let image_id = column::<UInt64Array>(path, b, batch, "image_id")?;
    let question = column::<StringArray>(path, b, batch, "question")?;
    let gt_raw = column::<ListArray>(path, b, batch, "gt_answers_raw")?;
    let gt_norm = column::<ListArray>(path, b, batch, "gt_answers_norm")?;
    let pool = column::<ListArray>(path, b, batch, "candidate_pool_ids")?;
    let cand_index = required::<UInt32Array>(path, b, batch, "candidate_index")?;
    let pointer = required::<ListArray>(path, b, batch, "pointer")?;
    let pointer_pos = required::<ListArray>(path, b, batch, "pointer_pos")?;
    let gen_method = required::<StringArray>(path, b, batch, "gen_method")?;
    let beam_rank = required::<UInt32Array>(path, b, batch, "beam_rank")?;
    let beam_score = required::<Float64Array>(path, b, batch, "beam_score")?;
    let logprob = required::<Float64Array>(path, b, batch, "logprob_score")?;
    let temperature = required::<Float64Array>(path, b, batch, "temperature")?;
    let sample_lp = required::<Float64Array>(path, b, batch, "sample_logprob_tempered")?;
    let f = |name: &str| column::<Float64Array>(path, b, batch, name);
    let s = |name: &str| column::<StringArray>(path, b, batch, name);
    let (raw_gen, pred, eval_mode, split, prompt) = (
        s("vqa_raw_generation")?,
        s("vqa_pred_answer")?,
        s("vqa_eval_mode")?,
        s("eval_split_used")?,
        s("prompt_text")?,
    );
    let (acc, gt_prob, f1, edit, rel, reward, adv) = (
        f("vqa_acc_score")?,
        f("vqa_gt_prob")?,
        f("vqa_rel_token_f1")?,
        f("vqa_rel_edit_sim")?,
        f("vqa_rel_score")?,
        f("reward")?,
        f("advantage")?,
    );
    let correct = column::<UInt8Array>(path, b, batch, "vqa_correct")?;
    let failed = column::<BooleanArray>(path, b, batch, "eval_failed")?;

    for i in 0..batch.num_rows() {
        let strs = |name: &str, a: Option<&ListArray>| match a {
            Some(a) => list_str(path, b, name, a, i).map(Some),
            None => Ok(None),
        };
        let query = QueryRecord {
            query_id: query_id.value(i),
            question_id: question_id.map(|a| a.value(i)),
            image_id: image_id.map(|a| a.value(i)),
            question: question.map(|a| a.value(i).to_string()),
            gt_answers_raw: strs("gt_answers_raw", gt_raw)?,
            gt_answers_norm: strs("gt_answers_norm", gt_norm)?,
        };
        let pool_ids = match pool {
            Some(p) => Some(list_u64(path, b, "candidate_pool_ids", p, i)?),
            None => None,
        };
        let dataset = list_u64(path, b, "pointer", pointer, i)?;
        let positions = list_u64(path, b, "pointer_pos", pointer_pos, i)?;
        let (p, p_pos, p_global) = if pool_ids.is_some() {
            (positions.clone(), None, Some(dataset.clone()))
        } else {
            let same = positions == dataset;
            (dataset.clone(), same.then(|| positions.clone()), None)
        };
        let candidate = CandidateRecord {
            pointer: p,
            pointer_pos: p_pos,
            pointer_global: p_global,
            gen_method: gen_method.value(i).to_string(),
            beam_rank: (!beam_rank.is_null(i)).then(|| beam_rank.value(i)),
            beam_score: opt_f64(Some(beam_score), i),
            logprob_score: logprob.value(i),
            temperature: opt_f64(Some(temperature), i),
            sample_logprob_tempered: opt_f64(Some(sample_lp), i),
            vqa_raw_generation: opt_str(raw_gen, i),
            vqa_pred_answer: opt_str(pred, i),
            vqa_correct: correct.and_then(|a| (!a.is_null(i)).then(|| a.value(i))),
            vqa_acc_score: opt_f64(acc, i),
            vqa_gt_prob: opt_f64(gt_prob, i),
            vqa_rel_token_f1: opt_f64(f1, i),
            vqa_rel_edit_sim: opt_f64(edit, i),
            vqa_rel_score: opt_f64(rel, i),
            vqa_eval_mode: opt_str(eval_mode, i),
            eval_split_used: opt_str(split, i),
            eval_failed: failed.and_then(|a| (!a.is_null(i)).then(|| a.value(i))),
            reward: opt_f64(reward, i),
            advantage: opt_f64(adv, i),
            prompt_text: opt_str(prompt, i),
        };
        on_row(ParquetRow {
            query,
            candidate_pool_ids: pool_ids,
            candidate_index: cand_index.value(i),
            pointer: dataset,
            pointer_pos: positions,
            candidate,
        })?;
    }
    Ok(())
}
