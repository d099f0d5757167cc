//! The pool-only part of the model, computed once per candidate pool: input
//! projections, per-layer attention keys/values and the normalised
//! candidate projections ([`PreparedPool`], [`PreparedRows`]).

use burn::tensor::backend::Backend;

use super::host::*;
use super::{PointerSelector, PointerSelectorError, PreparedPool, PreparedRows, Result};
use crate::tensor_io::Matrix;

impl<B: Backend> PointerSelector<B> {
    /// Precomputes the pool-only part of the model for candidates `cand`
    /// (`[K, d_model]`).
    pub fn prepare_pool(&self, cand: &Matrix) -> Result<PreparedPool<B>> {
        Ok(self.prepare_pools(&[cand])?.remove(0))
    }

    /// Like [`Self::prepare_pool`] for several pools at once: the projections
    /// of all pools run as single matmuls over the stacked rows.  When pools
    /// share rows (per-query pools drawn from one item set), prefer
    /// [`Self::prepare_rows`] once + [`Self::pool_from_rows`] per pool.
    pub fn prepare_pools(&self, pools: &[&Matrix]) -> Result<Vec<PreparedPool<B>>> {
        if pools.is_empty() {
            return Ok(vec![]);
        }
        let mut all = Vec::new();
        for (i, p) in pools.iter().enumerate() {
            self.check_dim(&format!("candidate pool {i}"), p.cols)?;
            if p.rows == 0 {
                return Err(PointerSelectorError::Input(format!(
                    "candidate pool {i} is empty"
                )));
            }
            all.extend_from_slice(&p.data);
        }
        let total: usize = pools.iter().map(|p| p.rows).sum();
        let rows = self.prepare_rows(&Matrix {
            rows: total,
            cols: self.d_model,
            data: all,
        })?;
        let mut out = Vec::with_capacity(pools.len());
        let mut start = 0;
        for p in pools {
            let positions: Vec<usize> = (start..start + p.rows).collect();
            start += p.rows;
            out.push(self.pool_from_rows(&rows, &positions)?);
        }
        Ok(out)
    }

    /// The per-row, query-independent part of the model for every row of
    /// `items` (`[N, d_model]`): projected attention keys and values of each
    /// layer and the normalised candidate projections, on the host.  Pools
    /// made of these rows are then cheap gathers ([`Self::pool_from_rows`]).
    pub fn prepare_rows(&self, items: &Matrix) -> Result<PreparedRows> {
        self.check_dim("candidate rows", items.cols)?;
        let n = items.rows;
        let h = self.hidden_dim;
        let ch = self.project(items.data.clone(), n);
        let mut c_norm = self.linear_host(&self.cand_proj, ch.clone(), n);
        normalize_rows(&mut c_norm, h);
        let keys = self
            .layers
            .iter()
            .map(|l| self.linear_host(&l.k, ch.clone(), n))
            .collect();
        let values = self
            .layers
            .iter()
            .map(|l| self.linear_host(&l.v, ch.clone(), n))
            .collect();
        Ok(PreparedRows {
            n,
            h,
            d: items.cols,
            keys,
            values,
            c_norm,
            raw: items.data.clone(),
        })
    }

    /// A pool made of rows `positions` of `rows` (in that order).
    pub fn pool_from_rows(
        &self,
        rows: &PreparedRows,
        positions: &[usize],
    ) -> Result<PreparedPool<B>> {
        if positions.is_empty() {
            return Err(PointerSelectorError::Input("empty candidate pool".into()));
        }
        if let Some(&bad) = positions.iter().find(|&&p| p >= rows.n) {
            return Err(PointerSelectorError::Input(format!(
                "pool row {bad} out of range for {} prepared rows",
                rows.n
            )));
        }
        let device = self.device();
        let (h, nh, k) = (self.hidden_dim, self.num_heads, positions.len());
        let hd = h / nh;
        let gather = |src: &[f32], w: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity(k * w);
            for &p in positions {
                out.extend_from_slice(&src[p * w..(p + 1) * w]);
            }
            out
        };
        let keys_t = rows
            .keys
            .iter()
            .map(|t| {
                let g = gather(t, h);
                (0..nh)
                    .map(|hh| tensor2::<B>(transpose_cols(&g, k, h, hh * hd, hd), hd, k, &device))
                    .collect()
            })
            .collect();
        let values = rows
            .values
            .iter()
            .map(|t| {
                let g = gather(t, h);
                (0..nh)
                    .map(|hh| tensor2::<B>(cols_block(&g, k, h, hh * hd, hd), k, hd, &device))
                    .collect()
            })
            .collect();
        let c_norm_host = gather(&rows.c_norm, h);
        Ok(PreparedPool {
            k,
            keys_t,
            values,
            c_norm_t: tensor2::<B>(transpose_cols(&c_norm_host, k, h, 0, h), h, k, &device),
            c_norm_host,
            raw: gather(&rows.raw, rows.d),
        })
    }
}
