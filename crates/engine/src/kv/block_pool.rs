//! A pool of fixed-size KV blocks with reference counts and a prefix cache.
//!
//! Free blocks sit in LRU order. A free block that still holds a full, hashed block of
//! tokens stays findable by its hash until it is handed out again (evicted), so a later
//! request with the same prefix can take it back without recomputation.

use std::collections::{BTreeMap, HashMap};

/// Hash of a full block: chains the parent block's hash and this block's token ids.
pub type BlockHash = u64;

#[derive(Debug)]
pub struct BlockPool {
    ref_cnt: Vec<u32>,
    hash: Vec<Option<BlockHash>>,
    /// Token ids of a cached block, to verify a hash hit.
    tokens: Vec<Vec<u32>>,
    /// LRU order of free blocks: key = free stamp.
    free: BTreeMap<u64, u32>,
    free_stamp: Vec<Option<u64>>,
    next_stamp: u64,
    cached: HashMap<BlockHash, u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let mut free = BTreeMap::new();
        let mut free_stamp = Vec::with_capacity(num_blocks);
        for b in 0..num_blocks {
            free.insert(b as u64, b as u32);
            free_stamp.push(Some(b as u64));
        }
        Self {
            ref_cnt: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            tokens: vec![vec![]; num_blocks],
            free,
            free_stamp,
            next_stamp: num_blocks as u64,
            cached: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_cnt.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Fraction of blocks in use by live sequences (cached-but-free blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.ref_cnt.is_empty() {
            return 0.0;
        }
        1.0 - self.free.len() as f64 / self.ref_cnt.len() as f64
    }

    /// Whether nobody holds the block (it sits in the free list).
    pub fn is_free(&self, block: u32) -> bool {
        self.ref_cnt[block as usize] == 0
    }

    fn unlink_free(&mut self, block: u32) {
        if let Some(stamp) = self.free_stamp[block as usize].take() {
            self.free.remove(&stamp);
        }
    }

    /// Take the least recently freed block, evicting its cached contents.
    pub fn allocate(&mut self) -> Option<u32> {
        let (_, block) = self.free.pop_first()?;
        self.free_stamp[block as usize] = None;
        if let Some(h) = self.hash[block as usize].take() {
            if self.cached.get(&h) == Some(&block) {
                self.cached.remove(&h);
            }
            self.tokens[block as usize].clear();
        }
        self.ref_cnt[block as usize] = 1;
        Some(block)
    }

    /// A cached block with this hash and these tokens, if any.
    pub fn lookup(&self, hash: BlockHash, tokens: &[u32]) -> Option<u32> {
        let b = *self.cached.get(&hash)?;
        (self.tokens[b as usize] == tokens).then_some(b)
    }

    /// Take another reference to a (possibly free, cached) block.
    pub fn touch(&mut self, block: u32) {
        if self.ref_cnt[block as usize] == 0 {
            self.unlink_free(block);
        }
        self.ref_cnt[block as usize] += 1;
    }

    /// Drop one reference; at zero the block becomes free (keeping its cached contents).
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.ref_cnt[block as usize];
        debug_assert!(*rc > 0, "double free of block {block}");
        *rc = rc.saturating_sub(1);
        if *rc == 0 {
            let stamp = self.next_stamp;
            self.next_stamp += 1;
            self.free.insert(stamp, block);
            self.free_stamp[block as usize] = Some(stamp);
        }
    }

    /// Record that `block` now holds the full block `tokens` with chained hash `hash`.
    pub fn cache(&mut self, block: u32, hash: BlockHash, tokens: &[u32]) {
        if self.hash[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash[block as usize] = Some(hash);
        self.tokens[block as usize] = tokens.to_vec();
        self.cached.insert(hash, block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_free_returns_all() {
        let mut p = BlockPool::new(4);
        let got: Vec<u32> = (0..4).filter_map(|_| p.allocate()).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(p.allocate(), None);
        assert_eq!(p.usage(), 1.0);
        for b in got {
            p.release(b);
        }
        assert_eq!(p.num_free(), 4);
        assert_eq!(p.usage(), 0.0);
    }

    #[test]
    fn cached_free_block_is_found_until_evicted() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        p.cache(a, 77, &[1, 2]);
        p.release(a);
        assert_eq!(p.lookup(77, &[1, 2]), Some(a));
        assert_eq!(p.lookup(77, &[1, 3]), None, "token check guards hash collisions");
        // Touch takes it back out of the free list.
        p.touch(a);
        assert_eq!(p.num_free(), 1);
        p.release(a);
        // LRU: the other block is handed out first, then `a` is evicted.
        let b = p.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(p.allocate(), Some(a));
        assert_eq!(p.lookup(77, &[1, 2]), None);
    }
}
