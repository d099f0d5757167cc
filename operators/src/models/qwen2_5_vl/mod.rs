//! Qwen2.5-VL in burn: configuration, inputs processor (images, chat prompt,
//! tokens, M-RoPE positions), vision tower, language model and generation.
//!
//! The split follows the model's data path: [`processor`] turns requests into
//! token ids and pixel patches, [`vision`] encodes pixel patches into merged
//! image embeddings, [`text`] runs the decoder with a KV cache and
//! [`generate`] drives greedy / beam-search decoding on top of it. `host`
//! holds the CPU fast paths used when the backend is ndarray, `host_bf16`
//! their bf16 weights (a bf16 checkpoint stays bf16 on the CPU) and
//! `host_head` the embedding and LM head loaded for them; `logprobs` the
//! per-row vocabulary work of decoding on the host and `device_decode` the
//! same work on the device for every other backend (CUDA, wgpu).
//! [`original_prompt`] is the original project's plain-text prompt, whose
//! token count sets the scored span of `--gt_prob_mode original`.

#[cfg(test)]
mod bf16_checks;
pub mod config;
pub(crate) mod device_decode;
pub mod generate;
mod host;
mod host_bf16;
mod host_head;
pub mod image;
mod logprobs;
pub mod model;
pub mod original_prompt;
pub mod processor;
pub mod rope_index;
pub mod text;
pub mod vision;
pub mod weights;
