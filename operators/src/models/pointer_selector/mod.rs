//! The SFT pointer selector (`PointerSelectorV2/V3` forward, eval mode) in burn.
//!
//! Architecture (see `tests/fixtures/pointer_selector/README.md`): the query
//! and the candidates are projected to `hidden_dim` (`input_proj`), the query
//! attends `num_layers` times over the projected candidates (packed
//! `nn.MultiheadAttention` + residual + LayerNorm), and pointer logits are the
//! cosine similarity of the normalised query state and candidate projections
//! divided by the temperature 0.1.  After each chosen index the state is
//! updated by `query_update_gate`; chosen positions are masked with -100.
//!
//! Performance: everything that depends only on the candidate pool (input
//! projection, per-layer attention keys/values, normalised candidate
//! projections) is computed once in a [`PreparedPool`]; per query only the
//! query path runs, batched over queries, and each decoding step is one matmul
//! `states · c_normᵀ` over all tracks (beams/samples) of all queries.

//!
//! | file | holds |
//! |---|---|
//! | `config` | hyper-parameters and `init` |
//! | `mod.rs` | the model, prepared-pool and query-state types, errors |
//! | `load.rs` | loading a checkpoint (Lightning `.ckpt`, state dict, safetensors) |
//! | `pool.rs` | the pool-only precomputation ([`PreparedPool`]) |
//! | `decode.rs` | query states, step logits, gate updates, teacher forcing, greedy |
//! | [`host`] | the CPU kernels the forward pass runs on host memory |

mod config;
mod decode;
pub mod host;
mod load;
mod model;
mod pool;

use burn::module::Module;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::tensor_io::TensorIoError;

pub use config::PointerSelectorConfig;
pub use host::{log_softmax_at, log_sum_exp};

/// The default CPU backend.
pub type DefaultBackend = burn::backend::NdArray<f32>;

/// Greedy decoding of one query: the predictions and the `[step][K]` logits.
pub type GreedyOutput = (Vec<usize>, Vec<Vec<f32>>);

/// Errors building or running the pointer selector.
#[derive(Debug, thiserror::Error)]
pub enum PointerSelectorError {
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Io(#[from] TensorIoError),
    /// No `query_update_gate.weight` anywhere in the state dict.
    #[error("{source_name}: no pointer-selector tensors (no key ending in 'query_update_gate.weight'); {n} tensors present, e.g. {examples:?}")]
    NotFound {
        /// file or description of the state dict
        source_name: String,
        /// number of tensors present
        n: usize,
        /// a few key names
        examples: Vec<String>,
    },
    /// Required tensors are missing (all of them are listed).
    #[error("{source_name}: missing pointer-selector tensors: {keys:?}")]
    MissingTensors {
        /// file or description of the state dict
        source_name: String,
        /// every missing key (full name)
        keys: Vec<String>,
    },
    /// A tensor has an unexpected shape.
    #[error("{source_name}: tensor {key} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// file or description of the state dict
        source_name: String,
        /// full key
        key: String,
        /// expected shape
        expected: Vec<usize>,
        /// actual shape
        found: Vec<usize>,
    },
    /// Layer indices in the keys are not contiguous from 0 (or not a
    /// number): the first key out of order is named.
    #[error("{source_name}: tensor {key} has a layer index that does not continue the layers 0, 1, 2, ... of the checkpoint (layer indices must be contiguous from 0)")]
    LayerIndex {
        /// file or description of the state dict
        source_name: String,
        /// the offending key (full name)
        key: String,
    },
    /// Inconsistent configuration (heads not dividing the hidden size, ...).
    #[error("invalid pointer-selector configuration: {0}")]
    Config(String),
    /// An embedding has the wrong dimension.
    #[error("{what}: embedding dimension {found} does not match the pointer selector's d_model {expected}")]
    DimMismatch {
        /// which input
        what: String,
        /// d_model
        expected: usize,
        /// actual dimension
        found: usize,
    },
    /// Bad call arguments (label out of range, empty pool, ...).
    #[error("{0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, PointerSelectorError>;

/// One packed `nn.MultiheadAttention` (q/k/v blocks split into three linears).
#[derive(Module, Debug)]
pub struct CrossAttention<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    out: Linear<B>,
}

/// The pointer selector (eval mode; dropout is inactive).
#[derive(Module, Debug)]
pub struct PointerSelector<B: Backend> {
    input_proj: Option<Linear<B>>,
    layers: Vec<CrossAttention<B>>,
    norms: Vec<LayerNorm<B>>,
    query_proj: Linear<B>,
    cand_proj: Linear<B>,
    gate: Linear<B>,
    d_model: usize,
    hidden_dim: usize,
    num_heads: usize,
    temperature: f64,
    mask_value: f64,
    layer_norm_eps: f64,
}

/// Everything about one candidate pool that does not depend on the query.
#[derive(Debug, Clone)]
pub struct PreparedPool<B: Backend> {
    k: usize,
    /// per layer, per head: keys transposed `[head_dim, K]`
    keys_t: Vec<Vec<Tensor<B, 2>>>,
    /// per layer, per head: values `[K, head_dim]`
    values: Vec<Vec<Tensor<B, 2>>>,
    /// normalised candidate projections, transposed: `[H, K]`
    c_norm_t: Tensor<B, 2>,
    /// normalised candidate projections on the host, row-major `[K, H]`
    c_norm_host: Vec<f32>,
    /// raw embeddings (for retrieval), row-major `[K, d_model]`
    raw: Vec<f32>,
}

impl<B: Backend> PreparedPool<B> {
    /// Number of candidates K.
    pub fn len(&self) -> usize {
        self.k
    }

    /// True for an empty pool (never produced by `prepare_pool`).
    pub fn is_empty(&self) -> bool {
        self.k == 0
    }

    /// Raw (unprojected) embedding of candidate `p`.
    pub fn raw_row(&self, p: usize) -> &[f32] {
        let d = self.raw.len() / self.k.max(1);
        &self.raw[p * d..(p + 1) * d]
    }
}

/// Query-independent per-row precomputation (see
/// [`PointerSelector::prepare_rows`]); memory: `(2·layers + 1)·N·H + N·d`
/// floats.
#[derive(Debug, Clone)]
pub struct PreparedRows {
    n: usize,
    h: usize,
    d: usize,
    /// per layer: attention keys `[N, H]`
    keys: Vec<Vec<f32>>,
    /// per layer: attention values `[N, H]`
    values: Vec<Vec<f32>>,
    /// normalised candidate projections `[N, H]`
    c_norm: Vec<f32>,
    /// raw embeddings `[N, d]`
    raw: Vec<f32>,
}

impl PreparedRows {
    /// Number of rows N.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Hidden size H.
    pub fn hidden_dim(&self) -> usize {
        self.h
    }
}

/// Query states (one row per track), row-major `[M, H]` on the host.
///
/// Elementwise work (gate, normalisation, softmax, LayerNorm) runs in plain
/// Rust on the host: burn's NdArray elementwise/broadcast ops cost ~30 ns per
/// element here, more than the matmuls they follow.  All matmuls run in burn.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryStates {
    /// number of rows M
    pub rows: usize,
    /// row width H
    pub cols: usize,
    /// `rows * cols` values
    pub data: Vec<f32>,
}

impl QueryStates {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Rows `rows` (repeats allowed), in that order.
    pub fn select(&self, rows: &[usize]) -> Self {
        let mut data = Vec::with_capacity(rows.len() * self.cols);
        for &r in rows {
            data.extend_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]);
        }
        QueryStates {
            rows: rows.len(),
            cols: self.cols,
            data,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
