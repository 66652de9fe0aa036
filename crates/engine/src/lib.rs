//! The Tessera engine: continuous batching over a paged KV cache.
//!
//! Owns: the engine thread ([`spawn`], [`EngineHandle`]), the [`scheduler`] (budget,
//! chunked prefill, preemption), the [`kv`] block bookkeeping (block ids, prefix hashes —
//! never tensors), output processing (incremental detokenisation, stop strings) and the
//! live [`EngineStats`], and the link to data-parallel replicas on other pods ([`remote`]:
//! a remote replica is an [`EngineHandle`] like a local one).
//!
//! Must not touch: tensors or devices (steps are executed through
//! `tessera_runner::Executor`), HTTP, or request parsing.

mod core;
mod detok;
mod error;
pub mod kv;
mod looper;
pub mod remote;
pub mod scheduler;
mod stats;

pub use crate::core::{
    spawn, Criticality, EngineConfig, EngineHandle, EngineRequest, Finished, LoraRequest, RequestOutput, RequestStream,
    SATURATION_KV_USAGE,
};
pub use detok::{Detokenizer, OutputText};
pub use error::EngineError;
pub use scheduler::{Policy, SchedulerConfig};
pub use stats::{EngineStats, Histogram, HistogramSnapshot};
