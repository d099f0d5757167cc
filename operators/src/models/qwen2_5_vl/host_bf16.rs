//! bf16 weights on the CPU host path.
//!
//! A bf16 checkpoint loaded on the ndarray backend keeps its matrices in
//! bf16: each one is a float tensor of the backend whose storage holds the
//! checkpoint's 16-bit words (ndarray's `u16` storage), so the model holds
//! half the bytes an f32 copy would. Only the host kernels read these
//! tensors: [`linear`] widens a block of weight rows to f32 (exact: bf16 is
//! the top half of an f32) and multiplies it with the same `sgemm` the f32
//! path uses, so the results are bit for bit those of an f32 copy; the LM
//! head kernel (`host::lm_head`) widens in registers; [`gather_rows`] reads
//! embedding rows one by one. Every other backend loads f32 tensors as
//! before, and nothing outside the host kernels ever sees a bf16 tensor.

use std::any::Any;

use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::{backend::Backend, Tensor, TensorData, TensorPrimitive};
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;

use super::host::is_host;

/// bf16 bits widened to f32 (exact).
#[inline(always)]
pub(crate) fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// A zero-copy handle on the bf16 words of a host tensor built by
/// [`bf16_tensor`] or [`bf16_linear_weight`].
pub(crate) struct HostBf16(NdArrayTensor);

impl HostBf16 {
    /// The bf16 storage of `t`, or `None` when `t` is not a host tensor
    /// holding bf16 words.
    pub(crate) fn of<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Self> {
        match super::host::ndarray_storage(t)? {
            inner @ NdArrayTensor::U16(_) => Some(Self(inner)),
            _ => None,
        }
    }

    /// The words, with the tensor's shape and strides.
    pub(crate) fn view(&self) -> ArrayViewD<'_, u16> {
        match &self.0 {
            NdArrayTensor::U16(storage) => storage.view(),
            // `of` only builds U16 handles.
            _ => unreachable!("HostBf16 holds u16 words"),
        }
    }
}

/// A host float tensor of `B` holding `array`'s bf16 words, or `None` when
/// `B` is not the host backend.
fn host_tensor<B: Backend, const D: usize>(array: ArrayD<u16>) -> Option<Tensor<B, D>> {
    if !is_host::<B>() || array.ndim() != D {
        return None;
    }
    let prim: Box<dyn Any> = Box::new(NdArrayTensor::from(array.into_shared()));
    let p = prim.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*p)))
}

/// A host tensor of shape `shape` holding `bits` (bf16, row-major), or
/// `None` off the host backend or when the sizes disagree.
pub(crate) fn bf16_tensor<B: Backend, const D: usize>(
    bits: Vec<u16>,
    shape: [usize; D],
) -> Option<Tensor<B, D>> {
    host_tensor(ArrayD::from_shape_vec(IxDyn(&shape), bits).ok()?)
}

/// The weight of a burn `Linear` ([d_in, d_out]) as a transposed view of
/// the checkpoint's `bits` ([d_out, d_in], row-major), held in bf16; `None`
/// off the host backend or when the sizes disagree.
pub(crate) fn bf16_linear_weight<B: Backend>(
    bits: Vec<u16>,
    d_out: usize,
    d_in: usize,
) -> Option<Tensor<B, 2>> {
    let rows = ArrayD::from_shape_vec(IxDyn(&[d_out, d_in]), bits).ok()?;
    host_tensor(rows.reversed_axes())
}

/// The checkpoint-layout words [d_out, d_in] of a linear weight built by
/// [`bf16_linear_weight`] (a borrowed slice), with (d_in, d_out).
fn linear_rows<'a>(w: &'a ArrayViewD<'a, u16>) -> Option<(&'a [u16], usize, usize)> {
    let (&[d_in, d_out], &[1, rs]) = (w.shape(), w.strides()) else {
        return None;
    };
    if rs != d_in as isize && d_out > 1 {
        return None;
    }
    let len = d_in.checked_mul(d_out)?;
    // SAFETY: the view is the transposed view of a contiguous row-major
    // [d_out, d_in] array (strides (1, d_in)), so its `len` words start at
    // its pointer and are borrowed for the view's lifetime.
    Some((
        unsafe { std::slice::from_raw_parts(w.as_ptr(), len) },
        d_in,
        d_out,
    ))
}

/// Weight rows widened per parallel task of [`linear`]: a panel of
/// `PANEL_ROWS × d_in` floats, 2.8 MB at the 3B's widest input (11,008),
/// small enough to stay in cache while `sgemm` reads it.
const PANEL_ROWS: usize = 64;

/// `xs` [n, d_in] · Wᵀ + bias -> [n, d_out] where `w` is a bf16 weight
/// built by [`bf16_linear_weight`]. Column blocks of `PANEL_ROWS` weight
/// rows are widened to f32 and multiplied with `sgemm` in parallel, one
/// block per task; each output element's sum runs in the same order as
/// with an f32 copy of the weight. `None` when `w` is not such a weight or
/// the sizes disagree.
pub(crate) fn linear(
    xs: &[f32],
    n: usize,
    w: &HostBf16,
    bias: Option<&[f32]>,
) -> Option<(Vec<f32>, usize)> {
    let view = w.view();
    let (rows, d_in, d_out) = linear_rows(&view)?;
    if xs.len() != n.checked_mul(d_in)? || bias.is_some_and(|b| b.len() != d_out) {
        return None;
    }
    let mut out = vec![0f32; n * d_out];
    let ptr = SharedOut(out.as_mut_ptr());
    let blocks: Vec<usize> = (0..d_out).step_by(PANEL_ROWS).collect();
    blocks.par_iter().for_each_init(
        || Vec::with_capacity(PANEL_ROWS * d_in),
        |panel, &c0| {
            let c1 = (c0 + PANEL_ROWS).min(d_out);
            panel.clear();
            panel.extend(rows[c0 * d_in..c1 * d_in].iter().map(|&b| widen(b)));
            // SAFETY: `panel` holds rows c0..c1 of W, row-major [c1 - c0,
            // d_in], read as the [d_in, c1 - c0] matrix Wᵀ (strides 1,
            // d_in); `xs` holds [n, d_in] row-major; the output block is
            // columns c0..c1 of `out` [n, d_out], written by no other task.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    d_in,
                    c1 - c0,
                    1.0,
                    xs.as_ptr(),
                    d_in as isize,
                    1,
                    panel.as_ptr(),
                    1,
                    d_in as isize,
                    0.0,
                    ptr.get().add(c0),
                    d_out as isize,
                    1,
                );
            }
        },
    );
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(d_out) {
            for (o, &bb) in row.iter_mut().zip(b) {
                *o += bb;
            }
        }
    }
    Some((out, d_out))
}

/// The output pointer of [`linear`], shared by tasks that write disjoint
/// columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
impl SharedOut {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: tasks write disjoint elements of a buffer that outlives them.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// Rows `ids` of the row-major bf16 table `table` [v, d], widened:
/// [ids.len(), d]. `None` when `table` holds no bf16 words, is not [v, d]
/// row-major, or an id is out of range.
pub(crate) fn gather_rows<B: Backend>(table: &Tensor<B, 2>, ids: &[i64]) -> Option<Tensor<B, 2>> {
    let h = HostBf16::of(table)?;
    let view = h.view();
    let &[v, d] = view.shape() else {
        return None;
    };
    let words = view.to_slice()?;
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let r = usize::try_from(id).ok().filter(|&r| r < v)?;
        out.extend(words[r * d..(r + 1) * d].iter().map(|&b| widen(b)));
    }
    Some(Tensor::from_data(
        TensorData::new(out, [ids.len(), d]),
        &table.device(),
    ))
}

/// `t` as an f32 tensor: a widened copy when it holds bf16 words, else
/// `t` itself (for exporting weights, never on the forward path).
pub(crate) fn widened<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    let Some(h) = HostBf16::of(&t) else {
        return t;
    };
    let view = h.view();
    let shape = t.dims();
    let values: Vec<f32> = view.iter().map(|&b| widen(b)).collect();
    // `iter` walks the logical (row-major) order, whatever the strides.
    Tensor::from_data(TensorData::new(values, shape), &t.device())
}

/// Bytes of host storage behind `t` and whether they are bf16 words
/// (`(bytes, true)`), f32 (`(bytes, false)`), or `None` off the host (the
/// tests' measure of what a loaded model holds).
#[cfg(test)]
pub(crate) fn storage_bytes<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<(usize, bool)> {
    if let Some(h) = HostBf16::of(t) {
        return Some((h.view().len() * 2, true));
    }
    let f = super::host::HostF32::of(t)?;
    Some((f.view().len() * 4, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type TB = NdArray<f32>;

    fn bf16_bits(values: &[f32]) -> Vec<u16> {
        values
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect()
    }

    #[test]
    fn widening_is_exact() {
        for x in [0.0f32, -0.0, 1.0, -3.5, 1e-30, 6.5e4, f32::INFINITY] {
            let b = half::bf16::from_f32(x);
            assert_eq!(widen(b.to_bits()).to_bits(), b.to_f32().to_bits());
        }
    }

    #[test]
    fn bf16_linear_equals_the_f32_copy_bit_for_bit() {
        let dev = Default::default();
        for (n, d_in, d_out, bias) in [(1, 5, 3, true), (7, 37, 300, true), (13, 16, 129, false)] {
            let w = Tensor::<TB, 2>::random([d_out, d_in], Distribution::Normal(0.0, 1.0), &dev);
            let bits = bf16_bits(&w.into_data().to_vec::<f32>().unwrap());
            let wide: Vec<f32> = bits.iter().map(|&b| widen(b)).collect();
            let b = bias.then(|| {
                burn::module::Param::from_tensor(Tensor::<TB, 1>::random(
                    [d_out],
                    Distribution::Normal(0.0, 1.0),
                    &dev,
                ))
            });
            let half_lin = burn::nn::Linear {
                weight: burn::module::Param::from_tensor(
                    bf16_linear_weight::<TB>(bits, d_out, d_in).unwrap(),
                ),
                bias: b.clone(),
            };
            let f32_lin = burn::nn::Linear {
                weight: burn::module::Param::from_tensor(
                    Tensor::<TB, 2>::from_data(TensorData::new(wide, [d_out, d_in]), &dev)
                        .transpose(),
                ),
                bias: b,
            };
            assert_eq!(half_lin.weight.val().dims(), [d_in, d_out]);
            let x = Tensor::<TB, 3>::random([1, n, d_in], Distribution::Normal(0.0, 1.0), &dev);
            let got = super::super::host::linear(&x, &half_lin).expect("bf16 host path");
            let want = super::super::host::linear(&x, &f32_lin).expect("f32 host path");
            assert_eq!(
                got.into_data().to_vec::<f32>().unwrap(),
                want.into_data().to_vec::<f32>().unwrap(),
                "{n}x{d_in}x{d_out}"
            );
            assert_eq!(
                storage_bytes(&half_lin.weight.val()),
                Some((d_in * d_out * 2, true))
            );
        }
    }

    #[test]
    fn rows_and_widened_copies_read_the_words() {
        let dev = Default::default();
        let values: Vec<f32> = (0..15).map(|i| i as f32 * 0.5).collect();
        let t = bf16_tensor::<TB, 2>(bf16_bits(&values), [5, 3]).unwrap();
        let rows = gather_rows(&t, &[4, 0, 4]).unwrap();
        let want: Vec<f32> = [6.0, 6.5, 7.0, 0.0, 0.5, 1.0, 6.0, 6.5, 7.0].to_vec();
        assert_eq!(rows.into_data().to_vec::<f32>().unwrap(), want);
        assert!(gather_rows(&t, &[5]).is_none());
        assert_eq!(widened(t).into_data().to_vec::<f32>().unwrap(), values);
        // Off bf16 storage nothing changes.
        let f = Tensor::<TB, 2>::zeros([2, 2], &dev);
        assert!(gather_rows(&f, &[0]).is_none());
        assert_eq!(storage_bytes(&f), Some((16, false)));
    }
}
