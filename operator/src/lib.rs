//! `tessera-operator`: materialises KServe `LLMInferenceService`s into Kubernetes workloads
//! running Tessera workers, and reports KServe's conditions and URL.
//!
//! Owns: the v1alpha1 API types and CRDs ([`api`]). Must not touch: the worker's internals —
//! it only renders pods that run `tessera serve` with vLLM-compatible flags.

pub mod api;
