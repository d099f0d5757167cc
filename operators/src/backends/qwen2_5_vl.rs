//! The `qwen2_5_vl` backend: a Qwen2.5-VL checkpoint directory answered by
//! the burn model, on the CPU (`ndarray` with leverflow's host kernels), on
//! CUDA devices (the `cuda` feature) or on wgpu adapters (the `wgpu`
//! feature: Vulkan, Metal, DX12). CUDA and wgpu run the same generic burn
//! code. The weights load once per distinct device and are shared by the
//! workers on it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;

use super::device::{Device, DeviceKind};
use super::request::VqaRequest;
use super::{BackendContext, BackendError, LoadedBackend, VqaFactory};
use crate::config::RunConfig;
use crate::image_decode::ImageLimits;
use crate::models::contract::{GtProbMode, VqaModel};
use crate::models::hub::HubSettings;
use crate::models::qwen2_5_vl::generate::{GenerationConfig, GenerationOverrides};
use crate::models::qwen2_5_vl::model::{request_of, Qwen25Vl, QwenVqa};
use crate::state::FileDigests;

/// The CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;

/// The CUDA backend (bf16 weights and activations).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<half::bf16, i32>;

/// The wgpu backend (f32 weights and activations).
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Wgpu<f32, i32>;

/// The burn device of a `wgpu` / `wgpu:N` device name; `wgpu:N` must name
/// one of the discrete GPUs wgpu sees.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(
    adapter: super::device::WgpuAdapter,
) -> Result<burn::backend::wgpu::WgpuDevice, BackendError> {
    use super::device::WgpuAdapter;
    use burn::backend::wgpu::WgpuDevice;
    match adapter {
        WgpuAdapter::Default => Ok(WgpuDevice::DefaultDevice),
        WgpuAdapter::Discrete(index) => {
            // Type id 0 = discrete GPUs (cubecl's numbering).
            let found = <WgpuBackend as Backend>::device_count(0);
            if index < found {
                Ok(WgpuDevice::DiscreteGpu(index))
            } else {
                Err(BackendError::NoWgpuAdapter { index, found })
            }
        }
    }
}

/// The generation settings of a run (HF's defaults for what is unset).
pub fn overrides(cfg: &RunConfig) -> GenerationOverrides {
    GenerationOverrides {
        max_new_tokens: Some(cfg.max_new_tokens),
        min_new_tokens: Some(cfg.min_new_tokens),
        num_beams: Some(cfg.vqa_num_beams),
        length_penalty: Some(cfg.length_penalty),
        repetition_penalty: cfg.repetition_penalty,
        do_sample: Some(false),
        ..Default::default()
    }
}

/// The checkpoint directory a `vqa_model` value names (a directory, a
/// hub repository id or an alias; see [`crate::models::hub`]).
pub fn model_dir(name: &str, hub: &HubSettings) -> Result<PathBuf, BackendError> {
    Ok(crate::models::hub::resolve(name, hub)?)
}

/// Loads the backend of a run (see [`super::load`]).
pub fn load(ctx: &BackendContext<'_>) -> Result<LoadedBackend, BackendError> {
    let cfg = ctx.config;
    let hub = HubSettings::from_env(cfg.revision.as_deref(), cfg.offline);
    let dir = model_dir(&cfg.vqa_model, &hub)?;
    let over = overrides(cfg);
    let files = checkpoint_hashes(&dir, ctx.digests)?;
    let kind = device_kind(ctx.devices)?;
    let limits = cfg.image_limits();
    let (cache_mb, devs) = (cfg.vision_cache_mb, ctx.devices);
    let over = (over, cfg.gt_prob_mode);
    let mut loaded = match kind {
        DeviceKind::Cpu => factory_on::<Cpu>(&dir, on_cpu(devs), over, cache_mb, limits)?,
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => factory_on::<Gpu>(&dir, on_cuda(devs), over, cache_mb, limits)?,
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => return Err(BackendError::NoCuda),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => {
            factory_on::<WgpuBackend>(&dir, on_wgpu(devs)?, over, cache_mb, limits)?
        }
        #[cfg(not(feature = "wgpu"))]
        DeviceKind::Wgpu => return Err(BackendError::NoWgpu),
    };
    if let serde_json::Value::Object(m) = &mut loaded.identity {
        m.insert("files_sha256".into(), files);
    }
    Ok(loaded)
}

/// The one device kind of a process's workers (`cpu` when none is given).
fn device_kind(devices: &[Device]) -> Result<DeviceKind, BackendError> {
    let kind = devices.first().map_or(DeviceKind::Cpu, Device::kind);
    if devices.iter().any(|d| d.kind() != kind) {
        return Err(BackendError::MixedDevices);
    }
    Ok(kind)
}

/// Each worker's device on the CPU backend.
fn on_cpu(devices: &[Device]) -> Vec<(Device, burn::backend::ndarray::NdArrayDevice)> {
    devices.iter().map(|d| (*d, Default::default())).collect()
}

/// Each worker's device on the CUDA backend.
#[cfg(feature = "cuda")]
fn on_cuda(devices: &[Device]) -> Vec<(Device, burn::backend::cuda::CudaDevice)> {
    devices
        .iter()
        .map(|d| {
            let i = match d {
                Device::Cuda(i) => *i,
                _ => 0,
            };
            (*d, burn::backend::cuda::CudaDevice::new(i))
        })
        .collect()
}

/// Each worker's device on the wgpu backend.
#[cfg(feature = "wgpu")]
fn on_wgpu(
    devices: &[Device],
) -> Result<Vec<(Device, burn::backend::wgpu::WgpuDevice)>, BackendError> {
    devices
        .iter()
        .map(|d| match d {
            Device::Wgpu(a) => Ok((*d, wgpu_device(*a)?)),
            _ => Err(BackendError::MixedDevices),
        })
        .collect()
}

/// Loads the model once per distinct device of `devices` (one entry per
/// local worker) and returns the factory that gives worker `w` an instance
/// on `devices[w]`.
fn factory_on<B: Backend>(
    dir: &Path,
    devices: Vec<(Device, B::Device)>,
    (over, gt_mode): (GenerationOverrides, GtProbMode),
    cache_mb: usize,
    limits: ImageLimits,
) -> Result<LoadedBackend, BackendError>
where
    Qwen25Vl<B>: Send + Sync,
{
    let mut loaded: Vec<(Device, Arc<Qwen25Vl<B>>)> = Vec::new();
    let mut of_worker = Vec::with_capacity(devices.len());
    for (name, device) in &devices {
        let slot = match loaded.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                let mut model = Qwen25Vl::<B>::load(dir, device)?;
                model.processor.set_image_limits(limits);
                loaded.push((*name, Arc::new(model)));
                loaded.len() - 1
            }
        };
        of_worker.push(Arc::clone(&loaded[slot].1));
    }
    let first = of_worker.first().cloned().ok_or(BackendError::NoDevice)?;
    let generation = GenerationConfig::resolve(&over, &first.generation_defaults)
        .map_err(|e| BackendError::Qwen(e.into()))?;
    let identity = QwenVqa::new(first, generation.clone(), 0)
        .with_gt_prob_mode(gt_mode)
        .identity();
    let factory: VqaFactory = Arc::new(move |worker: usize| {
        let model = of_worker
            .get(worker % of_worker.len().max(1))
            .cloned()
            .ok_or(BackendError::NoDevice)?;
        let vqa = QwenVqa::new(model, generation.clone(), cache_mb).with_gt_prob_mode(gt_mode);
        Ok(Box::new(vqa) as Box<dyn VqaModel>)
    });
    Ok(LoadedBackend {
        factory,
        identity,
        recorded: None,
    })
}

/// SHA-256 of every file of a checkpoint directory that defines the model's
/// behaviour (configs, tokenizer, chat template, weights): part of the
/// model's identity, so stored answers are reused only for the same model.
fn checkpoint_hashes(dir: &Path, digests: &FileDigests) -> Result<serde_json::Value, BackendError> {
    let entries = std::fs::read_dir(dir).map_err(|source| BackendError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<(String, PathBuf)> = entries
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
        out.insert(name, serde_json::Value::String(digests.sha256(&path)?));
    }
    Ok(serde_json::Value::Object(out))
}

/// Answers `requests` (the `leverflow vqa` request file) with the checkpoint
/// at `model`: one JSON object per request with `prompt_text`, `input_ids`,
/// `generated_ids`, `raw_generation` and the post-processed `answer`.
/// Requests with the same generation settings are answered as one batch.
pub fn answer_requests(
    model: &str,
    hub: &HubSettings,
    device: Device,
    requests: &[VqaRequest],
) -> Result<Vec<serde_json::Value>, BackendError> {
    let dir = model_dir(model, hub)?;
    match device {
        Device::Cpu => answer_on::<Cpu>(&dir, &Default::default(), requests),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            answer_on::<Gpu>(&dir, &burn::backend::cuda::CudaDevice::new(i), requests)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(BackendError::NoCuda),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(a) => answer_on::<WgpuBackend>(&dir, &wgpu_device(a)?, requests),
        #[cfg(not(feature = "wgpu"))]
        Device::Wgpu(_) => Err(BackendError::NoWgpu),
    }
}

fn answer_on<B: Backend>(
    dir: &Path,
    device: &B::Device,
    requests: &[VqaRequest],
) -> Result<Vec<serde_json::Value>, BackendError> {
    let model = Arc::new(Qwen25Vl::<B>::load(dir, device)?);
    let mut outputs: Vec<Option<serde_json::Value>> = vec![None; requests.len()];
    for (gen, idx) in super::request::group_by_settings(requests) {
        let generation = GenerationConfig::resolve(&gen.overrides(), &model.generation_defaults)
            .map_err(|e| BackendError::Qwen(e.into()))?;
        let mut qv = QwenVqa::new(Arc::clone(&model), generation, 256);
        let reqs: Vec<_> = idx
            .iter()
            .map(|&i| request_of(&requests[i].prompt))
            .collect();
        let answers = qv.answer_requests(&reqs, None)?;
        for (i, a) in idx.into_iter().zip(answers) {
            outputs[i] = Some(super::request::answer_line(
                &a.prompt_text,
                &a.input_ids,
                &a.generated_ids,
                &a.raw_generation,
            ));
        }
    }
    Ok(outputs.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::device::{parse_devices, WgpuAdapter};

    #[test]
    fn one_device_kind_per_process() {
        let kind = |spec: &str| device_kind(&parse_devices(spec).unwrap());
        assert!(matches!(kind("cpu,wgpu"), Err(BackendError::MixedDevices)));
        assert!(matches!(
            kind("cuda:0,wgpu:0"),
            Err(BackendError::MixedDevices)
        ));
        assert_eq!(kind("wgpu:0,wgpu:1,wgpu").unwrap(), DeviceKind::Wgpu);
        assert_eq!(kind("cuda:1").unwrap(), DeviceKind::Cuda);
        assert_eq!(device_kind(&[]).unwrap(), DeviceKind::Cpu);
    }

    /// A build without a feature names the feature to rebuild with.
    #[test]
    fn a_device_without_its_feature_is_a_typed_error() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/qwen2_5_vl_tiny"
        );
        let hub = crate::models::hub::HubSettings::from_env(None, true);
        #[cfg(not(feature = "wgpu"))]
        assert!(matches!(
            answer_requests(dir, &hub, Device::Wgpu(WgpuAdapter::Default), &[]),
            Err(BackendError::NoWgpu)
        ));
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            answer_requests(dir, &hub, Device::Cuda(0), &[]),
            Err(BackendError::NoCuda)
        ));
        let _ = (dir, &hub, WgpuAdapter::Default);
    }
}
