//! `--demo`: fills in every input of the embedded demo (see demo/README.md)
//! so that `leverflow generate --demo` runs the whole job with no downloads.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

use leverflow_operators::config::{RunConfig, DEFAULT_IMAGE_PATTERN};
use leverflow_operators::pipeline::Job;

/// The repository root holding `demo/`: the current directory when it has
/// one, else the source tree this binary was built from.
fn demo_root() -> Result<PathBuf> {
    for base in [
        PathBuf::from("."),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ] {
        if base.join("demo/beam_data.json").exists() {
            return Ok(base);
        }
    }
    bail!(
        "--demo: no demo/ folder here or in {}; run from the leverflow repository",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn set(slot: &mut Option<PathBuf>, value: PathBuf) {
    if slot.is_none() {
        *slot = Some(value);
    }
}

/// Fills unset inputs with the demo's files (flags given explicitly win).
pub fn apply(args: &mut RunConfig, job: Job) -> Result<()> {
    let root = demo_root()?;
    let d = |rel: &str| -> PathBuf { root.join("demo").join(rel) };
    set(&mut args.sft_ckpt, d("sft.ckpt"));
    set(&mut args.beam_data, d("beam_data.json"));
    set(&mut args.query_emb, d("query_embeddings.pt"));
    set(&mut args.cand_emb, d("candidate_embeddings.pt"));
    set(&mut args.train_ques_path, d("data/questions.json"));
    set(&mut args.train_ann_path, d("data/annotations.json"));
    set(&mut args.train_coco_root, d("data/images"));
    if args.image_pattern == DEFAULT_IMAGE_PATTERN {
        args.image_pattern = "COCO_train2014_{image_id:012d}.png".into();
    }
    let file = match job {
        Job::Generate => "rl_data.json",
        Job::Candidates => "candidates.json",
    };
    set(&mut args.output_path, Path::new("demo-output").join(file));
    if args.vqa_model == RunConfig::default().vqa_model {
        args.vqa_model = root.join("demo/vlm").display().to_string();
    }
    Ok(())
}
