//! Output sinks: JSON (the original format) and Parquet.
