//! `leverflow bench vqa`: prompts per second of the Qwen2.5-VL backend at
//! batch 1 and at `--batch_size` on the same prompts, on the tiny fixture
//! or a synthetic checkpoint of the 3B's width, on any `--device`. Every
//! line also gives the decoding loop's device→host reads and bytes per
//! decode step; off the CPU each batch size runs twice, ranking on the
//! device (`ranking: device`, the default path) and on the host
//! (`ranking: host`, every live row's logits read back each step).
//!
//! `--synthetic 3b` measures the real size: it writes a random-weight
//! checkpoint with every shape of Qwen2.5-VL-3B-Instruct (bf16, 4 shards;
//! see [`super::synthetic_3b`]) and runs each batch size in a fresh
//! process of the binary (`--batch_only`), so each line's `peak_rss_bytes`
//! is that batch size's own peak, loading included.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;

use super::{BenchError, BenchSettings};
use crate::backends::qwen2_5_vl::Cpu;
use crate::backends::{BackendError, Device};
use crate::models::qwen2_5_vl::generate::{GenerationConfig, GenerationOverrides, Ranking};
use crate::models::qwen2_5_vl::model::{Qwen25Vl, QwenStats, QwenVqa};
use crate::models::qwen2_5_vl::processor::{ImageSource, PromptRequest, VqaExample, VqaQuery};

type Result<T> = std::result::Result<T, BenchError>;

/// A synthetic checkpoint with every shape of a published model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SyntheticModel {
    /// Qwen2.5-VL-3B-Instruct (3.75 B parameters, bf16).
    #[cfg_attr(feature = "clap", value(name = "3b"))]
    Full3b,
}

/// Prompts of `bench vqa --synthetic 3b` (each takes seconds at that size).
const SYNTHETIC_PROMPTS: usize = 8;

/// `leverflow bench vqa`: prompts/s at batch 1 (a loop) and at `--batch_size`
/// on the same prompts (the tiny fixture model unless `--vqa_model`).
pub fn bench_vqa(args: &BenchSettings) -> Result<()> {
    if args.synthetic == Some(SyntheticModel::Full3b) {
        return bench_synthetic_3b(args);
    }
    let dir = args
        .vqa_model
        .clone()
        .unwrap_or_else(|| args.repo.join("tests/fixtures/qwen2_5_vl_tiny"));
    if crate::backends::openflamingo::is_openflamingo(&dir.to_string_lossy()) {
        return super::vqa_flamingo::bench_flamingo(args, &dir);
    }
    let synthetic = match args.synthetic_3b_layers {
        Some(layers) => Some(synthetic_3b_checkpoint(&dir, layers)?),
        None => None,
    };
    let model_dir = synthetic.as_ref().map_or(dir.as_path(), |t| t.path());
    let reqs = bench_requests(&dir, args.queries.clamp(8, 64))?;
    let run = BenchRun {
        args,
        dir: &dir,
        model_dir,
        reqs: &reqs,
    };
    match args.device {
        Device::Cpu => run.on::<Cpu>(&Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            run.on::<crate::backends::qwen2_5_vl::Gpu>(&burn::backend::cuda::CudaDevice::new(i))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(BenchError::workload(BackendError::NoCuda)),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(a) => run.on::<crate::backends::qwen2_5_vl::WgpuBackend>(
            &crate::backends::qwen2_5_vl::wgpu_device(a).map_err(BenchError::workload)?,
        ),
        #[cfg(not(feature = "wgpu"))]
        Device::Wgpu(_) => Err(BenchError::workload(BackendError::NoWgpu)),
    }
}

/// `bench vqa --synthetic 3b`: writes the checkpoint (in `--keep_dir`,
/// reused when it already holds one, else in a temporary directory) and
/// runs batch 1 and `--batch_size`, each in its own process.
fn bench_synthetic_3b(args: &BenchSettings) -> Result<()> {
    let fixture = args.repo.join("tests/fixtures/qwen2_5_vl_tiny");
    let tmp;
    let dir = match &args.keep_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let index = dir.join(crate::models::qwen2_5_vl::weights::INDEX_FILE);
    if index.exists() {
        eprintln!("reusing the synthetic 3B checkpoint in {}", dir.display());
    } else {
        eprintln!(
            "writing a synthetic Qwen2.5-VL-3B checkpoint (random weights, bf16, {} shards) to {}",
            super::synthetic_3b::SHARDS,
            dir.display()
        );
        let started = std::time::Instant::now();
        let n = super::synthetic_3b::write(&fixture, &dir)?;
        eprintln!(
            "wrote {n} parameters in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    for batch in [1, args.batch_size.max(1)] {
        let status = std::process::Command::new(&args.exe)
            .arg("bench")
            .arg("vqa")
            .arg("--vqa_model")
            .arg(&dir)
            .args(["--batch_size", &batch.to_string(), "--batch_only"])
            .args(["--queries", &SYNTHETIC_PROMPTS.to_string()])
            .args(["--reps", &args.reps.clamp(1, 3).to_string()])
            .args(["--device", &args.device.to_string()])
            .args(["--vision_cache_mb", &args.vision_cache_mb.to_string()])
            .status()?;
        if !status.success() {
            return Err(BenchError::Run(format!(
                "{} bench vqa at batch {batch} on {} failed: {status}",
                args.exe.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// `n` prompts of two in-context examples over the fixture's easy-VQA images.
fn bench_requests(dir: &Path, n: usize) -> Result<Vec<PromptRequest>> {
    let images = prompt_images(dir, "easyvqa_*.png", |name| name.starts_with("easyvqa"))?;
    Ok((0..n)
        .map(|i| PromptRequest {
            system_prompt: None,
            examples: (1..=2)
                .map(|k| VqaExample {
                    image: ImageSource::Path(images[(i + k) % images.len()].clone()),
                    question: "what shape is in the image?".into(),
                    answer: "circle".into(),
                })
                .collect(),
            query: VqaQuery {
                image: ImageSource::Path(images[i % images.len()].clone()),
                question: "what color is the shape?".into(),
            },
        })
        .collect())
}

/// The sorted files of `dir/images` whose names pass `keep` (at least 3:
/// each prompt shows three), for the benchmarks' prompts.
pub(super) fn prompt_images(
    dir: &Path,
    what: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<PathBuf>> {
    let folder = dir.join("images");
    let mut images: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| {
            BenchError::Run(format!(
                "{}: no images/ folder with prompt images: {e}",
                dir.display()
            ))
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| keep(&n.to_string_lossy())))
        .collect();
    images.sort();
    if images.len() < 3 {
        return Err(BenchError::Run(format!(
            "{}: need at least 3 {what} images",
            folder.display()
        )));
    }
    Ok(images)
}

/// The batch sizes a `bench vqa` run measures: batch 1 (a loop) and
/// `--batch_size`, or only `--batch_size` with `--batch_only`.
pub(super) fn batch_sizes(args: &BenchSettings) -> Vec<usize> {
    if args.batch_only {
        vec![args.batch_size.max(1)]
    } else {
        vec![1, args.batch_size.max(1)]
    }
}

/// One `bench vqa` invocation's inputs.
struct BenchRun<'a> {
    args: &'a BenchSettings,
    dir: &'a Path,
    model_dir: &'a Path,
    reqs: &'a [PromptRequest],
}

impl BenchRun<'_> {
    /// Loads the model on `device` of backend `B` and reports every batch
    /// size (and, off the CPU, both rankings).
    fn on<B: Backend>(&self, device: &B::Device) -> Result<()> {
        let started = std::time::Instant::now();
        let model =
            Arc::new(Qwen25Vl::<B>::load(self.model_dir, device).map_err(BenchError::workload)?);
        let load_s = started.elapsed().as_secs_f64();
        let generation = GenerationConfig::resolve(
            &GenerationOverrides {
                max_new_tokens: Some(5),
                min_new_tokens: Some(0),
                num_beams: Some(3),
                length_penalty: Some(0.0),
                do_sample: Some(false),
                ..Default::default()
            },
            &model.generation_defaults,
        )
        .map_err(BenchError::workload)?;
        let rankings: &[(Ranking, &str)] = match self.args.device {
            Device::Cpu => &[(Ranking::Auto, "host")],
            _ => &[(Ranking::Auto, "device"), (Ranking::Host, "host")],
        };
        let n = self.reqs.len();
        for batch in batch_sizes(self.args) {
            for &(ranking, ranking_name) in rankings {
                let mut stats = QwenStats::default();
                let secs = super::time_runs(self.args.reps.max(1), || {
                    // A fresh cache each run: every image is encoded again.
                    let mut qv = QwenVqa::new(
                        Arc::clone(&model),
                        generation.clone(),
                        self.args.vision_cache_mb,
                    )
                    .with_ranking(ranking);
                    for chunk in self.reqs.chunks(batch) {
                        qv.answer_requests(chunk, None)
                            .map_err(BenchError::workload)?;
                    }
                    stats = qv.qwen_stats();
                    Ok(())
                })?;
                let steps = stats.decode_steps.max(1) as f64;
                super::report(
                    "vqa",
                    "prompts",
                    n as f64,
                    &secs,
                    serde_json::json!({
                        "batch_size": batch,
                        "device": self.args.device.to_string(),
                        "ranking": ranking_name,
                        "decode_steps": stats.decode_steps,
                        "vision_cache_mb": self.args.vision_cache_mb,
                        "images_encoded": stats.images_encoded,
                        "device_reads_per_step": stats.decode_device_reads as f64 / steps,
                        "device_read_bytes_per_step": stats.decode_device_read_bytes as f64 / steps,
                        "model": self.dir.display().to_string(),
                        "synthetic_3b_layers": self.args.synthetic_3b_layers,
                        "load_s": load_s,
                        "peak_rss_bytes": super::peak_rss_bytes(),
                    }),
                );
            }
        }
        Ok(())
    }
}

/// A checkpoint directory (deleted when dropped) with `layers` decoder
/// layers of Qwen2.5-VL-3B's text width and random weights, plus the
/// tokenizer, chat template and processor settings of `fixture`. The vision
/// tower keeps the fixture's size and projects to the 3B width. Used by
/// `bench vqa --synthetic_3b_layers`: the published 3B cannot be
/// downloaded here, and the tiny fixture's weights are too small for
/// batching to have anything to share.
fn synthetic_3b_checkpoint(fixture: &Path, layers: usize) -> Result<tempfile::TempDir> {
    use crate::models::demo_vlm::checkpoint::{random_weights, write_safetensors};
    use crate::models::qwen2_5_vl::config::Qwen25VlConfig;
    if layers == 0 {
        return Err(BenchError::Run(
            "synthetic_3b_layers must be at least 1".into(),
        ));
    }
    let tmp = tempfile::tempdir()?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        let src = fixture.join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.path().join(f))?;
        }
    }
    let path = fixture.join("config.json");
    let text = std::fs::read_to_string(&path)?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(BenchError::workload)?;
    // Qwen2.5-VL-3B-Instruct's text dimensions (its published config.json).
    for (key, value) in [
        ("hidden_size", serde_json::json!(2048)),
        ("intermediate_size", serde_json::json!(11008)),
        ("num_attention_heads", serde_json::json!(16)),
        ("num_key_value_heads", serde_json::json!(2)),
        ("num_hidden_layers", serde_json::json!(layers)),
        ("tie_word_embeddings", serde_json::json!(true)),
    ] {
        config[key] = value;
    }
    config["rope_scaling"]["mrope_section"] = serde_json::json!([16, 24, 24]);
    config["vision_config"]["out_hidden_size"] = serde_json::json!(2048);
    let config_path = tmp.path().join("config.json");
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config).map_err(BenchError::workload)?,
    )?;
    let parsed = Qwen25VlConfig::from_file(&config_path).map_err(BenchError::workload)?;
    eprintln!(
        "writing a synthetic checkpoint ({layers} layers of the 3B's width, random weights) to {}",
        tmp.path().display()
    );
    let weights = random_weights(&parsed, 0, 0.02);
    write_safetensors(&tmp.path().join("model.safetensors"), &weights)
        .map_err(BenchError::workload)?;
    Ok(tmp)
}
