//! `--vqa_model` names resolved as the Hugging Face libraries resolve them:
//! a Hugging Face cache laid out as `huggingface_hub` lays it out (blobs,
//! snapshots of symbolic links, refs) is built from the tiny Qwen2.5-VL
//! fixture, and `leverflow vqa` answers with a repository id and with the
//! original's alias, offline, exactly as with the fixture's directory.

mod common;

use common::root;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const COMMIT: &str = "7b2e5c1d0a9f8e7d6c5b4a39281706f5e4d3c2b1";

fn fixture() -> PathBuf {
    root().join("tests/fixtures/qwen2_5_vl_tiny")
}

/// A Hugging Face cache at `hub` holding the fixture as `repo` at `main`.
fn build_cache(hub: &Path, repo: &str) {
    let folder = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), COMMIT).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // The blob's name stands for its hash; the snapshot links to it.
        let blob = format!("blob-{name}");
        std::fs::copy(&path, folder.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(&name)).unwrap();
    }
}

/// A request file with one prompt on the fixture's images.
fn request(dir: &Path) -> PathBuf {
    let img = |n: &str| fixture().join("images").join(n);
    let req = json!([{
        "examples": [{"image": img("easyvqa_train_1226.png"), "question": "what shape is this?", "answer": "circle"}],
        "query": {"image": img("easyvqa_train_345.png"), "question": "what color is the shape?"},
        "gen": {"num_beams": 1, "max_new_tokens": 3}
    }]);
    let path = dir.join("req.json");
    std::fs::write(&path, req.to_string()).unwrap();
    path
}

/// `leverflow vqa` with `env` set (and the Hugging Face variables of this
/// process's environment removed, so only the test's cache is seen).
fn vqa(args: &[&str], req: &Path, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leverflow"));
    cmd.arg("vqa").args(args).arg("--request").arg(req);
    for var in ["HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "leverflow vqa failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn repository_ids_and_aliases_resolve_in_the_hugging_face_cache() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path());
    let fixture_dir = fixture();
    let expected = stdout_ok(&vqa(
        &["--vqa_model", fixture_dir.to_str().unwrap()],
        &req,
        &[],
    ));
    assert!(expected.contains("raw_generation"), "{expected}");

    // HF_HUB_CACHE names the cache itself.
    let hub = dir.path().join("hub-cache");
    build_cache(&hub, "Qwen/Qwen2.5-VL-3B-Instruct");
    let by_id = vqa(
        &["--vqa_model", "Qwen/Qwen2.5-VL-3B-Instruct", "--offline"],
        &req,
        &[("HF_HUB_CACHE", &hub)],
    );
    assert_eq!(stdout_ok(&by_id), expected);

    // HF_HOME/hub when HF_HUB_CACHE is unset; HF_HUB_OFFLINE=1 as --offline.
    let home = dir.path().join("hf-home");
    build_cache(&home.join("hub"), "Qwen/Qwen2.5-VL-3B-Instruct");
    let by_alias = vqa(
        &["--vqa_model", "qwen2.5_vl_3B"],
        &req,
        &[("HF_HOME", &home), ("HF_HUB_OFFLINE", Path::new("1"))],
    );
    assert_eq!(stdout_ok(&by_alias), expected);

    // A revision is looked up in refs/.
    let by_commit = vqa(
        &[
            "--vqa_model",
            "qwen2.5_vl_3B",
            "--offline",
            "--revision",
            COMMIT,
        ],
        &req,
        &[("HF_HUB_CACHE", &hub)],
    );
    assert_eq!(stdout_ok(&by_commit), expected);
}

#[test]
fn a_missing_repository_offline_says_what_is_missing_and_how_to_fetch_it() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path());
    let hub = dir.path().join("empty-hub");
    std::fs::create_dir_all(&hub).unwrap();
    let out = vqa(
        &["--vqa_model", "qwen2.5_vl_7B", "--offline"],
        &req,
        &[("HF_HUB_CACHE", &hub)],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "not in the Hugging Face cache",
        "models--Qwen--Qwen2.5-VL-7B-Instruct/refs/main",
        "huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --revision main",
        "--offline",
    ] {
        assert!(
            err.contains(needle),
            "stderr should mention {needle:?}: {err}"
        );
    }
    let out = vqa(
        &[
            "--vqa_model",
            "Qwen/Qwen2.5-VL-3B-Instruct",
            "--revision",
            "v9",
        ],
        &req,
        &[("HF_HUB_CACHE", &hub), ("HF_HUB_OFFLINE", Path::new("1"))],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refs/v9") && err.contains("HF_HUB_OFFLINE is set"),
        "{err}"
    );
}

#[test]
fn openflamingo_9b_is_named_as_not_supported_yet() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path());
    let out = vqa(&["--vqa_model", "flamingo_9B"], &req, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("OpenFlamingo model is not supported yet"),
        "{err}"
    );
    assert!(
        err.contains("qwen2.5_vl_3B") && err.contains("Qwen/Qwen2.5-VL-3B-Instruct"),
        "{err}"
    );
}

/// A cache holding `files` (name, source) as `repo` at `main`, linked from
/// blobs as `huggingface_hub` lays them out.
fn cache_files(hub: &Path, repo: &str, files: &[(&str, PathBuf)]) {
    let folder = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), COMMIT).unwrap();
    for (name, src) in files {
        let blob = format!("blob-{name}");
        std::fs::copy(src, folder.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(name)).unwrap();
    }
}

/// `--vqa_model flamingo_3B` finds OpenFlamingo's three repositories (the
/// language model, open_clip's weights, OpenFlamingo's `checkpoint.pt`) in
/// the Hugging Face cache, offline, and answers as the reference (the tiny
/// fixture stands in for each repository, in the real files' formats).
#[test]
fn flamingo_3b_is_found_in_the_cache() {
    let fx = root().join("tests/fixtures/openflamingo_tiny");
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub");
    let lm: Vec<(&str, PathBuf)> = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .map(|n| (*n, fx.join("lm").join(n)))
    .collect();
    cache_files(&hub, "anas-awadalla/mpt-1b-redpajama-200b", &lm);
    let model_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("vision_config.json")).unwrap())
            .unwrap();
    let open_clip = dir.path().join("open_clip_config.json");
    std::fs::write(&open_clip, json!({"model_cfg": model_cfg}).to_string()).unwrap();
    cache_files(
        &hub,
        "timm/vit_large_patch14_clip_224.openai",
        &[
            ("open_clip_config.json", open_clip),
            (
                "open_clip_pytorch_model.bin",
                fx.join("pickled/open_clip_pytorch_model.bin"),
            ),
        ],
    );
    cache_files(
        &hub,
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
        &[("checkpoint.pt", fx.join("pickled/checkpoint.pt"))],
    );
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("cases.json")).unwrap()).unwrap();
    let case = &cases["cases"][0];
    let r = &case["request"];
    let abs = |v: &serde_json::Value| fx.join(v.as_str().unwrap());
    let req = dir.path().join("req.json");
    let request = json!([{
        "examples": r["examples"].as_array().unwrap().iter().map(|e| json!({
            "image": abs(&e["image"]), "question": e["question"], "answer": e["answer"],
        })).collect::<Vec<_>>(),
        "query": {"image": abs(&r["query"]["image"]), "question": r["query"]["question"]},
    }]);
    std::fs::write(&req, request.to_string()).unwrap();
    let out = vqa(
        &["--vqa_model", "flamingo_3B", "--offline"],
        &req,
        &[("HF_HUB_CACHE", &hub)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["input_ids"], case["input_ids"]);
    assert_eq!(
        line["generated_ids"],
        case["generate"]["beam3"]["new_token_ids"]
    );
}
