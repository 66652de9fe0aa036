//! Command-line flags, named after `vllm serve`'s so that KServe presets run unchanged.
//! Every flag can also come from a `TESSERA_…` environment variable.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "tessera", version, about = "Tessera model-serving worker (vLLM-compatible flags)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over the OpenAI-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// Derive a Hugging Face-layout copy (config.json, f32 safetensors, tokenizer files) of a GGUF model.
    ExportHf {
        /// The GGUF file.
        gguf: PathBuf,
        /// Output directory.
        out_dir: PathBuf,
    },
    /// Download a whole model (s3://, gs://, az://, http(s)://, hf://) into a folder, resuming a
    /// partial earlier download and checking checksums where the store gives them.
    Fetch {
        /// The model URI.
        uri: String,
        /// Destination folder (e.g. /mnt/models).
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    Auto,
    #[value(alias = "bf16")]
    Bfloat16,
    #[value(alias = "half", alias = "fp16")]
    Float16,
    #[value(alias = "float", alias = "fp32")]
    Float32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    Fcfs,
    Priority,
}

/// `--criticality [NAME=]CLASS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriticalitySpec {
    /// `None`: the default for every served name.
    pub name: Option<String>,
    pub class: tessera_engine::Criticality,
}

fn parse_criticality(s: &str) -> Result<CriticalitySpec, String> {
    let (name, class) = match s.rsplit_once('=') {
        Some((n, c)) if !n.is_empty() => (Some(n.to_string()), c),
        Some((_, _)) => return Err(format!("`{s}`: the name before `=` is empty")),
        None => (None, s),
    };
    Ok(CriticalitySpec { name, class: class.parse()? })
}

/// vLLM's `--task`: what the model is served for (`auto`: embeddings for an encoder, else generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum TaskArg {
    #[default]
    Auto,
    Generate,
    Embed,
}

/// vLLM's newer `--runner`: `pooling` serves embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum RunnerArg {
    #[default]
    Auto,
    Generate,
    Pooling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model: a local directory (Hugging Face layout) or .gguf file, or a URI: file://, s3://,
    /// gs://, az://, abfs://, http(s)://, hf://org/model[@revision].
    #[arg(env = "TESSERA_MODEL")]
    pub model: String,
    /// Cache folder for remote models (default: $TESSERA_CACHE_DIR, else ~/.cache/tessera/hub).
    #[arg(long, env = "TESSERA_DOWNLOAD_DIR")]
    pub download_dir: Option<PathBuf>,
    /// Names accepted in the request's `model` field; the first is canonical.
    #[arg(long, num_args = 1.., env = "TESSERA_SERVED_MODEL_NAME", value_delimiter = ' ')]
    pub served_model_name: Vec<String>,
    #[arg(long, default_value = "0.0.0.0", env = "TESSERA_HOST")]
    pub host: String,
    #[arg(long, default_value_t = 8000, env = "TESSERA_PORT")]
    pub port: u16,
    /// Context length (prompt + output); defaults to the model's.
    #[arg(long, env = "TESSERA_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Tensor-parallel ranks (`-tp`): attention heads and MLP split over this many ranks.
    #[arg(long, default_value_t = 1, env = "TESSERA_TENSOR_PARALLEL_SIZE")]
    pub tensor_parallel_size: usize,
    /// Pipeline-parallel stages (`-pp`).
    #[arg(long, default_value_t = 1, env = "TESSERA_PIPELINE_PARALLEL_SIZE")]
    pub pipeline_parallel_size: usize,
    /// Data-parallel replicas: engines (each with its own scheduler, KV cache and ranks) behind
    /// one HTTP front that sends each request to the least loaded.
    #[arg(long, default_value_t = 1, env = "TESSERA_DATA_PARALLEL_SIZE")]
    pub data_parallel_size: usize,
    /// Replicas in this pod (default: all). Fewer than --data-parallel-size spreads the replicas
    /// over pods: the pod of --data-parallel-start-rank 0 serves HTTP, the others run `--headless`
    /// and join it at --data-parallel-address:--data-parallel-rpc-port.
    #[arg(long, env = "TESSERA_DATA_PARALLEL_SIZE_LOCAL")]
    pub data_parallel_size_local: Option<usize>,
    /// Host of the data-parallel leader (the pod of start rank 0), for worker pods.
    #[arg(long, env = "TESSERA_DATA_PARALLEL_ADDRESS")]
    pub data_parallel_address: Option<String>,
    /// Port on which the data-parallel leader takes its remote replicas.
    #[arg(long, default_value_t = 5555, env = "TESSERA_DATA_PARALLEL_RPC_PORT")]
    pub data_parallel_rpc_port: u16,
    /// First data-parallel rank of this pod (a multiple of --data-parallel-size-local).
    #[arg(long, default_value_t = 0, env = "TESSERA_DATA_PARALLEL_START_RANK")]
    pub data_parallel_start_rank: usize,
    /// Split MoE experts whole over the tensor-parallel ranks (tokens travel to their experts)
    /// instead of slicing every expert.
    #[arg(long, env = "TESSERA_ENABLE_EXPERT_PARALLEL")]
    pub enable_expert_parallel: bool,
    /// Port of rank 0's rendezvous on the leader (LeaderWorkerSet groups; a single pod picks a
    /// free loopback port).
    #[arg(long, default_value_t = 29500, env = "TESSERA_RENDEZVOUS_PORT")]
    pub rendezvous_port: u16,
    /// Seconds ranks wait for each other at start-up; past it start-up fails naming the missing ranks.
    #[arg(long, default_value_t = 60.0, env = "TESSERA_RANK_JOIN_TIMEOUT")]
    pub rank_join_timeout: f64,
    /// Serve no HTTP: host this pod's ranks for the leader (LeaderWorkerSet worker pods).
    #[arg(long, env = "TESSERA_HEADLESS")]
    pub headless: bool,
    /// Maximum sequences in one batch.
    #[arg(long, default_value_t = 256, env = "TESSERA_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Token budget of one engine step (prefill chunks + decode tokens).
    #[arg(long, default_value_t = 512, env = "TESSERA_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16, env = "TESSERA_BLOCK_SIZE")]
    pub block_size: usize,
    /// KV cache size in bytes (suffixes K, M, G, KiB, MiB, GiB accepted).
    #[arg(long, default_value = "2GiB", env = "TESSERA_KV_CACHE_MEMORY")]
    pub kv_cache_memory: String,
    /// Fraction of GPU memory to use (CUDA only; on CPU --kv-cache-memory decides).
    #[arg(long, default_value_t = 0.9, env = "TESSERA_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: f64,
    #[arg(long, value_enum, default_value = "auto", env = "TESSERA_DTYPE")]
    pub dtype: DTypeArg,
    /// Element type of the KV cache: `auto` is float16 on the CPU (half the memory of f32,
    /// read by the attention kernel in place) and the model's dtype elsewhere.
    #[arg(long, value_enum, default_value = "auto", env = "TESSERA_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: DTypeArg,
    #[arg(long, value_enum, default_value = "auto", env = "TESSERA_DEVICE")]
    pub device: DeviceArg,
    /// What to serve the model for: generate (chat, completions) or embed (`/v1/embeddings`).
    #[arg(long, value_enum, default_value = "auto")]
    pub task: TaskArg,
    /// `pooling` is `--task embed` (vLLM's newer spelling).
    #[arg(long, value_enum, default_value = "auto")]
    pub runner: RunnerArg,
    /// Automatic prefix caching (on by default).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    #[arg(long, action = ArgAction::SetTrue, env = "TESSERA_NO_ENABLE_PREFIX_CACHING")]
    pub no_enable_prefix_caching: bool,
    /// Chunked prefill (on by default).
    #[arg(long, action = ArgAction::SetTrue, overrides_with = "no_enable_chunked_prefill")]
    pub enable_chunked_prefill: bool,
    #[arg(long, action = ArgAction::SetTrue, env = "TESSERA_NO_ENABLE_CHUNKED_PREFILL")]
    pub no_enable_chunked_prefill: bool,
    /// `fcfs`, or `priority` (the request's `priority` field orders waiting requests, lower first).
    #[arg(long, value_enum, default_value = "fcfs", env = "TESSERA_SCHEDULING_POLICY")]
    pub scheduling_policy: PolicyArg,
    /// Requests that may wait for a batch slot; past it new requests get 429.
    #[arg(long, default_value_t = 1024, env = "TESSERA_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: usize,
    /// Criticality (Critical, Standard, Sheddable) of all requests, or `NAME=CLASS` for requests naming
    /// one served name. Under saturation Sheddable requests get 429; Critical ones may preempt others.
    #[arg(long, value_parser = parse_criticality, env = "TESSERA_CRITICALITY", value_delimiter = ',')]
    pub criticality: Vec<CriticalitySpec>,
    /// Seconds to finish in-flight requests after SIGTERM before ending them with an error.
    #[arg(long, default_value_t = 30.0, env = "TESSERA_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: f64,
    /// Serve HTTPS with this PEM certificate chain (needs --ssl-keyfile).
    #[arg(long, env = "TESSERA_SSL_CERTFILE")]
    pub ssl_certfile: Option<PathBuf>,
    /// The PEM private key of --ssl-certfile.
    #[arg(long, env = "TESSERA_SSL_KEYFILE")]
    pub ssl_keyfile: Option<PathBuf>,
    /// Reload the certificate and key when their files change.
    #[arg(long, env = "TESSERA_ENABLE_SSL_REFRESH")]
    pub enable_ssl_refresh: bool,
    /// Chat template: a file, or the template text itself.
    #[arg(long, env = "TESSERA_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Let the model decide to call tools (`tool_choice: "auto"`); needs --tool-call-parser.
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// How tool calls are read from the model's text: hermes, llama3_json, mistral, pythonic.
    #[arg(long, value_parser = parse_tool_parser)]
    pub tool_call_parser: Option<tessera_protocol::ToolParser>,
    /// Accepted for vLLM compatibility (requests are not logged by default).
    #[arg(long)]
    pub disable_log_requests: bool,
    /// Accepted for vLLM compatibility.
    #[arg(long)]
    pub enable_log_requests: bool,
    /// Accepted for vLLM compatibility.
    #[arg(long)]
    pub disable_uvicorn_access_log: bool,
    /// Accepted for vLLM compatibility.
    #[arg(long, num_args = 0..)]
    pub disable_access_log_for_endpoints: Vec<String>,
    /// Accepted for vLLM compatibility: one asynchronous front serves every connection, so
    /// there are no extra API server processes to start.
    #[arg(long, env = "TESSERA_API_SERVER_COUNT")]
    pub api_server_count: Option<usize>,
    /// CPU threads for the kernels (default: the CPUs this process may run on, after its
    /// affinity mask and cgroup quota). Every rank of the process shares them.
    #[arg(long, env = "TESSERA_NUM_THREADS")]
    pub threads: Option<usize>,
    /// Accepted for vLLM compatibility (nothing remote is ever executed).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Prefill/decode role, vLLM's `KVTransferConfig` JSON, e.g.
    /// `{"kv_connector":"TesseraConnector","kv_role":"kv_producer"}` (`kv_consumer`, `kv_both`).
    #[arg(long, value_parser = crate::kv_transfer::parse, env = "TESSERA_KV_TRANSFER_CONFIG")]
    pub kv_transfer_config: Option<crate::kv_transfer::KvTransferConfig>,
    /// Prefill workers a decode worker's built-in proxy may send prefill legs to when a request
    /// carries `x-prefiller-host-port`: hosts (any port), `host:port`, or DNS names whose
    /// addresses are trusted. Comma-separated; others get 403.
    #[arg(long, value_delimiter = ',', env = "TESSERA_TRUSTED_PREFILLERS")]
    pub trusted_prefillers: Vec<String>,
    /// Serve LoRA adapters as model names (`--lora-modules`; `/v1/load_lora_adapter` when
    /// VLLM_ALLOW_RUNTIME_LORA_UPDATING is true).
    #[arg(long, env = "TESSERA_ENABLE_LORA")]
    pub enable_lora: bool,
    /// Adapters to serve: `name=path` or `{"name": …, "path": …}` (a PEFT directory or a model
    /// URI); several after one flag, or the flag repeated.
    #[arg(long, num_args = 1.., value_parser = crate::lora::parse_module)]
    pub lora_modules: Vec<crate::lora::LoraModule>,
    /// `TESSERA_LORA_MODULES`: more `name=path` entries, comma-separated (how the operator
    /// passes adapters to a shell-form command).
    #[arg(long = "lora-modules-list", hide = true, env = "TESSERA_LORA_MODULES", value_delimiter = ',',
          value_parser = crate::lora::parse_module)]
    pub lora_modules_env: Vec<crate::lora::LoraModule>,
    /// Most distinct adapters in one batch.
    #[arg(long, default_value_t = 1, env = "TESSERA_MAX_LORAS")]
    pub max_loras: usize,
    /// Highest adapter rank accepted.
    #[arg(long, default_value_t = 16, env = "TESSERA_MAX_LORA_RANK")]
    pub max_lora_rank: usize,
    /// Adapters kept loaded (least recently used dropped, loaded again when named); default --max-loras.
    #[arg(long, env = "TESSERA_MAX_CPU_LORAS")]
    pub max_cpu_loras: Option<usize>,
}

impl ServeArgs {
    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    pub fn chunked_prefill(&self) -> bool {
        !self.no_enable_chunked_prefill
    }
}

/// vLLM's single-dash short forms (`-tp 2`, `-pp 2`) as their long flags, and its
/// underscore spellings of long flags (`--kv_transfer_config`, as KServe's samples write
/// it) with dashes, so that command lines written for `vllm serve` parse. Values are left
/// alone.
pub fn normalize_argv(argv: impl IntoIterator<Item = String>) -> Vec<String> {
    argv.into_iter()
        .map(|a| match a.as_str() {
            "-tp" => "--tensor-parallel-size".to_string(),
            "-pp" => "--pipeline-parallel-size".to_string(),
            long if long.starts_with("--") => match long.split_once('=') {
                Some((key, value)) => format!("{}={value}", key.replace('_', "-")),
                None => long.replace('_', "-"),
            },
            _ => a,
        })
        .collect()
}

/// Parse a byte size such as `2147483648`, `512M`, `2GiB`, `1.5G`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (examples: 2GiB, 512M, 1073741824)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("`{s}`: unknown size unit `{u}` (use K, M, G, KiB, MiB or GiB)")),
    };
    Ok((n * mult) as u64)
}

fn parse_tool_parser(s: &str) -> Result<tessera_protocol::ToolParser, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512M").unwrap(), 512_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3TB").is_err());
    }

    #[test]
    fn unknown_flag_is_named() {
        let e = Cli::try_parse_from(["tessera", "serve", "m", "--frobnicate"]).unwrap_err();
        assert!(e.to_string().contains("--frobnicate"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn criticality_specs() {
        use tessera_engine::Criticality;
        assert_eq!(
            parse_criticality("Sheddable").unwrap(),
            CriticalitySpec { name: None, class: Criticality::Sheddable }
        );
        assert_eq!(
            parse_criticality("publishers/ns/models/m=critical").unwrap(),
            CriticalitySpec { name: Some("publishers/ns/models/m".into()), class: Criticality::Critical }
        );
        assert!(parse_criticality("m=urgent").unwrap_err().contains("urgent"));
        assert!(parse_criticality("=Critical").is_err());
    }

    #[test]
    fn kserve_preset_args_parse() {
        let cli = Cli::try_parse_from([
            "tessera",
            "serve",
            "/mnt/models",
            "--served-model-name",
            "m",
            "publishers/ns/models/m",
            "--port",
            "8000",
            "--disable-log-requests",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command else { panic!("not serve") };
        assert_eq!(a.served_model_name, vec!["m", "publishers/ns/models/m"]);
        assert!(a.prefix_caching() && a.chunked_prefill());
    }

    /// The operator's prefill/decode presets and KServe's samples (underscore spelling).
    #[test]
    fn kv_transfer_config_parses_in_every_spelling() {
        let serve = |extra: &[&str]| {
            let argv = ["tessera", "serve", "/mnt/models"].iter().chain(extra).map(|s| s.to_string());
            match Cli::try_parse_from(normalize_argv(argv)) {
                Ok(Cli { command: Command::Serve(a), .. }) => Ok(a.kv_transfer_config),
                Ok(_) => panic!("not serve"),
                Err(e) => Err(e.to_string()),
            }
        };
        let producer = r#"{"kv_connector":"TesseraConnector","kv_role":"kv_producer"}"#;
        assert!(serve(&["--kv-transfer-config", producer]).unwrap().is_some_and(|c| c.produces()));
        let both = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;
        assert!(serve(&["--kv_transfer_config", both]).unwrap().is_some_and(|c| c.consumes()));
        let eq = format!("--kv_transfer_config={producer}");
        assert!(serve(&[&eq]).unwrap().is_some());
        assert_eq!(serve(&[]).unwrap(), None);
        // A value with underscores keeps them; a bad role names the flag and the value.
        let bad = serve(&["--kv-transfer-config", r#"{"kv_connector":"TesseraConnector","kv_role":"decode"}"#]);
        let e = bad.unwrap_err();
        assert!(e.contains("--kv-transfer-config") && e.contains("decode"), "{e}");
    }

    /// What KV transfer cannot run with is refused at start-up, naming the flags.
    #[test]
    fn kv_transfer_start_up_checks() {
        let check = |extra: &[&str]| {
            let argv = ["tessera", "serve", "/mnt/models"].iter().chain(extra).map(|s| s.to_string());
            match Cli::try_parse_from(normalize_argv(argv)) {
                Ok(Cli { command: Command::Serve(a), .. }) => {
                    crate::kv_transfer::validate(&a).map_err(|e| e.to_string())
                }
                other => panic!("not serve: {:?}", other.err()),
            }
        };
        let kv = |extra: &str| format!(r#"{{"kv_connector":"TesseraConnector","kv_role":"kv_both"{extra}}}"#);
        assert!(check(&["--kv-transfer-config", &kv("")]).is_ok());
        // Ranks in this pod move KV rank by rank.
        assert!(check(&["--kv-transfer-config", &kv(""), "--tensor-parallel-size", "2"]).is_ok());
        assert!(check(&["--kv-transfer-config", &kv(""), "--data-parallel-size", "2"]).is_ok());
        let port = check(&["--kv-transfer-config", &kv(r#","kv_port":8000"#), "--port", "8000"]).unwrap_err();
        assert!(port.contains("kv_port 8000"), "{port}");
        let pin = check(&["--kv-transfer-config", &kv(r#","kv_connector_extra_config":{"pin_timeout":"soon"}"#)]);
        assert!(pin.unwrap_err().contains("pin_timeout"));
        let trusted = check(&["--kv-transfer-config", &kv(""), "--trusted-prefillers", "10.0.0.7,prefill.svc:8000"]);
        assert!(trusted.is_ok());
    }

    /// vLLM's tool flags: the parser names, and `auto` without a parser refused at start-up.
    #[test]
    fn tool_flags() {
        let serve = |extra: &[&str]| {
            let argv = ["tessera", "serve", "/mnt/models"].iter().chain(extra).map(|s| s.to_string());
            match Cli::try_parse_from(normalize_argv(argv)) {
                Ok(Cli { command: Command::Serve(a), .. }) => crate::serve::validate(&a).map_err(|e| e.to_string()),
                Ok(_) => panic!("not serve"),
                Err(e) => Err(e.to_string()),
            }
        };
        for p in ["hermes", "llama3_json", "mistral", "pythonic"] {
            assert!(serve(&["--enable-auto-tool-choice", "--tool-call-parser", p]).is_ok(), "{p}");
        }
        let e = serve(&["--tool-call-parser", "xml"]).unwrap_err();
        assert!(e.contains("xml") && e.contains("hermes"), "{e}");
        let e = serve(&["--enable-auto-tool-choice"]).unwrap_err();
        assert!(e.contains("--tool-call-parser"), "{e}");
    }
}
