//! Rotary position embedding (non-interleaved, Hugging Face layout) with `rope_theta` and
//! `rope_scaling`. Positions are per token, so one call serves a batch that mixes sequences.

use candle_core::{DType, Device, Tensor};

use crate::{ModelConfig, Result, RopeScaling};

/// Precomputed cos/sin tables, `[max_positions, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

/// Inverse frequencies, computed in f32 exactly as candle's and llama.cpp-matching GGUF
/// implementations do: quantized activations make the forward pass sensitive to the last
/// bit of the rotary tables, and greedy parity with the reference depends on it.
fn inv_freqs(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let theta = cfg.rope_theta as f32;
    let base: Vec<f32> = (0..d).step_by(2).map(|i| 1f32 / theta.powf(i as f32 / d as f32)).collect();
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Default) => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .map(|f| f as f32)
                .collect()
        }
    }
}

impl Rotary {
    /// Build tables for positions `0..max_positions`.
    pub fn new(cfg: &ModelConfig, max_positions: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let inv = inv_freqs(cfg);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), dev)?.to_dtype(dtype)?;
        Ok(Self { cos, sin, interleaved: cfg.rope_interleaved })
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Gather the cos/sin rows of `positions` (`[T]`, u32) once per forward.
    pub fn tables_for(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }

    /// Rotate `x` of shape `[T, heads, head_dim]` with per-token tables from [`Self::tables_for`]
    /// (the reference op; the forward pass goes through the checked kernels).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::fused::reference::rotary(x, cos, sin, self.interleaved)
    }
}
