//! Hyper-parameters of the pointer selector and building a model from them.

use burn::nn::{LayerNormConfig, LinearConfig};
use burn::tensor::backend::Backend;

use super::{CrossAttention, PointerSelector, PointerSelectorError, Result};

/// Hyper-parameters of the pointer selector.
#[derive(Debug, Clone, PartialEq)]
pub struct PointerSelectorConfig {
    /// embedding dimension of queries and candidates
    pub d_model: usize,
    /// hidden dimension (after `input_proj`)
    pub hidden_dim: usize,
    /// number of cross-attention layers
    pub num_layers: usize,
    /// attention heads (not recoverable from the weights)
    pub num_heads: usize,
    /// logit temperature (0.1)
    pub temperature: f64,
    /// value written at already chosen positions (-100)
    pub mask_value: f64,
    /// LayerNorm epsilon (1e-5)
    pub layer_norm_eps: f64,
}

impl PointerSelectorConfig {
    /// A configuration with the original defaults (1 head, temperature 0.1,
    /// mask -100, LayerNorm eps 1e-5).
    pub fn new(d_model: usize, hidden_dim: usize, num_layers: usize) -> Self {
        PointerSelectorConfig {
            d_model,
            hidden_dim,
            num_layers,
            num_heads: 1,
            temperature: 0.1,
            mask_value: -100.0,
            layer_norm_eps: 1e-5,
        }
    }

    /// Sets the number of heads.
    pub fn with_num_heads(mut self, num_heads: usize) -> Self {
        self.num_heads = num_heads;
        self
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.hidden_dim == 0 || self.d_model == 0 {
            return Err(PointerSelectorError::Config(
                "d_model and hidden_dim must be > 0".into(),
            ));
        }
        if self.num_heads == 0 || !self.hidden_dim.is_multiple_of(self.num_heads) {
            return Err(PointerSelectorError::Config(format!(
                "num_heads {} must divide hidden_dim {}",
                self.num_heads, self.hidden_dim
            )));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(PointerSelectorError::Config(
                "temperature must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// A model with random weights (used for benchmarks and tests).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<PointerSelector<B>> {
        self.validate()?;
        let h = self.hidden_dim;
        let lin =
            |i: usize, o: usize, bias: bool| LinearConfig::new(i, o).with_bias(bias).init(device);
        let layers = (0..self.num_layers)
            .map(|_| CrossAttention {
                q: lin(h, h, true),
                k: lin(h, h, true),
                v: lin(h, h, true),
                out: lin(h, h, true),
            })
            .collect();
        let norms = (0..self.num_layers)
            .map(|_| {
                LayerNormConfig::new(h)
                    .with_epsilon(self.layer_norm_eps)
                    .init(device)
            })
            .collect();
        Ok(PointerSelector {
            input_proj: (self.d_model != h).then(|| lin(self.d_model, h, false)),
            layers,
            norms,
            query_proj: lin(h, h, false),
            cand_proj: lin(h, h, false),
            gate: lin(2 * h, h, true),
            d_model: self.d_model,
            hidden_dim: h,
            num_heads: self.num_heads,
            temperature: self.temperature,
            mask_value: self.mask_value,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}
