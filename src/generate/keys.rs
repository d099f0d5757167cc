//! The content keys of a run (see `leverflow_operators::state`): what each
//! stored result depends on, so a rerun reuses exactly the results whose
//! inputs are unchanged.
//!
//! * **candidate set** of a query: the checkpoint (hash), the candidate
//!   embeddings (hash) and pool (candidate indices or the query's sampler
//!   pool), the query's embedding row, its index (the sampling RNG is seeded
//!   from it), the sampling settings and seed, and its beam-data beams when
//!   they become candidates;
//! * **VQA answer** of a prompt: the model identity (every checkpoint file's
//!   hash and the generation settings; for replay the recorded file's hash),
//!   the system prompt, the query's and examples' indices, questions,
//!   answers and images (path, size and modification time: hashing every
//!   image's bytes would read the whole image set on every run), and the
//!   ground-truth answers when `--gt_prob` asks for their probability;
//! * **record** of a query (its input key): all of the above, plus the
//!   reward, layout and scoring settings, the annotation files (hash) and
//!   the leverflow version. Reusing a record needs no work at all; when only
//!   the record's key changed, the candidates and answers still come from
//!   the store.

use anyhow::Result;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use leverflow_operators::state::{Key, KeyHasher};
use leverflow_operators::vqa::VqaPrompt;

use super::inputs::{Inputs, Pools};
use super::stages::QueryWork;
use super::Job;
use crate::cli::GenerateArgs;

/// Size and modification time of an image file (`None`: missing).
pub type ImageStamp = Option<(u64, i128)>;

/// Looks up an image's stamp (one `stat`).
pub fn image_stamp(path: &Path) -> ImageStamp {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    Some((m.len(), mtime))
}

fn add_stamp(h: &mut KeyHasher, path: &Path, stamp: ImageStamp) {
    h.str(&path.to_string_lossy());
    match stamp {
        Some((len, mtime)) => h.u64(len).u64(mtime as u64).u64((mtime >> 64) as u64),
        None => h.str("missing"),
    };
}

/// The run-wide parts of every key, computed once.
#[derive(Debug, Clone)]
pub struct RunKeys {
    /// Everything a candidate set depends on besides the query.
    pub candidates: Key,
    /// Everything an answer depends on besides the prompt.
    pub vqa: Key,
    /// Everything a record depends on besides the query.
    pub record: Key,
}

impl RunKeys {
    /// Builds the run-wide keys from the arguments, the loaded inputs and
    /// the VQA backend's identity.
    pub fn new(
        args: &GenerateArgs,
        inputs: &Inputs,
        model_identity: &serde_json::Value,
        job: Job,
    ) -> Result<Self> {
        let hash = |name: &str| inputs.hashes.get(name).cloned().unwrap_or_default();
        let mut c = KeyHasher::new("leverflow/candidates/v1");
        c.str(&hash("sft_ckpt"))
            .str(&hash("cand_emb"))
            .str(&hash("candidate_indices"))
            .str(&hash("sampler_cache"))
            .u64(args.num_heads as u64)
            .json(&inputs.cand_args)
            .u64(args.include_source_beams as u64);
        let candidates = c.finish();

        let mut v = KeyHasher::new("leverflow/vqa/v1");
        v.json(model_identity)
            .str(
                args.system_prompt
                    .as_deref()
                    .unwrap_or(leverflow_operators::vqa::DEFAULT_SYSTEM_PROMPT),
            )
            .u64(args.gt_prob as u64);
        let vqa = v.finish();

        let mut r = KeyHasher::new("leverflow/record/v1");
        r.str(env!("CARGO_PKG_VERSION"))
            .str(match job {
                Job::Generate => "generate",
                Job::Candidates => "candidates",
            })
            .key(&candidates)
            .key(&vqa)
            .str(&format!("{:?}", inputs.reward))
            .str(&format!("{:?}", inputs.layout))
            .u64(args.save_prompts as u64)
            .u64(inputs.strict as u64)
            .str(&args.on_missing_image)
            .str(&hash("train_ques_path"))
            .str(&hash("train_ann_path"));
        for p in [&args.train_path, &args.val_ques_path, &args.val_ann_path] {
            match p {
                Some(p) => r.str(&inputs.digests.sha256(p)?),
                None => r.str(""),
            };
        }
        // A shared pool's examples appear in every prompt: their content
        // (and, with VQA, their images) is part of every record's key.
        if let Pools::Shared { indices, .. } = &inputs.pools {
            for &i in indices.iter() {
                add_item(&mut r, inputs, i, job == Job::Generate)?;
            }
        }
        Ok(Self {
            candidates,
            vqa,
            record: r.finish(),
        })
    }

    /// The key of a query's inputs: its record is reused when this matches.
    /// `stamps` caches image stamps (questions share images).
    pub fn input_key(
        &self,
        inputs: &Inputs,
        w: &QueryWork,
        with_images: bool,
        stamps: &mut HashMap<PathBuf, ImageStamp>,
    ) -> Result<Key, String> {
        let mut h = KeyHasher::new("leverflow/input/v1");
        h.key(&self.record).u64(w.query_index);
        for beam in &w.source_beams {
            h.u64s(beam);
        }
        h.str("end-beams");
        query_row(&mut h, inputs, w.query_index)?;
        if with_images {
            let item = inputs
                .dataset
                .get(w.query_index)
                .map_err(|e| e.to_string())?;
            add_content(&mut h, item);
            let s = *stamps
                .entry(item.image_path.clone())
                .or_insert_with(|| image_stamp(&item.image_path));
            add_stamp(&mut h, &item.image_path, s);
        } else {
            add_item(&mut h, inputs, w.query_index, false).map_err(|e| e.to_string())?;
        }
        if let Pools::PerQuery { pools } = &inputs.pools {
            if let Some(ids) = pools.get(&w.query_index) {
                h.u64s(ids);
                // Pool members' content, but not their image stamps (a stat
                // per member per query costs too much on large pools): an
                // example image edited in place is not noticed here.
                for &i in ids {
                    add_item(&mut h, inputs, i, false).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(h.finish())
    }

    /// The key of a query's candidate set.
    pub fn candidates_key(
        &self,
        inputs: &Inputs,
        w: &QueryWork,
        include_source_beams: bool,
    ) -> Result<Key, String> {
        let mut h = KeyHasher::new("leverflow/candidate-set/v1");
        h.key(&self.candidates).u64(w.query_index);
        query_row(&mut h, inputs, w.query_index)?;
        if include_source_beams {
            for beam in &w.source_beams {
                h.u64s(beam);
            }
        }
        if let Pools::PerQuery { pools } = &inputs.pools {
            if let Some(ids) = pools.get(&w.query_index) {
                h.u64s(ids);
            }
        }
        Ok(h.finish())
    }

    /// The key of a prompt's answer. `stamps` caches image stamps.
    pub fn vqa_key(&self, p: &VqaPrompt, stamps: &mut HashMap<PathBuf, ImageStamp>) -> Key {
        let mut h = KeyHasher::new("leverflow/vqa-answer/v1");
        h.key(&self.vqa).str(&p.system_prompt).u64(p.query_index);
        for e in &p.examples {
            h.u64(e.dataset_index).str(&e.question).str(&e.answer);
            let s = *stamps
                .entry(e.image.clone())
                .or_insert_with(|| image_stamp(&e.image));
            add_stamp(&mut h, &e.image, s);
        }
        h.str(&p.query_question);
        let s = *stamps
            .entry(p.query_image.clone())
            .or_insert_with(|| image_stamp(&p.query_image));
        add_stamp(&mut h, &p.query_image, s);
        h.u64(p.gt_answers.len() as u64);
        for (a, w) in &p.gt_answers {
            h.str(a).f64(*w);
        }
        h.finish()
    }
}

fn query_row(h: &mut KeyHasher, inputs: &Inputs, q: u64) -> Result<(), String> {
    let m = &inputs.query_emb;
    if (q as usize) < m.rows {
        h.f32s(m.row(q as usize));
        Ok(())
    } else {
        Err(format!(
            "{}: query {q} is outside the query embeddings {} ({} rows)",
            inputs.beam_path.display(),
            inputs.query_emb_path.display(),
            m.rows
        ))
    }
}

/// Adds a dataset item's text content.
fn add_content(h: &mut KeyHasher, item: &leverflow_operators::dataset::VqaItem) {
    h.u64(item.question_id)
        .u64(item.image_id)
        .str(&item.question)
        .str(&item.icd_answer)
        .u64(item.answers.len() as u64);
    for a in &item.answers {
        h.str(a);
    }
}

/// Adds a dataset item's content (and its image's stamp when images
/// matter).
fn add_item(h: &mut KeyHasher, inputs: &Inputs, index: u64, with_image: bool) -> Result<()> {
    let item = inputs.dataset.get(index)?;
    add_content(h, item);
    if with_image {
        add_stamp(h, &item.image_path, image_stamp(&item.image_path));
    } else {
        h.str(&item.image_path.to_string_lossy());
    }
    Ok(())
}
