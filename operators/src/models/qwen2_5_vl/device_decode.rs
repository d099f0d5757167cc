//! The vocabulary-row work of a decoding step on the device, for every
//! backend but the host one (CUDA, wgpu, autodiff): the logits processors
//! (repetition penalty over the prompt and the tokens generated so far,
//! end-of-sequence masking before `min_new_tokens`), the log-softmax, the
//! beam scores and the ranking run where the logits are, and only the
//! chosen ids (greedy: one per row) or each prompt's `k` best (score, index)
//! pairs (beam search) are read back. The host backend ranks on the host
//! instead ([`super::logprobs`]), where the logits already are.
//!
//! Every read of device memory goes through [`read_f32`] / [`read_ints`]
//! and is counted in a [`DecodeTraffic`].
//!
//! Numerics and order follow the host path: the penalty is HF's
//! `s * p if s < 0 else s / p`, the mask sets `-inf` after the penalty, the
//! log-softmax is `(x - max) - ln(sum(exp(x - max)))`, and ties rank the
//! lower flattened index (beam * vocab + token) first: burn's `argmax`
//! keeps the lowest coordinate on equal values (ndarray and cubecl), and the
//! `k` candidates are `k` argmax passes; the host re-sorts the `k` read back
//! by (score desc, index asc) as well.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};

use super::generate::GenerateError;

/// Where the decoding steps rank the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ranking {
    /// On the device for every backend but the host one (ndarray), which
    /// ranks in its own memory.
    #[default]
    Auto,
    /// On the host for every backend: each step reads every live row's
    /// logits back (leverflow's decoding before issue 22; kept to measure
    /// and test against).
    Host,
}

/// Device→host traffic of decoding: how many reads of device memory the
/// decoding loop made and how many bytes they carried. The host backend
/// ranks in the tensors' own memory (nothing is read back).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DecodeTraffic {
    /// Decoding steps (one per generated position of a batch).
    pub steps: u64,
    /// Reads of device memory by the host.
    pub reads: u64,
    /// Bytes read.
    pub bytes: u64,
}

impl DecodeTraffic {
    /// Adds another count to this one.
    pub fn add(&mut self, other: &DecodeTraffic) {
        self.steps += other.steps;
        self.reads += other.reads;
        self.bytes += other.bytes;
    }

    fn count(&mut self, data: &TensorData) {
        self.reads += 1;
        self.bytes += (data.num_elements() * data.dtype.size()) as u64;
    }
}

/// Reads a float tensor to the host (row-major f32), counted in `traffic`.
pub(crate) fn read_f32<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    traffic: &mut DecodeTraffic,
) -> Result<Vec<f32>, GenerateError> {
    let data = t.into_data();
    traffic.count(&data);
    data.convert::<f32>()
        .into_vec()
        .map_err(|e| GenerateError::Input(format!("reading a device tensor: {e:?}")))
}

/// Reads an int tensor to the host (row-major i64), counted in `traffic`.
pub(crate) fn read_ints<B: Backend, const D: usize>(
    t: Tensor<B, D, Int>,
    traffic: &mut DecodeTraffic,
) -> Result<Vec<i64>, GenerateError> {
    let data = t.into_data();
    traffic.count(&data);
    data.convert::<i64>()
        .into_vec()
        .map_err(|e| GenerateError::Input(format!("reading device ids: {e:?}")))
}

/// The logits processors of a batch of rows, on the device.
pub(crate) struct DeviceProcessors<B: Backend> {
    /// HF repetition penalty (1.0 = off).
    penalty: f32,
    /// [rows, vocab]: > 0 where the row's prompt or continuation holds the
    /// token; kept only when the penalty is on.
    seen: Option<Tensor<B, 2>>,
    /// [1, vocab]: true on the end-of-sequence ids.
    eos: Tensor<B, 2, Bool>,
    vocab: usize,
    device: B::Device,
}

impl<B: Backend> DeviceProcessors<B> {
    /// Processors for rows whose prompts are `input_ids` (padding included,
    /// as HF's penalty sees it).
    pub(crate) fn new(
        input_ids: &[Vec<u32>],
        penalty: f32,
        eos_ids: &[u32],
        vocab: usize,
        device: &B::Device,
    ) -> Self {
        let mut eos = vec![false; vocab];
        for &t in eos_ids {
            if let Some(e) = eos.get_mut(t as usize) {
                *e = true;
            }
        }
        let eos = Tensor::<B, 2, Bool>::from_data(TensorData::new(eos, [1, vocab]), device);
        let seen = (penalty != 1.0).then(|| seen_of(input_ids, vocab, device));
        Self {
            penalty,
            seen,
            eos,
            vocab,
            device: device.clone(),
        }
    }

    /// Keeps rows `rows` (in that order; rows may repeat) and marks `tokens`
    /// (one per kept row, or none) as seen: the processors of the next step.
    pub(crate) fn advance(&mut self, rows: &[usize], tokens: &[u32]) {
        let Some(seen) = self.seen.take() else {
            return;
        };
        let n = rows.len();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [n]),
            &self.device,
        );
        let seen = seen.select(0, idx);
        if tokens.is_empty() {
            self.seen = Some(seen);
            return;
        }
        let (cols, ones): (Vec<i64>, Vec<f32>) = tokens
            .iter()
            .map(|&t| match (t as usize) < self.vocab {
                true => (t as i64, 1.0),
                false => (0, 0.0),
            })
            .unzip();
        let cols = Tensor::<B, 2, Int>::from_data(TensorData::new(cols, [n, 1]), &self.device);
        let ones = Tensor::<B, 2>::from_data(TensorData::new(ones, [n, 1]), &self.device);
        self.seen = Some(seen.scatter(1, cols, ones, IndexingUpdateOp::Add));
    }

    /// `x` [rows, vocab] with the repetition penalty applied on seen tokens
    /// and, when `mask_eos`, the end-of-sequence ids set to `-inf`.
    pub(crate) fn apply(&self, x: Tensor<B, 2>, mask_eos: bool) -> Tensor<B, 2> {
        let [rows, vocab] = x.dims();
        let x = match &self.seen {
            Some(seen) => {
                let p = self.penalty;
                let penalised = x
                    .clone()
                    .mul_scalar(p)
                    .mask_where(x.clone().greater_equal_elem(0.0), x.clone().div_scalar(p));
                x.mask_where(seen.clone().greater_elem(0.5), penalised)
            }
            None => x,
        };
        match mask_eos {
            true => x.mask_fill(self.eos.clone().expand([rows, vocab]), f32::NEG_INFINITY),
            false => x,
        }
    }
}

/// [rows, vocab] with 1 where the row's ids hold the token.
fn seen_of<B: Backend>(input_ids: &[Vec<u32>], vocab: usize, device: &B::Device) -> Tensor<B, 2> {
    let rows = input_ids.len();
    let width = input_ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut cols = Vec::with_capacity(rows * width);
    let mut ones = Vec::with_capacity(rows * width);
    for r in input_ids {
        for j in 0..width {
            match r.get(j).filter(|&&t| (t as usize) < vocab) {
                Some(&t) => {
                    cols.push(t as i64);
                    ones.push(1f32);
                }
                None => {
                    cols.push(0);
                    ones.push(0.0);
                }
            }
        }
    }
    let cols = Tensor::<B, 2, Int>::from_data(TensorData::new(cols, [rows, width]), device);
    let ones = Tensor::<B, 2>::from_data(TensorData::new(ones, [rows, width]), device);
    Tensor::<B, 2>::zeros([rows, vocab], device).scatter(1, cols, ones, IndexingUpdateOp::Add)
}

/// Row-wise log-softmax `(x - max) - ln(sum(exp(x - max)))`, as the host
/// path computes it.
pub(crate) fn log_softmax_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let shifted = x.clone() - x.max_dim(1);
    let log_sum = shifted.clone().exp().sum_dim(1).log();
    shifted - log_sum
}

/// Columns per chunk of [`argmax_rows`]. burn 0.21's `argmax` and
/// `max_dim` on wgpu return a wrong entry for wide rows (measured on Mesa's
/// lavapipe: right for every position at 200,000 columns, wrong for the
/// maximum placed past about 2^17 at 262,143 columns and beyond), and beam
/// ranking reduces rows of beams × vocabulary (455,808 for Qwen2.5-VL at 3
/// beams): that was the beam-3 drift on wgpu.
const ARGMAX_CHUNK: usize = 1 << 16;

/// Index of every row's largest entry, the lowest index on equal values, as
/// a [rows, 1] tensor. Rows wider than [`ARGMAX_CHUNK`] are reduced in two
/// passes that no backend gets wrong: the best of each chunk, then the best
/// chunk (the lowest chunk on ties, so the tie rule holds across chunks).
pub(crate) fn argmax_rows<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2, Int> {
    let [rows, width] = x.dims();
    if width <= ARGMAX_CHUNK {
        return x.argmax(1);
    }
    let chunks = width.div_ceil(ARGMAX_CHUNK);
    let padded = chunks * ARGMAX_CHUNK;
    let x = if padded > width {
        let fill = Tensor::<B, 2>::full([rows, padded - width], f32::NEG_INFINITY, &x.device());
        Tensor::cat(vec![x, fill], 1)
    } else {
        x
    };
    let x = x.reshape([rows, chunks, ARGMAX_CHUNK]);
    let within = x.clone().argmax(2).reshape([rows, chunks]);
    let chunk = x.max_dim(2).reshape([rows, chunks]).argmax(1);
    let offset = within.gather(1, chunk.clone());
    chunk.mul_scalar(ARGMAX_CHUNK as i64) + offset
}

/// Indices of the `k` largest entries of every row, best first, the lower
/// index first on equal values: `k` argmax passes ([`argmax_rows`]), each
/// masking its pick with `-inf`. burn 0.21's `argtopk` is not used: ndarray
/// lacks it, and on wgpu it reduces the same wide rows.
fn top_k_indices<B: Backend>(x: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let [rows, _] = x.dims();
    let device = x.device();
    let minus_inf = Tensor::<B, 2>::full([rows, 1], f32::NEG_INFINITY, &device);
    let mut x = x;
    let mut picks = Vec::with_capacity(k);
    for _ in 0..k {
        let best = argmax_rows(x.clone());
        x = x.scatter(1, best.clone(), minus_inf.clone(), IndexingUpdateOp::Add);
        picks.push(best);
    }
    Tensor::cat(picks, 1)
}

/// Greedy choice of every row of `logits` [rows, vocab] after the
/// processors: one id per row read back.
pub(crate) fn greedy_choice<B: Backend>(
    logits: Tensor<B, 2>,
    processors: &DeviceProcessors<B>,
    mask_eos: bool,
    traffic: &mut DecodeTraffic,
) -> Result<Vec<u32>, GenerateError> {
    let ids = argmax_rows(processors.apply(logits, mask_eos));
    Ok(read_ints(ids, traffic)?
        .into_iter()
        .map(|t| t as u32)
        .collect())
}

/// The `k` best continuations of every prompt: `logits` holds `beams`
/// consecutive rows per prompt and `scores` each row's running beam score;
/// each prompt's candidates are ranked over its `beams * vocab` processed
/// log-probs plus beam scores. Returns, per prompt, `(score, beam * vocab +
/// token)` best first (lower index first on ties), from one read of
/// `prompts * 2k` values.
pub(crate) fn beam_candidates<B: Backend>(
    logits: Tensor<B, 2>,
    scores: &[f32],
    beams: usize,
    k: usize,
    processors: &DeviceProcessors<B>,
    mask_eos: bool,
    traffic: &mut DecodeTraffic,
) -> Result<Vec<Vec<(f32, usize)>>, GenerateError> {
    let [rows, vocab] = logits.dims();
    if rows != scores.len() || beams == 0 || rows % beams != 0 {
        return Err(GenerateError::Input(format!(
            "{rows} logit rows for {} beam scores of {beams} beams per prompt",
            scores.len()
        )));
    }
    let prompts = rows / beams;
    let width = beams * vocab;
    let k = k.min(width.saturating_sub(1)).max(1);
    let device = logits.device();
    let beam_scores =
        Tensor::<B, 2>::from_data(TensorData::new(scores.to_vec(), [rows, 1]), &device);
    let total = processors.apply(log_softmax_rows(logits), mask_eos) + beam_scores;
    let flat = total.reshape([prompts, width]);
    let idx = top_k_indices(flat.clone(), k);
    let safe = idx.clone().clamp(0, width as i64 - 1);
    let values = flat.gather(1, safe);
    // One read: indices below 2^24 are exact in f32.
    let exact = width < (1 << 24);
    let (vals, ids) = if exact {
        let both = read_f32(Tensor::cat(vec![values, idx.float()], 1), traffic)?;
        let ids = both
            .chunks(2 * k)
            .flat_map(|r| r[k..].iter().map(|&x| x as i64))
            .collect();
        let vals = both.chunks(2 * k).flat_map(|r| r[..k].to_vec()).collect();
        (vals, ids)
    } else {
        (read_f32(values, traffic)?, read_ints(idx, traffic)?)
    };
    Ok((0..prompts)
        .map(|p| {
            let mut top = (0..k)
                .map(|j| (vals[p * k + j], ids[p * k + j]))
                .filter(|&(s, i)| i >= 0 && (i as usize) < width && s > f32::NEG_INFINITY)
                .map(|(s, i)| (s, i as usize))
                .collect::<Vec<_>>();
            top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            top.dedup_by_key(|c| c.1);
            top
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// [`argmax_rows`] and [`top_k_indices`] on rows narrower and wider than
    /// a chunk, with the maximum at the start, the middle, the last column
    /// and on a tie across chunks, equal a host scan (any backend; on wgpu
    /// this is the reduction that went wrong on wide rows).
    pub(crate) fn check_wide_rows_argmax<B: Backend>(device: &B::Device) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * -20.0
        };
        for width in [1_000, ARGMAX_CHUNK, ARGMAX_CHUNK + 1, 262_143, 455_808] {
            let places = [0, width / 2, width - 1];
            let mut data: Vec<f32> = (0..places.len() * width).map(|_| next()).collect();
            for (r, &p) in places.iter().enumerate() {
                data[r * width + p] = 1.0;
            }
            // A tie: row 1's maximum again in its last column.
            data[2 * width - 1] = 1.0;
            let x = Tensor::<B, 2>::from_data(
                TensorData::new(data.clone(), [places.len(), width]),
                device,
            );
            let got: Vec<i64> = argmax_rows(x.clone())
                .into_data()
                .convert::<i64>()
                .to_vec()
                .unwrap();
            assert_eq!(
                got,
                vec![0, (width / 2) as i64, (width - 1) as i64],
                "width {width}"
            );
            let top: Vec<i64> = top_k_indices(x, 3)
                .into_data()
                .convert::<i64>()
                .to_vec()
                .unwrap();
            for (r, row) in data.chunks(width).enumerate() {
                let mut order: Vec<usize> = (0..width).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                let want: Vec<i64> = order[..3].iter().map(|&i| i as i64).collect();
                assert_eq!(top[r * 3..r * 3 + 3], want[..], "width {width} row {r}");
            }
        }
    }

    #[test]
    fn wide_rows_argmax() {
        check_wide_rows_argmax::<burn::backend::NdArray<f32>>(&Default::default());
    }
}
