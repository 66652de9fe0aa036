//! Derive a Hugging Face-layout copy of a GGUF model: `config.json`, f32 safetensors with
//! q/k in Hugging Face row order, and the tokenizer files. Used to test the safetensors
//! path on real weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{GgufSource, LoadError, Result, TokenizerBundle};

/// Hugging Face names of every tensor a llama-family model of this config has.
fn hf_names(cfg: &tessera_models::ModelConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for i in 0..cfg.num_layers {
        for m in [
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{i}.{m}"));
        }
        if cfg.attention_bias {
            for p in ["q", "k", "v"] {
                names.push(format!("model.layers.{i}.self_attn.{p}_proj.bias"));
            }
        }
    }
    names
}

/// Write the Hugging Face copy of `gguf` into `out_dir` (created if missing).
pub fn export_hf(gguf: &Path, out_dir: &Path) -> Result<()> {
    use tessera_models::WeightSource;
    let dev = Device::Cpu;
    let src = GgufSource::open(gguf, DType::F32, &dev)?.into_hf_order();
    let tok = TokenizerBundle::from_gguf(src.content(), gguf)?;
    std::fs::create_dir_all(out_dir).map_err(|e| LoadError::io(out_dir, e))?;
    let cfg = src.config();
    if cfg.style != tessera_models::DecoderStyle::default() {
        return Err(LoadError::Format(format!(
            "{}: export-hf writes llama-family copies; a {} GGUF is served as it is",
            gguf.display(),
            cfg.architecture
        )));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in hf_names(cfg) {
        let w = src.get(&name)?;
        tensors.insert(name, w.dense(DType::F32)?);
    }
    let st = out_dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st)
        .map_err(|e| LoadError::candle(format!("{}: writing", st.display()), e))?;
    let cp = out_dir.join("config.json");
    let text = serde_json::to_vec_pretty(&cfg.to_hf_json()).unwrap_or_default();
    std::fs::write(&cp, text).map_err(|e| LoadError::io(&cp, e))?;
    tok.write_hf_files(out_dir)
}
