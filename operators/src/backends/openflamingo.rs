//! The OpenFlamingo backend: `flamingo_3B` (its three repositories in the
//! Hugging Face cache, [`crate::models::hub::resolve_openflamingo`]) or a
//! directory in OpenFlamingo's local layout ([`FlamingoFiles::from_dir`]:
//! `lm/`, the open_clip vision weights and config, OpenFlamingo's
//! checkpoint), answered by the burn model on the CPU. It is chosen when
//! `--vqa_model` names one of them ([`is_openflamingo`]); the weights load
//! once and are shared by the workers.

use std::path::Path;
use std::sync::Arc;

use super::device::{Device, DeviceKind};
use super::qwen2_5_vl::{overrides, Cpu};
use super::request::VqaRequest;
use super::{BackendContext, BackendError, LoadedBackend, VqaFactory};
use crate::models::contract::VqaModel;
use crate::models::hub::{self, HubSettings, FLAMINGO_3B};
use crate::models::openflamingo::vqa::{generation_config, prompt_of, FlamingoVqa};
use crate::models::openflamingo::weights::find_file;
use crate::models::openflamingo::{FlamingoError, FlamingoFiles, OpenFlamingo};
use crate::state::FileDigests;

/// Whether a `vqa_model` value names OpenFlamingo: `flamingo_3B`, or a
/// directory with the language model in `lm/`.
pub fn is_openflamingo(name: &str) -> bool {
    name == FLAMINGO_3B || Path::new(name).join("lm").join("config.json").is_file()
}

/// The files of the model a `vqa_model` value names: a directory's local
/// layout, or `flamingo_3B`'s repositories (the cache, else a download).
pub fn model_files(name: &str, settings: &HubSettings) -> Result<FlamingoFiles, BackendError> {
    let dir = Path::new(name);
    if name != FLAMINGO_3B || dir.is_dir() {
        return Ok(FlamingoFiles::from_dir(dir)?);
    }
    let [lm, vision, checkpoint] = hub::resolve_openflamingo(settings)?;
    let vision_weights = find_file(
        &vision,
        &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
    )
    .map_err(FlamingoError::from)?;
    Ok(FlamingoFiles {
        lm_dir: lm,
        vision_config: vision.join("open_clip_config.json"),
        vision_weights,
        checkpoint: checkpoint.join("checkpoint.pt"),
    })
}

/// Loads the backend of a run (see [`super::load`]).
pub fn load(ctx: &BackendContext<'_>) -> Result<LoadedBackend, BackendError> {
    let cfg = ctx.config;
    if ctx.devices.iter().any(|d| d.kind() != DeviceKind::Cpu) {
        return Err(BackendError::FlamingoDevice);
    }
    let settings = HubSettings::from_env(cfg.revision.as_deref(), cfg.offline);
    let files = model_files(&cfg.vqa_model, &settings)?;
    let mut hashes = serde_json::Map::new();
    for (label, f) in files.all()? {
        hashes.insert(label, digests_sha(ctx.digests, &f)?);
    }
    let model = Arc::new(OpenFlamingo::<Cpu>::load_files(
        &files,
        &Default::default(),
    )?);
    let generation = generation_config(&overrides(cfg), model.tokenizer.eos_token_id)?;
    let limits = cfg.image_limits();
    let mut identity = FlamingoVqa::new(Arc::clone(&model), generation.clone(), limits).identity();
    if let serde_json::Value::Object(m) = &mut identity {
        m.insert("files_sha256".into(), serde_json::Value::Object(hashes));
    }
    let factory: VqaFactory = Arc::new(move |_worker: usize| {
        Ok(Box::new(FlamingoVqa::new(
            Arc::clone(&model),
            generation.clone(),
            limits,
        )) as Box<dyn VqaModel>)
    });
    Ok(LoadedBackend {
        factory,
        identity,
        recorded: None,
    })
}

fn digests_sha(digests: &FileDigests, path: &Path) -> Result<serde_json::Value, BackendError> {
    Ok(serde_json::Value::String(digests.sha256(path)?))
}

/// Answers `requests` (the `leverflow vqa` request file) with the
/// OpenFlamingo model `model` (`flamingo_3B` or a directory): one JSON object per request with
/// `prompt_text`, `input_ids`, `generated_ids`, `raw_generation` and the
/// post-processed `answer`. Requests with the same generation settings are
/// answered as one batch.
pub fn answer_requests(
    model: &str,
    settings: &HubSettings,
    device: Device,
    requests: &[VqaRequest],
) -> Result<Vec<serde_json::Value>, BackendError> {
    if device.kind() != DeviceKind::Cpu {
        return Err(BackendError::FlamingoDevice);
    }
    let files = model_files(model, settings)?;
    let model = Arc::new(OpenFlamingo::<Cpu>::load_files(
        &files,
        &Default::default(),
    )?);
    let mut outputs: Vec<Option<serde_json::Value>> = vec![None; requests.len()];
    for (gen, idx) in super::request::group_by_settings(requests) {
        let generation = generation_config(&gen.overrides(), model.tokenizer.eos_token_id)?;
        let mut fv = FlamingoVqa::new(Arc::clone(&model), generation, Default::default());
        let prompts: Vec<_> = idx
            .iter()
            .map(|&i| prompt_of(&requests[i].prompt))
            .collect();
        let answers = fv.answer_prompts(&prompts)?;
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
