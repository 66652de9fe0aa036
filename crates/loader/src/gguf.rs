//! GGUF files: metadata → [`ModelConfig`], tensors kept quantized (as `QTensor`) and served
//! under their Hugging Face names. llama.cpp stores q/k projection rows permuted for its
//! interleaved rotary layout. The model keeps that layout (`rope_interleaved`): with
//! quantized activations the forward pass is sensitive to summation order, and keeping
//! llama.cpp's order is what makes greedy output match it. [`unpermute_rows`] (lossless:
//! rows are whole quantization blocks) converts to Hugging Face order for `export-hf`.

use std::borrow::Cow;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device};
use tessera_models::{shard_byte_runs, ModelConfig, ModelError, Shard, Weight, WeightSource};

use crate::{LoadError, Result};

/// A GGUF model file opened for reading.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    config: ModelConfig,
    arch: String,
    dtype: DType,
    device: Device,
    /// Serve q/k in Hugging Face row order (for export) instead of the file's.
    hf_order: bool,
}

fn md<'a>(c: &'a Content, key: &str, path: &Path) -> Result<&'a Value> {
    c.metadata.get(key).ok_or_else(|| LoadError::Format(format!("{}: GGUF metadata lacks `{key}`", path.display())))
}

fn md_usize(c: &Content, key: &str, path: &Path) -> Result<usize> {
    let v = md(c, key, path)?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|e| LoadError::Format(format!("{}: GGUF `{key}`: {e}", path.display())))
}

fn md_f64(c: &Content, key: &str, path: &Path) -> Result<Option<f64>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_f32()
            .map(|x| Some(x as f64))
            .or_else(|_| v.to_f64().map(Some))
            .map_err(|e| LoadError::Format(format!("{}: GGUF `{key}`: {e}", path.display()))),
    }
}

/// Map a Hugging Face tensor name to its GGUF name in a file of architecture `arch`
/// (Gemma 3's MLP input norm is `ffn_norm`, where llama's is its `post_attention_layernorm`).
fn gguf_name(hf: &str, arch: &str) -> Option<String> {
    let direct = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "lm_head.weight" => Some("output.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gemma = arch == "gemma3";
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Undo llama.cpp's q/k row permutation (rows `[h, j, i]` → `[h, i, j]`, `i ∈ {0,1}`).
fn unpermute_rows(q: &QTensor, n_head: usize) -> candle_core::Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let rows = dims[0];
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let dst = (h * hd + i * half + j) * row_bytes;
                let src = (h * hd + 2 * j + i) * row_bytes;
                out[dst..dst + row_bytes].copy_from_slice(&data[src..src + row_bytes]);
            }
        }
    }
    QTensor::new(QStorage::from_data(Cow::Owned(out), &q.device(), q.dtype())?, dims)
}

/// Gemma 3's features as llama.cpp reads them: GELU-tanh (with ggml's f16 rounding, as
/// llama.cpp computes it for this file), scaled embeddings, sandwich norms
/// (weights already offset by the converter), sliding window every layer but each 6th, local
/// rotary base 10 000, attention scale `1/sqrt(head_dim)`.
fn style(c: &Content, arch: &str, path: &Path) -> Result<tessera_models::DecoderStyle> {
    if arch != "gemma3" {
        return Ok(Default::default());
    }
    let window = md_usize(c, "gemma3.attention.sliding_window", path).ok();
    // llama.cpp: Gemma 3 27B (62 layers) scales scores by 1/sqrt(hidden / heads), the others by
    // 1/sqrt(head_dim).
    let layers = md_usize(c, "gemma3.block_count", path)?;
    let per_head =
        md_usize(c, "gemma3.embedding_length", path)? / md_usize(c, "gemma3.attention.head_count", path)?.max(1);
    Ok(tessera_models::DecoderStyle {
        activation: tessera_models::Activation::GeluTanhGgml,
        scale_embeddings: true,
        sandwich_norms: true,
        norm_offset: false,
        sliding_window: window.map(|w| (w, 6)),
        rope_local_theta: Some(10_000.0),
        query_pre_attn_scalar: (layers == 62).then_some(per_head as f64),
    })
}

/// `{arch}.rope.scaling.*`: linear scaling (Gemma 3's global layers at 4B and up), or none.
fn rope_scaling(c: &Content, arch: &str, path: &Path) -> Result<Option<tessera_models::RopeScaling>> {
    let kind = c.metadata.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok().cloned());
    let factor = md_f64(c, &format!("{arch}.rope.scaling.factor"), path)?;
    match (kind.as_deref(), factor) {
        (None | Some("none"), _) => Ok(None),
        (Some("linear"), Some(f)) if f > 0.0 => Ok(Some(tessera_models::RopeScaling::Linear { factor: f })),
        (Some(other), f) => Err(LoadError::Format(format!(
            "{}: GGUF `{arch}.rope.scaling.type` = {other} (factor {f:?}) is not supported (linear)",
            path.display()
        ))),
    }
}

impl GgufSource {
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let f = File::open(path).map_err(|e| LoadError::io(path, e))?;
        let content = Content::read(&mut BufReader::new(f))
            .map_err(|e| LoadError::candle(format!("{}: not a readable GGUF file", path.display()), e))?;
        let arch = md(&content, "general.architecture", path)?
            .to_string()
            .map_err(|e| LoadError::Format(format!("{}: general.architecture: {e}", path.display())))?
            .clone();
        let architecture = match arch.as_str() {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "gemma3" => "Gemma3ForCausalLM",
            other => {
                return Err(LoadError::Format(format!(
                    "{}: unsupported GGUF architecture `{other}` (supported: llama, qwen2, gemma3)",
                    path.display()
                )))
            }
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = md_usize(&content, &k("embedding_length"), path)?;
        let heads = md_usize(&content, &k("attention.head_count"), path)?;
        let kv_heads = md_usize(&content, &k("attention.head_count_kv"), path).unwrap_or(heads);
        let head_dim = md_usize(&content, &k("rope.dimension_count"), path)
            .or_else(|_| md_usize(&content, &k("attention.key_length"), path))
            .unwrap_or(hidden / heads.max(1));
        let vocab = match md_usize(&content, &k("vocab_size"), path) {
            Ok(v) => v,
            Err(_) => md(&content, "tokenizer.ggml.tokens", path)?
                .to_vec()
                .map_err(|e| LoadError::Format(format!("{}: tokenizer.ggml.tokens: {e}", path.display())))?
                .len(),
        };
        let config = ModelConfig {
            architecture: architecture.to_string(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: md_usize(&content, &k("feed_forward_length"), path)?,
            num_layers: md_usize(&content, &k("block_count"), path)?,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rms_norm_eps: md_f64(&content, &k("attention.layer_norm_rms_epsilon"), path)?.unwrap_or(1e-5),
            rope_theta: md_f64(&content, &k("rope.freq_base"), path)?.unwrap_or(10_000.0),
            rope_scaling: rope_scaling(&content, &arch, path)?,
            max_position_embeddings: md_usize(&content, &k("context_length"), path).unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            rope_interleaved: arch == "llama",
            bos_token_id: md_usize(&content, "tokenizer.ggml.bos_token_id", path).ok().map(|x| x as u32),
            eos_token_ids: md_usize(&content, "tokenizer.ggml.eos_token_id", path)
                .ok()
                .map(|x| vec![x as u32])
                .unwrap_or_default(),
            moe: None,
            style: style(&content, &arch, path)?,
        };
        config.validate().map_err(|e| LoadError::Format(format!("{}: {e}", path.display())))?;
        Ok(Self { path: path.to_path_buf(), content, config, arch, dtype, device: device.clone(), hf_order: false })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Serve weights in Hugging Face layout (q/k rows un-permuted, `rope_interleaved` off).
    pub fn into_hf_order(mut self) -> Self {
        self.hf_order = true;
        self.config.rope_interleaved = false;
        self
    }

    pub fn content(&self) -> &Content {
        &self.content
    }

    /// Read one tensor by its GGUF name, in the file's layout.
    pub fn qtensor(&self, gguf: &str) -> Result<QTensor> {
        let f = File::open(&self.path).map_err(|e| LoadError::io(&self.path, e))?;
        self.content
            .tensor(&mut BufReader::new(f), gguf, &self.device)
            .map_err(|e| LoadError::candle(format!("{}: tensor {gguf}", self.path.display()), e))
    }

    /// Read one tensor by its GGUF name with llama q/k rows in Hugging Face order.
    pub fn qtensor_hf_order(&self, gguf: &str) -> Result<QTensor> {
        let q = self.qtensor(gguf)?;
        if self.arch != "llama" || !gguf.ends_with(".weight") {
            return Ok(q);
        }
        let heads = if gguf.ends_with("attn_q.weight") {
            self.config.num_heads
        } else if gguf.ends_with("attn_k.weight") {
            self.config.num_kv_heads
        } else {
            return Ok(q);
        };
        unpermute_rows(&q, heads).map_err(|e| LoadError::candle(format!("{}: tensor {gguf}", self.path.display()), e))
    }
}

impl WeightSource for GgufSource {
    fn get(&self, name: &str) -> tessera_models::Result<Weight> {
        let g = gguf_name(name, &self.arch)
            .filter(|g| self.content.tensor_infos.contains_key(g))
            .ok_or_else(|| ModelError::MissingWeight(format!("{name} (in {})", self.path.display())))?;
        let q = if self.hf_order { self.qtensor_hf_order(&g) } else { self.qtensor(&g) }
            .map_err(|e| ModelError::Source(e.to_string()))?;
        match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let t = q.dequantize(&self.device).and_then(|t| t.to_dtype(self.dtype));
                t.map(Weight::Dense)
                    .map_err(|e| ModelError::Source(format!("{}: tensor {g}: {e}", self.path.display())))
            }
            _ => Ok(Weight::Quant(Arc::new(q))),
        }
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name, &self.arch).is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }

    /// Reads only the shard's quantization blocks from the file: whole rows for `dim` 0, a
    /// block-aligned run of every row for `dim` 1. Anything else (1-D or float tensors, cuts
    /// inside a block) takes the whole tensor and slices it.
    fn get_shard(&self, name: &str, full: &[usize], shard: Shard) -> tessera_models::Result<Weight> {
        match self.read_shard(name, full, shard) {
            Ok(Some(w)) => Ok(w),
            Ok(None) => self.get_shard_by_narrowing(name, full, shard),
            Err(e) => Err(ModelError::Source(e.to_string())),
        }
    }
}

impl GgufSource {
    fn read_shard(&self, name: &str, full: &[usize], shard: Shard) -> Result<Option<Weight>> {
        let Some(g) = gguf_name(name, &self.arch) else { return Ok(None) };
        let Some(info) = self.content.tensor_infos.get(&g) else { return Ok(None) };
        let (dt, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        let float = matches!(dt, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let [rows, cols] = dims[..] else { return Ok(None) };
        if shard.is_full() || float || dims != full {
            return Ok(None);
        }
        let (a, b) = shard.range(full[shard.dim]);
        let Some((runs, shape)) = shard_byte_runs([rows, cols], (dt.block_size(), dt.type_size()), shard.dim, (a, b))
        else {
            return Ok(None);
        };
        let base = self.content.tensor_data_offset + info.offset;
        let f = File::open(&self.path).map_err(|e| LoadError::io(&self.path, e))?;
        let mut bytes = vec![0u8; runs.iter().map(|r| r.len()).sum()];
        let mut at = 0;
        for r in runs {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut bytes[at..at + r.len()], base + r.start as u64)
                .map_err(|e| LoadError::io(&self.path, e))?;
            at += r.len();
        }
        let fail = |e| LoadError::candle(format!("{}: tensor {g}", self.path.display()), e);
        let mut q = candle_core::quantized::ggml_file::qtensor_from_ggml(dt, &bytes, shape.to_vec(), &self.device)
            .map_err(fail)?;
        // Shards of whole heads: llama's q/k permutation stays within each head.
        let heads = if g.ends_with("attn_q.weight") {
            self.config.num_heads
        } else if g.ends_with("attn_k.weight") {
            self.config.num_kv_heads
        } else {
            0
        };
        if self.hf_order && self.arch == "llama" && heads > 0 && shard.dim == 0 {
            let per_head = rows / heads;
            if !a.is_multiple_of(per_head) || !(b - a).is_multiple_of(per_head) {
                return Ok(None);
            }
            q = unpermute_rows(&q, (b - a) / per_head).map_err(fail)?;
        }
        Ok(Some(Weight::from_quant_shard(q, shard.dim).map_err(|e| LoadError::Format(e.to_string()))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_we_need() {
        let g = |n: &str, arch: &str| gguf_name(n, arch);
        assert_eq!(g("model.layers.3.self_attn.q_proj.weight", "llama").as_deref(), Some("blk.3.attn_q.weight"));
        assert_eq!(g("model.layers.12.mlp.down_proj.weight", "llama").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(g("model.norm.weight", "llama").as_deref(), Some("output_norm.weight"));
        assert_eq!(g("model.layers.x", "llama"), None);
        // The MLP's input norm: llama's post_attention_layernorm, Gemma 3's pre_feedforward_layernorm.
        assert_eq!(
            g("model.layers.0.post_attention_layernorm.weight", "llama").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            g("model.layers.0.pre_feedforward_layernorm.weight", "gemma3").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            g("model.layers.0.post_attention_layernorm.weight", "gemma3").as_deref(),
            Some("blk.0.post_attention_norm.weight")
        );
        assert_eq!(g("model.layers.1.self_attn.k_norm.weight", "gemma3").as_deref(), Some("blk.1.attn_k_norm.weight"));
    }

    /// Permuting like llama.cpp's converter and then un-permuting gives back the rows.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> candle_core::Result<()> {
        let (n_head, hd, cols) = (3usize, 4usize, 32usize);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        // llama.cpp: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)
        let mut permuted = vec![0f32; rows * cols];
        for h in 0..n_head {
            for i in 0..2 {
                for j in 0..hd / 2 {
                    let src = h * hd + i * hd / 2 + j;
                    let dst = h * hd + 2 * j + i;
                    permuted[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let t = candle_core::Tensor::from_vec(permuted, (rows, cols), &Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::F32)?;
        let back = unpermute_rows(&q, n_head)?.dequantize(&Device::Cpu)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, hf);
        Ok(())
    }

    /// Gemma 3's larger files scale the global layers' rotary linearly (read, not dropped);
    /// a scaling we do not implement is refused by name.
    #[test]
    fn rope_scaling_is_read_or_refused() {
        use candle_core::quantized::gguf_file::VersionedMagic;
        let content = |kind: &str, factor: f32| Content {
            magic: VersionedMagic::GgufV3,
            metadata: [
                ("gemma3.rope.scaling.type".to_string(), Value::String(kind.into())),
                ("gemma3.rope.scaling.factor".to_string(), Value::F32(factor)),
            ]
            .into_iter()
            .collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        let p = Path::new("m.gguf");
        assert_eq!(
            rope_scaling(&content("linear", 8.0), "gemma3", p).unwrap(),
            Some(tessera_models::RopeScaling::Linear { factor: 8.0 })
        );
        assert_eq!(rope_scaling(&content("none", 0.0), "gemma3", p).unwrap(), None);
        let e = rope_scaling(&content("yarn", 4.0), "gemma3", p).unwrap_err().to_string();
        assert!(e.contains("yarn") && e.contains("m.gguf"), "{e}");
    }
}
