//! Tessera's hand-written kernels.
//!
//! Owns: every kernel the models call that is not a plain candle op, each with a plain scalar
//! reference (the oracle the tests compare against) and SIMD versions chosen at run time from
//! what the CPU has ([`Isa`]): the quantized matrix product over GGUF blocks (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; [`QMatrix::matmul`]), with activations quantized once
//! per call in ggml's block formats (Q8_0/Q8_1/Q8_K) and integer dot products, on a packed
//! 8-column layout where the type has one, split over a persistent thread pool by output
//! columns; paged attention read in place through block tables ([`paged_attention`]); and the
//! fused element-wise ops of the step ([`silu_mul`], [`add_rms_norm`], [`write_cache_rows`]).
//! With the `cuda` feature, also the CUDA versions' device code and entry-point names (`cuda`;
//! `kernels/cuda/*.cu`, compiled by the build script for sm_80 and sm_90).
//!
//! Must not touch: tensors, devices, model layouts, files or the environment beyond the
//! `TESSERA_KERNELS` override read by [`Isa::active`]. Models reach these kernels through one
//! seam (`tessera_models::Linear`), never through `std::arch` themselves.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
mod elementwise;
mod error;
mod isa;
mod lora;
mod math;
mod matmul;
mod out;
pub mod quant;

pub use attention::{paged_attention, write_cache_rows, AttnShape, KvElem, SeqSpan};
pub use elementwise::{add_rms_norm, gelu_mul_ggml, silu_mul};
pub use error::{KernelError, Result};
pub use isa::Isa;
pub use lora::{lora_add, LoraUpdate};
pub use quant::{ActBlock, QMatrix, QType};
