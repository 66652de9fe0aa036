//! Prefill/decode KV transfer: a prefill worker pins a finished prefill's blocks under a
//! one-shot token ([`Pins`]) and serves them over TCP ([`server`]); a decode worker pulls
//! them into blocks it allocated ([`client`]). Bytes go through the runner's
//! [`KvBlockStore`]; this module never touches a tensor.

pub mod client;
mod pins;
pub mod server;
#[cfg(test)]
mod tests;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use tessera_runner::KvBlockStore;

pub use pins::{Pin, Pins};

/// Where a decode leg's prompt KV was prefilled: the prefill response's `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RemoteSource {
    pub host: String,
    pub port: u16,
    /// The prefill worker's engine id, checked by its transfer service.
    pub engine_id: Option<String>,
    /// Remote blocks of the prompt, in order.
    pub block_ids: Vec<u32>,
    /// The one-shot token that unlocks the blocks.
    pub token: String,
    /// Prompt tokens the blocks hold.
    pub num_tokens: usize,
}

/// The prefill leg's blocks and where they wait (the engine that pinned them: with data
/// parallelism each replica has its own transfer service), for the answer's
/// `kv_transfer_params`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PinnedKv {
    pub block_ids: Vec<u32>,
    pub token: String,
    pub num_tokens: usize,
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub tp_size: usize,
}

/// What two workers must share for KV blocks to mean the same thing in both.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KvLayout {
    /// Architecture and shape of the model (a fingerprint, not the weights).
    pub model: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: String,
    pub block_size: usize,
    pub tp_size: usize,
    pub pp_size: usize,
    /// Rotary layout of the cached keys (GGUF's interleaved or Hugging Face's halves).
    pub rope_interleaved: bool,
}

impl KvLayout {
    /// The first difference between this (the prefill side) and `decode`, named.
    pub fn mismatch(&self, decode: &KvLayout) -> Option<String> {
        let diff = |what: &str, p: &dyn std::fmt::Display, d: &dyn std::fmt::Display| {
            Some(format!("{what} differs: prefill {p}, decode {d}"))
        };
        if self.model != decode.model {
            return diff("model", &self.model, &decode.model);
        }
        if self.num_layers != decode.num_layers {
            return diff("layer count", &self.num_layers, &decode.num_layers);
        }
        if self.num_kv_heads != decode.num_kv_heads || self.head_dim != decode.head_dim {
            let (p, d) = (
                format!("{}x{}", self.num_kv_heads, self.head_dim),
                format!("{}x{}", decode.num_kv_heads, decode.head_dim),
            );
            return diff("KV heads x head size", &p, &d);
        }
        if self.dtype != decode.dtype {
            return diff("KV cache dtype", &self.dtype, &decode.dtype);
        }
        if self.block_size != decode.block_size {
            return diff("block size", &self.block_size, &decode.block_size);
        }
        if (self.tp_size, self.pp_size) != (decode.tp_size, decode.pp_size) {
            let (p, d) = (
                format!("tp {} pp {}", self.tp_size, self.pp_size),
                format!("tp {} pp {}", decode.tp_size, decode.pp_size),
            );
            return diff("parallel layout (re-sharding is not supported)", &p, &d);
        }
        if self.rope_interleaved != decode.rope_interleaved {
            let name = |i: bool| if i { "interleaved (GGUF)" } else { "split halves (HF)" };
            return diff("rotary key layout", &name(self.rope_interleaved), &name(decode.rope_interleaved));
        }
        None
    }
}

/// An engine's part in KV transfer (given to [`crate::spawn`]).
pub struct KvLink {
    pub engine_id: String,
    /// Where decode workers reach this engine's transfer service.
    pub host: String,
    pub port: u16,
    pub layout: KvLayout,
    pub store: KvStore,
    /// Bound transfer listener (prefill side); the decode side only pulls.
    pub listener: Option<std::net::TcpListener>,
    /// How long a prefilled request's blocks wait to be pulled.
    pub pin_timeout: Duration,
    /// The longest a pull may take before the decode side recomputes.
    pub pull_timeout: Duration,
}

/// Where the engine's KV bytes are read and written.
pub enum KvStore {
    /// Memory this process holds (every rank is a thread here): read and written beside the
    /// steps, from the transfer threads.
    Shared(Arc<dyn KvBlockStore>),
    /// Ranks in other processes: the engine thread reads and writes through its executor
    /// between steps. The store's shape: layers (over every rank) and bytes per block-layer.
    Executor { num_layers: usize, block_bytes: usize },
}

/// Why a decode leg computed its prompt itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The pull failed (prefill worker gone, token expired, refused handshake, bad data).
    PullFailed,
    /// The built-in proxy's prefill leg failed.
    PrefillLeg,
    /// The request needs something split serving does not do (e.g. prompt log-probabilities).
    Unsupported,
}

impl Fallback {
    pub const ALL: [Fallback; 3] = [Fallback::PullFailed, Fallback::PrefillLeg, Fallback::Unsupported];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::PullFailed => "pull_failed",
            Fallback::PrefillLeg => "prefill_leg",
            Fallback::Unsupported => "unsupported",
        }
    }
}

/// A fresh 128-bit token from the thread's CSPRNG, as 32 hex digits.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}
