//! Command-line definitions (clap derive only; no logic here).
use crate::media::{ImageArg, TimeRange};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "internvl-chat",
    version,
    about = "Chat with InternVL 2.5, 3 and 3.5 vision-language models in the terminal",
    long_about = "Chat with InternVL 2.5, 3 and 3.5 vision-language models in the terminal.\n\n\
        With --prompt (or a prompt on a non-terminal stdin) it answers once on stdout;\n\
        otherwise it opens the full-screen chat.\n\n\
        Exit codes: 0 success, 1 error (bad input, model or runtime), 2 usage error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub gen: GenArgs,
    /// One-shot question; the answer streams to stdout.
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Image to attach (repeatable), as PATH or PATH:N (at most N tiles, 1 to 128).
    #[arg(long = "image", value_name = "PATH[:N]")]
    pub images: Vec<ImageArg>,
    /// Give all images as one `<image>` (their tiles concatenated) instead of Image-1/Image-2.
    #[arg(long)]
    pub combine_images: bool,
    /// Video to attach: frames sampled as the model card's load_video.
    #[arg(long, value_name = "PATH")]
    pub video: Option<PathBuf>,
    /// Number of frames sampled from the video.
    #[arg(long, default_value_t = crate::media::DEFAULT_SEGMENTS, value_name = "N",
          value_parser = tile_count())]
    pub segments: usize,
    /// Only sample the video between START and END seconds (0 <= START < END; decimals
    /// allowed, e.g. 1.5,9).
    #[arg(long, value_name = "START,END", allow_hyphen_values = true)]
    pub video_bound: Option<TimeRange>,
    /// Open a saved chat session (see /sessions in the chat).
    #[arg(long, value_name = "NAME")]
    pub session: Option<String>,
    /// How the chat draws pictures: auto (detected; half blocks inside tmux), a terminal
    /// graphics protocol, or half blocks [default: config.toml's graphics, else auto].
    #[arg(long, value_enum, value_name = "HOW")]
    pub graphics: Option<Graphics>,
    /// Tiles per video frame.
    #[arg(long, default_value_t = crate::media::DEFAULT_VIDEO_MAX_TILES, value_name = "N",
          value_parser = tile_count())]
    pub video_max_tiles: usize,
    /// Ask an OpenAI-compatible server (`internvl-chat serve`, LMDeploy, vLLM) instead of
    /// loading a model: http://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// API key for --remote.
    #[arg(
        long,
        env = "INTERNVL_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// The model to ask on --remote (default: the first the server lists).
    #[arg(long, value_name = "NAME", requires = "remote")]
    pub remote_model: Option<String>,
}

/// 1..=128: tiles of an image, frames of a video (see `media::MAX_TILES_LIMIT`).
fn tile_count() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=crate::media::MAX_TILES_LIMIT as u64)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer a JSONL file of requests, one result line per request in the same order.
    Batch(BatchArgs),
    /// Show, without loading weights, what the model costs on each device.
    Plan(PlanArgs),
    /// Measure load, time to first token, decode speed, memory and batch throughput.
    Bench(BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (loopback unless told otherwise, e.g. 0.0.0.0).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed once the model is ready).
    #[arg(long, default_value_t = 23333)]
    pub port: u16,
    /// Refuse requests without `Authorization: Bearer KEY` (401).
    #[arg(
        long,
        env = "INTERNVL_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// Fetch pictures given as http(s) URLs (otherwise only data: and file:// URLs).
    #[arg(long)]
    pub allow_remote_images: bool,
    /// Seconds a client has to send a whole request, head and body, from its first byte.
    #[arg(long, value_name = "SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout: u64,
    /// The model's name in /v1/models and requests (default: the model folder's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Most requests decoded together (continuous batching); more wait in arrival order.
    #[arg(long, value_name = "N", default_value_t = crate::engine::worker::DEFAULT_MAX_BATCH,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub max_batch: usize,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// GPUs to plan for (default: the visible ones).
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Memory of each GPU in GiB (required with --gpus when no GPU is present).
    #[arg(long, value_name = "GIB")]
    pub gpu_memory: Option<f64>,
    /// Print the model card's device_map dict and the costs as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tile limits to measure (comma-separated).
    #[arg(long, default_value = "1,6", value_delimiter = ',')]
    pub tiles: Vec<usize>,
    /// Forced new tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Runs per figure (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The picture to describe (default: fixtures' image1.jpg).
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Requests, one JSON object per line (`-` for stdin).
    #[arg(long, short)]
    pub input: String,
    /// Where results go (`-` for stdout, the default).
    #[arg(long, short, default_value = "-")]
    pub output: String,
    /// Most requests decoded together (continuous batching: a request joins as soon as
    /// another ends); each answer is the one the request gets alone.
    #[arg(long, alias = "batch-size", value_name = "N",
          default_value_t = crate::engine::worker::DEFAULT_MAX_BATCH,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub max_batch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DType {
    Bf16,
    F16,
    F32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Graphics {
    Auto,
    Kitty,
    Sixel,
    Iterm2,
    Halfblocks,
}

/// Which linear layers `--load-8bit` / `--load-4bit` quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantScope {
    /// The decoder layers' linear weights (the output head stays in the dtype, as
    /// bitsandbytes leaves it).
    Llm,
    /// The decoder layers' and the output head's (in int8 for either precision, as llama.cpp's
    /// quantized files keep it): the fastest decoding.
    Head,
    /// The decoder layers', the output head's and the vision model's.
    All,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint folder (config.json, safetensors, tokenizer files), or a Hugging Face
    /// repository id ORG/NAME[@REVISION] fetched through the Hub's cache
    /// [default: OpenGVLab/InternVL2_5-1B].
    #[arg(
        long,
        short,
        global = true,
        env = "INTERNVL_MODEL",
        value_name = "DIR|ORG/NAME"
    )]
    pub model: Option<PathBuf>,
    /// Never use the network: models by name must already be in the Hugging Face cache
    /// (also HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    pub offline: bool,
    /// Precision the model runs in.
    #[arg(long, value_enum, default_value_t = DType::Bf16, global = true)]
    pub dtype: DType,
    /// Keep linear weights in int8 with one scale per output channel, decoding with int8
    /// inputs as bitsandbytes' LLM.int8() does: `llm` (the default when the flag is given: the
    /// decoder layers), `head` (the output head too) or `all` (the vision model's too). About
    /// half the memory of bf16 and faster decoding on CPU; outputs stay close to bf16 (see
    /// README).
    #[arg(long = "load-8bit", value_enum, global = true, num_args = 0..=1,
          default_missing_value = "llm", value_name = "WHAT")]
    pub load_8bit: Option<QuantScope>,
    /// Keep linear weights in 4 bits with one bf16 scale per group of 32 inputs (symmetric,
    /// as llama.cpp's Q4_0): `llm` (the default when the flag is given: the decoder layers),
    /// `head` (the output head too, in int8) or `all` (the vision model's too). About a quarter of the memory of bf16 and the fastest
    /// decoding on CPU; outputs stay near bf16's, further than 8-bit's (see README). Not with
    /// --load-8bit.
    #[arg(long = "load-4bit", value_enum, global = true, num_args = 0..=1,
          default_missing_value = "llm", value_name = "WHAT")]
    pub load_4bit: Option<QuantScope>,
    /// cpu, cuda, cuda:N or auto (all visible GPUs, else CPU).
    #[arg(long, default_value = "auto", global = true)]
    pub device: String,
    /// Split decoder layers across devices: auto (the model card's split_model), cpu, counts per
    /// device (0:12,1:12) or the model card's JSON device_map.
    #[arg(long, global = true, value_name = "SPEC")]
    pub device_map: Option<String>,
    /// Context window in tokens: the longest prompt plus answer, and what the KV cache and the
    /// memory check are sized for [default: the model's: max_position_embeddings, times the
    /// rope scaling factor where the rope scales dynamically; plan: up to 8192].
    #[arg(long, global = true, value_name = "TOKENS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=(1 << 24)))]
    pub context: Option<usize>,
    /// CPU threads for libtorch (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// Log more (to the log file; repeat for more detail).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Args, Clone)]
pub struct GenArgs {
    /// System message (default: the template's, or config.json's system_message).
    #[arg(long, global = true)]
    pub system: Option<String>,
    /// Thinking mode (InternVL3.5): the system message becomes the model card's
    /// R1_SYSTEM_PROMPT and the model thinks in a <think> block before it answers.
    #[arg(long, global = true, conflicts_with = "system")]
    pub think: bool,
    /// Most tiles per image (default: config's max_dynamic_patch).
    #[arg(long, global = true, value_name = "N", value_parser = tile_count())]
    pub max_tiles: Option<usize>,
    #[arg(long, global = true, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    #[arg(long, global = true, value_name = "N")]
    pub min_new_tokens: Option<usize>,
    /// 0 means greedy.
    #[arg(long, global = true)]
    pub temperature: Option<f64>,
    #[arg(long, global = true)]
    pub top_p: Option<f64>,
    /// 0 disables top-k.
    #[arg(long, global = true)]
    pub top_k: Option<usize>,
    #[arg(long, global = true)]
    pub repetition_penalty: Option<f64>,
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Greedy decoding (do_sample=False), as the reference goldens.
    #[arg(long, global = true)]
    pub greedy: bool,
    /// When a prompt would not fit the context window, leave out the oldest whole turns of
    /// the history (chat, batch `history`) instead of refusing it.
    #[arg(long, global = true)]
    pub truncate_history: bool,
}
