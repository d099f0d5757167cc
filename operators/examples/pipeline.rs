//! Runs the embedded demo through the library API (no command-line parsing,
//! no binary) and writes `rl_data.json` and `rl_data.parquet` to the
//! directory given as the first argument: the same outputs as
//! `leverflow generate --demo --output_path DIR/rl_data.json`.
//!
//! ```sh
//! cargo run -p leverflow-operators --example pipeline -- /tmp/demo-out
//! ```

use std::path::{Path, PathBuf};

use leverflow_operators::config::RunConfig;
use leverflow_operators::pipeline::{Job, Pipeline, PipelineError, RunSummary};

/// Runs the demo (whose files are in `demo`) into `out`.
pub fn run_demo(demo: &Path, out: &Path) -> Result<RunSummary, PipelineError> {
    let file = |rel: &str| Some(demo.join(rel));
    let config = RunConfig {
        demo: true,
        sft_ckpt: file("sft.ckpt"),
        beam_data: file("beam_data.json"),
        query_emb: file("query_embeddings.pt"),
        cand_emb: file("candidate_embeddings.pt"),
        train_ques_path: file("data/questions.json"),
        train_ann_path: file("data/annotations.json"),
        train_coco_root: file("data/images"),
        image_pattern: "COCO_train2014_{image_id:012d}.png".into(),
        vqa_model: demo.join("vlm").display().to_string(),
        output_path: Some(out.join("rl_data.json")),
        ..RunConfig::default()
    };
    Pipeline::new(config, Job::Generate).run()
}

#[cfg_attr(test, allow(dead_code))]
fn main() {
    let Some(out) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: pipeline OUTPUT_DIR");
        std::process::exit(2);
    };
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo");
    match run_demo(&demo, &out) {
        Ok(run) => {
            let s = &run.summary;
            println!(
                "{} queries, {} candidates, {} VQA calls; mean reward {:.3}",
                s.queries,
                s.candidates,
                s.vqa_calls,
                s.reward_mean().unwrap_or(0.0)
            );
            for (format, path) in &run.outputs {
                println!("{}: {}", format.as_str(), path.display());
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
