//! leverflow's library: the RL-data pipeline for in-context example
//! selection in VQA, its stages, and the models they run.
//!
//! Data flows one way: a [`config::RunConfig`] goes into a
//! [`pipeline::Pipeline`], which loads the inputs, wires the
//! [`dataflow`] graph over the [`stages`], and writes the [`outputs`]; the
//! stages call the [`models`] through the [`backends`] registry and build
//! the record types of `leverflow_schemas`.
//!
//! | layer | modules |
//! |---|---|
//! | settings | [`config`] |
//! | the run | [`pipeline`] |
//! | the graph (all timely / differential code) | [`dataflow`] |
//! | stages (plan, candidates, vqa, accuracy, reward, record) | [`stages`] |
//! | stage logic | [`candidates`] (pointer decoding), [`accuracy`] (official VQA metric), [`reward`] |
//! | state store and content keys | [`state`] |
//! | output formats (JSON, Parquet) and their writer | [`outputs`] |
//! | VQA backends behind one registry | [`backends`] |
//! | models and their neutral contract | [`models`] |
//! | benchmarks of `leverflow bench` | [`bench`](mod@bench) |
//! | input files | [`source`] (beam data), [`dataset`] (VQA files), [`image_decode`] (images, with limits), [`tensor_io`] (embeddings, checkpoints) |
//!
//! Running the embedded demo through the library (what `leverflow generate
//! --demo` does; see `examples/pipeline.rs`):
//!
//! ```no_run
//! use leverflow_operators::config::RunConfig;
//! use leverflow_operators::pipeline::{Job, Pipeline};
//!
//! let demo = |p: &str| Some(std::path::PathBuf::from("demo").join(p));
//! let config = RunConfig {
//!     sft_ckpt: demo("sft.ckpt"),
//!     beam_data: demo("beam_data.json"),
//!     query_emb: demo("query_embeddings.pt"),
//!     cand_emb: demo("candidate_embeddings.pt"),
//!     train_ques_path: demo("data/questions.json"),
//!     train_ann_path: demo("data/annotations.json"),
//!     train_coco_root: demo("data/images"),
//!     image_pattern: "COCO_train2014_{image_id:012d}.png".into(),
//!     vqa_model: "demo/vlm".into(),
//!     output_path: Some("out/rl_data.json".into()),
//!     ..RunConfig::default()
//! };
//! let run = Pipeline::new(config, Job::Generate).run()?;
//! println!("{} queries, {} candidates", run.summary.queries, run.summary.candidates);
//! # Ok::<(), leverflow_operators::pipeline::PipelineError>(())
//! ```

pub mod accuracy;
pub mod backends;
pub mod bench;
pub mod candidates;
pub mod config;
pub mod dataflow;
pub mod dataset;
pub mod image_decode;
pub mod models;
pub mod outputs;
mod panics;
pub mod pipeline;
pub mod reward;
pub mod source;
pub mod stages;
pub mod state;
pub mod tensor_io;
