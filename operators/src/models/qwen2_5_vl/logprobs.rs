//! Vocabulary-row work of decoding, on the host: log-softmax statistics,
//! the logits processors (repetition penalty, end-of-sequence masking) and
//! the ranking of candidates, without copying or rewriting a row.
//!
//! Every decoding step scores every live row over the whole vocabulary
//! (151,936 entries for Qwen2.5), and none of it is shared between rows, so
//! this is the part of decoding that batching cannot amortise. A row is read
//! three times: the maximum, the sum of `exp(x - max)`, and one ranking scan
//! that skips 64-entry blocks which cannot enter the top k (once the top k's
//! floor is an entry of the row, by one vectorised max and a comparison of
//! raw values). The few entries a
//! processor changes are passed as a sorted list of `(token, new value)` and
//! ranked separately instead of editing a copy of the row.
//!
//! The exponential is a branch-free polynomial (Cephes-style range reduction
//! to `[-ln2/2, ln2/2]`, about 1 ulp) so the sum vectorises; the sum is
//! accumulated in f64 over 8 fixed lanes, so the result does not depend on
//! the instruction set the loop is compiled for. Attention's softmax weights
//! ([`softmax_weights`]) use the same exponential.

/// Lanes of the vectorised loops (fixed, so sums add in the same order on
/// every machine).
const LANES: usize = 8;

/// Entries per block of the ranking scan: a block whose maximum cannot
/// enter the top k is skipped after one vectorised max.
const SCAN_BLOCK: usize = 64;

/// `exp(x)` for `x <= 0`, clamped below at -87 (where `exp` leaves the
/// normal f32 range; such terms are negligible next to the maximum's 1).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let n = t.to_bits() as i32 - SHIFT.to_bits() as i32;
    e * f32::from_bits(((n + 127) as u32) << 23)
}

#[inline(always)]
fn max_generic(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in tail {
        m = m.max(x);
    }
    m
}

#[inline(always)]
fn exp_sum_generic(row: &[f32], max: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        let mut e = [0f32; LANES];
        for (e, &x) in e.iter_mut().zip(c) {
            *e = exp_nonpositive(x - max);
        }
        for (a, &e) in acc.iter_mut().zip(&e) {
            *a += e as f64;
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a += exp_nonpositive(x - max) as f64;
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn max_avx2(row: &[f32]) -> f32 {
    max_generic(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_sum_avx2(row: &[f32], max: f32) -> f64 {
    exp_sum_generic(row, max)
}

#[inline(always)]
fn softmax_weights_generic(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp_nonpositive(*x - max);
            *x = if *x == f32::NEG_INFINITY { 0.0 } else { e };
            *a += *x;
        }
    }
    for (a, x) in acc.iter_mut().zip(chunks.into_remainder()) {
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            exp_nonpositive(*x - max)
        };
        *a += *x;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_weights_avx2(xs: &mut [f32], max: f32) -> f32 {
    softmax_weights_generic(xs, max)
}

/// Replaces every score `x` (all `<= max`; -inf = masked) by its unnormalised
/// softmax weight `exp(x - max)` (0 where masked) and returns their sum:
/// the exponentials of one attention row, vectorised, summed over 8 fixed
/// lanes so the result does not depend on the instruction set.
pub(crate) fn softmax_weights(xs: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { softmax_weights_avx2(xs, max) };
    }
    softmax_weights_generic(xs, max)
}

/// Maximum and `ln(sum(exp(x - max)))` of one row: `x - max - log_sum` is
/// its log-softmax, as float32 `log_softmax` computes it.
pub(crate) fn row_stats(row: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        let (max, sum) = unsafe {
            let max = max_avx2(row);
            (max, exp_sum_avx2(row, max))
        };
        return (max, sum.ln() as f32);
    }
    let max = max_generic(row);
    (max, exp_sum_generic(row, max).ln() as f32)
}

/// Log-softmax of entry `x` of a row with statistics `(max, log_sum)`.
#[inline(always)]
pub(crate) fn log_prob(x: f32, max: f32, log_sum: f32) -> f32 {
    x - max - log_sum
}

/// HF's repetition penalty on one score: `s * p` if `s < 0` else `s / p`.
#[inline]
pub(crate) fn penalize(s: f32, penalty: f32) -> f32 {
    if s < 0.0 {
        s * penalty
    } else {
        s / penalty
    }
}

/// The entries the logits processors change in a row: every token in
/// `seen` gets `penalize(value(t))` when `penalty != 1`, and every token in
/// `masked` gets -inf. Sorted by token, without duplicates; tokens outside
/// the row are ignored. `value` maps a token to its unprocessed score.
pub(crate) fn processed_entries(
    vocab: usize,
    seen: &[u32],
    penalty: f32,
    masked: &[u32],
    value: impl Fn(usize) -> f32,
) -> Vec<(usize, f32)> {
    let mut out: Vec<(usize, f32)> = Vec::new();
    if penalty != 1.0 {
        out.extend(
            seen.iter()
                .map(|&t| t as usize)
                .filter(|&t| t < vocab)
                .map(|t| (t, penalize(value(t), penalty))),
        );
    }
    out.extend(
        masked
            .iter()
            .map(|&t| t as usize)
            .filter(|&t| t < vocab)
            .map(|t| (t, f32::NEG_INFINITY)),
    );
    // Stable sort, then keep the last entry of a token: the mask wins over
    // the penalty, as it is applied after it.
    out.sort_by_key(|&(t, _)| t);
    let mut dedup: Vec<(usize, f32)> = Vec::with_capacity(out.len());
    for e in out {
        match dedup.last_mut() {
            Some(last) if last.0 == e.0 => *last = e,
            _ => dedup.push(e),
        }
    }
    dedup
}

/// The `k` best (value, index) pairs: higher value first, and on equal
/// values the lower index first (`torch.topk`'s order in practice).
#[derive(Debug)]
pub(crate) struct TopK {
    k: usize,
    /// Best first.
    pub(crate) items: Vec<(f32, usize)>,
}

impl TopK {
    /// An empty selection of at most `k` items.
    pub(crate) fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    /// The value an item must beat to enter (when full).
    #[inline(always)]
    fn floor(&self) -> Option<f32> {
        if self.items.len() == self.k {
            self.items.last().map(|&(v, _)| v)
        } else {
            None
        }
    }

    /// Offers one item.
    #[inline]
    pub(crate) fn push(&mut self, v: f32, idx: usize) {
        let better = |a: (f32, usize), b: (f32, usize)| a.0 > b.0 || (a.0 == b.0 && a.1 < b.1);
        if self.items.len() == self.k {
            match self.items.last() {
                Some(&worst) if better((v, idx), worst) => {}
                _ => return,
            }
        }
        let pos = self.items.partition_point(|&it| better(it, (v, idx)));
        self.items.insert(pos, (v, idx));
        self.items.truncate(self.k);
    }

    /// The raw entry of `row` (indices `base + t`) that holds the floor, when
    /// the floor is an entry of `row` offered as `f(row[t])`: every entry
    /// `x <= raw` has `f(x) <= floor`, since `f` is non-decreasing.
    #[inline]
    fn raw_floor(&self, row: &[f32], base: usize, f: &impl Fn(f32) -> f32) -> Option<f32> {
        let floor = self.floor()?;
        let &(_, idx) = self.items.last()?;
        let raw = *row.get(idx.checked_sub(base)?)?;
        (f(raw) <= floor).then_some(raw)
    }

    /// Offers `f(row[t])` with index `base + t` for every `t` in `range`,
    /// where `f` is non-decreasing. Entries must come in increasing index
    /// order and after every item already held (so an equal value never
    /// wins). Blocks of [`SCAN_BLOCK`] entries whose maximum cannot enter
    /// are skipped: once the floor is an entry of this row, the test is a
    /// comparison of raw values, so a skipped block costs one vectorised
    /// max. The entries offered, and so the result, are those of offering
    /// every entry one by one.
    #[inline]
    fn push_monotone(
        &mut self,
        row: &[f32],
        range: std::ops::Range<usize>,
        base: usize,
        f: &impl Fn(f32) -> f32,
    ) {
        let mut raw_floor = self.raw_floor(row, base, f);
        let mut t = range.start;
        while t < range.end {
            let stop = (t + SCAN_BLOCK).min(range.end);
            let block = &row[t..stop];
            if let Some(floor) = self.floor() {
                let m = max_generic(block);
                let skip = match raw_floor {
                    Some(raw) => m <= raw,
                    None => {
                        let fm = f(m);
                        fm <= floor || fm.is_nan()
                    }
                };
                if skip {
                    t = stop;
                    continue;
                }
            }
            for (i, &x) in block.iter().enumerate() {
                let v = f(x);
                match self.floor() {
                    Some(floor) if v <= floor || v.is_nan() => {}
                    _ => {
                        self.push(v, base + t + i);
                        raw_floor = self.raw_floor(row, base, f);
                    }
                }
            }
            t = stop;
        }
    }

    /// Offers a whole row: entry `t` as `f(row[t])` (with `f` non-decreasing)
    /// unless `processed` holds `t`, in which case `g(processed value)`;
    /// indices are `base + t`. `base` must exceed every held index.
    pub(crate) fn push_row(
        &mut self,
        row: &[f32],
        processed: &[(usize, f32)],
        base: usize,
        f: impl Fn(f32) -> f32,
        g: impl Fn(f32) -> f32,
    ) {
        let mut start = 0;
        for &(t, _) in processed {
            if t > start {
                self.push_monotone(row, start..t.min(row.len()), base, &f);
            }
            start = t + 1;
        }
        if start < row.len() {
            self.push_monotone(row, start..row.len(), base, &f);
        }
        for &(t, v) in processed {
            self.push(g(v), base + t);
        }
    }
}

/// First index of the maximum of a row whose entries in `processed` are
/// replaced by their processed values (NaN never wins).
pub(crate) fn argmax_processed(row: &[f32], processed: &[(usize, f32)]) -> usize {
    let mut best: Option<(f32, usize)> = None;
    let mut offer = |v: f32, i: usize| {
        if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
            best = Some((v, i));
        }
    };
    let mut start = 0;
    for &(t, v) in processed {
        for (i, &x) in row[start..t.max(start)].iter().enumerate() {
            offer(x, start + i);
        }
        offer(v, t);
        start = t + 1;
    }
    for (i, &x) in row.get(start..).unwrap_or(&[]).iter().enumerate() {
        offer(x, start + i);
    }
    best.map_or(0, |(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_stats(row: &[f32]) -> (f32, f32) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
        (max, sum.ln() as f32)
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let got = exp_nonpositive(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn row_stats_match_a_plain_f64_log_softmax() {
        let row: Vec<f32> = (0..151_939)
            .map(|i| ((i * 7919) % 10007) as f32 * 0.003 - 12.0)
            .collect();
        let (m, l) = row_stats(&row);
        let (rm, rl) = reference_stats(&row);
        assert_eq!(m, rm);
        assert!(
            (l - rl).abs() <= 2.0 * f32::EPSILON * rl.abs(),
            "{l} vs {rl}"
        );
        // The generic and the dispatched loops agree bit for bit.
        assert_eq!(exp_sum_generic(&row, m).ln() as f32, l);
    }

    #[test]
    fn topk_prefers_lower_index_on_ties() {
        let mut t = TopK::new(3);
        for (i, v) in [1.0f32, 3.0, 3.0, 2.0, 3.0, 0.5].iter().enumerate() {
            t.push(*v, i);
        }
        assert_eq!(t.items, vec![(3.0, 1), (3.0, 2), (3.0, 4)]);
        // Order of offers does not matter.
        let mut u = TopK::new(3);
        for (i, v) in [1.0f32, 3.0, 3.0, 2.0, 3.0, 0.5].iter().enumerate().rev() {
            u.push(*v, i);
        }
        assert_eq!(u.items, t.items);
    }

    #[test]
    fn push_row_equals_ranking_a_processed_copy() {
        let v = 1000;
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..v)
                    .map(|i| (((i * 31 + r * 17) % 97) as f32 * 0.1).sin() * 5.0)
                    .collect()
            })
            .collect();
        let seen = [5u32, 96, 97, 400, 999, 5000];
        let masked = [96u32, 3];
        let scores = [0.0f32, -1.5, -2.25];
        let mut fast = TopK::new(6);
        let mut slow = TopK::new(6);
        for (j, row) in rows.iter().enumerate() {
            let (max, ls) = row_stats(row);
            let lp = |x: f32| log_prob(x, max, ls);
            let entries = processed_entries(v, &seen, 1.05, &masked, |t| lp(row[t]));
            fast.push_row(
                row,
                &entries,
                j * v,
                |x| lp(x) + scores[j],
                |p| p + scores[j],
            );
            // Reference: process a copy, then offer everything in order.
            let mut copy: Vec<f32> = row.iter().map(|&x| lp(x)).collect();
            for &t in &seen {
                if let Some(s) = copy.get_mut(t as usize) {
                    *s = penalize(*s, 1.05);
                }
            }
            for &t in &masked {
                copy[t as usize] = f32::NEG_INFINITY;
            }
            for (t, &s) in copy.iter().enumerate() {
                slow.push(s + scores[j], j * v + t);
            }
        }
        assert_eq!(fast.items, slow.items);
    }

    #[test]
    fn block_skipping_scan_equals_offering_every_entry() {
        // Long rows (many skipped blocks), coarse values (exact ties), beam
        // scores that make f collapse distinct entries into equal values
        // (-1e9: every entry rounds to the same score), processed entries
        // inside blocks, and one TopK shared by all rows as in a merge.
        let v = 20_003;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..v)
                    .map(|i| match r {
                        0 => ((i * 7919 + 13) % 1009) as f32 * 0.01 - 5.0,
                        1 => ((i * 31) % 17) as f32,
                        _ => (((i * 131 + r * 7) % 4001) as f32 * 0.37).sin() * 3.0,
                    })
                    .collect()
            })
            .collect();
        let seen = [0u32, 64, 127, 128, 5000, 20_002];
        let scores = [0.0f32, -1.0e9, -3.7, -1.0e-3];
        for k in [1usize, 6, 9, 70] {
            let mut fast = TopK::new(k);
            let mut slow = TopK::new(k);
            for (j, row) in rows.iter().enumerate() {
                let (max, ls) = row_stats(row);
                let lp = |x: f32| log_prob(x, max, ls);
                let entries = processed_entries(v, &seen, 1.05, &[], |t| lp(row[t]));
                let f = |x: f32| lp(x) + scores[j];
                fast.push_row(row, &entries, j * v, f, |p| p + scores[j]);
                let mut fresh = TopK::new(k);
                fresh.push_row(row, &entries, j * v, f, |p| p + scores[j]);
                let mut alone = TopK::new(k);
                for (t, &x) in row.iter().enumerate() {
                    let s = match entries.binary_search_by_key(&t, |e| e.0) {
                        Ok(e) => entries[e].1 + scores[j],
                        Err(_) => f(x),
                    };
                    slow.push(s, j * v + t);
                    alone.push(s, j * v + t);
                }
                assert_eq!(fresh.items, alone.items, "row {j}, k {k}");
            }
            assert_eq!(fast.items, slow.items, "k {k}");
        }
    }

    #[test]
    fn softmax_weights_are_the_shifted_exponentials() {
        let mut xs: Vec<f32> = (0..37).map(|i| -(i as f32) * 0.7).collect();
        xs[5] = f32::NEG_INFINITY;
        xs[36] = f32::NEG_INFINITY;
        let want: Vec<f64> = xs.iter().map(|&x| ((x as f64) - 0.5).exp()).collect();
        let mut generic = xs.clone();
        let sum = softmax_weights(&mut xs, 0.5);
        let generic_sum = softmax_weights_generic(&mut generic, 0.5);
        assert_eq!((sum, &xs), (generic_sum, &generic));
        assert_eq!((xs[5], xs[36]), (0.0, 0.0));
        for (&got, &w) in xs.iter().zip(&want) {
            assert!(
                (got as f64 - w).abs() <= 3e-7 * w.max(1e-30),
                "{got} vs {w}"
            );
        }
        let total: f64 = want.iter().sum();
        assert!((sum as f64 - total).abs() < 1e-6 * total);
    }

    #[test]
    fn argmax_sees_processed_values() {
        let row = [1.0f32, 5.0, 5.0, 2.0];
        assert_eq!(argmax_processed(&row, &[]), 1);
        assert_eq!(argmax_processed(&row, &[(1, 0.0)]), 2);
        assert_eq!(
            argmax_processed(&row, &[(0, 9.0), (2, f32::NEG_INFINITY)]),
            0
        );
        assert_eq!(argmax_processed(&row, &[(3, 5.0)]), 1);
    }
}
