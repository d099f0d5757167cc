//! open-flamingo's `PerceiverResampler`: a fixed set of learned latents
//! attends, layer after layer, to one image's patch tokens and to itself,
//! then a final LayerNorm; each image becomes `num_latents` vectors. The
//! depth and the number of latents are read from the stored weights; heads
//! and head width are open-flamingo's constants.

use super::config::{XATTN_DIM_HEAD, XATTN_FF_MULT, XATTN_HEADS};
use super::weights::{LayerNorm, Linear, WeightSet, WeightsError};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{backend::Backend, Tensor};

/// open-flamingo's `FeedForward`: LayerNorm, up, GELU, down (no biases on
/// the linear layers).
#[derive(Debug, Clone)]
pub struct FeedForward<B: Backend> {
    norm: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    /// Takes `{prefix}.{0,1,3}` out of `w`.
    pub fn load(
        w: &mut WeightSet,
        prefix: &str,
        dim: usize,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let inner = dim * XATTN_FF_MULT;
        Ok(Self {
            norm: w.layer_norm(&format!("{prefix}.0"), dim, true, device)?,
            up: w.linear(&format!("{prefix}.1"), dim, inner, false, device)?,
            down: w.linear(&format!("{prefix}.3"), inner, dim, false, device)?,
        })
    }

    /// Applies the block (without its residual).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.down
            .forward(gelu(self.up.forward(self.norm.forward(x))))
    }
}

/// One perceiver layer: attention then feed-forward.
#[derive(Debug, Clone)]
struct Layer<B: Backend> {
    norm_media: LayerNorm<B>,
    norm_latents: LayerNorm<B>,
    to_q: Linear<B>,
    to_kv: Linear<B>,
    to_out: Linear<B>,
    ff: FeedForward<B>,
}

/// The perceiver resampler.
#[derive(Debug, Clone)]
pub struct Perceiver<B: Backend> {
    latents: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: LayerNorm<B>,
}

impl<B: Backend> Perceiver<B> {
    /// Takes `perceiver.*` out of `w` for vision width `dim`.
    pub fn load(w: &mut WeightSet, dim: usize, device: &B::Device) -> Result<Self, WeightsError> {
        let num_latents = w.shape("perceiver.latents")?.first().copied().unwrap_or(0);
        let latents = w.tensor("perceiver.latents", [num_latents, dim], device)?;
        let inner = XATTN_HEADS * XATTN_DIM_HEAD;
        let mut layers = Vec::new();
        // The depth is the number of stored layers (6 in every released model).
        while w.contains(&format!("perceiver.layers.{}.0.to_q.weight", layers.len())) {
            let p = format!("perceiver.layers.{}", layers.len());
            layers.push(Layer {
                norm_media: w.layer_norm(&format!("{p}.0.norm_media"), dim, true, device)?,
                norm_latents: w.layer_norm(&format!("{p}.0.norm_latents"), dim, true, device)?,
                to_q: w.linear(&format!("{p}.0.to_q"), dim, inner, false, device)?,
                to_kv: w.linear(&format!("{p}.0.to_kv"), dim, 2 * inner, false, device)?,
                to_out: w.linear(&format!("{p}.0.to_out"), inner, dim, false, device)?,
                ff: FeedForward::load(w, &format!("{p}.1"), dim, device)?,
            });
        }
        if layers.is_empty() {
            // Names the first layer's key in the error.
            w.shape("perceiver.layers.0.0.to_q.weight")?;
        }
        let norm = w.layer_norm("perceiver.norm", dim, true, device)?;
        Ok(Self {
            latents,
            layers,
            norm,
        })
    }

    /// Latents per image.
    pub fn num_latents(&self) -> usize {
        self.latents.dims()[0]
    }

    /// Resamples the patch tokens of `n` images `[n, v, dim]` to
    /// `[n, num_latents, dim]`, each image on its own.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, v, dim] = x.dims();
        let m = self.num_latents();
        let (h, hd) = (XATTN_HEADS, XATTN_DIM_HEAD);
        let mut lat = self.latents.clone().unsqueeze::<3>().expand([n, m, dim]);
        for l in &self.layers {
            let media = l.norm_media.forward(x.clone());
            let normed = l.norm_latents.forward(lat.clone());
            let q = l.to_q.forward(normed.clone());
            let kv = l.to_kv.forward(Tensor::cat(vec![media, normed], 1));
            let heads = |t: Tensor<B, 3>, len: usize| t.reshape([n, len, h, hd]).swap_dims(1, 2);
            let q = heads(q, m).mul_scalar(1.0 / (hd as f64).sqrt());
            let k = heads(kv.clone().slice([0..n, 0..v + m, 0..h * hd]), v + m);
            let vv = heads(kv.slice([0..n, 0..v + m, h * hd..2 * h * hd]), v + m);
            let attn = softmax(q.matmul(k.swap_dims(2, 3)), 3);
            let out = attn.matmul(vv).swap_dims(1, 2).reshape([n, m, h * hd]);
            lat = l.to_out.forward(out).add(lat);
            lat = l.ff.forward(lat.clone()).add(lat);
        }
        self.norm.forward(lat)
    }
}
