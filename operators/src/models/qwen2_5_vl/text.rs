//! The Qwen2 decoder of Qwen2.5-VL in burn: token embedding with image
//! embeddings spliced in, decoder layers with GQA attention and M-RoPE, final
//! RMSNorm and (tied or untied) LM head, plus a per-layer KV cache that
//! supports a batched prefill of left-padded prompts followed by batched
//! incremental decode steps and beam reordering.
//!
//! Numerics follow the Hugging Face reference (`Qwen2_5_VLTextModel`, eager
//! attention) in float32: RMSNorm in f32, rotary angles `position * inv_freq`
//! in f32, softmax over `q k^T / sqrt(head_dim)` with padded / future keys
//! masked out.

use super::config::TextConfig;
use super::host;
use super::host_bf16;
use super::host_head;
use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

/// Errors of the language model: loading weights or malformed inputs.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A tensor is missing, has the wrong shape or an unsupported dtype.
    #[error("weight `{key}`: {message}")]
    Weight {
        /// Tensor name.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Inputs given to the model are inconsistent (shapes, counts).
    #[error("invalid model input: {0}")]
    Input(String),
}

/// A source of named float tensors (a checkpoint). The language model only
/// needs this getter, so any weight store can feed it.
pub trait TensorSource {
    /// Returns the tensor `key` converted to f32 in row-major order, checking
    /// that its shape equals `shape`.
    fn tensor_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, TextError>;
    /// Whether the checkpoint stores `key` itself (a tied head that only
    /// falls back to the embedding does not count).
    fn contains(&self, key: &str) -> bool;
    /// The tensor `key` as its bf16 words (row-major) when the checkpoint
    /// stores it in bf16, checking that its shape equals `shape`; `None`
    /// otherwise (the default: a source without bf16 tensors).
    fn tensor_bf16(&self, key: &str, shape: &[usize]) -> Result<Option<Vec<u16>>, TextError> {
        let _ = (key, shape);
        Ok(None)
    }
    /// Streams the rows of the bf16 matrix `key` of `shape` to `f` as
    /// (first row, whole rows), a few at a time; `false` when it is not
    /// stored in bf16 (the default).
    fn bf16_rows(
        &self,
        key: &str,
        shape: [usize; 2],
        f: &mut dyn FnMut(usize, &[u16]),
    ) -> Result<bool, TextError> {
        let _ = (key, shape, f);
        Ok(false)
    }
}

/// Rotary settings of the text model (M-RoPE).
#[derive(Debug, Clone)]
struct MRope {
    /// `1 / theta^(2i/head_dim)` for the head_dim/2 frequencies.
    inv_freq: Vec<f32>,
    /// Number of frequencies fed by the t, h and w position rows.
    section: Vec<usize>,
}

impl MRope {
    fn new(head_dim: usize, theta: f64, section: &[usize]) -> Self {
        // Same rounding path as the reference: exponent in f32, power, 1/x.
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let e = (2 * i) as f32 / head_dim as f32;
                1.0f32 / (theta as f32).powf(e)
            })
            .collect();
        Self {
            inv_freq,
            section: section.to_vec(),
        }
    }

    /// cos / sin tables [B, 1, L, head_dim] for positions [3, B, L].
    fn tables<B: Backend>(&self, positions: Tensor<B, 3, Int>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, b, l] = positions.dims();
        let device = positions.device();
        let pos = positions.float();
        let mut parts = Vec::with_capacity(self.section.len());
        let mut start = 0;
        for (row, &n) in self.section.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let p = pos
                .clone()
                .slice([row..row + 1, 0..b, 0..l])
                .reshape([b, l, 1]);
            let f = Tensor::<B, 1>::from_data(
                TensorData::new(self.inv_freq[start..start + n].to_vec(), [n]),
                &device,
            )
            .reshape([1, 1, n]);
            parts.push(p.mul(f));
            start += n;
        }
        let half = Tensor::cat(parts, 2);
        let full = Tensor::cat(vec![half.clone(), half], 2).reshape([b, 1, l, 2 * start]);
        (full.clone().cos(), full.sin())
    }
}

fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, l, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..l, 0..d / 2]);
    let x2 = x.slice([0..b, 0..h, 0..l, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    x.clone().mul(cos.clone()) + rotate_half(x).mul(sin.clone())
}

/// Row-major [rows, cols] -> row-major [cols, rows].
fn transpose_host(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (r, row) in x.chunks_exact(cols).enumerate() {
        for (c, &val) in row.iter().enumerate() {
            out[c * rows + r] = val;
        }
    }
    out
}

fn linear_from<B: Backend>(
    src: &dyn TensorSource,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Linear<B>, TextError> {
    let key = format!("{prefix}.weight");
    // On the host a bf16 checkpoint's matrix stays bf16 (see `host_bf16`).
    let host_bf16 = if host::is_host::<B>() {
        src.tensor_bf16(&key, &[d_out, d_in])?
            .and_then(|w| host_bf16::bf16_linear_weight::<B>(w, d_out, d_in))
    } else {
        None
    };
    let weight = match host_bf16 {
        Some(w) => w,
        None => {
            let w = src.tensor_f32(&key, &[d_out, d_in])?;
            // PyTorch stores [out, in]; burn's Linear multiplies by [in, out].
            Tensor::<B, 2>::from_data(TensorData::new(w, [d_out, d_in]), device).transpose()
        }
    };
    let bias = if bias {
        let key = format!("{prefix}.bias");
        let b = src.tensor_f32(&key, &[d_out])?;
        Some(Param::from_tensor(Tensor::<B, 1>::from_data(
            TensorData::new(b, [d_out]),
            device,
        )))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias,
    })
}

fn rms_from<B: Backend>(
    src: &dyn TensorSource,
    key: &str,
    d: usize,
    eps: f64,
    device: &B::Device,
) -> Result<RmsNorm<B>, TextError> {
    let g = src.tensor_f32(key, &[d])?;
    Ok(RmsNorm {
        gamma: Param::from_tensor(Tensor::from_data(TensorData::new(g, [d]), device)),
        epsilon: eps,
    })
}

/// Which keys each new query may see.
enum AttentionMask<'a, B: Backend> {
    /// Key validity per row (false = padding) and the number of cached
    /// positions before the new queries; causal order is implied.
    Host {
        key_valid: &'a [Vec<bool>],
        past: usize,
    },
    /// `masked[b, i, j]` true where query `i` may not see key `j`.
    Tensor(Tensor<B, 3, Bool>),
}

/// `masked[b, i, j]` = key `j` invalid (padding) or after query `i`
/// (causal), for `l` queries following `past` cached positions; built on the
/// device from [B, T] and [L, T] pieces.
fn build_mask<B: Backend>(
    key_valid: &[Vec<bool>],
    past: usize,
    l: usize,
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    let b = key_valid.len();
    let t = past + l;
    let pad: Vec<bool> = key_valid.iter().flatten().map(|&ok| !ok).collect();
    let causal: Vec<bool> = (0..l)
        .flat_map(|i| (0..t).map(move |j| j > past + i))
        .collect();
    let pad = Tensor::<B, 2, Bool>::from_data(TensorData::new(pad, [b, t]), device)
        .reshape([b, 1, t])
        .expand([b, l, t]);
    let causal = Tensor::<B, 2, Bool>::from_data(TensorData::new(causal, [l, t]), device)
        .reshape([1, l, t])
        .expand([b, l, t]);
    pad.bool_or(causal)
}

/// Self-attention of one decoder layer: q/k/v projections with bias, o_proj
/// without bias, grouped-query attention.
#[derive(Module, Debug)]
pub struct TextAttention<B: Backend> {
    /// Query projection (hidden -> heads*head_dim).
    pub q_proj: Linear<B>,
    /// Key projection (hidden -> kv_heads*head_dim).
    pub k_proj: Linear<B>,
    /// Value projection (hidden -> kv_heads*head_dim).
    pub v_proj: Linear<B>,
    /// Output projection (heads*head_dim -> hidden), no bias.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
}

impl<B: Backend> TextAttention<B> {
    /// Attends the new positions `x` [B, Lq, D] to the cached keys plus their
    /// own; `masked` [B, Lq, T] is true where a query may not see a key.
    /// Appends the new keys / values to `slot`.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &AttentionMask<'_, B>,
        slot: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let [b, lq, _] = x.dims();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = h / kvh;
        let q = host::apply_linear(&self.q_proj, x.clone())
            .reshape([b, lq, h, hd])
            .swap_dims(1, 2);
        let k = host::apply_linear(&self.k_proj, x.clone())
            .reshape([b, lq, kvh, hd])
            .swap_dims(1, 2);
        let v = host::apply_linear(&self.v_proj, x)
            .reshape([b, lq, kvh, hd])
            .swap_dims(1, 2);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let masked = match mask {
            AttentionMask::Host { key_valid, past } => {
                if let Some(out) = host::attention(&q, &k, &v, key_valid, *past) {
                    return host::apply_linear(&self.o_proj, out);
                }
                build_mask::<B>(key_valid, *past, lq, &q.device())
            }
            AttentionMask::Tensor(m) => m.clone(),
        };
        let t = k.dims()[2];
        // Query head j uses kv head j / rep: group the rep query heads of a kv
        // head along the sequence axis so no key/value copy is needed.
        let q = q.reshape([b, kvh, rep * lq, hd]);
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (hd as f64).sqrt())
            .reshape([b, kvh, rep, lq, t]);
        let mask = masked
            .reshape([b, 1, 1, lq, t])
            .expand([b, kvh, rep, lq, t]);
        // A large finite value: rows with every key masked (left padding)
        // become uniform instead of NaN; their outputs are never used.
        let scores = scores.mask_fill(mask, -1.0e30f32);
        let probs = softmax(scores, 4).reshape([b, kvh, rep * lq, t]);
        let out = probs
            .matmul(v)
            .reshape([b, h, lq, hd])
            .swap_dims(1, 2)
            .reshape([b, lq, h * hd]);
        host::apply_linear(&self.o_proj, out)
    }
}

/// SiLU-gated MLP: `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Module, Debug)]
pub struct TextMlp<B: Backend> {
    /// Gate projection.
    pub gate_proj: Linear<B>,
    /// Up projection.
    pub up_proj: Linear<B>,
    /// Down projection.
    pub down_proj: Linear<B>,
}

impl<B: Backend> TextMlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = silu(host::apply_linear(&self.gate_proj, x.clone()));
        host::apply_linear(&self.down_proj, g.mul(host::apply_linear(&self.up_proj, x)))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct TextDecoderLayer<B: Backend> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Attention.
    pub self_attn: TextAttention<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// MLP.
    pub mlp: TextMlp<B>,
}

/// Key/value cache of all layers for a batch of rows, with the validity of
/// every cached key (false = left padding) and the next decoding position of
/// every row.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    key_valid: Vec<Vec<bool>>,
    next_position: Vec<i64>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            key_valid: Vec::new(),
            next_position: Vec::new(),
        }
    }

    /// Number of rows (0 before the prefill).
    pub fn batch_size(&self) -> usize {
        self.key_valid.len()
    }

    /// Number of cached positions (keys) per row.
    pub fn seq_len(&self) -> usize {
        self.key_valid.first().map_or(0, Vec::len)
    }

    /// Position (on all three M-RoPE rows) the next token of each row gets:
    /// max of the row's positions so far + 1.
    pub fn next_positions(&self) -> &[i64] {
        &self.next_position
    }

    /// Validity of each cached key per row (false where the prompt was padded).
    pub fn key_valid(&self) -> &[Vec<bool>] {
        &self.key_valid
    }

    /// A cache holding the given rows, in the given order (rows may repeat):
    /// beam reordering, dropping finished rows or expanding a prompt.
    pub fn select(&self, rows: &[usize]) -> Result<Self, TextError> {
        let n = self.batch_size();
        if let Some(bad) = rows.iter().find(|&&r| r >= n) {
            return Err(TextError::Input(format!(
                "cache row {bad} out of range (batch {n})"
            )));
        }
        let device = self.layers.iter().flatten().next().map(|(k, _)| k.device());
        let layers = match device {
            None => self.layers.clone(),
            Some(device) => {
                let idx = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
                    &device,
                );
                self.layers
                    .iter()
                    .map(|slot| {
                        slot.as_ref().map(|(k, v)| {
                            (
                                k.clone().select(0, idx.clone()),
                                v.clone().select(0, idx.clone()),
                            )
                        })
                    })
                    .collect()
            }
        };
        Ok(Self {
            layers,
            key_valid: rows.iter().map(|&r| self.key_valid[r].clone()).collect(),
            next_position: rows.iter().map(|&r| self.next_position[r]).collect(),
        })
    }

    /// Every row repeated `n` times consecutively (row-major), like
    /// `repeat_interleave`: prompt `i` becomes rows `i*n .. i*n+n`.
    pub fn repeat_interleave(&self, n: usize) -> Result<Self, TextError> {
        let rows: Vec<usize> = (0..self.batch_size())
            .flat_map(|r| std::iter::repeat_n(r, n))
            .collect();
        self.select(&rows)
    }
}

/// The Qwen2 language model of Qwen2.5-VL.
#[derive(Module, Debug)]
pub struct TextModel<B: Backend> {
    /// Token embedding [vocab, hidden]. Empty ([0, hidden]) when
    /// [`HeadLayout::PackedTied`]: the rows are then read from `lm_head`,
    /// so a tied checkpoint's matrix is held once.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// Decoder layers.
    pub layers: Vec<TextDecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// LM head weight, laid out as [`HeadLayout`] says: on the ndarray
    /// backend packed for the host kernel (`host::pack_lm_head`),
    /// elsewhere transposed and contiguous, [hidden, vocab], so that
    /// `h @ lm_head` is a plain matmul.
    pub lm_head: Param<Tensor<B, 2>>,
    /// How `lm_head` (and, when tied on the host, the embedding) is stored.
    #[module(skip)]
    pub head_layout: HeadLayout,
    #[module(skip)]
    rope: MRope,
    /// Hidden size.
    pub hidden_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// Memory layout of [`TextModel::lm_head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// [hidden, vocab], row-major: the generic tensor path (CUDA, autodiff).
    Transposed,
    /// Packed in 16-column blocks for `host::lm_head` (ndarray backend),
    /// untied: the embedding is its own tensor.
    Packed,
    /// As `Packed`, and the checkpoint ties the embedding to the head: the
    /// embedding rows are gathered from the packed head, so the matrix is
    /// held once instead of twice.
    PackedTied,
}

/// Key prefixes under which checkpoints store the language model.
const PREFIXES: [&str; 2] = ["model.language_model", "model"];

impl<B: Backend> TextModel<B> {
    /// Loads the decoder from a checkpoint, accepting the published key names
    /// (`model.layers.N...`) and the transformers-5 names
    /// (`model.language_model.layers.N...`).
    pub fn load(
        config: &TextConfig,
        src: &dyn TensorSource,
        device: &B::Device,
    ) -> Result<Self, TextError> {
        let prefix = PREFIXES
            .iter()
            .find(|p| src.contains(&format!("{p}.embed_tokens.weight")))
            .ok_or_else(|| TextError::Weight {
                key: "model.embed_tokens.weight".into(),
                message: "missing (also under model.language_model.)".into(),
            })?;
        let d = config.hidden_size;
        let hd = config.head_dim();
        let (h, kvh) = (config.num_attention_heads, config.num_key_value_heads);
        let v = config.vocab_size;
        let eps = config.rms_norm_eps;
        let emb_key = format!("{prefix}.embed_tokens.weight");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("{prefix}.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let ff = config.intermediate_size;
            layers.push(TextDecoderLayer {
                input_layernorm: rms_from(
                    src,
                    &format!("{p}.input_layernorm.weight"),
                    d,
                    eps,
                    device,
                )?,
                self_attn: TextAttention {
                    q_proj: linear_from(src, &format!("{a}.q_proj"), d, h * hd, true, device)?,
                    k_proj: linear_from(src, &format!("{a}.k_proj"), d, kvh * hd, true, device)?,
                    v_proj: linear_from(src, &format!("{a}.v_proj"), d, kvh * hd, true, device)?,
                    o_proj: linear_from(src, &format!("{a}.o_proj"), h * hd, d, false, device)?,
                    num_heads: h,
                    num_kv_heads: kvh,
                    head_dim: hd,
                },
                post_attention_layernorm: rms_from(
                    src,
                    &format!("{p}.post_attention_layernorm.weight"),
                    d,
                    eps,
                    device,
                )?,
                mlp: TextMlp {
                    gate_proj: linear_from(src, &format!("{m}.gate_proj"), d, ff, false, device)?,
                    up_proj: linear_from(src, &format!("{m}.up_proj"), d, ff, false, device)?,
                    down_proj: linear_from(src, &format!("{m}.down_proj"), ff, d, false, device)?,
                },
            });
        }
        let norm = rms_from(src, &format!("{prefix}.norm.weight"), d, eps, device)?;
        let (embed_tokens, lm_head, head_layout) = if host::is_host::<B>() {
            host_head::load::<B>(src, &emb_key, config.tie_word_embeddings, v, d, device)?
        } else {
            let emb = src.tensor_f32(&emb_key, &[v, d])?;
            let head = if config.tie_word_embeddings && !src.contains("lm_head.weight") {
                None
            } else {
                Some(src.tensor_f32("lm_head.weight", &[v, d])?)
            };
            // A tied checkpoint that also stores a head equal to the
            // embedding: hold the matrix once.
            let head = head.filter(|h| !(config.tie_word_embeddings && *h == emb));
            let head_t = transpose_host(head.as_deref().unwrap_or(&emb), v, d);
            (
                Param::from_tensor(Tensor::from_data(TensorData::new(emb, [v, d]), device)),
                Param::from_tensor(Tensor::from_data(TensorData::new(head_t, [d, v]), device)),
                HeadLayout::Transposed,
            )
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            head_layout,
            rope: MRope::new(hd, config.rope_theta, &config.mrope_section),
            hidden_size: d,
            vocab_size: v,
        })
    }

    /// Number of decoder layers (size of a [`KvCache`]).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// An empty cache sized for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.layers.len())
    }

    /// The token embedding [vocab, hidden] in checkpoint layout (a copy;
    /// for exporting weights, not for the forward pass).
    pub fn token_embedding(&self) -> Tensor<B, 2> {
        match self.head_layout {
            HeadLayout::PackedTied => self.lm_head_rows(),
            _ => host_bf16::widened(self.embed_tokens.val()),
        }
    }

    /// The LM head weight [vocab, hidden] in checkpoint layout (a copy; for
    /// exporting weights, not for the forward pass).
    pub fn lm_head_rows(&self) -> Tensor<B, 2> {
        let head = self.lm_head.val();
        match self.head_layout {
            HeadLayout::Transposed => head.transpose(),
            HeadLayout::Packed | HeadLayout::PackedTied => {
                host::packed_head_rows(&head, self.vocab_size, self.hidden_size)
                    // Packed layouts are only built on the host backend.
                    .expect("a packed LM head is a host tensor")
            }
        }
    }

    /// Embedding rows [ids.len(), hidden] of in-vocabulary token ids.
    fn token_rows(&self, ids: Vec<i64>) -> Tensor<B, 2> {
        if self.head_layout == HeadLayout::PackedTied {
            if let Some(t) = host::packed_rows(&self.lm_head.val(), self.hidden_size, &ids) {
                return t;
            }
        }
        if let Some(t) = host_bf16::gather_rows(&self.embed_tokens.val(), &ids) {
            return t;
        }
        let n = ids.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &self.device());
        self.embed_tokens.val().select(0, idx)
    }

    /// Device holding the weights.
    pub fn device(&self) -> B::Device {
        self.lm_head.val().device()
    }

    /// Token embeddings [B, L, D] of `input_ids` (equal-length rows), with
    /// the positions holding `image_token_id` replaced, in row-major order,
    /// by the rows of `image_embeds` [N, D] (N must equal the number of such
    /// positions).
    pub fn embed_inputs(
        &self,
        input_ids: &[Vec<u32>],
        image_token_id: u32,
        image_embeds: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 3>, TextError> {
        let b = input_ids.len();
        let l = input_ids.first().map_or(0, Vec::len);
        if let Some(r) = input_ids.iter().position(|row| row.len() != l) {
            return Err(TextError::Input(format!(
                "input_ids row {r} has length {}, row 0 has {l}",
                input_ids[r].len()
            )));
        }
        if let Some(&bad) = input_ids
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(TextError::Input(format!(
                "token id {bad} outside the vocabulary ({})",
                self.vocab_size
            )));
        }
        let device = self.device();
        let flat: Vec<i64> = input_ids.iter().flatten().map(|&t| t as i64).collect();
        let n_img = input_ids
            .iter()
            .flatten()
            .filter(|&&t| t == image_token_id)
            .count();
        let d = self.hidden_size;
        let image_embeds = image_embeds.filter(|img| n_img > 0 || img.dims()[0] > 0);
        let embeds = match image_embeds {
            None if n_img > 0 => {
                return Err(TextError::Input(format!(
                    "{n_img} image tokens but no image embeddings"
                )))
            }
            None => self.token_rows(flat),
            Some(img) => {
                let [n, dd] = img.dims();
                if n != n_img || dd != d || n == 0 {
                    return Err(TextError::Input(format!(
                        "image embeddings [{n}, {dd}] for {n_img} image tokens of width {d}"
                    )));
                }
                // Gather from [vocab table ; image rows]: image positions
                // point past the table, in order.
                let v = self.vocab_size as i64;
                let mut k = 0i64;
                let idx: Vec<i64> = flat
                    .iter()
                    .map(|&t| {
                        if t == image_token_id as i64 {
                            k += 1;
                            v + k - 1
                        } else {
                            t
                        }
                    })
                    .collect();
                let text = self.token_rows(idx.iter().map(|&i| i.min(v - 1)).collect());
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [b * l]), &device);
                let img_rows = img.select(0, idx.clone().sub_scalar(v).clamp(0, n as i64 - 1));
                let is_img = idx
                    .greater_equal_elem(v)
                    .reshape([b * l, 1])
                    .expand([b * l, d]);
                text.mask_where(is_img, img_rows)
            }
        };
        Ok(embeds.reshape([b, l, d]))
    }

    /// Runs new positions through the decoder, appending their keys/values to
    /// `cache`. `embeds` [B, L, D]; `position_ids` [3, B, L]; `new_valid[b][i]`
    /// false marks a padding position (masked as a key, as in HF). Returns
    /// the final-norm hidden states [B, L, D].
    pub fn forward_hidden(
        &self,
        embeds: Tensor<B, 3>,
        position_ids: Tensor<B, 3, Int>,
        new_valid: &[Vec<bool>],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, TextError> {
        let [b, l, d] = embeds.dims();
        let [three, pb, pl] = position_ids.dims();
        if three != 3 || pb != b || pl != l || d != self.hidden_size {
            return Err(TextError::Input(format!(
                "embeds {:?} / position_ids {:?} mismatch (hidden {})",
                [b, l, d],
                [three, pb, pl],
                self.hidden_size
            )));
        }
        if new_valid.len() != b || new_valid.iter().any(|r| r.len() != l) {
            return Err(TextError::Input(format!(
                "attention mask must be [{b}, {l}]"
            )));
        }
        let past = cache.seq_len();
        if cache.batch_size() != 0 && cache.batch_size() != b {
            return Err(TextError::Input(format!(
                "cache holds {} rows, input has {b}",
                cache.batch_size()
            )));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(TextError::Input("cache built for another model".into()));
        }
        let device = embeds.device();
        // Next positions: max over the new (valid) positions, per row.
        let pos_host: Vec<i64> = position_ids
            .to_data()
            .convert::<i64>()
            .into_vec()
            .map_err(|e| TextError::Input(format!("position_ids: {e:?}")))?;
        let mut next = if cache.batch_size() == 0 {
            vec![0i64; b]
        } else {
            cache.next_position.clone()
        };
        for (row, n) in next.iter_mut().enumerate() {
            for r in 0..3 {
                for i in 0..l {
                    if new_valid[row][i] {
                        let p = pos_host[(r * b + row) * l + i];
                        *n = (*n).max(p + 1);
                    }
                }
            }
        }
        let mut valid = if cache.batch_size() == 0 {
            vec![Vec::new(); b]
        } else {
            cache.key_valid.clone()
        };
        for (row, v) in valid.iter_mut().enumerate() {
            v.extend_from_slice(&new_valid[row]);
        }
        // The host backend attends straight from the validity lists; other
        // backends get the mask as a tensor, built once for all layers.
        let mask = if host::is_host::<B>() {
            AttentionMask::Host {
                key_valid: &valid,
                past,
            }
        } else {
            AttentionMask::Tensor(build_mask::<B>(&valid, past, l, &device))
        };
        let (cos, sin) = self.rope.tables(position_ids);
        let mut x = embeds;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = layer.input_layernorm.forward(x.clone());
            x = x + layer.self_attn.forward(h, &cos, &sin, &mask, slot);
            let h = layer.post_attention_layernorm.forward(x.clone());
            x = x + layer.mlp.forward(h);
        }
        cache.key_valid = valid;
        cache.next_position = next;
        Ok(self.norm.forward(x))
    }

    /// LM head on hidden states [N, D] -> logits [N, vocab].
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        let head = self.lm_head.val();
        match self.head_layout {
            HeadLayout::Transposed => hidden.matmul(head),
            HeadLayout::Packed | HeadLayout::PackedTied => {
                host::lm_head(&hidden, &head, self.vocab_size)
                    // Packed layouts are only built when `host::is_host::<B>()`,
                    // where the host kernel always applies.
                    .expect("the packed LM head is read by the host kernel")
            }
        }
    }

    /// Prefill of a batch of (left-padded) prompts into an empty `cache`:
    /// `embeds` [B, L, D] (from [`Self::embed_inputs`]), `position_ids`
    /// [3, B, L], `attention_mask[b][i]` false on padding. Returns the logits
    /// of the last position of every row [B, vocab].
    pub fn prefill(
        &self,
        embeds: Tensor<B, 3>,
        position_ids: Tensor<B, 3, Int>,
        attention_mask: &[Vec<bool>],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 2>, TextError> {
        if cache.batch_size() != 0 {
            return Err(TextError::Input("prefill needs an empty cache".into()));
        }
        let [b, l, d] = embeds.dims();
        if l == 0 {
            return Err(TextError::Input("empty prompt".into()));
        }
        let h = self.forward_hidden(embeds, position_ids, attention_mask, cache)?;
        Ok(self.logits(h.slice([0..b, l - 1..l, 0..d]).reshape([b, d])))
    }

    /// One decoding step: appends token `token_ids[b]` to row `b` at the
    /// row's next position ([`KvCache::next_positions`], the same on all three
    /// M-RoPE rows) and returns the logits [B, vocab] for the following token.
    pub fn decode_step(
        &self,
        token_ids: &[u32],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 2>, TextError> {
        let b = token_ids.len();
        if b != cache.batch_size() {
            return Err(TextError::Input(format!(
                "{b} tokens for a cache of {} rows",
                cache.batch_size()
            )));
        }
        let positions = cache.next_position.clone();
        let h = self.extend(
            &token_ids.iter().map(|&t| vec![t]).collect::<Vec<_>>(),
            &positions,
            cache,
        )?;
        Ok(h.reshape([b, self.hidden_size])).map(|h| self.logits(h))
    }

    /// Appends several text tokens per row (equal counts; `tokens[b][k]` gets
    /// position `start[b] + k` on all three rows) and returns the final-norm
    /// hidden states [B, K, D]. Used for decode steps and teacher forcing.
    pub fn extend(
        &self,
        tokens: &[Vec<u32>],
        start: &[i64],
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, TextError> {
        let b = tokens.len();
        let k = tokens.first().map_or(0, Vec::len);
        if start.len() != b {
            return Err(TextError::Input(format!(
                "{} start positions for {b} rows",
                start.len()
            )));
        }
        let embeds = self.embed_inputs(tokens, u32::MAX, None)?;
        let mut pos = Vec::with_capacity(3 * b * k);
        for _ in 0..3 {
            for &s in start {
                pos.extend((0..k as i64).map(|i| s + i));
            }
        }
        let position_ids =
            Tensor::<B, 3, Int>::from_data(TensorData::new(pos, [3, b, k]), &self.device());
        let valid = vec![vec![true; k]; b];
        self.forward_hidden(embeds, position_ids, &valid, cache)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
    use burn::backend::NdArray;

    pub(crate) type TB = NdArray<f32>;

    pub(crate) fn fixture_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny")
    }

    /// One case's prompt inputs from `cases.safetensors`.
    pub(crate) struct CaseInputs {
        pub input_ids: Vec<Vec<u32>>,
        pub mask: Vec<Vec<bool>>,
        /// [3][B][L]
        pub positions: Vec<i64>,
        pub vision: Vec<f32>,
        pub vision_rows: usize,
        pub logits_last: Vec<f32>,
    }

    pub(crate) fn load_case(name: &str) -> CaseInputs {
        let bytes = std::fs::read(fixture_dir().join("cases.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let i64s = |k: &str| -> (Vec<i64>, Vec<usize>) {
            let v = st.tensor(&format!("{name}.{k}")).unwrap();
            let d = v
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (d, v.shape().to_vec())
        };
        let f32s = |k: &str| -> (Vec<f32>, Vec<usize>) {
            let v = st.tensor(&format!("{name}.{k}")).unwrap();
            let d = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (d, v.shape().to_vec())
        };
        let (ids, s) = i64s("input_ids");
        let (mask, _) = i64s("attention_mask");
        let (positions, _) = i64s("position_ids");
        let (vision, vs) = f32s("vision_embeds");
        let (logits_last, _) = f32s("logits_last");
        let (b, l) = (s[0], s[1]);
        CaseInputs {
            input_ids: (0..b)
                .map(|r| ids[r * l..(r + 1) * l].iter().map(|&t| t as u32).collect())
                .collect(),
            mask: (0..b)
                .map(|r| mask[r * l..(r + 1) * l].iter().map(|&m| m != 0).collect())
                .collect(),
            positions,
            vision,
            vision_rows: vs[0],
            logits_last,
        }
    }

    pub(crate) fn load_model() -> (TextModel<TB>, Qwen25VlConfig) {
        load_model_on::<TB>(&Default::default())
    }

    /// The fixture's language model on `device` of backend `B`.
    pub(crate) fn load_model_on<B: Backend>(device: &B::Device) -> (TextModel<B>, Qwen25VlConfig) {
        let cfg = Qwen25VlConfig::from_file(&fixture_dir().join("config.json")).unwrap();
        let src = crate::models::qwen2_5_vl::weights::WeightStore::open(
            &fixture_dir(),
            cfg.text.tie_word_embeddings,
        )
        .unwrap();
        let model = TextModel::<B>::load(&cfg.text, &src, device).unwrap();
        (model, cfg)
    }

    impl CaseInputs {
        pub(crate) fn batch(&self) -> usize {
            self.input_ids.len()
        }
        pub(crate) fn len(&self) -> usize {
            self.input_ids[0].len()
        }
        /// Embeddings and positions for the whole (padded) batch.
        pub(crate) fn tensors<B: Backend>(
            &self,
            model: &TextModel<B>,
            cfg: &Qwen25VlConfig,
        ) -> (Tensor<B, 3>, Tensor<B, 3, Int>) {
            let dev = model.device();
            let d = model.hidden_size;
            let vis = Tensor::<B, 2>::from_data(
                TensorData::new(self.vision.clone(), [self.vision_rows, d]),
                &dev,
            );
            let e = model
                .embed_inputs(&self.input_ids, cfg.image_token_id, Some(vis))
                .unwrap();
            let p = Tensor::<B, 3, Int>::from_data(
                TensorData::new(self.positions.clone(), [3, self.batch(), self.len()]),
                &dev,
            );
            (e, p)
        }
        /// Row `r` alone, without its padding: same layout, batch 1.
        pub(crate) fn row(&self, r: usize, image_token_id: u32) -> CaseInputs {
            let (b, l) = (self.batch(), self.len());
            let first = self.mask[r].iter().position(|&m| m).unwrap();
            let d = self.vision.len() / self.vision_rows.max(1);
            let before: usize = (0..r)
                .map(|q| {
                    self.input_ids[q]
                        .iter()
                        .filter(|&&t| t == image_token_id)
                        .count()
                })
                .sum();
            let mine = self.input_ids[r]
                .iter()
                .filter(|&&t| t == image_token_id)
                .count();
            let mut positions = Vec::new();
            for k in 0..3 {
                positions.extend_from_slice(
                    &self.positions[(k * b + r) * l + first..(k * b + r + 1) * l],
                );
            }
            CaseInputs {
                input_ids: vec![self.input_ids[r][first..].to_vec()],
                mask: vec![vec![true; l - first]],
                positions,
                vision: self.vision[before * d..(before + mine) * d].to_vec(),
                vision_rows: mine,
                logits_last: self.logits_last
                    [r * (self.logits_last.len() / b)..(r + 1) * (self.logits_last.len() / b)]
                    .to_vec(),
            }
        }
    }

    pub(crate) const CASES: [&str; 5] = [
        "two_shot",
        "zero_shot",
        "large_image",
        "batch3",
        "small_wide_image",
    ];

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn prefill_logits_match_reference() {
        let (model, cfg) = load_model();
        check_prefill_logits(&model, &cfg);
    }

    /// Last-position logits of every case's prefill within 1e-4 of the
    /// reference (any backend).
    pub(crate) fn check_prefill_logits<B: Backend>(model: &TextModel<B>, cfg: &Qwen25VlConfig) {
        for name in CASES {
            let case = load_case(name);
            let (e, p) = case.tensors(model, cfg);
            let mut cache = model.new_cache();
            let logits = model.prefill(e, p, &case.mask, &mut cache).unwrap();
            let got: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap();
            let diff = max_abs_diff(&got, &case.logits_last);
            eprintln!("{name}: max abs logits diff {diff:e}");
            assert!(diff < 1e-4, "{name}: max abs diff {diff}");
            assert_eq!(cache.seq_len(), case.len());
        }
    }

    /// The host fast paths (ndarray) and the generic tensor path (taken by
    /// every other backend, here autodiff over ndarray) give the same
    /// logits, for the prefill of every case (left-padded batch included)
    /// and for a decode step on top of it.
    #[test]
    fn host_kernels_match_the_generic_tensor_path() {
        type Generic = burn::backend::Autodiff<TB>;
        fn assert_close(name: &str, what: &str, a: Tensor<TB, 2>, b: Tensor<Generic, 2>) {
            let a = a.into_data().to_vec::<f32>().unwrap();
            let b = b.into_data().to_vec::<f32>().unwrap();
            let diff = max_abs_diff(&a, &b);
            assert!(diff < 1e-4, "{name}: {what} {diff}");
        }
        let (model, cfg) = load_model();
        let src = crate::models::qwen2_5_vl::weights::WeightStore::open(
            &fixture_dir(),
            cfg.text.tie_word_embeddings,
        )
        .unwrap();
        let generic = TextModel::<Generic>::load(&cfg.text, &src, &Default::default()).unwrap();
        assert!(super::host::is_host::<TB>());
        assert!(!super::host::is_host::<Generic>());
        // The tied fixture's matrix is held once on the host (packed head,
        // empty embedding table) and twice elsewhere; both read back the
        // checkpoint rows, and the host embeds tokens from the packed head.
        assert_eq!(model.head_layout, HeadLayout::PackedTied);
        assert_eq!(model.embed_tokens.val().dims(), [0, model.hidden_size]);
        assert_eq!(generic.head_layout, HeadLayout::Transposed);
        let rows = generic
            .embed_tokens
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for t in [model.token_embedding(), model.lm_head_rows()] {
            assert_eq!(t.into_data().to_vec::<f32>().unwrap(), rows);
        }
        let ids = vec![vec![0u32, 151_935, 42]];
        let a = model.embed_inputs(&ids, u32::MAX, None).unwrap();
        let b = generic.embed_inputs(&ids, u32::MAX, None).unwrap();
        assert_eq!(
            a.into_data().to_vec::<f32>().unwrap(),
            b.into_data().to_vec::<f32>().unwrap()
        );
        for name in CASES {
            let case = load_case(name);
            let (e, p) = case.tensors(&model, &cfg);
            let e2 = Tensor::<Generic, 3>::from_data(e.to_data(), &Default::default());
            let p2 = Tensor::<Generic, 3, Int>::from_data(p.to_data(), &Default::default());
            let (mut c1, mut c2) = (model.new_cache(), generic.new_cache());
            let a = model.prefill(e, p, &case.mask, &mut c1).unwrap();
            let b = generic.prefill(e2, p2, &case.mask, &mut c2).unwrap();
            assert_close(name, "prefill", a, b);
            let tokens: Vec<u32> = (0..case.batch()).map(|i| 100 + i as u32).collect();
            let a = model.decode_step(&tokens, &mut c1).unwrap();
            let b = generic.decode_step(&tokens, &mut c2).unwrap();
            assert_close(name, "decode", a, b);
        }
    }

    #[test]
    fn padded_rows_match_unpadded_runs() {
        let (model, cfg) = load_model();
        check_padded_rows(&model, &cfg);
    }

    /// Each left-padded row of `batch3` gives the logits of its unpadded
    /// prompt alone (any backend).
    pub(crate) fn check_padded_rows<B: Backend>(model: &TextModel<B>, cfg: &Qwen25VlConfig) {
        let case = load_case("batch3");
        let (e, p) = case.tensors(model, cfg);
        let mut cache = model.new_cache();
        let batched: Vec<f32> = model
            .prefill(e, p, &case.mask, &mut cache)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let v = model.vocab_size;
        for r in 0..case.batch() {
            let single = case.row(r, cfg.image_token_id);
            let (e, p) = single.tensors(model, cfg);
            let mut c = model.new_cache();
            let got: Vec<f32> = model
                .prefill(e, p, &single.mask, &mut c)
                .unwrap()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap();
            let diff = max_abs_diff(&got, &batched[r * v..(r + 1) * v]);
            assert!(diff <= 1e-4, "row {r}: {diff}");
            assert_eq!(c.next_positions()[0], cache.next_positions()[r]);
        }
    }

    #[test]
    fn incremental_decode_matches_full_prefill() {
        let (model, cfg) = load_model();
        check_incremental_decode(&model, &cfg);
    }

    /// Prefill a prompt minus its last 3 tokens, decode them one by one:
    /// the logits must match a prefill of the whole prompt (any backend).
    pub(crate) fn check_incremental_decode<B: Backend>(model: &TextModel<B>, cfg: &Qwen25VlConfig) {
        let case = load_case("zero_shot");
        let (e, p) = case.tensors(model, cfg);
        let mut full = model.new_cache();
        let want: Vec<f32> = model
            .prefill(e.clone(), p.clone(), &case.mask, &mut full)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let l = case.len();
        let d = model.hidden_size;
        // The prompt ends with text tokens whose positions are consecutive.
        let mut cache = model.new_cache();
        model
            .forward_hidden(
                e.slice([0..1, 0..l - 3, 0..d]),
                p.slice([0..3, 0..1, 0..l - 3]),
                &[case.mask[0][..l - 3].to_vec()],
                &mut cache,
            )
            .unwrap();
        let mut logits = None;
        for i in l - 3..l {
            logits = Some(
                model
                    .decode_step(&[case.input_ids[0][i]], &mut cache)
                    .unwrap(),
            );
        }
        let got: Vec<f32> = logits
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{diff}");
        assert_eq!(cache.next_positions(), full.next_positions());
    }

    #[test]
    fn cache_select_and_repeat() {
        let (model, _) = load_model();
        let mut cache = model.new_cache();
        model
            .extend(&[vec![1, 2], vec![3, 4]], &[0, 5], &mut cache)
            .unwrap();
        let r = cache.repeat_interleave(2).unwrap();
        assert_eq!(r.batch_size(), 4);
        assert_eq!(r.next_positions(), &[2, 2, 7, 7]);
        let s = r.select(&[3, 0]).unwrap();
        assert_eq!(s.next_positions(), &[7, 2]);
        assert!(r.select(&[4]).is_err());
    }
}
