//! leverflow's output record types with their JSON Schema and Arrow schema.
//!
//! * [`RlRecord`] / [`QueryRecord`] / [`CandidateRecord`]: the serde types of
//!   one query's record in the JSON output (the original project's format);
//! * [`json_schema`]: the JSON Schema (draft 2020-12) of that record, with the
//!   `_meta` object under `$defs/meta`;
//! * [`arrow_schema`]: the schema of the Parquet output (one row per candidate);
//! * [`Meta`]: the typed `_meta` object written with every output.
//!
//! `README.md` beside this crate has a table of every field; [`validate`]
//! checks JSON values against the schema.

mod arrow_schema;
pub mod meta;
mod records;
pub mod validate;

pub use arrow_schema::{
    arrow_schema, arrow_schema_of, list_u64, list_utf8, vqa_column_names, DESCRIPTION_KEY,
    PARQUET_META_KEY,
};
pub use meta::{Counts, Meta, MethodCounts, SkippedQuery, Timings};
pub use records::{CandidateRecord, PointerFields, PointerLayout, QueryRecord, RlRecord};

/// Key of the run metadata object in the JSON output.
pub const META_KEY: &str = "_meta";

/// The text of `rl_record.schema.json`.
pub const JSON_SCHEMA_TEXT: &str = include_str!("../rl_record.schema.json");

/// Errors building records.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// Positions and dataset indices of one candidate differ in length.
    #[error(
        "pointer positions ({positions}) and dataset indices ({dataset_indices}) differ in length"
    )]
    PointerLength {
        /// Number of positions.
        positions: usize,
        /// Number of dataset indices.
        dataset_indices: usize,
    },
    /// The layout says pool positions are dataset indices, but they differ.
    #[error("layout says pool positions are dataset indices, but positions {positions:?} != dataset indices {dataset_indices:?}")]
    PositionsNotIndices {
        /// The positions given.
        positions: Vec<u64>,
        /// The dataset indices given.
        dataset_indices: Vec<u64>,
    },
}

/// The JSON Schema of one query record (the value under `"<query_idx>"`);
/// the `_meta` object's schema is at `$defs/meta`.
pub fn json_schema() -> serde_json::Value {
    // The file is part of the crate and checked by a test; it always parses.
    serde_json::from_str(JSON_SCHEMA_TEXT).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests;
