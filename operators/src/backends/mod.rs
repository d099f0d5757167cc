//! VQA backends behind one registry: how a run's [`VqaBackend`] setting
//! becomes a model instance on every timely worker.
//!
//! A backend is one file here with a `load` function from a
//! [`BackendContext`] (the run's settings, the device of each local worker
//! and the input-file digests) to a [`LoadedBackend`]: a factory of
//! per-worker [`VqaModel`] instances and the identity recorded in
//! `_meta.vqa_model` (and keyed into every stored answer). Adding a
//! backend = its file, its variant of [`VqaBackend`] with its flags in
//! [`RunConfig`], and one arm of [`load`].
//!
//! | backend | file | answers with |
//! |---|---|---|
//! | `qwen2_5_vl` | [`qwen2_5_vl`] | a Qwen2.5-VL checkpoint in burn (CPU, CUDA or wgpu) |
//! | `qwen2_5_vl` with an OpenFlamingo directory | [`openflamingo`] | OpenFlamingo in burn (CPU) |
//! | `replay` | [`replay`] | the raw generations of an earlier output |
//! | `openai` | [`openai`] | an OpenAI-compatible server (vLLM, SGLang, `transformers serve`, ...) |
//!
//! `vqa_model` names (a directory, a hub repository id or an alias) are
//! resolved by [`crate::models::hub`].

pub mod device;
pub mod openai;
pub mod openflamingo;
pub mod qwen2_5_vl;
pub mod replay;
pub mod request;

use std::path::PathBuf;
use std::sync::Arc;

pub use crate::config::VqaBackend;
use crate::config::{ConfigError, RunConfig};
use crate::models::contract::VqaModel;
use crate::models::qwen2_5_vl::model::ModelError;
use crate::state::FileDigests;
use crate::tensor_io::TensorIoError;
pub use device::Device;
pub use replay::{ReplayError, ReplayIndex, ReplayModel};

/// Makes the VQA model instance of a process's worker (by local worker
/// index, which picks its device).
pub type VqaFactory = Arc<dyn Fn(usize) -> Result<Box<dyn VqaModel>, BackendError> + Send + Sync>;

/// A loaded backend.
pub struct LoadedBackend {
    /// Makes each worker's instance.
    pub factory: VqaFactory,
    /// The model's identity (`_meta.vqa_model`, and part of answer keys).
    pub identity: serde_json::Value,
    /// What `_meta.vqa_model` records when it is more than the identity
    /// (a server's URL, which answer keys leave out).
    pub recorded: Option<serde_json::Value>,
}

/// What a backend is loaded from.
pub struct BackendContext<'a> {
    /// The run's settings.
    pub config: &'a RunConfig,
    /// The device of each local worker.
    pub devices: &'a [Device],
    /// Input-file digests (remembered across runs by file identity).
    pub digests: &'a FileDigests,
}

/// Errors of loading a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model setting names no usable checkpoint.
    #[error(transparent)]
    Hub(#[from] crate::models::hub::HubError),
    /// The OpenAI-compatible server is unusable.
    #[error(transparent)]
    OpenAi(#[from] openai::OpenAiError),
    /// Devices of different kinds (cpu, cuda, wgpu) in one process.
    #[error("a mix of device kinds; give devices of one kind only (all cpu, all cuda:N or all wgpu[:N])")]
    MixedDevices,
    /// A CUDA device asked of a build without CUDA.
    #[error("this leverflow was built without CUDA support; rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use the cpu device")]
    NoCuda,
    /// A wgpu device asked of a build without wgpu.
    #[error("this leverflow was built without wgpu support; rebuild with `cargo build --release --features wgpu`, or use the cpu device")]
    NoWgpu,
    /// `wgpu:N` names a discrete GPU that wgpu does not see.
    #[error("wgpu:{index}: wgpu sees {found} discrete GPU(s); use `wgpu` for the best adapter (integrated GPUs and software devices included)")]
    NoWgpuAdapter {
        /// The index asked for.
        index: usize,
        /// Discrete GPUs found.
        found: usize,
    },
    /// No device was given.
    #[error("no device for the VQA model")]
    NoDevice,
    /// A file of the model could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be hashed.
    #[error(transparent)]
    Hash(#[from] TensorIoError),
    /// The Qwen2.5-VL checkpoint failed to load or run.
    #[error(transparent)]
    Qwen(#[from] ModelError),
    /// The OpenFlamingo model failed to load or run.
    #[error(transparent)]
    Flamingo(#[from] crate::models::openflamingo::FlamingoError),
    /// OpenFlamingo asked of a device other than the CPU.
    #[error("the OpenFlamingo backend runs on the cpu device only")]
    FlamingoDevice,
    /// The replay file is unusable.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// Loads the backend `ctx.config.vqa_backend` names.
pub fn load(ctx: &BackendContext<'_>) -> Result<LoadedBackend, BackendError> {
    match ctx.config.vqa_backend {
        VqaBackend::Qwen2_5Vl if openflamingo::is_openflamingo(&ctx.config.vqa_model) => {
            openflamingo::load(ctx)
        }
        VqaBackend::Qwen2_5Vl => qwen2_5_vl::load(ctx),
        VqaBackend::Replay => replay::load(ctx),
        VqaBackend::Openai => openai::load(ctx),
    }
}
