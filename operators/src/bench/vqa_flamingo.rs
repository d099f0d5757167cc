//! `leverflow bench vqa --vqa_model <OpenFlamingo dir>`: prompts per second
//! of the OpenFlamingo model at batch 1 (a loop) and at `--batch_size`, on
//! prompts built from the directory's `images/` the way
//! `tools/bench_flamingo_torch.py` builds them for open_flamingo on PyTorch
//! (so the two sides answer the same prompts), with the original's
//! generation settings (beam 3, 5 new tokens, length penalty 0).

use std::path::Path;
use std::sync::Arc;

use super::{BenchError, BenchSettings};
use crate::backends::device::DeviceKind;
use crate::backends::qwen2_5_vl::Cpu;
use crate::backends::BackendError;
use crate::models::openflamingo::vqa::{generation_config, FlamingoVqa};
use crate::models::openflamingo::{FlamingoPrompt, OpenFlamingo};
use crate::models::qwen2_5_vl::generate::GenerationOverrides;

type Result<T> = std::result::Result<T, BenchError>;

/// The in-context examples' questions and answers (the fixture's).
const EXAMPLES: [(&str, &str); 2] = [
    ("What color is the ball?", "red"),
    ("How many dogs are there?", "2"),
];
/// The query questions, alternating.
const QUERIES: [&str; 2] = ["What is the man holding?", "Is it raining?"];

/// `n` two-shot prompts over the sorted `*.png` files of `dir/images`:
/// prompt `i` shows images `i+1` and `i+2` as examples and image `i` as the
/// query (indices modulo the number of images).
pub fn flamingo_bench_prompts(dir: &Path, n: usize) -> Result<Vec<FlamingoPrompt>> {
    let images = super::vqa::prompt_images(dir, ".png", |name| name.ends_with(".png"))?;
    let m = images.len();
    Ok((0..n)
        .map(|i| FlamingoPrompt {
            examples: EXAMPLES
                .iter()
                .enumerate()
                .map(|(k, (q, a))| {
                    (
                        images[(i + k + 1) % m].clone(),
                        q.to_string(),
                        a.to_string(),
                    )
                })
                .collect(),
            query_image: images[i % m].clone(),
            query_question: QUERIES[i % QUERIES.len()].to_string(),
        })
        .collect())
}

/// Loads the OpenFlamingo directory `dir` on the CPU and prints one `vqa`
/// line per batch size.
pub fn bench_flamingo(args: &BenchSettings, dir: &Path) -> Result<()> {
    if args.device.kind() != DeviceKind::Cpu {
        return Err(BenchError::workload(BackendError::FlamingoDevice));
    }
    let started = std::time::Instant::now();
    let model = Arc::new(
        OpenFlamingo::<Cpu>::load(dir, &Default::default()).map_err(BenchError::workload)?,
    );
    let load_s = started.elapsed().as_secs_f64();
    let generation = generation_config(
        &GenerationOverrides::default(),
        model.tokenizer.eos_token_id,
    )
    .map_err(BenchError::workload)?;
    let prompts = flamingo_bench_prompts(dir, args.queries.clamp(8, 64))?;
    for batch in super::vqa::batch_sizes(args) {
        let mut encoded = 0;
        let secs = super::time_runs(args.reps.max(1), || {
            let mut fv =
                FlamingoVqa::new(Arc::clone(&model), generation.clone(), Default::default());
            for chunk in prompts.chunks(batch) {
                fv.answer_prompts(chunk).map_err(BenchError::workload)?;
            }
            encoded = fv.flamingo_stats().images_encoded;
            Ok(())
        })?;
        super::report(
            "vqa",
            "prompts",
            prompts.len() as f64,
            &secs,
            serde_json::json!({
                "batch_size": batch,
                "device": "cpu",
                "backend": "openflamingo",
                "num_beams": generation.num_beams,
                "max_new_tokens": generation.max_new_tokens,
                "images_encoded": encoded,
                "model": dir.display().to_string(),
                "load_s": load_s,
                "peak_rss_bytes": super::peak_rss_bytes(),
            }),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_rotate_over_the_images() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/openflamingo_tiny");
        let p = flamingo_bench_prompts(&dir, 5).unwrap();
        assert_eq!(p.len(), 5);
        let name = |q: &Path| q.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name(&p[0].query_image), "img0.png");
        assert_eq!(name(&p[0].examples[0].0), "img1.png");
        assert_eq!(name(&p[3].examples[1].0), "img1.png");
        assert_eq!(p[1].query_question, "Is it raining?");
        assert_eq!(p[2].examples[1].2, "2");
    }
}
