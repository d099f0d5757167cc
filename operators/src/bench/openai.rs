//! `leverflow bench openai --openai_base_url URL`: answers per second of the
//! `openai` backend through a running server, on the demo (its easy-VQA
//! data, policy and prompts; the server serves whatever model it serves,
//! e.g. `demo/vlm`), at each of `--concurrency` requests in flight, and the
//! time leverflow spends per request outside the server.
//!
//! Each measured run is a whole `leverflow generate` of the binary with a
//! fresh state store (every prompt is asked) and `--vqa_num_beams 1`. The
//! line per concurrency reports the median run's answers per second over
//! the dataflow's time (`_meta.timings.dataflow_s`) and, from the backend's
//! counters, the client's own time per request: building the request
//! (reading the images, base64, JSON) and parsing the response
//! (`overhead_ms_per_request`), next to the mean time from sending a request
//! to having its answer (`http_ms_per_request`, which is mostly the
//! server's).

use std::path::Path;

use super::{median, BenchError, BenchSettings};

/// What the `openai` benchmark talks to.
#[derive(Debug, Clone, Default)]
pub struct OpenAiBench {
    /// The server's base URL.
    pub base_url: Option<String>,
    /// The served model (default: the only one).
    pub model: Option<String>,
    /// Requests in flight to measure at.
    pub concurrency: Vec<usize>,
}

/// One measured run: dataflow seconds, requests, and the backend counters.
struct Measured {
    dataflow_s: f64,
    requests: u64,
    build_s: f64,
    http_s: f64,
    parse_s: f64,
}

/// The demo's `generate` flags, answered by the server.
fn flags(s: &BenchSettings, o: &OpenAiBench, url: &str, c: usize, out: &Path) -> Vec<String> {
    let mut v = vec!["generate".to_string()];
    v.extend(super::demo_policy_flags(&s.repo));
    v.extend(super::demo_data_flags(&s.repo));
    v.extend(
        [
            "--vqa_backend",
            "openai",
            "--openai_base_url",
            url,
            "--openai_concurrency",
            &c.to_string(),
            "--vqa_num_beams",
            "1",
            "--end_idx",
            &s.queries.to_string(),
            "--quiet",
            "--output_path",
            &out.display().to_string(),
        ]
        .iter()
        .map(|x| x.to_string()),
    );
    if let Some(m) = &o.model {
        v.push("--openai_model".into());
        v.push(m.clone());
    }
    v
}

/// Runs the binary once into a fresh directory and reads its `_meta`.
fn measure(
    s: &BenchSettings,
    o: &OpenAiBench,
    url: &str,
    c: usize,
) -> Result<Measured, BenchError> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("rl.json");
    let run = std::process::Command::new(&s.exe)
        .args(flags(s, o, url, c, &out))
        .output()?;
    if !run.status.success() {
        return Err(BenchError::Run(
            String::from_utf8_lossy(&run.stderr).into_owned(),
        ));
    }
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let meta = &v["_meta"];
    let b = &meta["counts"]["vqa_backend"];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    Ok(Measured {
        dataflow_s: f(&meta["timings"]["dataflow_s"]),
        // Summed over workers as numbers (the summary adds them as f64).
        requests: b["openai_requests"].as_f64().unwrap_or(0.0) as u64,
        build_s: f(&b["openai_build_s"]),
        http_s: f(&b["openai_http_s"]),
        parse_s: f(&b["openai_parse_s"]),
    })
}

/// Runs the benchmark: one JSON line per concurrency.
pub fn bench_openai(s: &BenchSettings, o: &OpenAiBench) -> Result<(), BenchError> {
    let url = o.base_url.as_deref().ok_or_else(|| {
        BenchError::Run("bench openai needs --openai_base_url URL of a running server".into())
    })?;
    let levels = if o.concurrency.is_empty() {
        vec![1, 4, 16]
    } else {
        o.concurrency.clone()
    };
    for &c in &levels {
        // One warm-up run (the server's first requests compile kernels).
        measure(s, o, url, c)?;
        let mut runs = Vec::with_capacity(s.reps.max(1));
        for _ in 0..s.reps.max(1) {
            runs.push(measure(s, o, url, c)?);
        }
        let secs: Vec<f64> = runs.iter().map(|r| r.dataflow_s).collect();
        let med = median(&secs);
        let m = runs
            .iter()
            .min_by(|a, b| {
                (a.dataflow_s - med)
                    .abs()
                    .total_cmp(&(b.dataflow_s - med).abs())
            })
            .ok_or_else(|| BenchError::Run("no run".into()))?;
        let per = |x: f64| 1e3 * x / m.requests.max(1) as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "openai",
                "concurrency": c,
                "reps": runs.len(),
                "requests": m.requests,
                "dataflow_median_s": med,
                "answers_per_s": m.requests as f64 / med,
                "overhead_ms_per_request": per(m.build_s + m.parse_s),
                "build_ms_per_request": per(m.build_s),
                "parse_ms_per_request": per(m.parse_s),
                "http_ms_per_request": per(m.http_s),
            })
        );
    }
    Ok(())
}
