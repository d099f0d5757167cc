//! Parity of the pointer selector with the PyTorch reference fixture.

use super::host::host;
use super::*;
use crate::tensor_io::{self, Matrix, NamedTensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;

type Bk = DefaultBackend;

pub(crate) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/pointer_selector")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn model() -> PointerSelector<Bk> {
    model_on::<Bk>(&Default::default())
}

/// The fixture checkpoint on `device` of backend `B`.
pub(crate) fn model_on<B: Backend>(device: &B::Device) -> PointerSelector<B> {
    PointerSelector::load(&fixture("sft.ckpt"), 1, device).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn f2(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (*p as f64 - q).abs())
        })
        .fold(0.0, f64::max)
}

/// (pool matrix, query embedding) for a block of expected.json.
pub(crate) fn block_inputs(block: &Value, shared: bool) -> (Matrix, Vec<f32>) {
    let all = tensor_io::load_matrix(&fixture("candidate_embeddings_pool.pt")).unwrap();
    let q = block["query_id"].as_u64().unwrap() as usize;
    let pool = if shared {
        tensor_io::load_matrix(&fixture("candidate_embeddings.pt")).unwrap()
    } else {
        all.select_rows(&usizes(&block["candidate_global_ids"]))
            .unwrap()
    };
    (pool, all.row(q).to_vec())
}

#[test]
fn infers_config_from_checkpoint() {
    let m = model();
    let c = m.config();
    assert_eq!(
        (c.d_model, c.hidden_dim, c.num_layers, c.num_heads),
        (64, 32, 3, 1)
    );
}

#[test]
fn teacher_forced_and_greedy_parity() {
    check_teacher_forced_and_greedy(&model());
}

/// Teacher-forced logits and sequence log-probs within 1e-5 of the
/// reference, greedy predictions identical (any backend).
pub(crate) fn check_teacher_forced_and_greedy<B: Backend>(m: &PointerSelector<B>) {
    let exp = expected();
    let mut checked = 0;
    for (section, shared) in [("shared_pool", true), ("per_query_pool", false)] {
        for block in exp[section]["queries"].as_array().unwrap() {
            let (pool_m, q) = block_inputs(block, shared);
            let pool = m.prepare_pool(&pool_m).unwrap();
            let tf = block["teacher_forced"].as_array().unwrap();
            let labels: Vec<Vec<usize>> = tf.iter().map(|t| usizes(&t["labels"])).collect();
            let qs: Vec<&[f32]> = labels.iter().map(|_| q.as_slice()).collect();
            let got = m.teacher_forced_logits_batch(&pool, &qs, &labels).unwrap();
            for (i, g) in got.iter().enumerate() {
                let d = max_diff(g, &f2(&tf[i]["logits"]));
                assert!(
                    d <= 1e-5,
                    "{section} q{} seq {i}: logits diff {d}",
                    block["query_id"]
                );
                let lp = m.sequence_log_prob(&pool, &q, &labels[i], None).unwrap();
                let e = tf[i]["sequence_log_prob"].as_f64().unwrap();
                assert!((lp - e).abs() <= 1e-5, "seq log prob {lp} vs {e}");
                for (s, row) in g.iter().enumerate() {
                    let e = tf[i]["step_log_probs"][s].as_f64().unwrap();
                    assert!((log_softmax_at(row, labels[i][s], None) - e).abs() <= 1e-5);
                }
            }
            let t3 = &block["teacher_forced_shot3"];
            let l3 = usizes(&t3["labels"]);
            let got = m.teacher_forced_logits(&pool, &q, &l3).unwrap();
            let d = max_diff(&got, &f2(&t3["logits"]));
            assert!(d <= 1e-5, "shot3 diff {d}");
            for (key, shot) in [("greedy_shot2", 2), ("greedy_shot3", 3)] {
                let (pred, logits) = m.greedy(&pool, &[&q], shot).unwrap().remove(0);
                assert_eq!(pred, usizes(&block[key]["predictions"]), "{section} {key}");
                let d = max_diff(&logits, &f2(&block[key]["logits"]));
                assert!(d <= 1e-5, "{key} diff {d}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

#[test]
fn repeated_label_sees_mask() {
    let m = model();
    let exp = expected();
    let block = &exp["shared_pool"]["queries"][0];
    let tf = block["teacher_forced"].as_array().unwrap();
    let labels: Vec<Vec<usize>> = tf.iter().map(|t| usizes(&t["labels"])).collect();
    let (i, l) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| l[0] == l[1])
        .expect("fixture has a repeated label");
    let (pool_m, q) = block_inputs(block, true);
    let pool = m.prepare_pool(&pool_m).unwrap();
    let got = m.teacher_forced_logits(&pool, &q, l).unwrap();
    assert_eq!(got[1][l[0]], -100.0);
    let e = tf[i]["sequence_log_prob"].as_f64().unwrap();
    assert!((m.sequence_log_prob(&pool, &q, l, None).unwrap() - e).abs() <= 1e-5);
}

#[test]
fn batched_greedy_shared_pool() {
    check_batched_greedy(&model());
}

/// Greedy decoding of several queries at once equals the reference (any
/// backend).
pub(crate) fn check_batched_greedy<B: Backend>(m: &PointerSelector<B>) {
    let exp = expected();
    let b = &exp["batched_greedy_shared_pool"];
    let all = tensor_io::load_matrix(&fixture("candidate_embeddings_pool.pt")).unwrap();
    let pool = m
        .prepare_pool(&tensor_io::load_matrix(&fixture("candidate_embeddings.pt")).unwrap())
        .unwrap();
    let ids = usizes(&b["query_ids"]);
    let qs: Vec<&[f32]> = ids.iter().map(|&i| all.row(i)).collect();
    let got = m.greedy(&pool, &qs, 2).unwrap();
    for (i, (pred, logits)) in got.iter().enumerate() {
        assert_eq!(pred, &usizes(&b["predictions"][i]));
        let d = max_diff(logits, &f2(&b["logits"][i]));
        assert!(d <= 1e-5, "batched greedy diff {d}");
    }
}

#[test]
fn missing_tensors_are_all_listed() {
    let mut sd = tensor_io::load_state_dict(&fixture("sft.ckpt")).unwrap();
    sd.remove("lever_lm.pointer_selector.cand_proj.weight");
    sd.remove("lever_lm.pointer_selector.attn_norms.1.bias");
    let e =
        PointerSelector::<Bk>::from_state_dict(&sd, "x.ckpt", 1, &Default::default()).unwrap_err();
    match &e {
        PointerSelectorError::MissingTensors { keys, .. } => assert_eq!(
            keys,
            &vec![
                "lever_lm.pointer_selector.cand_proj.weight".to_string(),
                "lever_lm.pointer_selector.attn_norms.1.bias".to_string()
            ]
        ),
        other => panic!("unexpected {other}"),
    }
    // prefix-free state dict works too
    let sd2: BTreeMap<String, NamedTensor> = tensor_io::load_state_dict(&fixture("sft.ckpt"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("lever_lm.pointer_selector.")
                .map(|s| (s.to_string(), v))
        })
        .collect();
    assert!(PointerSelector::<Bk>::from_state_dict(&sd2, "bare", 1, &Default::default()).is_ok());
    let none: BTreeMap<String, NamedTensor> = BTreeMap::new();
    assert!(matches!(
        PointerSelector::<Bk>::from_state_dict(&none, "empty", 1, &Default::default()),
        Err(PointerSelectorError::NotFound { .. })
    ));
    // heads must divide hidden
    assert!(matches!(
        PointerSelector::<Bk>::from_state_dict(&sd2, "bare", 5, &Default::default()),
        Err(PointerSelectorError::Config(_))
    ));
}

#[test]
fn layer_indices_must_be_contiguous() {
    // A key renamed to layer 99999999: the old loader built the
    // expected keys of 10^8 layers (3.8 GB) before listing them missing.
    let sd = tensor_io::load_state_dict(&fixture("sft.ckpt")).unwrap();
    let old = "lever_lm.pointer_selector.attn_norms.1.bias";
    let new = "lever_lm.pointer_selector.attn_norms.99999999.bias";
    let mut bad = sd.clone();
    let t = bad.remove(old).unwrap();
    bad.insert(new.to_string(), t);
    let started = std::time::Instant::now();
    let e =
        PointerSelector::<Bk>::from_state_dict(&bad, "x.ckpt", 1, &Default::default()).unwrap_err();
    assert!(started.elapsed().as_secs() < 5);
    match &e {
        PointerSelectorError::LayerIndex { key, source_name } => {
            assert_eq!((key.as_str(), source_name.as_str()), (new, "x.ckpt"))
        }
        other => panic!("unexpected {other}"),
    }
    assert!(e.to_string().contains(new), "{e}");
    // A gap, and an index that is not a plain number.
    for key in [
        "lever_lm.pointer_selector.cross_attn_layers.7.out_proj.bias",
        "lever_lm.pointer_selector.cross_attn_layers.01.out_proj.bias",
        "lever_lm.pointer_selector.attn_norms.x.bias",
    ] {
        let mut bad = sd.clone();
        bad.insert(key.to_string(), sd[old].clone());
        let e = PointerSelector::<Bk>::from_state_dict(&bad, "x.ckpt", 1, &Default::default())
            .unwrap_err();
        assert!(
            matches!(&e, PointerSelectorError::LayerIndex { key: k, .. } if k == key),
            "{e}"
        );
    }
}

#[test]
fn dim_mismatch_is_an_error() {
    let m = model();
    let bad = Matrix {
        rows: 2,
        cols: 32,
        data: vec![0.5; 64],
    };
    let e = m.prepare_pool(&bad).unwrap_err().to_string();
    assert!(e.contains("32") && e.contains("64"), "{e}");
    let pool = m
        .prepare_pool(&Matrix {
            rows: 2,
            cols: 64,
            data: vec![0.5; 128],
        })
        .unwrap();
    assert!(matches!(
        m.query_states(&pool, &[&[0.0; 10]]),
        Err(PointerSelectorError::DimMismatch { found: 10, .. })
    ));
}

/// Independent scalar reference of the query path (any head count).
fn reference_state(m: &PointerSelector<Bk>, cand: &Matrix, q: &[f32]) -> Vec<f32> {
    let lin = |l: &Linear<Bk>, x: &[f32]| -> Vec<f32> {
        let w = host(l.weight.val()); // [in, out]
        let [inp, out] = l.weight.val().dims();
        let b = l
            .bias
            .as_ref()
            .map(|b| host(b.val()))
            .unwrap_or(vec![0.0; out]);
        (0..out)
            .map(|o| (0..inp).map(|i| x[i] * w[i * out + o]).sum::<f32>() + b[o])
            .collect()
    };
    let proj = |x: &[f32]| match &m.input_proj {
        Some(p) => lin(p, x),
        None => x.to_vec(),
    };
    let h = m.hidden_dim;
    let hd = h / m.num_heads;
    let c: Vec<Vec<f32>> = (0..cand.rows).map(|r| proj(cand.row(r))).collect();
    let mut qh = proj(q);
    for (l, layer) in m.layers.iter().enumerate() {
        let qq = lin(&layer.q, &qh);
        let keys: Vec<Vec<f32>> = c.iter().map(|x| lin(&layer.k, x)).collect();
        let vals: Vec<Vec<f32>> = c.iter().map(|x| lin(&layer.v, x)).collect();
        let mut a = vec![0f32; h];
        for head in 0..m.num_heads {
            let r = head * hd..(head + 1) * hd;
            let sc: Vec<f32> = keys
                .iter()
                .map(|k| {
                    qq[r.clone()]
                        .iter()
                        .zip(&k[r.clone()])
                        .map(|(x, y)| x * y)
                        .sum::<f32>()
                        / (hd as f32).sqrt()
                })
                .collect();
            let mx = sc.iter().copied().fold(f32::MIN, f32::max);
            let e: Vec<f32> = sc.iter().map(|x| (x - mx).exp()).collect();
            let z: f32 = e.iter().sum();
            for (j, v) in vals.iter().enumerate() {
                for d in r.clone() {
                    a[d] += e[j] / z * v[d];
                }
            }
        }
        let mut y: Vec<f32> = lin(&layer.out, &a)
            .iter()
            .zip(&qh)
            .map(|(x, r)| x + r)
            .collect();
        let g = host(m.norms[l].gamma.val());
        let b = host(m.norms[l].beta.as_ref().unwrap().val());
        let mean = y.iter().sum::<f32>() / h as f32;
        let var = y.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / h as f32;
        for (j, x) in y.iter_mut().enumerate() {
            *x = (*x - mean) / (var + 1e-5).sqrt() * g[j] + b[j];
        }
        qh = y;
    }
    let mut s = lin(&m.query_proj, &qh);
    let n = s.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    s.iter_mut().for_each(|x| *x /= n);
    s
}

#[test]
fn multi_head_matches_scalar_reference() {
    for heads in [1usize, 2, 4] {
        let cfg = PointerSelectorConfig::new(8, 8, 2).with_num_heads(heads);
        let m = cfg.init::<Bk>(&Default::default()).unwrap();
        let cand = Matrix {
            rows: 5,
            cols: 8,
            data: (0..40)
                .map(|i| ((i * 7 % 11) as f32) / 11.0 - 0.4)
                .collect(),
        };
        let pool = m.prepare_pool(&cand).unwrap();
        let q1: Vec<f32> = (0..8).map(|i| i as f32 / 8.0).collect();
        let q2: Vec<f32> = (0..8).map(|i| 1.0 - i as f32 / 5.0).collect();
        let both = m.query_states(&pool, &[&q1, &q2]).unwrap().data;
        for (i, q) in [&q1, &q2].iter().enumerate() {
            let r = reference_state(&m, &cand, q);
            for (a, b) in both[i * 8..(i + 1) * 8].iter().zip(&r) {
                assert!((a - b).abs() < 1e-5, "heads {heads}: {a} vs {b}");
            }
        }
    }
}
