//! Random PEFT LoRA adapters for llama-family configs, written the way PEFT saves them
//! (`adapter_config.json` + `adapter_model.safetensors`, `base_model.model.` names).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use tessera_models::ModelConfig;

pub const TARGETS: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];
pub const RANK: usize = 8;
pub const ALPHA: f64 = 16.0;

/// `[out, in]` of each target projection of a llama-family config.
pub fn shapes(cfg: &ModelConfig) -> [[usize; 2]; 7] {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    [[q, h], [kv, h], [kv, h], [h, q], [i, h], [i, h], [h, i]]
}

/// A random rank-8 PEFT adapter for `cfg` in `dir`; returns each target's `scale·B·A` by its
/// base weight's name (what merging adds).
pub fn write_adapter(dir: &Path, cfg: &ModelConfig, std: f32) -> HashMap<String, Tensor> {
    write_adapter_of_rank(dir, cfg, std, RANK)
}

pub fn write_adapter_of_rank(dir: &Path, cfg: &ModelConfig, std: f32, rank: usize) -> HashMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let (mut tensors, mut deltas) = (HashMap::new(), HashMap::new());
    let scale = ALPHA / rank as f64;
    for l in 0..cfg.num_layers {
        for ((module, proj), [out, inp]) in TARGETS.iter().zip(shapes(cfg)) {
            let p = format!("model.layers.{l}.{module}.{proj}");
            let a = Tensor::randn(0f32, std, (rank, inp), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, std, (out, rank), &Device::Cpu).unwrap();
            deltas.insert(format!("{p}.weight"), (b.matmul(&a).unwrap() * scale).unwrap());
            tensors.insert(format!("base_model.model.{p}.lora_A.weight"), a);
            tensors.insert(format!("base_model.model.{p}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": rank, "lora_alpha": ALPHA, "bias": "none", "use_rslora": false,
        "target_modules": TARGETS.iter().map(|t| t.1).collect::<Vec<_>>(), "modules_to_save": null,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM"
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    deltas
}
