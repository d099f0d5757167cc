//! Choosing and building the VQA backend of a run (`--vqa_backend`).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Arc;

use leverflow_operators::sinks::{read_rl_parquet, rows_to_records};
use leverflow_operators::state::FileDigests;
use leverflow_operators::vqa::{ReplayIndex, ReplayModel, VqaError, VqaModel};

use crate::cli::GenerateArgs;
use crate::generate::VqaFactory;

/// Builds the factory of per-worker backend instances and the backend's
/// identity for `_meta`.
pub fn vqa_factory(
    args: &GenerateArgs,
    digests: &FileDigests,
) -> Result<(VqaFactory, serde_json::Value)> {
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
                m.insert("sha256".into(), digests.sha256(path)?.into());
            }
            tracing::debug!("replay backend loaded");
            let f: VqaFactory = Arc::new(move |_worker: usize| {
                Ok(Box::new(ReplayModel::new(Arc::clone(&index))) as Box<dyn VqaModel>)
            });
            Ok((f, identity))
        }
        "qwen2_5_vl" | "qwen2.5_vl" => crate::qwen::factory(args, digests),
        other => bail!("--vqa_backend {other}: expected qwen2_5_vl or replay"),
    }
}

/// Reads the raw generations of an earlier output into a replay index: a
/// Parquet file (by extension) is read whole; a JSON file is opened lazily
/// (scanned at once, each query's record parsed when first needed; see
/// [`ReplayIndex::open_json`]).
pub fn load_replay(path: &Path) -> Result<ReplayIndex> {
    let is_parquet = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if !is_parquet {
        return Ok(ReplayIndex::open_json(path)?);
    }
    let mut index = ReplayIndex::new(path.to_path_buf());
    let (_meta, rows) = read_rl_parquet(path)?;
    for (q, r) in rows_to_records(rows) {
        index.insert_record(q, &r);
    }
    if !index.has_answers() {
        return Err(VqaError::NotGenerateOutput {
            path: path.to_path_buf(),
        }
        .into());
    }
    Ok(index)
}
