//! Choosing and building the VQA backend of a run (`--vqa_backend`).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Arc;

use leverflow_operators::sinks::{read_rl_parquet, rows_to_records, visit_rl_json};
use leverflow_operators::vqa::{ReplayIndex, ReplayModel, VqaAnswer, VqaModel};
use leverflow_schemas::RlRecord;

use crate::cli::GenerateArgs;
use crate::generate::VqaFactory;

/// Builds the factory of per-worker backend instances and the backend's
/// identity for `_meta`.
pub fn vqa_factory(args: &GenerateArgs) -> Result<(VqaFactory, serde_json::Value)> {
    match args.vqa_backend.as_str() {
        "replay" => {
            let path = args
                .replay_from
                .as_deref()
                .context("--vqa_backend replay needs --replay_from FILE (an earlier leverflow JSON or Parquet output)")?;
            let index = Arc::new(load_replay(path)?);
            let mut identity = ReplayModel::new(Arc::clone(&index)).identity();
            // The recorded answers are the model: identify them by content.
            if let serde_json::Value::Object(m) = &mut identity {
                m.insert(
                    "sha256".into(),
                    leverflow_operators::tensor_io::file_sha256(path)?.into(),
                );
            }
            let f: VqaFactory = Arc::new(move |_worker: usize| {
                Ok(Box::new(ReplayModel::new(Arc::clone(&index))) as Box<dyn VqaModel>)
            });
            Ok((f, identity))
        }
        "qwen2_5_vl" | "qwen2.5_vl" => crate::qwen::factory(args),
        other => bail!("--vqa_backend {other}: expected qwen2_5_vl or replay"),
    }
}

fn add_record(index: &mut ReplayIndex, q: u64, r: &RlRecord) {
    for c in &r.pointer_candidates {
        if let Some(raw) = &c.vqa_raw_generation {
            index.insert(
                q,
                c.dataset_indices().to_vec(),
                VqaAnswer {
                    raw_generation: raw.clone(),
                    gt_prob: c.vqa_gt_prob,
                    prompt_text: c.prompt_text.clone(),
                },
            );
        }
    }
}

/// Reads the raw generations of an earlier output (JSON or Parquet, by
/// extension) into a replay index.
pub fn load_replay(path: &Path) -> Result<ReplayIndex> {
    let mut index = ReplayIndex::new(path.to_path_buf());
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if is_parquet {
        let (_meta, rows) = read_rl_parquet(path)?;
        for (q, r) in rows_to_records(rows) {
            add_record(&mut index, q, &r);
        }
    } else {
        visit_rl_json(path, |q, r| {
            add_record(&mut index, q, &r);
            Ok(())
        })?;
    }
    if index.is_empty() {
        bail!(
            "{}: no candidate with `vqa_raw_generation` found; replay needs an output of `leverflow generate`",
            path.display()
        );
    }
    Ok(index)
}
