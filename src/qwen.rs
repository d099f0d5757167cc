//! The `qwen2_5_vl` backend at the binary edge: device selection (CPU
//! `ndarray`, or CUDA with `--features cuda`), the `vqa` subcommand and the
//! VQA benchmark.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use leverflow_operators::qwen2_5_vl::generate::{GenerationConfig, GenerationOverrides};
use leverflow_operators::qwen2_5_vl::model::{Qwen25Vl, QwenVqa};
use leverflow_operators::qwen2_5_vl::processor::{
    ImageSource, PromptRequest, VqaExample, VqaQuery,
};
use leverflow_operators::state::FileDigests;
use leverflow_operators::vqa::VqaModel;

use crate::cli::{BenchArgs, GenerateArgs, VqaArgs};
use crate::generate::VqaFactory;

/// The CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;

/// The CUDA backend (bf16 weights and activations).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<half::bf16, i32>;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CPU through ndarray.
    Cpu,
    /// CUDA device index.
    Cuda(usize),
}

/// Parses `--device`.
pub fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let idx = match s {
        "cuda" => Some(0),
        _ => s.strip_prefix("cuda:").and_then(|i| i.parse().ok()),
    };
    match idx {
        Some(i) if cfg!(feature = "cuda") => Ok(Device::Cuda(i)),
        Some(_) => bail!("--device {s}: this leverflow was built without CUDA support; rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use --device cpu"),
        None => bail!("--device {s}: expected cpu or cuda:N"),
    }
}

fn overrides(args: &GenerateArgs) -> GenerationOverrides {
    GenerationOverrides {
        max_new_tokens: Some(args.max_new_tokens),
        min_new_tokens: Some(args.min_new_tokens),
        num_beams: Some(args.vqa_num_beams),
        length_penalty: Some(args.length_penalty),
        repetition_penalty: args.repetition_penalty,
        do_sample: Some(false),
        ..Default::default()
    }
}

/// Loads the model once per distinct device of `devices` (one entry per
/// local worker: its device name and burn device) and returns the factory
/// that gives worker `w` an instance on `devices[w]`.
fn factory_on<B: Backend>(
    dir: &Path,
    devices: Vec<(String, B::Device)>,
    over: GenerationOverrides,
    cache_mb: usize,
) -> Result<(VqaFactory, serde_json::Value)>
where
    Qwen25Vl<B>: Send + Sync,
{
    let mut loaded: Vec<(String, Arc<Qwen25Vl<B>>)> = Vec::new();
    let mut of_worker = Vec::with_capacity(devices.len());
    for (name, device) in &devices {
        let slot = match loaded.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                loaded.push((name.clone(), Arc::new(Qwen25Vl::<B>::load(dir, device)?)));
                loaded.len() - 1
            }
        };
        of_worker.push(Arc::clone(&loaded[slot].1));
    }
    let first = of_worker
        .first()
        .cloned()
        .context("no device for the VQA model")?;
    let generation = GenerationConfig::resolve(&over, &first.generation_defaults)?;
    let identity = QwenVqa::new(first, generation.clone(), 0).identity();
    let f: VqaFactory = Arc::new(move |worker: usize| {
        let model = of_worker
            .get(worker % of_worker.len().max(1))
            .cloned()
            .context("no model for this worker")?;
        Ok(Box::new(QwenVqa::new(model, generation.clone(), cache_mb)) as Box<dyn VqaModel>)
    });
    Ok((f, identity))
}

/// The per-worker factory for `--vqa_backend qwen2_5_vl`.
/// `digests` serves the checkpoint files' hashes (remembered by earlier runs
/// while the files are unchanged).
pub fn factory(
    args: &GenerateArgs,
    digests: &FileDigests,
) -> Result<(VqaFactory, serde_json::Value)> {
    let dir = PathBuf::from(&args.vqa_model);
    if !dir.is_dir() {
        bail!("--vqa_model {}: not a local directory; pass the directory of a downloaded Qwen2.5-VL checkpoint (config.json, model*.safetensors, tokenizer.json, ...). leverflow never downloads models at run time.", args.vqa_model);
    }
    let over = overrides(args);
    let files = checkpoint_hashes(&dir, digests)?;
    let with_files = |(f, mut id): (VqaFactory, serde_json::Value)| {
        if let serde_json::Value::Object(m) = &mut id {
            m.insert("files_sha256".into(), files.clone());
        }
        (f, id)
    };
    // `--devices` (one per local worker, round robin) or `--device` for all.
    let (_, names) = args.cluster()?;
    let parsed: Vec<(String, Device)> = names
        .iter()
        .map(|n| parse_device(n).map(|d| (n.clone(), d)))
        .collect::<Result<_>>()?;
    let all_cpu = parsed.iter().all(|(_, d)| *d == Device::Cpu);
    let all_cuda = parsed.iter().all(|(_, d)| matches!(d, Device::Cuda(_)));
    if !all_cpu && !all_cuda {
        bail!(
            "--devices {}: mix of cpu and cuda devices; give only cuda:N devices or only cpu",
            names.join(",")
        );
    }
    match parsed.first().map(|(_, d)| *d).unwrap_or(Device::Cpu) {
        Device::Cpu => factory_on::<Cpu>(
            &dir,
            parsed
                .iter()
                .map(|(n, _)| (n.clone(), Default::default()))
                .collect(),
            over,
            args.vision_cache_mb,
        )
        .map(with_files),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => factory_on::<Gpu>(
            &dir,
            parsed
                .iter()
                .map(|(n, d)| {
                    let i = match d {
                        Device::Cuda(i) => *i,
                        Device::Cpu => 0,
                    };
                    (n.clone(), burn::backend::cuda::CudaDevice::new(i))
                })
                .collect(),
            over,
            args.vision_cache_mb,
        )
        .map(with_files),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => unreachable!("parse_device rejects cuda without the feature"),
    }
}

/// SHA-256 of every file of a checkpoint directory that defines the model's
/// behaviour (configs, tokenizer, chat template, weights): part of the
/// model's identity, so stored answers are reused only for the same model.
fn checkpoint_hashes(dir: &std::path::Path, digests: &FileDigests) -> Result<serde_json::Value> {
    let mut names: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the checkpoint directory {}", dir.display()))?
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, p)| {
            p.is_file()
                && [".json", ".safetensors", ".jinja", ".txt", ".model"]
                    .iter()
                    .any(|ext| n.ends_with(ext))
        })
        .collect();
    names.sort();
    let mut out = serde_json::Map::new();
    for (name, path) in names {
        let h = digests.sha256(&path)?;
        out.insert(name, serde_json::Value::String(h));
    }
    Ok(serde_json::Value::Object(out))
}

/// One request of `leverflow vqa`.
#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    examples: Vec<RequestExample>,
    query: RequestQuery,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default)]
    gen: RequestGen,
}

#[derive(Debug, Deserialize)]
struct RequestExample {
    image: PathBuf,
    question: String,
    answer: String,
}

#[derive(Debug, Deserialize)]
struct RequestQuery {
    image: PathBuf,
    question: String,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RequestGen {
    num_beams: Option<usize>,
    max_new_tokens: Option<usize>,
    min_new_tokens: Option<usize>,
    length_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    do_sample: Option<bool>,
}

fn read_requests(path: &Path) -> Result<Vec<Request>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: invalid JSON at line {} column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let items = match value {
        serde_json::Value::Array(xs) => xs,
        other => vec![other],
    };
    let base = path.parent().unwrap_or(Path::new("."));
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let mut r: Request = serde_json::from_value(v)
                .map_err(|e| anyhow::anyhow!("{}: request {i}: {e}", path.display()))?;
            // Relative image paths are relative to the request file.
            for e in &mut r.examples {
                e.image = base.join(&e.image);
            }
            r.query.image = base.join(&r.query.image);
            Ok(r)
        })
        .collect()
}

fn to_prompt_request(r: &Request) -> PromptRequest {
    PromptRequest::from_paths(
        r.system_prompt.clone(),
        r.examples
            .iter()
            .map(|e| (e.image.clone(), e.question.clone(), e.answer.clone())),
        (r.query.image.clone(), r.query.question.clone()),
    )
}

fn run_vqa_on<B: Backend>(args: &VqaArgs, device: B::Device) -> Result<()> {
    let requests = read_requests(&args.request)?;
    let model = Arc::new(Qwen25Vl::<B>::load(&args.vqa_model, &device)?);
    // Requests with the same generation settings are answered as one batch.
    let mut outputs: Vec<Option<serde_json::Value>> = vec![None; requests.len()];
    let mut groups: Vec<(&RequestGen, Vec<usize>)> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| **g == r.gen) {
            Some((_, idx)) => idx.push(i),
            None => groups.push((&r.gen, vec![i])),
        }
    }
    for (gen, idx) in groups {
        let over = GenerationOverrides {
            max_new_tokens: gen.max_new_tokens.or(Some(5)),
            min_new_tokens: gen.min_new_tokens.or(Some(0)),
            num_beams: gen.num_beams.or(Some(3)),
            length_penalty: gen.length_penalty.or(Some(0.0)),
            repetition_penalty: gen.repetition_penalty,
            do_sample: gen.do_sample.or(Some(false)),
            ..Default::default()
        };
        let generation = GenerationConfig::resolve(&over, &model.generation_defaults)?;
        let mut qv = QwenVqa::new(Arc::clone(&model), generation, 256);
        let reqs: Vec<PromptRequest> = idx
            .iter()
            .map(|&i| to_prompt_request(&requests[i]))
            .collect();
        let answers = qv.answer_requests(&reqs, None)?;
        for (i, a) in idx.into_iter().zip(answers) {
            let answer =
                leverflow_operators::accuracy::postprocess_generation(Some(&a.raw_generation));
            outputs[i] = Some(serde_json::json!({
                "prompt_text": a.prompt_text,
                "input_ids": a.input_ids,
                "generated_ids": a.generated_ids,
                "raw_generation": a.raw_generation,
                "answer": answer,
            }));
        }
    }
    for o in outputs.into_iter().flatten() {
        println!("{}", serde_json::to_string(&o)?);
    }
    Ok(())
}

/// `leverflow vqa`.
pub fn run_vqa_command(args: &VqaArgs) -> Result<()> {
    if !args.vqa_model.is_dir() {
        bail!("--vqa_model {}: not a local directory; pass the directory of a downloaded Qwen2.5-VL checkpoint (config.json, model*.safetensors, tokenizer.json, ...). leverflow never downloads models at run time.", args.vqa_model.display());
    }
    match parse_device(&args.device)? {
        Device::Cpu => run_vqa_on::<Cpu>(args, Default::default()),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => run_vqa_on::<Gpu>(args, burn::backend::cuda::CudaDevice::new(i)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => unreachable!("parse_device rejects cuda without the feature"),
    }
}

/// `leverflow bench vqa`: prompts/s at batch 1 (a loop) and at `--batch_size`
/// on the same prompts (the tiny fixture model unless `--vqa_model`).
pub fn bench_vqa(args: &BenchArgs) -> Result<()> {
    let dir = args.vqa_model.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl_tiny")
    });
    let device = Default::default();
    let synthetic = match args.synthetic_3b_layers {
        Some(layers) => Some(synthetic_3b_checkpoint(&dir, layers)?),
        None => None,
    };
    let model_dir = synthetic.as_ref().map_or(dir.as_path(), |t| t.path());
    let model = Arc::new(Qwen25Vl::<Cpu>::load(model_dir, &device)?);
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
    )?;
    let images: Vec<PathBuf> = std::fs::read_dir(dir.join("images"))
        .with_context(|| format!("{}: no images/ folder with prompt images", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("easyvqa"))
        })
        .collect();
    let mut images = images;
    images.sort();
    if images.len() < 3 {
        bail!("{}: need at least 3 easyvqa_*.png images", dir.display());
    }
    let n = args.queries.clamp(8, 64);
    let reqs: Vec<PromptRequest> = (0..n)
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
        .collect();
    let reps = args.reps.max(1);
    for batch in [1usize, args.batch_size.max(1)] {
        let secs = crate::bench::time_runs(reps, || {
            // A fresh cache each run: every image is encoded again.
            let mut qv = QwenVqa::new(Arc::clone(&model), generation.clone(), 256);
            for chunk in reqs.chunks(batch) {
                qv.answer_requests(chunk, None)?;
            }
            Ok(())
        })?;
        crate::bench::report(
            "vqa",
            "prompts",
            n as f64,
            &secs,
            serde_json::json!({
                "batch_size": batch,
                "model": dir.display().to_string(),
                "synthetic_3b_layers": args.synthetic_3b_layers,
            }),
        );
    }
    Ok(())
}

/// A checkpoint directory (deleted when dropped) with `layers` decoder
/// layers of Qwen2.5-VL-3B's text width and random weights, plus the
/// tokenizer, chat template and processor settings of `fixture`. The vision
/// tower keeps the fixture's size and projects to the 3B width. Used by
/// `bench vqa --synthetic_3b_layers`: the published 3B cannot be
/// downloaded here, and the tiny fixture's weights are too small for
/// batching to have anything to share.
fn synthetic_3b_checkpoint(fixture: &Path, layers: usize) -> Result<tempfile::TempDir> {
    use leverflow_operators::demo_vlm::checkpoint::{random_weights, write_safetensors};
    use leverflow_operators::qwen2_5_vl::config::Qwen25VlConfig;
    if layers == 0 {
        bail!("--synthetic_3b_layers must be at least 1");
    }
    let tmp = tempfile::tempdir().context("temporary directory for the synthetic checkpoint")?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
    ] {
        let src = fixture.join(f);
        if src.exists() {
            std::fs::copy(&src, tmp.path().join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let path = fixture.join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
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
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let parsed = Qwen25VlConfig::from_file(&config_path)?;
    eprintln!(
        "writing a synthetic checkpoint ({layers} layers of the 3B's width, random weights) to {}",
        tmp.path().display()
    );
    let weights = random_weights(&parsed, 0, 0.02);
    write_safetensors(&tmp.path().join("model.safetensors"), &weights)?;
    Ok(tmp)
}
