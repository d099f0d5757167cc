//! The models: the pointer selector that proposes candidates, and the
//! vision-language models that answer prompts.
//!
//! Every VQA model implements the neutral [`contract`] (the [`VqaModel`]
//! trait, the one prompt type [`VqaPrompt`] and the chat-message builder);
//! models never depend on the pipeline's stages, the state store or the
//! dataflow. Backends (`crate::backends`) put them behind one registry.
//!
//! | folder | model |
//! |---|---|
//! | [`contract`] | what every VQA model answers and returns |
//! | [`pointer_selector`] | the SFT pointer selector (candidate sequences) |
//! | [`qwen2_5_vl`] | Qwen2.5-VL (the VQA model of the original) |
//! | [`openflamingo`] | OpenFlamingo-3B (the original's `flamingo_3B`) |
//! | [`demo_vlm`] | the demo's tiny Qwen2.5-VL, trained on easy-VQA by burn code |
//! | [`hub`] | `vqa_model` names: directories, hub repository ids, aliases |

pub mod contract;
pub mod demo_vlm;
#[cfg(all(test, any(feature = "wgpu", feature = "cuda")))]
mod gpu_parity;
pub mod hub;
pub mod openflamingo;
pub mod pointer_selector;
pub mod qwen2_5_vl;

pub use contract::{VqaAnswer, VqaError, VqaModel, VqaPrompt};
