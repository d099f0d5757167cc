//! Qwen2.5-VL in burn: configuration, inputs processor (images, chat prompt,
//! tokens, M-RoPE positions), vision tower, language model and generation.
//!
//! The split follows the model's data path: [`processor`] turns requests into
//! token ids and pixel patches, [`vision`] encodes pixel patches into merged
//! image embeddings, [`text`] runs the decoder with a KV cache and
//! [`generate`] drives greedy / beam-search decoding on top of it. `host`
//! holds the CPU fast paths used when the backend is ndarray, `logprobs`
//! the per-row vocabulary work of decoding on the host and `device_decode`
//! the same work on the device for every other backend (CUDA, wgpu).

pub mod config;
pub(crate) mod device_decode;
pub mod generate;
mod host;
pub mod image;
mod logprobs;
pub mod model;
pub mod processor;
pub mod rope_index;
pub mod text;
pub mod vision;
pub mod weights;
