//! Shared layers: linear (dense or quantized, optional bias), RMSNorm, embedding and the
//! gated SwiGLU MLP.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use tessera_kernels::{QMatrix, QType};

use crate::fused::Kernels;
use crate::lora::{add_lora, LoraRows, Target};
use crate::{Activation, ModelError, Result, Shard, Weight, WeightSource};

/// How a [`Linear`] multiplies: candle's matmul (dense weights, other devices, and the
/// quantized types our kernels do not have yet), or our quantized CPU kernel.
#[derive(Debug, Clone)]
enum Matmul {
    Candle(QMatMul),
    Kernel(Arc<QMatrix>),
}

/// `y = x Wᵀ (+ b)`; `W` is `[out, in]`, dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    w: Matmul,
    b: Option<Tensor>,
}

/// Our kernel's copy of a quantized CPU weight, if it has the type and shape.
fn kernel_matrix(q: &QTensor) -> Result<Option<QMatrix>> {
    let ty = match q.dtype() {
        GgmlDType::Q4_0 => QType::Q4_0,
        GgmlDType::Q4_1 => QType::Q4_1,
        GgmlDType::Q5_0 => QType::Q5_0,
        GgmlDType::Q5_1 => QType::Q5_1,
        GgmlDType::Q8_0 => QType::Q8_0,
        GgmlDType::Q4K => QType::Q4K,
        GgmlDType::Q5K => QType::Q5K,
        // Q6_K stays on candle's QMatMul: our Q6_K tile (tested, benchmarked) is not yet
        // packed and is slower than candle's AVX2 kernel at 8 and more rows.
        _ => return Ok(None),
    };
    let [rows, cols] = q.shape().dims()[..] else { return Ok(None) };
    if !q.device().is_cpu() || !cols.is_multiple_of(ty.block_elems()) {
        return Ok(None);
    }
    Ok(Some(QMatrix::new(ty, rows, cols, q.data()?.to_vec()).map_err(kernel_err)?))
}

pub(crate) fn kernel_err(e: tessera_kernels::KernelError) -> ModelError {
    ModelError::Config(format!("quantized matmul: {e}"))
}

impl Linear {
    pub fn from_weight(w: Weight, b: Option<Tensor>) -> Result<Self> {
        let w = match w {
            Weight::Dense(t) => Matmul::Candle(QMatMul::Tensor(t)),
            Weight::Quant(q) => match kernel_matrix(&q)? {
                Some(m) => Matmul::Kernel(Arc::new(m)),
                None => Matmul::Candle(QMatMul::from_arc(q)?),
            },
        };
        Ok(Self { w, b })
    }

    /// Load `{prefix}.weight` of shape `[out, in]` and, if `bias`, `{prefix}.bias`.
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_shard(src, prefix, out, inp, bias, dtype, Shard::FULL)
    }

    /// Load one rank's part of `{prefix}.weight` (full shape `[out, in]`): `shard.dim` 0 is
    /// column-parallel (a slice of the outputs, with its slice of the bias), 1 is row-parallel
    /// (a slice of the inputs; the bias is kept by part 0 only, so the sum over ranks adds it once).
    #[allow(clippy::too_many_arguments)]
    pub fn load_shard(
        src: &dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        dtype: DType,
        shard: Shard,
    ) -> Result<Self> {
        let w = src.get_shard(&format!("{prefix}.weight"), &[out, inp], shard)?;
        let b = match (bias, shard.dim) {
            (false, _) => None,
            (true, 0) => Some(src.get_shard(&format!("{prefix}.bias"), &[out], shard)?.dense(dtype)?),
            (true, _) if shard.index == 0 => Some(src.get_checked(&format!("{prefix}.bias"), &[out])?.dense(dtype)?),
            (true, _) => None,
        };
        Self::from_weight(w, b)
    }

    /// Apply to `x` of shape `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            Matmul::Candle(w) => w.forward(x)?,
            Matmul::Kernel(w) => kernel_forward(w, x)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections that share an input (q/k/v, gate/up): fused into one matmul at load time when
/// our kernel holds them all in one type (one activation quantization, one pass over the
/// pool), otherwise applied one by one.
#[derive(Debug, Clone)]
pub(crate) enum SharedInput {
    Fused { w: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl SharedInput {
    pub(crate) fn new(parts: Vec<Linear>) -> Self {
        let mats: Option<Vec<&QMatrix>> = parts
            .iter()
            .map(|p| match (&p.w, &p.b) {
                (Matmul::Kernel(m), None) => Some(m.as_ref()),
                _ => None,
            })
            .collect();
        match mats.map(|m| (m.iter().map(|m| m.rows()).collect(), QMatrix::concat_rows(&m))) {
            Some((widths, Ok(m))) if parts.len() > 1 => {
                SharedInput::Fused { w: Linear { w: Matmul::Kernel(Arc::new(m)), b: None }, widths }
            }
            _ => SharedInput::Separate(parts),
        }
    }

    /// Each projection of `x`, in the order given to [`SharedInput::new`] (contiguous).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_lora(x, &[], 0, &[])
    }

    /// [`SharedInput::forward`] plus the LoRA deltas of `groups` for layer `layer`, projection
    /// `i` being `targets[i]` (added to the fused output before it is split).
    pub(crate) fn forward_lora(
        &self,
        x: &Tensor,
        groups: &[LoraRows],
        layer: usize,
        targets: &[Target],
    ) -> Result<Vec<Tensor>> {
        match self {
            SharedInput::Separate(parts) => parts
                .iter()
                .enumerate()
                .map(|(i, p)| match (groups.is_empty(), targets.get(i)) {
                    (false, Some(&t)) => add_lora(p.forward(x)?, x, groups, layer, &[(t, 0)]),
                    _ => p.forward(x),
                })
                .collect(),
            SharedInput::Fused { w, widths } => {
                let mut y = w.forward(x)?;
                if !groups.is_empty() {
                    let offsets = widths.iter().scan(0, |at, &n| {
                        let o = *at;
                        *at += n;
                        Some(o)
                    });
                    let parts: Vec<(Target, usize)> = targets.iter().copied().zip(offsets).collect();
                    y = add_lora(y, x, groups, layer, &parts)?;
                }
                let last = y.rank() - 1;
                let mut at = 0;
                widths
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(last, at, n)?.contiguous()?;
                        at += n;
                        Ok(part)
                    })
                    .collect()
            }
        }
    }
}

/// `gelu(gate) · up` over the rows of a fused `[gate (inter) | up (inter)]` output, with
/// ggml's CPU arithmetic (GELU-tanh of the gate rounded to f16, from its f16 table): what
/// llama.cpp computes for GGUF models. On the CPU our kernel; elsewhere the same roundings
/// through candle ops.
fn gelu_mul_ggml(gu: &Tensor, inter: usize) -> Result<Tensor> {
    let rows = gu.elem_count() / (2 * inter).max(1);
    if !gu.device().is_cpu() {
        let g = gu.narrow(1, 0, inter)?.to_dtype(DType::F16)?.to_dtype(DType::F32)?.gelu()?;
        let u = gu.narrow(1, inter, inter)?.to_dtype(DType::F32)?;
        return Ok((g.to_dtype(DType::F16)?.to_dtype(DType::F32)? * u)?.to_dtype(gu.dtype())?);
    }
    let dtype = gu.dtype();
    let x = gu.to_dtype(DType::F32)?.contiguous()?;
    let out = with_cpu_f32(&x, |data| {
        let mut out = vec![0f32; rows * inter];
        tessera_kernels::gelu_mul_ggml(data, rows, inter, &mut out).map_err(kernel_err)?;
        Ok(out)
    })?;
    Ok(Tensor::from_vec(out, (rows, inter), x.device())?.to_dtype(dtype)?)
}

/// `x [m, k] · Wᵀ` through our kernel (f32 in and out; other dtypes are converted).
fn kernel_forward(w: &QMatrix, x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let dims = x.dims().to_vec();
    let k = dims.last().copied().unwrap_or(0);
    let m = x.elem_count() / k.max(1);
    if k != w.cols() {
        return Err(ModelError::Config(format!("linear of {} inputs applied to {k}", w.cols())));
    }
    let out = with_cpu_f32(&x, |data| {
        let mut out = Vec::with_capacity(m * w.rows());
        w.matmul_uninit(data, m, out.spare_capacity_mut()).map_err(kernel_err)?;
        // SAFETY: `matmul_uninit` wrote all `m × rows` outputs (it fails otherwise).
        unsafe { out.set_len(m * w.rows()) };
        Ok(out)
    })?;
    let mut shape = dims;
    if let Some(last) = shape.last_mut() {
        *last = w.rows();
    }
    Ok(Tensor::from_vec(out, shape, x.device())?.to_dtype(dtype)?)
}

/// `f` over the values of a contiguous f32 tensor on the CPU, read in place.
pub fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if !t.is_contiguous() {
        return Err(ModelError::Config("a CPU kernel was handed a non-contiguous tensor".into()));
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Config("a CPU kernel was handed a tensor on another device".into()));
    };
    let start = layout.start_offset();
    f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()])
}

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(src: &dyn WeightSource, name: &str, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        let w = src.get_checked(name, &[dim])?.dense(dtype)?;
        Ok(Self { w, eps: eps as f32 })
    }

    /// [`RmsNorm::load`] of a weight stored as an offset from 1 when `offset` (Gemma).
    pub fn load_offset(
        src: &dyn WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        dtype: DType,
        offset: bool,
    ) -> Result<Self> {
        let n = Self::load(src, name, dim, eps, DType::F32)?;
        let w = if offset { (n.w + 1.0)? } else { n.w };
        Ok(Self { w: w.to_dtype(dtype)?, eps: n.eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.w, self.eps)?)
    }

    /// The residual step: `(x + delta, norm(x + delta))`, on the checked fused kernel when
    /// there is one (one pass on the CPU).
    pub fn add_forward(&self, kernels: &Kernels, x: &Tensor, delta: &Tensor) -> Result<(Tensor, Tensor)> {
        kernels.add_rms_norm(x, delta, &self.w, self.eps)
    }
}

/// Layer norm with bias (the encoders'): `(x − mean) / sqrt(var + eps) · w + b`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// `{prefix}.weight` and `{prefix}.bias`, each `[dim]`.
    pub fn load(src: &dyn WeightSource, prefix: &str, dim: usize, eps: f64, dtype: DType) -> Result<Self> {
        let w = src.get_checked(&format!("{prefix}.weight"), &[dim])?.dense(dtype)?;
        let b = src.get_checked(&format!("{prefix}.bias"), &[dim])?.dense(dtype)?;
        Ok(Self { w, b, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.w, &self.b, self.eps)?)
    }
}

/// Token embedding table `[vocab, hidden]`, or one rank's rows `start..start + rows` of it
/// (vocabulary-parallel). A quantized table on the CPU stays quantized: a lookup dequantizes
/// just the rows it gathers (a 262k-token vocabulary is 170 MB as Q8_0, 670 MB as f32).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    start: usize,
    full: bool,
}

#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor),
    /// Rows of whole quantization blocks, dequantized to `dtype` on lookup.
    Quant(Arc<QTensor>, DType),
}

impl Embedding {
    /// From a loaded weight: quantized CPU tables stay quantized, others become dense `dtype`.
    /// Not `full`, it holds rows `start..` of the vocabulary: [`Embedding::forward`] then gives
    /// zero rows for ids held by other ranks, and the sum over ranks is the full lookup.
    pub fn from_weight(w: &Weight, dtype: DType, start: usize, full: bool) -> Result<Self> {
        let table = match w {
            Weight::Quant(q) if q.device().is_cpu() && q.shape().dims().len() == 2 => Table::Quant(q.clone(), dtype),
            w => Table::Dense(w.dense(dtype)?),
        };
        Ok(Self { table, start, full })
    }

    fn rows(&self) -> Result<usize> {
        Ok(match &self.table {
            Table::Dense(t) => t.dim(0)?,
            Table::Quant(q, _) => q.shape().dims()[0],
        })
    }

    /// Rows `ids` (all within the table) as `[n, hidden]`.
    fn gather(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.table {
            Table::Dense(t) => Ok(t.index_select(ids, 0)?),
            Table::Quant(q, dtype) => {
                let dims = q.shape().dims();
                let (rows, cols) = (dims[0], dims[1]);
                let data = q.data()?;
                let row_bytes = data.len() / rows.max(1);
                let ids: Vec<u32> = ids.to_vec1()?;
                let mut bytes = Vec::with_capacity(ids.len() * row_bytes);
                for &i in &ids {
                    let at = i as usize * row_bytes;
                    let row = data.get(at..at + row_bytes).ok_or_else(|| {
                        ModelError::Config(format!("token id {i} is outside the embedding's {rows} rows"))
                    })?;
                    bytes.extend_from_slice(row);
                }
                let dev = q.device();
                let part = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    q.dtype(),
                    &bytes,
                    vec![ids.len(), cols],
                    &dev,
                )?;
                Ok(part.dequantize(&dev)?.to_dtype(*dtype)?)
            }
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if self.full {
            return self.gather(ids);
        }
        let rows = self.rows()?;
        let (lo, hi) = (self.start as u32, (self.start + rows) as u32);
        let ids: Vec<u32> = ids.to_vec1()?;
        let local: Vec<u32> = ids.iter().map(|&i| if (lo..hi).contains(&i) { i - lo } else { 0 }).collect();
        let mask: Vec<f32> = ids.iter().map(|&i| if (lo..hi).contains(&i) { 1.0 } else { 0.0 }).collect();
        let dev = match &self.table {
            Table::Dense(t) => t.device().clone(),
            Table::Quant(q, _) => q.device(),
        };
        let local = Tensor::from_vec(local, ids.len(), &dev)?;
        let rows = self.gather(&local)?;
        let mask = Tensor::from_vec(mask, (ids.len(), 1), &dev)?.to_dtype(rows.dtype())?;
        Ok(rows.broadcast_mul(&mask)?)
    }
}

/// Gated MLP: `down(silu(gate(x)) * up(x))`. Sharded, each rank holds a slice of the
/// intermediate dimension and returns a partial sum (the caller all-reduces).
#[derive(Debug, Clone)]
pub struct GatedMlp {
    /// gate and up.
    gate_up: SharedInput,
    down: Linear,
    /// The gate's activation (SiLU: SwiGLU; GELU-tanh: GeGLU).
    act: Activation,
}

impl GatedMlp {
    /// Part `index` of `count` of the intermediate dimension (`count` 1: the whole MLP).
    pub fn load(
        src: &dyn WeightSource,
        prefix: &str,
        hidden: usize,
        inter: usize,
        dtype: DType,
        index: usize,
        count: usize,
    ) -> Result<Self> {
        Self::load_named(src, prefix, ["gate_proj", "up_proj", "down_proj"], hidden, inter, dtype, index, count)
    }

    /// [`GatedMlp::load`] with the projections' names (`w1`, `w3`, `w2` for Mixtral experts).
    #[allow(clippy::too_many_arguments)]
    pub fn load_named(
        src: &dyn WeightSource,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        inter: usize,
        dtype: DType,
        index: usize,
        count: usize,
    ) -> Result<Self> {
        let (col, row) = (Shard::new(0, index, count), Shard::new(1, index, count));
        Ok(Self {
            gate_up: SharedInput::new(vec![
                Linear::load_shard(src, &format!("{prefix}.{gate}"), inter, hidden, false, dtype, col)?,
                Linear::load_shard(src, &format!("{prefix}.{up}"), inter, hidden, false, dtype, col)?,
            ]),
            down: Linear::load_shard(src, &format!("{prefix}.{down}"), hidden, inter, false, dtype, row)?,
            act: Activation::Silu,
        })
    }

    /// The same MLP with the gate's activation `act`.
    pub fn with_activation(mut self, act: Activation) -> Self {
        self.act = act;
        self
    }

    /// `act(gate) · up`.
    fn gated(&self, g: &Tensor, u: Tensor) -> Result<Tensor> {
        Ok(match self.act {
            Activation::Silu => (g.silu()? * u)?,
            Activation::GeluTanh => (g.gelu()? * u)?,
            Activation::GeluTanhGgml => {
                let gu = Tensor::cat(&[g, &u], 1)?;
                gelu_mul_ggml(&gu, g.dim(1)?)?
            }
        })
    }

    pub fn forward(&self, kernels: &Kernels, x: &Tensor) -> Result<Tensor> {
        // The fused projection's rows feed one activation·mul (one pass on the CPU, no split copies).
        if let SharedInput::Fused { w, widths } = &self.gate_up {
            if let &[g, u] = &widths[..] {
                match self.act {
                    Activation::Silu if g == u => return self.down.forward(&kernels.silu_mul(&w.forward(x)?, g)?),
                    Activation::GeluTanhGgml if g == u => return self.down.forward(&gelu_mul_ggml(&w.forward(x)?, g)?),
                    _ => {}
                }
            }
        }
        let [g, u]: [Tensor; 2] =
            self.gate_up.forward(x)?.try_into().map_err(|_| ModelError::Config("gate/up projection count".into()))?;
        self.down.forward(&self.gated(&g, u)?)
    }

    /// [`GatedMlp::forward`] with the LoRA deltas of layer `layer` for the rows of `groups`
    /// (added to the fused gate/up output, so the fused silu·mul still runs).
    pub(crate) fn forward_lora(
        &self,
        kernels: &Kernels,
        x: &Tensor,
        groups: &[LoraRows],
        layer: usize,
    ) -> Result<Tensor> {
        let act = match &self.gate_up {
            SharedInput::Fused { w, widths }
                if widths.len() == 2 && widths[0] == widths[1] && self.act == Activation::Silu =>
            {
                let g = widths[0];
                let gu = add_lora(w.forward(x)?, x, groups, layer, &[(Target::Gate, 0), (Target::Up, g)])?;
                kernels.silu_mul(&gu, g)?
            }
            _ => {
                let [g, u]: [Tensor; 2] = self
                    .gate_up
                    .forward_lora(x, groups, layer, &[Target::Gate, Target::Up])?
                    .try_into()
                    .map_err(|_| ModelError::Config("gate/up projection count".into()))?;
                self.gated(&g, u)?
            }
        };
        add_lora(self.down.forward(&act)?, &act, groups, layer, &[(Target::Down, 0)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    use super::*;

    /// Our kernel behind `Linear` against candle's `QMatMul` on the same blocks: both follow
    /// ggml's arithmetic, so they agree up to summation order.
    #[test]
    fn kernel_linear_tracks_candle_qmatmul() {
        let dev = Device::Cpu;
        // SmolLM2's 576 columns for the 32-element types; the K-quants need whole 256s.
        let (w576, x576) =
            (Tensor::randn(0f32, 1.0, (64, 576), &dev).unwrap(), Tensor::randn(0f32, 1.0, (5, 576), &dev).unwrap());
        let (w512, x512) =
            (Tensor::randn(0f32, 1.0, (64, 512), &dev).unwrap(), Tensor::randn(0f32, 1.0, (5, 512), &dev).unwrap());
        for ty in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
        ] {
            let (w, x) = if ty.block_size() == 256 { (&w512, &x512) } else { (&w576, &x576) };
            let q = Arc::new(QTensor::quantize(w, ty).unwrap());
            let ours = Linear::from_weight(Weight::Quant(q.clone()), None).unwrap();
            let Matmul::Kernel(m) = &ours.w else { panic!("{ty:?} should run on our kernel") };
            // Our block decoding is candle's (ggml's) to the bit.
            let theirs = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
            for (r, row) in theirs.iter().enumerate() {
                assert_eq!(&m.dequantize_row(r), row, "{ty:?} row {r} decodes as ggml's");
            }
            let a = ours.forward(x).unwrap();
            let b = QMatMul::from_arc(q.clone()).unwrap().forward(x).unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // Candle's Q8_1 keeps `s` as f16(Σq)·f16(d) multiplied in f16 where ggml (and we)
            // round d·Σq once, so the types with a minimum differ by that rounding.
            let tol = if matches!(ty, GgmlDType::Q4_1 | GgmlDType::Q5_1) { 3e-3 } else { 1e-3 };
            assert!(diff <= tol * scale, "{ty:?}: max |Δ| {diff} (outputs up to {scale})");
        }
        let q6 = Arc::new(QTensor::quantize(&w512, GgmlDType::Q6K).unwrap());
        let l = Linear::from_weight(Weight::Quant(q6), None).unwrap();
        assert!(matches!(l.w, Matmul::Candle(_)), "Q6_K stays on candle until our kernel is faster");
    }

    /// A quantized table looked up row by row equals the dense lookup of the same table, whole
    /// and as two vocabulary shards (ids of the other shard give zero rows).
    #[test]
    fn quantized_embedding_rows_equal_the_dense_lookup() {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (10, 64), &dev).unwrap();
        let q = Weight::Quant(Arc::new(QTensor::quantize(&table, GgmlDType::Q8_0).unwrap()));
        let dense = q.dense(candle_core::DType::F32).unwrap();
        let ids = Tensor::new(&[3u32, 0, 9, 3], &dev).unwrap();
        let want = dense.index_select(&ids, 0).unwrap();
        let whole = Embedding::from_weight(&q, candle_core::DType::F32, 0, true).unwrap();
        assert!(matches!(whole.table, Table::Quant(..)));
        let got = whole.forward(&ids).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let half = |start: usize| {
            let w = Weight::Quant(q_rows(&table, start));
            Embedding::from_weight(&w, candle_core::DType::F32, start, false).unwrap().forward(&ids).unwrap()
        };
        let sum = (half(0) + half(5)).unwrap();
        assert_eq!(sum.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        assert!(whole.forward(&Tensor::new(&[10u32], &dev).unwrap()).is_err(), "an id past the table is an error");
    }

    fn q_rows(table: &Tensor, start: usize) -> Arc<QTensor> {
        // A copy: candle quantizes a view's whole storage.
        let rows = table.narrow(0, start, 5).unwrap().force_contiguous().unwrap();
        Arc::new(QTensor::quantize(&rows, GgmlDType::Q8_0).unwrap())
    }
}
