//! Tests of the bf16 host path on the tiny fixture (whose weights are
//! stored in bf16): the loaded model holds the file's words, not an f32
//! copy, and answers exactly as a model loaded from an f32 copy of the
//! checkpoint does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::NdArray;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::Linear;
use burn::tensor::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use super::generate::{GenerationConfig, GenerationOverrides};
use super::host_bf16::{storage_bytes, HostBf16};
use super::model::tests::case_request;
use super::model::{Qwen25Vl, QwenVqa};
use super::processor::PromptRequest;
use super::weights::{expected_shapes, WeightStore, EMBED_TOKENS, LM_HEAD};

type TB = NdArray<f32>;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_5_vl_tiny")
}

/// Bytes of host storage behind a module's float parameters.
#[derive(Default)]
struct HeldBytes {
    bf16: usize,
    f32: usize,
}

impl ModuleVisitor<TB> for HeldBytes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        match storage_bytes(&param.val()) {
            Some((n, true)) => self.bf16 += n,
            Some((n, false)) => self.f32 += n,
            None => panic!("a parameter is not on the host"),
        }
    }
}

/// The words of a linear weight held in bf16, in checkpoint order
/// ([d_out, d_in] row-major).
fn held_words(lin: &Linear<TB>) -> Vec<u16> {
    let h = HostBf16::of(&lin.weight.val()).expect("a bf16 weight");
    let view = h.view();
    view.reversed_axes().iter().copied().collect()
}

#[test]
fn bf16_checkpoint_is_held_as_its_file_words() {
    let dir = fixture_dir();
    let model = Qwen25Vl::<TB>::load(&dir, &Default::default()).unwrap();
    let store = WeightStore::open(&dir, true).unwrap();
    let (v, d) = (model.text.vocab_size, model.text.hidden_size);
    // What an exact bf16 holding costs: the 2-D matrices in bf16 (the
    // tied head packed once, in whole 16-row blocks), everything else (norms,
    // biases, the patch embedding) in f32.
    let (mut want_bf16, mut want_f32) = (0usize, 0usize);
    for (name, shape) in expected_shapes(&model.config) {
        let n: usize = shape.iter().product();
        if name == LM_HEAD {
            continue;
        }
        assert_eq!(store.dtype(&name).unwrap(), Dtype::BF16, "{name}");
        if name == EMBED_TOKENS {
            want_bf16 += v.div_ceil(16) * 16 * d * 2;
        } else if shape.len() == 2 {
            want_bf16 += n * 2;
        } else {
            want_f32 += n * 4;
        }
    }
    let mut held = HeldBytes::default();
    model.text.visit(&mut held);
    model.vision.visit(&mut held);
    assert_eq!(held.bf16, want_bf16);
    assert_eq!(held.f32, want_f32);
    // The words are the file's, matrix by matrix.
    let words = |key: &str| store.read_bf16(key).unwrap().unwrap().0;
    for (i, l) in model.text.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        for (name, lin) in [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &l.mlp.gate_proj),
            ("mlp.up_proj", &l.mlp.up_proj),
            ("mlp.down_proj", &l.mlp.down_proj),
        ] {
            assert_eq!(
                held_words(lin),
                words(&format!("{p}.{name}.weight")),
                "{p}.{name}"
            );
        }
    }
    for (i, b) in model.vision.blocks.iter().enumerate() {
        let p = format!("visual.blocks.{i}");
        for (name, lin) in [
            ("attn.qkv", &b.attn.qkv),
            ("attn.proj", &b.attn.proj),
            ("mlp.gate_proj", &b.mlp.gate),
            ("mlp.up_proj", &b.mlp.up),
            ("mlp.down_proj", &b.mlp.down),
        ] {
            assert_eq!(
                held_words(lin),
                words(&format!("{p}.{name}.weight")),
                "{p}.{name}"
            );
        }
    }
    let m = &model.vision.merger;
    assert_eq!(held_words(&m.fc1), words("visual.merger.mlp.0.weight"));
    assert_eq!(held_words(&m.fc2), words("visual.merger.mlp.2.weight"));
    // The head's rows are the embedding's words, widened.
    let emb: Vec<f32> = words(EMBED_TOKENS)
        .into_iter()
        .map(super::host_bf16::widen)
        .collect();
    let rows = model
        .text
        .lm_head_rows()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    assert!(rows == emb);
}

/// An f32 copy of the fixture checkpoint (every tensor widened) in `out`.
fn f32_copy(out: &Path) {
    let dir = fixture_dir();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".json") && !name.starts_with("cases") && !name.starts_with("gt_prob") {
            std::fs::copy(&path, out.join(&name)).unwrap();
        }
    }
    let store = WeightStore::open(&dir, false).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = store
        .names()
        .into_iter()
        .map(|n| {
            let (values, shape) = store.read_f32(&n).unwrap();
            (
                n,
                shape,
                values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

#[test]
fn bf16_and_f32_checkpoints_answer_identically() {
    let tmp = tempfile::tempdir().unwrap();
    f32_copy(tmp.path());
    let half = Arc::new(Qwen25Vl::<TB>::load(&fixture_dir(), &Default::default()).unwrap());
    let full = Arc::new(Qwen25Vl::<TB>::load(tmp.path(), &Default::default()).unwrap());
    // The copy really is held in f32.
    let mut held = HeldBytes::default();
    full.text.visit(&mut held);
    assert_eq!(held.bf16, 0);
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap())
            .unwrap();
    for beams in [1, 3] {
        let generation = GenerationConfig::resolve(
            &GenerationOverrides {
                max_new_tokens: Some(5),
                num_beams: Some(beams),
                length_penalty: Some(0.0),
                do_sample: Some(false),
                repetition_penalty: Some(1.0),
                eos_token_ids: Some(vec![151645]),
                ..Default::default()
            },
            &half.generation_defaults,
        )
        .unwrap();
        for case in cases["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let rows = case["messages"].as_array().unwrap().len();
            let reqs: Vec<PromptRequest> = (0..rows).map(|r| case_request(case, r)).collect();
            let gts: Vec<Vec<(String, f64)>> = (0..rows)
                .map(|_| vec![("yes".to_string(), 1.0), ("red circle".into(), 1.0 / 3.0)])
                .collect();
            let mut a = QwenVqa::new(Arc::clone(&half), generation.clone(), 16);
            let mut b = QwenVqa::new(Arc::clone(&full), generation.clone(), 16);
            let got = a.answer_requests(&reqs, Some(&gts)).unwrap();
            let want = b.answer_requests(&reqs, Some(&gts)).unwrap();
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.generated_ids, w.generated_ids,
                    "{name} row {r}, {beams} beams"
                );
                assert_eq!(g.gt_prob, w.gt_prob, "{name} row {r}, {beams} beams");
            }
        }
    }
}
