//! OpenFlamingo (OpenFlamingo-3B-vitl-mpt1b, the original project's
//! `flamingo_3B`) in burn: configuration, weights, the open_clip vision
//! tower, the perceiver resampler, MosaicGPT with gated cross-attention,
//! image preprocessing and the tokenizer with the original's prompt format.
//!
//! The split follows the data path: [`image`] turns files into pixels,
//! [`vision`] into patch tokens, [`perceiver`] into latents per image,
//! [`prompt`] builds the ids, [`lm`] runs the language model with its
//! cross-attention, [`model`] ties them together and generates with the
//! search shared with Qwen2.5-VL
//! ([`crate::models::qwen2_5_vl::generate::search`]), and [`vqa`] answers
//! the VQA contract's prompts with it.

pub mod config;
pub mod image;
pub mod lm;
pub mod model;
pub mod perceiver;
pub mod prompt;
pub mod vision;
pub mod vqa;
pub mod weights;

#[cfg(test)]
mod tests;

pub use model::{FlamingoError, FlamingoFiles, FlamingoPrompt, OpenFlamingo};
