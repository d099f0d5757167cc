//! The `openai` backend: prompts answered by an OpenAI-compatible server
//! (vLLM, SGLang, LMDeploy, TGI, `transformers serve`), one
//! `POST <base>/chat/completions` per prompt.
//!
//! * **Requests.** The messages are the contract's ([`VqaPrompt::messages`]):
//!   the system prompt, then one user turn alternating the examples' images
//!   (base64 data URIs of the files) and `Question:<q> Short answer:<a>`
//!   texts, ending with the query's image and question. `max_tokens` is
//!   `max_new_tokens` and `temperature` 0 (greedy); `repetition_penalty` and
//!   `min_tokens` are sent only when set. `vqa_num_beams > 1` is sent as
//!   vLLM's beam-search extension (`use_beam_search`, `n` beams, the best
//!   one taken) and `gt_prob` uses vLLM's `prompt_logprobs`; a server that is
//!   not vLLM (as `GET /models` reports it) is refused for either, never
//!   answered greedily in silence.
//! * **Concurrency.** A process keeps `openai_concurrency` requests in
//!   flight, from a pool of that many threads shared by its workers; the
//!   `vqa` stage submits prompts and goes on ([`RemoteVqa`]), so the
//!   dataflow's other stages keep running.
//! * **Failures.** Connection errors (an answer cut off mid-body among
//!   them), 429 and 5xx are retried
//!   `openai_retries` times with exponential backoff (0.5 s, 1 s, 2 s, ...,
//!   at most 30 s; a 429's `Retry-After` is honoured up to that); then the
//!   prompt fails with an error naming the server, the query and the last
//!   status (the run stops, or with `on_vqa_error = record` the candidate is
//!   `eval_failed`). Other statuses fail at once.
//! * **Identity.** Answers are keyed by the server's model id and the
//!   generation settings (not the URL: the same model moved to another host
//!   keeps its answers); `_meta.vqa_model` also records the base URL without
//!   credentials.
//! * **Credentials.** The API key comes from the environment variable
//!   `openai_api_key_env` (default `OPENAI_API_KEY`) and is only ever put in
//!   the `Authorization` header. Credentials in the URL
//!   (`http://user:pass@host/v1`) are sent as HTTP basic authentication
//!   and recorded as `***`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::{BackendContext, BackendError, LoadedBackend, VqaFactory};
use crate::config::{ConfigError, RunConfig};
use crate::models::contract::{
    ChatContent, Delivery, PromptResult, RemoteGauge, RemoteVqa, VqaAnswer, VqaError, VqaModel,
    VqaPrompt,
};

/// Longest wait between two tries of a request.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors of the `openai` backend.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    /// The server answered a request with an error status.
    #[error("the server {server} answered query {query} with HTTP status {status} after {attempts} attempt(s): {body}")]
    Status {
        /// The base URL (without credentials).
        server: String,
        /// The query whose prompt it was.
        query: u64,
        /// The last status.
        status: u16,
        /// How many times the request was sent.
        attempts: u32,
        /// The start of the response body.
        body: String,
    },
    /// The server could not be reached.
    #[error("the server {server} did not answer query {query} after {attempts} attempt(s): last error: {message}")]
    Connection {
        /// The base URL (without credentials).
        server: String,
        /// The query whose prompt it was.
        query: u64,
        /// How many times the request was sent.
        attempts: u32,
        /// The last transport error.
        message: String,
    },
    /// The server's `GET /models` failed or is not what the API says.
    #[error("the server {server}: {message}")]
    Server {
        /// The base URL (without credentials).
        server: String,
        /// What went wrong.
        message: String,
    },
    /// A response is not what the API says.
    #[error("the server {server} sent a malformed answer to query {query}: {message}")]
    Protocol {
        /// The base URL (without credentials).
        server: String,
        /// The query.
        query: u64,
        /// What is wrong.
        message: String,
    },
    /// An image of a prompt could not be read.
    #[error("{}: {message}", .path.display())]
    Image {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The answering threads stopped.
    #[error("the request threads of the openai backend stopped")]
    Stopped,
}

pub use crate::config::{redact_url, split_userinfo};

/// The `Authorization` header of a server: the API key from the environment
/// variable `key_env` (bearer), else the URL's userinfo, percent-decoded
/// (basic).
fn authorization(userinfo: Option<&str>, key_env: Option<&str>) -> Option<String> {
    let var = key_env.unwrap_or("OPENAI_API_KEY");
    if let Some(key) = std::env::var(var).ok().filter(|k| !k.is_empty()) {
        return Some(format!("Bearer {key}"));
    }
    let info = userinfo?;
    let (user, pass) = info.split_once(':').unwrap_or((info, ""));
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let pair = format!("{}:{}", decode(user), decode(pass));
    Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    ))
}

/// What a request generates with.
#[derive(Debug, Clone, PartialEq)]
struct Generation {
    max_tokens: usize,
    min_tokens: usize,
    num_beams: usize,
    length_penalty: f64,
    repetition_penalty: Option<f64>,
    gt_prob: bool,
}

impl Generation {
    fn of(cfg: &RunConfig) -> Self {
        Self {
            max_tokens: cfg.max_new_tokens,
            min_tokens: cfg.min_new_tokens,
            num_beams: cfg.vqa_num_beams.max(1),
            length_penalty: cfg.length_penalty,
            repetition_penalty: cfg.repetition_penalty,
            gt_prob: cfg.gt_prob,
        }
    }

    /// The settings as keyed and recorded.
    fn to_json(&self) -> Value {
        let mut v = json!({
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "num_beams": self.num_beams,
        });
        if let Some(m) = v.as_object_mut() {
            if self.num_beams > 1 {
                m.insert("length_penalty".into(), self.length_penalty.into());
            }
            if self.min_tokens > 0 {
                m.insert("min_tokens".into(), self.min_tokens.into());
            }
            if let Some(r) = self.repetition_penalty {
                m.insert("repetition_penalty".into(), r.into());
            }
            if self.gt_prob {
                m.insert("gt_prob".into(), "prompt_logprobs".into());
            }
        }
        v
    }
}

/// Timings and counts of a process's requests (the benchmark's and the
/// summary's).
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Retries sent.
    pub retries: AtomicU64,
    /// Requests that failed for good.
    pub failed: AtomicU64,
    /// Nanoseconds spent building request bodies (images read and encoded).
    pub build_ns: AtomicU64,
    /// Nanoseconds between sending a request and having its parsed answer.
    pub http_ns: AtomicU64,
    /// Nanoseconds spent parsing responses.
    pub parse_ns: AtomicU64,
}

/// A connection to one server and model.
struct Server {
    /// The base URL without credentials (no trailing `/`).
    base: String,
    authorization: Option<String>,
    agent: ureq::Agent,
    model: String,
    generation: Generation,
    retries: u32,
    max_image_bytes: u64,
    gauge: Arc<RemoteGauge>,
    stats: Arc<RequestStats>,
}

/// The settings the backend is built from, checked.
struct Settings {
    base: String,
    userinfo: Option<String>,
    timeout: Duration,
}

fn settings(cfg: &RunConfig) -> Result<Settings, ConfigError> {
    let url = cfg.openai_base_url.as_deref().ok_or_else(|| {
        ConfigError::new(
            "openai_base_url",
            "missing: the `openai` backend needs the server's base URL, e.g. http://127.0.0.1:8000/v1",
        )
    })?;
    let (bare, userinfo) = split_userinfo(url.trim());
    if !(bare.starts_with("http://") || bare.starts_with("https://")) {
        return Err(ConfigError::new(
            "openai_base_url",
            format!("{}: not an http:// or https:// URL", redact_url(url)),
        ));
    }
    Ok(Settings {
        base: bare.trim_end_matches('/').to_string(),
        userinfo,
        timeout: Duration::from_secs_f64(cfg.openai_timeout),
    })
}

impl Server {
    /// Connects: lists the served models and picks the one to ask.
    fn connect(cfg: &RunConfig) -> Result<(Self, Value), BackendError> {
        let s = settings(cfg)?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10).min(s.timeout))
            .timeout(s.timeout)
            .build();
        let authorization = authorization(s.userinfo.as_deref(), cfg.openai_api_key_env.as_deref());
        let fail = |message: String| {
            BackendError::OpenAi(OpenAiError::Server {
                server: s.base.clone(),
                message,
            })
        };
        let mut req = agent.get(&format!("{}/models", s.base));
        if let Some(a) = &authorization {
            req = req.set("Authorization", a);
        }
        let listed: Value = req
            .call()
            .map_err(|e| fail(format!("GET /models: {}", describe(&e))))
            .and_then(|resp| read_json_body(resp).map_err(|e| fail(format!("GET /models: {e}"))))?;
        let models: Vec<(String, String)> = listed["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        let id = m["id"].as_str()?.to_string();
                        Some((id, m["owned_by"].as_str().unwrap_or("").to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let names = || {
            models
                .iter()
                .map(|(m, _)| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (model, owned_by) = match (&cfg.openai_model, models.len()) {
            (Some(want), _) => match models.iter().find(|(m, _)| m == want) {
                Some(m) => m.clone(),
                None if models.is_empty() => (want.clone(), String::new()),
                None => {
                    return Err(fail(format!(
                        "serves no model `{want}` (`openai_model`); it serves: {}",
                        names()
                    )))
                }
            },
            (None, 1) => models[0].clone(),
            (None, 0) => return Err(fail("GET /models lists no model".into())),
            (None, _) => {
                return Err(fail(format!(
                    "serves several models; choose one with `openai_model`: {}",
                    names()
                )))
            }
        };
        let generation = Generation::of(cfg);
        let vllm = owned_by == "vllm";
        if generation.num_beams > 1 && !vllm {
            return Err(fail(format!(
                "`vqa_num_beams` {} needs beam search, which only vLLM's OpenAI server offers (its `use_beam_search` extension); this server's model `{model}` is owned by `{owned_by}`: pass `vqa_num_beams` 1 for greedy answers",
                generation.num_beams
            )));
        }
        if generation.gt_prob && !vllm {
            return Err(fail(format!(
                "`gt_prob` needs the prompt's log-probabilities, which only vLLM's OpenAI server offers (`prompt_logprobs`); this server's model `{model}` is owned by `{owned_by}`: drop `gt_prob`"
            )));
        }
        let record = json!({
            "backend": "openai",
            "base_url": s.base,
            "model": model,
            "owned_by": owned_by,
            "generation": generation.to_json(),
        });
        let server = Server {
            base: s.base,
            authorization,
            agent,
            model,
            generation,
            retries: cfg.openai_retries,
            max_image_bytes: cfg.max_image_mb.saturating_mul(1 << 20),
            gauge: Arc::default(),
            stats: Arc::default(),
        };
        Ok((server, record))
    }

    /// The identity answers are keyed by: the model id and the settings.
    fn identity(&self) -> Value {
        json!({
            "backend": "openai",
            "model": self.model,
            "generation": self.generation.to_json(),
        })
    }

    /// The request body of `prompt` (`assistant`: a final assistant message
    /// to score instead of a generation prompt).
    fn body(&self, prompt: &VqaPrompt, assistant: Option<&str>) -> Result<Value, OpenAiError> {
        let images = prompt.images();
        let mut messages = Vec::new();
        for m in prompt.messages() {
            let mut content = Vec::with_capacity(m.content.len());
            for c in &m.content {
                content.push(match c {
                    ChatContent::Text(t) => json!({"type": "text", "text": t}),
                    ChatContent::Image(i) => {
                        let path = images.get(*i).ok_or_else(|| OpenAiError::Image {
                            path: prompt.query_image.clone(),
                            message: format!("the prompt has no image {i}"),
                        })?;
                        json!({"type": "image_url", "image_url": {"url": self.data_uri(path)?}})
                    }
                });
            }
            messages.push(json!({"role": m.role.as_str(), "content": content}));
        }
        let g = &self.generation;
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": g.max_tokens,
            "temperature": 0.0,
        });
        let Some(m) = body.as_object_mut() else {
            return Ok(body);
        };
        if let Some(answer) = assistant {
            if let Some(list) = m.get_mut("messages").and_then(Value::as_array_mut) {
                list.push(json!({"role": "assistant", "content": answer}));
            }
            m.insert("add_generation_prompt".into(), false.into());
            m.insert("continue_final_message".into(), true.into());
            m.insert("prompt_logprobs".into(), 0.into());
            m.insert("max_tokens".into(), 1.into());
            return Ok(body);
        }
        if g.num_beams > 1 {
            m.insert("use_beam_search".into(), true.into());
            m.insert("n".into(), g.num_beams.into());
            m.insert("length_penalty".into(), g.length_penalty.into());
        }
        if g.min_tokens > 0 {
            m.insert("min_tokens".into(), g.min_tokens.into());
        }
        if let Some(r) = g.repetition_penalty {
            m.insert("repetition_penalty".into(), r.into());
        }
        Ok(body)
    }

    /// An image file as a `data:` URI (its bytes, base64).
    fn data_uri(&self, path: &Path) -> Result<String, OpenAiError> {
        let fail = |message: String| OpenAiError::Image {
            path: path.to_path_buf(),
            message,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| fail(e.to_string()))?
            .len();
        if size > self.max_image_bytes {
            return Err(fail(format!(
                "{size} bytes, over the limit of `max_image_mb`"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let mime = match bytes.get(..4) {
            Some([0x89, b'P', b'N', b'G']) => "image/png",
            Some([0xff, 0xd8, ..]) => "image/jpeg",
            Some([b'G', b'I', b'F', _]) => "image/gif",
            Some([b'R', b'I', b'F', b'F']) => "image/webp",
            _ => "application/octet-stream",
        };
        let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Ok(format!("data:{mime};base64,{data}"))
    }

    /// Sends `body` to `/chat/completions`, retrying connection errors, 429
    /// and 5xx with exponential backoff.
    fn post(&self, query: u64, body: &Value) -> Result<Value, OpenAiError> {
        let url = format!("{}/chat/completions", self.base);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let mut req = self.agent.post(&url);
            if let Some(a) = &self.authorization {
                req = req.set("Authorization", a);
            }
            let (retry, wait, last) = match req.send_json(body) {
                Ok(resp) => match read_json_body(resp) {
                    Ok(answer) => return Ok(answer),
                    // The server went away while sending its answer: a
                    // failure of the connection, retried like one.
                    Err(BodyError::CutOff(e)) => {
                        let err = OpenAiError::Connection {
                            server: self.base.clone(),
                            query,
                            attempts,
                            message: format!("the answer was cut off: {e}"),
                        };
                        (true, None, err)
                    }
                    Err(e) => {
                        return Err(OpenAiError::Protocol {
                            server: self.base.clone(),
                            query,
                            message: e.to_string(),
                        })
                    }
                },
                Err(ureq::Error::Status(status, resp)) => {
                    let retry_after = resp
                        .header("Retry-After")
                        .and_then(|s| s.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64);
                    let text = resp.into_string().unwrap_or_default();
                    let body: String = text.chars().take(300).collect();
                    let err = OpenAiError::Status {
                        server: self.base.clone(),
                        query,
                        status,
                        attempts,
                        body,
                    };
                    (status == 429 || status >= 500, retry_after, err)
                }
                Err(e) => {
                    let err = OpenAiError::Connection {
                        server: self.base.clone(),
                        query,
                        attempts,
                        message: describe(&e),
                    };
                    (true, None, err)
                }
            };
            if !retry || attempts > self.retries {
                return Err(last);
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let backoff = Duration::from_millis(500)
                .saturating_mul(1 << (attempts - 1).min(16))
                .min(MAX_BACKOFF);
            std::thread::sleep(wait.map_or(backoff, |w| w.min(MAX_BACKOFF)));
        }
    }

    /// Answers one prompt.
    fn answer(&self, prompt: &VqaPrompt) -> Result<VqaAnswer, OpenAiError> {
        let q = prompt.query_index;
        let started = Instant::now();
        let body = self.body(prompt, None)?;
        let sent = Instant::now();
        self.stats
            .build_ns
            .fetch_add(nanos(sent - started), Ordering::Relaxed);
        let resp = self.post(q, &body)?;
        let got = Instant::now();
        let content = resp["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| OpenAiError::Protocol {
                server: self.base.clone(),
                query: q,
                message: "no choices[0].message.content".into(),
            })?
            .to_string();
        let gt_prob = if self.generation.gt_prob && !prompt.gt_answers.is_empty() {
            Some(self.gt_prob(prompt, &resp)?)
        } else {
            None
        };
        let done = Instant::now();
        self.stats
            .parse_ns
            .fetch_add(nanos(done - got), Ordering::Relaxed);
        self.stats
            .http_ns
            .fetch_add(nanos(got - sent), Ordering::Relaxed);
        Ok(VqaAnswer {
            raw_generation: content,
            gt_prob,
            prompt_text: None,
        })
    }

    /// `vqa_gt_prob` from vLLM's prompt log-probabilities: for each
    /// ground-truth answer, the conversation is sent with the answer as the
    /// assistant's (continued) message, and the answer's probability is
    /// `exp(mean log p)` over the tokens past the generation prompt (the
    /// original's `get_cond_prob` reduction); weighted by min(count/3, 1).
    fn gt_prob(&self, prompt: &VqaPrompt, generated: &Value) -> Result<f64, OpenAiError> {
        let q = prompt.query_index;
        let malformed = |message: &str| OpenAiError::Protocol {
            server: self.base.clone(),
            query: q,
            message: message.to_string(),
        };
        let base = generated["usage"]["prompt_tokens"]
            .as_u64()
            .ok_or_else(|| malformed("no usage.prompt_tokens"))? as usize;
        let mut total = 0.0;
        for (answer, weight) in &prompt.gt_answers {
            let resp = self.post(q, &self.body(prompt, Some(answer))?)?;
            let lps = resp["prompt_logprobs"]
                .as_array()
                .ok_or_else(|| malformed("no prompt_logprobs (is this vLLM?)"))?;
            let mut sum = 0.0;
            let mut n = 0usize;
            for entry in lps.iter().skip(base) {
                // Each entry maps the prompt's token id to its log-probability
                // (with the top alternatives); the prompt's own token has rank
                // order 0 when asked for 0 alternatives.
                let lp = entry
                    .as_object()
                    .and_then(|m| m.values().next())
                    .and_then(|v| v["logprob"].as_f64())
                    .ok_or_else(|| malformed("a prompt_logprobs entry has no logprob"))?;
                sum += lp;
                n += 1;
            }
            if n > 0 {
                total += (sum / n as f64).exp() * weight;
            }
        }
        Ok(total)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The most bytes of a response body read: a broken or hostile server
/// cannot grow a worker's memory past it (an answer of a few tokens, even
/// with vLLM's prompt log-probabilities, is far smaller).
const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// Why a response body could not be read as JSON.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// The connection failed before the whole body arrived.
    #[error("the body was cut off: {0}")]
    CutOff(std::io::Error),
    /// The body is larger than [`MAX_RESPONSE_BYTES`].
    #[error("the body is over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// The whole body arrived and is not JSON.
    #[error("not JSON: {0}")]
    NotJson(serde_json::Error),
}

/// Reads a response's whole body (at most [`MAX_RESPONSE_BYTES`]), then
/// parses it: read first so that a body cut off mid-way (a transport
/// failure, worth a retry) is told apart from one that is not JSON.
fn read_json_body(resp: ureq::Response) -> Result<Value, BodyError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    resp.into_reader()
        .take(MAX_RESPONSE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(BodyError::CutOff)?;
    if bytes.len() as u64 > MAX_RESPONSE_BYTES {
        return Err(BodyError::TooLarge);
    }
    serde_json::from_slice(&bytes).map_err(BodyError::NotJson)
}

/// A transport error in words (ureq's own text names the URL and cause).
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP status {code}"),
        ureq::Error::Transport(t) => {
            let mut s = t.kind().to_string();
            if let Some(m) = t.message() {
                s.push_str(": ");
                s.push_str(m);
            }
            if let Some(src) = std::error::Error::source(t) {
                s.push_str(&format!(" ({src})"));
            }
            s
        }
    }
}

/// One prompt of a submitted batch.
struct Job {
    prompt: VqaPrompt,
    slot: usize,
    batch: Arc<BatchState>,
}

/// A submitted batch: its answers so far and whom to deliver them to.
struct BatchState {
    results: Mutex<Vec<Option<PromptResult>>>,
    remaining: AtomicU64,
    done: Mutex<Option<Delivery>>,
}

impl BatchState {
    /// Records a prompt's result; the last one delivers the batch.
    fn finish(&self, slot: usize, result: PromptResult) {
        if let Ok(mut r) = self.results.lock() {
            if let Some(s) = r.get_mut(slot) {
                *s = Some(result);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let results: Vec<PromptResult> = match self.results.lock() {
                Ok(mut r) => r
                    .drain(..)
                    .map(|x| x.unwrap_or_else(|| Err(VqaError::backend(OpenAiError::Stopped))))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let done = self.done.lock().ok().and_then(|mut d| d.take());
            if let Some(done) = done {
                done(results);
            }
        }
    }
}

/// The process's request threads (`openai_concurrency` of them).
struct Pool {
    jobs: Mutex<Sender<Job>>,
    server: Arc<Server>,
}

impl Pool {
    fn start(server: Arc<Server>, threads: usize) -> Arc<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let server = Arc::clone(&server);
            let spawned = std::thread::Builder::new()
                .name(format!("openai-{i}"))
                .spawn(move || work(&server, &rx));
            if let Err(e) = spawned {
                tracing::warn!("could not start request thread {i}: {e}");
            }
        }
        Arc::new(Pool {
            jobs: Mutex::new(tx),
            server,
        })
    }
}

/// A request thread: answers jobs until the pool is dropped.
fn work(server: &Server, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        server.gauge.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = server.answer(&job.prompt);
        server.gauge.in_flight.fetch_sub(1, Ordering::Relaxed);
        match &result {
            Ok(_) => {
                server.gauge.answered.fetch_add(1, Ordering::Relaxed);
                server.stats.requests.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                server.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        job.batch
            .finish(job.slot, result.map_err(VqaError::backend));
    }
}

/// A worker's handle on the process's pool.
pub struct OpenAiVqa {
    pool: Arc<Pool>,
    /// Whether this instance reports the process's counters (one does).
    reports: bool,
}

impl RemoteVqa for OpenAiVqa {
    fn submit(&mut self, prompts: Vec<VqaPrompt>, done: Delivery) {
        if prompts.is_empty() {
            done(Vec::new());
            return;
        }
        let batch = Arc::new(BatchState {
            results: Mutex::new((0..prompts.len()).map(|_| None).collect()),
            remaining: AtomicU64::new(prompts.len() as u64),
            done: Mutex::new(Some(done)),
        });
        let jobs = self.pool.jobs.lock();
        for (slot, prompt) in prompts.into_iter().enumerate() {
            let job = Job {
                prompt,
                slot,
                batch: Arc::clone(&batch),
            };
            let sent = match &jobs {
                Ok(tx) => tx.send(job).map_err(|e| e.0),
                Err(_) => Err(job),
            };
            if let Err(job) = sent {
                job.batch
                    .finish(job.slot, Err(VqaError::backend(OpenAiError::Stopped)));
            }
        }
    }

    fn gauge(&self) -> Arc<RemoteGauge> {
        Arc::clone(&self.pool.server.gauge)
    }
}

impl VqaModel for OpenAiVqa {
    fn identity(&self) -> Value {
        self.pool.server.identity()
    }

    fn answer(&mut self, prompts: &[VqaPrompt]) -> Result<Vec<VqaAnswer>, VqaError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(
            prompts.to_vec(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let results = rx
            .recv()
            .map_err(|_| VqaError::backend(OpenAiError::Stopped))?;
        results.into_iter().collect()
    }

    fn stats(&self) -> Value {
        if !self.reports {
            return Value::Null;
        }
        let s = &self.pool.server.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let secs = |a: &AtomicU64| get(a) as f64 / 1e9;
        json!({
            "openai_requests": get(&s.requests),
            "openai_retries": get(&s.retries),
            "openai_failed": get(&s.failed),
            "openai_build_s": secs(&s.build_ns),
            "openai_http_s": secs(&s.http_ns),
            "openai_parse_s": secs(&s.parse_ns),
        })
    }

    fn remote(&mut self) -> Option<&mut dyn RemoteVqa> {
        Some(self)
    }
}

/// Loads the backend of a run (see [`super::load`]): connects to the
/// server and starts the process's request threads.
pub fn load(ctx: &BackendContext<'_>) -> Result<LoadedBackend, BackendError> {
    let cfg = ctx.config;
    let (server, recorded) = Server::connect(cfg)?;
    let identity = server.identity();
    let pool = Pool::start(Arc::new(server), cfg.openai_concurrency);
    let factory: VqaFactory = Arc::new(move |worker: usize| {
        Ok(Box::new(OpenAiVqa {
            pool: Arc::clone(&pool),
            reports: worker == 0,
        }) as Box<dyn VqaModel>)
    });
    Ok(LoadedBackend {
        factory,
        identity,
        recorded: Some(recorded),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_redacted_and_split_off() {
        assert_eq!(
            redact_url("http://user:p%40ss@host:8000/v1"),
            "http://***@host:8000/v1"
        );
        assert_eq!(redact_url("http://host/v1"), "http://host/v1");
        // An `@` after the authority is not userinfo.
        assert_eq!(redact_url("http://host/v1?a=b@c"), "http://host/v1?a=b@c");
        let (bare, info) = split_userinfo("https://u:p@h/v1");
        assert_eq!(bare, "https://h/v1");
        assert_eq!(info.as_deref(), Some("u:p"));
        let auth = authorization(Some("us%20er:p%40ss"), Some("LEVERFLOW_TEST_NO_SUCH_VAR"));
        let expected = base64::engine::general_purpose::STANDARD.encode("us er:p@ss");
        assert_eq!(auth, Some(format!("Basic {expected}")));
        assert_eq!(
            authorization(None, Some("LEVERFLOW_TEST_NO_SUCH_VAR")),
            None
        );
    }

    #[test]
    fn recorded_settings_hide_url_credentials() {
        let cfg = RunConfig {
            openai_base_url: Some("http://me:hunter2x@127.0.0.1:1/v1".into()),
            ..Default::default()
        };
        let args = serde_json::to_string(&cfg.recorded()).unwrap();
        assert!(
            !args.contains("hunter2x") && !args.contains("me:"),
            "{args}"
        );
        assert!(args.contains("http://***@127.0.0.1:1/v1"), "{args}");
    }

    #[test]
    fn a_missing_or_bad_base_url_names_the_setting() {
        let e = settings(&RunConfig::default()).err().unwrap();
        assert_eq!(e.setting, "openai_base_url");
        let cfg = RunConfig {
            openai_base_url: Some("ftp://u:pw@h/v1".into()),
            ..Default::default()
        };
        let e = settings(&cfg).err().unwrap().to_string();
        assert!(e.contains("ftp://***@h/v1") && !e.contains("pw"), "{e}");
    }

    /// A test double of a server on 127.0.0.1: it answers the `i`th
    /// connection's request with the raw HTTP response `replies[i]`, then
    /// closes that connection.
    fn scripted_server(replies: Vec<String>) -> (String, std::thread::JoinHandle<()>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            for reply in replies {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                // The request: headers, then Content-Length bytes of body.
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                let mut stream = reader.into_inner();
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        (base, handle)
    }

    /// A [`Server`] for `base` that retries `retries` times.
    fn client(base: &str, retries: u32) -> Server {
        Server {
            base: base.to_string(),
            authorization: None,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            model: "m".into(),
            generation: Generation::of(&RunConfig::default()),
            retries,
            max_image_bytes: 1 << 20,
            gauge: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// A 200 response whose header promises `length` bytes of `body`.
    fn ok_response(body: &str, length: usize) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{body}"
        )
    }

    #[test]
    fn an_answer_cut_off_mid_body_is_retried_as_a_connection_failure() {
        let whole = r#"{"choices":[{"message":{"content":"red"}}]}"#;
        let (base, server) = scripted_server(vec![
            ok_response(&whole[..10], whole.len()),
            ok_response(whole, whole.len()),
        ]);
        let answer = client(&base, 1).post(7, &json!({})).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "red");
        server.join().unwrap();

        // Without a retry left, the error is the connection's, naming the
        // server and the query.
        let (base, server) = scripted_server(vec![ok_response(&whole[..10], whole.len())]);
        let e = client(&base, 0).post(7, &json!({})).unwrap_err();
        assert!(matches!(e, OpenAiError::Connection { query: 7, .. }), "{e}");
        assert!(e.to_string().contains("cut off"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn a_whole_answer_that_is_not_json_fails_at_once() {
        let (base, server) = scripted_server(vec![ok_response("<html>", 6)]);
        let e = client(&base, 3).post(2, &json!({})).unwrap_err();
        assert!(matches!(e, OpenAiError::Protocol { query: 2, .. }), "{e}");
        assert!(e.to_string().contains("not JSON"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn generation_settings_are_keyed_only_when_they_change_the_request() {
        let g = Generation::of(&RunConfig {
            vqa_num_beams: 1,
            ..Default::default()
        });
        assert_eq!(
            g.to_json(),
            json!({"max_tokens": 5, "temperature": 0.0, "num_beams": 1})
        );
        let g = Generation::of(&RunConfig {
            repetition_penalty: Some(1.1),
            ..Default::default()
        });
        assert_eq!(g.to_json()["length_penalty"], 0.0);
        assert_eq!(g.to_json()["repetition_penalty"], 1.1);
    }
}
