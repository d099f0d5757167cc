//! [`OutputWriter`]: the one writer of a run's outputs, the JSON and/or the
//! Parquet file of an [`OutputConfig`], segment by segment, with `_meta`
//! last; nothing appears at an output path unless both outputs are
//! complete. A full run, a rerun that copies unchanged segments from the
//! previous outputs and the delta output of `output_mode = delta` all write
//! through it (`crate::pipeline` drives it from the state store).

use std::path::{Path, PathBuf};

use leverflow_schemas::RlRecord;
use serde_json::Value;

use super::parquet::{ParquetSink, ParquetSource};
use super::rl_json::JsonSink;
use super::{OutputConfig, SealedFile, SinkError};

/// Messages to the Parquet writer thread.
enum ParquetMsg {
    Record(u64, Box<RlRecord>),
    Copy {
        first: u32,
        count: u32,
        first_query: u64,
        last_query: u64,
    },
    EndSegment,
}

/// The Parquet writer thread: encoding and compressing row groups runs
/// beside the JSON writing. It returns the sink (to seal) and each
/// segment's row groups (first, count).
type ParquetThread = (
    std::sync::mpsc::SyncSender<ParquetMsg>,
    std::thread::JoinHandle<Result<(ParquetSink, Vec<(u32, u32)>), SinkError>>,
);

fn spawn_parquet(mut sink: ParquetSink, src: Option<ParquetSource>) -> ParquetThread {
    let (tx, rx) = std::sync::mpsc::sync_channel::<ParquetMsg>(1024);
    let handle = std::thread::spawn(move || {
        let mut ranges = Vec::new();
        let mut seg_start = 0u32;
        for msg in rx {
            match msg {
                ParquetMsg::Record(q, r) => sink.write_record(q, &r)?,
                ParquetMsg::Copy {
                    first,
                    count,
                    first_query,
                    last_query,
                } => {
                    let src = src.as_ref().ok_or_else(|| {
                        SinkError::invalid(
                            Path::new("parquet"),
                            "internal error: no previous output to copy row groups from",
                        )
                    })?;
                    sink.copy_row_groups(
                        src,
                        first as usize,
                        count as usize,
                        first_query,
                        last_query,
                    )?;
                }
                ParquetMsg::EndSegment => {
                    sink.cut_row_group()?;
                    let written = sink.row_groups_written() as u32;
                    ranges.push((seg_start, written - seg_start));
                    seg_start = written;
                }
            }
        }
        Ok((sink, ranges))
    });
    (tx, handle)
}

/// Writes records in ascending query order to the JSON and/or Parquet
/// output of an [`OutputConfig`], then `_meta`; nothing appears at an
/// output path unless both outputs are complete ([`OutputWriter::finish`]).
///
/// Parquet rows are encoded on a thread of their own; an error there (a
/// record that does not fit the Parquet options, a full disk) is reported
/// by [`OutputWriter::end_segment`] or [`OutputWriter::seal`]. Dropping
/// the writer without finishing removes its temporary files.
pub struct OutputWriter {
    json: Option<JsonSink>,
    parquet: Option<ParquetThread>,
}

/// Outputs written completely but not yet in place (see
/// [`OutputWriter::seal`]).
pub struct SealedOutputs {
    files: Vec<SealedFile>,
    /// Per segment ended with [`OutputWriter::end_segment`], its Parquet row
    /// groups (first, count); empty without Parquet.
    pub parquet_segments: Vec<(u32, u32)>,
}

impl SealedOutputs {
    /// Moves every output into place.
    pub fn publish(self) -> Result<(), SinkError> {
        for f in self.files {
            f.publish()?;
        }
        Ok(())
    }
}

impl OutputWriter {
    /// Opens the outputs of `cfg`.
    pub fn create(cfg: &OutputConfig) -> Result<Self, SinkError> {
        Self::open(cfg, None, None)
    }

    /// Opens the outputs of `cfg`, the JSON output continuing `json` when
    /// given (segments copied ahead), the Parquet output able to copy row
    /// groups from `previous_parquet`.
    pub fn open(
        cfg: &OutputConfig,
        json: Option<JsonSink>,
        previous_parquet: Option<ParquetSource>,
    ) -> Result<Self, SinkError> {
        let json = match (&cfg.json, json) {
            (Some(_), Some(sink)) => Some(sink),
            (Some(p), None) => Some(JsonSink::create(p, cfg.json_options.clone())?),
            (None, _) => None,
        };
        let parquet = match &cfg.parquet {
            Some(p) => Some(spawn_parquet(
                ParquetSink::create(p, cfg.parquet_options.clone())?,
                previous_parquet,
            )),
            None => None,
        };
        Ok(Self { json, parquet })
    }

    /// Writes one record (query indices strictly ascending).
    pub fn write(&mut self, query_index: u64, record: &RlRecord) -> Result<(), SinkError> {
        if let Some(j) = self.json.as_mut() {
            j.write_record(query_index, record)?;
        }
        self.send(ParquetMsg::Record(query_index, Box::new(record.clone())));
        Ok(())
    }

    /// Writes one record whose JSON serialisation `bytes` is at hand (as the
    /// state store holds it), without serialising it again.
    pub fn write_serialised(
        &mut self,
        query_index: u64,
        record: RlRecord,
        bytes: &[u8],
    ) -> Result<(), SinkError> {
        if let Some(j) = self.json.as_mut() {
            j.write_serialised(query_index, &record, bytes)?;
        }
        self.send(ParquetMsg::Record(query_index, Box::new(record)));
        Ok(())
    }

    /// The JSON sink, for positions and copies of JSON byte ranges.
    pub fn json(&mut self) -> Option<&mut JsonSink> {
        self.json.as_mut()
    }

    /// Copies Parquet row groups `first..first + count` of the previous
    /// output (holding queries `first_query..=last_query`).
    pub fn copy_parquet(&self, first: u32, count: u32, first_query: u64, last_query: u64) {
        self.send(ParquetMsg::Copy {
            first,
            count,
            first_query,
            last_query,
        });
    }

    /// A send error means the thread stopped on an error of its own: it is
    /// reported when the thread is joined.
    fn send(&self, msg: ParquetMsg) {
        if let Some((tx, _)) = &self.parquet {
            let _ = tx.send(msg);
        }
    }

    /// Ends a segment whose JSON is in the output already (copied ahead,
    /// and on its way to disk): only the Parquet row group is cut.
    pub fn end_copied_segment(&mut self) {
        self.send(ParquetMsg::EndSegment);
    }

    /// Ends an output segment: the Parquet row group is cut (a row group
    /// never spans two segments), and the JSON written so far starts its
    /// way to disk.
    pub fn end_segment(&mut self) -> Result<(), SinkError> {
        if let Some(j) = self.json.as_mut() {
            j.start_writeback()?;
        }
        self.send(ParquetMsg::EndSegment);
        Ok(())
    }

    /// Writes `_meta` and completes every output (fsynced, under temporary
    /// names): the JSON while the Parquet thread may still be copying row
    /// groups, then the Parquet output. Neither is published yet.
    pub fn seal(mut self, meta: &Value) -> Result<SealedOutputs, SinkError> {
        let json = self.json.take().map(|j| j.seal(meta));
        let mut files = Vec::new();
        let mut parquet_segments = Vec::new();
        let parquet = match self.parquet.take() {
            Some((tx, handle)) => {
                drop(tx);
                Some(handle.join().map_err(|_| {
                    SinkError::invalid(Path::new("parquet"), "the Parquet writer thread panicked")
                })??)
            }
            None => None,
        };
        if let Some(j) = json {
            files.push(j?);
        }
        if let Some((sink, ranges)) = parquet {
            files.push(sink.seal(meta)?);
            parquet_segments = ranges;
        }
        Ok(SealedOutputs {
            files,
            parquet_segments,
        })
    }

    /// [`OutputWriter::seal`], then every output moves into place.
    pub fn finish(self, meta: &Value) -> Result<(), SinkError> {
        self.seal(meta)?.publish()
    }
}

impl Drop for OutputWriter {
    /// An unfinished writer stops its Parquet thread and waits for it, so
    /// the thread's temporary file is removed before the caller goes on.
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.parquet.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// Where `--output_mode delta` writes: `<parquet stem>.delta.parquet` (the
/// rows of added and changed queries) and `<output stem>.retracted.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPaths {
    /// The delta Parquet file.
    pub parquet: PathBuf,
    /// The list of retracted and changed query ids.
    pub retracted: PathBuf,
}

impl DeltaPaths {
    /// The delta paths beside the JSON output `output` and the Parquet
    /// output `parquet`.
    pub fn beside(output: &Path, parquet: &Path) -> Self {
        let stem = |p: &Path| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "output".into())
        };
        Self {
            parquet: parquet.with_file_name(format!("{}.delta.parquet", stem(parquet))),
            retracted: output.with_file_name(format!("{}.retracted.json", stem(output))),
        }
    }
}
