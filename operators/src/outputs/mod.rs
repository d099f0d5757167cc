//! The output formats and their writers. Each format has one owner:
//!
//! | module | what |
//! |---|---|
//! | [`rl_json`] | the original project's JSON `{"<query_idx>": record, ..., "_meta": meta}`: writer, streaming reader, lazy scan, byte-range copy |
//! | [`parquet`] | one row per candidate, `_meta` in the key-value metadata: writer (with row-group copy) and readers |
//! | [`writer`] | [`OutputWriter`], the one writer of a run's JSON + Parquet outputs (full, segment-copy, delta) |
//! | [`parts`] | multi-process output: part files + `_manifest.json` (the commit point) |
//! | [`merge`](mod@merge) | sorted Parquet files / datasets → the single JSON (k-way merge, bounded memory) |
//! | [`stats`] | counts over written records (`_meta.counts`, `leverflow stats`) |
//! | [`atomic`] | exclusive temp file + fsync + rename: never a half-written file at an output path |
//! | [`lock`] | one run per output path (an advisory lock beside it) |

pub mod atomic;
pub mod lock;
pub mod merge;
pub mod parquet;
pub mod parts;
pub mod rl_json;
pub mod stats;
pub mod writer;

use std::path::{Path, PathBuf};

use leverflow_schemas::RlRecord;

pub use self::atomic::{AtomicFile, SealedFile};
pub use self::lock::OutputLock;
pub use self::merge::{
    merge, merged_meta, resolve_inputs, InputMeta, MergeFile, MergeInputs, MergeOutputs,
    MergeSummary, ParquetRecordReader, ReadRecord,
};
pub use self::parquet::{
    read_rl_parquet, rows_to_records, segment_of, visit_rl_parquet, ParquetOptions, ParquetRow,
    ParquetSink, ParquetSource, RlParquet, DEFAULT_SEGMENT_QUERIES,
};
pub use self::parts::{
    part_file_name, prepare_dataset_dir, read_dataset, read_manifest, scan_parts, write_manifest,
    Dataset, Manifest, PartInfo, PartOptions, PartWriter, MANIFEST_NAME,
};
pub use self::rl_json::{
    read_rl_json, visit_rl_json, JsonMark, JsonOptions, JsonSink, LazyRecords, RlJson, RlJsonReader,
};
pub use self::stats::{RecordStats, Summary};
pub use self::writer::{DeltaPaths, OutputWriter, SealedOutputs};

/// Errors of the sinks and readers; each names the file and the place.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// An I/O error on a file.
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON (de)serialisation error.
    #[error("{}: {what}: {source}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What was being done (which key / record).
        what: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
    /// A Parquet error.
    #[error("{}: parquet: {what}: {source}", .path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: ::parquet::errors::ParquetError,
    },
    /// An Arrow error (building or reading record batches).
    #[error("{}: arrow: {what}: {source}", .path.display())]
    Arrow {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A sink got query indices out of ascending order.
    #[error("{}: query index {index} written after {previous}: queries must come in strictly ascending order", .path.display())]
    OutOfOrder {
        /// The output file.
        path: PathBuf,
        /// The index written.
        index: u64,
        /// The index written before it.
        previous: u64,
    },
    /// Another run holds the output's lock ([`OutputLock`]).
    #[error("output {} is in use by another leverflow run (pid {})", .path.display(), .pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    InUse {
        /// The output path.
        path: PathBuf,
        /// The process holding it, when known.
        pid: Option<u32>,
    },
    /// Content that does not fit the format or the sink's configuration.
    #[error("{}: {what}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        what: String,
    },
}

impl SinkError {
    pub(crate) fn io(path: &Path, what: &str, source: std::io::Error) -> Self {
        SinkError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        }
    }

    pub(crate) fn json(path: &Path, what: impl Into<String>, source: serde_json::Error) -> Self {
        SinkError::Json {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, what: impl Into<String>) -> Self {
        SinkError::Invalid {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// The record key must be the query's dataset index (`query.query_id`): the
/// original reader indexes the query embeddings with `int(key)`, and the
/// Parquet output keeps only `query_id`.
/// Checks that `query_index` follows `last` (strictly ascending) and names
/// the record's query (the key readers use as the query's dataset index).
pub(crate) fn check_next(
    path: &Path,
    last: Option<u64>,
    query_index: u64,
    record: &RlRecord,
) -> Result<(), SinkError> {
    if let Some(previous) = last {
        if query_index <= previous {
            return Err(SinkError::OutOfOrder {
                path: path.to_path_buf(),
                index: query_index,
                previous,
            });
        }
    }
    check_key(path, query_index, record)
}

fn check_key(path: &Path, query_index: u64, record: &RlRecord) -> Result<(), SinkError> {
    if record.query.query_id != query_index {
        return Err(SinkError::invalid(
            path,
            format!(
                "record key {query_index} differs from its query.query_id {}",
                record.query.query_id
            ),
        ));
    }
    Ok(())
}

/// `_meta` is an object (schema `$defs/meta`).
pub(crate) fn check_meta(path: &Path, meta: &serde_json::Value) -> Result<(), SinkError> {
    if !meta.is_object() {
        return Err(SinkError::invalid(
            path,
            format!("_meta must be a JSON object, got {meta}"),
        ));
    }
    Ok(())
}

/// One output format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum OutputFormat {
    /// The original project's JSON.
    Json,
    /// Parquet, one row per candidate.
    Parquet,
}

impl OutputFormat {
    /// The format's name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Parquet => "parquet",
        }
    }
}

/// Where and how [`OutputWriter`] writes.
#[derive(Debug, Clone, Default)]
pub struct OutputConfig {
    /// JSON output path (`None` = no JSON).
    pub json: Option<PathBuf>,
    /// JSON writer options.
    pub json_options: JsonOptions,
    /// Parquet output path (`None` = no Parquet).
    pub parquet: Option<PathBuf>,
    /// Parquet writer options.
    pub parquet_options: ParquetOptions,
}

impl OutputConfig {
    /// Paths for `formats` from one output path: JSON at `output` itself when
    /// it ends in `.json` (else `output` with extension `.json`), Parquet at
    /// `output` with extension `.parquet` (or `output` itself when it ends in
    /// `.parquet`).
    pub fn for_formats(output: &Path, formats: &[OutputFormat]) -> Self {
        let ext = output
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let with = |e: &str| {
            if ext.as_deref() == Some(e) {
                output.to_path_buf()
            } else {
                output.with_extension(e)
            }
        };
        OutputConfig {
            json: formats.contains(&OutputFormat::Json).then(|| with("json")),
            parquet: formats
                .contains(&OutputFormat::Parquet)
                .then(|| with("parquet")),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests;
