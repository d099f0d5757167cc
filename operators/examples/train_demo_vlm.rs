//! Trains the demo VQA model (a tiny Qwen2.5-VL) on easy-VQA and writes it
//! as a Hugging Face checkpoint directory; then answers the held-out demo
//! questions with it.
//!
//! ```text
//! cargo run -p leverflow-operators --example train_demo_vlm -- \
//!     --wheel /tmp/easyvqa/easy_vqa-1.0-py3-none-any.whl --out demo/vlm
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use clap::Parser;
use leverflow_operators::models::demo_vlm::eval::evaluate_demo_data;
use leverflow_operators::models::demo_vlm::train::{train, TrainOptions};
use leverflow_operators::models::qwen2_5_vl::model::Qwen25Vl;

#[derive(Parser, Debug)]
#[command(about = "Train the tiny Qwen2.5-VL demo model on easy-VQA")]
struct Args {
    /// The easy_vqa-1.0 wheel (`pip download easy-vqa==1.0 --no-deps`).
    #[arg(long)]
    wheel: PathBuf,
    /// Output checkpoint directory.
    #[arg(long, default_value = "demo/vlm")]
    out: PathBuf,
    /// Seed of the initial weights and the example sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1600)]
    steps: usize,
    /// Prompts per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Curriculum: steps with an empty system prompt before the pipeline's.
    #[arg(long, default_value_t = 1400)]
    short_system_steps: usize,
    /// Curriculum: steps on open questions only, without examples.
    #[arg(long, default_value_t = 600)]
    open_question_steps: usize,
    /// Most in-context examples per training prompt.
    #[arg(long, default_value_t = 2)]
    max_shots: usize,
    /// Train only on questions containing this text (diagnostics).
    #[arg(long)]
    question_filter: Option<String>,
    /// Learning-rate factor of the patch embedding.
    #[arg(long, default_value_t = 0.05)]
    patch_embed_lr_scale: f64,
    /// Validate and save every this many steps.
    #[arg(long, default_value_t = 500)]
    eval_every: usize,
    /// Log every this many steps.
    #[arg(long, default_value_t = 50)]
    log_every: usize,
    /// Demo data folder whose held-out questions are answered at the end.
    #[arg(long, default_value = "demo/data")]
    eval_data: PathBuf,
    /// Skip the held-out evaluation.
    #[arg(long)]
    skip_eval: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let opts = TrainOptions {
        wheel: a.wheel,
        out: a.out.clone(),
        seed: a.seed,
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        warmup: a.warmup,
        short_system_steps: a.short_system_steps,
        patch_embed_lr_scale: a.patch_embed_lr_scale,
        max_shots: a.max_shots,
        open_question_steps: a.open_question_steps,
        question_filter: a.question_filter,
        eval_every: a.eval_every,
        log_every: a.log_every,
        ..TrainOptions::default()
    };
    let device = Default::default();
    let report = train::<Autodiff<NdArray<f32>>>(&opts, &device, &mut |line| eprintln!("{line}"))?;
    eprintln!("{}", serde_json::to_string(&report)?);
    if !a.skip_eval {
        let started = std::time::Instant::now();
        let model = Arc::new(Qwen25Vl::<NdArray<f32>>::load(&a.out, &device)?);
        let r = evaluate_demo_data(model, &a.eval_data, 2)?;
        eprintln!(
            "held-out accuracy ({} questions, {}-shot): {:.4} in {:.1} s",
            r.predictions.len(),
            r.shots,
            r.accuracy,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
