//! Loading a pointer-selector checkpoint: Lightning `.ckpt`, a bare state
//! dict (`.pt`) or `.safetensors`; the key prefix is found, the shapes give
//! `d_model`, `hidden_dim` and the layer count, and a missing tensor is an
//! error listing every missing key.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::{LayerNormConfig, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::host::tensor2;
use super::{CrossAttention, PointerSelector, PointerSelectorConfig, PointerSelectorError, Result};
use crate::tensor_io::{self, NamedTensor};

/// Number of layers of a state dict whose keys (full names) hold
/// `{prefix}cross_attn_layers.<i>.` / `{prefix}attn_norms.<i>.` tensors: the
/// indices seen must be exactly `0..n`. Errors with the first key whose index
/// is not a number or leaves a gap (in index order).
fn layer_count<'k>(
    keys: impl Iterator<Item = &'k String>,
    prefix: &str,
) -> std::result::Result<usize, String> {
    let mut seen: BTreeMap<usize, &'k String> = BTreeMap::new();
    for k in keys {
        for part in ["cross_attn_layers.", "attn_norms."] {
            let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix(part)) else {
                continue;
            };
            let idx = rest.split('.').next().unwrap_or("");
            // Only plain decimal indices, as torch writes them (no sign,
            // no leading zeros apart from "0").
            let plain = !idx.is_empty()
                && idx.bytes().all(|b| b.is_ascii_digit())
                && (idx == "0" || !idx.starts_with('0'));
            match idx.parse::<usize>() {
                Ok(i) if plain => {
                    seen.entry(i).or_insert(k);
                }
                _ => return Err(k.clone()),
            }
        }
    }
    for (expected, (&i, key)) in seen.iter().enumerate() {
        if i != expected {
            return Err((*key).clone());
        }
    }
    Ok(seen.len())
}

impl<B: Backend> PointerSelector<B> {
    /// Loads the pointer selector from a checkpoint file (Lightning `.ckpt`,
    /// state-dict `.pt` or `.safetensors`), see [`Self::from_state_dict`].
    pub fn load(path: &Path, num_heads: usize, device: &B::Device) -> Result<Self> {
        // only the pointer selector's tensors are converted
        const PARTS: [&str; 6] = [
            "input_proj.",
            "cross_attn_layers.",
            "attn_norms.",
            "query_proj.",
            "cand_proj.",
            "query_update_gate.",
        ];
        let keep = |k: &str| PARTS.iter().any(|p| k.contains(p));
        let sd = tensor_io::load_state_dict_filtered(path, &keep)?;
        Self::from_state_dict(&sd, &path.display().to_string(), num_heads, device)
    }

    /// Builds the model from a state dict.  The key prefix (e.g.
    /// `lever_lm.pointer_selector.`) is found by locating
    /// `query_update_gate.weight`; `d_model`, `hidden_dim` and `num_layers`
    /// are inferred from the tensor shapes; `num_heads` must be given.  Every
    /// missing tensor is reported at once; other keys are ignored.
    pub fn from_state_dict(
        sd: &BTreeMap<String, NamedTensor>,
        source_name: &str,
        num_heads: usize,
        device: &B::Device,
    ) -> Result<Self> {
        const GATE: &str = "query_update_gate.weight";
        let gate_keys: Vec<&String> = sd.keys().filter(|k| k.ends_with(GATE)).collect();
        let gate_key = gate_keys
            .iter()
            .find(|k| k.contains("pointer_selector"))
            .or(gate_keys.first())
            .ok_or_else(|| PointerSelectorError::NotFound {
                source_name: source_name.to_string(),
                n: sd.len(),
                examples: sd.keys().take(8).cloned().collect(),
            })?;
        let prefix = gate_key[..gate_key.len() - GATE.len()].to_string();
        let full = |k: &str| format!("{prefix}{k}");
        let gate_w = &sd[*gate_key];
        if gate_w.shape.len() != 2 || gate_w.shape[1] != 2 * gate_w.shape[0] {
            return Err(PointerSelectorError::Shape {
                source_name: source_name.to_string(),
                key: gate_key.to_string(),
                expected: vec![
                    gate_w.shape.first().copied().unwrap_or(0),
                    2 * gate_w.shape.first().copied().unwrap_or(0),
                ],
                found: gate_w.shape.clone(),
            });
        }
        let h = gate_w.shape[0];
        // `3 * h` below must not wrap (h is bounded by the tensor's data,
        // but the product is checked all the same).
        if h.checked_mul(3).and_then(|x| x.checked_mul(h)).is_none() {
            return Err(PointerSelectorError::Config(format!(
                "{source_name}: hidden size {h} is too large"
            )));
        }
        let d_model = sd
            .get(&full("input_proj.weight"))
            .and_then(|t| t.shape.get(1).copied())
            .unwrap_or(h);
        // Number of layers: the layer indices seen under cross_attn_layers /
        // attn_norms must be exactly 0..n. Never allocate by an index read
        // from the file: a key such as `attn_norms.99999999.bias` is an
        // error naming it, not 10^8 layers' worth of expected keys.
        let num_layers =
            layer_count(sd.keys(), &prefix).map_err(|key| PointerSelectorError::LayerIndex {
                source_name: source_name.to_string(),
                key,
            })?;
        let cfg = PointerSelectorConfig {
            num_heads,
            ..PointerSelectorConfig::new(d_model, h, num_layers)
        };
        cfg.validate()?;

        // expected shapes
        let mut expected: Vec<(String, Vec<usize>)> = vec![
            ("query_update_gate.bias".into(), vec![h]),
            ("query_proj.weight".into(), vec![h, h]),
            ("cand_proj.weight".into(), vec![h, h]),
        ];
        if d_model != h || sd.contains_key(&full("input_proj.weight")) {
            expected.push(("input_proj.weight".into(), vec![h, d_model]));
        }
        for l in 0..num_layers {
            expected.push((
                format!("cross_attn_layers.{l}.in_proj_weight"),
                vec![3 * h, h],
            ));
            expected.push((format!("cross_attn_layers.{l}.in_proj_bias"), vec![3 * h]));
            expected.push((format!("cross_attn_layers.{l}.out_proj.weight"), vec![h, h]));
            expected.push((format!("cross_attn_layers.{l}.out_proj.bias"), vec![h]));
            expected.push((format!("attn_norms.{l}.weight"), vec![h]));
            expected.push((format!("attn_norms.{l}.bias"), vec![h]));
        }
        let missing: Vec<String> = expected
            .iter()
            .map(|(k, _)| full(k))
            .filter(|k| !sd.contains_key(k))
            .collect();
        if !missing.is_empty() {
            return Err(PointerSelectorError::MissingTensors {
                source_name: source_name.to_string(),
                keys: missing,
            });
        }
        for (k, shape) in &expected {
            let t = &sd[&full(k)];
            if &t.shape != shape {
                return Err(PointerSelectorError::Shape {
                    source_name: source_name.to_string(),
                    key: full(k),
                    expected: shape.clone(),
                    found: t.shape.clone(),
                });
            }
        }
        let get = |k: &str| &sd[&full(k)].data;
        // torch Linear weight [out, in] -> burn [in, out]
        let linear = |w: &[f32], out: usize, inp: usize, b: Option<&[f32]>| -> Linear<B> {
            let mut t = vec![0f32; out * inp];
            for o in 0..out {
                for i in 0..inp {
                    t[i * out + o] = w[o * inp + i];
                }
            }
            Linear {
                weight: Param::from_tensor(tensor2(t, inp, out, device)),
                bias: b.map(|b| {
                    Param::from_tensor(Tensor::from_data(
                        TensorData::new(b.to_vec(), [out]),
                        device,
                    ))
                }),
            }
        };
        let mut layers = Vec::with_capacity(num_layers);
        let mut norms = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let w = get(&format!("cross_attn_layers.{l}.in_proj_weight"));
            let b = get(&format!("cross_attn_layers.{l}.in_proj_bias"));
            let blk = |j: usize| {
                linear(
                    &w[j * h * h..(j + 1) * h * h],
                    h,
                    h,
                    Some(&b[j * h..(j + 1) * h]),
                )
            };
            layers.push(CrossAttention {
                q: blk(0),
                k: blk(1),
                v: blk(2),
                out: linear(
                    get(&format!("cross_attn_layers.{l}.out_proj.weight")),
                    h,
                    h,
                    Some(get(&format!("cross_attn_layers.{l}.out_proj.bias"))),
                ),
            });
            let mut ln = LayerNormConfig::new(h)
                .with_epsilon(cfg.layer_norm_eps)
                .init::<B>(device);
            ln.gamma = Param::from_tensor(Tensor::from_data(
                TensorData::new(get(&format!("attn_norms.{l}.weight")).clone(), [h]),
                device,
            ));
            ln.beta = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(get(&format!("attn_norms.{l}.bias")).clone(), [h]),
                device,
            )));
            norms.push(ln);
        }
        let input_proj = sd
            .contains_key(&full("input_proj.weight"))
            .then(|| linear(get("input_proj.weight"), h, d_model, None));
        Ok(PointerSelector {
            input_proj,
            layers,
            norms,
            query_proj: linear(get("query_proj.weight"), h, h, None),
            cand_proj: linear(get("cand_proj.weight"), h, h, None),
            gate: linear(
                gate_w.data.as_slice(),
                h,
                2 * h,
                Some(get("query_update_gate.bias")),
            ),
            d_model,
            hidden_dim: h,
            num_heads,
            temperature: cfg.temperature,
            mask_value: cfg.mask_value,
            layer_norm_eps: cfg.layer_norm_eps,
        })
    }
}
