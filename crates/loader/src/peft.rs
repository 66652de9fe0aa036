//! PEFT LoRA adapters: a directory with `adapter_config.json` and `adapter_model.safetensors`
//! (tensors named `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), served
//! to the model under Hugging Face names (`model.layers.N.self_attn.q_proj.lora_A.weight`).
//!
//! Only what serving without merging supports is accepted: LoRA (not DoRA or other PEFT
//! types) on the attention and MLP projections, no bias, no `modules_to_save`; anything else
//! is an error naming the field or tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use tessera_models::{LoraConfig, ModelError, Weight, WeightSource, LORA_TARGETS};

use crate::{LoadError, Result};

#[derive(Deserialize)]
struct RawAdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

/// An adapter read from disk: its config and its tensors (small: kept in memory).
pub struct PeftAdapter {
    pub config: LoraConfig,
    tensors: HashMap<String, Tensor>,
    dir: String,
}

impl std::fmt::Debug for PeftAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeftAdapter({}, r={})", self.dir, self.config.rank)
    }
}

/// The Hugging Face name of a PEFT tensor name, or why it cannot be served.
fn hf_name(peft: &str) -> std::result::Result<String, String> {
    let name = peft.strip_prefix("base_model.model.").unwrap_or(peft).replace(".default.", ".");
    let ok = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .filter(|(layer, _)| layer.parse::<usize>().is_ok())
        .and_then(|(_, rest)| rest.split_once('.'))
        .filter(|(module, _)| *module == "self_attn" || *module == "mlp")
        .and_then(|(_, rest)| rest.split_once('.'))
        .is_some_and(|(target, rest)| {
            LORA_TARGETS.contains(&target) && (rest == "lora_A.weight" || rest == "lora_B.weight")
        });
    match ok {
        true => Ok(name),
        false => Err(format!(
            "tensor `{peft}` is not a LoRA factor of a supported projection ({}); embedding, lm_head and \
             bias adapters are not supported",
            LORA_TARGETS.join(", ")
        )),
    }
}

impl PeftAdapter {
    /// Read and check the adapter in `dir`, its tensors as `dtype` on `device`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let what = dir.display().to_string();
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                LoadError::NotFound(format!("{}: not a PEFT adapter (no adapter_config.json)", what))
            }
            _ => LoadError::io(&cfg_path, e),
        })?;
        let raw: RawAdapterConfig =
            serde_json::from_str(&text).map_err(|e| LoadError::Format(format!("{}: {e}", cfg_path.display())))?;
        let bad = |m: String| Err(LoadError::Format(format!("{}: {m}", cfg_path.display())));
        if let Some(t) = raw.peft_type.as_deref().filter(|t| !t.eq_ignore_ascii_case("lora")) {
            return bad(format!("peft_type `{t}` is not supported (only LORA)"));
        }
        if raw.use_dora {
            return bad("DoRA adapters (use_dora) are not supported".into());
        }
        if raw.r == 0 {
            return bad("r must be > 0".into());
        }
        if let Some(b) = raw.bias.as_deref().filter(|b| *b != "none") {
            return bad(format!("bias `{b}` is not supported (only \"none\")"));
        }
        if raw.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad("modules_to_save is not supported (only LoRA factors)".into());
        }
        let file = dir.join("adapter_model.safetensors");
        if !file.is_file() {
            return Err(LoadError::NotFound(format!(
                "{what}: adapter_model.safetensors is missing (adapter_model.bin is not read: convert it to safetensors)"
            )));
        }
        let raw_tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| LoadError::candle(format!("{}: reading safetensors", file.display()), e))?;
        let mut tensors = HashMap::with_capacity(raw_tensors.len());
        for (name, t) in raw_tensors {
            let hf = hf_name(&name).map_err(|m| LoadError::Format(format!("{}: {m}", file.display())))?;
            let t = t.to_dtype(dtype).map_err(|e| LoadError::candle(format!("{}: {name}", file.display()), e))?;
            tensors.insert(hf, t);
        }
        if tensors.is_empty() {
            return Err(LoadError::Format(format!("{}: holds no tensors", file.display())));
        }
        let config = LoraConfig { rank: raw.r, alpha: raw.lora_alpha, rslora: raw.use_rslora };
        Ok(Self { config, tensors, dir: what })
    }
}

impl WeightSource for PeftAdapter {
    fn get(&self, name: &str) -> tessera_models::Result<Weight> {
        self.tensors
            .get(name)
            .map(|t| Weight::Dense(t.clone()))
            .ok_or_else(|| ModelError::MissingWeight(format!("{name} (in adapter {})", self.dir)))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face_and_others_are_refused() {
        assert_eq!(
            hf_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            hf_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight").unwrap(),
            "model.layers.0.mlp.down_proj.lora_B.weight"
        );
        for bad in [
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.bias",
        ] {
            let e = hf_name(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("q_proj"), "{e}");
        }
    }
}
