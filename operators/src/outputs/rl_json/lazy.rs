//! An RL JSON output opened lazily: the file is mapped and its top level
//! scanned once for the byte range of each record (without parsing them);
//! a query's records are parsed only when asked for. A rerun that needs a
//! few queries of a large earlier output (the `replay` backend) does not
//! pay for parsing the whole file.

use std::ops::Range;
use std::path::{Path, PathBuf};

use leverflow_schemas::RlRecord;

use super::scan::{line_column, scan_object};
use crate::outputs::SinkError;

/// Why a record did not parse, with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// 1-based line of the error in the file.
    pub line: usize,
    /// 1-based column (in bytes) of the error in the file.
    pub column: usize,
    /// serde's message, without its position (which was within the record).
    pub message: String,
}

/// The records of an RL JSON file, by query, parsed on demand.
pub struct LazyRecords {
    path: PathBuf,
    bytes: memmap2::Mmap,
    /// Distinct query indices, ascending.
    queries: Vec<u64>,
    /// `spans[starts[i]..starts[i + 1]]` are the value ranges of the records
    /// of `queries[i]`, in file order (a repeated key has several).
    starts: Vec<usize>,
    spans: Vec<Range<usize>>,
    /// Query and range of every record, in file order.
    file_order: Vec<(u64, Range<usize>)>,
}

impl std::fmt::Debug for LazyRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyRecords")
            .field("path", &self.path)
            .field("queries", &self.queries.len())
            .finish()
    }
}

impl LazyRecords {
    /// Maps `path` and scans its top level. `_meta` and other non-numeric
    /// keys are skipped, as [`super::RlJsonReader`] does. Errors: the file
    /// cannot be read, or its top level is not a JSON object.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let bytes = crate::tensor_io::map_readonly(path, true)
            .map_err(|e| SinkError::io(path, "reading", e))?;
        let mut file_order = Vec::new();
        scan_object(&bytes, path, |e| {
            if let Ok(q) = e.key.parse::<u64>() {
                file_order.push((q, e.value));
            }
            Ok(())
        })?;
        let mut entries = file_order.clone();
        // Stable: the records of a repeated key stay in file order.
        if !entries.is_sorted_by_key(|e| e.0) {
            entries.sort_by_key(|e| e.0);
        }
        let mut queries = Vec::new();
        let mut starts = Vec::new();
        let mut spans = Vec::with_capacity(entries.len());
        for (q, range) in entries {
            if queries.last() != Some(&q) {
                queries.push(q);
                starts.push(spans.len());
            }
            spans.push(range);
        }
        starts.push(spans.len());
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            queries,
            starts,
            spans,
            file_order,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Distinct query indices, ascending.
    pub fn queries(&self) -> &[u64] {
        &self.queries
    }

    /// The slot of `query` in [`Self::queries`], if it has records.
    pub fn slot(&self, query: u64) -> Option<usize> {
        self.queries.binary_search(&query).ok()
    }

    /// Parses the records of slot `i` (in file order).
    pub fn records(&self, i: usize) -> impl Iterator<Item = Result<RlRecord, RecordError>> + '_ {
        self.spans[self.starts[i]..self.starts[i + 1]]
            .iter()
            .map(|r| self.parse(r))
    }

    /// Every record in file order with its query, parsed one at a time.
    pub fn in_file_order(&self) -> impl Iterator<Item = (u64, Result<RlRecord, RecordError>)> + '_ {
        self.file_order.iter().map(|(q, r)| (*q, self.parse(r)))
    }

    /// Parses the record at `range`; an error carries its place in the file.
    fn parse(&self, range: &Range<usize>) -> Result<RlRecord, RecordError> {
        let bytes = &self.bytes;
        serde_json::from_slice(&bytes[range.clone()]).map_err(|e| {
            // serde's position is within the record: make it the file's.
            let (line, column) = line_column(bytes, range.start);
            let (line, column) = match e.line() {
                0 | 1 => (line, column + e.column().saturating_sub(1)),
                l => (line + l - 1, e.column()),
            };
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
            RecordError {
                line,
                column,
                message,
            }
        })
    }
}
