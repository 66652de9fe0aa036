//! KV cache bookkeeping: block ids only, never tensors.

mod block_pool;
mod manager;

pub use block_pool::BlockPool;
pub use manager::{CachedPrefix, KvCacheManager, PrefixStats};
