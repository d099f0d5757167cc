//! Unit tests of the stages on the embedded demo's inputs (loaded through
//! the pipeline's loader, no binary): input keys, prompts and the
//! missing-image policy, the scoring split, record assembly and rewards.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leverflow_schemas::PointerLayout;

use super::accuracy::{score_answer, score_official, NotInAnnotations};
use super::plan::input_key;
use super::vqa::{plan_prompts, MissingImage};
use super::*;
use crate::accuracy::{EvalMode, EvalSplit, Normalizer};
use crate::candidates::GenMethod;
use crate::config::{MissingImagePolicy, RunConfig};
use crate::models::contract::VqaAnswer;
use crate::pipeline::load::load;
use crate::state::{FileDigests, ImageStamps, RunKeys};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo")
}

/// The demo's settings, with images under `images`.
fn demo_config(images: &Path) -> RunConfig {
    let d = demo();
    RunConfig {
        sft_ckpt: Some(d.join("sft.ckpt")),
        beam_data: Some(d.join("beam_data.json")),
        query_emb: Some(d.join("query_embeddings.pt")),
        cand_emb: Some(d.join("candidate_embeddings.pt")),
        train_ques_path: Some(d.join("data/questions.json")),
        train_ann_path: Some(d.join("data/annotations.json")),
        train_coco_root: Some(images.to_path_buf()),
        image_pattern: "COCO_train2014_{image_id:012d}.png".into(),
        output_path: Some(PathBuf::from("unused.json")),
        ..RunConfig::default()
    }
}

fn inputs_with(cfg: &RunConfig) -> Arc<Inputs> {
    load(cfg, true, Arc::new(FileDigests::default()), None)
        .unwrap()
        .inputs
}

fn keys(inputs: &Inputs) -> RunKeys {
    use crate::state::{CandidateSettings, RecordSettings, VqaSettings};
    RunKeys::new(
        &CandidateSettings {
            file_hashes: ["s", "c", "", ""],
            num_heads: 1,
            args: &inputs.cand_args,
            include_source_beams: false,
        },
        &VqaSettings {
            model_identity: &serde_json::json!({"backend": "test double"}),
            system_prompt: "sys",
            gt_prob: false,
        },
        &RecordSettings {
            job: "generate",
            reward: &inputs.reward,
            layout: inputs.layout,
            save_prompts: false,
            strict: true,
            on_missing_image: "error",
            annotation_hashes: ["q", "a", "", "", ""],
        },
        std::iter::empty(),
        None,
    )
}

fn work(q: u64, beams: Vec<Vec<u64>>) -> QueryWork {
    QueryWork {
        query_index: q,
        source_beams: beams,
        input_key: [0; 32],
    }
}

/// A copy of the demo's images, to edit.
fn image_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(demo().join("data/images")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn input_keys_follow_the_query_its_beams_and_its_image() {
    let images = image_copy();
    let inputs = inputs_with(&demo_config(images.path()));
    let keys = keys(&inputs);
    let mut stamps = ImageStamps::default();
    let key = |w: &QueryWork, stamps: Option<&mut ImageStamps>| {
        input_key(&inputs, &keys, w, stamps).unwrap()
    };
    let a = key(&work(3, vec![vec![1, 2]]), Some(&mut stamps));
    assert_eq!(
        a,
        key(
            &work(3, vec![vec![1, 2]]),
            Some(&mut ImageStamps::default())
        )
    );
    assert_ne!(a, key(&work(3, vec![vec![2, 1]]), None), "the beams");
    assert_ne!(
        a,
        key(
            &work(4, vec![vec![1, 2]]),
            Some(&mut ImageStamps::default())
        )
    );
    // The query image replaced by a copy with the same size and times
    // (`cp -p`): its inode and status-change time differ, so does the key.
    let image = &inputs.dataset.get(3).unwrap().image_path;
    let meta = std::fs::metadata(image).unwrap();
    let bytes = std::fs::read(image).unwrap();
    std::fs::remove_file(image).unwrap();
    std::fs::write(image, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(image)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    let after = key(
        &work(3, vec![vec![1, 2]]),
        Some(&mut ImageStamps::default()),
    );
    assert_ne!(a, after, "a replaced image changes the key");
    // Without images (`candidates`), only the image's path counts.
    let no_images = key(&work(3, vec![vec![1, 2]]), None);
    assert_eq!(no_images, key(&work(3, vec![vec![1, 2]]), None));
    assert_ne!(no_images, after);
    // A query outside the embeddings is an error naming both files.
    let e = input_key(&inputs, &keys, &work(100_000, vec![]), None).unwrap_err();
    assert_eq!((e.stage, e.query), ("plan", Some(100_000)));
    assert!(e.to_string().contains("query_embeddings.pt"), "{e}");
}

/// Query `q` with one beam and random candidates (shared pool, positions
/// = dataset indices).
fn cands(inputs: &Inputs, q: u64, pointers: &[[u64; 2]]) -> QueryCands {
    assert!(matches!(inputs.layout, PointerLayout::SharedPool { .. }));
    QueryCands {
        query_index: q,
        pool_ids: None,
        cands: pointers
            .iter()
            .enumerate()
            .map(|(k, p)| CandRow {
                cand: crate::candidates::Candidate {
                    positions: p.iter().map(|&i| i as usize).collect(),
                    gen_method: if k == 0 {
                        GenMethod::Beam
                    } else {
                        GenMethod::Random
                    },
                    beam_rank: (k == 0).then_some(0),
                    beam_score: (k == 0).then_some(-0.5),
                    logprob_score: -1.5,
                    temperature: None,
                    sample_logprob_tempered: None,
                },
                indices: p.to_vec(),
            })
            .collect(),
        input_key: [7; 32],
        new_cands: None,
    }
}

#[test]
fn missing_images_fail_or_skip_the_query_by_policy() {
    let images = image_copy();
    let cfg = demo_config(images.path());
    let inputs = inputs_with(&cfg);
    // An item whose image no item of query 4's prompts shares (items share
    // images), its image removed.
    let image = |i: u64| inputs.dataset.get(i).unwrap().image_path.clone();
    let used = [image(1), image(2), image(4)];
    let gone = (5..300).find(|&i| !used.contains(&image(i))).unwrap();
    let missing = image(gone);
    std::fs::remove_file(&missing).unwrap();
    // Query 3 with the missing example, query 4 with examples 1, 2.
    let batch = vec![
        cands(&inputs, 3, &[[gone, 1]]),
        cands(&inputs, 4, &[[1, 2], [2, 1]]),
    ];
    let mut settings = StageSettings::of(&cfg, context::Job::Generate);
    let e = plan_prompts(&inputs, &settings, &batch, &mut ImageStamps::default())
        .err()
        .unwrap();
    assert_eq!(e.query, Some(3));
    let m = e.downcast_ref::<MissingImage>().expect("typed");
    assert_eq!((m.path.as_path(), m.query), (missing.as_path(), 3));
    settings.missing_images = MissingImagePolicy::Skip;
    let plan = plan_prompts(&inputs, &settings, &batch, &mut ImageStamps::default()).unwrap();
    assert_eq!(plan.prompts.len(), 2, "only query 4's two prompts");
    assert_eq!(plan.queries[0].0, Vec::<usize>::new());
    assert_eq!(
        plan.queries[0].1.as_deref(),
        Some(format!("missing image {}", missing.display()).as_str())
    );
    assert_eq!(plan.queries[1], (vec![0, 1], None));
    let p = &plan.prompts[0];
    assert_eq!(p.example_indices(), vec![1, 2]);
    assert_eq!(p.system_prompt, settings.system_prompt);
    assert_eq!(p.query_question, inputs.dataset.get(4).unwrap().question);
}

#[test]
fn the_first_split_that_holds_the_question_scores_it() {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vqa_eval");
    let index = |q: &str, a: &str| {
        Arc::new(crate::accuracy::load_questions_annotations(&d.join(q), &d.join(a)).unwrap())
    };
    let full = index("questions.json", "annotations.json");
    let demo = demo().join("data");
    let other = Arc::new(
        crate::accuracy::load_questions_annotations(
            &demo.join("questions.json"),
            &demo.join("annotations.json"),
        )
        .unwrap(),
    );
    let fixture_qid = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(d.join("questions.json")).unwrap(),
    )
    .unwrap()["questions"][0]["question_id"]
        .as_u64()
        .unwrap();
    let mut norm = Normalizer::new();
    // Train first: a question of the training files is scored there ...
    let both = vec![("train", Arc::clone(&full)), ("val", Arc::clone(&other))];
    let (split, _) = score_official(&both, fixture_qid, "yes", &mut norm).unwrap();
    assert_eq!(split, EvalSplit::Train);
    // ... one only in the validation files there ...
    let swapped = vec![("train", Arc::clone(&other)), ("val", Arc::clone(&full))];
    let (split, acc) = score_official(&swapped, fixture_qid, "yes", &mut norm).unwrap();
    assert_eq!(split, EvalSplit::Val);
    assert!((0.0..=1.0).contains(&acc));
    // ... and one in neither is not scored.
    assert!(score_official(&both, u64::MAX, "yes", &mut norm).is_none());
}

#[test]
fn strict_scoring_needs_the_annotations_and_failed_prompts_score_zero() {
    let images = image_copy();
    let inputs = inputs_with(&demo_config(images.path()));
    let item = inputs.dataset.get(3).unwrap();
    let gt: Vec<String> = item.answers.clone();
    let mut norm = Normalizer::new();
    let right = score_answer(&inputs, item, Ok(&gt[0]), &gt, &mut norm).unwrap();
    assert_eq!((right.correct, right.eval_mode), (1, EvalMode::VqaEval));
    assert_eq!(right.split, Some(EvalSplit::Train));
    let failed = score_answer(&inputs, item, Err("timeout"), &gt, &mut norm).unwrap();
    assert_eq!((failed.correct, failed.acc), (0, 0.0));
    assert_eq!((failed.eval_mode, failed.split), (EvalMode::Error, None));
    assert_eq!(failed.failed.as_deref(), Some("timeout"));
    // A question the annotations lack, under strict evaluation.
    let mut unknown = item.clone();
    unknown.question_id = u64::MAX;
    let e = score_answer(&inputs, &unknown, Ok("red"), &gt, &mut norm).unwrap_err();
    assert_eq!(
        e,
        NotInAnnotations {
            question_id: u64::MAX,
            query: 3
        }
    );
}

#[test]
fn records_assemble_scores_rewards_and_failures() {
    let images = image_copy();
    let cfg = demo_config(images.path());
    let inputs = inputs_with(&cfg);
    let q = cands(&inputs, 3, &[[1, 2], [2, 1]]);
    let item = inputs.dataset.get(3).unwrap();
    let answered = QueryAnswered {
        answers: vec![
            Ok(VqaAnswer {
                raw_generation: item.answers[0].clone(),
                gt_prob: None,
                prompt_text: Some("prompt".into()),
            }),
            Err("the server went away".into()),
        ],
        base: q,
        skipped: None,
        new_vqa: vec![([1; 32], vec![1, 2, 3])],
    };
    let scored = (accuracy::accuracy(Arc::clone(&inputs)))(vec![answered]).unwrap();
    let counters = Arc::new(Counters::default());
    let finished =
        (reward::reward(Arc::clone(&inputs), false, Arc::clone(&counters)))(scored).unwrap();
    assert_eq!(finished.len(), 1);
    assert_eq!(Counters::get(&counters.candidates_done), 2);
    let update = crate::state::QueryUpdate::decode(&finished[0].1).unwrap();
    // A failed prompt makes the record provisional: stored under a key no
    // input key equals, so the next run computes the query again.
    assert_eq!(update.input_key, crate::state::provisional(&[7; 32]));
    assert_eq!(update.vqa.len(), 1, "the new answer goes to the store");
    let crate::state::StoredOutcome::Compressed(bytes) = &update.outcome else {
        panic!("a record")
    };
    let json = zstd::stream::decode_all(bytes.as_slice()).unwrap();
    let record: leverflow_schemas::RlRecord = serde_json::from_slice(&json).unwrap();
    assert_eq!(record.query.query_id, 3);
    assert_eq!(record.query.question.as_ref(), Some(&item.question));
    let [ok, failed] = &record.pointer_candidates[..] else {
        panic!("two candidates")
    };
    // Shared pool whose positions are dataset indices: `pointer_pos` too.
    assert_eq!(ok.pointer, vec![1, 2]);
    assert_eq!(ok.pointer_pos.as_deref(), Some(&[1, 2][..]));
    assert_eq!((ok.gen_method.as_str(), ok.beam_rank), ("beam", Some(0)));
    assert_eq!(ok.vqa_correct, Some(1));
    assert_eq!(ok.eval_failed, Some(false));
    assert_eq!(ok.prompt_text, None, "prompts are kept only when asked");
    assert_eq!(failed.vqa_raw_generation, None);
    assert_eq!(failed.eval_failed, Some(true));
    assert_eq!(failed.vqa_eval_mode.as_deref(), Some("error"));
    assert_eq!(failed.eval_split_used, None);
    // hard_plus_soft: 1 + acc for the right answer, 0 for the failed one;
    // the advantages are their z-scores.
    let (r0, r1) = (ok.reward.unwrap(), failed.reward.unwrap());
    assert!(r0 > 1.0 && r1 == 0.0, "{r0} {r1}");
    assert!(ok.advantage.unwrap() > 0.0 && failed.advantage.unwrap() < 0.0);
}
