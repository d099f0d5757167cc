//! Command-line interface: every flag of the original `generate_rl_data.py`
//! with its original spelling (`--sft_ckpt`) and the kebab form
//! (`--sft-ckpt`), plus leverflow's own.

use clap::{Args, Parser, Subcommand};
use leverflow_operators::bench::vqa::SyntheticModel;
use leverflow_operators::config::{
    CorrectnessMode, Formats, GtProbMode, MissingImagePolicy, OutputMode, ProgressMode, RewardMode,
    RunConfig, VqaBackend, VqaErrorPolicy,
};
use serde::Serialize;
use std::path::PathBuf;

/// The library's defaults, which the flags' defaults are.
fn d() -> RunConfig {
    RunConfig::default()
}

/// Builds reinforcement-learning data for in-context example selection in
/// VQA, as a timely dataflow.
#[derive(Debug, Parser)]
#[command(name = "leverflow", version, about, long_about = None)]
#[command(args_override_self = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build RL records: candidates, VQA answers, accuracy, rewards → JSON + Parquet.
    #[command(after_long_help = GENERATE_EXAMPLE, args_override_self = true)]
    Generate(Box<GenerateArgs>),
    /// Write candidate pointer sequences only (no VQA), to inspect a policy fast.
    #[command(after_long_help = CANDIDATES_EXAMPLE, args_override_self = true)]
    Candidates(Box<GenerateArgs>),
    /// Official VQA accuracy of a results file.
    #[command(after_long_help = SCORE_EXAMPLE)]
    Score(ScoreArgs),
    /// Answer one VQA request (or a list, as one batch) with a Qwen2.5-VL checkpoint.
    #[command(after_long_help = VQA_EXAMPLE)]
    Vqa(VqaArgs),
    /// The run summary of any leverflow output (JSON or Parquet).
    #[command(after_long_help = STATS_EXAMPLE)]
    Stats(StatsArgs),
    /// Merge Parquet outputs (a multi-process dataset, or --start_idx/--end_idx shards) into one JSON.
    #[command(after_long_help = MERGE_EXAMPLE)]
    Merge(MergeArgs),
    /// Micro-benchmarks whose figures go into BENCHMARKS.md.
    #[command(after_long_help = BENCH_EXAMPLE)]
    Bench(BenchArgs),
}

const GENERATE_EXAMPLE: &str = "Example (the original tool's flags work unchanged):
  leverflow generate --sft_ckpt sft.ckpt --beam_data beam.json \\
    --output_path rl_data.json --query_emb query.pt --cand_emb cand.pt \\
    --vqa_model /models/Qwen2.5-VL-3B-Instruct --dataset okvqa_local \\
    --train_ques_path OpenEnded_mscoco_train2014_questions.json \\
    --train_ann_path mscoco_train2014_annotations.json --train_coco_root train2014/

Re-score an earlier output without a model:
  leverflow generate ... --vqa_backend replay --replay_from rl_data.json";

const CANDIDATES_EXAMPLE: &str = "Example:
  leverflow candidates --sft_ckpt sft.ckpt --beam_data beam.json \\
    --output_path cands.json --query_emb query.pt --cand_emb cand.pt \\
    --train_ques_path Q.json --train_ann_path A.json --train_coco_root images/";

const SCORE_EXAMPLE: &str = "Example:
  leverflow score --questions OpenEnded_mscoco_val2014_questions.json \\
    --annotations mscoco_val2014_annotations.json --predictions results.json";

const VQA_EXAMPLE: &str = "Example:
  leverflow vqa --vqa_model /models/Qwen2.5-VL-3B-Instruct --request req.json
where req.json is
  {\"examples\": [{\"image\": \"a.jpg\", \"question\": \"what color?\", \"answer\": \"red\"}],
   \"query\": {\"image\": \"b.jpg\", \"question\": \"what shape?\"}}";

const STATS_EXAMPLE: &str = "Example:
  leverflow stats demo-output/rl_data.parquet
  leverflow stats rl_data.json --json";

const MERGE_EXAMPLE: &str = "Examples:
  # a multi-process run: the dataset directory written with --parquet_path
  leverflow merge rl_parquet/ --output_path rl_data.json

  # the original's manual sharding: one output per --start_idx/--end_idx range
  leverflow merge shard_0.parquet shard_1.parquet shard_2.parquet \\
    --output_path rl_data.json --parquet_path rl_data.parquet

Inputs are dataset directories (read through their _manifest.json, which a
run writes last: a directory with part files but no manifest is refused),
directories of single-file Parquet outputs, or Parquet files.  Each file is
sorted by query index; the merge streams them (k-way, one record batch per
file in memory) into the JSON in ascending query order, byte for byte what
`generate` writes.  A query index found in two inputs is an error.  _meta is
the inputs' _meta when they agree, else the first input's with
\"merged_from\" listing every input's.  Outputs appear only on success.";

const BENCH_EXAMPLE: &str = "Example:
  leverflow bench score
  leverflow bench candidates --pool 64";

/// Arguments of `generate` and `candidates`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct GenerateArgs {
    /// YAML file with the same keys as these flags (`${oc.env:VAR}` is
    /// replaced by the environment variable VAR); flags given on the command
    /// line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (flags + YAML + defaults) and exit.
    #[arg(long = "print_config", visible_alias = "print-config")]
    pub print_config: bool,
    /// Run on the embedded demo (easy-VQA subset in demo/, the tiny
    /// Qwen2.5-VL fixture); writes under demo-output/ unless --output_path.
    #[arg(long)]
    pub demo: bool,

    // ---- inputs ----
    /// SFT pointer-selector checkpoint (Lightning .ckpt, state-dict .pt, or .safetensors).
    #[arg(long = "sft_ckpt", visible_alias = "sft-ckpt", value_name = "FILE")]
    pub sft_ckpt: Option<PathBuf>,
    /// Beam data (JSON object keyed by query index, or JSON Lines): decides which queries run.
    #[arg(long = "beam_data", visible_alias = "beam-data", value_name = "FILE")]
    pub beam_data: Option<PathBuf>,
    /// Output JSON path (the original format).
    #[arg(
        long = "output_path",
        visible_alias = "output-path",
        value_name = "FILE"
    )]
    pub output_path: Option<PathBuf>,
    /// Query embeddings [N, d] (.pt, .safetensors, .npy); row i = dataset index i.
    #[arg(long = "query_emb", visible_alias = "query-emb", value_name = "FILE")]
    pub query_emb: Option<PathBuf>,
    /// Candidate embeddings [K, d]; row j = candidate position j.
    #[arg(long = "cand_emb", visible_alias = "cand-emb", value_name = "FILE")]
    pub cand_emb: Option<PathBuf>,
    /// JSON list: the dataset index of each candidate-embedding row (default: row = index).
    #[arg(
        long = "candidate_indices",
        visible_alias = "candidate-indices",
        value_name = "FILE"
    )]
    pub candidate_indices: Option<PathBuf>,
    /// Per-query candidate pools `{"<query_idx>": [ids]}`: the pointer picks positions in the pool.
    #[arg(
        long = "sampler_cache",
        visible_alias = "sampler-cache",
        value_name = "FILE"
    )]
    pub sampler_cache: Option<PathBuf>,
    /// VQA model: a Qwen2.5-VL checkpoint directory, a Hugging Face repository id (Qwen/Qwen2.5-VL-3B-Instruct, from the HF cache or downloaded), or qwen2.5_vl_3B / qwen2.5_vl_7B.
    #[arg(
        long = "vqa_model",
        visible_alias = "vqa-model",
        default_value_t = d().vqa_model
    )]
    pub vqa_model: String,
    /// Revision of a repository --vqa_model: branch, tag or commit (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Never download a model (as HF_HUB_OFFLINE=1): a repository must be in the Hugging Face cache.
    #[arg(long)]
    pub offline: bool,
    /// Dataset kind: okvqa_local or vqav2_local.
    #[arg(long, default_value_t = d().dataset)]
    pub dataset: String,
    /// Training questions (official VQA format).
    #[arg(
        long = "train_ques_path",
        visible_alias = "train-ques-path",
        value_name = "FILE"
    )]
    pub train_ques_path: Option<PathBuf>,
    /// Training annotations (official VQA format, or merged vqav2 style).
    #[arg(
        long = "train_ann_path",
        visible_alias = "train-ann-path",
        value_name = "FILE"
    )]
    pub train_ann_path: Option<PathBuf>,
    /// Validation questions (accuracy fallback split).
    #[arg(
        long = "val_ques_path",
        visible_alias = "val-ques-path",
        value_name = "FILE"
    )]
    pub val_ques_path: Option<PathBuf>,
    /// Validation annotations.
    #[arg(
        long = "val_ann_path",
        visible_alias = "val-ann-path",
        value_name = "FILE"
    )]
    pub val_ann_path: Option<PathBuf>,
    /// Merged training file (vqav2 style: annotations holding `question`).
    #[arg(long = "train_path", visible_alias = "train-path", value_name = "FILE")]
    pub train_path: Option<PathBuf>,
    /// Merged validation file.
    #[arg(long = "val_path", visible_alias = "val-path", value_name = "FILE")]
    pub val_path: Option<PathBuf>,
    /// Training image directory.
    #[arg(
        long = "train_coco_root",
        visible_alias = "train-coco-root",
        value_name = "DIR"
    )]
    pub train_coco_root: Option<PathBuf>,
    /// Validation image directory.
    #[arg(
        long = "val_coco_root",
        visible_alias = "val-coco-root",
        value_name = "DIR"
    )]
    pub val_coco_root: Option<PathBuf>,
    /// Image file name pattern ({image_id}, {image_id:012d}, {question_id}).
    #[arg(
        long = "image_pattern",
        visible_alias = "image-pattern",
        default_value = "COCO_train2014_{image_id:012d}.jpg"
    )]
    pub image_pattern: String,

    // ---- candidates ----
    /// Beams per query.
    #[arg(long = "num_beams", visible_alias = "num-beams", default_value_t = 5)]
    pub num_beams: usize,
    /// Sampling temperatures.
    #[arg(long, num_args = 1.., default_values_t = [1.0, 1.3])]
    pub temps: Vec<f64>,
    /// Samples per temperature.
    #[arg(
        long = "num_samples_per_temp",
        visible_alias = "num-samples-per-temp",
        default_value_t = 2
    )]
    pub num_samples_per_temp: usize,
    /// Uniformly random sequences.
    #[arg(long = "num_random", visible_alias = "num-random", default_value_t = 1)]
    pub num_random: usize,
    /// Similarity-retrieval sequences.
    #[arg(
        long = "num_retrieval",
        visible_alias = "num-retrieval",
        default_value_t = 0
    )]
    pub num_retrieval: usize,
    /// Examples per prompt (default: the checkpoint's, else 2).
    #[arg(long = "shot_num", visible_alias = "shot-num")]
    pub shot_num: Option<usize>,
    /// Attention heads of the pointer selector (not recoverable from the weights).
    #[arg(long = "num_heads", visible_alias = "num-heads", default_value_t = 1)]
    pub num_heads: usize,
    /// Also add the beam data's own beams as candidates (gen_method source_beam).
    #[arg(long = "include_source_beams", visible_alias = "include-source-beams")]
    pub include_source_beams: bool,
    /// Seed: the RNG of a query is seeded from (seed, query index) only.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    // ---- VQA ----
    /// VQA backend.
    #[arg(
        long = "vqa_backend",
        visible_alias = "vqa-backend",
        value_enum,
        default_value_t = d().vqa_backend
    )]
    pub vqa_backend: VqaBackend,
    /// Earlier leverflow output (JSON or Parquet) whose raw generations the replay backend answers with.
    #[arg(
        long = "replay_from",
        visible_alias = "replay-from",
        value_name = "FILE"
    )]
    pub replay_from: Option<PathBuf>,
    /// openai backend: the server's base URL, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, transformers serve, ...).
    #[arg(
        long = "openai_base_url",
        visible_alias = "openai-base-url",
        value_name = "URL"
    )]
    pub openai_base_url: Option<String>,
    /// openai backend: the served model to ask (default: the only one GET /v1/models lists).
    #[arg(
        long = "openai_model",
        visible_alias = "openai-model",
        value_name = "NAME"
    )]
    pub openai_model: Option<String>,
    /// openai backend: the environment variable holding the API key (default OPENAI_API_KEY, when set); the key is never recorded.
    #[arg(
        long = "openai_api_key_env",
        visible_alias = "openai-api-key-env",
        value_name = "VAR"
    )]
    pub openai_api_key_env: Option<String>,
    /// openai backend: requests in flight at once per process.
    #[arg(
        long = "openai_concurrency",
        visible_alias = "openai-concurrency",
        default_value_t = d().openai_concurrency
    )]
    pub openai_concurrency: usize,
    /// openai backend: seconds to wait for one response.
    #[arg(
        long = "openai_timeout",
        visible_alias = "openai-timeout",
        value_name = "SECONDS",
        default_value_t = d().openai_timeout
    )]
    pub openai_timeout: f64,
    /// openai backend: retries of a request after a connection error, 429 or 5xx (exponential backoff from 0.5 s).
    #[arg(
        long = "openai_retries",
        visible_alias = "openai-retries",
        default_value_t = d().openai_retries
    )]
    pub openai_retries: u32,
    /// Device: cpu, cuda:N (needs a build with `--features cuda`), or wgpu /
    /// wgpu:N (needs `--features wgpu`; `wgpu` = the best adapter, `wgpu:N` =
    /// discrete GPU N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Prompts per VQA batch.
    #[arg(long = "batch_size", visible_alias = "batch-size", default_value_t = 8)]
    pub batch_size: usize,
    /// Maximum new tokens.
    #[arg(
        long = "max_new_tokens",
        visible_alias = "max-new-tokens",
        default_value_t = 5
    )]
    pub max_new_tokens: usize,
    /// Beams of the VQA generation.
    #[arg(
        long = "vqa_num_beams",
        visible_alias = "vqa-num-beams",
        default_value_t = 3
    )]
    pub vqa_num_beams: usize,
    /// Length penalty of the VQA beam search.
    #[arg(
        long = "length_penalty",
        visible_alias = "length-penalty",
        default_value_t = 0.0
    )]
    pub length_penalty: f64,
    /// Minimum new tokens.
    #[arg(
        long = "min_new_tokens",
        visible_alias = "min-new-tokens",
        default_value_t = 0
    )]
    pub min_new_tokens: usize,
    /// Repetition penalty (default: the checkpoint's generation_config.json, as HF does).
    #[arg(long = "repetition_penalty", visible_alias = "repetition-penalty")]
    pub repetition_penalty: Option<f64>,
    /// Compute vqa_gt_prob (teacher-forced probability of the ground-truth answers).
    #[arg(long = "gt_prob", visible_alias = "gt-prob")]
    pub gt_prob: bool,
    /// How vqa_gt_prob scores an answer: answer (the answer tokens after the
    /// prompt, geometric mean) or original (the original project's
    /// get_cond_prob, whose scored span starts at the token count of a
    /// plain-text rendering of the prompt, so it also covers most of the
    /// prompt; qwen2_5_vl backend only).
    #[arg(
        long = "gt_prob_mode",
        visible_alias = "gt-prob-mode",
        value_enum,
        default_value_t = d().gt_prob_mode
    )]
    pub gt_prob_mode: GtProbMode,
    /// Vision-embedding cache size in MB.
    #[arg(
        long = "vision_cache_mb",
        visible_alias = "vision-cache-mb",
        default_value_t = 512
    )]
    pub vision_cache_mb: usize,
    /// What to do when an image is missing: error, or skip (the query is recorded as skipped).
    #[arg(
        long = "on_missing_image",
        visible_alias = "on-missing-image",
        value_enum,
        default_value_t = d().on_missing_image
    )]
    pub on_missing_image: MissingImagePolicy,
    /// System prompt (default: the original's).
    #[arg(long = "system_prompt", visible_alias = "system-prompt")]
    pub system_prompt: Option<String>,

    // ---- accuracy ----
    /// Strict evaluation: only the official metric with annotation files (default).
    #[arg(
        long = "strict_eval",
        visible_alias = "strict-eval",
        overrides_with = "no_strict_eval"
    )]
    pub strict_eval: bool,
    /// Allow the fallback match (exact 1.0, substring 0.5) when no annotations match.
    #[arg(long = "no_strict_eval", visible_alias = "no-strict-eval")]
    pub no_strict_eval: bool,
    /// Save the rendered prompt of every candidate.
    #[arg(long = "save_prompts", visible_alias = "save-prompts")]
    pub save_prompts: bool,

    // ---- rewards ----
    /// Reward mode (the original's modes).
    #[arg(
        long = "reward_mode",
        visible_alias = "reward-mode",
        value_enum,
        default_value_t = d().reward_mode
    )]
    pub reward_mode: RewardMode,
    /// Weight of the hard (0/1) correctness.
    #[arg(
        long = "hard_weight",
        visible_alias = "hard-weight",
        default_value_t = 1.0
    )]
    pub hard_weight: f64,
    /// Weight of the soft score (accuracy or answer probability).
    #[arg(
        long = "soft_weight",
        visible_alias = "soft-weight",
        default_value_t = 1.0
    )]
    pub soft_weight: f64,
    /// Weight of the relevance score.
    #[arg(long = "rel_weight", visible_alias = "rel-weight")]
    pub rel_weight: Option<f64>,
    /// Legacy mode: weight of the policy quality term.
    #[arg(
        long = "reward_alpha",
        visible_alias = "reward-alpha",
        default_value_t = 0.0
    )]
    pub reward_alpha: f64,
    /// Legacy mode: weight of the correctness term.
    #[arg(
        long = "reward_beta",
        visible_alias = "reward-beta",
        default_value_t = 0.0
    )]
    pub reward_beta: f64,
    /// Legacy mode: correctness as 01 or pm1.
    #[arg(
        long = "correctness_mode",
        visible_alias = "correctness-mode",
        value_enum,
        default_value_t = d().correctness_mode
    )]
    pub correctness_mode: CorrectnessMode,
    /// Legacy mode: use -logprob_score as the quality term.
    #[arg(long = "use_logprob", visible_alias = "use-logprob")]
    pub use_logprob: bool,

    // ---- run ----
    /// First query (position in the beam data's key order), as the original's sharding.
    #[arg(long = "start_idx", visible_alias = "start-idx", default_value_t = 0)]
    pub start_idx: usize,
    /// End query position (exclusive; -1 = all).
    #[arg(long = "end_idx", visible_alias = "end-idx", default_value_t = -1, allow_hyphen_values = true)]
    pub end_idx: i64,
    /// Timely worker threads in this process.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Processes of a multi-process run (timely's -n); each is started with
    /// the same flags and its own --process_index.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// This process, 0..processes (timely's -p).
    #[arg(
        long = "process_index",
        visible_alias = "process-index",
        default_value_t = 0
    )]
    pub process_index: usize,
    /// One host:port per line, in process order (timely's -h); blank lines
    /// and # comments are ignored.  Required with --processes > 1.
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// Devices of this process's workers, round robin (cpu, cuda:N or wgpu[:N], comma
    /// separated); default: every worker on --device.
    #[arg(long, value_name = "LIST")]
    pub devices: Option<String>,
    /// Seconds to wait for the other processes of a multi-process run.
    #[arg(
        long = "connect_timeout",
        visible_alias = "connect-timeout",
        default_value_t = 60
    )]
    pub connect_timeout: u64,
    /// Output formats: json, parquet or both (comma separated).
    #[arg(long, default_value_t = d().format)]
    pub format: Formats,
    /// Parquet output path (default: the output path with `.parquet`).
    #[arg(
        long = "parquet_path",
        visible_alias = "parquet-path",
        value_name = "FILE"
    )]
    pub parquet_path: Option<PathBuf>,
    /// Persistent store of finished work (default: `<output_path>.state/`).
    /// A rerun reuses every result whose inputs are unchanged, and a killed
    /// run resumes where it stopped.
    #[arg(long = "state_dir", visible_alias = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// `full` rewrites the JSON and Parquet outputs; `delta` also writes
    /// `<parquet stem>.delta.parquet` (rows of added and changed queries) and
    /// `<output stem>.retracted.json` (removed query ids).
    #[arg(
        long = "output_mode",
        visible_alias = "output-mode",
        value_enum,
        default_value_t = d().output_mode
    )]
    pub output_mode: OutputMode,
    /// Queries per output segment (query index / N): a Parquet row group
    /// never spans two segments, and a rerun copies every segment whose
    /// queries are unchanged from the previous outputs instead of
    /// rewriting it. Smaller segments make reruns cheaper and row groups
    /// smaller.
    #[arg(
        long = "segment_queries",
        visible_alias = "segment-queries",
        default_value_t = d().segment_queries,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub segment_queries: u64,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Progress style: bar, json (one JSON line per update) or none.
    #[arg(long, value_enum, default_value_t = d().progress)]
    pub progress: ProgressMode,
    /// What to do when the VQA backend fails on a prompt: error (stop the
    /// run), or record (the candidate gets `eval_failed = true`, accuracy
    /// 0 and no answer; a rerun asks the backend again).
    #[arg(
        long = "on_vqa_error",
        visible_alias = "on-vqa-error",
        value_enum,
        default_value_t = d().on_vqa_error
    )]
    pub on_vqa_error: VqaErrorPolicy,
    /// Largest width and height of an image in pixels; a larger image is
    /// refused with an error naming it (decoding needs width x height x 3
    /// bytes, per worker and batch).
    #[arg(
        long = "max_image_side",
        visible_alias = "max-image-side",
        default_value_t = d().max_image_side
    )]
    pub max_image_side: u32,
    /// Largest decoder allocation for one image, in MiB.
    #[arg(
        long = "max_image_mb",
        visible_alias = "max-image-mb",
        default_value_t = d().max_image_mb
    )]
    pub max_image_mb: u64,
    /// Shared secret authenticating the processes of a multi-process run
    /// (the same file on every host, mode 600; make one with `head -c 32
    /// /dev/urandom | base64 > cluster.secret && chmod 600 cluster.secret`).
    /// Default: the environment variable LEVERFLOW_CLUSTER_SECRET. Required
    /// when the hostfile lists an address that is not loopback.
    #[arg(
        long = "cluster_secret_file",
        visible_alias = "cluster-secret-file",
        value_name = "FILE"
    )]
    pub cluster_secret_file: Option<PathBuf>,
}

impl GenerateArgs {
    /// The run's settings. Every flag is a field of [`RunConfig`] of the
    /// same name and type (the conversion goes through their serialised
    /// form, so the two cannot drift apart silently: a test converts the
    /// defaults).
    pub fn into_config(self) -> anyhow::Result<RunConfig> {
        let value = serde_json::to_value(self)?;
        Ok(serde_json::from_value(value)?)
    }
}

/// Arguments of `merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Dataset directories (with _manifest.json), directories of single-file
    /// Parquet outputs, or Parquet files.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// The merged JSON (the original format).
    #[arg(
        long = "output_path",
        visible_alias = "output-path",
        value_name = "FILE"
    )]
    pub output_path: Option<PathBuf>,
    /// Also (or only) a merged single Parquet file.
    #[arg(
        long = "parquet_path",
        visible_alias = "parquet-path",
        value_name = "FILE"
    )]
    pub parquet_path: Option<PathBuf>,
    /// Indent the JSON (two spaces) instead of compact output.
    #[arg(long)]
    pub pretty: bool,
    /// Rows decoded at a time per input file (bounds the memory).
    #[arg(
        long = "batch_rows",
        visible_alias = "batch-rows",
        default_value_t = 1024
    )]
    pub batch_rows: usize,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Progress style: bar, json (one JSON line per update) or none.
    #[arg(long, value_enum, default_value_t = ProgressMode::Bar)]
    pub progress: ProgressMode,
}

/// Arguments of `score`.
#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    /// Questions file (official format).
    #[arg(long)]
    pub questions: PathBuf,
    /// Annotations file (official format).
    #[arg(long)]
    pub annotations: PathBuf,
    /// Results file `[{"question_id", "answer"}]`.
    #[arg(long)]
    pub predictions: PathBuf,
}

/// Arguments of `stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// A leverflow output: `.json` or `.parquet`.
    pub output: PathBuf,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also draw mean accuracy per gen_method and the reward histogram to
    /// this SVG file.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// Arguments of `vqa`.
#[derive(Debug, Clone, Args)]
pub struct VqaArgs {
    /// Qwen2.5-VL checkpoint: a directory, a Hugging Face repository id, or qwen2.5_vl_3B / qwen2.5_vl_7B.
    #[arg(long = "vqa_model", visible_alias = "vqa-model")]
    pub vqa_model: String,
    /// Revision of a repository --vqa_model: branch, tag or commit (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Never download a model (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Request JSON (one request or a list).
    #[arg(long)]
    pub request: PathBuf,
    /// Device: cpu, cuda:N or wgpu[:N] (see `generate --help`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Arguments of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure: score, candidates, pipeline, rerun (incremental rerun after adding 1% queries), vqa, openai (answers/s through a running server at --concurrency requests in flight; --queries demo queries).
    pub what: String,
    /// Candidate pool size (candidates bench).
    #[arg(long, default_value_t = 64)]
    pub pool: usize,
    /// Queries (candidates / pipeline benches).
    #[arg(long, default_value_t = 2000)]
    pub queries: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Timely workers (pipeline bench).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Model directory (vqa bench).
    #[arg(long = "vqa_model", visible_alias = "vqa-model")]
    pub vqa_model: Option<PathBuf>,
    /// Batch size (vqa bench).
    #[arg(long = "batch_size", visible_alias = "batch-size", default_value_t = 8)]
    pub batch_size: usize,
    /// vqa bench: the device (cpu, cuda:N, wgpu[:N]); off the CPU it also
    /// measures the device→host reads of every decoding step, with the
    /// ranking on the device and (for comparison) on the host.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// vqa bench: answer with this many decoder layers of Qwen2.5-VL-3B's
    /// width (hidden 2048, MLP 11008, 16 query and 2 KV heads; the 3B has
    /// 36) and random weights, written to a temporary checkpoint next to
    /// the tiny fixture's tokenizer, processor and images. It shows what
    /// batching buys once weights, not per-token work, dominate.
    #[arg(long = "synthetic_3b_layers", visible_alias = "synthetic-3b-layers")]
    pub synthetic_3b_layers: Option<usize>,
    /// vqa bench: `3b` writes a random-weight checkpoint with every shape
    /// of Qwen2.5-VL-3B-Instruct (vision tower included; bf16, 4 shards,
    /// 7.5 GB; in --keep_dir and reused from there when given, else in a
    /// temporary directory) and measures 8 prompts at batch 1 and at
    /// --batch_size, each in a fresh process, with each one's peak RSS.
    #[arg(long, value_enum)]
    pub synthetic: Option<SyntheticModel>,
    /// vqa bench: measure only --batch_size, not batch 1 first (so the
    /// reported peak RSS is that batch size's own).
    #[arg(long = "batch_only", visible_alias = "batch-only")]
    pub batch_only: bool,
    /// vqa bench: the vision-embedding cache in MB kept across batches
    /// (0: off, every prompt encodes its own images, as HF does; with the
    /// cache, an image is encoded once per run).
    #[arg(
        long = "vision_cache_mb",
        visible_alias = "vision-cache-mb",
        default_value_t = 256
    )]
    pub vision_cache_mb: usize,
    /// pipeline / rerun / cluster benches: prepare the synthetic inputs in
    /// this directory and keep them (and the runs' outputs and state) after
    /// the benchmark, to profile a run by hand. Default: a temporary
    /// directory, removed at the end.
    #[arg(long = "keep_dir", visible_alias = "keep-dir")]
    pub keep_dir: Option<PathBuf>,
    /// openai bench: the server's base URL (e.g. http://127.0.0.1:8000/v1).
    #[arg(
        long = "openai_base_url",
        visible_alias = "openai-base-url",
        value_name = "URL"
    )]
    pub openai_base_url: Option<String>,
    /// openai bench: the served model (default: the only one).
    #[arg(long = "openai_model", visible_alias = "openai-model")]
    pub openai_model: Option<String>,
    /// openai bench: requests in flight to measure at (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
    pub concurrency: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(flags: &[&str]) -> GenerateArgs {
        let mut argv = vec!["leverflow", "generate"];
        argv.extend_from_slice(flags);
        match Cli::parse_from(argv).command {
            Command::Generate(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_flag_is_a_setting_and_the_defaults_are_the_library_defaults() {
        assert_eq!(generate(&[]).into_config().unwrap(), RunConfig::default());
    }

    #[test]
    fn enum_flags_take_the_original_spellings_and_list_the_valid_ones() {
        let c = generate(&[
            "--vqa_backend",
            "qwen2.5_vl",
            "--reward-mode",
            "hard01_plus_gtprob_separated",
            "--correctness_mode",
            "pm1",
            "--on_missing_image",
            "skip",
            "--output_mode",
            "delta",
            "--progress",
            "json",
            "--format",
            "parquet",
            "--gt_prob_mode",
            "original",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.vqa_backend, VqaBackend::Qwen2_5Vl);
        assert_eq!(c.reward_mode, RewardMode::Hard01PlusGtprobSeparated);
        assert_eq!(c.correctness_mode, CorrectnessMode::PlusMinusOne);
        assert_eq!(c.on_missing_image, MissingImagePolicy::Skip);
        assert_eq!(c.output_mode, OutputMode::Delta);
        assert_eq!(c.progress, ProgressMode::Json);
        assert_eq!(c.format.to_string(), "parquet");
        assert_eq!(c.gt_prob_mode, GtProbMode::Original);
        let err = Cli::try_parse_from(["leverflow", "generate", "--reward_mode", "best"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hard_plus_soft") && err.contains("legacy"),
            "{err}"
        );
    }
}
