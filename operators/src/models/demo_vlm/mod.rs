//! A tiny Qwen2.5-VL trained on easy-VQA: the demo VQA model.
//!
//! The model has the architecture, weight names, file layout and code path
//! of the published Qwen2.5-VL checkpoints, only with small dimensions and a
//! small word-level tokenizer, so that `leverflow generate --demo` can answer
//! real questions without downloads:
//!
//! * [`data`] reads the easy-VQA *train* split straight from the
//!   `easy_vqa-1.0` wheel;
//! * [`checkpoint`] writes the Hugging Face directory (configuration,
//!   tokenizer, chat template, random initial weights) and exports trained
//!   weights under the published tensor names;
//! * [`train`] trains the model with burn's autodiff on the pipeline's
//!   in-context prompt format;
//! * [`eval`] answers held-out questions through the pipeline's
//!   [`QwenVqa`](crate::models::qwen2_5_vl::model::QwenVqa) and scores them with the
//!   official VQA accuracy.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod train;

use std::path::PathBuf;

use crate::models::contract::VqaError;
use crate::models::qwen2_5_vl::config::ConfigError;
use crate::models::qwen2_5_vl::model::ModelError;
use crate::models::qwen2_5_vl::processor::ProcessorError;
use crate::models::qwen2_5_vl::text::TextError;
use crate::models::qwen2_5_vl::vision::VisionError;

/// Errors of the demo model's data, training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum DemoVlmError {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A data file has unexpected content.
    #[error("{path}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Invalid options or internal inconsistency.
    #[error("{0}")]
    Invalid(String),
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizer, template or image processing failed.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// A configuration file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The vision tower failed.
    #[error(transparent)]
    Vision(#[from] VisionError),
    /// The language model failed.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The VQA answerer failed.
    #[error(transparent)]
    Vqa(#[from] VqaError),
}

/// `map_err` helper for I/O errors on `path`.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DemoVlmError {
    let path = path.into();
    move |source| DemoVlmError::Io { path, source }
}
