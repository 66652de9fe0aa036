//! Data parallel over pods (KServe's data-parallel LeaderWorkerSet preset): each pod runs
//! `--data-parallel-size-local` whole replicas (tensor/pipeline ranks inside the pod). The pod
//! of start rank 0 serves HTTP and takes the other pods' replicas on
//! `--data-parallel-rpc-port`; the others (`--headless`) join it at `--data-parallel-address`
//! and only compute. The link itself is `tessera_engine::remote`.

use std::net::TcpListener;
use std::time::Duration;

use tessera_engine::remote::{accept_replicas, join_leader};
use tessera_engine::EngineHandle;

use crate::args::ServeArgs;
use crate::ServeError;

/// How long a joined replica may take to load its model before start-up fails.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Replicas in this pod.
pub(crate) fn local_replicas(a: &ServeArgs) -> usize {
    a.data_parallel_size_local.unwrap_or(a.data_parallel_size)
}

/// Whether the replicas are spread over several pods.
pub(crate) fn multi_pod(a: &ServeArgs) -> bool {
    local_replicas(a) < a.data_parallel_size
}

/// Whether this process is a data-parallel worker pod (hosts replicas, serves no HTTP).
pub fn is_replica_pod(a: &ServeArgs) -> bool {
    multi_pod(a) && (a.headless || a.data_parallel_start_rank > 0)
}

pub(crate) fn validate(a: &ServeArgs) -> Result<(), ServeError> {
    let bad = |m: String| Err(ServeError::Config(m));
    let (dp, local, start) = (a.data_parallel_size, local_replicas(a), a.data_parallel_start_rank);
    if local == 0 || local > dp || !dp.is_multiple_of(local) {
        return bad(format!("--data-parallel-size-local {local} must divide --data-parallel-size {dp}"));
    }
    if !start.is_multiple_of(local) || start >= dp {
        return bad(format!(
            "--data-parallel-start-rank {start} must be a multiple of --data-parallel-size-local {local} below \
             --data-parallel-size {dp}"
        ));
    }
    if !multi_pod(a) {
        return if start == 0 {
            Ok(())
        } else {
            bad(format!("--data-parallel-start-rank {start} needs replicas on other pods (--data-parallel-size-local)"))
        };
    }
    if a.headless && start == 0 {
        return bad("--headless with --data-parallel-start-rank 0: the pod of rank 0 serves HTTP".into());
    }
    if start > 0 && a.data_parallel_address.is_none() {
        return bad(format!("data-parallel rank {start} needs --data-parallel-address (the leader pod's host)"));
    }
    let (group, index, _) = crate::ranks::Topology::placement()?;
    if group > 1 && group != dp / local {
        return bad(format!(
            "LWS_GROUP_SIZE={group} pods but --data-parallel-size {dp} / --data-parallel-size-local {local} = {}",
            dp / local
        ));
    }
    if group > 1 && index * local != start {
        return bad(format!(
            "LWS_WORKER_INDEX={index} x --data-parallel-size-local {local} should be --data-parallel-start-rank, \
             got {start}"
        ));
    }
    Ok(())
}

/// Data-parallel expert parallelism (a MoE model, `--enable-expert-parallel`, several
/// replicas): where the ranks of every replica meet to form the expert group — the leader pod
/// at `--data-parallel-address:--rendezvous-port`, or shared memory inside one pod.
pub(crate) fn expert_rendezvous(
    a: &ServeArgs,
    cfg: &tessera_models::ModelConfig,
) -> Result<Option<crate::ranks::Meet>, ServeError> {
    if !(a.enable_expert_parallel && a.data_parallel_size > 1 && cfg.moe.is_some()) {
        return Ok(None);
    }
    if a.pipeline_parallel_size > 1 {
        return Err(ServeError::Config(format!(
            "data-parallel expert parallelism runs with --pipeline-parallel-size 1 (got {})",
            a.pipeline_parallel_size
        )));
    }
    if !multi_pod(a) {
        let world = a.data_parallel_size * a.tensor_parallel_size;
        return Ok(Some(crate::ranks::Meet::Local(tessera_parallel::ShmHub::new(world))));
    }
    match &a.data_parallel_address {
        Some(host) => Ok(Some(crate::ranks::Meet::Tcp(format!("{host}:{}", a.rendezvous_port)))),
        None => Err(ServeError::Config(
            "data-parallel expert parallelism over pods needs --data-parallel-address on every pod".into(),
        )),
    }
}

/// On the leader of several data-parallel pods: the RPC listener the other pods join.
pub(crate) fn listen(a: &ServeArgs) -> Result<Option<TcpListener>, ServeError> {
    if !multi_pod(a) {
        return Ok(None);
    }
    let l = TcpListener::bind((a.host.as_str(), a.data_parallel_rpc_port)).map_err(|e| {
        ServeError::Config(format!("--data-parallel-rpc-port {}: cannot listen: {e}", a.data_parallel_rpc_port))
    })?;
    tracing::info!("data parallel: waiting for remote replicas on {}", l.local_addr()?);
    Ok(Some(l))
}

/// On the leader: the other pods' replicas, in rank order, once joined and loaded.
pub(crate) fn accept(a: &ServeArgs, l: &TcpListener) -> Result<Vec<EngineHandle>, ServeError> {
    let ranks = local_replicas(a)..a.data_parallel_size;
    Ok(accept_replicas(l, ranks, Duration::from_secs_f64(a.rank_join_timeout), LOAD_TIMEOUT)?)
}

/// A data-parallel worker pod: join the leader, load this pod's replicas, serve them to the
/// leader until it goes away (an error: the group is restarted as a whole).
pub fn run_replica_pod(a: &ServeArgs) -> Result<(), ServeError> {
    crate::serve::validate(a)?;
    let host = a.data_parallel_address.clone().unwrap_or_default();
    let leader = format!("{host}:{}", a.data_parallel_rpc_port);
    let (start, local) = (a.data_parallel_start_rank, local_replicas(a));
    let join_timeout = Duration::from_secs_f64(a.rank_join_timeout);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut joined = Vec::with_capacity(local);
        for rank in start..start + local {
            joined.push(join_leader(rank, &leader, join_timeout).await?);
        }
        let args = a.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::serve::start_engines(&args, local))
            .await
            .map_err(|e| ServeError::Config(format!("model loading task failed: {e}")))??;
        tracing::info!("data-parallel ranks {start}..{} serve the leader at {leader}", start + local);
        let mut serving = tokio::task::JoinSet::new();
        for (j, engine) in joined.into_iter().zip(loaded.engines) {
            serving.spawn(j.serve(engine));
        }
        match serving.join_next().await {
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(e)) => Err(ServeError::Config(format!("a replica task failed: {e}"))),
            _ => Ok(()),
        }
    })
}
