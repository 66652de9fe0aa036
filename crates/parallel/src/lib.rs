//! Communication between the ranks of one model replica.
//!
//! Owns: the [`Communicator`] trait (all-reduce, all-gather, reduce-scatter, broadcast,
//! point-to-point send/recv, all-to-all) over device tensors and raw bytes, the rank
//! rendezvous, and the CPU back-ends: [`ShmComm`] (shared memory, for ranks that are threads
//! of one process: the ranks of a pod) and [`TcpComm`] (TCP, for ranks in other pods and
//! CPU-only multi-process serving). The NCCL back-end lives behind the `cuda` feature.
//! Must not touch: models, scheduling or HTTP — it moves tensors and bytes, nothing else.

mod error;
#[cfg(feature = "cuda")]
mod nccl;
mod shm;
mod subgroup;
mod tcp;
mod wire;

pub use error::{CommError, Result};
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
pub use shm::{ShmComm, ShmHub};
pub use subgroup::SubGroup;
pub use tcp::{TcpComm, DEFAULT_JOIN_TIMEOUT};

use candle_core::Tensor;

/// `[start, end)` of part `i` of `n` items split into `parts` near-equal parts (the first
/// `n % parts` parts one longer). Every split of the project uses this one: reduce-scatter
/// parts, weight shards, token shares, layer ranges.
pub fn part(n: usize, parts: usize, i: usize) -> (usize, usize) {
    let (base, extra) = (n / parts, n % parts);
    let start = i * base + i.min(extra);
    (start, start + base + usize::from(i < extra))
}

/// Collective and point-to-point operations of one rank in a group of `world_size` ranks.
/// Every rank of the group must call the same collectives in the same order.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks; every rank gets the result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Concatenate every rank's tensor along `dim`, in rank order (shapes may differ along `dim`).
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Sum over ranks, then rank `r` keeps the `r`-th of `world_size` equal parts along `dim`.
    fn reduce_scatter_sum(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Rank `root` sends `data` (ignored elsewhere); every rank returns it.
    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>>;
    fn send_bytes(&self, to: usize, data: &[u8]) -> Result<()>;
    fn recv_bytes(&self, from: usize) -> Result<Vec<u8>>;
    fn send(&self, to: usize, t: &Tensor) -> Result<()>;
    fn recv(&self, from: usize) -> Result<Tensor>;
    /// `parts[i]` goes to rank `i`; returns what every rank sent to this one, by source rank.
    /// (The MoE token exchange; built from paired send/recv.)
    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>>;

    /// Close this rank's links so that peers blocked on it fail at once instead of waiting
    /// (used when this rank can no longer take part). A no-op where there is nothing to close.
    fn shutdown(&self) {}
}

/// The trivial group of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn reduce_scatter_sum(&self, t: &Tensor, _dim: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast_bytes(&self, data: &[u8], _root: usize) -> Result<Vec<u8>> {
        Ok(data.to_vec())
    }
    fn send_bytes(&self, to: usize, _data: &[u8]) -> Result<()> {
        Err(CommError::Usage(format!("rank 0 of 1 cannot send to rank {to}")))
    }
    fn recv_bytes(&self, from: usize) -> Result<Vec<u8>> {
        Err(CommError::Usage(format!("rank 0 of 1 cannot receive from rank {from}")))
    }
    fn send(&self, to: usize, _t: &Tensor) -> Result<()> {
        self.send_bytes(to, &[])
    }
    fn recv(&self, from: usize) -> Result<Tensor> {
        Err(CommError::Usage(format!("rank 0 of 1 cannot receive from rank {from}")))
    }
    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        Ok(parts)
    }
}
