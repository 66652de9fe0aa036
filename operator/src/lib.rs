//! `tessera-operator`: materialises KServe `LLMInferenceService`s into Kubernetes workloads
//! running Tessera workers, and reports KServe's conditions and URL.
//!
//! Owns: the v1alpha1 API types and CRDs ([`api`]), presets and their merge ([`presets`],
//! [`merge`], [`template`], [`combine`]), the child objects ([`render`], [`parallelism`]), conditions
//! ([`conditions`]) and the reconcile loop ([`controller`]). Must not touch: the worker's
//! internals — it only renders pods that run `tessera serve` with vLLM-compatible flags.

pub mod api;
pub mod combine;
pub mod conditions;
pub mod controller;
mod error;
pub mod merge;
pub mod names;
pub mod parallelism;
pub mod presets;
pub mod render;
pub mod template;

pub use error::Error;
