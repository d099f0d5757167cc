//! Content keys: SHA-256 over a domain tag and length-prefixed fields, so
//! that a result is found again exactly when everything it depends on is
//! unchanged (and two different field lists can never collide by
//! concatenation). Every field is encoded explicitly (never through `Debug`
//! text), and a test pins the bytes of known keys.
//!
//! What each stored result depends on:
//!
//! * **candidate set** of a query ([`RunKeys::candidate_set`]): the
//!   checkpoint, candidate embeddings and pool files (hashes), the selector's
//!   head count, the sampling settings and seed, the query's index (its RNG
//!   is seeded from it) and embedding row, its beam-data beams when they
//!   become candidates, and its own pool;
//! * **VQA answer** of a prompt ([`RunKeys::vqa_answer`]): the model identity
//!   (every checkpoint file's hash and the generation settings; for replay
//!   the recorded file's hash), the system prompt, the query's and
//!   examples' indices, questions, answers and images (path and identity:
//!   device, inode, size, modification and status-change times — hashing
//!   every image's bytes would read the whole image set on every run, and a
//!   file replaced with `cp -p` keeps its size and modification time but
//!   not its inode or change time), and the ground-truth answers when their
//!   probability is asked for;
//! * **record** of a query, its input key ([`RunKeys::input_key`]): all of
//!   the above, plus the reward, layout and scoring settings, the
//!   annotation files (hash) and the leverflow version. Reusing a record
//!   needs no work at all; when only the record's key changed, the
//!   candidates and answers still come from the store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use leverflow_schemas::PointerLayout;

use super::digests::FileIdentity;
use crate::candidates::CandidateArgs;
use crate::dataset::VqaItem;
use crate::models::contract::VqaPrompt;
use crate::reward::RewardConfig;
use sha2::{Digest, Sha256};

/// A 32-byte content key (SHA-256).
pub type Key = [u8; 32];

/// Builds a [`Key`] from typed fields. Every field is written with a type
/// tag and its length, so `("ab", "c")` and `("a", "bc")` differ.
#[derive(Clone)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// A hasher for keys of one kind (`domain` separates kinds, e.g.
    /// `"vqa-answer/v1"`).
    pub fn new(domain: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"leverflow-key\0");
        h.update((domain.len() as u64).to_le_bytes());
        h.update(domain.as_bytes());
        Self(h)
    }

    fn tagged(&mut self, tag: u8, bytes: &[u8]) -> &mut Self {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.tagged(b'b', b)
    }

    /// Adds a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.tagged(b's', s.as_bytes())
    }

    /// Adds an integer.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.tagged(b'u', &v.to_le_bytes())
    }

    /// Adds a float by its bit pattern.
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.tagged(b'f', &v.to_bits().to_le_bytes())
    }

    /// Adds an optional string (absent and empty differ).
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.tagged(b'S', s.as_bytes()),
            None => self.tagged(b'N', &[]),
        }
    }

    /// Adds a list of integers.
    pub fn u64s(&mut self, v: &[u64]) -> &mut Self {
        self.0.update([b'U']);
        self.0.update((v.len() as u64).to_le_bytes());
        for x in v {
            self.0.update(x.to_le_bytes());
        }
        self
    }

    /// Adds a row of `f32` values by their bit patterns.
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.0.update([b'F']);
        self.0.update((v.len() as u64).to_le_bytes());
        for x in v {
            self.0.update(x.to_bits().to_le_bytes());
        }
        self
    }

    /// Adds another key.
    pub fn key(&mut self, k: &Key) -> &mut Self {
        self.tagged(b'k', k)
    }

    /// Adds any serialisable value through its canonical JSON form (for
    /// settings structs; not for bulk data).
    pub fn json<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> &mut Self {
        let s = serde_json::to_vec(v).unwrap_or_default();
        self.tagged(b'j', &s)
    }

    /// The key.
    pub fn finish(&self) -> Key {
        self.0.clone().finalize().into()
    }
}

/// A key as lowercase hex (for messages and `_meta`).
pub fn key_hex(k: &Key) -> String {
    hex::encode(k)
}

/// The key a record is stored under when some of its candidates could not
/// be answered (`eval_failed`): never equal to an input key, so the next
/// run computes the query again (its answered prompts come from the store,
/// the failed ones are asked again) and rewrites its output segment.
pub fn provisional(input_key: &Key) -> Key {
    KeyHasher::new("leverflow/provisional/v1")
        .key(input_key)
        .finish()
}

/// The identity of an image file as content keys see it (`None`: missing).
pub type ImageStamp = Option<FileIdentity>;

/// Image stamps looked up once per file (a query's image is shared by all
/// its candidates, and examples recur).
#[derive(Debug, Default)]
pub struct ImageStamps(HashMap<PathBuf, ImageStamp>);

impl ImageStamps {
    /// The stamp of `path` (one `stat` the first time).
    pub fn of(&mut self, path: &Path) -> ImageStamp {
        if let Some(s) = self.0.get(path) {
            return *s;
        }
        let s = FileIdentity::stamp(path);
        self.0.insert(path.to_path_buf(), s);
        s
    }
}

fn add_stamp(h: &mut KeyHasher, path: &Path, stamp: ImageStamp) {
    h.str(&path.to_string_lossy());
    match stamp {
        Some(id) => id.add_to(h),
        None => {
            h.str("missing");
        }
    }
}

/// Adds a dataset item's text content.
fn add_content(h: &mut KeyHasher, item: &VqaItem) {
    h.u64(item.question_id)
        .u64(item.image_id)
        .str(&item.question)
        .str(&item.icd_answer)
        .u64(item.answers.len() as u64);
    for a in &item.answers {
        h.str(a);
    }
}

/// Adds a dataset item's content and its image: the image's stamp when
/// `stamps` is given (VQA runs), else its path only.
fn add_item(h: &mut KeyHasher, item: &VqaItem, stamps: Option<&mut ImageStamps>) {
    add_content(h, item);
    match stamps {
        Some(s) => {
            let stamp = s.of(&item.image_path);
            add_stamp(h, &item.image_path, stamp);
        }
        None => {
            h.str(&item.image_path.to_string_lossy());
        }
    }
}

/// Adds the candidate generation settings field by field.
fn add_candidate_args(h: &mut KeyHasher, a: &CandidateArgs) {
    h.u64(a.num_beams as u64).u64(a.temps.len() as u64);
    for t in &a.temps {
        h.f64(*t);
    }
    h.u64(a.num_samples_per_temp as u64)
        .u64(a.num_random as u64)
        .u64(a.num_retrieval as u64)
        .u64(a.shot_num as u64)
        .u64(a.seed);
}

/// Adds the reward settings field by field.
fn add_reward(h: &mut KeyHasher, r: &RewardConfig) {
    h.str(r.mode.as_str())
        .f64(r.hard_weight)
        .f64(r.soft_weight)
        .f64(r.rel_weight)
        .f64(r.alpha)
        .f64(r.beta)
        .str(r.correctness_mode.as_str())
        .u64(r.use_logprob as u64)
        .f64(r.clip.0)
        .f64(r.clip.1);
}

/// Everything a run's candidate sets depend on besides the query.
#[derive(Debug, Clone)]
pub struct CandidateSettings<'a> {
    /// SHA-256 of the checkpoint, candidate embeddings, candidate indices
    /// and sampler cache files (empty when absent).
    pub file_hashes: [&'a str; 4],
    /// Attention heads of the selector.
    pub num_heads: usize,
    /// Sampling settings and seed.
    pub args: &'a CandidateArgs,
    /// Whether the beam data's own beams become candidates.
    pub include_source_beams: bool,
}

/// Everything a run's answers depend on besides the prompt.
#[derive(Debug, Clone)]
pub struct VqaSettings<'a> {
    /// The backend's identity (model files, generation settings).
    pub model_identity: &'a serde_json::Value,
    /// The system prompt.
    pub system_prompt: &'a str,
    /// Whether the ground-truth probability is asked for.
    pub gt_prob: bool,
}

/// Everything a run's records depend on besides the query, its candidates
/// and its answers.
#[derive(Debug, Clone)]
pub struct RecordSettings<'a> {
    /// `generate` or `candidates`.
    pub job: &'a str,
    /// Reward settings.
    pub reward: &'a RewardConfig,
    /// Pointer layout.
    pub layout: PointerLayout,
    /// Whether prompts are kept.
    pub save_prompts: bool,
    /// Strict evaluation.
    pub strict: bool,
    /// The missing-image policy (`error` or `skip`).
    pub on_missing_image: &'a str,
    /// SHA-256 of the annotation files: training questions and annotations,
    /// merged training file, validation questions and annotations (empty
    /// when absent).
    pub annotation_hashes: [&'a str; 5],
}

/// The run-wide parts of every key, computed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKeys {
    /// Everything a candidate set depends on besides the query.
    pub candidates: Key,
    /// Everything an answer depends on besides the prompt.
    pub vqa: Key,
    /// Everything a record depends on besides the query.
    pub record: Key,
}

impl RunKeys {
    /// The run-wide keys. `shared_pool`: the dataset items of a shared
    /// pool, whose content (and, with `stamps`, images) appear in every
    /// prompt and so are part of every record's key.
    pub fn new<'a>(
        c: &CandidateSettings<'_>,
        v: &VqaSettings<'_>,
        r: &RecordSettings<'_>,
        shared_pool: impl IntoIterator<Item = &'a VqaItem>,
        mut stamps: Option<&mut ImageStamps>,
    ) -> Self {
        let mut ch = KeyHasher::new("leverflow/candidates/v2");
        for f in c.file_hashes {
            ch.str(f);
        }
        ch.u64(c.num_heads as u64);
        add_candidate_args(&mut ch, c.args);
        ch.u64(c.include_source_beams as u64);
        let candidates = ch.finish();

        let mut vh = KeyHasher::new("leverflow/vqa/v1");
        vh.json(v.model_identity)
            .str(v.system_prompt)
            .u64(v.gt_prob as u64);
        let vqa = vh.finish();

        let mut rh = KeyHasher::new("leverflow/record/v2");
        rh.str(env!("CARGO_PKG_VERSION"))
            .str(r.job)
            .key(&candidates)
            .key(&vqa);
        add_reward(&mut rh, r.reward);
        rh.str(r.layout.name())
            .u64(r.save_prompts as u64)
            .u64(r.strict as u64)
            .str(r.on_missing_image);
        for f in r.annotation_hashes {
            rh.str(f);
        }
        for item in shared_pool {
            add_item(&mut rh, item, stamps.as_deref_mut());
        }
        Self {
            candidates,
            vqa,
            record: rh.finish(),
        }
    }

    /// The key of a query's inputs: its record is reused when this matches.
    /// `item`: the query's dataset item (its image stamped when `stamps` is
    /// given); `pool`: a per-query pool's ids and items (content only: a
    /// stat per pool member per query costs too much on large pools, so an
    /// example image edited in place is not noticed here).
    pub fn input_key(
        &self,
        query_index: u64,
        source_beams: &[Vec<u64>],
        query_row: &[f32],
        item: &VqaItem,
        stamps: Option<&mut ImageStamps>,
        pool: Option<(&[u64], &mut dyn Iterator<Item = &VqaItem>)>,
    ) -> Key {
        let mut h = KeyHasher::new("leverflow/input/v1");
        h.key(&self.record).u64(query_index);
        for beam in source_beams {
            h.u64s(beam);
        }
        h.str("end-beams");
        h.f32s(query_row);
        add_item(&mut h, item, stamps);
        if let Some((ids, items)) = pool {
            h.u64s(ids);
            for item in items {
                add_item(&mut h, item, None);
            }
        }
        h.finish()
    }

    /// The input key of a query of a run without the training split (a
    /// `candidates` run on checkpoint and embeddings alone).
    pub fn index_only_input_key(
        &self,
        query_index: u64,
        source_beams: &[Vec<u64>],
        query_row: &[f32],
        pool: Option<&Vec<u64>>,
    ) -> Key {
        let mut h = KeyHasher::new("leverflow/input-index-only/v1");
        h.key(&self.record).u64(query_index);
        for beam in source_beams {
            h.u64s(beam);
        }
        h.str("end-beams");
        h.f32s(query_row);
        if let Some(ids) = pool {
            h.u64s(ids);
        }
        h.finish()
    }

    /// The key of a query's candidate set. `source_beams`: the beam data's
    /// beams when they become candidates.
    pub fn candidate_set(
        &self,
        query_index: u64,
        query_row: &[f32],
        source_beams: Option<&[Vec<u64>]>,
        pool: Option<&[u64]>,
    ) -> Key {
        let mut h = KeyHasher::new("leverflow/candidate-set/v1");
        h.key(&self.candidates).u64(query_index).f32s(query_row);
        for beam in source_beams.unwrap_or(&[]) {
            h.u64s(beam);
        }
        if let Some(ids) = pool {
            h.u64s(ids);
        }
        h.finish()
    }

    /// The key of a prompt's answer.
    pub fn vqa_answer(&self, p: &VqaPrompt, stamps: &mut ImageStamps) -> Key {
        let mut h = KeyHasher::new("leverflow/vqa-answer/v2");
        h.key(&self.vqa).str(&p.system_prompt).u64(p.query_index);
        for e in &p.examples {
            h.u64(e.dataset_index).str(&e.question).str(&e.answer);
            let s = stamps.of(&e.image);
            add_stamp(&mut h, &e.image, s);
        }
        h.str(&p.query_question);
        let s = stamps.of(&p.query_image);
        add_stamp(&mut h, &p.query_image, s);
        h.u64(p.gt_answers.len() as u64);
        for (a, w) in &p.gt_answers {
            h.str(a).f64(*w);
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_and_domains_matter() {
        let a = KeyHasher::new("t").str("ab").str("c").finish();
        let b = KeyHasher::new("t").str("a").str("bc").finish();
        assert_ne!(a, b);
        let c = KeyHasher::new("u").str("ab").str("c").finish();
        assert_ne!(a, c);
        let d = KeyHasher::new("t").str("ab").str("c").finish();
        assert_eq!(a, d);
        assert_ne!(
            KeyHasher::new("t").opt_str(None).finish(),
            KeyHasher::new("t").opt_str(Some("")).finish()
        );
        assert_ne!(
            KeyHasher::new("t").f32s(&[0.0]).finish(),
            KeyHasher::new("t").f32s(&[-0.0]).finish()
        );
        assert_eq!(key_hex(&[0xab; 32]).len(), 64);
    }

    /// The bytes of known keys are pinned: a change here invalidates every
    /// stored result, so it must come with a new domain version and a note
    /// in the state store's migration.
    #[test]
    fn known_keys_keep_their_bytes() {
        let args = CandidateArgs {
            num_beams: 5,
            temps: vec![1.0, 1.3],
            num_samples_per_temp: 2,
            num_random: 1,
            num_retrieval: 0,
            shot_num: 2,
            seed: 0,
        };
        let reward = RewardConfig::default();
        let identity = serde_json::json!({"backend": "replay", "sha256": "ab"});
        let keys = RunKeys::new(
            &CandidateSettings {
                file_hashes: ["a", "b", "", ""],
                num_heads: 1,
                args: &args,
                include_source_beams: false,
            },
            &VqaSettings {
                model_identity: &identity,
                system_prompt: "sys",
                gt_prob: false,
            },
            &RecordSettings {
                job: "generate",
                reward: &reward,
                layout: PointerLayout::SharedPool {
                    positions_are_indices: true,
                },
                save_prompts: false,
                strict: true,
                on_missing_image: "error",
                annotation_hashes: ["q", "a", "", "", ""],
            },
            std::iter::empty(),
            None,
        );
        let set = keys.candidate_set(3, &[0.5, -1.0], None, Some(&[1, 2]));
        let prompt = VqaPrompt {
            query_index: 3,
            system_prompt: "sys".into(),
            examples: vec![crate::models::contract::PromptExample {
                dataset_index: 1,
                image: PathBuf::from("/nonexistent/1.png"),
                question: "q1".into(),
                answer: "a1".into(),
            }],
            query_image: PathBuf::from("/nonexistent/3.png"),
            query_question: "q3".into(),
            gt_answers: vec![("red".into(), 1.0)],
        };
        let answer = keys.vqa_answer(&prompt, &mut ImageStamps::default());
        let got = [keys.candidates, keys.vqa, set, answer].map(|k| key_hex(&k));
        assert_eq!(
            got,
            [
                "7f16bc996403def5f220586dedb162ec5f8a8e5310843b93c9a7f0a20d9540e3",
                "a84c74223176afd3dc2557aee242b109b65fe026cf9761b10f2fbe6150c9ac11",
                "4d4156a1ef83dd5d0dbf2f9de4ec725e33940da627d4a46bbcbe716e8b04a3c3",
                "036413b19b82678f4b11f31a44670012748fc7738ce41c8c31e803fd82e5480f",
            ]
        );
    }
}
