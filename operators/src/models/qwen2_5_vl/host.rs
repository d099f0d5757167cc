//! CPU fast paths for the ndarray backend.
//!
//! burn 0.21's ndarray backend reshapes through a borrowed view and then
//! copies it (`to_shape(..).into_shared()`), so every `matmul` copies both
//! operands: the 151,936 × hidden LM head is copied and re-packed on every
//! decoding step. Its softmax is five full passes with a fresh allocation
//! each. With a small model these copies cost more than the arithmetic, and
//! they do not shrink with batching. The functions here read the tensors'
//! own memory instead (a zero-copy view of the ndarray storage) and return
//! results as owned vectors that become tensors without a copy. They are
//! hand-written because no crate offers them on burn's storage; they are
//! used only when the backend is `NdArray<f32>` and every other backend
//! (CUDA, autodiff) takes the generic tensor path. Tests compare both paths.

use std::any::{Any, TypeId};

use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::{backend::Backend, Tensor, TensorData, TensorPrimitive};
use ndarray::ArrayViewD;
use rayon::prelude::*;

use super::host_bf16::{widen, HostBf16};
use super::logprobs::softmax_weights;

/// The ndarray storage behind `t` (shared, not copied), or `None` on
/// another backend.
pub(crate) fn ndarray_storage<B: Backend, const D: usize>(
    t: &Tensor<B, D>,
) -> Option<NdArrayTensor> {
    let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
        return None;
    };
    let any: &dyn Any = &p;
    any.downcast_ref::<NdArrayTensor>().cloned()
}

/// A zero-copy handle on the f32 storage of an ndarray-backend tensor.
pub(crate) struct HostF32(NdArrayTensor);

impl HostF32 {
    /// The host storage of `t`, or `None` when `B` is not the ndarray backend
    /// with f32 elements (the caller then uses the generic tensor path).
    pub(crate) fn of<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Self> {
        match ndarray_storage(t)? {
            inner @ NdArrayTensor::F32(_) => Some(Self(inner)),
            _ => None,
        }
    }

    /// The elements, with the tensor's shape and strides.
    pub(crate) fn view(&self) -> ArrayViewD<'_, f32> {
        match &self.0 {
            NdArrayTensor::F32(storage) => storage.view(),
            // `of` only builds F32 handles.
            _ => unreachable!("HostF32 holds an f32 tensor"),
        }
    }

    /// The elements as one row-major slice when the layout allows it.
    pub(crate) fn as_slice(&self) -> Option<&[f32]> {
        match &self.0 {
            NdArrayTensor::F32(storage) => storage.view().to_slice(),
            _ => None,
        }
    }
}

/// True when tensors of `B` take the host fast paths: the ndarray backend
/// with f32 elements (a type check; called once per forward).
pub(crate) fn is_host<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<NdArrayTensor>()
        && TypeId::of::<B::FloatElem>() == TypeId::of::<f32>()
}

/// Vocabulary columns per block of the packed LM head (two AVX registers).
pub(crate) const HEAD_BLOCK: usize = 16;

/// The LM head `w` [v, d] (the checkpoint layout: one row per token)
/// re-laid for [`lm_head`]: block `b` holds columns `16b..16b + 16` as a
/// contiguous [d, 16] panel, so the kernel streams the weight exactly once,
/// front to back, with no copy per call. Returned with its 2-D shape
/// [ceil(v / 16), d · 16]; columns past `v` are zero. Elements are f32, or
/// bf16 words (`u16`) that the kernel widens.
pub(crate) fn pack_lm_head<E: Copy + Default>(w: &[E], v: usize, d: usize) -> (Vec<E>, [usize; 2]) {
    let (mut out, shape) = packed_head_buffer(v, d);
    pack_head_rows(&mut out, 0, &w[..v * d], d);
    (out, shape)
}

/// A zeroed buffer for a packed head of `v` rows of width `d`, with its
/// shape (see [`pack_lm_head`]).
pub(crate) fn packed_head_buffer<E: Copy + Default>(v: usize, d: usize) -> (Vec<E>, [usize; 2]) {
    let blocks = v.div_ceil(HEAD_BLOCK);
    (
        vec![E::default(); blocks * d * HEAD_BLOCK],
        [blocks, d * HEAD_BLOCK],
    )
}

/// Writes checkpoint rows `first..first + rows.len() / d` of the head into
/// the packed buffer `out` (see [`pack_lm_head`]), so a head can be packed
/// while it is read, a few rows at a time.
pub(crate) fn pack_head_rows<E: Copy>(out: &mut [E], first: usize, rows: &[E], d: usize) {
    for (i, row) in rows.chunks_exact(d).enumerate() {
        let c = first + i;
        let base = (c / HEAD_BLOCK) * d * HEAD_BLOCK + c % HEAD_BLOCK;
        for (k, &x) in row.iter().enumerate() {
            out[base + k * HEAD_BLOCK] = x;
        }
    }
}

/// The inverse of [`pack_lm_head`]: rows [v, d] (for exporting weights).
pub(crate) fn unpack_lm_head<E: Copy + Default>(packed: &[E], v: usize, d: usize) -> Vec<E> {
    let mut out = vec![E::default(); v * d];
    for (c, row) in out.chunks_exact_mut(d).enumerate() {
        let base = (c / HEAD_BLOCK) * d * HEAD_BLOCK + c % HEAD_BLOCK;
        for (k, x) in row.iter_mut().enumerate() {
            *x = packed[base + k * HEAD_BLOCK];
        }
    }
    out
}

/// The checkpoint rows [v, d] of a packed head tensor as f32, whether it
/// holds f32 or bf16 words (for exporting weights). `None` off the host.
pub(crate) fn packed_head_rows<B: Backend>(
    packed: &Tensor<B, 2>,
    v: usize,
    d: usize,
) -> Option<Tensor<B, 2>> {
    let rows: Vec<f32> = if let Some(h) = HostBf16::of(packed) {
        let view = h.view();
        unpack_lm_head(view.to_slice()?, v, d)
            .into_iter()
            .map(widen)
            .collect()
    } else {
        let h = HostF32::of(packed)?;
        unpack_lm_head(h.as_slice()?, v, d)
    };
    Some(Tensor::from_data(
        TensorData::new(rows, [v, d]),
        &packed.device(),
    ))
}

/// Rows `ids` [n, d] of the matrix packed by [`pack_lm_head`] (the token
/// embedding of a tied checkpoint, stored once as the packed head). Ids
/// must be below the vocabulary size. `None` off the host backend.
pub(crate) fn packed_rows<B: Backend>(
    packed: &Tensor<B, 2>,
    d: usize,
    ids: &[i64],
) -> Option<Tensor<B, 2>> {
    fn gather<E: Copy>(w: &[E], d: usize, ids: &[i64], f: impl Fn(E) -> f32) -> Option<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let c = usize::try_from(id).ok()?;
            let base = (c / HEAD_BLOCK) * d * HEAD_BLOCK + c % HEAD_BLOCK;
            out.extend((0..d).map(|k| f(w[base + k * HEAD_BLOCK])));
        }
        Some(out)
    }
    let out = if let Some(h) = HostBf16::of(packed) {
        gather(h.view().to_slice()?, d, ids, widen)?
    } else {
        gather(HostF32::of(packed)?.as_slice()?, d, ids, |x| x)?
    };
    Some(Tensor::from_data(
        TensorData::new(out, [ids.len(), d]),
        &packed.device(),
    ))
}

/// Logits `hidden` [n, d] · `W`ᵀ -> [n, v] for the LM head, where `packed`
/// is `W` [v, d] laid out by [`pack_lm_head`]. burn's ndarray `matmul`
/// copies both operands and matrixmultiply re-packs the weight on every
/// call: two extra passes over 151,936 × d floats per decoding step,
/// whatever the batch. Here the packed weight is read once per call, 16
/// columns at a time, while every row is multiplied against it from
/// registers; vocabulary chunks run in parallel. `None` off the host
/// backend or when the shapes disagree.
pub(crate) fn lm_head<B: Backend>(
    hidden: &Tensor<B, 2>,
    packed: &Tensor<B, 2>,
    v: usize,
) -> Option<Tensor<B, 2>> {
    let hh = HostF32::of(hidden)?;
    let hv = hh.view();
    let hc = hv.as_standard_layout();
    let h = hc.as_slice()?;
    let &[n, d] = hv.shape() else {
        return None;
    };
    let out = if let Some(hw) = HostBf16::of(packed) {
        let wv = hw.view();
        lm_head_packed(h, n, d, wv.to_slice()?, wv.shape(), v)?
    } else {
        let hw = HostF32::of(packed)?;
        lm_head_packed(h, n, d, hw.as_slice()?, hw.view().shape(), v)?
    };
    Some(Tensor::from_data(
        TensorData::new(out, [n, v]),
        &hidden.device(),
    ))
}

/// The packed-head product of [`lm_head`] on host slices: `h` [n, d] and
/// the packed weight `ws` of shape `wshape` (f32 or bf16 words).
fn lm_head_packed<E: PackedElem>(
    h: &[f32],
    n: usize,
    d: usize,
    ws: &[E],
    wshape: &[usize],
    v: usize,
) -> Option<Vec<f32>> {
    let &[blocks, width] = wshape else {
        return None;
    };
    if width != d * HEAD_BLOCK || blocks != v.div_ceil(HEAD_BLOCK) {
        return None;
    }
    // Every element is written below, so the output is not zeroed first:
    // that would be one more pass over n × 151,936 floats per step.
    let mut out: Vec<f32> = Vec::with_capacity(n * v);
    let ptr = Shared(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let per_task = LM_CHUNK / HEAD_BLOCK;
    let chunks: Vec<(usize, usize)> = (0..blocks)
        .step_by(per_task)
        .map(|b0| (b0, (b0 + per_task).min(blocks)))
        .collect();
    chunks.par_iter().for_each(|&(b0, b1)| {
        // SAFETY: chunks cover disjoint column ranges of `out`, which
        // outlives this loop; each call writes only the columns of blocks
        // b0..b1 (clipped to v).
        unsafe { lm_head_blocks(h, n, d, ws, v, b0, b1, ptr) };
    });
    // SAFETY: the chunks cover all blocks, hence columns 0..v of all n rows,
    // and each call writes every element of its columns.
    unsafe { out.set_len(n * v) };
    Some(out)
}

/// An element of a packed LM head: f32, or a bf16 word widened when read
/// (exact, so both give the same logits for the same values).
pub(crate) trait PackedElem: Copy + Send + Sync + 'static {
    /// The value as f32.
    fn value(self) -> f32;
    /// The 16 values at `p` as two AVX registers.
    ///
    /// # Safety
    /// `p` must point to 16 readable elements; the CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
}

impl PackedElem for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::_mm256_loadu_ps;
        // SAFETY: the caller guarantees 16 readable floats and AVX.
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }
}

impl PackedElem for u16 {
    #[inline(always)]
    fn value(self) -> f32 {
        widen(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable words and AVX2; each
        // word goes to the top half of a 32-bit lane (the exact widening).
        unsafe {
            let lo = _mm_loadu_si128(p.cast());
            let hi = _mm_loadu_si128(p.add(8).cast());
            (
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(lo), 16)),
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(hi), 16)),
            )
        }
    }
}

/// Columns per parallel task of [`lm_head`].
const LM_CHUNK: usize = 4096;

/// A raw pointer handed to parallel tasks: the output of [`lm_head`] and
/// [`linear`] (tasks write disjoint elements) and the weight of [`linear`]
/// (only read, while its tensor is alive).
#[derive(Clone, Copy)]
struct Shared<P>(P);
impl<P: Copy> Shared<P> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> P {
        self.0
    }
}
// SAFETY: only built from raw pointers whose users uphold the contracts
// above (disjoint writes, reads of live memory).
unsafe impl<P> Send for Shared<P> {}
// SAFETY: as above.
unsafe impl<P> Sync for Shared<P> {}

/// The columns of blocks `b0..b1` (clipped to `v`) of `out` [n, v] =
/// `h` [n, d] · `W`ᵀ, with `W` packed by [`pack_lm_head`].
///
/// # Safety
/// `out` must point to `n * v` writable floats not written concurrently in
/// these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn lm_head_blocks<E: PackedElem>(
    h: &[f32],
    n: usize,
    d: usize,
    packed: &[E],
    v: usize,
    b0: usize,
    b1: usize,
    out: Shared<*mut f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA; the caller upholds the rest.
        unsafe { avx2::lm_head_blocks(h, n, d, packed, v, b0, b1, out.0) };
        return;
    }
    for b in b0..b1 {
        let panel = &packed[b * d * HEAD_BLOCK..(b + 1) * d * HEAD_BLOCK];
        let cols = HEAD_BLOCK.min(v - b * HEAD_BLOCK);
        for r in 0..n {
            for j in 0..cols {
                let mut acc = 0f32;
                for k in 0..d {
                    acc = h[r * d + k].mul_add(panel[k * HEAD_BLOCK + j].value(), acc);
                }
                // SAFETY: r < n and the column is below v, owned by the caller.
                unsafe { *out.0.add(r * v + b * HEAD_BLOCK + j) = acc };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PackedElem, HEAD_BLOCK};
    use std::arch::x86_64::*;

    /// One tile: rows `r0..r0 + R` × the 16 columns of one packed block,
    /// written to columns `c0..c0 + cols` of `out`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<E: PackedElem, const R: usize>(
        h: &[f32],
        d: usize,
        panel: *const E,
        r0: usize,
        out: *mut f32,
        v: usize,
        c0: usize,
        cols: usize,
    ) {
        // SAFETY (whole body): `panel` holds d × 16 floats, r0 + R <= n,
        // `h` holds [n, d] and `out` [n, v] floats, c0 + cols <= v
        // (caller's contract).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let hp = h.as_ptr().add(r0 * d);
            for k in 0..d {
                let (w0, w1) = E::load16(panel.add(k * HEAD_BLOCK));
                for (r, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*hp.add(r * d + k));
                    a[0] = _mm256_fmadd_ps(x, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, w1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let op = out.add((r0 + r) * v + c0);
                if cols == HEAD_BLOCK {
                    _mm256_storeu_ps(op, a[0]);
                    _mm256_storeu_ps(op.add(8), a[1]);
                } else {
                    let mut tmp = [0f32; HEAD_BLOCK];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), a[1]);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), op, cols);
                }
            }
        }
    }

    /// AVX2 + FMA version of `super::lm_head_blocks` (same contract).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lm_head_blocks<E: PackedElem>(
        h: &[f32],
        n: usize,
        d: usize,
        packed: &[E],
        v: usize,
        b0: usize,
        b1: usize,
        out: *mut f32,
    ) {
        // SAFETY: blocks b0..b1 lie inside `packed`; tiles stay inside rows
        // 0..n and the blocks' columns (clipped to v).
        unsafe {
            for b in b0..b1 {
                let panel = packed.as_ptr().add(b * d * HEAD_BLOCK);
                let c0 = b * HEAD_BLOCK;
                let cols = HEAD_BLOCK.min(v - c0);
                let mut r0 = 0;
                while r0 + 6 <= n {
                    tile::<E, 6>(h, d, panel, r0, out, v, c0, cols);
                    r0 += 6;
                }
                match n - r0 {
                    5 => tile::<E, 5>(h, d, panel, r0, out, v, c0, cols),
                    4 => tile::<E, 4>(h, d, panel, r0, out, v, c0, cols),
                    3 => tile::<E, 3>(h, d, panel, r0, out, v, c0, cols),
                    2 => tile::<E, 2>(h, d, panel, r0, out, v, c0, cols),
                    1 => tile::<E, 1>(h, d, panel, r0, out, v, c0, cols),
                    _ => {}
                }
            }
        }
    }
}

/// `x` [.., d_in] through `lin` (weight [d_in, d_out], bias [d_out]) on the
/// host: one `sgemm` per column chunk that reads the weight where it lies,
/// whatever its strides (the checkpoint's [d_out, d_in] matrix is held as a
/// transposed view). burn's ndarray `matmul` first copies a non-contiguous
/// operand, so each call on a 3B-width layer would copy tens of MB of
/// weights; the chunks run in parallel. `None` off the host backend.
pub(crate) fn linear<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    lin: &burn::nn::Linear<B>,
) -> Option<Tensor<B, D>> {
    let hx = HostF32::of(x)?;
    let w = lin.weight.val();
    let xv = hx.view();
    let xc = xv.as_standard_layout();
    let xs = xc.as_slice()?;
    if let Some(hw) = HostBf16::of(&w) {
        return linear_bf16(x, xs, &hw, lin);
    }
    let hw = HostF32::of(&w)?;
    let wv = hw.view();
    let (&[d_in, d_out], &[rsw, csw]) = (wv.shape(), wv.strides()) else {
        return None;
    };
    let dims = x.dims();
    if dims[D - 1] != d_in {
        return None;
    }
    let n = xs.len() / d_in.max(1);
    let hb = match &lin.bias {
        Some(b) => Some(HostF32::of(&b.val())?),
        None => None,
    };
    let bias = match &hb {
        Some(h) => Some(h.as_slice().filter(|b| b.len() == d_out)?),
        None => None,
    };
    let mut out = vec![0f32; n * d_out];
    let ptr = Shared(out.as_mut_ptr());
    let wp = Shared(wv.as_ptr());
    // Column chunks large enough to keep sgemm's packing worthwhile.
    let chunk = d_out
        .div_ceil(rayon::current_num_threads().max(1) * 2)
        .max(64);
    let chunks: Vec<(usize, usize)> = (0..d_out)
        .step_by(chunk)
        .map(|c0| (c0, (c0 + chunk).min(d_out)))
        .collect();
    chunks.par_iter().for_each(|&(c0, c1)| {
        // SAFETY: `wp` points at the [d_in, d_out] weight with strides
        // (rsw, csw), offset by c0 columns; `xs` holds [n, d_in]
        // row-major; the output chunk covers columns c0..c1 of `out`
        // [n, d_out], written by no other task; beta = 0 ignores its
        // previous contents.
        unsafe {
            matrixmultiply::sgemm(
                n,
                d_in,
                c1 - c0,
                1.0,
                xs.as_ptr(),
                d_in as isize,
                1,
                wp.get().offset(c0 as isize * csw),
                rsw,
                csw,
                0.0,
                ptr.get().add(c0),
                d_out as isize,
                1,
            );
        }
    });
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(d_out) {
            for (o, &bb) in row.iter_mut().zip(b) {
                *o += bb;
            }
        }
    }
    let mut shape = dims;
    shape[D - 1] = d_out;
    Some(Tensor::from_data(TensorData::new(out, shape), &x.device()))
}

/// [`linear`] with a bf16 weight: `xs` is `x` row-major.
fn linear_bf16<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    xs: &[f32],
    w: &HostBf16,
    lin: &burn::nn::Linear<B>,
) -> Option<Tensor<B, D>> {
    let mut shape = x.dims();
    let d_in = shape[D - 1];
    let n = xs.len() / d_in.max(1);
    let hb = match &lin.bias {
        Some(b) => Some(HostF32::of(&b.val())?),
        None => None,
    };
    let bias = match &hb {
        Some(h) => Some(h.as_slice()?),
        None => None,
    };
    let (out, d_out) = super::host_bf16::linear(xs, n, w, bias)?;
    shape[D - 1] = d_out;
    Some(Tensor::from_data(TensorData::new(out, shape), &x.device()))
}

/// `lin.forward(x)`, on the host through [`linear`].
pub(crate) fn apply_linear<B: Backend, const D: usize>(
    lin: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match linear(&x, lin) {
        Some(y) => y,
        None => lin.forward(x),
    }
}

/// Dot product over 8 independent lanes (so it vectorises; the lanes are
/// added in a fixed order, the same on every machine).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ta.iter().zip(tb) {
        sum += x * y;
    }
    sum
}

/// Scaled dot-product attention on the host for one layer.
///
/// `q` [b, heads, lq, hd] and `k`, `v` [b, kv_heads, t, hd] (any strides);
/// query head `h` reads kv head `h / (heads / kv_heads)`. Query `i` of row
/// `r` sees key `j` when `key_valid[r][j]` and `j <= past + i` (causal, with
/// `past` cached positions before the queries). Returns [b, lq, heads·hd]
/// row-major. A query that sees no key (left padding) gets zeros; its
/// output is never read. Scores, softmax and the weighted sum run row by
/// row in one pass over the keys, with no [lq, t] score tensor.
pub(crate) fn attention<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    key_valid: &[Vec<bool>],
    past: usize,
) -> Option<Tensor<B, 3>> {
    let (hq, hk, hv) = (HostF32::of(q)?, HostF32::of(k)?, HostF32::of(v)?);
    let (qv, kv, vv) = (hq.view(), hk.view(), hv.view());
    let (qs, ks, vs) = (qv.shape(), kv.shape(), vv.shape());
    let [b, heads, lq, hd] = [qs[0], qs[1], qs[2], qs[3]];
    let [kb, kv_heads, t, khd] = [ks[0], ks[1], ks[2], ks[3]];
    if kb != b || khd != hd || vs != ks || kv_heads == 0 || heads % kv_heads != 0 {
        return None;
    }
    if key_valid.len() != b || key_valid.iter().any(|r| r.len() != t) {
        return None;
    }
    let rep = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qc, kc, vc) = (
        qv.as_standard_layout(),
        kv.as_standard_layout(),
        vv.as_standard_layout(),
    );
    let (qd, kd, vd) = (qc.as_slice()?, kc.as_slice()?, vc.as_slice()?);
    let mut out = vec![0f32; b * lq * heads * hd];
    // One task per (row, query): its output [heads · hd] is contiguous and
    // every head reads the same key validity; the arithmetic per query is
    // the same whichever thread runs it.
    out.par_chunks_mut(heads * hd).enumerate().for_each_init(
        || (vec![0f32; t], vec![0f32; hd]),
        |(scores, acc), (ri, o_row)| {
            let (r, i) = (ri / lq, ri % lq);
            let valid = &key_valid[r];
            let visible = (past + i + 1).min(t);
            for h in 0..heads {
                let g = h / rep;
                let kbase = (r * kv_heads + g) * t * hd;
                let qrow = &qd[((r * heads + h) * lq + i) * hd..][..hd];
                let scores = &mut scores[..visible];
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = if valid[j] {
                        dot(qrow, &kd[kbase + j * hd..][..hd]) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    if *s > max {
                        max = *s;
                    }
                }
                if max == f32::NEG_INFINITY {
                    continue;
                }
                // Scores become weights in place (0 where masked).
                let sum = softmax_weights(scores, max);
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (j, &p) in scores.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let vrow = &vd[kbase + j * hd..][..hd];
                    for (a, &x) in acc.iter_mut().zip(vrow) {
                        *a += p * x;
                    }
                }
                for (o, a) in o_row[h * hd..(h + 1) * hd].iter_mut().zip(acc.iter()) {
                    *o = a / sum;
                }
            }
        },
    );
    Some(Tensor::from_data(
        TensorData::new(out, [b, lq, heads * hd]),
        &q.device(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    type TB = NdArray<f32>;

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn lm_head_matches_the_tensor_product() {
        let dev = Default::default();
        // Row counts around the 6-row tiles; columns across two parallel
        // chunks with a tail that is not a multiple of 16.
        let (v, d) = (LM_CHUNK + 301, 37);
        for n in [1, 3, 5, 6, 7, 13] {
            let a = Tensor::<TB, 2>::random([n, d], Distribution::Normal(0.0, 1.0), &dev);
            let w = Tensor::<TB, 2>::random([v, d], Distribution::Normal(0.0, 1.0), &dev);
            let rows = w.clone().into_data().to_vec::<f32>().unwrap();
            let (packed, shape) = pack_lm_head(&rows, v, d);
            assert_eq!(unpack_lm_head(&packed, v, d), rows);
            let packed = Tensor::<TB, 2>::from_data(TensorData::new(packed, shape), &dev);
            let fast = lm_head(&a, &packed, v).expect("host backend");
            let slow = a.matmul(w.transpose());
            let (f, s) = (
                fast.into_data().to_vec::<f32>().unwrap(),
                slow.into_data().to_vec::<f32>().unwrap(),
            );
            assert!(max_abs_diff(&f, &s) < 1e-4, "{n} rows");
        }
    }

    #[test]
    fn packed_rows_are_the_checkpoint_rows() {
        let dev = Default::default();
        let (v, d) = (45, 7);
        let rows: Vec<f32> = (0..v * d).map(|i| i as f32).collect();
        let (packed, shape) = pack_lm_head(&rows, v, d);
        assert_eq!(shape, [3, d * HEAD_BLOCK]);
        let packed = Tensor::<TB, 2>::from_data(TensorData::new(packed, shape), &dev);
        let ids = [44i64, 0, 17, 16, 15, 44];
        let got = packed_rows(&packed, d, &ids).expect("host backend");
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&c| rows[c as usize * d..(c as usize + 1) * d].to_vec())
            .collect();
        assert_eq!(got.into_data().to_vec::<f32>().unwrap(), want);
    }

    #[test]
    fn linear_reads_transposed_weights_and_adds_the_bias() {
        let dev = Default::default();
        // Weight held as a transposed view of [d_out, d_in] (as loaded from
        // a checkpoint) and as a contiguous tensor; with and without bias;
        // enough columns for several parallel chunks.
        for (d_in, d_out, bias) in [(5, 3, true), (37, 300, true), (16, 129, false)] {
            let w = Tensor::<TB, 2>::random([d_out, d_in], Distribution::Normal(0.0, 1.0), &dev);
            for weight in [w.clone().transpose(), w.clone().transpose().add_scalar(0.0)] {
                let lin = burn::nn::Linear {
                    weight: burn::module::Param::from_tensor(weight),
                    bias: bias.then(|| {
                        burn::module::Param::from_tensor(Tensor::<TB, 1>::random(
                            [d_out],
                            Distribution::Normal(0.0, 1.0),
                            &dev,
                        ))
                    }),
                };
                let x = Tensor::<TB, 3>::random([2, 7, d_in], Distribution::Normal(0.0, 1.0), &dev);
                let fast = linear(&x, &lin).expect("host backend");
                assert_eq!(fast.dims(), [2, 7, d_out]);
                let slow = lin.forward(x);
                let (f, s) = (
                    fast.into_data().to_vec::<f32>().unwrap(),
                    slow.into_data().to_vec::<f32>().unwrap(),
                );
                assert!(max_abs_diff(&f, &s) < 1e-4, "{d_in}x{d_out}");
            }
        }
    }

    #[test]
    fn attention_matches_masked_softmax_reference() {
        let dev = Default::default();
        let (b, heads, kvh, lq, past, hd) = (2, 4, 2, 3, 4, 8);
        let t = past + lq;
        let q = Tensor::<TB, 4>::random([b, heads, lq, hd], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<TB, 4>::random([b, kvh, t, hd], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<TB, 4>::random([b, kvh, t, hd], Distribution::Normal(0.0, 1.0), &dev);
        // Row 1 has two padded keys at the front.
        let valid = vec![vec![true; t], {
            let mut r = vec![true; t];
            r[0] = false;
            r[1] = false;
            r
        }];
        let fast = attention(&q, &k, &v, &valid, past).expect("host backend");
        let fast = fast.into_data().to_vec::<f32>().unwrap();
        // Reference with plain tensor ops, head by head.
        let rep = heads / kvh;
        let scale = 1.0 / (hd as f32).sqrt();
        for r in 0..b {
            for h in 0..heads {
                let qh = q
                    .clone()
                    .slice([r..r + 1, h..h + 1, 0..lq, 0..hd])
                    .reshape([lq, hd]);
                let g = h / rep;
                let kh = k
                    .clone()
                    .slice([r..r + 1, g..g + 1, 0..t, 0..hd])
                    .reshape([t, hd]);
                let vh = v
                    .clone()
                    .slice([r..r + 1, g..g + 1, 0..t, 0..hd])
                    .reshape([t, hd]);
                let mut mask = Vec::new();
                for i in 0..lq {
                    for (j, &ok) in valid[r].iter().enumerate() {
                        mask.push(!ok || j > past + i);
                    }
                }
                let mask = Tensor::<TB, 2, burn::tensor::Bool>::from_data(
                    TensorData::new(mask, [lq, t]),
                    &dev,
                );
                let scores = qh
                    .matmul(kh.transpose())
                    .mul_scalar(scale)
                    .mask_fill(mask, -1e30);
                let want = softmax(scores, 1)
                    .matmul(vh)
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap();
                for i in 0..lq {
                    let got = &fast[((r * lq + i) * heads + h) * hd..][..hd];
                    assert!(
                        max_abs_diff(got, &want[i * hd..][..hd]) < 1e-5,
                        "row {r} head {h} query {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_the_ndarray_f32_backend_is_host() {
        assert!(is_host::<TB>());
        assert!(!is_host::<burn::backend::Autodiff<TB>>());
    }
}
