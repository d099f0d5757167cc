//! open_clip's `VisionTransformer` as OpenFlamingo uses it: patch
//! embedding, class token, positional embedding, `ln_pre`, pre-LN residual
//! blocks (multi-head attention, MLP with QuickGELU or GELU), then `ln_post`
//! over every token and the class token dropped (`visual(x)[1]`, open_clip
//! 3.x), with no projection.

use super::config::VisionConfig;
use super::weights::{LayerNorm, Linear, WeightSet, WeightsError};
use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// One residual block.
#[derive(Debug, Clone)]
struct Block<B: Backend> {
    ln_1: LayerNorm<B>,
    in_proj: Linear<B>,
    out_proj: Linear<B>,
    ln_2: LayerNorm<B>,
    c_fc: Linear<B>,
    c_proj: Linear<B>,
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower<B: Backend> {
    cfg: VisionConfig,
    /// Patch embedding as a matrix `[3 * patch * patch, width]`.
    patch_embed: Tensor<B, 2>,
    class_embedding: Tensor<B, 1>,
    positional_embedding: Tensor<B, 2>,
    ln_pre: LayerNorm<B>,
    blocks: Vec<Block<B>>,
    ln_post: LayerNorm<B>,
}

impl<B: Backend> VisionTower<B> {
    /// Takes the tower's weights (`visual.*`) out of `w`; the MLP width is
    /// the stored `c_fc` width.
    pub fn load(
        cfg: &VisionConfig,
        w: &mut WeightSet,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let (d, p) = (cfg.width, cfg.patch_size);
        let tokens = cfg.tokens_per_image() + 1;
        let conv: Tensor<B, 4> = w.tensor("visual.conv1.weight", [d, 3, p, p], device)?;
        let patch_embed = conv.reshape([d, 3 * p * p]).transpose();
        let class_embedding = w.tensor("visual.class_embedding", [d], device)?;
        let positional_embedding = w.tensor("visual.positional_embedding", [tokens, d], device)?;
        let ln_pre = w.layer_norm("visual.ln_pre", d, true, device)?;
        let ln_post = w.layer_norm("visual.ln_post", d, true, device)?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let pre = format!("visual.transformer.resblocks.{i}");
            let mlp = w
                .shape(&format!("{pre}.mlp.c_fc.weight"))?
                .first()
                .copied()
                .unwrap_or(0);
            let in_w: Tensor<B, 2> =
                w.tensor(&format!("{pre}.attn.in_proj_weight"), [3 * d, d], device)?;
            let in_b = w.tensor(&format!("{pre}.attn.in_proj_bias"), [3 * d], device)?;
            blocks.push(Block {
                ln_1: w.layer_norm(&format!("{pre}.ln_1"), d, true, device)?,
                in_proj: Linear {
                    weight: in_w.transpose(),
                    bias: Some(in_b),
                },
                out_proj: w.linear(&format!("{pre}.attn.out_proj"), d, d, true, device)?,
                ln_2: w.layer_norm(&format!("{pre}.ln_2"), d, true, device)?,
                c_fc: w.linear(&format!("{pre}.mlp.c_fc"), d, mlp, true, device)?,
                c_proj: w.linear(&format!("{pre}.mlp.c_proj"), mlp, d, true, device)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            class_embedding,
            positional_embedding,
            ln_pre,
            blocks,
            ln_post,
        })
    }

    /// Patch tokens of `n` preprocessed images (`pixels`: `n * 3 * S * S`
    /// values, channel-major per image) after `ln_post`, class token
    /// dropped: `[n, grid², width]`.
    pub fn forward(&self, pixels: &[f32], n: usize, device: &B::Device) -> Tensor<B, 3> {
        let (s, p, d) = (self.cfg.image_size, self.cfg.patch_size, self.cfg.width);
        let g = self.cfg.grid();
        // Patches as rows of (channel, dy, dx) values: the conv's weight order.
        let mut rows = Vec::with_capacity(n * g * g * 3 * p * p);
        for img in 0..n {
            for gy in 0..g {
                for gx in 0..g {
                    for c in 0..3 {
                        for dy in 0..p {
                            let at = ((img * 3 + c) * s + gy * p + dy) * s + gx * p;
                            rows.extend_from_slice(&pixels[at..at + p]);
                        }
                    }
                }
            }
        }
        let patches: Tensor<B, 2> =
            Tensor::from_data(TensorData::new(rows, [n * g * g, 3 * p * p]), device);
        let x = patches
            .matmul(self.patch_embed.clone())
            .reshape([n, g * g, d]);
        let cls = self
            .class_embedding
            .clone()
            .reshape([1, 1, d])
            .expand([n, 1, d]);
        let x =
            Tensor::cat(vec![cls, x], 1).add(self.positional_embedding.clone().unsqueeze::<3>());
        let mut x = self.ln_pre.forward(x);
        for b in &self.blocks {
            x = x.clone().add(self.attention(b, b.ln_1.forward(x.clone())));
            let h = b.c_fc.forward(b.ln_2.forward(x.clone()));
            let h = match self.cfg.quick_gelu {
                true => h.clone().mul(sigmoid(h.mul_scalar(1.702))),
                false => gelu(h),
            };
            x = x.add(b.c_proj.forward(h));
        }
        let x = self.ln_post.forward(x);
        x.slice([0..n, 1..g * g + 1, 0..d])
    }

    /// `nn.MultiheadAttention` over all tokens of each image.
    fn attention(&self, b: &Block<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, l, d] = x.dims();
        let (h, hd) = (self.cfg.heads(), self.cfg.head_width);
        let qkv = b.in_proj.forward(x);
        let split = |i: usize| {
            qkv.clone()
                .slice([0..n, 0..l, i * d..(i + 1) * d])
                .reshape([n, l, h, hd])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q
            .mul_scalar(1.0 / (hd as f64).sqrt())
            .matmul(k.swap_dims(2, 3));
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([n, l, d]);
        b.out_proj.forward(out)
    }
}
