//! Sizing a worker: the context length, the KV cache's element type and how many blocks of it
//! fit the budget, checked against the model and the parallel layout.

use candle_core::{DType, Device};
use tessera_models::{HeadLayout, KvCache};

use crate::args::{parse_bytes, DTypeArg, ServeArgs};
use crate::ServeError;

/// `--kv-cache-dtype`: `auto` is f16 on the CPU, the model's dtype elsewhere.
pub(crate) fn pick_kv_dtype(d: DTypeArg, model: DType, dev: &Device) -> DType {
    match d {
        DTypeArg::Auto if dev.is_cpu() => DType::F16,
        DTypeArg::Auto => model,
        other => crate::serve::pick_dtype(other, dev),
    }
}

/// Context length, KV blocks per rank, bytes per block and the cache's element type,
/// checked against the model.
pub(crate) struct Sizing {
    pub max_model_len: usize,
    pub num_blocks: usize,
    pub per_block: usize,
    pub kv_dtype: DType,
}

pub(crate) fn size_engine(
    a: &ServeArgs,
    cfg: &tessera_models::ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Sizing, ServeError> {
    let kv_dtype = pick_kv_dtype(a.kv_cache_dtype, dtype, device);
    let max_model_len = a.max_model_len.unwrap_or(cfg.max_position_embeddings);
    if max_model_len == 0 || max_model_len > cfg.max_position_embeddings {
        return Err(ServeError::Config(format!(
            "--max-model-len {max_model_len} must be in 1..={} (the model's max_position_embeddings)",
            cfg.max_position_embeddings
        )));
    }
    if !a.chunked_prefill() && a.max_num_batched_tokens < max_model_len {
        return Err(ServeError::Config(format!(
            "with chunked prefill off, --max-num-batched-tokens ({}) must be >= --max-model-len ({max_model_len})",
            a.max_num_batched_tokens
        )));
    }
    let heads = HeadLayout::new(cfg, 0, a.tensor_parallel_size)
        .map_err(|e| ServeError::Config(format!("--tensor-parallel-size: {e}")))?;
    let pp = a.pipeline_parallel_size;
    if pp > cfg.num_layers {
        return Err(ServeError::Config(format!(
            "--pipeline-parallel-size {pp} exceeds the model's {} layers",
            cfg.num_layers
        )));
    }
    let kv_bytes = parse_bytes(&a.kv_cache_memory).map_err(ServeError::Config)? as usize;
    // Every rank has the same block count; a stage holds at most ceil(layers / pp) layers.
    let stage_layers = cfg.num_layers.div_ceil(pp);
    let per_block = KvCache::bytes_per_block(stage_layers, a.block_size, heads.kv_heads, cfg.head_dim, kv_dtype);
    let num_blocks = kv_bytes / per_block;
    if num_blocks * a.block_size < max_model_len {
        return Err(ServeError::Config(format!(
            "--kv-cache-memory {} holds {} tokens, fewer than --max-model-len {max_model_len}; \
             raise --kv-cache-memory or lower --max-model-len",
            a.kv_cache_memory,
            num_blocks * a.block_size
        )));
    }
    Ok(Sizing { max_model_len, num_blocks, per_block, kv_dtype })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        use clap::Parser;
        let argv = ["tessera", "serve", "m", "--max-model-len", "256", "--kv-cache-memory", "8MiB"];
        let argv = argv.iter().chain(extra).map(|s| s.to_string()).collect::<Vec<_>>();
        match crate::args::Cli::parse_from(argv).command {
            crate::args::Command::Serve(a) => *a,
            other => panic!("not serve: {other:?}"),
        }
    }

    fn config() -> tessera_models::ModelConfig {
        tessera_models::ModelConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 512}"#,
        )
        .expect("config")
    }

    /// `--kv-cache-dtype auto` is f16 on the CPU, and the same memory then holds twice the
    /// blocks of an f32 cache.
    #[test]
    fn kv_cache_dtype_sizes_the_cache() {
        let (cfg, cpu) = (config(), Device::Cpu);
        let auto = size_engine(&args(&[]), &cfg, DType::F32, &cpu).expect("auto");
        assert_eq!(auto.kv_dtype, DType::F16);
        let f32 = size_engine(&args(&["--kv-cache-dtype", "float32"]), &cfg, DType::F32, &cpu).expect("f32");
        assert_eq!(f32.kv_dtype, DType::F32);
        assert_eq!(auto.num_blocks, 2 * f32.num_blocks);
        assert_eq!(f32.per_block, 2 * auto.per_block);
        let bf16 = size_engine(&args(&["--kv-cache-dtype", "bf16"]), &cfg, DType::F32, &cpu).expect("bf16");
        assert_eq!(bf16.kv_dtype, DType::BF16);
        assert_eq!(pick_kv_dtype(DTypeArg::Auto, DType::BF16, &cpu), DType::F16);
    }

    #[test]
    fn unknown_kv_cache_dtypes_are_refused() {
        use clap::Parser;
        let argv = ["tessera", "serve", "m", "--kv-cache-dtype", "fp8"];
        let err = crate::args::Cli::try_parse_from(argv).expect_err("fp8 is not a cache type here");
        assert!(err.to_string().contains("--kv-cache-dtype"), "{err}");
    }
}
