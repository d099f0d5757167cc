//! The `openai` backend against a real OpenAI-compatible server:
//! `transformers serve` (Python, CPU torch) started by the test on
//! 127.0.0.1, serving the demo's trained model (`demo/vlm`).
//!
//! The server's Python environment is made by `bash tools/serve_env.sh`
//! (`.ci/run` runs it first); without it these tests fail and say so.
//!
//! One setting the server needs: `transformers serve` parses a Qwen model's
//! reply with Qwen's response template, whose start anchor is the text
//! `<|im_start|>assistant\n`. The demo's word-level tokenizer has no
//! decoder (tokens decode joined by spaces: `<|im_start|> assistant`), so
//! the anchor never matches and the reply would keep the prompt's tail. The
//! test serves a copy of `demo/vlm` whose `tokenizer_config.json` adds a
//! `response_template` with that anchor as a pattern; real Qwen checkpoints
//! (byte-level tokenizers) need nothing.

mod common;

use common::{demo_args, leverflow, ok, read_json, root, with_flag, without_meta};
use serde_json::Value;
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One server at a time: each takes both cores while it answers.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long a server may take to load (the first import of torch is slow).
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// The virtual environment of `tools/serve_env.sh`.
fn serve_venv() -> PathBuf {
    match std::env::var_os("LEVERFLOW_SERVE_VENV") {
        Some(v) => PathBuf::from(v),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME"))
            .join(".cache/leverflow/serve-venv"),
    }
}

/// The `transformers` command of the environment; fails the test with the
/// one command that prepares it when it is missing.
fn transformers_cli() -> PathBuf {
    let venv = serve_venv();
    let cli = venv.join("bin/transformers");
    assert!(
        cli.is_file() && venv.join(".leverflow-serve-env").is_file(),
        "the test server's Python environment is missing ({}); prepare it with:\n\n    bash tools/serve_env.sh\n",
        venv.display()
    );
    cli
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A copy of `demo/vlm` with the response template the server needs (see
/// the module docs).
fn served_model(dir: &Path) -> PathBuf {
    let model = dir.join("vlm");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(root().join("demo/vlm")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = model.join("tokenizer_config.json");
    let mut cfg: Value = read_json(&cfg_path);
    cfg["response_template"] = serde_json::json!({
        "defaults": {"role": "assistant"},
        "start_anchor_pattern": r"<\|im_start\|>\s*assistant\s*",
        "fields": {"content": {
            "close_pattern": r"\s*(?:<\|im_end\|>|<\|endoftext\|>)",
            "content": "text"
        }}
    });
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    model
}

/// A `transformers serve` process group on 127.0.0.1.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    /// Starts the server and waits until `GET /v1/models` lists the model.
    fn start(model: &Path, log: &Path) -> Server {
        let port = free_port();
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(transformers_cli())
            .arg("serve")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--device", "cpu", "--log-level", "warning"])
            .env("HF_HUB_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("start transformers serve");
        let mut server = Server {
            child,
            port,
            log: log.to_path_buf(),
        };
        server.wait_ready(model);
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Polls `GET /v1/models` until the model is listed (the server loads
    /// it before it listens), failing at once if the server exits.
    fn wait_ready(&mut self, model: &Path) {
        let started = Instant::now();
        let id = model.display().to_string();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "transformers serve exited ({status}) before it was ready:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if get_models(self.port).is_some_and(|body| body.contains(&id)) {
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "transformers serve was not ready after {START_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the server's whole process group (uvicorn and the model's
    /// process) and reaps it.
    fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test created with
        // `process_group(0)`; the group id is the child's pid.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of `GET /v1/models`, if the server answers 200.
fn get_models(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /v1/models HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1.1 200").then_some(text)
}

/// The demo's `generate` flags (greedy answers), writing to `out`, with
/// progress as JSON lines.
fn demo_generate(out: &Path, end_idx: usize) -> Vec<String> {
    let mut args = vec!["generate".to_string()];
    args.extend(demo_args(out).into_iter().filter(|a| a != "--quiet"));
    args.extend(
        [
            "--vqa_model",
            &root().join("demo/vlm").display().to_string(),
            "--vqa_num_beams",
            "1",
            "--end_idx",
            &end_idx.to_string(),
            "--progress",
            "none",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args
}

/// The same, answered by the server at `url`.
fn openai_generate(out: &Path, end_idx: usize, url: &str) -> Vec<String> {
    let mut args = demo_generate(out, end_idx);
    args.extend(
        ["--vqa_backend", "openai", "--openai_base_url", url]
            .iter()
            .map(|s| s.to_string()),
    );
    args
}

/// A running `leverflow` whose JSON progress lines arrive on a channel.
struct Run {
    child: Child,
    lines: Receiver<String>,
    stderr: std::sync::Arc<Mutex<String>>,
}

fn spawn(args: &[String]) -> Run {
    let args = with_flag(args.to_vec(), "--progress", "json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = std::sync::Arc::new(Mutex::new(String::new()));
    let keep = std::sync::Arc::clone(&stderr);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            keep.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    Run {
        child,
        lines,
        stderr,
    }
}

impl Run {
    /// Waits for a progress line with at least `n` answers received from
    /// the server in this run.
    fn wait_answers(&self, n: u64) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    let answered = v["requests_answered"].as_u64().unwrap_or(0);
                    if v["event"] == "progress" && answered >= n {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no progress: {}", self.stderr()),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the run ended before {n} answers: {}", self.stderr())
                }
            }
        }
    }

    fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        // The reader thread ends with the pipe.
        while self.lines.recv_timeout(Duration::from_secs(5)).is_ok() {}
        (status, self.stderr())
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

fn raw_generations(v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (q, rec) in v.as_object().unwrap() {
        if q == "_meta" {
            continue;
        }
        for (i, c) in rec["pointer_candidates"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            out.push((
                format!("{q}/{i}"),
                c["vqa_raw_generation"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

#[test]
fn answers_equal_the_burn_backend_and_credentials_are_never_recorded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let model = served_model(dir.path());
    let server = Server::start(&model, &dir.path().join("serve.log"));
    let end = 24;
    let burn_out = dir.path().join("burn/rl.json");
    ok(&leverflow(&demo_generate(&burn_out, end)));

    let url = server.url();
    let with_creds = url.replace("http://", "http://leverflow:s3cr%40t@");
    let oai_out = dir.path().join("openai/rl.json");
    let mut args = openai_generate(&oai_out, end, &with_creds);
    args = with_flag(args, "--openai_concurrency", "4");
    let out = Command::new(env!("CARGO_BIN_EXE_leverflow"))
        .args(&args)
        .env("OPENAI_API_KEY", "sk-leverflow-test-key")
        .output()
        .unwrap();
    ok(&out);

    let burn = read_json(&burn_out);
    let oai = read_json(&oai_out);
    let (b, o) = (raw_generations(&burn), raw_generations(&oai));
    assert!(b.len() > 100, "{} candidates", b.len());
    assert_eq!(
        b, o,
        "every candidate's answer must equal the burn backend's"
    );
    assert_eq!(without_meta(&burn_out), without_meta(&oai_out));

    let meta = &oai["_meta"];
    assert_eq!(meta["vqa_model"]["base_url"], url.as_str());
    assert_eq!(meta["vqa_model"]["model"], model.display().to_string());
    assert_eq!(
        meta["args"]["openai_base_url"],
        url.replace("http://", "http://***@").as_str()
    );
    for file in [&oai_out, &oai_out.with_extension("parquet")] {
        let bytes = std::fs::read(file).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("s3cr") && !text.contains("sk-leverflow"));
    }
    let printed =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("s3cr") && !printed.contains("sk-leverflow"));
}

#[test]
fn a_killed_server_stops_the_run_and_a_rerun_completes_from_the_store() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let model = served_model(dir.path());
    let reference = dir.path().join("burn/rl.json");
    let end = 48;
    ok(&leverflow(&demo_generate(&reference, end)));

    // The server dies mid-run: the run stops naming server, query, status.
    let out = dir.path().join("openai/rl.json");
    let mut server = Server::start(&model, &dir.path().join("serve1.log"));
    let url = server.url();
    let args = with_flag(openai_generate(&out, end, &url), "--openai_retries", "1");
    let run = spawn(&with_flag(args, "--openai_concurrency", "2"));
    run.wait_answers(20);
    server.kill();
    let (status, stderr) = run.finish();
    assert!(!status.success(), "the run must stop: {stderr}");
    let err = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        err.contains(&format!("the server {url}"))
            && err.contains("query")
            && err.contains("2 attempt(s)"),
        "{stderr}"
    );
    assert!(!out.exists());

    // Restarted (on another port: answers are keyed by the model, not the
    // URL), the rerun asks only what is not stored and writes the same
    // records as an uninterrupted run.
    let server = Server::start(&model, &dir.path().join("serve2.log"));
    ok(&leverflow(&openai_generate(&out, end, &server.url())));
    assert_eq!(without_meta(&reference), without_meta(&out));
    // What the server answered before it died came from the store: the
    // records of finished queries and the answers of unfinished ones.
    let counts = &read_json(&out)["_meta"]["counts"];
    let calls = counts["vqa_calls"].as_u64().unwrap();
    assert!(calls < 421, "the rerun asked every prompt again: {counts}");
    let reused =
        counts["vqa_cached"].as_u64().unwrap() + counts["queries_reused"].as_u64().unwrap();
    assert!(reused > 0, "{counts}");
}

#[test]
fn on_vqa_error_record_marks_the_candidates_of_a_dead_server() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let model = served_model(dir.path());
    let out = dir.path().join("openai/rl.json");
    let mut server = Server::start(&model, &dir.path().join("serve.log"));
    let args = openai_generate(&out, 48, &server.url());
    let args = with_flag(args, "--openai_retries", "0");
    let run = spawn(&with_flag(args, "--on_vqa_error", "record"));
    run.wait_answers(10);
    server.kill();
    let (status, stderr) = run.finish();
    assert!(status.success(), "{stderr}");
    let v = read_json(&out);
    let failed = v
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "_meta")
        .flat_map(|(_, r)| r["pointer_candidates"].as_array().unwrap().clone())
        .filter(|c| c["eval_failed"] == true)
        .count();
    assert!(failed > 0, "no candidate is marked eval_failed");
}
