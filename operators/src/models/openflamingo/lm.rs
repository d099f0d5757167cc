//! OpenFlamingo's language side: MosaicGPT (MPT-1b) with a gated
//! cross-attention layer in front of every block, and the decoding state
//! (self-attention KV cache, the images' cross-attention keys and values,
//! each row's image count) that greedy and beam search carry.
//!
//! MosaicGPT v0.0.4: token embedding (no positions: ALiBi), pre-LN blocks
//! `x += out_proj(attn(ln_1(x)))`, `x += mlp_down(gelu(mlp_up(ln_2(x))))`,
//! fused `Wqkv`, LayerNorm on queries and keys over the full width, ALiBi
//! bias `(j - (S_k - 1)) * slope_h` per key (left padding does not shift
//! it), padded and future keys filled with `f32::MIN`, `ln_f`, head tied to
//! the embedding. No biases anywhere.
//!
//! Gated cross-attention (open-flamingo): `x += tanh(attn_gate) *
//! attn(norm(x), media)`, `x += tanh(ff_gate) * ff(x)`; a token attends only
//! to the latents of the image its `<image>` count names (the most recent
//! image; none before the first, whose attention is zeroed).

use super::config::{LmConfig, XATTN_DIM_HEAD, XATTN_HEADS};
use super::perceiver::FeedForward;
use super::weights::{LayerNorm, Linear, WeightSet, WeightsError, WTE};
use crate::models::qwen2_5_vl::generate::{GenerateError, StepDecoder};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

/// One MosaicGPT block.
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    ln_1: LayerNorm<B>,
    wqkv: Linear<B>,
    q_ln: Option<LayerNorm<B>>,
    k_ln: Option<LayerNorm<B>>,
    out_proj: Linear<B>,
    ln_2: LayerNorm<B>,
    mlp_up: Linear<B>,
    mlp_down: Linear<B>,
}

/// One gated cross-attention layer.
#[derive(Debug, Clone)]
struct GatedXattn<B: Backend> {
    norm: LayerNorm<B>,
    to_q: Linear<B>,
    to_kv: Linear<B>,
    to_out: Linear<B>,
    /// `tanh(attn_gate)`.
    attn_gate: f32,
    ff: FeedForward<B>,
    /// `tanh(ff_gate)`.
    ff_gate: f32,
}

/// The decoding state of a batch of rows.
#[derive(Debug, Clone)]
pub struct FlamingoCache<B: Backend> {
    /// Self-attention keys and values per block, `[rows, heads, keys, hd]`.
    self_kv: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Cross-attention keys and values of the rows' images per block,
    /// `[rows, heads, images * latents, hd]`.
    media_kv: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Latents per image.
    latents: usize,
    /// Whether each cached key is a real token (false = left padding).
    key_valid: Vec<Vec<bool>>,
    /// `<image>` tokens seen so far per row (the image the next token
    /// attends to).
    text_time: Vec<usize>,
}

impl<B: Backend> FlamingoCache<B> {
    /// The state holding `rows` in that order.
    pub fn select(&self, rows: &[usize]) -> Result<Self, GenerateError> {
        let n = self.key_valid.len();
        if let Some(bad) = rows.iter().find(|&&r| r >= n) {
            return Err(GenerateError::Input(format!(
                "cache row {bad} out of range (batch {n})"
            )));
        }
        let Some((k0, _)) = self.media_kv.first() else {
            return Err(GenerateError::Input("empty decoding state".into()));
        };
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &k0.device(),
        );
        let pick = |t: &Tensor<B, 4>| t.clone().select(0, idx.clone());
        Ok(Self {
            self_kv: self
                .self_kv
                .iter()
                .map(|s| s.as_ref().map(|(k, v)| (pick(k), pick(v))))
                .collect(),
            media_kv: self
                .media_kv
                .iter()
                .map(|(k, v)| (pick(k), pick(v)))
                .collect(),
            latents: self.latents,
            key_valid: rows.iter().map(|&r| self.key_valid[r].clone()).collect(),
            text_time: rows.iter().map(|&r| self.text_time[r]).collect(),
        })
    }
}

/// MosaicGPT with gated cross-attention.
#[derive(Debug, Clone)]
pub struct FlamingoLm<B: Backend> {
    cfg: LmConfig,
    /// Token embedding `[vocab, d_model]`.
    wte: Tensor<B, 2>,
    /// The tied head, `[d_model, vocab]`.
    head: Tensor<B, 2>,
    blocks: Vec<Block<B>>,
    xattn: Vec<GatedXattn<B>>,
    ln_f: LayerNorm<B>,
    slopes: Vec<f32>,
    /// Id of `<image>`.
    image_token_id: u32,
    vocab: usize,
    device: B::Device,
}

fn gate(w: &mut WeightSet, key: &str) -> Result<f32, WeightsError> {
    let v = w.take(key, &[1])?;
    Ok(v.first().copied().unwrap_or(0.0).tanh())
}

impl<B: Backend> FlamingoLm<B> {
    /// Takes the language model's and the cross-attention layers' weights
    /// out of `w`; `vocab` is the tokenizer's length (the embedding's rows
    /// after open-flamingo's resize), `vis_dim` the vision width.
    pub fn load(
        cfg: &LmConfig,
        w: &mut WeightSet,
        vocab: usize,
        vis_dim: usize,
        image_token_id: u32,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let d = cfg.d_model;
        let wte: Tensor<B, 2> = w.tensor(WTE, [vocab, d], device)?;
        let inner = XATTN_HEADS * XATTN_DIM_HEAD;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        let mut xattn = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("transformer.blocks.{i}");
            let ln = |w: &mut WeightSet, name: &str| {
                w.layer_norm(&format!("{p}.{name}"), d, false, device)
            };
            let (q_ln, k_ln) = match cfg.attn_qk_ln {
                true => (Some(ln(w, "attn.q_ln")?), Some(ln(w, "attn.k_ln")?)),
                false => (None, None),
            };
            let mlp = cfg.mlp_ratio * d;
            blocks.push(Block {
                ln_1: ln(w, "ln_1")?,
                wqkv: w.linear(&format!("{p}.attn.Wqkv"), d, 3 * d, false, device)?,
                q_ln,
                k_ln,
                out_proj: w.linear(&format!("{p}.attn.out_proj"), d, d, false, device)?,
                ln_2: ln(w, "ln_2")?,
                mlp_up: w.linear(&format!("{p}.mlp.mlp_up"), d, mlp, false, device)?,
                mlp_down: w.linear(&format!("{p}.mlp.mlp_down"), mlp, d, false, device)?,
            });
            let x = format!("xattn.{i}");
            xattn.push(GatedXattn {
                norm: w.layer_norm(&format!("{x}.attn.norm"), d, true, device)?,
                to_q: w.linear(&format!("{x}.attn.to_q"), d, inner, false, device)?,
                to_kv: w.linear(
                    &format!("{x}.attn.to_kv"),
                    vis_dim,
                    2 * inner,
                    false,
                    device,
                )?,
                to_out: w.linear(&format!("{x}.attn.to_out"), inner, d, false, device)?,
                attn_gate: gate(w, &format!("{x}.attn_gate"))?,
                ff: FeedForward::load(w, &format!("{x}.ff"), d, device)?,
                ff_gate: gate(w, &format!("{x}.ff_gate"))?,
            });
        }
        let ln_f = w.layer_norm("transformer.ln_f", d, false, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            head: wte.clone().transpose(),
            wte,
            blocks,
            xattn,
            ln_f,
            slopes: cfg.alibi_slopes(),
            image_token_id,
            vocab,
            device: device.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Runs the prompts `ids` (left-padded rows of one length; `valid` false
    /// on padding) conditioned on `media` `[rows, images, latents, vis_dim]`
    /// (row `r`'s `k`-th `<image>` token refers to `media[r, k-1]`). Returns
    /// the decoding state and the logits of every position
    /// `[rows, len, vocab]` (`all_logits`) or of the last one `[rows, 1,
    /// vocab]`.
    pub fn prefill(
        &self,
        ids: &[Vec<u32>],
        valid: &[Vec<bool>],
        media: Tensor<B, 4>,
        all_logits: bool,
    ) -> Result<(FlamingoCache<B>, Tensor<B, 3>), GenerateError> {
        let [rows, images, latents, vis] = media.dims();
        if ids.len() != rows || valid.len() != rows {
            return Err(GenerateError::Input(format!(
                "{} id rows and {} mask rows for {rows} media rows",
                ids.len(),
                valid.len()
            )));
        }
        let media = media.reshape([rows, images * latents, vis]);
        let media_kv = self
            .xattn
            .iter()
            .map(|x| {
                let kv = x.to_kv.forward(media.clone());
                let inner = XATTN_HEADS * XATTN_DIM_HEAD;
                let n = images * latents;
                let heads = |t: Tensor<B, 3>| {
                    t.reshape([rows, n, XATTN_HEADS, XATTN_DIM_HEAD])
                        .swap_dims(1, 2)
                };
                (
                    heads(kv.clone().slice([0..rows, 0..n, 0..inner])),
                    heads(kv.slice([0..rows, 0..n, inner..2 * inner])),
                )
            })
            .collect();
        let mut cache = FlamingoCache {
            self_kv: vec![None; self.blocks.len()],
            media_kv,
            latents,
            key_valid: vec![Vec::new(); rows],
            text_time: vec![0; rows],
        };
        let hidden = self.forward(ids, valid, &mut cache)?;
        let [_, len, d] = hidden.dims();
        let hidden = match all_logits {
            true => hidden,
            false => hidden.slice([0..rows, len - 1..len, 0..d]),
        };
        Ok((cache, self.logits(hidden)))
    }

    /// Logits `[.., vocab]` of final hidden states.
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [r, l, d] = hidden.dims();
        let logits = hidden
            .reshape([r * l, d])
            .matmul(self.head.clone())
            .reshape([r, l, self.vocab]);
        match self.cfg.logit_scale {
            Some(s) => logits.mul_scalar(s),
            None => logits,
        }
    }

    /// Runs new tokens (`ids`: one equal-length row per cache row, `valid`
    /// false on padding) through every block, appending to `cache`; returns
    /// the final hidden states after `ln_f`.
    fn forward(
        &self,
        ids: &[Vec<u32>],
        valid: &[Vec<bool>],
        cache: &mut FlamingoCache<B>,
    ) -> Result<Tensor<B, 3>, GenerateError> {
        let rows = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if len == 0 || ids.iter().any(|r| r.len() != len) {
            return Err(GenerateError::Input(
                "token rows must be non-empty and of one length".into(),
            ));
        }
        if let Some(&t) = ids.iter().flatten().find(|&&t| t as usize >= self.vocab) {
            return Err(GenerateError::Input(format!(
                "token id {t} is outside the vocabulary ({})",
                self.vocab
            )));
        }
        let past = cache.key_valid.first().map_or(0, Vec::len);
        let total = past + len;
        if total > self.cfg.max_seq_len {
            return Err(GenerateError::Input(format!(
                "sequence of {total} tokens is longer than max_seq_len {}",
                self.cfg.max_seq_len
            )));
        }
        // Each token's image count (inclusive cumsum of `<image>` tokens).
        let mut times = Vec::with_capacity(rows * len);
        for (r, row) in ids.iter().enumerate() {
            for &t in row {
                if t == self.image_token_id {
                    cache.text_time[r] += 1;
                }
                times.push(cache.text_time[r]);
            }
            cache.key_valid[r].extend_from_slice(&valid[r]);
        }
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| i64::from(t)).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [rows * len]), &self.device);
        let d = self.cfg.d_model;
        let mut x = self.wte.clone().select(0, idx).reshape([rows, len, d]);
        let (xmask, xkeep) = self.media_masks(&times, rows, len, cache);
        let (mask, bias) = self.self_masks(&cache.key_valid, past, len);
        for (i, (block, xa)) in self.blocks.iter().zip(&self.xattn).enumerate() {
            let (mk, mv) = &cache.media_kv[i];
            x = self.cross(xa, x, mk, mv, &xmask, &xkeep);
            x = self.block(block, x, &mask, &bias, &mut cache.self_kv[i]);
        }
        Ok(self.ln_f.forward(x))
    }

    /// The cross-attention's masks: blocked `[rows, 1, len, keys]` (true
    /// where a token may not see an image's latent) and keep `[rows, 1,
    /// len, 1]` (0 for tokens before the first image).
    fn media_masks(
        &self,
        times: &[usize],
        rows: usize,
        len: usize,
        cache: &FlamingoCache<B>,
    ) -> (Tensor<B, 4, Bool>, Tensor<B, 4>) {
        let keys = cache.media_kv.first().map_or(0, |(k, _)| k.dims()[2]);
        let n = cache.latents.max(1);
        let blocked: Vec<bool> = times
            .iter()
            .flat_map(|&t| (0..keys).map(move |j| j / n + 1 != t))
            .collect();
        let keep: Vec<f32> = times
            .iter()
            .map(|&t| if t == 0 { 0.0 } else { 1.0 })
            .collect();
        (
            Tensor::from_data(TensorData::new(blocked, [rows, 1, len, keys]), &self.device),
            Tensor::from_data(TensorData::new(keep, [rows, 1, len, 1]), &self.device),
        )
    }

    /// The self-attention's masks over all `past + len` keys: blocked
    /// `[rows, 1, len, keys]` (padding or future) and the ALiBi bias
    /// `[1, heads, 1, keys]`.
    fn self_masks(
        &self,
        key_valid: &[Vec<bool>],
        past: usize,
        len: usize,
    ) -> (Tensor<B, 4, Bool>, Tensor<B, 4>) {
        let total = past + len;
        let rows = key_valid.len();
        let mut blocked = Vec::with_capacity(rows * len * total);
        for valid in key_valid {
            for i in 0..len {
                blocked.extend((0..total).map(|j| !valid[j] || j > past + i));
            }
        }
        let h = self.slopes.len();
        let mut bias = Vec::with_capacity(h * total);
        for &s in &self.slopes {
            bias.extend((0..total).map(|j| (j as f32 - (total as f32 - 1.0)) * s));
        }
        (
            Tensor::from_data(
                TensorData::new(blocked, [rows, 1, len, total]),
                &self.device,
            ),
            Tensor::from_data(TensorData::new(bias, [1, h, 1, total]), &self.device),
        )
    }

    fn cross(
        &self,
        xa: &GatedXattn<B>,
        x: Tensor<B, 3>,
        k: &Tensor<B, 4>,
        v: &Tensor<B, 4>,
        blocked: &Tensor<B, 4, Bool>,
        keep: &Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [rows, len, _] = x.dims();
        let (h, hd) = (XATTN_HEADS, XATTN_DIM_HEAD);
        let keys = k.dims()[2];
        let q = xa
            .to_q
            .forward(xa.norm.forward(x.clone()))
            .reshape([rows, len, h, hd])
            .swap_dims(1, 2)
            .mul_scalar(1.0 / (hd as f64).sqrt());
        let sim = q
            .matmul(k.clone().swap_dims(2, 3))
            .mask_fill(blocked.clone().expand([rows, h, len, keys]), -f32::MAX);
        let attn = softmax(sim, 3).mul(keep.clone());
        let out = attn
            .matmul(v.clone())
            .swap_dims(1, 2)
            .reshape([rows, len, h * hd]);
        let x = xa.to_out.forward(out).mul_scalar(xa.attn_gate).add(x);
        xa.ff.forward(x.clone()).mul_scalar(xa.ff_gate).add(x)
    }

    fn block(
        &self,
        b: &Block<B>,
        x: Tensor<B, 3>,
        blocked: &Tensor<B, 4, Bool>,
        bias: &Tensor<B, 4>,
        slot: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let [rows, len, d] = x.dims();
        let (h, hd) = (self.cfg.n_heads, self.cfg.head_dim());
        let mut qkv = b.wqkv.forward(b.ln_1.forward(x.clone()));
        if let Some(c) = self.cfg.attn_clip_qkv {
            qkv = qkv.clamp(-c, c);
        }
        let part = |i: usize| qkv.clone().slice([0..rows, 0..len, i * d..(i + 1) * d]);
        let (mut q, mut k, v) = (part(0), part(1), part(2));
        if let (Some(ql), Some(kl)) = (&b.q_ln, &b.k_ln) {
            q = ql.forward(q);
            k = kl.forward(k);
        }
        let heads = |t: Tensor<B, 3>| t.reshape([rows, len, h, hd]).swap_dims(1, 2);
        let (q, k, v) = (heads(q), heads(k), heads(v));
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let total = k.dims()[2];
        let scale = self.cfg.softmax_scale.unwrap_or(1.0 / (hd as f64).sqrt());
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(scale)
            .add(bias.clone())
            .mask_fill(blocked.clone().expand([rows, h, len, total]), f32::MIN);
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([rows, len, d]);
        let x = b.out_proj.forward(out).add(x);
        let m = b
            .mlp_down
            .forward(gelu(b.mlp_up.forward(b.ln_2.forward(x.clone()))));
        m.add(x)
    }
}

impl<B: Backend> StepDecoder<B> for FlamingoLm<B> {
    type Cache = FlamingoCache<B>;

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn logits_device(&self) -> B::Device {
        self.device.clone()
    }

    fn select_rows(
        &self,
        cache: &FlamingoCache<B>,
        rows: &[usize],
    ) -> Result<FlamingoCache<B>, GenerateError> {
        cache.select(rows)
    }

    fn step(
        &self,
        tokens: &[u32],
        cache: &mut FlamingoCache<B>,
    ) -> Result<Tensor<B, 2>, GenerateError> {
        let ids: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        let valid = vec![vec![true]; tokens.len()];
        let hidden = self.forward(&ids, &valid, cache)?;
        let r = tokens.len();
        Ok(self.logits(hidden).reshape([r, self.vocab]))
    }
}
