//! The model's accessors and the host-side linear layers its forward pass
//! is built from.

use burn::nn::Linear;
use burn::tensor::backend::Backend;

use super::host::{add_bias, host, tensor2};
use super::{PointerSelector, PointerSelectorConfig, PointerSelectorError, Result};

impl<B: Backend> PointerSelector<B> {
    /// The configuration this model was built with.
    pub fn config(&self) -> PointerSelectorConfig {
        PointerSelectorConfig {
            d_model: self.d_model,
            hidden_dim: self.hidden_dim,
            num_layers: self.layers.len(),
            num_heads: self.num_heads,
            temperature: self.temperature,
            mask_value: self.mask_value,
            layer_norm_eps: self.layer_norm_eps,
        }
    }

    /// Embedding dimension expected for queries and candidates.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Value written at chosen positions (-100).
    pub fn mask_value(&self) -> f32 {
        self.mask_value as f32
    }

    pub(super) fn device(&self) -> B::Device {
        self.gate.weight.val().device()
    }

    /// `x @ W (+ b)` for a burn Linear, with `x` row-major `[rows, in]` on the host.
    pub(super) fn linear_host(&self, lin: &Linear<B>, x: Vec<f32>, rows: usize) -> Vec<f32> {
        let w = lin.weight.val();
        let [inp, _] = w.dims();
        let mut y = host(tensor2::<B>(x, rows, inp, &self.device()).matmul(w));
        if let Some(b) = &lin.bias {
            add_bias(&mut y, &host(b.val()));
        }
        y
    }

    pub(super) fn project(&self, x: Vec<f32>, rows: usize) -> Vec<f32> {
        match &self.input_proj {
            Some(p) => self.linear_host(p, x, rows),
            None => x,
        }
    }

    pub(super) fn check_dim(&self, what: &str, found: usize) -> Result<()> {
        if found != self.d_model {
            return Err(PointerSelectorError::DimMismatch {
                what: what.to_string(),
                expected: self.d_model,
                found,
            });
        }
        Ok(())
    }
}
