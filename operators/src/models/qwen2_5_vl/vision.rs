//! The Qwen2.5-VL vision tower: patch embedding, 2-D rotary attention blocks
//! (windowed, with a few full-attention blocks) and the 2x2 patch merger.
//!
//! Data path for several images concatenated (rows of `pixel_values` are
//! 1176-value patches in 2x2-merge-block-major order, see the processor):
//!
//! 1. patch embedding (a Conv3d whose kernel equals its stride = one matmul);
//! 2. the groups of 4 patches of a merged token are permuted into *window
//!    order* ([`window_index`]), so each attention window is a contiguous run
//!    of rows;
//! 3. blocks attend within windows ([`window_index`]'s `cu_window_seqlens`),
//!    or within whole images for `fullatt_block_indexes` ([`cu_seqlens`]);
//! 4. the merger turns each group of 4 patches into one token, and the window
//!    permutation is undone.
//!
//! Attention never crosses images, so an image's embedding does not depend on
//! the other images encoded with it.  Segments of equal length are batched
//! into one attention call.

use super::host::apply_linear;
use crate::models::qwen2_5_vl::config::VisionConfig;
use crate::models::qwen2_5_vl::weights::{WeightStore, WeightsError};
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::activation::{gelu, silu, softmax};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use std::collections::BTreeMap;

/// Errors of the vision tower (bad inputs or weights).
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// A weight is missing or has the wrong shape.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// `pixel_values` and the image grids disagree.
    #[error("vision input: {0}")]
    Input(String),
}

/// Hyper-parameters of the vision tower (from `config.json`'s
/// `vision_config`, plus the values transformers hard-codes).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionTowerConfig {
    /// Width of the blocks (D).
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Input channels (3).
    pub in_chans: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Merge factor (2).
    pub spatial_merge_size: usize,
    /// Attention window side in pixels (112 for the published models).
    pub window_size: usize,
    /// Blocks attending over whole images instead of windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Output width (= the text model's hidden size).
    pub out_hidden_size: usize,
    /// RMSNorm epsilon (1e-6 in transformers).
    pub rms_norm_eps: f64,
    /// Base of the 2-D rotary embedding (10000 in transformers).
    pub rope_theta: f64,
}

impl VisionTowerConfig {
    /// Builds the tower configuration from a checkpoint's `vision_config`.
    pub fn from_config(v: &VisionConfig) -> Self {
        Self {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            depth: v.depth,
            num_heads: v.num_heads,
            in_chans: v.in_chans,
            temporal_patch_size: v.temporal_patch_size,
            patch_size: v.patch_size,
            spatial_merge_size: v.spatial_merge_size,
            window_size: v.window_size,
            fullatt_block_indexes: v.fullatt_block_indexes.clone(),
            out_hidden_size: v.out_hidden_size,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
        }
    }

    /// Values per pixel patch row (C x T x P x P = 1176).
    pub fn patch_dim(&self) -> usize {
        self.in_chans * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Patches per merged token (4).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// A randomly initialised tower (for tests; use [`VisionTower::load`]
    /// for a checkpoint).
    pub fn init<B: Backend>(&self, device: &B::Device) -> VisionTower<B> {
        let d = self.hidden_size;
        let linear = |i: usize, o: usize, bias: bool| {
            LinearConfig::new(i, o).with_bias(bias).init::<B>(device)
        };
        let norm = |n: usize| {
            RmsNormConfig::new(n)
                .with_epsilon(self.rms_norm_eps)
                .init::<B>(device)
        };
        let blocks = (0..self.depth)
            .map(|b| VisionBlock {
                norm1: norm(d),
                norm2: norm(d),
                attn: VisionAttention {
                    qkv: linear(d, 3 * d, true),
                    proj: linear(d, d, true),
                    num_heads: self.num_heads,
                },
                mlp: VisionMlp {
                    gate: linear(d, self.intermediate_size, true),
                    up: linear(d, self.intermediate_size, true),
                    down: linear(self.intermediate_size, d, true),
                },
                full_attention: self.fullatt_block_indexes.contains(&b),
            })
            .collect();
        let m = d * self.merge_unit();
        VisionTower {
            patch_embed: linear(self.patch_dim(), d, false),
            blocks,
            merger: PatchMerger {
                ln_q: norm(d),
                fc1: linear(m, m, true),
                fc2: linear(m, self.out_hidden_size, true),
                merge_unit: self.merge_unit(),
            },
            config: self.clone(),
        }
    }
}

/// Self-attention of a vision block (fused qkv with bias, 2-D RoPE).
#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    /// Fused q/k/v projection, output laid out as [3, heads, head_dim].
    pub qkv: Linear<B>,
    /// Output projection.
    pub proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
}

/// SiLU-gated MLP of a vision block (all linears with bias).
#[derive(Module, Debug)]
pub struct VisionMlp<B: Backend> {
    /// Gate projection.
    pub gate: Linear<B>,
    /// Up projection.
    pub up: Linear<B>,
    /// Down projection.
    pub down: Linear<B>,
}

/// One pre-norm transformer block of the vision tower.
#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    /// Norm before attention.
    pub norm1: RmsNorm<B>,
    /// Norm before the MLP.
    pub norm2: RmsNorm<B>,
    /// Attention.
    pub attn: VisionAttention<B>,
    /// MLP.
    pub mlp: VisionMlp<B>,
    /// Whether this block attends over whole images (else within windows).
    pub full_attention: bool,
}

/// The merger: RMSNorm, 4 patches concatenated, Linear-GELU-Linear.
#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    /// Norm over each patch (`ln_q`).
    pub ln_q: RmsNorm<B>,
    /// First linear (`mlp.0`).
    pub fc1: Linear<B>,
    /// Second linear (`mlp.2`), to the output width.
    pub fc2: Linear<B>,
    /// Patches per merged token.
    pub merge_unit: usize,
}

/// The Qwen2.5-VL vision tower.
#[derive(Module, Debug)]
pub struct VisionTower<B: Backend> {
    /// Patch embedding: Conv3d with kernel = stride, as a bias-free linear
    /// from the 1176 patch values.
    pub patch_embed: Linear<B>,
    /// Transformer blocks.
    pub blocks: Vec<VisionBlock<B>>,
    /// Patch merger.
    pub merger: PatchMerger<B>,
    /// Hyper-parameters.
    pub config: VisionTowerConfig,
}

/// (h, w) patch coordinates of one image's patches in `pixel_values` row
/// order (2x2-merge-block-major, frames repeated): the positions fed to the
/// 2-D rotary embedding.
pub fn vision_rope_hw(grid: [usize; 3], merge: usize) -> Vec<(usize, usize)> {
    let [t, h, w] = grid;
    let mut out = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for bh in 0..h / merge {
            for bw in 0..w / merge {
                for i in 0..merge {
                    for j in 0..merge {
                        out.push((bh * merge + i, bw * merge + j));
                    }
                }
            }
        }
    }
    out
}

/// Window order of the merged tokens of several images and the cumulative
/// patch counts of the attention windows.
///
/// Each frame's merged grid (h/merge x w/merge) is tiled row-major by windows
/// of `window_size / patch / merge` merged tokens per side, the grid padded at
/// the bottom/right; the returned permutation lists merged-token indices
/// (global over all images) window by window, padded slots dropped.  The
/// second vector is `[0, end of window 1, ...]` in patches, empty windows
/// omitted.
pub fn window_index(
    grids: &[[usize; 3]],
    window_size: usize,
    patch: usize,
    merge: usize,
) -> (Vec<usize>, Vec<usize>) {
    let unit = merge * merge;
    let ws = (window_size / merge / patch).max(1);
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut offset = 0usize;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        for f in 0..t {
            let base = offset + f * lh * lw;
            for wr in 0..lh.div_ceil(ws) {
                for wc in 0..lw.div_ceil(ws) {
                    let before = index.len();
                    for r in wr * ws..((wr + 1) * ws).min(lh) {
                        for c in wc * ws..((wc + 1) * ws).min(lw) {
                            index.push(base + r * lw + c);
                        }
                    }
                    let n = index.len() - before;
                    if n > 0 {
                        let last = *cu.last().unwrap_or(&0);
                        cu.push(last + n * unit);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    (index, cu)
}

/// Cumulative patch counts of the frames of all images (`[0, t0*h0*w0 /
/// t0, ...]`): the segments of the full-attention blocks.
pub fn cu_seqlens(grids: &[[usize; 3]]) -> Vec<usize> {
    let mut cu = vec![0usize];
    for &[t, h, w] in grids {
        for _ in 0..t {
            let last = *cu.last().unwrap_or(&0);
            cu.push(last + h * w);
        }
    }
    cu
}

/// Equal-length attention segments batched together.
struct SegmentGroup<B: Backend> {
    /// Rows of the segments in order, or None when they are all rows in
    /// their natural order.
    rows: Option<Tensor<B, 1, Int>>,
    /// Number of segments.
    count: usize,
    /// Rows per segment.
    len: usize,
}

/// How to run attention restricted to segments: segments of equal length
/// are gathered into one batch.
struct SegmentPlan<B: Backend> {
    /// One batch per distinct segment length.
    groups: Vec<SegmentGroup<B>>,
    /// Inverse of the concatenated group order (None when the identity).
    restore: Option<Tensor<B, 1, Int>>,
}

fn int_tensor<B: Backend>(values: Vec<usize>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    let v: Vec<i64> = values.into_iter().map(|x| x as i64).collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

impl<B: Backend> SegmentPlan<B> {
    fn new(cu: &[usize], device: &B::Device) -> Self {
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for pair in cu.windows(2) {
            if pair[1] > pair[0] {
                by_len.entry(pair[1] - pair[0]).or_default().push(pair[0]);
            }
        }
        let total = cu.last().copied().unwrap_or(0);
        if by_len.len() == 1 {
            // All segments have the same length: rows are already in order.
            let (&len, starts) = by_len.iter().next().unwrap_or_else(|| unreachable!());
            return Self {
                groups: vec![SegmentGroup {
                    rows: None,
                    count: starts.len(),
                    len,
                }],
                restore: None,
            };
        }
        let mut order = Vec::with_capacity(total);
        let mut groups = Vec::with_capacity(by_len.len());
        for (len, starts) in by_len {
            let rows: Vec<usize> = starts.iter().flat_map(|&s| s..s + len).collect();
            order.extend_from_slice(&rows);
            groups.push(SegmentGroup {
                rows: Some(int_tensor(rows, device)),
                count: starts.len(),
                len,
            });
        }
        let mut inverse = vec![0usize; order.len()];
        for (pos, &row) in order.iter().enumerate() {
            inverse[row] = pos;
        }
        Self {
            groups,
            restore: Some(int_tensor(inverse, device)),
        }
    }
}

fn rotate_half<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [n, h, d] = x.dims();
    let x1 = x.clone().slice([0..n, 0..h, 0..d / 2]);
    let x2 = x.slice([0..n, 0..h, d / 2..d]);
    Tensor::cat(vec![x2.neg(), x1], 2)
}

impl<B: Backend> VisionAttention<B> {
    /// Attention of `x` [N, D] within the segments of `plan`; `cos`/`sin`
    /// are [N, 1, head_dim].
    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        plan: &SegmentPlan<B>,
    ) -> Tensor<B, 2> {
        let [n, d] = x.dims();
        let heads = self.num_heads;
        let hd = d / heads;
        let qkv = apply_linear(&self.qkv, x).reshape([n, 3, heads, hd]);
        let part = |i: usize| {
            qkv.clone()
                .slice([0..n, i..i + 1, 0..heads, 0..hd])
                .reshape([n, heads, hd])
        };
        let rope = |t: Tensor<B, 3>| t.clone() * cos.clone() + rotate_half(t) * sin.clone();
        let (q, k, v) = (rope(part(0)), rope(part(1)), part(2));
        let scale = (hd as f64).powf(-0.5);
        let outs: Vec<Tensor<B, 2>> = plan
            .groups
            .iter()
            .map(|g| {
                let (rows, count, len) = (&g.rows, g.count, g.len);
                let take = |t: &Tensor<B, 3>| {
                    let t = match rows {
                        Some(r) => t.clone().select(0, r.clone()),
                        None => t.clone(),
                    };
                    t.reshape([count, len, heads, hd]).swap_dims(1, 2)
                };
                let (qg, kg, vg) = (take(&q), take(&k), take(&v));
                let scores = qg.matmul(kg.swap_dims(2, 3)) * scale;
                let probs = softmax(scores, 3);
                probs.matmul(vg).swap_dims(1, 2).reshape([count * len, d])
            })
            .collect();
        let mut out = if outs.len() == 1 {
            outs.into_iter()
                .next()
                .unwrap_or_else(|| unreachable!("one group"))
        } else {
            Tensor::cat(outs, 0)
        };
        if let Some(restore) = &plan.restore {
            out = out.select(0, restore.clone());
        }
        apply_linear(&self.proj, out)
    }
}

impl<B: Backend> VisionMlp<B> {
    /// down(silu(gate(x)) * up(x)).
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gated = silu(apply_linear(&self.gate, x.clone())) * apply_linear(&self.up, x);
        apply_linear(&self.down, gated)
    }
}

impl<B: Backend> VisionBlock<B> {
    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        window_plan: &SegmentPlan<B>,
        full_plan: &SegmentPlan<B>,
    ) -> Tensor<B, 2> {
        let plan = if self.full_attention {
            full_plan
        } else {
            window_plan
        };
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), cos, sin, plan);
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

impl<B: Backend> PatchMerger<B> {
    /// [N, D] patches (groups of `merge_unit` consecutive rows) to
    /// [N / merge_unit, out_hidden] tokens.
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, d] = x.dims();
        let x = self
            .ln_q
            .forward(x)
            .reshape([n / self.merge_unit, d * self.merge_unit]);
        apply_linear(&self.fc2, gelu(apply_linear(&self.fc1, x)))
    }
}

impl<B: Backend> VisionTower<B> {
    /// Loads the tower from a checkpoint (`visual.*` tensors, either key
    /// layout), checking every shape.
    pub fn load(
        store: &WeightStore,
        config: &VisionTowerConfig,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let c = config;
        let d = c.hidden_size;
        let vi = c.intermediate_size;
        let patch: Tensor<B, 5> = store.tensor(
            "visual.patch_embed.proj.weight",
            [
                d,
                c.in_chans,
                c.temporal_patch_size,
                c.patch_size,
                c.patch_size,
            ],
            device,
        )?;
        let patch_embed = Linear {
            weight: Param::from_tensor(patch.reshape([d, c.patch_dim()]).transpose()),
            bias: None,
        };
        let mut blocks = Vec::with_capacity(c.depth);
        for b in 0..c.depth {
            let p = format!("visual.blocks.{b}");
            blocks.push(VisionBlock {
                norm1: store.rms_norm(&format!("{p}.norm1.weight"), d, c.rms_norm_eps, device)?,
                norm2: store.rms_norm(&format!("{p}.norm2.weight"), d, c.rms_norm_eps, device)?,
                attn: VisionAttention {
                    qkv: store.linear(&format!("{p}.attn.qkv"), d, 3 * d, true, device)?,
                    proj: store.linear(&format!("{p}.attn.proj"), d, d, true, device)?,
                    num_heads: c.num_heads,
                },
                mlp: VisionMlp {
                    gate: store.linear(&format!("{p}.mlp.gate_proj"), d, vi, true, device)?,
                    up: store.linear(&format!("{p}.mlp.up_proj"), d, vi, true, device)?,
                    down: store.linear(&format!("{p}.mlp.down_proj"), vi, d, true, device)?,
                },
                full_attention: c.fullatt_block_indexes.contains(&b),
            });
        }
        let m = d * c.merge_unit();
        let merger = PatchMerger {
            ln_q: store.rms_norm("visual.merger.ln_q.weight", d, c.rms_norm_eps, device)?,
            fc1: store.linear("visual.merger.mlp.0", m, m, true, device)?,
            fc2: store.linear("visual.merger.mlp.2", m, c.out_hidden_size, true, device)?,
            merge_unit: c.merge_unit(),
        };
        Ok(Self {
            patch_embed,
            blocks,
            merger,
            config: config.clone(),
        })
    }

    /// Checks that `pixel_values` [rows, cols] matches the grids; returns the
    /// number of merged tokens.
    fn validate(
        &self,
        rows: usize,
        cols: usize,
        grids: &[[usize; 3]],
    ) -> Result<usize, VisionError> {
        let c = &self.config;
        if cols != c.patch_dim() {
            return Err(VisionError::Input(format!(
                "pixel_values has {cols} columns, expected {}",
                c.patch_dim()
            )));
        }
        let m = c.spatial_merge_size;
        let mut patches = 0usize;
        for (i, &[t, h, w]) in grids.iter().enumerate() {
            if t == 0 || h == 0 || w == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
                return Err(VisionError::Input(format!(
                    "image {i}: grid [{t}, {h}, {w}] must be positive with h and w divisible by {m}"
                )));
            }
            patches += t * h * w;
        }
        if patches != rows {
            return Err(VisionError::Input(format!(
                "pixel_values has {rows} rows but the grids {grids:?} need {patches}"
            )));
        }
        Ok(patches / c.merge_unit())
    }

    /// Encodes several images concatenated: `pixel_values` [n_patches, 1176]
    /// with `grids` ([t, h, w] per image, in patches) to the merged tokens
    /// [n_patches / 4, out_hidden], images in input order.
    pub fn forward(
        &self,
        pixel_values: Tensor<B, 2>,
        grids: &[[usize; 3]],
    ) -> Result<Tensor<B, 2>, VisionError> {
        let [rows, cols] = pixel_values.dims();
        let tokens = self.validate(rows, cols, grids)?;
        let c = &self.config;
        let device = pixel_values.device();
        if tokens == 0 {
            return Ok(Tensor::zeros([0, c.out_hidden_size], &device));
        }
        let unit = c.merge_unit();
        let (win_index, cu_window) =
            window_index(grids, c.window_size, c.patch_size, c.spatial_merge_size);
        // Patch-level permutation into window order.
        let patch_perm: Vec<usize> = win_index
            .iter()
            .flat_map(|&g| g * unit..(g + 1) * unit)
            .collect();

        // Rotary tables in window order, computed on the host.
        let hw: Vec<(usize, usize)> = grids
            .iter()
            .flat_map(|&g| vision_rope_hw(g, c.spatial_merge_size))
            .collect();
        let hd = c.head_dim();
        let quarter = hd / 4;
        let inv_freq: Vec<f32> = (0..quarter)
            .map(|j| {
                let exponent = (2 * j) as f32 / (hd / 2) as f32;
                1.0 / (c.rope_theta as f32).powf(exponent)
            })
            .collect();
        let mut cos = Vec::with_capacity(rows * hd);
        let mut sin = Vec::with_capacity(rows * hd);
        let mut angles = vec![0f32; hd / 2];
        for &p in &patch_perm {
            let (h, w) = hw[p];
            for j in 0..quarter {
                angles[j] = h as f32 * inv_freq[j];
                angles[quarter + j] = w as f32 * inv_freq[j];
            }
            // Duplicated halves (rotate_half convention).
            for _ in 0..2 {
                cos.extend(angles[..hd / 2].iter().map(|a| a.cos()));
                sin.extend(angles[..hd / 2].iter().map(|a| a.sin()));
            }
        }
        let cos: Tensor<B, 3> = Tensor::from_data(TensorData::new(cos, [rows, 1, hd]), &device);
        let sin: Tensor<B, 3> = Tensor::from_data(TensorData::new(sin, [rows, 1, hd]), &device);

        let x = self.patch_embed.forward(pixel_values);
        let x = x.select(0, int_tensor(patch_perm, &device));
        let window_plan = SegmentPlan::new(&cu_window, &device);
        let full_plan = SegmentPlan::new(&cu_seqlens(grids), &device);
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(x, &cos, &sin, &window_plan, &full_plan);
        }
        let merged = self.merger.forward(x);
        let mut restore = vec![0usize; tokens];
        for (pos, &g) in win_index.iter().enumerate() {
            restore[g] = pos;
        }
        Ok(merged.select(0, int_tensor(restore, &device)))
    }

    /// Like [`forward`](Self::forward) but returns one [tokens_i,
    /// out_hidden] tensor per image.  Each image's embedding is the same as
    /// when encoded alone (attention never crosses images).
    pub fn encode_images(
        &self,
        pixel_values: Tensor<B, 2>,
        grids: &[[usize; 3]],
    ) -> Result<Vec<Tensor<B, 2>>, VisionError> {
        let all = self.forward(pixel_values, grids)?;
        let unit = self.config.merge_unit();
        let out_dim = self.config.out_hidden_size;
        let mut start = 0usize;
        Ok(grids
            .iter()
            .map(|&[t, h, w]| {
                let n = t * h * w / unit;
                let part = all.clone().slice([start..start + n, 0..out_dim]);
                start += n;
                part
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
    use burn::backend::NdArray;
    use safetensors::tensor::Dtype;
    use safetensors::SafeTensors;
    use std::path::{Path, PathBuf};

    type B = NdArray<f32>;
    const CASES: [&str; 5] = [
        "two_shot",
        "zero_shot",
        "large_image",
        "batch3",
        "small_wide_image",
    ];

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny")
    }

    struct Cases {
        bytes: Vec<u8>,
    }

    impl Cases {
        fn load() -> Self {
            Self {
                bytes: std::fs::read(fixture_dir().join("cases.safetensors")).unwrap(),
            }
        }
        fn st(&self) -> SafeTensors<'_> {
            SafeTensors::deserialize(&self.bytes).unwrap()
        }
        fn ints(&self, key: &str) -> (Vec<i64>, Vec<usize>) {
            let st = self.st();
            let t = st.tensor(key).unwrap();
            assert_eq!(t.dtype(), Dtype::I64, "{key}");
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (v, t.shape().to_vec())
        }
        fn floats(&self, key: &str) -> (Vec<f32>, Vec<usize>) {
            let st = self.st();
            let t = st.tensor(key).unwrap();
            assert_eq!(t.dtype(), Dtype::F32, "{key}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (v, t.shape().to_vec())
        }
        fn grids(&self, case: &str) -> Vec<[usize; 3]> {
            let (v, _) = self.ints(&format!("{case}.image_grid_thw"));
            v.chunks(3)
                .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
                .collect()
        }
    }

    fn as_usize(v: &[i64]) -> Vec<usize> {
        v.iter().map(|&x| x as usize).collect()
    }

    fn tower() -> VisionTower<B> {
        tower_on::<B>(&Default::default())
    }

    /// The fixture's vision tower on `device` of backend `K`.
    pub(crate) fn tower_on<K: Backend>(device: &K::Device) -> VisionTower<K> {
        let config = Qwen25VlConfig::from_file(&fixture_dir().join("config.json")).unwrap();
        let store = WeightStore::open(&fixture_dir(), true).unwrap();
        VisionTower::load(
            &store,
            &VisionTowerConfig::from_config(&config.vision),
            device,
        )
        .unwrap()
    }

    #[test]
    fn index_helpers_match_fixture() {
        let cases = Cases::load();
        for case in CASES {
            let grids = cases.grids(case);
            let (hw, _) = cases.ints(&format!("{case}.vision_rope_hw"));
            let ours: Vec<i64> = grids
                .iter()
                .flat_map(|&g| vision_rope_hw(g, 2))
                .flat_map(|(h, w)| [h as i64, w as i64])
                .collect();
            assert_eq!(ours, hw, "{case}: rope hw");
            let (idx, cu) = window_index(&grids, 56, 14, 2);
            let (want_idx, _) = cases.ints(&format!("{case}.vision_window_index"));
            let (want_cu, _) = cases.ints(&format!("{case}.vision_cu_window_seqlens"));
            let (want_full, _) = cases.ints(&format!("{case}.vision_cu_seqlens"));
            assert_eq!(idx, as_usize(&want_idx), "{case}: window index");
            assert_eq!(cu, as_usize(&want_cu), "{case}: cu_window_seqlens");
            assert_eq!(
                cu_seqlens(&grids),
                as_usize(&want_full),
                "{case}: cu_seqlens"
            );
        }
    }

    #[test]
    fn window_index_pads_partial_windows() {
        // merged grid 3x3, windows of 2x2: 4 windows of 4, 2, 2, 1 tokens.
        let (idx, cu) = window_index(&[[1, 6, 6]], 56, 14, 2);
        assert_eq!(idx, vec![0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(cu, vec![0, 16, 24, 32, 36]);
    }

    #[test]
    fn forward_matches_fixture() {
        check_forward(&tower());
    }

    /// Vision embeddings of every case within 1e-4 of the reference, and
    /// each image encoded alone equal to its rows of the batch (any
    /// backend).
    pub(crate) fn check_forward<K: Backend>(tower: &VisionTower<K>) {
        let cases = Cases::load();
        let dev = tower.patch_embed.weight.device();
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap(),
        )
        .unwrap();
        for case in CASES {
            let grids = cases.grids(case);
            let (px, shape) = cases.floats(&format!("{case}.pixel_values"));
            let px: Tensor<K, 2> =
                Tensor::from_data(TensorData::new(px, [shape[0], shape[1]]), &dev);
            let out = tower.forward(px.clone(), &grids).unwrap();
            let (want, wshape) = cases.floats(&format!("{case}.vision_embeds"));
            assert_eq!(out.dims().to_vec(), wshape, "{case}");
            let got = out.into_data().to_vec::<f32>().unwrap();
            let max_diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            eprintln!("{case}: max abs diff {max_diff}");
            // Acceptance is 1e-3; the implementation reaches ~2e-6.
            assert!(max_diff < 1e-4, "{case}: max abs diff {max_diff}");
            let entry = meta["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == case)
                .unwrap();
            let sum: f64 = got.iter().map(|&x| x as f64).sum();
            let want_sum = entry["vision_embeds_sum"].as_f64().unwrap();
            let want_mean = entry["vision_embeds_mean"].as_f64().unwrap();
            assert!(
                (sum - want_sum).abs() < 1e-2,
                "{case}: sum {sum} vs {want_sum}"
            );
            let mean = sum / got.len() as f64;
            assert!((mean - want_mean).abs() < 1e-4, "{case}: mean {mean}");

            // Encoding each image alone gives the same rows.
            let per_image = tower.encode_images(px.clone(), &grids).unwrap();
            let mut start_patch = 0usize;
            let mut start_tok = 0usize;
            for (i, g) in grids.iter().enumerate() {
                let n = g[0] * g[1] * g[2];
                let alone = tower
                    .forward(
                        px.clone().slice([start_patch..start_patch + n, 0..1176]),
                        &[*g],
                    )
                    .unwrap()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap();
                let together = per_image[i].clone().into_data().to_vec::<f32>().unwrap();
                assert_eq!(alone.len(), together.len());
                let d = alone
                    .iter()
                    .zip(&together)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-5, "{case} image {i}: alone vs together {d}");
                let fixture_rows = &got[start_tok * 32..(start_tok + n / 4) * 32];
                assert_eq!(fixture_rows, together.as_slice(), "{case} image {i}: split");
                start_patch += n;
                start_tok += n / 4;
            }
        }
    }

    #[test]
    fn rejects_inconsistent_inputs() {
        let tower = tower();
        let dev = Default::default();
        let px: Tensor<B, 2> = Tensor::zeros([16, 1176], &dev);
        let e = tower.forward(px.clone(), &[[1, 4, 8]]).unwrap_err();
        assert!(e.to_string().contains("16 rows"), "{e}");
        let e = tower.forward(px, &[[1, 2, 8]]);
        assert!(e.is_ok(), "2x8 grid is valid");
        let e = tower
            .forward(Tensor::zeros([15, 1176], &dev), &[[1, 3, 5]])
            .unwrap_err();
        assert!(e.to_string().contains("divisible"), "{e}");
    }

    #[test]
    fn random_init_runs() {
        let config = Qwen25VlConfig::from_file(&fixture_dir().join("config.json")).unwrap();
        let tower: VisionTower<B> =
            VisionTowerConfig::from_config(&config.vision).init(&Default::default());
        let px: Tensor<B, 2> = Tensor::ones([32, 1176], &Default::default());
        let out = tower.forward(px, &[[1, 4, 8]]).unwrap();
        assert_eq!(out.dims(), [8, 32]);
    }
}
