//! Local tensor-parallel ranks: rank 0 (the engine's executor) plus ranks 1.. on their own
//! threads, talking over the CPU back-end on loopback — the same code path as ranks in
//! separate processes. Threads, not processes, because on one CPU device the ranks share the
//! process's memory-mapped weights and there is nothing to isolate; the communication is the
//! same TCP mesh either way.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use candle_core::{DType, Device};
use tessera_models::{Communicator, Llama, TensorParallel, WeightSource};
use tessera_parallel::TcpComm;
use tessera_runner::{follow_plans, Executor, TensorParallelExecutor, Worker};

use crate::ServeError;

/// What every rank needs to build its share of the model.
#[derive(Clone)]
pub(crate) struct RankSetup {
    pub model: PathBuf,
    pub dtype: DType,
    pub device: Device,
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// How long the other ranks may take to load before start-up fails.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

fn rank_worker(s: &RankSetup, comm: Arc<dyn Communicator>) -> Result<Worker, ServeError> {
    let lm = tessera_loader::open(&s.model, s.dtype, &s.device)?;
    let model = Llama::load_parallel(
        &lm.config,
        lm.weights.as_ref(),
        s.max_model_len,
        s.dtype,
        &s.device,
        TensorParallel::new(comm),
    )?;
    Ok(Worker::new(model, s.num_blocks, s.block_size)?)
}

/// Start ranks `1..tp` and build rank 0 from `weights`; returns rank 0's executor once every
/// rank has loaded, or an error naming the rank that could not.
pub(crate) fn start(
    s: &RankSetup,
    tp: usize,
    cfg: &tessera_models::ModelConfig,
    weights: &dyn WeightSource,
) -> Result<Box<dyn Executor>, ServeError> {
    let mut comms = TcpComm::local_group(tp, s.device.clone())?.into_iter();
    let c0: Arc<dyn Communicator> = match comms.next() {
        Some(c) => Arc::new(c),
        None => return Err(ServeError::Config("an empty rank group".into())),
    };
    let (tx, rx) = mpsc::channel();
    for (i, comm) in comms.enumerate() {
        let (rank, s, tx) = (i + 1, s.clone(), tx.clone());
        let comm: Arc<dyn Communicator> = Arc::new(comm);
        std::thread::Builder::new()
            .name(format!("tessera-rank-{rank}"))
            .spawn(move || match rank_worker(&s, comm.clone()) {
                Ok(w) => {
                    let _ = tx.send((rank, Ok(())));
                    if let Err(e) = follow_plans(w, comm) {
                        tracing::error!("tensor-parallel rank {rank} stopped: {e}");
                    }
                }
                Err(e) => {
                    let _ = tx.send((rank, Err(e.to_string())));
                }
            })
            .map_err(ServeError::Io)?;
    }
    let model =
        Llama::load_parallel(cfg, weights, s.max_model_len, s.dtype, &s.device, TensorParallel::new(c0.clone()))?;
    let worker = Worker::new(model, s.num_blocks, s.block_size)?;
    for _ in 1..tp {
        match rx.recv_timeout(LOAD_TIMEOUT) {
            Ok((_, Ok(()))) => {}
            Ok((rank, Err(e))) => {
                return Err(ServeError::Config(format!("tensor-parallel rank {rank} failed to load: {e}")))
            }
            Err(_) => {
                return Err(ServeError::Config(format!(
                    "tensor-parallel ranks did not finish loading within {LOAD_TIMEOUT:?}"
                )))
            }
        }
    }
    tracing::info!("tensor parallel: {tp} ranks loaded (threads, CPU TCP back-end on loopback)");
    Ok(Box::new(TensorParallelExecutor::new(worker, c0)))
}
