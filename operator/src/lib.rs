//! `tessera-operator`: materialises KServe `LLMInferenceService`s into Kubernetes workloads
//! running Tessera workers, and reports KServe's conditions and URL.
//!
//! Owns: the v1alpha1 API types and CRDs ([`api`]), presets and their merge ([`presets`],
//! [`merge`], [`template`], [`combine`]), the child objects ([`desired`]: [`render`],
//! [`parallelism`], [`multinode`], [`router`], [`lora`]; applied and cleaned up by [`children`]), conditions
//! ([`conditions`], [`routing_status`]) and the reconcile loop ([`controller`]). Must not touch: the worker's
//! internals — it only renders pods that run `tessera serve` with vLLM-compatible flags.

pub mod api;
pub mod children;
pub mod combine;
pub mod conditions;
pub mod controller;
pub mod desired;
mod error;
pub mod kinds;
pub mod lora;
pub mod merge;
pub mod multinode;
pub mod names;
pub mod parallelism;
pub mod presets;
pub mod rbac;
pub mod render;
pub mod router;
pub mod routing_status;
pub mod template;

pub use error::Error;
