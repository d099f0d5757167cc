//! `leverflow vqa` reproduces the HF transformers reference end to end:
//! the request file is built from the fixture's messages, and the printed
//! prompt and beam-search generation must equal the reference.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl_tiny")
}

/// Splits "Question:<q> Short answer:<a>" into (q, a).
fn split(text: &str) -> (String, String) {
    let rest = text.strip_prefix("Question:").expect("question prefix");
    let (q, a) = rest.split_once(" Short answer:").expect("answer marker");
    (q.to_string(), a.to_string())
}

/// The request file of three fixture cases (5 new tokens, `num_beams`
/// beams) and, per request, the reference's rendered prompt and generated
/// ids.
fn reference_requests(dir: &Path, num_beams: u64) -> (PathBuf, Vec<(Value, Vec<u64>)>) {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("cases.json")).unwrap())
            .unwrap();
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for name in ["two_shot", "zero_shot", "large_image"] {
        let case = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        let messages = &case["messages"][0];
        let items = messages[1]["content"].as_array().unwrap();
        let mut pairs = Vec::new();
        for pair in items.chunks(2) {
            let image = fixture().join(pair[0]["image"].as_str().unwrap());
            let (q, a) = split(pair[1]["text"].as_str().unwrap());
            pairs.push((image, q, a));
        }
        let (query_image, query_q, _) = pairs.pop().unwrap();
        requests.push(json!({
            "system_prompt": messages[0]["content"],
            "examples": pairs.iter().map(|(i, q, a)| json!({"image": i, "question": q, "answer": a})).collect::<Vec<_>>(),
            "query": {"image": query_image, "question": query_q},
            "gen": {"num_beams": num_beams, "max_new_tokens": 5, "min_new_tokens": 0, "length_penalty": 0.0, "repetition_penalty": 1.0},
        }));
        let field = if num_beams == 1 {
            "greedy"
        } else {
            "beam_search"
        };
        let ids: Vec<u64> = case[field][0]["new_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .filter(|&t| t != 151643)
            .collect();
        expected.push((case["rendered_prompts"][0].clone(), ids));
    }
    let req = dir.join("req.json");
    std::fs::write(&req, serde_json::to_string(&requests).unwrap()).unwrap();
    (req, expected)
}

/// `leverflow vqa --device <device>` on the fixture model: its JSON lines.
fn run_vqa(device: &str, req: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(["vqa", "--device", device, "--vqa_model"])
        .arg(fixture())
        .arg("--request")
        .arg(req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{device}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each printed line has the reference's prompt and generated ids.
fn assert_reference(device: &str, lines: &[Value], expected: &[(Value, Vec<u64>)]) {
    assert_eq!(lines.len(), expected.len());
    for (got, (prompt, ids)) in lines.iter().zip(expected) {
        assert_eq!(&got["prompt_text"], prompt, "{device}");
        let got_ids: Vec<u64> = got["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(&got_ids, ids, "{device}");
    }
}

#[test]
fn vqa_command_matches_the_reference_beam_search() {
    let dir = tempfile::tempdir().unwrap();
    let (req, expected) = reference_requests(dir.path(), 3);
    assert_reference("cpu", &run_vqa("cpu", &req), &expected);
}

/// `--device wgpu` (the generic burn code every GPU backend runs, here on
/// whatever adapter wgpu finds: lavapipe in CI) prints what the CPU prints:
/// the same prompts, prompt ids, generated ids and answers (greedy).
#[cfg(feature = "wgpu")]
#[test]
fn vqa_on_wgpu_prints_the_cpu_ids() {
    compare_wgpu_with_cpu(1);
}

/// As [`vqa_on_wgpu_prints_the_cpu_ids`] with 3 beams: the device ranking
/// reduces rows of beams × vocabulary (README, "Devices and features").
#[cfg(feature = "wgpu")]
#[test]
fn vqa_on_wgpu_beam_search() {
    compare_wgpu_with_cpu(3);
}

#[cfg(feature = "wgpu")]
fn compare_wgpu_with_cpu(num_beams: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (req, expected) = reference_requests(dir.path(), num_beams);
    let cpu = run_vqa("cpu", &req);
    let gpu = run_vqa("wgpu", &req);
    assert_reference("cpu", &cpu, &expected);
    assert_reference("wgpu", &gpu, &expected);
    assert_eq!(cpu, gpu);
}

#[test]
fn vqa_command_explains_a_missing_model_directory() {
    let out = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args([
            "vqa",
            "--vqa_model",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            "--request",
            "req.json",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("req.json") || err.contains("not a local directory"),
        "{err}"
    );
}

/// `leverflow vqa` on the OpenFlamingo fixture directory answers the same
/// request JSON as for Qwen: the printed prompt ids and beam-search ids
/// are the reference's (open-flamingo 2.0.1, transformers 4.33.3), for
/// both cases in one request file (answered as one left-padded batch).
#[test]
fn vqa_command_answers_with_openflamingo() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openflamingo_tiny");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("cases.json")).unwrap())
            .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    let absolute = |p: &Value| fixture.join(p.as_str().unwrap());
    let requests: Vec<Value> = cases
        .iter()
        .map(|c| {
            let r = &c["request"];
            json!({
                "examples": r["examples"].as_array().unwrap().iter().map(|e| json!({
                    "image": absolute(&e["image"]), "question": e["question"], "answer": e["answer"],
                })).collect::<Vec<_>>(),
                "query": {"image": absolute(&r["query"]["image"]), "question": r["query"]["question"]},
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    std::fs::write(&req, serde_json::to_string(&requests).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(["vqa", "--vqa_model"])
        .arg(&fixture)
        .arg("--request")
        .arg(&req)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len());
    for (got, case) in lines.iter().zip(cases) {
        assert_eq!(got["prompt_text"], case["text"]);
        assert_eq!(got["input_ids"], case["input_ids"]);
        assert_eq!(
            got["generated_ids"],
            case["generate"]["beam3"]["new_token_ids"]
        );
        assert_eq!(
            got["raw_generation"],
            case["generate"]["beam3"]["decoded_skip_special"]
        );
    }
}
