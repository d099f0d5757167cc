//! The CPU kernels of the pointer selector: row-wise normalisation, softmax,
//! layer norm and block copies over host `f32` buffers, and the f64
//! log-softmax the candidate scores use.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

pub(super) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // f32 is always representable after `convert`; an error here would be a
    // backend bug, so fall back to an empty vector (callers check lengths).
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

pub(super) fn tensor2<B: Backend>(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// `x / max(||x||, 1e-12)` per row (F.normalize).
pub(super) fn normalize_rows(x: &mut [f32], cols: usize) {
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

pub(super) fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Row-wise softmax in place (f32 values, f64 sum).
pub(super) fn softmax_rows(x: &mut [f32], cols: usize) {
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
pub(super) fn layer_norm_rows(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f64) {
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
pub(super) fn transpose_cols(x: &[f32], r: usize, stride: usize, c0: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; w * r];
    for i in 0..r {
        for j in 0..w {
            out[j * r + i] = x[i * stride + c0 + j];
        }
    }
    out
}

pub(super) fn cols_block(x: &[f32], r: usize, stride: usize, c0: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(r * w);
    for i in 0..r {
        out.extend_from_slice(&x[i * stride + c0..i * stride + c0 + w]);
    }
    out
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
