//! Tensor-parallel ranks. Rank 0 is the engine's executor; the other ranks of this pod run on
//! their own threads, and under a LeaderWorkerSet the ranks of worker pods join over the
//! network. Threads rather than processes inside a pod because on one CPU device the ranks
//! share the process's memory-mapped weights and there is nothing to isolate; ranks that
//! are all threads of this process talk through shared memory ([`ShmHub`]), a group that
//! spans pods over TCP — the same `Communicator` either way.
//!
//! Topology: `LWS_GROUP_SIZE` pods, this one `LWS_WORKER_INDEX` (0 = leader, which serves
//! HTTP), each hosting `tp / group` consecutive ranks; rank 0's rendezvous listens on the
//! leader at `--rendezvous-port`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use candle_core::{DType, Device};
use tessera_models::{CausalLm, Communicator, PipelineParallel, TensorParallel, WeightSource};
use tessera_parallel::{ShmHub, SubGroup, TcpComm};
use tessera_runner::{follow_plans, Executor, LockstepExecutor, TensorParallelExecutor, Worker};

use crate::ServeError;

/// Where this process sits in the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Pods in the group (1 without LeaderWorkerSet).
    pub group_size: usize,
    /// This pod's index; 0 serves HTTP.
    pub index: usize,
    /// `host:port` of rank 0's rendezvous.
    pub leader: String,
}

impl Topology {
    /// The LeaderWorkerSet placement (`LWS_GROUP_SIZE`, `LWS_WORKER_INDEX`,
    /// `LWS_LEADER_ADDRESS`): (pods in the group, this pod's index, the leader's host). A
    /// single pod is `(1, 0, None)`. Reads the environment only.
    pub fn placement() -> Result<(usize, usize, Option<String>), ServeError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num =
            |k: &str, v: String| v.parse::<usize>().map_err(|_| ServeError::Config(format!("{k}={v} is not a number")));
        let group_size = var("LWS_GROUP_SIZE").map(|v| num("LWS_GROUP_SIZE", v)).transpose()?.unwrap_or(1);
        if group_size <= 1 {
            return Ok((1, 0, None));
        }
        let index = var("LWS_WORKER_INDEX").map(|v| num("LWS_WORKER_INDEX", v)).transpose()?.unwrap_or(0);
        if index >= group_size {
            return Err(ServeError::Config(format!(
                "LWS_WORKER_INDEX={index} is not below LWS_GROUP_SIZE={group_size}"
            )));
        }
        let host = var("LWS_LEADER_ADDRESS")
            .ok_or_else(|| ServeError::Config("LWS_GROUP_SIZE > 1 needs LWS_LEADER_ADDRESS".into()))?;
        Ok((group_size, index, Some(host)))
    }

    /// Where one replica's ranks meet: the leader at `rendezvous_port` under LeaderWorkerSet,
    /// or a free loopback port for a single pod (several workers or replicas may share a host).
    pub fn from_env(rendezvous_port: u16) -> Result<Self, ServeError> {
        match Self::placement()? {
            (group_size, index, Some(h)) => Ok(Self { group_size, index, leader: format!("{h}:{rendezvous_port}") }),
            _ => Self::single_pod(),
        }
    }

    /// Every rank in this process, meeting on a free loopback port.
    pub fn single_pod() -> Result<Self, ServeError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())?.port();
        Ok(Self { group_size: 1, index: 0, leader: format!("127.0.0.1:{port}") })
    }

    /// The global ranks this pod hosts, or an error when `tp` does not spread evenly.
    pub fn local_ranks(&self, tp: usize) -> Result<std::ops::Range<usize>, ServeError> {
        if !tp.is_multiple_of(self.group_size) {
            return Err(ServeError::Config(format!(
                "{tp} ranks (tensor x pipeline parallel size) do not spread evenly over LWS_GROUP_SIZE={} pods",
                self.group_size
            )));
        }
        let per = tp / self.group_size;
        Ok(self.index * per..(self.index + 1) * per)
    }
}

/// What every rank needs to build its share of the model.
#[derive(Clone)]
pub(crate) struct RankSetup {
    pub model: PathBuf,
    pub dtype: DType,
    pub device: Device,
    pub max_model_len: usize,
    pub num_blocks: usize,
    /// Element type of the KV cache (`--kv-cache-dtype`).
    pub kv_dtype: DType,
    pub block_size: usize,
    pub tp: usize,
    pub pp: usize,
    /// `--enable-expert-parallel`: MoE experts split whole over each stage's tensor group.
    pub expert_parallel: bool,
    pub topology: Topology,
    pub join_timeout: Duration,
    /// Data-parallel expert parallelism: the expert group spans every replica.
    pub experts: Option<ExpertGroup>,
    /// Set when every rank of the replica is a thread of this process: they share memory.
    pub local: Option<ShmHub>,
    /// With KV transfer: every local rank leaves a handle on its KV memory here.
    pub kv_caches: Option<KvRegistry>,
}

/// (rank, KV memory) of the ranks of this pod.
pub(crate) type KvRegistry = Arc<std::sync::Mutex<Vec<(usize, tessera_models::KvCache)>>>;

fn register(s: &RankSetup, rank: usize, w: &Worker) {
    if let Some(reg) = &s.kv_caches {
        reg.lock().unwrap_or_else(|p| p.into_inner()).push((rank, w.kv_cache()));
    }
}

/// Where ranks meet: threads of this process share memory; ranks in other pods use TCP.
#[derive(Clone)]
pub(crate) enum Meet {
    Local(ShmHub),
    Tcp(String),
}

impl Meet {
    fn join(&self, rank: usize, world: usize, s: &RankSetup) -> Result<Arc<dyn Communicator>, ServeError> {
        if s.device.is_cuda() {
            return Err(ServeError::Config(
                "data-parallel expert parallelism across replicas runs on CPU ranks only (GPU ranks meet over NCCL \
                 within one replica)"
                    .into(),
            ));
        }
        Ok(match self {
            Meet::Local(hub) => Arc::new(hub.join(rank, s.device.clone())?),
            Meet::Tcp(at) => Arc::new(TcpComm::join(rank, world, at, s.join_timeout, s.device.clone())?),
        })
    }
}

/// Where the ranks of every data-parallel replica meet to form the expert group.
#[derive(Clone)]
pub(crate) struct ExpertGroup {
    pub meet: Meet,
    pub dp_rank: usize,
    pub dp_size: usize,
}

/// (rank, outcome) reports of follower threads: first their load, then how they ended.
type RankReports = mpsc::Receiver<(usize, Result<(), String>)>;

/// How long the other ranks may take to load before start-up fails.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The process's one candle device per GPU: candle gives each `Device::new_cuda` call a new
/// identity, and tensors of two identities cannot meet in one op.
pub(crate) fn gpu(ordinal: usize) -> Result<Device, ServeError> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = gpus.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda(ordinal).map_err(|e| {
        ServeError::Config(format!("GPU {ordinal}: {e} (this build needs the `cuda` feature and a GPU)"))
    })?;
    gpus.insert(ordinal, d.clone());
    Ok(d)
}

/// `s` for global rank `rank`: on GPUs each rank of this pod drives its own GPU (ordinal =
/// its index among the pod's ranks); on the CPU every rank shares the device.
fn for_rank(s: &RankSetup, rank: usize) -> Result<RankSetup, ServeError> {
    if !s.device.is_cuda() {
        return Ok(s.clone());
    }
    let local = s.topology.local_ranks(s.tp * s.pp)?;
    Ok(RankSetup { device: gpu(rank.saturating_sub(local.start))?, ..s.clone() })
}

/// How long one NCCL operation may take before the communicator is aborted (a peer is gone
/// or hung): long enough for the largest prefill's collectives, short enough to fail a step.
#[cfg(feature = "cuda")]
const NCCL_OP_TIMEOUT: Duration = Duration::from_secs(120);

fn join(s: &RankSetup, rank: usize) -> Result<Arc<dyn Communicator>, ServeError> {
    let world = s.tp * s.pp;
    if s.device.is_cuda() {
        // GPU ranks (threads of this pod or in other pods) meet over NCCL, its id passed
        // through the TCP rendezvous at the leader.
        #[cfg(feature = "cuda")]
        return Ok(Arc::new(tessera_parallel::NcclComm::join(
            rank,
            world,
            &s.topology.leader,
            s.join_timeout,
            NCCL_OP_TIMEOUT,
            &s.device,
        )?));
        #[cfg(not(feature = "cuda"))]
        return Err(ServeError::Config("GPU ranks need a build with the `cuda` feature".into()));
    }
    match &s.local {
        Some(hub) => Meet::Local(hub.clone()).join(rank, world, s),
        None => Meet::Tcp(s.topology.leader.clone()).join(rank, world, s),
    }
}

/// A world rank's tensor group (its pipeline stage's ranks) and pipeline position.
fn groups(s: &RankSetup, world: Arc<dyn Communicator>) -> Result<(TensorParallel, PipelineParallel), ServeError> {
    let ep = s.expert_parallel;
    if let Some(g) = &s.experts {
        // Ranks of replica r are r*tp.. in the expert group (pipeline parallel is refused).
        let rank = g.dp_rank * s.tp + world.rank();
        let experts = g.meet.join(rank, g.dp_size * s.tp, s)?;
        return Ok((TensorParallel::new(world).with_expert_group(experts), PipelineParallel::single()));
    }
    if s.pp == 1 {
        return Ok((TensorParallel::new(world).with_expert_parallel(ep), PipelineParallel::single()));
    }
    let stage = world.rank() / s.tp;
    let members: Vec<usize> = (stage * s.tp..(stage + 1) * s.tp).collect();
    let sub = SubGroup::new(world.clone(), members, s.device.clone())?;
    let tp = TensorParallel::new(Arc::new(sub)).with_expert_parallel(ep);
    Ok((tp, PipelineParallel::new(world, stage, s.pp, s.tp)))
}

fn build(
    s: &RankSetup,
    cfg: &tessera_models::ModelConfig,
    weights: &dyn WeightSource,
    world: Arc<dyn Communicator>,
) -> Result<Worker, ServeError> {
    let (tp, pp) = groups(s, world)?;
    let model = tessera_models::load_model(cfg, weights, s.max_model_len, s.dtype, &s.device, tp, pp)?;
    let worker = Worker::from_model(model, s.num_blocks, s.block_size, s.kv_dtype)?;
    log_kernel_checks(worker.model());
    Ok(worker)
}

/// Log what the start-up check decided for each fused kernel (a refused one is a warning).
pub(crate) fn log_kernel_checks(model: &dyn CausalLm) {
    for r in model.kernel_reports() {
        let (op, kernel) = (r.op.as_str(), r.kernel);
        if r.fused {
            tracing::info!(op, kernel, "fused kernel checked against its reference: {}", r.reason);
        } else if r.kernel != "none" {
            tracing::warn!(op, kernel, "fused kernel refused, using the reference: {}", r.reason);
        }
    }
}

fn rank_worker(s: &RankSetup, comm: Arc<dyn Communicator>) -> Result<Worker, ServeError> {
    let lm = tessera_loader::open(&s.model, s.dtype, &s.device)?;
    build(s, &lm.config, lm.weights.as_ref(), comm)
}

/// Start the follower ranks of this pod on threads; each reports (rank, load result) on the
/// returned channel, then follows plans until the group ends.
fn spawn_followers(s: &RankSetup, ranks: impl Iterator<Item = usize>) -> Result<RankReports, ServeError> {
    let (tx, rx) = mpsc::channel();
    for rank in ranks {
        let (s, tx) = (s.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("tessera-rank-{rank}"))
            .spawn(move || {
                let built = for_rank(&s, rank)
                    .and_then(|s| join(&s, rank).and_then(|c| rank_worker(&s, c.clone()).map(|w| (w, c))));
                match built {
                    Ok((w, comm)) => {
                        register(&s, rank, &w);
                        let _ = tx.send((rank, Ok(())));
                        let end = follow_plans(w, comm);
                        if let Err(e) = &end {
                            tracing::error!("tensor-parallel rank {rank} stopped: {e}");
                        }
                        let _ = tx.send((rank, end.map_err(|e| e.to_string())));
                    }
                    Err(e) => {
                        let _ = tx.send((rank, Err(e.to_string())));
                    }
                }
            })
            .map_err(ServeError::Io)?;
    }
    Ok(rx)
}

fn wait_loaded(rx: &RankReports, n: usize) -> Result<(), ServeError> {
    for _ in 0..n {
        match rx.recv_timeout(LOAD_TIMEOUT) {
            Ok((_, Ok(()))) => {}
            Ok((rank, Err(e))) => return Err(ServeError::Config(format!("tensor-parallel rank {rank} failed: {e}"))),
            Err(_) => {
                return Err(ServeError::Config(format!("tensor-parallel ranks did not load within {LOAD_TIMEOUT:?}")))
            }
        }
    }
    Ok(())
}

/// On the leader pod: start this pod's other ranks, build rank 0 from `weights`, and return
/// rank 0's executor once every local rank has joined and loaded (remote ranks are waited
/// for by the rendezvous, which names any that never arrive).
pub(crate) fn start_leader(
    s: &RankSetup,
    cfg: &tessera_models::ModelConfig,
    weights: &dyn WeightSource,
) -> Result<Box<dyn Executor>, ServeError> {
    let local = s.topology.local_ranks(s.tp * s.pp)?;
    let rx = spawn_followers(s, local.clone().skip(1))?;
    let s0 = for_rank(s, 0)?;
    let c0 = join(&s0, 0)?;
    let worker = build(&s0, cfg, weights, c0.clone())?;
    register(s, 0, &worker);
    wait_loaded(&rx, local.len() - 1)?;
    tracing::info!(
        "parallel: tensor {} x pipeline {} ranks over {} pod(s), rendezvous at {}",
        s.tp,
        s.pp,
        s.topology.group_size,
        s.topology.leader
    );
    let Some(g) = &s.experts else { return Ok(Box::new(TensorParallelExecutor::new(worker, c0))) };
    // The replicas' rank 0s agree on every step (see `LockstepExecutor`).
    let experts = worker.model().tensor_parallel().expert_comm().clone();
    let members = (0..g.dp_size).map(|r| r * s.tp).collect();
    let leaders = SubGroup::new(experts.clone(), members, s.device.clone())?;
    tracing::info!(
        "data-parallel expert parallelism: replica {} of {}, experts split over {} ranks, replicas step together",
        g.dp_rank,
        g.dp_size,
        g.dp_size * s.tp
    );
    let inner = Box::new(TensorParallelExecutor::new(worker, c0));
    Ok(Box::new(LockstepExecutor::new(inner, Arc::new(leaders), experts)))
}

/// On a worker pod: run this pod's ranks until the group ends; an error names the rank.
pub(crate) fn run_worker_pod(s: &RankSetup) -> Result<(), ServeError> {
    let local = s.topology.local_ranks(s.tp * s.pp)?;
    let rx = spawn_followers(s, local.clone())?;
    wait_loaded(&rx, local.len())?;
    tracing::info!(
        "worker pod {}: ranks {local:?} joined {} and follow its plans",
        s.topology.index,
        s.topology.leader
    );
    for _ in local.clone() {
        if let Ok((rank, Err(e))) = rx.recv() {
            return Err(ServeError::Config(format!("tensor-parallel rank {rank} stopped: {e}")));
        }
    }
    Ok(())
}
