//! KV cache bookkeeping (block ids only, never tensors) and the prefill/decode transfer of
//! blocks between workers.

mod block_pool;
mod manager;
pub mod transfer;

pub use block_pool::BlockPool;
pub use manager::{CachedPrefix, KvCacheManager, PrefixStats};
