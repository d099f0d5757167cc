//! The library API: `operators/examples/pipeline.rs` (the embedded demo
//! through `Pipeline`, no command-line parsing) writes the same outputs as
//! `leverflow generate --demo`.

mod common;

#[path = "../operators/examples/pipeline.rs"]
mod example;

use common::*;
use leverflow_operators::outputs::{read_rl_parquet, rows_to_records};

#[test]
fn the_library_example_writes_what_generate_demo_writes() {
    let dir = tempfile::tempdir().unwrap();
    let lib_dir = dir.path().join("library");
    let run = example::run_demo(&root().join("demo"), &lib_dir).unwrap();
    assert_eq!(run.summary.queries, 48);
    assert!(run.summary.vqa_calls > 0);

    let cli = dir.path().join("cli").join("rl_data.json");
    ok(&leverflow(&[
        "generate".into(),
        "--demo".into(),
        "--quiet".into(),
        "--output_path".into(),
        cli.display().to_string(),
    ]));
    let lib = lib_dir.join("rl_data.json");
    assert_eq!(without_meta(&lib), without_meta(&cli));
    let rows = |p: &std::path::Path| rows_to_records(read_rl_parquet(p).unwrap().1);
    assert_eq!(
        rows(&lib.with_extension("parquet")),
        rows(&cli.with_extension("parquet"))
    );
    // `_meta` agrees too, apart from when and how long.
    let meta = |p: &std::path::Path| {
        let mut m = read_json(p)["_meta"].clone();
        for k in ["created_at", "timings", "args"] {
            m.as_object_mut().unwrap().remove(k);
        }
        m["counts"]["vqa_backend"]
            .as_object_mut()
            .unwrap()
            .remove("seconds");
        // The model directory as each was given it.
        m["vqa_model"].as_object_mut().unwrap().remove("dir");
        m
    };
    assert_eq!(meta(&lib), meta(&cli));
}
