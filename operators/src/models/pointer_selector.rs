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

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::tensor_io::{self, Matrix, NamedTensor, TensorIoError};

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

/// Hyper-parameters of the pointer selector.
#[derive(Debug, Clone, PartialEq)]
pub struct PointerSelectorConfig {
    /// embedding dimension of queries and candidates
    pub d_model: usize,
    /// hidden dimension (after `input_proj`)
    pub hidden_dim: usize,
    /// number of cross-attention layers
    pub num_layers: usize,
    /// attention heads (not recoverable from the weights)
    pub num_heads: usize,
    /// logit temperature (0.1)
    pub temperature: f64,
    /// value written at already chosen positions (-100)
    pub mask_value: f64,
    /// LayerNorm epsilon (1e-5)
    pub layer_norm_eps: f64,
}

impl PointerSelectorConfig {
    /// A configuration with the original defaults (1 head, temperature 0.1,
    /// mask -100, LayerNorm eps 1e-5).
    pub fn new(d_model: usize, hidden_dim: usize, num_layers: usize) -> Self {
        PointerSelectorConfig {
            d_model,
            hidden_dim,
            num_layers,
            num_heads: 1,
            temperature: 0.1,
            mask_value: -100.0,
            layer_norm_eps: 1e-5,
        }
    }

    /// Sets the number of heads.
    pub fn with_num_heads(mut self, num_heads: usize) -> Self {
        self.num_heads = num_heads;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.hidden_dim == 0 || self.d_model == 0 {
            return Err(PointerSelectorError::Config(
                "d_model and hidden_dim must be > 0".into(),
            ));
        }
        if self.num_heads == 0 || !self.hidden_dim.is_multiple_of(self.num_heads) {
            return Err(PointerSelectorError::Config(format!(
                "num_heads {} must divide hidden_dim {}",
                self.num_heads, self.hidden_dim
            )));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(PointerSelectorError::Config(
                "temperature must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// A model with random weights (used for benchmarks and tests).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<PointerSelector<B>> {
        self.validate()?;
        let h = self.hidden_dim;
        let lin =
            |i: usize, o: usize, bias: bool| LinearConfig::new(i, o).with_bias(bias).init(device);
        let layers = (0..self.num_layers)
            .map(|_| CrossAttention {
                q: lin(h, h, true),
                k: lin(h, h, true),
                v: lin(h, h, true),
                out: lin(h, h, true),
            })
            .collect();
        let norms = (0..self.num_layers)
            .map(|_| {
                LayerNormConfig::new(h)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device)
            })
            .collect();
        Ok(PointerSelector {
            input_proj: (self.d_model != h).then(|| lin(self.d_model, h, false)),
            layers,
            norms,
            query_proj: lin(h, h, false),
            cand_proj: lin(h, h, false),
            gate: lin(2 * h, h, true),
            d_model: self.d_model,
            hidden_dim: h,
            num_heads: self.num_heads,
            temperature: self.temperature,
            mask_value: self.mask_value,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}

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

/// Number of layers of a state dict whose keys (full names) hold
/// `{prefix}cross_attn_layers.<i>.` / `{prefix}attn_norms.<i>.` tensors: the
/// indices seen must be exactly `0..n`. Errors with the first key whose index
/// is not a number or leaves a gap (in index order).
fn layer_count<'k>(
    keys: impl Iterator<Item = &'k String>,
    prefix: &str,
) -> std::result::Result<usize, String> {
    let mut seen: BTreeMap<usize, &'k String> = BTreeMap::new();
    for k in keys {
        for part in ["cross_attn_layers.", "attn_norms."] {
            let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix(part)) else {
                continue;
            };
            let idx = rest.split('.').next().unwrap_or("");
            // Only plain decimal indices, as torch writes them (no sign,
            // no leading zeros apart from "0").
            let plain = !idx.is_empty()
                && idx.bytes().all(|b| b.is_ascii_digit())
                && (idx == "0" || !idx.starts_with('0'));
            match idx.parse::<usize>() {
                Ok(i) if plain => {
                    seen.entry(i).or_insert(k);
                }
                _ => return Err(k.clone()),
            }
        }
    }
    for (expected, (&i, key)) in seen.iter().enumerate() {
        if i != expected {
            return Err((*key).clone());
        }
    }
    Ok(seen.len())
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // f32 is always representable after `convert`; an error here would be a
    // backend bug, so fall back to an empty vector (callers check lengths).
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

fn tensor2<B: Backend>(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// `x / max(||x||, 1e-12)` per row (F.normalize).
fn normalize_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let n = row
            .iter()
            .map(|v| (*v as f64) * (*v as f64))
            .sum::<f64>()
            .sqrt() as f32;
        let n = n.max(1e-12);
        for v in row.iter_mut() {
            *v /= n;
        }
    }
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Row-wise softmax in place (f32 values, f64 sum).
fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v as f64;
        }
        let s = s as f32;
        for v in row.iter_mut() {
            *v /= s;
        }
    }
}

/// LayerNorm over rows (biased variance, as torch).
fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f64) {
    let n = gamma.len();
    for row in x.chunks_exact_mut(n) {
        let mean = row.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (j, v) in row.iter_mut().enumerate() {
            *v = (((*v as f64 - mean) * inv) as f32) * gamma[j] + beta[j];
        }
    }
}

/// Transposes a row-major `[r, c]` block (columns `c0..c0+w` of a `[r, stride]` matrix) to `[w, r]`.
fn transpose_cols(x: &[f32], r: usize, stride: usize, c0: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; w * r];
    for i in 0..r {
        for j in 0..w {
            out[j * r + i] = x[i * stride + c0 + j];
        }
    }
    out
}

fn cols_block(x: &[f32], r: usize, stride: usize, c0: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(r * w);
    for i in 0..r {
        out.extend_from_slice(&x[i * stride + c0..i * stride + c0 + w]);
    }
    out
}

impl<B: Backend> PointerSelector<B> {
    /// The configuration this model was built with.
    pub fn config(&self) -> PointerSelectorConfig {
        PointerSelectorConfig {
            d_model: self.d_model,
            hidden_dim: self.hidden_dim,
            num_layers: self.layers.len(),
            num_heads: self.num_heads,
            temperature: self.temperature,
            mask_value: self.mask_value,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    /// Embedding dimension expected for queries and candidates.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Value written at chosen positions (-100).
    pub fn mask_value(&self) -> f32 {
        self.mask_value as f32
    }

    /// Loads the pointer selector from a checkpoint file (Lightning `.ckpt`,
    /// state-dict `.pt` or `.safetensors`), see [`Self::from_state_dict`].
    pub fn load(path: &Path, num_heads: usize, device: &B::Device) -> Result<Self> {
        // only the pointer selector's tensors are converted
        const PARTS: [&str; 6] = [
            "input_proj.",
            "cross_attn_layers.",
            "attn_norms.",
            "query_proj.",
            "cand_proj.",
            "query_update_gate.",
        ];
        let keep = |k: &str| PARTS.iter().any(|p| k.contains(p));
        let sd = tensor_io::load_state_dict_filtered(path, &keep)?;
        Self::from_state_dict(&sd, &path.display().to_string(), num_heads, device)
    }

    /// Builds the model from a state dict.  The key prefix (e.g.
    /// `lever_lm.pointer_selector.`) is found by locating
    /// `query_update_gate.weight`; `d_model`, `hidden_dim` and `num_layers`
    /// are inferred from the tensor shapes; `num_heads` must be given.  Every
    /// missing tensor is reported at once; other keys are ignored.
    pub fn from_state_dict(
        sd: &BTreeMap<String, NamedTensor>,
        source_name: &str,
        num_heads: usize,
        device: &B::Device,
    ) -> Result<Self> {
        const GATE: &str = "query_update_gate.weight";
        let gate_keys: Vec<&String> = sd.keys().filter(|k| k.ends_with(GATE)).collect();
        let gate_key = gate_keys
            .iter()
            .find(|k| k.contains("pointer_selector"))
            .or(gate_keys.first())
            .ok_or_else(|| PointerSelectorError::NotFound {
                source_name: source_name.to_string(),
                n: sd.len(),
                examples: sd.keys().take(8).cloned().collect(),
            })?;
        let prefix = gate_key[..gate_key.len() - GATE.len()].to_string();
        let full = |k: &str| format!("{prefix}{k}");
        let gate_w = &sd[*gate_key];
        if gate_w.shape.len() != 2 || gate_w.shape[1] != 2 * gate_w.shape[0] {
            return Err(PointerSelectorError::Shape {
                source_name: source_name.to_string(),
                key: gate_key.to_string(),
                expected: vec![
                    gate_w.shape.first().copied().unwrap_or(0),
                    2 * gate_w.shape.first().copied().unwrap_or(0),
                ],
                found: gate_w.shape.clone(),
            });
        }
        let h = gate_w.shape[0];
        // `3 * h` below must not wrap (h is bounded by the tensor's data,
        // but the product is checked all the same).
        if h.checked_mul(3).and_then(|x| x.checked_mul(h)).is_none() {
            return Err(PointerSelectorError::Config(format!(
                "{source_name}: hidden size {h} is too large"
            )));
        }
        let d_model = sd
            .get(&full("input_proj.weight"))
            .and_then(|t| t.shape.get(1).copied())
            .unwrap_or(h);
        // Number of layers: the layer indices seen under cross_attn_layers /
        // attn_norms must be exactly 0..n. Never allocate by an index read
        // from the file: a key such as `attn_norms.99999999.bias` is an
        // error naming it, not 10^8 layers' worth of expected keys.
        let num_layers =
            layer_count(sd.keys(), &prefix).map_err(|key| PointerSelectorError::LayerIndex {
                source_name: source_name.to_string(),
                key,
            })?;
        let cfg = PointerSelectorConfig {
            num_heads,
            ..PointerSelectorConfig::new(d_model, h, num_layers)
        };
        cfg.validate()?;

        // expected shapes
        let mut expected: Vec<(String, Vec<usize>)> = vec![
            ("query_update_gate.bias".into(), vec![h]),
            ("query_proj.weight".into(), vec![h, h]),
            ("cand_proj.weight".into(), vec![h, h]),
        ];
        if d_model != h || sd.contains_key(&full("input_proj.weight")) {
            expected.push(("input_proj.weight".into(), vec![h, d_model]));
        }
        for l in 0..num_layers {
            expected.push((
                format!("cross_attn_layers.{l}.in_proj_weight"),
                vec![3 * h, h],
            ));
            expected.push((format!("cross_attn_layers.{l}.in_proj_bias"), vec![3 * h]));
            expected.push((format!("cross_attn_layers.{l}.out_proj.weight"), vec![h, h]));
            expected.push((format!("cross_attn_layers.{l}.out_proj.bias"), vec![h]));
            expected.push((format!("attn_norms.{l}.weight"), vec![h]));
            expected.push((format!("attn_norms.{l}.bias"), vec![h]));
        }
        let missing: Vec<String> = expected
            .iter()
            .map(|(k, _)| full(k))
            .filter(|k| !sd.contains_key(k))
            .collect();
        if !missing.is_empty() {
            return Err(PointerSelectorError::MissingTensors {
                source_name: source_name.to_string(),
                keys: missing,
            });
        }
        for (k, shape) in &expected {
            let t = &sd[&full(k)];
            if &t.shape != shape {
                return Err(PointerSelectorError::Shape {
                    source_name: source_name.to_string(),
                    key: full(k),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                });
            }
        }
        let get = |k: &str| &sd[&full(k)].data;
        // torch Linear weight [out, in] -> burn [in, out]
        let linear = |w: &[f32], out: usize, inp: usize, b: Option<&[f32]>| -> Linear<B> {
            let mut t = vec![0f32; out * inp];
            for o in 0..out {
                for i in 0..inp {
                    t[i * out + o] = w[o * inp + i];
                }
            }
            Linear {
                weight: Param::from_tensor(tensor2(t, inp, out, device)),
                bias: b.map(|b| {
                    Param::from_tensor(Tensor::from_data(
                        TensorData::new(b.to_vec(), [out]),
                        device,
                    ))
                }),
            }
        };
        let mut layers = Vec::with_capacity(num_layers);
        let mut norms = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let w = get(&format!("cross_attn_layers.{l}.in_proj_weight"));
            let b = get(&format!("cross_attn_layers.{l}.in_proj_bias"));
            let blk = |j: usize| {
                linear(
                    &w[j * h * h..(j + 1) * h * h],
                    h,
                    h,
                    Some(&b[j * h..(j + 1) * h]),
                )
            };
            layers.push(CrossAttention {
                q: blk(0),
                k: blk(1),
                v: blk(2),
                out: linear(
                    get(&format!("cross_attn_layers.{l}.out_proj.weight")),
                    h,
                    h,
                    Some(get(&format!("cross_attn_layers.{l}.out_proj.bias"))),
                ),
            });
            let mut ln = LayerNormConfig::new(h)
                .with_epsilon(cfg.layer_norm_eps)
                .init::<B>(device);
            ln.gamma = Param::from_tensor(Tensor::from_data(
                TensorData::new(get(&format!("attn_norms.{l}.weight")).clone(), [h]),
                device,
            ));
            ln.beta = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(get(&format!("attn_norms.{l}.bias")).clone(), [h]),
                device,
            )));
            norms.push(ln);
        }
        let input_proj = sd
            .contains_key(&full("input_proj.weight"))
            .then(|| linear(get("input_proj.weight"), h, d_model, None));
        Ok(PointerSelector {
            input_proj,
            layers,
            norms,
            query_proj: linear(get("query_proj.weight"), h, h, None),
            cand_proj: linear(get("cand_proj.weight"), h, h, None),
            gate: linear(
                gate_w.data.as_slice(),
                h,
                2 * h,
                Some(get("query_update_gate.bias")),
            ),
            d_model,
            hidden_dim: h,
            num_heads,
            temperature: cfg.temperature,
            mask_value: cfg.mask_value,
            layer_norm_eps: cfg.layer_norm_eps,
        })
    }

    fn device(&self) -> B::Device {
        self.gate.weight.val().device()
    }

    /// `x @ W (+ b)` for a burn Linear, with `x` row-major `[rows, in]` on the host.
    fn linear_host(&self, lin: &Linear<B>, x: Vec<f32>, rows: usize) -> Vec<f32> {
        let w = lin.weight.val();
        let [inp, _] = w.dims();
        let mut y = host(tensor2::<B>(x, rows, inp, &self.device()).matmul(w));
        if let Some(b) = &lin.bias {
            add_bias(&mut y, &host(b.val()));
        }
        y
    }

    fn project(&self, x: Vec<f32>, rows: usize) -> Vec<f32> {
        match &self.input_proj {
            Some(p) => self.linear_host(p, x, rows),
            None => x,
        }
    }

    fn check_dim(&self, what: &str, found: usize) -> Result<()> {
        if found != self.d_model {
            return Err(PointerSelectorError::DimMismatch {
                what: what.to_string(),
                expected: self.d_model,
                found,
            });
        }
        Ok(())
    }

    /// Precomputes the pool-only part of the model for candidates `cand`
    /// (`[K, d_model]`).
    pub fn prepare_pool(&self, cand: &Matrix) -> Result<PreparedPool<B>> {
        Ok(self.prepare_pools(&[cand])?.remove(0))
    }

    /// Like [`Self::prepare_pool`] for several pools at once: the projections
    /// of all pools run as single matmuls over the stacked rows.  When pools
    /// share rows (per-query pools drawn from one item set), prefer
    /// [`Self::prepare_rows`] once + [`Self::pool_from_rows`] per pool.
    pub fn prepare_pools(&self, pools: &[&Matrix]) -> Result<Vec<PreparedPool<B>>> {
        if pools.is_empty() {
            return Ok(vec![]);
        }
        let mut all = Vec::new();
        for (i, p) in pools.iter().enumerate() {
            self.check_dim(&format!("candidate pool {i}"), p.cols)?;
            if p.rows == 0 {
                return Err(PointerSelectorError::Input(format!(
                    "candidate pool {i} is empty"
                )));
            }
            all.extend_from_slice(&p.data);
        }
        let total: usize = pools.iter().map(|p| p.rows).sum();
        let rows = self.prepare_rows(&Matrix {
            rows: total,
            cols: self.d_model,
            data: all,
        })?;
        let mut out = Vec::with_capacity(pools.len());
        let mut start = 0;
        for p in pools {
            let positions: Vec<usize> = (start..start + p.rows).collect();
            start += p.rows;
            out.push(self.pool_from_rows(&rows, &positions)?);
        }
        Ok(out)
    }

    /// The per-row, query-independent part of the model for every row of
    /// `items` (`[N, d_model]`): projected attention keys and values of each
    /// layer and the normalised candidate projections, on the host.  Pools
    /// made of these rows are then cheap gathers ([`Self::pool_from_rows`]).
    pub fn prepare_rows(&self, items: &Matrix) -> Result<PreparedRows> {
        self.check_dim("candidate rows", items.cols)?;
        let n = items.rows;
        let h = self.hidden_dim;
        let ch = self.project(items.data.clone(), n);
        let mut c_norm = self.linear_host(&self.cand_proj, ch.clone(), n);
        normalize_rows(&mut c_norm, h);
        let keys = self
            .layers
            .iter()
            .map(|l| self.linear_host(&l.k, ch.clone(), n))
            .collect();
        let values = self
            .layers
            .iter()
            .map(|l| self.linear_host(&l.v, ch.clone(), n))
            .collect();
        Ok(PreparedRows {
            n,
            h,
            d: items.cols,
            keys,
            values,
            c_norm,
            raw: items.data.clone(),
        })
    }

    /// A pool made of rows `positions` of `rows` (in that order).
    pub fn pool_from_rows(
        &self,
        rows: &PreparedRows,
        positions: &[usize],
    ) -> Result<PreparedPool<B>> {
        if positions.is_empty() {
            return Err(PointerSelectorError::Input("empty candidate pool".into()));
        }
        if let Some(&bad) = positions.iter().find(|&&p| p >= rows.n) {
            return Err(PointerSelectorError::Input(format!(
                "pool row {bad} out of range for {} prepared rows",
                rows.n
            )));
        }
        let device = self.device();
        let (h, nh, k) = (self.hidden_dim, self.num_heads, positions.len());
        let hd = h / nh;
        let gather = |src: &[f32], w: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(k * w);
            for &p in positions {
                out.extend_from_slice(&src[p * w..(p + 1) * w]);
            }
            out
        };
        let keys_t = rows
            .keys
            .iter()
            .map(|t| {
                let g = gather(t, h);
                (0..nh)
                    .map(|hh| tensor2::<B>(transpose_cols(&g, k, h, hh * hd, hd), hd, k, &device))
                    .collect()
            })
            .collect();
        let values = rows
            .values
            .iter()
            .map(|t| {
                let g = gather(t, h);
                (0..nh)
                    .map(|hh| tensor2::<B>(cols_block(&g, k, h, hh * hd, hd), k, hd, &device))
                    .collect()
            })
            .collect();
        let c_norm_host = gather(&rows.c_norm, h);
        Ok(PreparedPool {
            k,
            keys_t,
            values,
            c_norm_t: tensor2::<B>(transpose_cols(&c_norm_host, k, h, 0, h), h, k, &device),
            c_norm_host,
            raw: gather(&rows.raw, rows.d),
        })
    }

    /// Initial query states (after the cross-attention layers, `query_proj`
    /// and normalisation) for a batch of queries over one pool.
    pub fn query_states(&self, pool: &PreparedPool<B>, queries: &[&[f32]]) -> Result<QueryStates> {
        let mut flat = Vec::with_capacity(queries.len() * self.d_model);
        for (i, q) in queries.iter().enumerate() {
            self.check_dim(&format!("query {i}"), q.len())?;
            flat.extend_from_slice(q);
        }
        let b = queries.len();
        let device = self.device();
        let (h, nh, k) = (self.hidden_dim, self.num_heads, pool.k);
        let hd = h / nh;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let mut qh = self.project(flat, b);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut q = self.linear_host(&layer.q, qh.clone(), b);
            for v in q.iter_mut() {
                *v *= scale;
            }
            let mut a = vec![0f32; b * h];
            for hh in 0..nh {
                let qhd = cols_block(&q, b, h, hh * hd, hd);
                let mut p =
                    host(tensor2::<B>(qhd, b, hd, &device).matmul(pool.keys_t[l][hh].clone()));
                softmax_rows(&mut p, k);
                let ah = host(tensor2::<B>(p, b, k, &device).matmul(pool.values[l][hh].clone()));
                for i in 0..b {
                    a[i * h + hh * hd..i * h + (hh + 1) * hd]
                        .copy_from_slice(&ah[i * hd..(i + 1) * hd]);
                }
            }
            let mut a = self.linear_host(&layer.out, a, b);
            for (x, r) in a.iter_mut().zip(&qh) {
                *x += r;
            }
            let norm = &self.norms[l];
            let gamma = host(norm.gamma.val());
            let beta = norm
                .beta
                .as_ref()
                .map(|b| host(b.val()))
                .unwrap_or_else(|| vec![0.0; h]);
            layer_norm_rows(&mut a, &gamma, &beta, self.layer_norm_eps);
            qh = a;
        }
        let mut st = self.linear_host(&self.query_proj, qh, b);
        normalize_rows(&mut st, h);
        Ok(QueryStates {
            rows: b,
            cols: h,
            data: st,
        })
    }

    /// Unmasked step logits `states · c_normᵀ / temperature`, row-major
    /// `[M, K]` on the host.
    pub fn step_logits(&self, pool: &PreparedPool<B>, states: &QueryStates) -> Vec<f32> {
        if states.rows == 0 {
            return vec![];
        }
        let t = tensor2::<B>(
            states.data.clone(),
            states.rows,
            states.cols,
            &self.device(),
        );
        let mut y = host(t.matmul(pool.c_norm_t.clone()));
        let temp = self.temperature as f32;
        for v in y.iter_mut() {
            *v /= temp;
        }
        y
    }

    /// Gate update after choosing `chosen[i]` for row `parents[i]` of
    /// `states`: `q' = normalize(g*q + (1-g)*c_norm[chosen])` with
    /// `g = sigmoid(W[q, c_norm[chosen]] + b)`.
    pub fn gate_update(
        &self,
        pool: &PreparedPool<B>,
        states: &QueryStates,
        parents: &[usize],
        chosen: &[usize],
    ) -> Result<QueryStates> {
        let h = self.hidden_dim;
        let m = chosen.len();
        if parents.len() != m {
            return Err(PointerSelectorError::Input(format!(
                "{} parents for {m} chosen indices",
                parents.len()
            )));
        }
        let mut cat = Vec::with_capacity(m * 2 * h);
        for (&p, &c) in parents.iter().zip(chosen) {
            if c >= pool.k || p >= states.rows {
                return Err(PointerSelectorError::Input(format!(
                    "index {c} (row {p}) out of range for a pool of {} candidates / {} states",
                    pool.k, states.rows
                )));
            }
            cat.extend_from_slice(&states.data[p * h..(p + 1) * h]);
            cat.extend_from_slice(&pool.c_norm_host[c * h..(c + 1) * h]);
        }
        if m == 0 {
            return Ok(QueryStates {
                rows: 0,
                cols: h,
                data: vec![],
            });
        }
        let g = self.linear_host(&self.gate, cat.clone(), m);
        let mut out = vec![0f32; m * h];
        for i in 0..m {
            for j in 0..h {
                let gv = 1.0 / (1.0 + (-g[i * h + j]).exp());
                let q = cat[i * 2 * h + j];
                let c = cat[i * 2 * h + h + j];
                out[i * h + j] = gv * q + (1.0 - gv) * c;
            }
        }
        normalize_rows(&mut out, h);
        Ok(QueryStates {
            rows: m,
            cols: h,
            data: out,
        })
    }

    /// Teacher-forced logits (forward() with labels) for several label
    /// sequences of queries over one pool, in one batch: `[seq][step][K]`,
    /// chosen positions at -100, no exclusion.
    pub fn teacher_forced_logits_batch(
        &self,
        pool: &PreparedPool<B>,
        queries: &[&[f32]],
        labels: &[Vec<usize>],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if queries.len() != labels.len() {
            return Err(PointerSelectorError::Input(format!(
                "{} queries but {} label sequences",
                queries.len(),
                labels.len()
            )));
        }
        let k = pool.k;
        for (i, ls) in labels.iter().enumerate() {
            if let Some(&bad) = ls.iter().find(|&&l| l >= k) {
                return Err(PointerSelectorError::Input(format!(
                    "label {bad} of sequence {i} out of range for a pool of {k} candidates"
                )));
            }
        }
        let steps = labels.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); labels.len()];
        let mut states = self.query_states(pool, queries)?;
        let mut alive: Vec<usize> = (0..labels.len()).collect();
        for s in 0..steps {
            alive.retain(|&i| labels[i].len() > s);
            let rows: Vec<usize> = if s == 0 {
                alive.clone()
            } else {
                (0..alive.len()).collect()
            };
            if s == 0 {
                states = states.select(&rows);
            }
            let logits = self.step_logits(pool, &states);
            for (r, &i) in alive.iter().enumerate() {
                let mut row = logits[r * k..(r + 1) * k].to_vec();
                for &c in &labels[i][..s] {
                    row[c] = self.mask_value as f32;
                }
                out[i].push(row);
            }
            let next: Vec<usize> = alive.iter().map(|&i| labels[i][s]).collect();
            // keep only rows that continue past this step
            let keep: Vec<usize> = alive
                .iter()
                .enumerate()
                .filter(|(_, &i)| labels[i].len() > s + 1)
                .map(|(r, _)| r)
                .collect();
            if keep.is_empty() {
                break;
            }
            let kept_next: Vec<usize> = keep.iter().map(|&r| next[r]).collect();
            states = self.gate_update(pool, &states, &keep, &kept_next)?;
            alive = keep.iter().map(|&r| alive[r]).collect();
        }
        Ok(out)
    }

    /// Teacher-forced logits `[step][K]` for one query and label sequence.
    pub fn teacher_forced_logits(
        &self,
        pool: &PreparedPool<B>,
        query: &[f32],
        labels: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .teacher_forced_logits_batch(pool, &[query], &[labels.to_vec()])?
            .remove(0))
    }

    /// `compute_log_probs`: sum over steps of `log_softmax(logits_s)[label_s]`
    /// over all K entries (chosen ones at -100), optionally with the
    /// `exclude` position at -inf (renormalised over the rest).
    pub fn sequence_log_prob(
        &self,
        pool: &PreparedPool<B>,
        query: &[f32],
        labels: &[usize],
        exclude: Option<usize>,
    ) -> Result<f64> {
        let logits = self.teacher_forced_logits(pool, query, labels)?;
        Ok(logits
            .iter()
            .zip(labels)
            .map(|(row, &l)| log_softmax_at(row, l, exclude))
            .sum())
    }

    /// forward() without labels: greedy argmax (first maximum) decoding,
    /// no exclusion.  Returns the predictions and the `[step][K]` logits.
    pub fn greedy(
        &self,
        pool: &PreparedPool<B>,
        queries: &[&[f32]],
        shot_num: usize,
    ) -> Result<Vec<GreedyOutput>> {
        let k = pool.k;
        let mut states = self.query_states(pool, queries)?;
        let mut out: Vec<GreedyOutput> = vec![(vec![], vec![]); queries.len()];
        for s in 0..shot_num {
            let logits = self.step_logits(pool, &states);
            let mut chosen = Vec::with_capacity(queries.len());
            for (b, o) in out.iter_mut().enumerate() {
                let mut row = logits[b * k..(b + 1) * k].to_vec();
                for &c in &o.0 {
                    row[c] = self.mask_value as f32;
                }
                let mut best = 0;
                for j in 1..k {
                    if row[j] > row[best] {
                        best = j;
                    }
                }
                o.0.push(best);
                o.1.push(row);
                chosen.push(best);
            }
            if s + 1 < shot_num {
                let parents: Vec<usize> = (0..queries.len()).collect();
                states = self.gate_update(pool, &states, &parents, &chosen)?;
            }
        }
        Ok(out)
    }
}

/// `log_softmax(row)[idx]` computed in f64, with `exclude` (if any) at -inf.
pub fn log_softmax_at(row: &[f32], idx: usize, exclude: Option<usize>) -> f64 {
    row[idx] as f64 - log_sum_exp(row, exclude)
}

/// `log Σ exp(row_j)` over `j != exclude`, in f64.
pub fn log_sum_exp(row: &[f32], exclude: Option<usize>) -> f64 {
    let mut m = f32::NEG_INFINITY;
    for (j, &x) in row.iter().enumerate() {
        if Some(j) != exclude && x > m {
            m = x;
        }
    }
    let mut s = 0f64;
    for (j, &x) in row.iter().enumerate() {
        if Some(j) != exclude {
            s += ((x - m) as f64).exp();
        }
    }
    m as f64 + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    type Bk = DefaultBackend;

    pub(crate) fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/pointer_selector")
            .join(name)
    }

    fn expected() -> Value {
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
    }

    fn model() -> PointerSelector<Bk> {
        PointerSelector::load(&fixture("sft.ckpt"), 1, &Default::default()).unwrap()
    }

    fn usizes(v: &Value) -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    }

    fn f2(v: &Value) -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| {
                assert_eq!(x.len(), y.len());
                x.iter().zip(y).map(|(p, q)| (*p as f64 - q).abs())
            })
            .fold(0.0, f64::max)
    }

    /// (pool matrix, query embedding) for a block of expected.json.
    pub(crate) fn block_inputs(block: &Value, shared: bool) -> (Matrix, Vec<f32>) {
        let all = tensor_io::load_matrix(&fixture("candidate_embeddings_pool.pt")).unwrap();
        let q = block["query_id"].as_u64().unwrap() as usize;
        let pool = if shared {
            tensor_io::load_matrix(&fixture("candidate_embeddings.pt")).unwrap()
        } else {
            all.select_rows(&usizes(&block["candidate_global_ids"]))
                .unwrap()
        };
        (pool, all.row(q).to_vec())
    }

    #[test]
    fn infers_config_from_checkpoint() {
        let m = model();
        let c = m.config();
        assert_eq!(
            (c.d_model, c.hidden_dim, c.num_layers, c.num_heads),
            (64, 32, 3, 1)
        );
    }

    #[test]
    fn teacher_forced_and_greedy_parity() {
        let m = model();
        let exp = expected();
        let mut checked = 0;
        for (section, shared) in [("shared_pool", true), ("per_query_pool", false)] {
            for block in exp[section]["queries"].as_array().unwrap() {
                let (pool_m, q) = block_inputs(block, shared);
                let pool = m.prepare_pool(&pool_m).unwrap();
                let tf = block["teacher_forced"].as_array().unwrap();
                let labels: Vec<Vec<usize>> = tf.iter().map(|t| usizes(&t["labels"])).collect();
                let qs: Vec<&[f32]> = labels.iter().map(|_| q.as_slice()).collect();
                let got = m.teacher_forced_logits_batch(&pool, &qs, &labels).unwrap();
                for (i, g) in got.iter().enumerate() {
                    let d = max_diff(g, &f2(&tf[i]["logits"]));
                    assert!(
                        d <= 1e-5,
                        "{section} q{} seq {i}: logits diff {d}",
                        block["query_id"]
                    );
                    let lp = m.sequence_log_prob(&pool, &q, &labels[i], None).unwrap();
                    let e = tf[i]["sequence_log_prob"].as_f64().unwrap();
                    assert!((lp - e).abs() <= 1e-5, "seq log prob {lp} vs {e}");
                    for (s, row) in g.iter().enumerate() {
                        let e = tf[i]["step_log_probs"][s].as_f64().unwrap();
                        assert!((log_softmax_at(row, labels[i][s], None) - e).abs() <= 1e-5);
                    }
                }
                let t3 = &block["teacher_forced_shot3"];
                let l3 = usizes(&t3["labels"]);
                let got = m.teacher_forced_logits(&pool, &q, &l3).unwrap();
                let d = max_diff(&got, &f2(&t3["logits"]));
                assert!(d <= 1e-5, "shot3 diff {d}");
                for (key, shot) in [("greedy_shot2", 2), ("greedy_shot3", 3)] {
                    let (pred, logits) = m.greedy(&pool, &[&q], shot).unwrap().remove(0);
                    assert_eq!(pred, usizes(&block[key]["predictions"]), "{section} {key}");
                    let d = max_diff(&logits, &f2(&block[key]["logits"]));
                    assert!(d <= 1e-5, "{key} diff {d}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 2);
    }

    #[test]
    fn repeated_label_sees_mask() {
        let m = model();
        let exp = expected();
        let block = &exp["shared_pool"]["queries"][0];
        let tf = block["teacher_forced"].as_array().unwrap();
        let labels: Vec<Vec<usize>> = tf.iter().map(|t| usizes(&t["labels"])).collect();
        let (i, l) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| l[0] == l[1])
            .expect("fixture has a repeated label");
        let (pool_m, q) = block_inputs(block, true);
        let pool = m.prepare_pool(&pool_m).unwrap();
        let got = m.teacher_forced_logits(&pool, &q, l).unwrap();
        assert_eq!(got[1][l[0]], -100.0);
        let e = tf[i]["sequence_log_prob"].as_f64().unwrap();
        assert!((m.sequence_log_prob(&pool, &q, l, None).unwrap() - e).abs() <= 1e-5);
    }

    #[test]
    fn batched_greedy_shared_pool() {
        let m = model();
        let exp = expected();
        let b = &exp["batched_greedy_shared_pool"];
        let all = tensor_io::load_matrix(&fixture("candidate_embeddings_pool.pt")).unwrap();
        let pool = m
            .prepare_pool(&tensor_io::load_matrix(&fixture("candidate_embeddings.pt")).unwrap())
            .unwrap();
        let ids = usizes(&b["query_ids"]);
        let qs: Vec<&[f32]> = ids.iter().map(|&i| all.row(i)).collect();
        let got = m.greedy(&pool, &qs, 2).unwrap();
        for (i, (pred, logits)) in got.iter().enumerate() {
            assert_eq!(pred, &usizes(&b["predictions"][i]));
            let d = max_diff(logits, &f2(&b["logits"][i]));
            assert!(d <= 1e-5, "batched greedy diff {d}");
        }
    }

    #[test]
    fn missing_tensors_are_all_listed() {
        let mut sd = tensor_io::load_state_dict(&fixture("sft.ckpt")).unwrap();
        sd.remove("lever_lm.pointer_selector.cand_proj.weight");
        sd.remove("lever_lm.pointer_selector.attn_norms.1.bias");
        let e = PointerSelector::<Bk>::from_state_dict(&sd, "x.ckpt", 1, &Default::default())
            .unwrap_err();
        match &e {
            PointerSelectorError::MissingTensors { keys, .. } => assert_eq!(
                keys,
                &vec![
                    "lever_lm.pointer_selector.cand_proj.weight".to_string(),
                    "lever_lm.pointer_selector.attn_norms.1.bias".to_string()
                ]
            ),
            other => panic!("unexpected {other}"),
        }
        // prefix-free state dict works too
        let sd2: BTreeMap<String, NamedTensor> = tensor_io::load_state_dict(&fixture("sft.ckpt"))
            .unwrap()
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("lever_lm.pointer_selector.")
                    .map(|s| (s.to_string(), v))
            })
            .collect();
        assert!(
            PointerSelector::<Bk>::from_state_dict(&sd2, "bare", 1, &Default::default()).is_ok()
        );
        let none: BTreeMap<String, NamedTensor> = BTreeMap::new();
        assert!(matches!(
            PointerSelector::<Bk>::from_state_dict(&none, "empty", 1, &Default::default()),
            Err(PointerSelectorError::NotFound { .. })
        ));
        // heads must divide hidden
        assert!(matches!(
            PointerSelector::<Bk>::from_state_dict(&sd2, "bare", 5, &Default::default()),
            Err(PointerSelectorError::Config(_))
        ));
    }

    #[test]
    fn layer_indices_must_be_contiguous() {
        // A key renamed to layer 99999999: the old loader built the
        // expected keys of 10^8 layers (3.8 GB) before listing them missing.
        let sd = tensor_io::load_state_dict(&fixture("sft.ckpt")).unwrap();
        let old = "lever_lm.pointer_selector.attn_norms.1.bias";
        let new = "lever_lm.pointer_selector.attn_norms.99999999.bias";
        let mut bad = sd.clone();
        let t = bad.remove(old).unwrap();
        bad.insert(new.to_string(), t);
        let started = std::time::Instant::now();
        let e = PointerSelector::<Bk>::from_state_dict(&bad, "x.ckpt", 1, &Default::default())
            .unwrap_err();
        assert!(started.elapsed().as_secs() < 5);
        match &e {
            PointerSelectorError::LayerIndex { key, source_name } => {
                assert_eq!((key.as_str(), source_name.as_str()), (new, "x.ckpt"))
            }
            other => panic!("unexpected {other}"),
        }
        assert!(e.to_string().contains(new), "{e}");
        // A gap, and an index that is not a plain number.
        for key in [
            "lever_lm.pointer_selector.cross_attn_layers.7.out_proj.bias",
            "lever_lm.pointer_selector.cross_attn_layers.01.out_proj.bias",
            "lever_lm.pointer_selector.attn_norms.x.bias",
        ] {
            let mut bad = sd.clone();
            bad.insert(key.to_string(), sd[old].clone());
            let e = PointerSelector::<Bk>::from_state_dict(&bad, "x.ckpt", 1, &Default::default())
                .unwrap_err();
            assert!(
                matches!(&e, PointerSelectorError::LayerIndex { key: k, .. } if k == key),
                "{e}"
            );
        }
    }

    #[test]
    fn dim_mismatch_is_an_error() {
        let m = model();
        let bad = Matrix {
            rows: 2,
            cols: 32,
            data: vec![0.5; 64],
        };
        let e = m.prepare_pool(&bad).unwrap_err().to_string();
        assert!(e.contains("32") && e.contains("64"), "{e}");
        let pool = m
            .prepare_pool(&Matrix {
                rows: 2,
                cols: 64,
                data: vec![0.5; 128],
            })
            .unwrap();
        assert!(matches!(
            m.query_states(&pool, &[&[0.0; 10]]),
            Err(PointerSelectorError::DimMismatch { found: 10, .. })
        ));
    }

    /// Independent scalar reference of the query path (any head count).
    fn reference_state(m: &PointerSelector<Bk>, cand: &Matrix, q: &[f32]) -> Vec<f32> {
        let lin = |l: &Linear<Bk>, x: &[f32]| -> Vec<f32> {
            let w = host(l.weight.val()); // [in, out]
            let [inp, out] = l.weight.val().dims();
            let b = l
                .bias
                .as_ref()
                .map(|b| host(b.val()))
                .unwrap_or(vec![0.0; out]);
            (0..out)
                .map(|o| (0..inp).map(|i| x[i] * w[i * out + o]).sum::<f32>() + b[o])
                .collect()
        };
        let proj = |x: &[f32]| match &m.input_proj {
            Some(p) => lin(p, x),
            None => x.to_vec(),
        };
        let h = m.hidden_dim;
        let hd = h / m.num_heads;
        let c: Vec<Vec<f32>> = (0..cand.rows).map(|r| proj(cand.row(r))).collect();
        let mut qh = proj(q);
        for (l, layer) in m.layers.iter().enumerate() {
            let qq = lin(&layer.q, &qh);
            let keys: Vec<Vec<f32>> = c.iter().map(|x| lin(&layer.k, x)).collect();
            let vals: Vec<Vec<f32>> = c.iter().map(|x| lin(&layer.v, x)).collect();
            let mut a = vec![0f32; h];
            for head in 0..m.num_heads {
                let r = head * hd..(head + 1) * hd;
                let sc: Vec<f32> = keys
                    .iter()
                    .map(|k| {
                        qq[r.clone()]
                            .iter()
                            .zip(&k[r.clone()])
                            .map(|(x, y)| x * y)
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f32::MIN, f32::max);
                let e: Vec<f32> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, v) in vals.iter().enumerate() {
                    for d in r.clone() {
                        a[d] += e[j] / z * v[d];
                    }
                }
            }
            let mut y: Vec<f32> = lin(&layer.out, &a)
                .iter()
                .zip(&qh)
                .map(|(x, r)| x + r)
                .collect();
            let g = host(m.norms[l].gamma.val());
            let b = host(m.norms[l].beta.as_ref().unwrap().val());
            let mean = y.iter().sum::<f32>() / h as f32;
            let var = y.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / h as f32;
            for (j, x) in y.iter_mut().enumerate() {
                *x = (*x - mean) / (var + 1e-5).sqrt() * g[j] + b[j];
            }
            qh = y;
        }
        let mut s = lin(&m.query_proj, &qh);
        let n = s.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        s.iter_mut().for_each(|x| *x /= n);
        s
    }

    #[test]
    fn multi_head_matches_scalar_reference() {
        for heads in [1usize, 2, 4] {
            let cfg = PointerSelectorConfig::new(8, 8, 2).with_num_heads(heads);
            let m = cfg.init::<Bk>(&Default::default()).unwrap();
            let cand = Matrix {
                rows: 5,
                cols: 8,
                data: (0..40)
                    .map(|i| ((i * 7 % 11) as f32) / 11.0 - 0.4)
                    .collect(),
            };
            let pool = m.prepare_pool(&cand).unwrap();
            let q1: Vec<f32> = (0..8).map(|i| i as f32 / 8.0).collect();
            let q2: Vec<f32> = (0..8).map(|i| 1.0 - i as f32 / 5.0).collect();
            let both = m.query_states(&pool, &[&q1, &q2]).unwrap().data;
            for (i, q) in [&q1, &q2].iter().enumerate() {
                let r = reference_state(&m, &cand, q);
                for (a, b) in both[i * 8..(i + 1) * 8].iter().zip(&r) {
                    assert!((a - b).abs() < 1e-5, "heads {heads}: {a} vs {b}");
                }
            }
        }
    }
}
