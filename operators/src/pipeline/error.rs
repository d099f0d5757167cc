//! The errors of a run, typed: each names the file and the place (or the
//! setting), and the binary turns settings into flag names.

use std::path::PathBuf;
use std::sync::Arc;

pub use super::load::MismatchError;
use super::write::WriteError;
use crate::accuracy::AccuracyError;
use crate::backends::BackendError;
use crate::config::ConfigError;
use crate::dataflow::{ClusterError, StageError};
use crate::dataset::DatasetError;
use crate::models::pointer_selector::PointerSelectorError;
use crate::outputs::SinkError;
use crate::source::SourceError;
pub use crate::stages::accuracy::NotInAnnotations;
pub use crate::stages::vqa::MissingImage;
use crate::state::StateError;
use crate::tensor_io::TensorIoError;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Neither official nor merged training files were given.
    #[error("the training split is needed for queries and examples: pass the official VQA questions and annotations (train_ques_path, train_ann_path) or a merged vqav2-style file (train_path)")]
    NoTrainingSplit,
    /// Strict evaluation without annotation files.
    #[error("strict evaluation needs official annotation files: give train_ques_path and train_ann_path (or val_*), or turn strict evaluation off (no_strict_eval) to allow the fallback match")]
    NoAnnotations,
    /// An input file does not parse, or is missing.
    #[error(transparent)]
    Tensor(#[from] TensorIoError),
    /// The beam data, sampler cache or candidate indices.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The training split.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The official annotation files.
    #[error(transparent)]
    Accuracy(#[from] AccuracyError),
    /// The pointer-selector checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] PointerSelectorError),
    /// Inputs that do not fit each other.
    #[error(transparent)]
    Mismatch(#[from] MismatchError),
    /// The VQA backend could not be loaded.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The state store.
    #[error(transparent)]
    State(#[from] StateError),
    /// A stage failed (the first error of any worker).
    #[error(transparent)]
    Stage(Arc<StageError>),
    /// The processes of a multi-process run.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Another process of a multi-process run failed.
    #[error("{0}")]
    Process(String),
    /// The outputs could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A file or directory could not be created or read.
    #[error("{}: {what}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A query appears twice in the beam data.
    #[error("{}: query {query} appears more than once in the beam data", .beam.display())]
    DuplicateQuery {
        /// The beam data file.
        beam: PathBuf,
        /// The query.
        query: u64,
    },
    /// A broken invariant (a bug, never bad input).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Arc<StageError>> for PipelineError {
    fn from(e: Arc<StageError>) -> Self {
        PipelineError::Stage(e)
    }
}

impl From<SinkError> for PipelineError {
    fn from(e: SinkError) -> Self {
        PipelineError::Write(WriteError::Sink(e))
    }
}

impl PipelineError {
    /// The stage error inside, if a stage failed.
    pub fn stage(&self) -> Option<&StageError> {
        match self {
            PipelineError::Stage(e) => Some(e),
            _ => None,
        }
    }
}
