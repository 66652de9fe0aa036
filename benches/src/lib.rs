//! Benchmarks live in `benches/` (criterion); this crate has no library code.
//!
//! Owns: performance measurements only. Must not touch: anything a test asserts — targets
//! are reported, not enforced here.
