//! Per-sequence block tables on top of the [`BlockPool`], with automatic prefix caching.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use super::block_pool::{BlockHash, BlockPool};

/// Prefix-cache counters, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub queries: u64,
    pub hits: u64,
}

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<u32>,
    /// Hashes of the leading full blocks that are registered in the cache.
    hashes: Vec<BlockHash>,
}

/// Assigns cache blocks to sequences.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    caching: bool,
    seqs: HashMap<u64, SeqBlocks>,
    /// Blocks held for someone else after their sequence left: prefilled KV waiting to be
    /// pulled by a decode worker, or blocks a cancelled pull may still be writing.
    pinned: HashMap<u64, Vec<u32>>,
    stats: PrefixStats,
}

/// A block's hash: its tokens, the blocks before it and the cache namespace (`salt`: the
/// LoRA adapter the keys/values were computed with, `None` for the base model).
fn chain_hash(parent: Option<BlockHash>, salt: Option<u32>, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    salt.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// A cached prefix found for a sequence: blocks and their hashes.
#[derive(Debug, Clone, Default)]
pub struct CachedPrefix {
    pub blocks: Vec<u32>,
    pub hashes: Vec<BlockHash>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            caching: enable_prefix_caching,
            seqs: HashMap::new(),
            pinned: HashMap::new(),
            stats: PrefixStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free(&self) -> usize {
        self.pool.num_free()
    }

    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// The longest run of cached full blocks at the start of `tokens`, leaving at least one
    /// token to compute (its logits are needed), computed in namespace `salt` (the adapter).
    pub fn cached_prefix(&self, tokens: &[u32], salt: Option<u32>) -> CachedPrefix {
        let mut out = CachedPrefix::default();
        if !self.caching || tokens.is_empty() {
            return out;
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = chain_hash(parent, salt, chunk);
            match self.pool.lookup(h, chunk) {
                Some(b) => {
                    out.blocks.push(b);
                    out.hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        out
    }

    /// Count a prefix lookup of `query` tokens that hit `hit` tokens.
    pub fn record_prefix(&mut self, query: usize, hit: usize) {
        self.stats.queries += query as u64;
        self.stats.hits += hit as u64;
    }

    /// Grow `seq`'s table to hold `num_tokens` tokens. On the first call, `prefix` blocks
    /// (from [`Self::cached_prefix`]) are shared. Returns false, changing nothing, when
    /// there are not enough free blocks.
    pub fn allocate(&mut self, seq: u64, num_tokens: usize, prefix: &CachedPrefix) -> bool {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        let reuse = if have == 0 { prefix.blocks.len() } else { 0 };
        let need = num_tokens.div_ceil(self.block_size).saturating_sub(have + reuse);
        // Prefix blocks that are free now leave the free list when we take them.
        let reuse_free = if reuse > 0 { prefix.blocks.iter().filter(|&&b| self.pool.is_free(b)).count() } else { 0 };
        if need + reuse_free > self.pool.num_free() {
            return false;
        }
        let entry = self.seqs.entry(seq).or_default();
        if reuse > 0 {
            for &b in &prefix.blocks {
                self.pool.touch(b);
            }
            entry.blocks.extend_from_slice(&prefix.blocks);
            entry.hashes.extend_from_slice(&prefix.hashes);
        }
        for _ in 0..need {
            match self.pool.allocate() {
                Some(b) => entry.blocks.push(b),
                None => return false, // unreachable: checked above
            }
        }
        true
    }

    /// Register the full blocks among the first `num_computed` tokens in the prefix cache,
    /// in namespace `salt` (the adapter they were computed with).
    pub fn cache_full_blocks(&mut self, seq: u64, tokens: &[u32], num_computed: usize, salt: Option<u32>) {
        if !self.caching {
            return;
        }
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let full = (num_computed / self.block_size).min(s.blocks.len());
        while s.hashes.len() < full {
            let i = s.hashes.len();
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let h = chain_hash(s.hashes.last().copied(), salt, chunk);
            self.pool.cache(s.blocks[i], h, chunk);
            s.hashes.push(h);
        }
    }

    /// The first `max_blocks` blocks of `seq` (which must be computed) as a prefix another
    /// sequence can start from with [`Self::allocate`]; empty if `seq` holds no blocks.
    pub fn prefix_of(&self, seq: u64, max_blocks: usize) -> CachedPrefix {
        let Some(p) = self.seqs.get(&seq) else {
            return CachedPrefix::default();
        };
        let k = max_blocks.min(p.blocks.len());
        CachedPrefix { blocks: p.blocks[..k].to_vec(), hashes: p.hashes[..k.min(p.hashes.len())].to_vec() }
    }

    /// The block table of a sequence.
    pub fn block_table(&self, seq: u64) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.blocks)
    }

    /// Return all of a sequence's blocks (tail first, so the tail is evicted first).
    pub fn free(&mut self, seq: u64) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.release(&s.blocks);
        }
    }

    fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            self.pool.release(b);
        }
    }

    /// Keep a departing sequence's blocks under `seq`'s id: they are neither freed nor
    /// evictable until [`Self::unpin`] (their cached full blocks stay shareable by prefix
    /// hits). Returns the block table.
    pub fn pin(&mut self, seq: u64) -> Vec<u32> {
        let blocks = self.seqs.remove(&seq).map(|s| s.blocks).unwrap_or_default();
        self.pinned.insert(seq, blocks.clone());
        blocks
    }

    /// Free the blocks pinned under `seq` (nothing if none are).
    pub fn unpin(&mut self, seq: u64) {
        if let Some(blocks) = self.pinned.remove(&seq) {
            self.release(&blocks);
        }
    }

    /// Blocks held by pins (a block shared by several pins counts once per pin).
    pub fn num_pinned_blocks(&self) -> usize {
        self.pinned.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_grows_and_free_returns_everything() {
        let mut m = KvCacheManager::new(8, 4, true);
        assert!(m.allocate(1, 5, &CachedPrefix::default()));
        assert_eq!(m.block_table(1).len(), 2);
        assert!(m.allocate(1, 8, &CachedPrefix::default()));
        assert_eq!(m.block_table(1).len(), 2, "8 tokens still fit in 2 blocks");
        assert!(m.allocate(1, 9, &CachedPrefix::default()));
        assert_eq!(m.num_free(), 5);
        assert!(!m.allocate(2, 4 * 6, &CachedPrefix::default()), "6 blocks do not fit in 5");
        assert_eq!(m.num_free(), 5, "a failed allocation changes nothing");
        m.free(1);
        assert_eq!(m.num_free(), 8);
    }

    #[test]
    fn prefix_hit_shares_blocks_and_counts() {
        let mut m = KvCacheManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        assert!(m.allocate(1, 10, &CachedPrefix::default()));
        m.cache_full_blocks(1, &prompt, 10, None);
        let hit = m.cached_prefix(&prompt, None);
        // The same tokens computed under a LoRA adapter are another namespace, both ways.
        assert!(m.cached_prefix(&prompt, Some(3)).blocks.is_empty(), "the base's blocks serve no adapter");
        assert!(m.allocate(9, 10, &CachedPrefix::default()));
        m.cache_full_blocks(9, &prompt, 10, Some(3));
        assert_eq!(m.cached_prefix(&prompt, Some(3)).blocks.len(), 2, "the adapter finds its own blocks");
        assert!(m.cached_prefix(&prompt, Some(4)).blocks.is_empty(), "and no other adapter does");
        m.free(9);
        assert_eq!(hit.blocks, m.block_table(1)[..2].to_vec());
        // Still-running owner: the blocks are shared, not copied.
        assert!(m.allocate(2, 10, &hit));
        assert_eq!(m.block_table(2)[..2], m.block_table(1)[..2]);
        assert_ne!(m.block_table(2)[2], m.block_table(1)[2]);
        m.record_prefix(10, 8);
        assert_eq!(m.stats(), PrefixStats { queries: 10, hits: 8 });
        // After both finish, the blocks are free but still findable.
        m.free(1);
        m.free(2);
        assert_eq!(m.num_free(), 8);
        assert_eq!(m.cached_prefix(&prompt, None).blocks.len(), 2);
        // A prompt that differs in the first block finds nothing.
        let mut other = prompt.clone();
        other[0] = 99;
        assert!(m.cached_prefix(&other, None).blocks.is_empty());
    }

    #[test]
    fn whole_prompt_cached_still_leaves_one_token() {
        let mut m = KvCacheManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        assert!(m.allocate(1, 8, &CachedPrefix::default()));
        m.cache_full_blocks(1, &prompt, 8, None);
        assert_eq!(m.cached_prefix(&prompt, None).blocks.len(), 1);
    }

    #[test]
    fn pinned_blocks_are_neither_free_nor_evicted_until_unpinned() {
        let mut m = KvCacheManager::new(4, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        assert!(m.allocate(1, 10, &CachedPrefix::default()));
        m.cache_full_blocks(1, &prompt, 10, None);
        let pinned = m.pin(1);
        assert_eq!((pinned.len(), m.num_pinned_blocks(), m.num_free()), (3, 3, 1));
        assert!(m.block_table(1).is_empty(), "the sequence itself is gone");
        // The one free block can be taken, the pinned ones cannot.
        assert!(!m.allocate(2, 8, &CachedPrefix::default()));
        assert!(m.allocate(2, 4, &CachedPrefix::default()));
        assert!(!pinned.contains(&m.block_table(2)[0]));
        // A prefix hit may still share a pinned, cached block read-only.
        let hit = m.cached_prefix(&prompt, None);
        assert_eq!(hit.blocks, pinned[..2].to_vec());
        m.free(2);
        let first = CachedPrefix { blocks: hit.blocks[..1].to_vec(), hashes: hit.hashes[..1].to_vec() };
        assert!(m.allocate(3, 8, &first));
        assert_eq!(m.block_table(3)[0], pinned[0]);
        m.free(3);
        assert_eq!(m.num_free(), 1, "the shared block is still pinned");
        m.unpin(1);
        assert_eq!((m.num_pinned_blocks(), m.num_free()), (0, 4));
        m.unpin(1);
        assert_eq!(m.num_free(), 4, "a second unpin frees nothing");
    }

    #[test]
    fn caching_disabled_finds_nothing() {
        let mut m = KvCacheManager::new(8, 4, false);
        let prompt: Vec<u32> = (0..10).collect();
        assert!(m.allocate(1, 10, &CachedPrefix::default()));
        m.cache_full_blocks(1, &prompt, 10, None);
        assert!(m.cached_prefix(&prompt, None).blocks.is_empty());
    }
}
