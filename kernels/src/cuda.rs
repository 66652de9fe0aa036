//! The CUDA kernels' device code (`kernels/cuda/*.cu`), compiled by the build script with the
//! `cuda` feature: fatbins with SASS for sm_80 and sm_90 (and `CUDA_COMPUTE_CAP`'s) plus compute_80
//! PTX, and the names of their entry points for each element type. Loading and launching them is
//! the models crate's (a candle custom op over the device); this module holds only bytes and names.
//!
//! - `tessera_paged_attention_<q>_<cache>_<head_dim>`: decode and chunked prefill over block tables.
//! - `tessera_reshape_and_cache_<src>_<cache>`: rows into their cache slots.
//! - `tessera_add_rms_norm_<t>`, `tessera_silu_mul_<t>`, `tessera_rotary_qk_<t>`: the fused ops.

/// Paged attention.
pub const ATTENTION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin"));
/// Reshape-and-cache.
pub const CACHE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cache.fatbin"));
/// RMSNorm with the residual add, SiLU·mul, rotary.
pub const FUSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));
/// The compute_80 PTX of each of the three, in that order.
pub const PTX: [&str; 3] = [
    include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/cache.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")),
];

include!(concat!(env!("OUT_DIR"), "/cuda_archs.rs"));

/// An element type of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    F32,
    F16,
    Bf16,
}

impl Dt {
    pub const ALL: [Dt; 3] = [Dt::F32, Dt::F16, Dt::Bf16];

    fn name(self) -> &'static str {
        match self {
            Dt::F32 => "f32",
            Dt::F16 => "f16",
            Dt::Bf16 => "bf16",
        }
    }
}

/// The (activation, cache) type pairs the kernels are built for: f32 activations over any
/// cache type, or activations and cache of one half type.
fn pair(q: Dt, cache: Dt) -> bool {
    q == Dt::F32 || q == cache
}

/// The attention entry point for queries of `q`, a cache of `cache` and `head_dim`, if built.
pub fn attention_entry(q: Dt, cache: Dt, head_dim: usize) -> Option<String> {
    let ok = pair(q, cache) && matches!(head_dim, 64 | 128);
    ok.then(|| format!("tessera_paged_attention_{}_{}_{head_dim}", q.name(), cache.name()))
}

/// The reshape-and-cache entry point for rows of `src` into a cache of `cache`, if built.
pub fn cache_entry(src: Dt, cache: Dt) -> Option<String> {
    pair(src, cache).then(|| format!("tessera_reshape_and_cache_{}_{}", src.name(), cache.name()))
}

/// A fused element-wise op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedOp {
    AddRmsNorm,
    SiluMul,
    RotaryQk,
}

/// The entry point of `op` on elements of `t`.
pub fn fused_entry(op: FusedOp, t: Dt) -> String {
    let op = match op {
        FusedOp::AddRmsNorm => "add_rms_norm",
        FusedOp::SiluMul => "silu_mul",
        FusedOp::RotaryQk => "rotary_qk",
    };
    format!("tessera_{op}_{}", t.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(ptx: &str) -> Vec<&str> {
        ptx.lines().filter_map(|l| l.trim().strip_prefix(".visible .entry ")).map(|l| l.trim_end_matches('(')).collect()
    }

    #[test]
    fn every_entry_point_named_here_is_in_the_device_code() {
        let (attn, cache, fused) = (entries(PTX[0]), entries(PTX[1]), entries(PTX[2]));
        let mut named = 0;
        for q in Dt::ALL {
            for c in Dt::ALL {
                for d in [64, 128, 80] {
                    if let Some(e) = attention_entry(q, c, d) {
                        assert!(attn.contains(&e.as_str()), "{e} is not in attention.cu: {attn:?}");
                        named += 1;
                    }
                }
                if let Some(e) = cache_entry(q, c) {
                    assert!(cache.contains(&e.as_str()), "{e} is not in cache.cu");
                    named += 1;
                }
            }
            for op in [FusedOp::AddRmsNorm, FusedOp::SiluMul, FusedOp::RotaryQk] {
                assert!(fused.contains(&fused_entry(op, q).as_str()), "{op:?} {q:?}");
                named += 1;
            }
        }
        // And nothing is built that no name reaches.
        assert_eq!(named, attn.len() + cache.len() + fused.len());
        assert_eq!(attention_entry(Dt::F16, Dt::F32, 64), None, "f16 queries over an f32 cache are not built");
    }

    #[test]
    fn the_images_are_fatbins_for_sm_80_and_sm_90() {
        for image in [ATTENTION, CACHE, FUSED] {
            // The fatbin header's magic number, 0xBA55ED50, little-endian.
            assert_eq!(&image[..4], &[0x50, 0xED, 0x55, 0xBA]);
        }
        assert!(ARCHS.contains(&"80") && ARCHS.contains(&"90"), "{ARCHS:?}");
    }
}
