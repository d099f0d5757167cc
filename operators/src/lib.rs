//! leverflow's dataflow stages and the models they run.
//!
//! One module per stage of the pipeline, pure logic first; the thin timely
//! operators that wrap them live in [`dataflow`] (the only place that talks to
//! timely / differential-dataflow, whose APIs change often).
//!
//! | stage | module |
//! |---|---|
//! | beam records in | [`source`] |
//! | VQA dataset (questions, annotations, images) | [`dataset`] |
//! | embeddings and checkpoints on disk | [`tensor_io`] |
//! | pointer selector model | [`pointer_selector`] |
//! | candidate pointer sequences | [`candidates`] |
//! | VQA answering (contract, replay backend) | [`vqa`] |
//! | Qwen2.5-VL model | [`qwen2_5_vl`] |
//! | demo VQA model: a tiny Qwen2.5-VL trained on easy-VQA | [`demo_vlm`] |
//! | official VQA accuracy | [`accuracy`] |
//! | rewards and advantages | [`reward`] |
//! | JSON / Parquet outputs | [`sinks`] |

pub mod accuracy;
pub mod candidates;
pub mod dataflow;
pub mod dataset;
pub mod demo_vlm;
mod panics;
pub mod pointer_selector;
pub mod qwen2_5_vl;
pub mod reward;
pub mod sinks;
pub mod source;
pub mod state;
pub mod tensor_io;
pub mod vqa;
