//! The committed demo VQA model (`demo/vlm`, a tiny Qwen2.5-VL trained by
//! `examples/train_demo_vlm.rs`) loaded through the real loading path and
//! answering the 100 held-out easy-VQA test questions of `demo/data` the
//! way the pipeline does: 2 in-context examples from the demo's train
//! questions per prompt, `QwenVqa` with the `leverflow generate` generation
//! defaults (3 beams, 5 new tokens, EOS `<|im_end|>`), the original
//! post-processing and the official VQA accuracy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::NdArray;
use leverflow_operators::models::demo_vlm::checkpoint::UNK_TOKEN;
use leverflow_operators::models::demo_vlm::eval::{evaluate_demo_data, read_vqa_items};
use leverflow_operators::models::qwen2_5_vl::model::Qwen25Vl;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load() -> Arc<Qwen25Vl<NdArray<f32>>> {
    Arc::new(
        Qwen25Vl::<NdArray<f32>>::load(&root().join("demo/vlm"), &Default::default())
            .expect("demo/vlm loads"),
    )
}

#[test]
fn demo_vlm_heldout_accuracy_is_at_least_80_percent() {
    let report = evaluate_demo_data(load(), &root().join("demo/data"), 2).expect("evaluation runs");
    assert_eq!(report.predictions.len(), 100);
    let wrong: Vec<String> = report
        .predictions
        .iter()
        .filter(|p| p.accuracy < 1.0)
        .map(|p| format!("{:?} -> {:?}", p.question, p.prediction))
        .collect();
    eprintln!(
        "held-out accuracy {:.4}; wrong: {wrong:#?}",
        report.accuracy
    );
    assert!(
        report.accuracy >= 0.80,
        "held-out VQA accuracy {:.4} < 0.80",
        report.accuracy
    );
}

#[test]
fn demo_vlm_is_small_and_covers_the_heldout_vocabulary() {
    let weights = root().join("demo/vlm/model.safetensors");
    let bytes = std::fs::metadata(&weights).expect("weights exist").len();
    assert!(bytes <= 20 << 20, "{bytes} bytes > 20 MiB");
    let model = load();
    let unk = model
        .processor
        .tokenizer()
        .token_to_id(UNK_TOKEN)
        .expect("<unk> in the vocabulary");
    let data = root().join("demo/data");
    let items = read_vqa_items(
        &data.join("heldout_questions.json"),
        &data.join("heldout_annotations.json"),
        &data.join("images"),
    )
    .expect("held-out files");
    for it in &items {
        let ids = model.processor.encode(&it.question).expect("encodes");
        assert!(!ids.contains(&unk), "unknown word in {:?}", it.question);
        let ids = model.processor.encode(&it.answer).expect("encodes");
        assert_eq!(ids.len(), 1, "answer {:?} is one token", it.answer);
        assert_eq!(
            model.processor.decode(&ids, true).expect("decodes"),
            it.answer
        );
    }
}
