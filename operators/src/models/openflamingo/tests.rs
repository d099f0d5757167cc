//! Parity with the reference OpenFlamingo (open-flamingo 2.0.1, open_clip
//! 3.3.0, MosaicGPT v0.0.4, transformers 4.33.3, fp32) on the tiny fixture
//! `tests/fixtures/openflamingo_tiny` (`cases.json`).

use super::model::{to_vec, FlamingoBatch, FlamingoPrompt, OpenFlamingo};
use crate::image_decode::ImageLimits;
use crate::models::qwen2_5_vl::generate::{GenerationConfig, StepDecoder};
use burn::tensor::Tensor;
use serde_json::Value;
use std::path::{Path, PathBuf};

type Cpu = burn::backend::NdArray<f32>;

pub(crate) fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/openflamingo_tiny")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model() -> OpenFlamingo<Cpu> {
    OpenFlamingo::load(&fixture_dir(), &Default::default()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs {w} (tol {tol})");
    }
}

fn prompt_of(case: &Value) -> FlamingoPrompt {
    let dir = fixture_dir();
    let r = &case["request"];
    FlamingoPrompt {
        examples: r["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    dir.join(e["image"].as_str().unwrap()),
                    e["question"].as_str().unwrap().to_string(),
                    e["answer"].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        query_image: dir.join(r["query"]["image"].as_str().unwrap()),
        query_question: r["query"]["question"].as_str().unwrap().to_string(),
    }
}

fn batch(m: &OpenFlamingo<Cpu>, prompts: &[FlamingoPrompt]) -> FlamingoBatch<Cpu> {
    let limits = ImageLimits::default();
    m.batch(prompts, &mut |p: &Path| {
        Ok(m.latents_of_files(&[p], &limits)?.remove(0))
    })
    .unwrap()
}

fn greedy() -> GenerationConfig {
    GenerationConfig {
        num_beams: 1,
        ..model_generation()
    }
}

fn model_generation() -> GenerationConfig {
    let c = cases();
    let eos = c["tokenizer"]["eos_token_id"].as_u64().unwrap() as u32;
    GenerationConfig {
        max_new_tokens: 5,
        min_new_tokens: 0,
        num_beams: 3,
        length_penalty: 0.0,
        repetition_penalty: 1.0,
        do_sample: false,
        eos_token_ids: vec![eos],
        pad_token_id: eos,
        early_stopping: false,
    }
}

#[test]
fn tokenizer_ids_and_prompt_text_match() {
    let m = model();
    let c = cases();
    let t = &c["tokenizer"];
    assert_eq!(
        m.tokenizer.vocab_len as u64,
        t["len_after_flamingo_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(m.tokenizer.image_token_id),
        t["image_id"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(m.tokenizer.end_of_chunk_token_id),
        t["endofchunk_id"].as_u64().unwrap()
    );
    assert_eq!(
        u64::from(m.tokenizer.eos_token_id),
        t["eos_token_id"].as_u64().unwrap()
    );
    assert_eq!(m.original_generation(), model_generation());
    for case in c["cases"].as_array().unwrap() {
        let b = batch(&m, &[prompt_of(case)]);
        assert_eq!(b.texts[0], case["text"].as_str().unwrap());
        assert_eq!(b.input_ids[0], ids(&case["input_ids"]));
    }
}

#[test]
fn pixels_vision_tokens_and_latents_match() {
    let m = model();
    let c = cases();
    let limits = ImageLimits::default();
    for case in c["cases"].as_array().unwrap() {
        let files: Vec<PathBuf> = case["image_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| fixture_dir().join(f.as_str().unwrap()))
            .collect();
        let mut pixels = Vec::new();
        for f in &files {
            pixels.extend(m.pixels(f, &limits).unwrap());
        }
        let per = pixels.len() / files.len();
        close(
            "pixels",
            &pixels[..8],
            &floats(&case["pixel_values_first8"]),
            2e-6,
        );
        let sums: Vec<f32> = pixels
            .chunks(per)
            .map(|c| c.iter().map(|&x| f64::from(x)).sum::<f64>() as f32)
            .collect();
        close(
            "pixel sums",
            &sums,
            &floats(&case["pixel_values_sum_per_image"]),
            2e-3,
        );
        let tokens = m.vision_tokens(&pixels, files.len());
        assert_eq!(
            tokens.dims().to_vec(),
            ids(&case["vision_tokens_shape"])
                .iter()
                .map(|&x| x as usize)
                .collect::<Vec<_>>()
        );
        close(
            "vision tokens",
            &to_vec(tokens)[..8],
            &floats(&case["vision_tokens_first8"]),
            1e-4,
        );
        let lat = m.latents(&pixels, files.len());
        let shape = ids(&case["perceiver_out_shape"]);
        assert_eq!(
            lat.dims().to_vec(),
            shape[1..].iter().map(|&x| x as usize).collect::<Vec<_>>()
        );
        close(
            "perceiver",
            &to_vec(lat)[..8],
            &floats(&case["perceiver_out_first8"]),
            1e-4,
        );
    }
}

fn top5(row: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(5);
    (
        idx.iter().map(|&i| i as u32).collect(),
        idx.iter().map(|&i| row[i]).collect(),
    )
}

#[test]
fn last_position_logits_match_with_and_without_images() {
    let m = model();
    let c = cases();
    for case in c["cases"].as_array().unwrap() {
        let b = batch(&m, &[prompt_of(case)]);
        let (_, logits) = m.prefill(&b, true).unwrap();
        let shape = ids(&case["logits_shape"]);
        assert_eq!(
            logits.dims().to_vec(),
            shape.iter().map(|&x| x as usize).collect::<Vec<_>>()
        );
        let [_, len, v] = logits.dims();
        let last = to_vec(logits.slice([0..1, len - 1..len, 0..v]));
        close(
            "last logits",
            &last[..8],
            &floats(&case["last_logits_first8"]),
            1e-4,
        );
        let (top_ids, top_vals) = top5(&last);
        assert_eq!(top_ids, ids(&case["last_logits_top5"]["ids"]));
        close(
            "top5",
            &top_vals,
            &floats(&case["last_logits_top5"]["values"]),
            1e-4,
        );
        let sum: f32 = last.iter().sum();
        close(
            "sum",
            &[sum],
            &[case["last_logits_sum"].as_f64().unwrap() as f32],
            2e-3,
        );
        // All-zero pixels in every image slot.
        let s = m.vision_config.image_size;
        let zeros = m.latents(&vec![0f32; 3 * s * s], 1);
        let [_, nl, d] = zeros.dims();
        let zeros = zeros.reshape([nl, d]);
        let n = b.media.dims()[1];
        let media = Tensor::stack::<3>(vec![zeros; n], 0).unsqueeze::<4>();
        let zb = FlamingoBatch { media, ..b };
        let (_, zl) = m.prefill(&zb, false).unwrap();
        close(
            "zero-image logits",
            &to_vec(zl)[..8],
            &floats(&case["last_logits_zero_images_first8"]),
            1e-4,
        );
    }
}

#[test]
fn greedy_steps_and_ids_match() {
    let m = model();
    let c = cases();
    for case in c["cases"].as_array().unwrap() {
        let g = &case["generate"]["greedy"];
        let b = batch(&m, &[prompt_of(case)]);
        // Step by step: each step's maximum logit and its token.
        let (mut cache, logits) = m.prefill(&b, false).unwrap();
        let v = logits.dims()[2];
        let mut row = to_vec(logits);
        for (step, want) in g["step_max"].as_array().unwrap().iter().enumerate() {
            let (top, val) = top5(&row);
            assert_eq!(u64::from(top[0]), want[0].as_u64().unwrap(), "step {step}");
            close(
                "step max",
                &val[..1],
                &[want[1].as_f64().unwrap() as f32],
                1e-4,
            );
            row = to_vec(m.lm.step(&[top[0]], &mut cache).unwrap());
            assert_eq!(row.len(), v);
        }
        let out = m.generate(&b, &greedy()).unwrap();
        assert_eq!(out[0].ids, ids(&g["new_token_ids"]));
    }
}

#[test]
fn beam_search_ids_match() {
    let m = model();
    let c = cases();
    for case in c["cases"].as_array().unwrap() {
        let b = batch(&m, &[prompt_of(case)]);
        let out = m.generate(&b, &model_generation()).unwrap();
        assert_eq!(out[0].ids, ids(&case["generate"]["beam3"]["new_token_ids"]));
        let text = m.tokenizer.decode(&out[0].ids).unwrap();
        assert_eq!(
            text,
            case["generate"]["beam3"]["decoded_skip_special"]
                .as_str()
                .unwrap()
        );
    }
}

#[test]
fn a_left_padded_batch_gives_the_ids_of_one_prompt_at_a_time() {
    let m = model();
    let c = cases();
    let all = c["cases"].as_array().unwrap();
    let prompts: Vec<FlamingoPrompt> = all.iter().map(prompt_of).collect();
    let b = batch(&m, &prompts);
    let lens: Vec<usize> = b.prompt_ids.iter().map(Vec::len).collect();
    assert_ne!(
        lens[0], lens[1],
        "the cases must differ in length to test padding"
    );
    for (cfg, name) in [(greedy(), "greedy"), (model_generation(), "beam3")] {
        let out = m.generate(&b, &cfg).unwrap();
        for (o, case) in out.iter().zip(all) {
            assert_eq!(
                o.ids,
                ids(&case["generate"][name]["new_token_ids"]),
                "{name}"
            );
        }
    }
}

/// Copies `from` to `to`.
fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
}

/// The real artifacts' layout, written by `tools/make_flamingo_pickles.py`:
/// `lm/` with a pickled `pytorch_model.bin`, `vision/` an open_clip
/// repository (`open_clip_config.json` + `open_clip_pytorch_model.bin`), a
/// pickled `checkpoint.pt`; read through the bounded torch reader, it is the
/// reference model. A missing file or config field is an error naming it.
#[test]
fn the_pickled_layout_of_the_real_artifacts_loads_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let fx = fixture_dir();
    std::fs::create_dir_all(d.join("lm")).unwrap();
    std::fs::create_dir_all(d.join("vision")).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        copy(&fx.join("lm").join(f), &d.join("lm").join(f));
    }
    let pickled = fx.join("pickled");
    copy(
        &pickled.join("pytorch_model.bin"),
        &d.join("lm/pytorch_model.bin"),
    );
    copy(
        &pickled.join("open_clip_pytorch_model.bin"),
        &d.join("vision/open_clip_pytorch_model.bin"),
    );
    copy(&pickled.join("checkpoint.pt"), &d.join("checkpoint.pt"));
    let model_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("vision_config.json")).unwrap())
            .unwrap();
    let open_clip = serde_json::json!({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": super::config::OPENAI_MEAN, "std": super::config::OPENAI_STD},
    });
    std::fs::write(
        d.join("vision/open_clip_config.json"),
        open_clip.to_string(),
    )
    .unwrap();

    let files = super::FlamingoFiles::from_dir(d).unwrap();
    assert_eq!(files.checkpoint, d.join("checkpoint.pt"));
    assert_eq!(
        files.vision_weights,
        d.join("vision/open_clip_pytorch_model.bin")
    );
    let m: OpenFlamingo<Cpu> = OpenFlamingo::load(d, &Default::default()).unwrap();
    let c = cases();
    for case in c["cases"].as_array().unwrap() {
        let b = batch(&m, &[prompt_of(case)]);
        let (_, logits) = m.prefill(&b, false).unwrap();
        close(
            "last logits",
            &to_vec(logits)[..8],
            &floats(&case["last_logits_first8"]),
            1e-4,
        );
        let out = m.generate(&b, &model_generation()).unwrap();
        assert_eq!(out[0].ids, ids(&case["generate"]["beam3"]["new_token_ids"]));
    }

    let err = |d: &Path| {
        OpenFlamingo::<Cpu>::load(d, &Default::default())
            .unwrap_err()
            .to_string()
    };
    std::fs::rename(d.join("checkpoint.pt"), d.join("moved.pt")).unwrap();
    let e = err(d);
    assert!(e.contains("checkpoint.pt") && e.contains("none of"), "{e}");
    std::fs::rename(d.join("moved.pt"), d.join("checkpoint.pt")).unwrap();
    std::fs::remove_file(d.join("lm/pytorch_model.bin")).unwrap();
    let e = err(d);
    assert!(
        e.contains("pytorch_model.bin") && e.contains("none of"),
        "{e}"
    );
    copy(
        &pickled.join("pytorch_model.bin"),
        &d.join("lm/pytorch_model.bin"),
    );
    let cfg_path = d.join("lm/config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("max_seq_len");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err(d);
    assert!(
        e.contains("missing field `max_seq_len`") && e.contains("config.json"),
        "{e}"
    );
}
