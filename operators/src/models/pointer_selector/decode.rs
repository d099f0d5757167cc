//! Running the model over a prepared pool: initial query states, the logits
//! of a step, the gate update after a choice, teacher-forced logits and
//! sequence log-probabilities, greedy decoding.

use burn::tensor::backend::Backend;

use super::host::*;
use super::{
    GreedyOutput, PointerSelector, PointerSelectorError, PreparedPool, QueryStates, Result,
};

impl<B: Backend> PointerSelector<B> {
    /// Initial query states (after the cross-attention layers, `query_proj`
    /// and normalisation) for a batch of queries over one pool.
    pub fn query_states(&self, pool: &PreparedPool<B>, queries: &[&[f32]]) -> Result<QueryStates> {
        let mut flat = Vec::with_capacity(queries.len() * self.d_model);
        for (i, q) in queries.iter().enumerate() {
            self.check_dim(&format!("query {i}"), q.len())?;
            flat.extend_from_slice(q);
        }
        let b = queries.len();
        let device = self.device();
        let (h, nh, k) = (self.hidden_dim, self.num_heads, pool.k);
        let hd = h / nh;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let mut qh = self.project(flat, b);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut q = self.linear_host(&layer.q, qh.clone(), b);
            for v in q.iter_mut() {
                *v *= scale;
            }
            let mut a = vec![0f32; b * h];
            for hh in 0..nh {
                let qhd = cols_block(&q, b, h, hh * hd, hd);
                let mut p =
                    host(tensor2::<B>(qhd, b, hd, &device).matmul(pool.keys_t[l][hh].clone()));
                softmax_rows(&mut p, k);
                let ah = host(tensor2::<B>(p, b, k, &device).matmul(pool.values[l][hh].clone()));
                for i in 0..b {
                    a[i * h + hh * hd..i * h + (hh + 1) * hd]
                        .copy_from_slice(&ah[i * hd..(i + 1) * hd]);
                }
            }
            let mut a = self.linear_host(&layer.out, a, b);
            for (x, r) in a.iter_mut().zip(&qh) {
                *x += r;
            }
            let norm = &self.norms[l];
            let gamma = host(norm.gamma.val());
            let beta = norm
                .beta
                .as_ref()
                .map(|b| host(b.val()))
                .unwrap_or_else(|| vec![0.0; h]);
            layer_norm_rows(&mut a, &gamma, &beta, self.layer_norm_eps);
            qh = a;
        }
        let mut st = self.linear_host(&self.query_proj, qh, b);
        normalize_rows(&mut st, h);
        Ok(QueryStates {
            rows: b,
            cols: h,
            data: st,
        })
    }

    /// Unmasked step logits `states · c_normᵀ / temperature`, row-major
    /// `[M, K]` on the host.
    pub fn step_logits(&self, pool: &PreparedPool<B>, states: &QueryStates) -> Vec<f32> {
        if states.rows == 0 {
            return vec![];
        }
        let t = tensor2::<B>(
            states.data.clone(),
            states.rows,
            states.cols,
            &self.device(),
        );
        let mut y = host(t.matmul(pool.c_norm_t.clone()));
        let temp = self.temperature as f32;
        for v in y.iter_mut() {
            *v /= temp;
        }
        y
    }

    /// Gate update after choosing `chosen[i]` for row `parents[i]` of
    /// `states`: `q' = normalize(g*q + (1-g)*c_norm[chosen])` with
    /// `g = sigmoid(W[q, c_norm[chosen]] + b)`.
    pub fn gate_update(
        &self,
        pool: &PreparedPool<B>,
        states: &QueryStates,
        parents: &[usize],
        chosen: &[usize],
    ) -> Result<QueryStates> {
        let h = self.hidden_dim;
        let m = chosen.len();
        if parents.len() != m {
            return Err(PointerSelectorError::Input(format!(
                "{} parents for {m} chosen indices",
                parents.len()
            )));
        }
        let mut cat = Vec::with_capacity(m * 2 * h);
        for (&p, &c) in parents.iter().zip(chosen) {
            if c >= pool.k || p >= states.rows {
                return Err(PointerSelectorError::Input(format!(
                    "index {c} (row {p}) out of range for a pool of {} candidates / {} states",
                    pool.k, states.rows
                )));
            }
            cat.extend_from_slice(&states.data[p * h..(p + 1) * h]);
            cat.extend_from_slice(&pool.c_norm_host[c * h..(c + 1) * h]);
        }
        if m == 0 {
            return Ok(QueryStates {
                rows: 0,
                cols: h,
                data: vec![],
            });
        }
        let g = self.linear_host(&self.gate, cat.clone(), m);
        let mut out = vec![0f32; m * h];
        for i in 0..m {
            for j in 0..h {
                let gv = 1.0 / (1.0 + (-g[i * h + j]).exp());
                let q = cat[i * 2 * h + j];
                let c = cat[i * 2 * h + h + j];
                out[i * h + j] = gv * q + (1.0 - gv) * c;
            }
        }
        normalize_rows(&mut out, h);
        Ok(QueryStates {
            rows: m,
            cols: h,
            data: out,
        })
    }

    /// Teacher-forced logits (forward() with labels) for several label
    /// sequences of queries over one pool, in one batch: `[seq][step][K]`,
    /// chosen positions at -100, no exclusion.
    pub fn teacher_forced_logits_batch(
        &self,
        pool: &PreparedPool<B>,
        queries: &[&[f32]],
        labels: &[Vec<usize>],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if queries.len() != labels.len() {
            return Err(PointerSelectorError::Input(format!(
                "{} queries but {} label sequences",
                queries.len(),
                labels.len()
            )));
        }
        let k = pool.k;
        for (i, ls) in labels.iter().enumerate() {
            if let Some(&bad) = ls.iter().find(|&&l| l >= k) {
                return Err(PointerSelectorError::Input(format!(
                    "label {bad} of sequence {i} out of range for a pool of {k} candidates"
                )));
            }
        }
        let steps = labels.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); labels.len()];
        let mut states = self.query_states(pool, queries)?;
        let mut alive: Vec<usize> = (0..labels.len()).collect();
        for s in 0..steps {
            alive.retain(|&i| labels[i].len() > s);
            let rows: Vec<usize> = if s == 0 {
                alive.clone()
            } else {
                (0..alive.len()).collect()
            };
            if s == 0 {
                states = states.select(&rows);
            }
            let logits = self.step_logits(pool, &states);
            for (r, &i) in alive.iter().enumerate() {
                let mut row = logits[r * k..(r + 1) * k].to_vec();
                for &c in &labels[i][..s] {
                    row[c] = self.mask_value as f32;
                }
                out[i].push(row);
            }
            let next: Vec<usize> = alive.iter().map(|&i| labels[i][s]).collect();
            // keep only rows that continue past this step
            let keep: Vec<usize> = alive
                .iter()
                .enumerate()
                .filter(|(_, &i)| labels[i].len() > s + 1)
                .map(|(r, _)| r)
                .collect();
            if keep.is_empty() {
                break;
            }
            let kept_next: Vec<usize> = keep.iter().map(|&r| next[r]).collect();
            states = self.gate_update(pool, &states, &keep, &kept_next)?;
            alive = keep.iter().map(|&r| alive[r]).collect();
        }
        Ok(out)
    }

    /// Teacher-forced logits `[step][K]` for one query and label sequence.
    pub fn teacher_forced_logits(
        &self,
        pool: &PreparedPool<B>,
        query: &[f32],
        labels: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .teacher_forced_logits_batch(pool, &[query], &[labels.to_vec()])?
            .remove(0))
    }

    /// `compute_log_probs`: sum over steps of `log_softmax(logits_s)[label_s]`
    /// over all K entries (chosen ones at -100), optionally with the
    /// `exclude` position at -inf (renormalised over the rest).
    pub fn sequence_log_prob(
        &self,
        pool: &PreparedPool<B>,
        query: &[f32],
        labels: &[usize],
        exclude: Option<usize>,
    ) -> Result<f64> {
        let logits = self.teacher_forced_logits(pool, query, labels)?;
        Ok(logits
            .iter()
            .zip(labels)
            .map(|(row, &l)| log_softmax_at(row, l, exclude))
            .sum())
    }

    /// forward() without labels: greedy argmax (first maximum) decoding,
    /// no exclusion.  Returns the predictions and the `[step][K]` logits.
    pub fn greedy(
        &self,
        pool: &PreparedPool<B>,
        queries: &[&[f32]],
        shot_num: usize,
    ) -> Result<Vec<GreedyOutput>> {
        let k = pool.k;
        let mut states = self.query_states(pool, queries)?;
        let mut out: Vec<GreedyOutput> = vec![(vec![], vec![]); queries.len()];
        for s in 0..shot_num {
            let logits = self.step_logits(pool, &states);
            let mut chosen = Vec::with_capacity(queries.len());
            for (b, o) in out.iter_mut().enumerate() {
                let mut row = logits[b * k..(b + 1) * k].to_vec();
                for &c in &o.0 {
                    row[c] = self.mask_value as f32;
                }
                let mut best = 0;
                for j in 1..k {
                    if row[j] > row[best] {
                        best = j;
                    }
                }
                o.0.push(best);
                o.1.push(row);
                chosen.push(best);
            }
            if s + 1 < shot_num {
                let parents: Vec<usize> = (0..queries.len()).collect();
                states = self.gate_update(pool, &states, &parents, &chosen)?;
            }
        }
        Ok(out)
    }
}
