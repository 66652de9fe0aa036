//! KV memory as bytes, by block, for the prefill/decode transfer: [`KvBlockStore`] over one
//! rank's cache or over every rank of this process ([`RankedKv`]), and the messages with
//! which rank 0 reads and writes the blocks of ranks in other processes between steps
//! ([`crate::TensorParallelExecutor`]'s `kv_read` / `kv_write`, answered in `follow_plans`).

use tessera_models::Communicator;

use crate::{Result, RunnerError, Worker};

/// KV memory as bytes, by block (the prefill/decode KV transfer reads pinned blocks and
/// writes pulled ones through this, beside the steps that run on other blocks). The bytes
/// of `blocks` are laid out layer after layer; each layer is every block's keys, then every
/// block's values.
pub trait KvBlockStore: Send + Sync {
    fn num_layers(&self) -> usize;
    /// Bytes of one block of one layer's keys (and again of its values).
    fn block_bytes(&self) -> usize;
    /// Every layer's `blocks`.
    fn read_all(&self, blocks: &[u32]) -> Result<Vec<u8>>;
    /// Write what [`KvBlockStore::read_all`] gives.
    fn write_all(&self, blocks: &[u32], data: &[u8]) -> Result<()>;
}

/// `data` must hold `layers` layers of `blocks`: an error otherwise, before anything is written.
fn check_len(data: &[u8], layers: usize, block_bytes: usize, blocks: usize) -> Result<usize> {
    let per = 2 * block_bytes * blocks;
    if data.len() != per * layers {
        return Err(RunnerError::Plan(format!("KV data of {} bytes for {layers} layers of {per}", data.len())));
    }
    Ok(per)
}

impl KvBlockStore for tessera_models::KvCache {
    fn num_layers(&self) -> usize {
        tessera_models::KvCache::num_layers(self)
    }
    fn block_bytes(&self) -> usize {
        tessera_models::KvCache::block_bytes(self)
    }
    fn read_all(&self, blocks: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.num_layers() * 2 * self.block_bytes() * blocks.len());
        for layer in 0..self.num_layers() {
            self.read_blocks(layer, blocks, &mut out)?;
        }
        Ok(out)
    }
    fn write_all(&self, blocks: &[u32], data: &[u8]) -> Result<()> {
        let per = check_len(data, self.num_layers(), self.block_bytes(), blocks.len())?;
        for (layer, chunk) in data.chunks_exact(per.max(1)).enumerate() {
            self.write_blocks(layer, blocks, chunk)?;
        }
        Ok(())
    }
}

/// The KV memory of every rank of one parallel worker (ranks in order), as one store whose
/// layers are rank 0's local layers, then rank 1's, and so on: two workers of the same tensor
/// and pipeline layout exchange blocks rank by rank.
pub struct RankedKv {
    ranks: Vec<tessera_models::KvCache>,
}

impl RankedKv {
    /// The ranks' caches in rank order; every rank's blocks must be the same size.
    pub fn new(ranks: Vec<tessera_models::KvCache>) -> Result<Self> {
        let bb = ranks.first().map(|c| c.block_bytes()).unwrap_or(0);
        if let Some(r) = ranks.iter().position(|c| c.block_bytes() != bb) {
            return Err(RunnerError::Plan(format!("rank {r}'s KV blocks differ in size from rank 0's")));
        }
        Ok(Self { ranks })
    }
}

impl KvBlockStore for RankedKv {
    fn num_layers(&self) -> usize {
        self.ranks.iter().map(|c| c.num_layers()).sum()
    }
    fn block_bytes(&self) -> usize {
        self.ranks.first().map_or(0, |c| c.block_bytes())
    }
    fn read_all(&self, blocks: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for c in &self.ranks {
            out.extend(KvBlockStore::read_all(c, blocks)?);
        }
        Ok(out)
    }
    fn write_all(&self, blocks: &[u32], data: &[u8]) -> Result<()> {
        let per = check_len(data, self.num_layers(), self.block_bytes(), blocks.len())?;
        let mut at = 0;
        for c in &self.ranks {
            let len = c.num_layers() * per;
            KvBlockStore::write_all(c, blocks, &data[at..at + len])?;
            at += len;
        }
        Ok(())
    }
}

/// First word of the KV messages rank 0 broadcasts (a plan message starts with its
/// sequence count, never this large).
const KV_LAYERS: u32 = 0xFFFF_FFF0;
const KV_READ: u32 = 0xFFFF_FFF1;
const KV_WRITE: u32 = 0xFFFF_FFF2;

fn rank_err(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Rank(e.to_string())
}

fn words(b: &[u8], at: usize, n: usize) -> Result<Vec<u32>> {
    let bytes = b.get(at..at + 4 * n).ok_or_else(|| RunnerError::Plan("truncated KV message".into()))?;
    Ok(bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect())
}

/// Whether a broadcast message is a KV message (which [`follow_kv`] answers).
pub(crate) fn is_kv_message(msg: &[u8]) -> bool {
    msg.len() >= 4 && words(msg, 0, 1).is_ok_and(|w| (KV_LAYERS..=KV_WRITE).contains(&w[0]))
}

/// Each rank's bytes, as root in rank order: `mine` from this rank, the others' from them.
fn gather(comm: &dyn Communicator, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    (0..comm.world_size())
        .map(|r| comm.broadcast_bytes(if r == comm.rank() { mine } else { &[] }, r).map_err(rank_err))
        .collect()
}

/// A follower's part in a KV message from rank 0.
pub(crate) fn follow_kv(worker: &Worker, comm: &dyn Communicator, msg: &[u8]) -> Result<()> {
    let cache = worker.kv_cache();
    let kind = words(msg, 0, 1)?[0];
    if kind == KV_LAYERS {
        gather(comm, &(cache.num_layers() as u32).to_le_bytes())?;
        return Ok(());
    }
    let n = words(msg, 4, 1)?[0] as usize;
    let blocks = words(msg, 8, n)?;
    if kind == KV_READ {
        // A rank that cannot read sends nothing; rank 0 sees the short answer.
        let mine = cache.read_all(&blocks).unwrap_or_default();
        gather(comm, &mine)?;
        return Ok(());
    }
    let world = comm.world_size();
    let offsets = words(msg, 8 + 4 * n, 2 * world)?;
    let (off, len) = (offsets[2 * comm.rank()] as usize, offsets[2 * comm.rank() + 1] as usize);
    let base = 8 + 4 * n + 8 * world;
    let ok = msg.get(base + off..base + off + len).map(|d| cache.write_all(&blocks, d));
    gather(comm, &[u8::from(matches!(ok, Some(Ok(()))))])?;
    Ok(())
}

fn header(kind: u32, blocks: &[u32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + 4 * blocks.len());
    m.extend_from_slice(&kind.to_le_bytes());
    m.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    blocks.iter().for_each(|b| m.extend_from_slice(&b.to_le_bytes()));
    m
}

/// Rank 0: every rank's local layer count.
pub(crate) fn layers_per_rank(worker: &Worker, comm: &dyn Communicator) -> Result<Vec<usize>> {
    comm.broadcast_bytes(&KV_LAYERS.to_le_bytes(), 0).map_err(rank_err)?;
    let all = gather(comm, &(worker.kv_cache().num_layers() as u32).to_le_bytes())?;
    all.iter().map(|b| words(b, 0, 1).map(|w| w[0] as usize)).collect()
}

/// Rank 0: every rank's bytes of `blocks`, rank after rank.
pub(crate) fn read(worker: &Worker, comm: &dyn Communicator, layers: &[usize], blocks: &[u32]) -> Result<Vec<u8>> {
    comm.broadcast_bytes(&header(KV_READ, blocks), 0).map_err(rank_err)?;
    let cache = worker.kv_cache();
    let mine = cache.read_all(blocks)?;
    let per_layer = 2 * cache.block_bytes() * blocks.len();
    let mut out = Vec::new();
    for (r, bytes) in gather(comm, &mine)?.into_iter().enumerate() {
        if bytes.len() != layers[r] * per_layer {
            return Err(RunnerError::Plan(format!("rank {r} could not read KV blocks {blocks:?}")));
        }
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// Rank 0: write `data` (as [`read`] gives it) into `blocks` of every rank.
pub(crate) fn write(
    worker: &Worker,
    comm: &dyn Communicator,
    layers: &[usize],
    blocks: &[u32],
    data: &[u8],
) -> Result<()> {
    let per_layer = 2 * worker.kv_cache().block_bytes() * blocks.len();
    if data.len() != layers.iter().sum::<usize>() * per_layer {
        return Err(RunnerError::Plan(format!("KV data of {} bytes does not fit the ranks' layers", data.len())));
    }
    let mut m = header(KV_WRITE, blocks);
    let mut off = 0usize;
    for &l in layers {
        m.extend_from_slice(&(off as u32).to_le_bytes());
        m.extend_from_slice(&((l * per_layer) as u32).to_le_bytes());
        off += l * per_layer;
    }
    m.extend_from_slice(data);
    comm.broadcast_bytes(&m, 0).map_err(rank_err)?;
    let ok = worker.kv_cache().write_all(blocks, &data[..layers[0] * per_layer]);
    let acks = gather(comm, &[u8::from(ok.is_ok())])?;
    ok?;
    match acks.iter().position(|a| a.first() != Some(&1)) {
        Some(r) => Err(RunnerError::Plan(format!("rank {r} could not write KV blocks {blocks:?}"))),
        None => Ok(()),
    }
}
