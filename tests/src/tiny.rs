//! Tiny random llama models written in Hugging Face layout, for format and parallelism tests.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Mixtral-layout experts per layer (0: a dense MLP) and experts per token.
    pub experts: usize,
    pub top_k: usize,
    /// Qwen 3 layout: per-head `q_norm`/`k_norm`; with experts, Qwen 3 MoE's naming
    /// (`mlp.gate`, `mlp.experts.N.{gate,up,down}_proj`), `norm_topk_prob: false` and layer 1
    /// (of more than one) dense (`mlp_only_layers: [1]`).
    pub qwen3: bool,
}

impl Default for TinyShape {
    fn default() -> Self {
        Self { vocab: 128, hidden: 64, inter: 96, layers: 4, heads: 8, kv_heads: 4, experts: 0, top_k: 0, qwen3: false }
    }
}

/// Random weights (seeded by candle's RNG state; values are only compared within a run).
pub fn tiny_weights(s: TinyShape) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let hd = s.hidden / s.heads;
    let r = |shape: &[usize]| Tensor::randn(0f32, 0.2, shape, &dev).expect("randn");
    let ones = |n: usize| (Tensor::ones(n, DType::F32, &dev).expect("ones") + r(&[n])).expect("norm");
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), r(&[s.vocab, s.hidden]));
    w.insert("model.norm.weight".to_string(), ones(s.hidden));
    w.insert("lm_head.weight".to_string(), r(&[s.vocab, s.hidden]));
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        w.insert(format!("{p}.input_layernorm.weight"), ones(s.hidden));
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones(s.hidden));
        w.insert(format!("{p}.self_attn.q_proj.weight"), r(&[s.heads * hd, s.hidden]));
        w.insert(format!("{p}.self_attn.k_proj.weight"), r(&[s.kv_heads * hd, s.hidden]));
        w.insert(format!("{p}.self_attn.v_proj.weight"), r(&[s.kv_heads * hd, s.hidden]));
        w.insert(format!("{p}.self_attn.o_proj.weight"), r(&[s.hidden, s.heads * hd]));
        if s.qwen3 {
            w.insert(format!("{p}.self_attn.q_norm.weight"), ones(hd));
            w.insert(format!("{p}.self_attn.k_norm.weight"), ones(hd));
        }
        if s.experts == 0 || (s.qwen3 && i == 1) {
            w.insert(format!("{p}.mlp.gate_proj.weight"), r(&[s.inter, s.hidden]));
            w.insert(format!("{p}.mlp.up_proj.weight"), r(&[s.inter, s.hidden]));
            w.insert(format!("{p}.mlp.down_proj.weight"), r(&[s.hidden, s.inter]));
            continue;
        }
        let (m, [gate, up, down]) = if s.qwen3 {
            (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"])
        } else {
            (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"])
        };
        // A sharper router than the experts' noise, so that routing is not decided by a tie.
        w.insert(format!("{m}.gate.weight"), (r(&[s.experts, s.hidden]) * 5.0).expect("scale"));
        // Experts at half the dense scale: two of them add up per token.
        let half = |shape: &[usize]| (r(shape) * 0.5).expect("scale");
        for e in 0..s.experts {
            w.insert(format!("{m}.experts.{e}.{gate}.weight"), half(&[s.inter, s.hidden]));
            w.insert(format!("{m}.experts.{e}.{up}.weight"), half(&[s.inter, s.hidden]));
            w.insert(format!("{m}.experts.{e}.{down}.weight"), half(&[s.hidden, s.inter]));
        }
    }
    w
}

/// `config.json` text for a tiny shape.
pub fn tiny_config(s: TinyShape) -> String {
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.inter,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": false,
    });
    match (s.experts > 0, s.qwen3) {
        (false, false) => {}
        (true, false) => {
            v["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
            v["num_local_experts"] = s.experts.into();
            v["num_experts_per_tok"] = s.top_k.into();
        }
        (false, true) => {
            v["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
            v["head_dim"] = (s.hidden / s.heads).into();
        }
        (true, true) => {
            v["architectures"] = serde_json::json!(["Qwen3MoeForCausalLM"]);
            v["head_dim"] = (s.hidden / s.heads).into();
            v["num_experts"] = s.experts.into();
            v["num_experts_per_tok"] = s.top_k.into();
            v["moe_intermediate_size"] = s.inter.into();
            v["norm_topk_prob"] = false.into();
            v["decoder_sparse_step"] = 1.into();
            v["mlp_only_layers"] = if s.layers > 1 { serde_json::json!([1]) } else { serde_json::json!([]) };
        }
    }
    v.to_string()
}

/// Write `weights` into `dir` as `shards` safetensors files (with an index when > 1).
pub fn write_hf(dir: &Path, s: TinyShape, weights: &HashMap<String, Tensor>, shards: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), tiny_config(s)).expect("config");
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    if shards <= 1 {
        candle_core::safetensors::save(weights, dir.join("model.safetensors")).expect("save");
        return;
    }
    let mut map = serde_json::Map::new();
    for (k, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|n| ((*n).clone(), weights[*n].clone())).collect();
        candle_core::safetensors::save(&part, dir.join(&file)).expect("save shard");
        for n in chunk {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
}
