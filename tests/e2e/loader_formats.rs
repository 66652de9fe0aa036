//! Hugging Face directories: single-file and sharded safetensors load the same model; bad
//! files give errors that name the file, tensor or field.

use candle_core::{DType, Device};
use tessera_loader::SafetensorsSource;
use tessera_models::{Llama, ModelConfig};
use tessera_runner::{SampleSpec, SamplingConfig, SeqStep, StepPlan, Worker};
use tessera_tests::tiny::{tiny_config, tiny_weights, write_hf, TinyShape};

fn logits(dir: &std::path::Path) -> Vec<f32> {
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let src = SafetensorsSource::open(dir, DType::F32, &Device::Cpu).unwrap();
    let model = Llama::load(&cfg, &src, 128, DType::F32, &Device::Cpu).unwrap();
    let mut w = Worker::new(model, 8, 16, DType::F32).unwrap();
    let plan = StepPlan {
        seqs: vec![SeqStep {
            prompt_logprobs: None,
            lora: None,
            seq_id: 1,
            tokens: vec![1, 5, 9, 3, 7],
            start_pos: 0,
            block_table: vec![0],
            sample: Some(SampleSpec {
                config: SamplingConfig::default(),
                output_index: 0,
                history: vec![],
                prompt_len: 0,
            }),
        }],
        lora_ops: vec![],
    };
    w.forward_logits(&plan).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn load_err(dir: &std::path::Path) -> String {
    let cfg = match ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let src = match SafetensorsSource::open(dir, DType::F32, &Device::Cpu) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    match Llama::load(&cfg, &src, 128, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_and_single_file_give_the_same_model() {
    let tmp = std::env::temp_dir().join(format!("tessera-fmt-{}", std::process::id()));
    let s = TinyShape::default();
    let w = tiny_weights(s);
    write_hf(&tmp.join("single"), s, &w, 1);
    write_hf(&tmp.join("sharded"), s, &w, 3);
    assert!(tmp.join("sharded/model.safetensors.index.json").is_file());
    let (a, b) = (logits(&tmp.join("single")), logits(&tmp.join("sharded")));
    assert_eq!(a.len(), s.vocab);
    assert_eq!(a, b);

    // Index naming a missing shard.
    std::fs::remove_file(tmp.join("sharded/model-00002-of-00003.safetensors")).unwrap();
    let e = load_err(&tmp.join("sharded"));
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");

    // A config that disagrees with the weights names the tensor and both shapes.
    let bad = TinyShape { inter: 100, ..s };
    std::fs::write(tmp.join("single/config.json"), tiny_config(bad)).unwrap();
    let e = load_err(&tmp.join("single"));
    assert!(e.contains("mlp.gate_proj.weight") && e.contains("[96, 64]") && e.contains("[100, 64]"), "{e}");

    // A truncated file is rejected at open, naming the directory.
    let f = tmp.join("single/model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(tmp.join("single/config.json"), tiny_config(s)).unwrap();
    let e = load_err(&tmp.join("single"));
    assert!(e.contains("single"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// GGUF shards read straight from the file equal the whole tensor sliced, for row and
/// column cuts, in the file's q/k order and in Hugging Face order.
#[test]
fn gguf_shards_read_from_the_file_equal_sliced_tensors() {
    use tessera_loader::GgufSource;
    use tessera_models::{Shard, Weight, WeightSource};
    let path = tessera_tests::smollm2_gguf();
    let dense = |w: Weight| w.dense(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for hf in [false, true] {
        let src = GgufSource::open(&path, DType::F32, &Device::Cpu).unwrap();
        let src = if hf { src.into_hf_order() } else { src };
        let cases = [
            ("model.layers.3.self_attn.q_proj.weight", [576, 576], Shard::new(0, 1, 3)),
            ("model.layers.3.self_attn.k_proj.weight", [192, 576], Shard::new(0, 2, 3)),
            ("model.layers.3.self_attn.o_proj.weight", [576, 576], Shard::new(1, 2, 3)),
            ("model.layers.5.mlp.down_proj.weight", [576, 1536], Shard::new(1, 1, 3)),
            ("model.embed_tokens.weight", [49152, 576], Shard::new(0, 2, 3)),
        ];
        for (name, full, shard) in cases {
            let direct = src.get_shard(name, &full, shard).unwrap();
            assert!(matches!(direct, Weight::Quant(_)), "{name}: stays quantized");
            let sliced = src.get_shard_by_narrowing(name, &full, shard).unwrap();
            assert_eq!(direct.dims(), sliced.dims(), "{name}");
            assert_eq!(dense(direct), dense(sliced), "{name} (hf order {hf})");
        }
    }
}
