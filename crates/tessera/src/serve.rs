//! `tessera serve`: bind, start HTTP, load the model, attach it, wait for a signal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use tessera_engine::kv::transfer::KvStore;
use tessera_engine::{EngineConfig, EngineError, EngineHandle, Policy, SchedulerConfig};
use tessera_models::{PipelineParallel, TensorParallel};
use tessera_protocol::ModelDefaults;
use tessera_runner::{Executor, KvBlockStore, Worker};
use tessera_server::{AppState, ChatTemplate, ModelInfo, ServedModel};
use tokio::sync::oneshot;

use crate::args::{parse_bytes, DTypeArg, DeviceArg, PolicyArg, ServeArgs};
use crate::sizing::{size_engine, Sizing};
use crate::ServeError;

/// A started worker.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown_timeout: Duration,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Wait for SIGTERM / Ctrl-C, then drain (see [`Running::stop`]).
    pub async fn wait_for_signal(self) -> Result<(), ServeError> {
        shutdown_signal().await;
        tracing::info!(
            "shutting down: /health is 503, new requests get 503, finishing in-flight requests (up to {:.0}s)",
            self.shutdown_timeout.as_secs_f64()
        );
        self.stop().await
    }

    /// Drain: refuse new requests (503) while in-flight ones finish within `--shutdown-timeout`;
    /// past it, end the rest with an error event. Then close the listener and return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.state.set_draining();
        let engines = self.state.engines();
        let live = || engines.iter().map(|e| e.live_streams()).sum::<usize>();
        let deadline = Instant::now() + self.shutdown_timeout;
        while live() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = live();
        if left > 0 {
            tracing::warn!("shutdown timeout: ending {left} unfinished request(s) with an error");
            for e in &engines {
                e.abort_all(EngineError::Shutdown(
                    "the server shut down before this request finished (--shutdown-timeout elapsed)".into(),
                ));
            }
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Open responses now end promptly (finished or errored); do not wait forever on a stuck client.
        match tokio::time::timeout(Duration::from_secs(10), &mut self.server).await {
            Ok(Ok(r)) => r.map_err(ServeError::Io),
            Ok(Err(e)) => Err(ServeError::Config(format!("server task failed: {e}"))),
            Err(_) => {
                tracing::warn!("connections still open 10s after draining; closing them");
                self.server.abort();
                Ok(())
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn served_names(a: &ServeArgs) -> Vec<String> {
    if a.served_model_name.is_empty() {
        vec![a.model.clone()]
    } else {
        a.served_model_name.clone()
    }
}

pub(crate) fn validate(a: &ServeArgs) -> Result<(), ServeError> {
    let bad = |m: String| Err(ServeError::Config(m));
    if a.block_size == 0 {
        return bad("--block-size must be at least 1".into());
    }
    if a.max_num_seqs == 0 {
        return bad("--max-num-seqs must be at least 1".into());
    }
    if !(a.rank_join_timeout.is_finite() && a.rank_join_timeout > 0.0) {
        return bad(format!("--rank-join-timeout must be a number of seconds > 0, got {}", a.rank_join_timeout));
    }
    if a.tensor_parallel_size == 0 {
        return bad("--tensor-parallel-size must be at least 1".into());
    }
    if a.data_parallel_size == 0 {
        return bad("--data-parallel-size must be at least 1".into());
    }
    crate::dp::validate(a)?;
    crate::kv_transfer::validate(a)?;
    crate::lora::validate(a)?;
    if a.pipeline_parallel_size == 0 {
        return bad("--pipeline-parallel-size must be at least 1".into());
    }
    if a.max_num_batched_tokens == 0 {
        return bad("--max-num-batched-tokens must be at least 1".into());
    }
    if !(0.0..=1.0).contains(&a.gpu_memory_utilization) || a.gpu_memory_utilization == 0.0 {
        return bad(format!("--gpu-memory-utilization must be in (0, 1], got {}", a.gpu_memory_utilization));
    }
    parse_bytes(&a.kv_cache_memory).map_err(|e| ServeError::Config(format!("--kv-cache-memory: {e}")))?;
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        return bad(format!("--shutdown-timeout must be a number of seconds >= 0, got {}", a.shutdown_timeout));
    }
    if a.enable_auto_tool_choice && a.tool_call_parser.is_none() {
        return bad(
            "--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral, pythonic)".into()
        );
    }
    if a.max_queued_requests == 0 {
        return bad("--max-queued-requests must be at least 1".into());
    }
    if a.threads == Some(0) {
        return bad("--threads must be at least 1".into());
    }
    let mut names = served_names(a);
    names.extend(crate::lora::module_names(a));
    for c in &a.criticality {
        if let Some(n) = c.name.as_ref().filter(|n| !names.contains(n)) {
            return bad(format!(
                "--criticality names `{n}`, which is not a served model name or LoRA adapter ({})",
                names.join(", ")
            ));
        }
    }
    Ok(())
}

/// The structured-output compiler over the served tokenizer, or `None` (logged) when the
/// tokenizer cannot back one: requests asking for a structured output then get a clear 400.
fn grammars(tok: &tessera_loader::TokenizerBundle, vocab: usize) -> Option<tessera_grammar::Grammars> {
    let started = std::time::Instant::now();
    match tessera_grammar::Grammars::new(&tok.tokenizer, vocab, &tok.eos_token_ids) {
        Ok(g) => {
            tracing::info!("structured outputs: llguidance over {vocab} tokens, ready in {:?}", started.elapsed());
            Some(g)
        }
        Err(e) => {
            tracing::warn!("structured outputs are off: {e}");
            None
        }
    }
}

fn pick_device(d: DeviceArg) -> Result<Device, ServeError> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        // One candle device per GPU for the whole process (see `ranks::gpu`).
        DeviceArg::Auto if candle_core::utils::cuda_is_available() => Ok(crate::ranks::gpu(0).unwrap_or(Device::Cpu)),
        DeviceArg::Auto => Ok(Device::Cpu),
        DeviceArg::Cuda => crate::ranks::gpu(0).map_err(|e| ServeError::Config(format!("--device cuda: {e}"))),
    }
}

pub(crate) fn pick_dtype(d: DTypeArg, dev: &Device) -> DType {
    match d {
        DTypeArg::Auto if dev.is_cpu() => DType::F32,
        DTypeArg::Auto => DType::BF16,
        DTypeArg::Bfloat16 => DType::BF16,
        DTypeArg::Float16 => DType::F16,
        DTypeArg::Float32 => DType::F32,
    }
}

fn chat_template(
    arg: Option<&str>,
    bundle: &tessera_loader::TokenizerBundle,
) -> Result<Option<ChatTemplate>, ServeError> {
    let source = match arg {
        Some(a) if Path::new(a).is_file() => {
            Some(std::fs::read_to_string(a).map_err(|e| ServeError::Config(format!("--chat-template {a}: {e}")))?)
        }
        Some(a) => Some(a.to_string()),
        None => bundle.chat_template.clone(),
    };
    source
        .map(|s| ChatTemplate::new(&s, bundle.bos_token.clone(), bundle.eos_token.clone()).map_err(ServeError::Config))
        .transpose()
}

/// The local path of the model: the argument itself, or the cache folder a remote URI is
/// mirrored into (resolved once per process).
pub(crate) fn model_path(a: &ServeArgs) -> Result<std::path::PathBuf, ServeError> {
    let mut opts = tessera_source::SourceOptions::new(a.download_dir.clone());
    // A pod of a LeaderWorkerSet group downloads only its own ranks' slices.
    opts.share = 1.0 / crate::ranks::Topology::placement()?.0.max(1) as f64;
    Ok(tessera_source::resolve(&a.model, &opts)?)
}

fn rank_setup(
    a: &ServeArgs,
    sz: &Sizing,
    dtype: DType,
    device: &Device,
) -> Result<crate::ranks::RankSetup, ServeError> {
    Ok(crate::ranks::RankSetup {
        model: model_path(a)?,
        dtype,
        device: device.clone(),
        max_model_len: sz.max_model_len,
        num_blocks: sz.num_blocks,
        kv_dtype: sz.kv_dtype,
        block_size: a.block_size,
        tp: a.tensor_parallel_size,
        pp: a.pipeline_parallel_size,
        expert_parallel: a.enable_expert_parallel,
        // Data-parallel pods hold whole replicas: their ranks meet inside the pod.
        topology: if crate::dp::multi_pod(a) {
            crate::ranks::Topology::single_pod()?
        } else {
            crate::ranks::Topology::from_env(a.rendezvous_port)?
        },
        join_timeout: Duration::from_secs_f64(a.rank_join_timeout),
        experts: None,
        local: None,
        kv_caches: None,
    })
    .map(|mut s| {
        // A new group per replica: every rank a thread here unless the group spans pods.
        if s.topology.group_size == 1 {
            s.local = Some(tessera_parallel::ShmHub::new(s.tp * s.pp));
        }
        s
    })
}

/// A LeaderWorkerSet worker pod (or `--headless`): host this pod's ranks, serve no HTTP,
/// return when the group ends.
pub fn run_worker_pod(a: &ServeArgs) -> Result<(), ServeError> {
    validate(a)?;
    let device = pick_device(a.device)?;
    let dtype = pick_dtype(a.dtype, &device);
    let cfg = tessera_loader::open(&model_path(a)?, dtype, &device)?.config;
    let sz = size_engine(a, &cfg, dtype, &device)?;
    crate::ranks::run_worker_pod(&rank_setup(a, &sz, dtype, &device)?)
}

/// Whether this process is a worker pod of a multi-pod group (or asked to be headless).
pub fn is_worker_pod(a: &ServeArgs) -> Result<bool, ServeError> {
    let (_, index, _) = crate::ranks::Topology::placement()?;
    if a.headless && index == 0 {
        return Err(ServeError::Config(
            "--headless is for worker pods (LWS_WORKER_INDEX > 0); the leader serves HTTP".into(),
        ));
    }
    Ok(index > 0)
}

/// This pod's engines (data-parallel replicas) and what the HTTP front needs of the model.
pub(crate) struct LocalEngines {
    pub engines: Vec<EngineHandle>,
    pub tok: tessera_loader::TokenizerBundle,
    pub cfg: tessera_models::ModelConfig,
    /// The KV-transfer identity (with `--kv-transfer-config`).
    pub kv: Option<tessera_server::KvInfo>,
}

/// Load the model, size the KV cache and start `count` engines, each with its own scheduler,
/// KV cache and ranks. Blocking.
pub(crate) fn start_engines(a: &ServeArgs, count: usize) -> Result<LocalEngines, ServeError> {
    let t0 = std::time::Instant::now();
    let device = pick_device(a.device)?;
    let dtype = pick_dtype(a.dtype, &device);
    let lm = tessera_loader::open(&model_path(a)?, dtype, &device)?;
    let cfg = lm.config.clone();
    let sz = size_engine(a, &cfg, dtype, &device)?;
    let (max_model_len, num_blocks, per_block) = (sz.max_model_len, sz.num_blocks, sz.per_block);
    let tp = a.tensor_parallel_size;
    tracing::info!(
        "KV cache: {num_blocks} blocks of {} tokens ({} tokens, {:.1} MiB per rank, {:?}); maximum concurrency at max_model_len={max_model_len}: {:.2}x",
        a.block_size,
        num_blocks * a.block_size,
        (num_blocks * per_block) as f64 / (1024.0 * 1024.0),
        sz.kv_dtype,
        (num_blocks * a.block_size) as f64 / max_model_len as f64
    );
    let experts = crate::dp::expert_rendezvous(a, &cfg)?;
    // With KV transfer: each replica's KV memory, as the transfer service reaches it.
    let kv_stores: std::sync::Mutex<Vec<Option<KvStore>>> = std::sync::Mutex::new((0..count).map(|_| None).collect());
    let keep_store = |i: usize, store: KvStore| kv_stores.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(store);
    let registry = || a.kv_transfer_config.as_ref().map(|_| crate::ranks::KvRegistry::default());
    // Replica `i` of this pod, built from `weights`.
    let make_executor =
        |i: usize, weights: &dyn tessera_models::WeightSource| -> Result<Box<dyn Executor>, ServeError> {
            Ok(if let Some(rendezvous) = &experts {
                let mut setup = rank_setup(a, &sz, dtype, &device)?;
                setup.experts = Some(crate::ranks::ExpertGroup {
                    meet: rendezvous.clone(),
                    dp_rank: a.data_parallel_start_rank + i,
                    dp_size: a.data_parallel_size,
                });
                setup.kv_caches = registry();
                let leader = crate::ranks::start_leader(&setup, &cfg, weights)?;
                if let Some(reg) = &setup.kv_caches {
                    keep_store(i, crate::kv_transfer::ranks_store(reg, setup.topology.group_size, tp, &cfg)?);
                }
                leader
            } else if tp * a.pipeline_parallel_size == 1 {
                let (tp, pp) = (TensorParallel::single(), PipelineParallel::single());
                let model = tessera_models::load_model(&cfg, weights, max_model_len, dtype, &device, tp, pp)?;
                let worker = Worker::from_model(model, num_blocks, a.block_size, sz.kv_dtype)?;
                crate::ranks::log_kernel_checks(worker.model());
                if a.kv_transfer_config.is_some() {
                    let store: Arc<dyn KvBlockStore> = Arc::new(worker.kv_cache());
                    keep_store(i, KvStore::Shared(store));
                }
                Box::new(worker)
            } else {
                if matches!(lm.format, tessera_loader::ModelFormat::Gguf(_)) {
                    tracing::info!(
                        "parallel ranks over quantized GGUF weights: shards are cut block-exactly from the quantized \
                     tensors (dequantized only where a cut splits quantization blocks)"
                    );
                }
                let mut setup = rank_setup(a, &sz, dtype, &device)?;
                setup.kv_caches = registry();
                let leader = crate::ranks::start_leader(&setup, &cfg, weights)?;
                if let Some(reg) = &setup.kv_caches {
                    keep_store(i, crate::kv_transfer::ranks_store(reg, setup.topology.group_size, tp, &cfg)?);
                }
                leader
            })
        };
    if a.data_parallel_size > 1 && !crate::dp::multi_pod(a) && crate::ranks::Topology::placement()?.0 > 1 {
        return Err(ServeError::Config(
            "--data-parallel-size > 1 with every replica in this pod cannot run under a LeaderWorkerSet group \
             (replicas would share one rendezvous); set --data-parallel-size-local to spread replicas over the pods"
                .into(),
        ));
    }
    let executors: Vec<Box<dyn Executor>> = if experts.is_some() {
        // The replicas meet in one expert group, so they are built side by side (each thread
        // maps the weights itself: a weight source is not shared across threads).
        std::thread::scope(|scope| {
            let built: Vec<_> = (0..count)
                .map(|i| {
                    let (make, device) = (&make_executor, &device);
                    scope.spawn(move || {
                        let own = tessera_loader::open(&model_path(a)?, dtype, device)?;
                        make(i, own.weights.as_ref())
                    })
                })
                .collect();
            built
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(ServeError::Config("a replica's loader panicked".into()))))
                .collect::<Result<_, _>>()
        })?
    } else {
        (0..count).map(|i| make_executor(i, lm.weights.as_ref())).collect::<Result<_, _>>()?
    };
    drop(lm.weights);
    let tok = lm.tokenizer;
    let engine_cfg = EngineConfig {
        max_model_len,
        num_blocks,
        block_size: a.block_size,
        enable_prefix_caching: a.prefix_caching(),
        scheduler: SchedulerConfig {
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            enable_chunked_prefill: a.chunked_prefill(),
            policy: match a.scheduling_policy {
                PolicyArg::Fcfs => Policy::Fcfs,
                PolicyArg::Priority => Policy::Priority,
            },
            max_loras: a.max_loras,
        },
        max_cpu_loras: crate::lora::resident(a),
        max_queued_requests: a.max_queued_requests,
        grammars: grammars(&tok, cfg.vocab_size),
    };
    let stores = kv_stores.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut links = Vec::with_capacity(count);
    for (i, store) in stores.into_iter().enumerate() {
        links.push(match (&a.kv_transfer_config, store) {
            (Some(c), Some(store)) => Some(crate::kv_transfer::link(a, c, &cfg, sz.kv_dtype, store, i)?),
            _ => None,
        });
    }
    let kv = a.kv_transfer_config.as_ref().map(|c| crate::kv_transfer::info(a, c));
    let engines = executors
        .into_iter()
        .zip(links)
        .map(|(ex, link)| {
            let (tokenizer, eos) = (tok.tokenizer.clone(), tok.eos_token_ids.clone());
            tessera_engine::spawn(engine_cfg.clone(), ex, tokenizer, eos, link)
        })
        .collect();
    tracing::info!(
        "model {} ({}, {} layers) loaded in {:.1}s on {:?}: {count} engine(s)",
        a.model,
        cfg.architecture,
        cfg.num_layers,
        t0.elapsed().as_secs_f64(),
        device
    );
    Ok(LocalEngines { engines, tok, cfg, kv })
}

/// Load the model and start its engines: every data-parallel replica of this pod, plus the
/// replicas of other pods once they have joined; also the model's config (a generating
/// model's). Blocking (run it off the runtime).
pub fn load_model(a: &ServeArgs) -> Result<(ServedModel, Option<tessera_models::ModelConfig>), ServeError> {
    let path = model_path(a)?;
    if crate::embed::wanted(a, &path) {
        if a.enable_lora {
            return Err(ServeError::Config("--enable-lora serves generating models, not embeddings".into()));
        }
        return Ok((crate::embed::load(a, &path)?, None));
    }
    // Bound first, so worker pods can join while this pod loads.
    let remote = crate::dp::listen(a)?;
    let LocalEngines { mut engines, tok, cfg, kv } = start_engines(a, crate::dp::local_replicas(a))?;
    if let Some(listener) = remote {
        engines.extend(crate::dp::accept(a, &listener)?);
    }
    if engines.len() > 1 {
        tracing::info!("data parallel: {} engine replicas behind one HTTP front (least-loaded first)", engines.len());
    }
    let template = chat_template(a.chat_template.as_deref(), &tok)?;
    let engine = engines.remove(0);
    let served = ServedModel {
        engine: Some(engine),
        replicas: engines,
        tokenizer: std::sync::Arc::new(tok.tokenizer),
        chat_template: template,
        defaults: ModelDefaults {
            temperature: tok.defaults.temperature,
            top_p: tok.defaults.top_p,
            top_k: tok.defaults.top_k,
        },
        vocab_size: cfg.vocab_size,
        kv,
        tools: tessera_server::ToolSupport { auto: a.enable_auto_tool_choice, parser: a.tool_call_parser },
        embedder: None,
    };
    Ok((served, Some(cfg)))
}

/// Size the process's compute pool (once: later workers of the same process share it) and
/// log the kernels' instruction set.
pub(crate) fn configure_threads(threads: Option<usize>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // `available_parallelism` follows the affinity mask and the cgroup CPU quota.
        let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            tracing::warn!("compute pool already set up ({e}); --threads {n} not applied");
        }
        tracing::info!(
            "kernels: {}; {} compute threads",
            tessera_kernels::Isa::active().describe(),
            rayon::current_num_threads()
        );
    });
}

/// Bind, serve HTTP (503 until loaded), load the model and attach it.
pub async fn launch(a: ServeArgs) -> Result<Running, ServeError> {
    validate(&a)?;
    configure_threads(a.threads);
    if let Some(kv) = &a.kv_transfer_config {
        if kv.kv_connector != crate::kv_transfer::CONNECTOR {
            tracing::warn!("kv_connector {} is served by {}", kv.kv_connector, crate::kv_transfer::CONNECTOR);
        }
    }
    let mut info = ModelInfo::new(served_names(&a), a.model.clone());
    for c in &a.criticality {
        match &c.name {
            Some(n) => {
                info.criticality.insert(n.clone(), c.class);
            }
            None => info.default_criticality = c.class,
        }
    }
    let model_cfg = Arc::new(std::sync::OnceLock::new());
    info.lora = crate::lora::registry(&a, model_cfg.clone());
    let lora = info.lora.clone();
    let state = AppState::new(info);
    let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let stop = async move {
        let _ = rx.await;
    };
    let app = tessera_server::app(state.clone());
    let server = match (&a.ssl_certfile, &a.ssl_keyfile) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::TlsListener::new(listener, cert.clone(), key.clone(), a.enable_ssl_refresh)?;
            tracing::info!("listening on https://{addr} (certificate reload: {})", a.enable_ssl_refresh);
            tokio::spawn(async move { axum::serve(tls, app).with_graceful_shutdown(stop).await })
        }
        (None, None) => {
            tracing::info!("listening on http://{addr}");
            tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop).await })
        }
        _ => return Err(ServeError::Config("--ssl-certfile and --ssl-keyfile go together".into())),
    };
    let args = a.clone();
    let model = tokio::task::spawn_blocking(move || {
        let (model, cfg) = load_model(&args)?;
        if let (Some(cfg), Some(reg)) = (cfg, lora) {
            let _ = model_cfg.set(cfg);
            crate::lora::register_modules(&args, &reg)?;
        }
        Ok::<_, ServeError>(model)
    })
    .await
    .map_err(|e| ServeError::Config(format!("model loading task failed: {e}")))??;
    state.attach(model);
    let shutdown_timeout = Duration::from_secs_f64(a.shutdown_timeout);
    Ok(Running { addr, state, shutdown_timeout, shutdown: Some(tx), server })
}
