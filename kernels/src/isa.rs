//! Which instruction set the kernels run on: detected once, may be lowered (never raised) by
//! `TESSERA_KERNELS=scalar|avx2|avxvnni` for debugging and for the tests' forced-scalar runs.

use std::sync::OnceLock;

/// A kernel implementation family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust: the reference every other path is tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (Haswell / Zen and later).
    Avx2,
    /// AVX2 code with AVX-VNNI's VEX-encoded `vpdpbusd` (Alder Lake, Sapphire Rapids, Zen 5).
    AvxVnni,
    /// AVX2 code with the AVX-512 VNNI `vpdpbusd` integer dot product: 512-bit for the packed
    /// GEMM (two groups of 8 columns per vector), 256-bit (AVX512VL) elsewhere.
    Avx512Vnni,
}

impl Isa {
    /// An error unless this CPU can run `self` (kernels check it before any unsafe dispatch).
    pub fn ensure_available(self) -> crate::Result<()> {
        if Self::available().contains(&self) {
            return Ok(());
        }
        Err(crate::KernelError::Unsupported(format!("{self:?} is not available on this CPU")))
    }

    /// Every path this CPU can run, best last (the tests run each of them); detected once.
    pub fn available() -> &'static [Isa] {
        static AVAILABLE: OnceLock<Vec<Isa>> = OnceLock::new();
        AVAILABLE.get_or_init(Self::detect)
    }

    fn detect() -> Vec<Isa> {
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                out.push(Isa::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    out.push(Isa::AvxVnni);
                }
                if is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                {
                    out.push(Isa::Avx512Vnni);
                }
            }
        }
        out
    }

    /// The best available path, lowered by `TESSERA_KERNELS` if set (read once per process).
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Isa::available().iter().copied().max().unwrap_or(Isa::Scalar);
            match std::env::var("TESSERA_KERNELS").ok().as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => best.min(Isa::Avx2),
                Some("avxvnni") => best.min(Isa::AvxVnni),
                _ => best,
            }
        })
    }

    /// A name for the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar (no SIMD)",
            Isa::Avx2 => "AVX2+FMA",
            Isa::AvxVnni => "AVX2+FMA with AVX-VNNI dot products",
            Isa::Avx512Vnni => "AVX2+FMA with AVX-512 VNNI dot products (512-bit GEMM)",
        }
    }
}
