//! [`RunConfig`]: every setting of a `generate` or `candidates` run, as plain
//! typed data (serde, no command-line parsing).
//!
//! Field names are the command-line flag names of the original tool (and of
//! `leverflow generate`), in the order `--help` lists them; the serialised
//! config is `_meta.args` of every output and what `--print_config` prints,
//! so renaming or reordering a field changes the output format. The
//! binary's flags parse into this struct; a library user fills it directly
//! ([`RunConfig::default`] holds the command line's defaults).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::models::contract::GtProbMode;
pub use crate::outputs::OutputFormat;
pub use crate::reward::{CorrectnessMode, RewardMode};

/// The default `--image_pattern` (COCO training images).
pub const DEFAULT_IMAGE_PATTERN: &str = "COCO_train2014_{image_id:012d}.jpg";

/// Every setting of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The YAML file the settings were read from (recorded, not read here).
    pub config: Option<PathBuf>,
    /// Print the effective configuration instead of running (the binary's).
    pub print_config: bool,
    /// The embedded demo supplied the inputs that were not given.
    pub demo: bool,

    // ---- inputs ----
    /// SFT pointer-selector checkpoint (Lightning .ckpt, state-dict .pt, or .safetensors).
    pub sft_ckpt: Option<PathBuf>,
    /// Beam data (JSON object keyed by query index, or JSON Lines): decides which queries run.
    pub beam_data: Option<PathBuf>,
    /// Output JSON path (the original format).
    pub output_path: Option<PathBuf>,
    /// Query embeddings [N, d]; row i = dataset index i.
    pub query_emb: Option<PathBuf>,
    /// Candidate embeddings [K, d]; row j = candidate position j.
    pub cand_emb: Option<PathBuf>,
    /// The dataset index of each candidate-embedding row (default: row = index).
    pub candidate_indices: Option<PathBuf>,
    /// Per-query candidate pools `{"<query_idx>": [ids]}`.
    pub sampler_cache: Option<PathBuf>,
    /// VQA model: a checkpoint directory, a Hugging Face repository id, or
    /// the original's model name (see `crate::models::hub`).
    pub vqa_model: String,
    /// Revision of a repository `vqa_model` (branch, tag or commit; default `main`).
    pub revision: Option<String>,
    /// Never download a model: a repository must be in the Hugging Face cache.
    pub offline: bool,
    /// Dataset kind: okvqa_local or vqav2_local.
    pub dataset: String,
    /// Training questions (official VQA format).
    pub train_ques_path: Option<PathBuf>,
    /// Training annotations (official VQA format, or merged vqav2 style).
    pub train_ann_path: Option<PathBuf>,
    /// Validation questions (accuracy fallback split).
    pub val_ques_path: Option<PathBuf>,
    /// Validation annotations.
    pub val_ann_path: Option<PathBuf>,
    /// Merged training file (vqav2 style: annotations holding `question`).
    pub train_path: Option<PathBuf>,
    /// Merged validation file.
    pub val_path: Option<PathBuf>,
    /// Training image directory.
    pub train_coco_root: Option<PathBuf>,
    /// Validation image directory.
    pub val_coco_root: Option<PathBuf>,
    /// Image file name pattern ({image_id}, {image_id:012d}, {question_id}).
    pub image_pattern: String,

    // ---- candidates ----
    /// Beams per query.
    pub num_beams: usize,
    /// Sampling temperatures.
    pub temps: Vec<f64>,
    /// Samples per temperature.
    pub num_samples_per_temp: usize,
    /// Uniformly random sequences.
    pub num_random: usize,
    /// Similarity-retrieval sequences.
    pub num_retrieval: usize,
    /// Examples per prompt (default: 2).
    pub shot_num: Option<usize>,
    /// Attention heads of the pointer selector (not recoverable from the weights).
    pub num_heads: usize,
    /// Also add the beam data's own beams as candidates.
    pub include_source_beams: bool,
    /// Seed: the RNG of a query is seeded from (seed, query index) only.
    pub seed: u64,

    // ---- VQA ----
    /// Which backend answers the prompts.
    pub vqa_backend: VqaBackend,
    /// Earlier output (JSON or Parquet) whose raw generations `replay` answers with.
    pub replay_from: Option<PathBuf>,
    /// Base URL of the OpenAI-compatible server of the `openai` backend
    /// (e.g. `http://127.0.0.1:8000/v1`).
    pub openai_base_url: Option<String>,
    /// The served model to ask (default: the only one `GET /models` lists).
    pub openai_model: Option<String>,
    /// The environment variable holding the API key (default
    /// `OPENAI_API_KEY` when set); the key itself is never recorded.
    pub openai_api_key_env: Option<String>,
    /// Requests in flight at once per process.
    pub openai_concurrency: usize,
    /// Seconds to wait for one response.
    pub openai_timeout: f64,
    /// Retries of a request after a connection error, 429 or 5xx
    /// (exponential backoff from 0.5 s).
    pub openai_retries: u32,
    /// Device of every worker: cpu, cuda:N, wgpu or wgpu:N.
    pub device: String,
    /// Prompts per VQA batch.
    pub batch_size: usize,
    /// Maximum new tokens.
    pub max_new_tokens: usize,
    /// Beams of the VQA generation.
    pub vqa_num_beams: usize,
    /// Length penalty of the VQA beam search.
    pub length_penalty: f64,
    /// Minimum new tokens.
    pub min_new_tokens: usize,
    /// Repetition penalty (default: the checkpoint's generation config).
    pub repetition_penalty: Option<f64>,
    /// Compute vqa_gt_prob.
    pub gt_prob: bool,
    /// How `vqa_gt_prob` scores an answer (`answer`, the default, or the
    /// original project's `original`); recorded only when not the default.
    #[serde(default, skip_serializing_if = "GtProbMode::is_answer")]
    pub gt_prob_mode: GtProbMode,
    /// Vision-embedding cache size in MB.
    pub vision_cache_mb: usize,
    /// What to do when an image is missing.
    pub on_missing_image: MissingImagePolicy,
    /// System prompt (default: the original's).
    pub system_prompt: Option<String>,

    // ---- accuracy ----
    /// Strict evaluation (the default): only the official metric.
    pub strict_eval: bool,
    /// Allow the fallback match when no annotations match.
    pub no_strict_eval: bool,
    /// Save the rendered prompt of every candidate.
    pub save_prompts: bool,

    // ---- rewards ----
    /// How scores combine into a reward.
    pub reward_mode: RewardMode,
    /// Weight of the hard (0/1) correctness.
    pub hard_weight: f64,
    /// Weight of the soft score.
    pub soft_weight: f64,
    /// Weight of the relevance score (default: the original's 0.1).
    pub rel_weight: Option<f64>,
    /// Legacy mode: weight of the policy quality term.
    pub reward_alpha: f64,
    /// Legacy mode: weight of the correctness term.
    pub reward_beta: f64,
    /// Legacy mode: correctness as 01 or pm1.
    pub correctness_mode: CorrectnessMode,
    /// Legacy mode: use -logprob_score as the quality term.
    pub use_logprob: bool,

    // ---- run ----
    /// First query (position in the beam data's key order).
    pub start_idx: usize,
    /// End query position (exclusive; -1 = all).
    pub end_idx: i64,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// Processes of a multi-process run.
    pub processes: usize,
    /// This process, 0..processes.
    pub process_index: usize,
    /// One host:port per line, in process order.
    pub hostfile: Option<PathBuf>,
    /// Devices of this process's workers, round robin (comma separated).
    pub devices: Option<String>,
    /// Seconds to wait for the other processes of a multi-process run.
    pub connect_timeout: u64,
    /// Output formats.
    pub format: Formats,
    /// Parquet output path (default: the output path with `.parquet`).
    pub parquet_path: Option<PathBuf>,
    /// Persistent store of finished work (default: `<output_path>.state/`).
    pub state_dir: Option<PathBuf>,
    /// `full` rewrites the outputs; `delta` also writes the changed rows.
    pub output_mode: OutputMode,
    /// Queries per output segment.
    pub segment_queries: u64,
    /// No progress output.
    pub quiet: bool,
    /// Progress style.
    pub progress: ProgressMode,
    /// What to do when the VQA backend fails on a prompt.
    pub on_vqa_error: VqaErrorPolicy,
    /// Largest width and height of an image, in pixels (larger images are
    /// refused with an error naming them).
    pub max_image_side: u32,
    /// Largest decoder allocation for one image, in MiB.
    pub max_image_mb: u64,
    /// The file holding the shared secret that authenticates the processes
    /// of a multi-process run (default: the `LEVERFLOW_CLUSTER_SECRET`
    /// environment variable).
    pub cluster_secret_file: Option<PathBuf>,
}

impl Default for RunConfig {
    /// The command line's defaults (the original tool's where it has one).
    fn default() -> Self {
        Self {
            config: None,
            print_config: false,
            demo: false,
            sft_ckpt: None,
            beam_data: None,
            output_path: None,
            query_emb: None,
            cand_emb: None,
            candidate_indices: None,
            sampler_cache: None,
            vqa_model: "qwen2.5_vl_3B".into(),
            revision: None,
            offline: false,
            dataset: "okvqa_local".into(),
            train_ques_path: None,
            train_ann_path: None,
            val_ques_path: None,
            val_ann_path: None,
            train_path: None,
            val_path: None,
            train_coco_root: None,
            val_coco_root: None,
            image_pattern: DEFAULT_IMAGE_PATTERN.into(),
            num_beams: 5,
            temps: vec![1.0, 1.3],
            num_samples_per_temp: 2,
            num_random: 1,
            num_retrieval: 0,
            shot_num: None,
            num_heads: 1,
            include_source_beams: false,
            seed: 0,
            vqa_backend: VqaBackend::Qwen2_5Vl,
            replay_from: None,
            openai_base_url: None,
            openai_model: None,
            openai_api_key_env: None,
            openai_concurrency: 16,
            openai_timeout: 600.0,
            openai_retries: 5,
            device: "cpu".into(),
            batch_size: 8,
            max_new_tokens: 5,
            vqa_num_beams: 3,
            length_penalty: 0.0,
            min_new_tokens: 0,
            repetition_penalty: None,
            gt_prob: false,
            gt_prob_mode: GtProbMode::Answer,
            vision_cache_mb: 512,
            on_missing_image: MissingImagePolicy::Error,
            system_prompt: None,
            strict_eval: false,
            no_strict_eval: false,
            save_prompts: false,
            reward_mode: RewardMode::HardPlusSoft,
            hard_weight: 1.0,
            soft_weight: 1.0,
            rel_weight: None,
            reward_alpha: 0.0,
            reward_beta: 0.0,
            correctness_mode: CorrectnessMode::ZeroOne,
            use_logprob: false,
            start_idx: 0,
            end_idx: -1,
            workers: 1,
            processes: 1,
            process_index: 0,
            hostfile: None,
            devices: None,
            connect_timeout: 60,
            format: Formats::default(),
            parquet_path: None,
            state_dir: None,
            output_mode: OutputMode::Full,
            segment_queries: crate::outputs::DEFAULT_SEGMENT_QUERIES,
            quiet: false,
            progress: ProgressMode::Bar,
            on_vqa_error: VqaErrorPolicy::Error,
            max_image_side: crate::image_decode::ImageLimits::DEFAULT_MAX_SIDE,
            max_image_mb: crate::image_decode::ImageLimits::DEFAULT_MAX_ALLOC_BYTES >> 20,
            cluster_secret_file: None,
        }
    }
}

/// Errors of a configuration, naming the setting (by its field name: the
/// binary shows it as the flag `--<setting>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The setting's name.
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about `setting`.
    pub fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }
}

impl RunConfig {
    /// Checks the settings that need no file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = self.temps.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
            return Err(ConfigError::new(
                "temps",
                format!("every temperature must be > 0, got {t}"),
            ));
        }
        if self.workers == 0 {
            return Err(ConfigError::new("workers", "must be at least 1"));
        }
        if self.shot_num == Some(0) {
            return Err(ConfigError::new("shot_num", "must be at least 1"));
        }
        if self.segment_queries == 0 {
            return Err(ConfigError::new("segment_queries", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::new("batch_size", "must be at least 1"));
        }
        if self.openai_concurrency == 0 {
            return Err(ConfigError::new("openai_concurrency", "must be at least 1"));
        }
        if !(self.openai_timeout.is_finite() && self.openai_timeout > 0.0) {
            return Err(ConfigError::new("openai_timeout", "must be > 0 seconds"));
        }
        if self.gt_prob_mode == GtProbMode::Original && self.vqa_backend == VqaBackend::Openai {
            return Err(ConfigError::new(
                "gt_prob_mode",
                "`original` runs the prompt with each answer through the model in one forward, \
                 which only the qwen2_5_vl backend does; use `answer` with the openai backend",
            ));
        }
        if self.max_image_side == 0 || self.max_image_mb == 0 {
            return Err(ConfigError::new(
                "max_image_side",
                "image limits must be at least 1 (pixel, MiB)",
            ));
        }
        Ok(())
    }

    /// The settings as recorded in `_meta.args` and printed: credentials in
    /// `openai_base_url` (`http://user:pass@host/v1`) become `***`.
    pub fn recorded(&self) -> RunConfig {
        let mut c = self.clone();
        if let Some(url) = &c.openai_base_url {
            c.openai_base_url = Some(redact_url(url));
        }
        c
    }

    /// Whether accuracy is the official metric only (no fallback match).
    pub fn strict(&self) -> bool {
        !self.no_strict_eval
    }

    /// The system prompt of every VQA prompt.
    pub fn system_prompt(&self) -> &str {
        self.system_prompt
            .as_deref()
            .unwrap_or(crate::models::contract::DEFAULT_SYSTEM_PROMPT)
    }

    /// The reward settings.
    pub fn reward(&self) -> crate::reward::RewardConfig {
        let mut cfg = crate::reward::RewardConfig {
            mode: self.reward_mode,
            hard_weight: self.hard_weight,
            soft_weight: self.soft_weight,
            alpha: self.reward_alpha,
            beta: self.reward_beta,
            correctness_mode: self.correctness_mode,
            use_logprob: self.use_logprob,
            ..Default::default()
        };
        if let Some(w) = self.rel_weight {
            cfg.rel_weight = w;
        }
        cfg
    }

    /// The candidate generation settings.
    pub fn candidate_args(&self) -> crate::candidates::CandidateArgs {
        crate::candidates::CandidateArgs {
            num_beams: self.num_beams,
            temps: self.temps.clone(),
            num_samples_per_temp: self.num_samples_per_temp,
            num_random: self.num_random,
            num_retrieval: self.num_retrieval,
            shot_num: self.shot_num.unwrap_or(2),
            seed: self.seed,
        }
    }

    /// The limits every image is decoded under.
    pub fn image_limits(&self) -> crate::image_decode::ImageLimits {
        crate::image_decode::ImageLimits {
            max_side: self.max_image_side,
            max_alloc_bytes: self.max_image_mb.saturating_mul(1 << 20),
        }
    }

    /// The device of each worker: `devices` (comma separated, round robin),
    /// else `device` for all.
    pub fn device_list(&self) -> Vec<String> {
        match &self.devices {
            Some(spec) => spec.split(',').map(|s| s.trim().to_string()).collect(),
            None => vec![self.device.clone()],
        }
    }
}

/// Which backend answers the VQA prompts (see `crate::backends`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum VqaBackend {
    /// Qwen2.5-VL in burn (a checkpoint directory).
    #[serde(rename = "qwen2_5_vl", alias = "qwen2.5_vl")]
    #[cfg_attr(feature = "clap", value(name = "qwen2_5_vl", alias = "qwen2.5_vl"))]
    Qwen2_5Vl,
    /// The raw generations of an earlier output (no model).
    #[serde(rename = "replay")]
    #[cfg_attr(feature = "clap", value(name = "replay"))]
    Replay,
    /// An OpenAI-compatible server (vLLM, SGLang, transformers serve, ...).
    #[serde(rename = "openai")]
    #[cfg_attr(feature = "clap", value(name = "openai"))]
    Openai,
}

/// What to do when a prompt's image file is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum MissingImagePolicy {
    /// Stop the run with an error naming the image.
    Error,
    /// Skip the query and list it in `_meta.skipped_queries`.
    Skip,
}

/// What to do when the VQA backend fails on a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum VqaErrorPolicy {
    /// Stop the run with the backend's error.
    Error,
    /// Record the candidate with `eval_failed = true` (no answer, accuracy
    /// 0) and go on; the answer is not stored, so a rerun asks again.
    Record,
}

/// Which outputs a run writes besides the full JSON and Parquet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum OutputMode {
    /// The JSON and Parquet outputs.
    Full,
    /// Also the delta Parquet of added and changed queries and the list of
    /// retracted ones.
    Delta,
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ProgressMode {
    /// A progress bar.
    Bar,
    /// One JSON object per line.
    Json,
    /// Nothing.
    None,
}

/// The output formats of a run, as given (serialised as the comma-separated
/// list the flag takes, e.g. `json,parquet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formats(pub Vec<OutputFormat>);

impl Default for Formats {
    fn default() -> Self {
        Formats(vec![OutputFormat::Json, OutputFormat::Parquet])
    }
}

impl Formats {
    /// Whether `f` is written.
    pub fn contains(&self, f: OutputFormat) -> bool {
        self.0.contains(&f)
    }

    /// The distinct formats, JSON first.
    pub fn distinct(&self) -> Vec<OutputFormat> {
        let mut v = self.0.clone();
        v.sort();
        v.dedup();
        v
    }
}

impl std::fmt::Display for Formats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|x| x.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

impl std::str::FromStr for Formats {
    type Err = String;

    /// `json`, `parquet` or both, comma separated (case and spaces ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.to_ascii_lowercase().as_str() {
                "json" => out.push(OutputFormat::Json),
                "parquet" => out.push(OutputFormat::Parquet),
                other => {
                    return Err(format!(
                        "unknown output format {other:?} in {s:?} (expected json and/or parquet)"
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err(format!("{s:?} names no output format"));
        }
        Ok(Formats(out))
    }
}

impl Serialize for Formats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Formats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `url` with the userinfo of its authority (`user:pass@`) replaced by
/// `***` (as recorded in `_meta.args`).
pub fn redact_url(url: &str) -> String {
    match split_userinfo(url) {
        (rest, Some(_)) => match rest.split_once("://") {
            Some((scheme, tail)) => format!("{scheme}://***@{tail}"),
            None => format!("***@{rest}"),
        },
        (rest, None) => rest,
    }
}

/// Splits the userinfo (`user:pass`, still percent-encoded) off the
/// authority of `url`: the URL without it, and it.
pub fn split_userinfo(url: &str) -> (String, Option<String>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let bare = match scheme {
                Some(s) => format!("{s}://{host}{path}"),
                None => format!("{host}{path}"),
            };
            (bare, Some(userinfo.to_string()))
        }
        None => (url.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serialise_as_the_flags_do() {
        let v = serde_json::to_value(RunConfig::default()).unwrap();
        assert_eq!(v["vqa_backend"], "qwen2_5_vl");
        assert_eq!(v["on_missing_image"], "error");
        assert_eq!(v["reward_mode"], "hard_plus_soft");
        assert_eq!(v["correctness_mode"], "01");
        assert_eq!(v["format"], "json,parquet");
        assert_eq!(v["output_mode"], "full");
        assert_eq!(v["progress"], "bar");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys[0], "config");
        assert_eq!(keys[3], "sft_ckpt");
        let back: RunConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, RunConfig::default());
    }

    #[test]
    fn gt_prob_mode_is_recorded_only_when_not_the_default() {
        // `_meta.args` of a run that does not set it stays byte-identical.
        let text = serde_json::to_string(&RunConfig::default()).unwrap();
        assert!(!text.contains("gt_prob_mode"), "{text}");
        let back: RunConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back.gt_prob_mode, GtProbMode::Answer);
        let c = RunConfig {
            gt_prob_mode: GtProbMode::Original,
            ..Default::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["gt_prob_mode"], "original");
        assert_eq!(serde_json::from_value::<RunConfig>(v).unwrap(), c);
        c.validate().unwrap();
        let openai = RunConfig {
            vqa_backend: VqaBackend::Openai,
            ..c
        };
        assert_eq!(openai.validate().unwrap_err().setting, "gt_prob_mode");
    }

    #[test]
    fn every_reward_mode_keeps_the_original_name() {
        for m in RewardMode::ALL {
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        let alias: VqaBackend = serde_json::from_str("\"qwen2.5_vl\"").unwrap();
        assert_eq!(alias, VqaBackend::Qwen2_5Vl);
    }

    #[test]
    fn formats_parse_and_print_as_given() {
        let f: Formats = "parquet, JSON".parse().unwrap();
        assert_eq!(f.to_string(), "parquet,json");
        assert_eq!(
            f.distinct(),
            vec![OutputFormat::Json, OutputFormat::Parquet]
        );
        assert!("csv".parse::<Formats>().unwrap_err().contains("csv"));
        assert!(",".parse::<Formats>().is_err());
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let c = RunConfig {
            temps: vec![1.0, 0.0],
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.setting, "temps");
        assert!(e.to_string().contains("> 0"));
    }
}
