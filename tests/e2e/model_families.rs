//! Model families through the seam, on tiny random checkpoints written in each family's real
//! layout: Qwen 3 dense (per-head query/key norms), Qwen 3 MoE (`mlp.experts.N`, a dense
//! layer among the sparse ones, no top-k renormalisation) and Mixtral (`block_sparse_moe`).
//! and Gemma 3 from a Hugging Face config (GELU-tanh, norms stored as offsets from 1, sandwich
//! norms, query/key norms, scaled embeddings, sliding-window layers with their own rotary base,
//! `query_pre_attn_scalar`). The served logits, over a prefill of 4 sequences and 20 greedy
//! decode steps, equal a plain dense forward written here (no cache, no kernels, each sequence
//! whole), and TP = 2 equals TP = 1.

use std::collections::HashMap;

use candle_core::{Device, Tensor, D};
use tessera_tests::steps::{max_diff, reference, run_tp};
use tessera_tests::tiny::{tiny_weights, write_hf, TinyShape};

/// The logits of `tokens`' last position under a plain forward of the tiny checkpoint `w`
/// (rotary in Hugging Face layout, theta 10000; RMSNorm eps 1e-5). Query/key norms when the
/// checkpoint has them; each layer's MLP dense or routed, by the names it has.
fn dense_forward(w: &HashMap<String, Tensor>, s: TinyShape, renormalize: bool, tokens: &[u32]) -> Vec<f32> {
    let (t, hd) = (tokens.len(), s.hidden / s.heads);
    let rms = |x: &Tensor, g: &str| -> Tensor {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&w[g]).unwrap()
    };
    let lin = |x: &Tensor, name: &str| x.matmul(&w[&format!("{name}.weight")].t().unwrap()).unwrap();
    let mlp = |x: &Tensor, p: &str, [g, u, d]: [&str; 3]| {
        let gate = lin(x, &format!("{p}.{g}"));
        lin(&(gate.silu().unwrap() * lin(x, &format!("{p}.{u}"))).unwrap(), &format!("{p}.{d}"))
    };
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect();
    let ang: Vec<f32> = (0..t).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
    let table = |f: fn(f32) -> f32| {
        Tensor::from_vec(ang.iter().map(|&a| f(a)).collect::<Vec<_>>(), (t, 1, hd / 2), &Device::Cpu).unwrap()
    };
    let (cos, sin) = (table(f32::cos), table(f32::sin));
    let rope = |x: &Tensor| -> Tensor {
        let (a, b) = (x.narrow(2, 0, hd / 2).unwrap(), x.narrow(2, hd / 2, hd / 2).unwrap());
        let ra = (a.broadcast_mul(&cos).unwrap() - b.broadcast_mul(&sin).unwrap()).unwrap();
        let rb = (a.broadcast_mul(&sin).unwrap() + b.broadcast_mul(&cos).unwrap()).unwrap();
        Tensor::cat(&[ra, rb], 2).unwrap()
    };
    let ids = Tensor::new(tokens, &Device::Cpu).unwrap();
    let mut x = w["model.embed_tokens.weight"].index_select(&ids, 0).unwrap();
    let mask: Vec<f32> =
        (0..t).flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let h = rms(&x, &format!("{p}.input_layernorm.weight"));
        let mut q = lin(&h, &format!("{p}.self_attn.q_proj")).reshape((t, s.heads, hd)).unwrap();
        let mut k = lin(&h, &format!("{p}.self_attn.k_proj")).reshape((t, s.kv_heads, hd)).unwrap();
        let v = lin(&h, &format!("{p}.self_attn.v_proj")).reshape((t, s.kv_heads, hd)).unwrap();
        if w.contains_key(&format!("{p}.self_attn.q_norm.weight")) {
            q = rms(&q, &format!("{p}.self_attn.q_norm.weight"));
            k = rms(&k, &format!("{p}.self_attn.k_norm.weight"));
        }
        let (q, k) = (rope(&q), rope(&k));
        let heads: Vec<Tensor> = (0..s.heads)
            .map(|hh| {
                let g = hh / (s.heads / s.kv_heads);
                let pick = |x: &Tensor, i: usize| x.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
                let (qh, kh, vh) = (pick(&q, hh), pick(&k, g), pick(&v, g));
                let scores = ((qh.matmul(&kh.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap() + &mask).unwrap();
                let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap().matmul(&vh).unwrap()
            })
            .collect();
        x = (x + lin(&Tensor::cat(&heads, 1).unwrap(), &format!("{p}.self_attn.o_proj"))).unwrap();
        let h = rms(&x, &format!("{p}.post_attention_layernorm.weight"));
        let m = if w.contains_key(&format!("{p}.mlp.gate_proj.weight")) {
            mlp(&h, &format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"])
        } else {
            let (moe, names) = if w.contains_key(&format!("{p}.mlp.gate.weight")) {
                (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"])
            } else {
                (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"])
            };
            // Every token through its top-k experts: softmax, top k, optionally renormalised.
            let probs: Vec<Vec<f32>> = softmax_rows(&lin(&h, &format!("{moe}.gate")));
            let rows: Vec<Tensor> = (0..t)
                .map(|r| {
                    let mut ids: Vec<usize> = (0..s.experts).collect();
                    ids.sort_by(|&a, &b| probs[r][b].total_cmp(&probs[r][a]));
                    ids.truncate(s.top_k);
                    let total: f32 = if renormalize { ids.iter().map(|&e| probs[r][e]).sum() } else { 1.0 };
                    let xr = h.narrow(0, r, 1).unwrap();
                    ids.iter().fold(xr.zeros_like().unwrap(), |acc, &e| {
                        let y = mlp(&xr, &format!("{moe}.experts.{e}"), names);
                        (acc + (y * (probs[r][e] / total) as f64).unwrap()).unwrap()
                    })
                })
                .collect();
            Tensor::cat(&rows, 0).unwrap()
        };
        x = (x + m).unwrap();
    }
    let last = rms(&x.narrow(0, t - 1, 1).unwrap(), "model.norm.weight");
    lin(&last, "lm_head").flatten_all().unwrap().to_vec1().unwrap()
}

/// Row-wise softmax, in f32, by hand.
fn softmax_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    rows.into_iter()
        .map(|r| {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = r.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.into_iter().map(|x| x / sum).collect()
        })
        .collect()
}

/// Write the family's checkpoint, serve it step by step through the seam, compare every
/// step's logits with the dense forward of each sequence so far, then TP = 2 with TP = 1.
fn check_family(name: &str, shape: TinyShape, renormalize: bool) {
    let w = tiny_weights(shape);
    let dir = std::env::temp_dir().join(format!("tessera-family-{}-{name}", std::process::id()));
    write_hf(&dir, shape, &w, 1);
    check_against(name, &dir, shape.vocab, |tokens| dense_forward(&w, shape, renormalize, tokens));
}

/// The served checkpoint in `dir` step by step against `dense` (each sequence's last-position
/// logits), then TP = 2 against TP = 1.
fn check_against(name: &str, dir: &std::path::Path, vocab: usize, dense: impl Fn(&[u32]) -> Vec<f32>) {
    let (plans, want) = reference(dir, vocab);
    let mut seqs: Vec<Vec<u32>> = vec![];
    let mut worst = 0f32;
    for (j, plan) in plans.iter().enumerate() {
        for (i, s) in plan.seqs.iter().enumerate() {
            if j == 0 {
                seqs.push(s.tokens.clone());
            } else {
                seqs[i].push(s.tokens[0]);
            }
            let dense = dense(&seqs[i]);
            let d = dense.iter().zip(&want[j][i]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            worst = worst.max(d);
        }
    }
    println!("{name}: served vs dense reference over {} steps: max |Δlogit| = {worst:e}", plans.len());
    assert!(worst < 1e-4, "{name}: served logits differ from the dense reference by {worst}");
    let d = max_diff(&run_tp(dir, 2, &plans), &want);
    println!("{name}: TP=2 vs TP=1: max |Δlogit| = {d:e}");
    assert!(d < 1e-4, "{name}: TP=2 differs from TP=1 by {d}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Gemma 3's window and sliding-layer period in the tiny checkpoint: layers 0 and 2 see their
/// last 5 positions (rotary base 10 000), layers 1 and 3 everything (base 1e6).
const GEMMA_WINDOW: usize = 5;

/// A plain Gemma 3 forward of the tiny checkpoint `w` (Hugging Face semantics: every RMSNorm
/// weight is `1 + w`, eps 1e-5).
fn dense_gemma3(w: &HashMap<String, Tensor>, s: TinyShape, qpas: f64, tokens: &[u32]) -> Vec<f32> {
    let (t, hd) = (tokens.len(), s.hidden / s.heads);
    let rms = |x: &Tensor, g: &str| -> Tensor {
        let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let gain = (&w[g] + 1.0).unwrap();
        x.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&gain).unwrap()
    };
    let lin = |x: &Tensor, name: &str| x.matmul(&w[&format!("{name}.weight")].t().unwrap()).unwrap();
    let tables = |theta: f32| {
        let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / theta.powf(2.0 * i as f32 / hd as f32)).collect();
        let ang: Vec<f32> = (0..t).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
        let table = |f: fn(f32) -> f32| {
            Tensor::from_vec(ang.iter().map(|&a| f(a)).collect::<Vec<_>>(), (t, 1, hd / 2), &Device::Cpu).unwrap()
        };
        (table(f32::cos), table(f32::sin))
    };
    let (local, global) = (tables(10_000.0), tables(1_000_000.0));
    let rope = |x: &Tensor, (cos, sin): &(Tensor, Tensor)| -> Tensor {
        let (a, b) = (x.narrow(2, 0, hd / 2).unwrap(), x.narrow(2, hd / 2, hd / 2).unwrap());
        let ra = (a.broadcast_mul(cos).unwrap() - b.broadcast_mul(sin).unwrap()).unwrap();
        let rb = (a.broadcast_mul(sin).unwrap() + b.broadcast_mul(cos).unwrap()).unwrap();
        Tensor::cat(&[ra, rb], 2).unwrap()
    };
    let ids = Tensor::new(tokens, &Device::Cpu).unwrap();
    let mut x = (w["model.embed_tokens.weight"].index_select(&ids, 0).unwrap() * (s.hidden as f64).sqrt()).unwrap();
    let mask = |window: usize| {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i || i - j >= window { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap()
    };
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let sliding = (l + 1) % 2 != 0;
        let h = rms(&x, &format!("{p}.input_layernorm.weight"));
        let q = lin(&h, &format!("{p}.self_attn.q_proj")).reshape((t, s.heads, hd)).unwrap();
        let k = lin(&h, &format!("{p}.self_attn.k_proj")).reshape((t, s.kv_heads, hd)).unwrap();
        let v = lin(&h, &format!("{p}.self_attn.v_proj")).reshape((t, s.kv_heads, hd)).unwrap();
        let tabs = if sliding { &local } else { &global };
        let q = rope(&rms(&q, &format!("{p}.self_attn.q_norm.weight")), tabs);
        let k = rope(&rms(&k, &format!("{p}.self_attn.k_norm.weight")), tabs);
        let m = mask(if sliding { GEMMA_WINDOW } else { usize::MAX });
        let heads: Vec<Tensor> = (0..s.heads)
            .map(|hh| {
                let g = hh / (s.heads / s.kv_heads);
                let pick = |x: &Tensor, i: usize| x.narrow(1, i, 1).unwrap().squeeze(1).unwrap();
                let (qh, kh, vh) = (pick(&q, hh), pick(&k, g), pick(&v, g));
                let scores = ((qh.matmul(&kh.t().unwrap()).unwrap() / qpas.sqrt()).unwrap() + &m).unwrap();
                let e = scores.broadcast_sub(&scores.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap().matmul(&vh).unwrap()
            })
            .collect();
        let o = lin(&Tensor::cat(&heads, 1).unwrap(), &format!("{p}.self_attn.o_proj"));
        x = (x + rms(&o, &format!("{p}.post_attention_layernorm.weight"))).unwrap();
        let h = rms(&x, &format!("{p}.pre_feedforward_layernorm.weight"));
        let gate = lin(&h, &format!("{p}.mlp.gate_proj")).gelu().unwrap();
        let mlp = lin(&(gate * lin(&h, &format!("{p}.mlp.up_proj"))).unwrap(), &format!("{p}.mlp.down_proj"));
        x = (x + rms(&mlp, &format!("{p}.post_feedforward_layernorm.weight"))).unwrap();
    }
    let last = rms(&x.narrow(0, t - 1, 1).unwrap(), "model.norm.weight");
    lin(&last, "lm_head").flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn tiny_gemma3_equals_a_dense_reference_and_tp_2_equals_tp_1() {
    let shape = TinyShape::default();
    let hd = shape.hidden / shape.heads;
    let mut w = tiny_weights(shape);
    let small = |n: usize| Tensor::randn(0f32, 0.1, n, &Device::Cpu).unwrap();
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        for (name, n) in [
            ("self_attn.q_norm", hd),
            ("self_attn.k_norm", hd),
            ("pre_feedforward_layernorm", shape.hidden),
            ("post_feedforward_layernorm", shape.hidden),
        ] {
            w.insert(format!("{p}.{name}.weight"), small(n));
        }
        // Stored as offsets from 1: small values, as Gemma checkpoints have.
        for name in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(format!("{p}.{name}.weight"), small(shape.hidden));
        }
    }
    w.insert("model.norm.weight".into(), small(shape.hidden));
    let dir = std::env::temp_dir().join(format!("tessera-family-{}-gemma3", std::process::id()));
    write_hf(&dir, shape, &w, 1);
    let qpas = 2.0 * hd as f64;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("architectures", serde_json::json!(["Gemma3ForCausalLM"])),
        ("model_type", "gemma3_text".into()),
        ("head_dim", hd.into()),
        ("hidden_activation", "gelu_pytorch_tanh".into()),
        ("sliding_window", GEMMA_WINDOW.into()),
        ("sliding_window_pattern", 2.into()),
        ("rope_theta", 1_000_000.0.into()),
        ("rope_local_base_freq", 10_000.0.into()),
        ("query_pre_attn_scalar", qpas.into()),
        ("tie_word_embeddings", false.into()),
    ] {
        cfg[k] = v;
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    check_against("gemma3", &dir, shape.vocab, |tokens| dense_gemma3(&w, shape, qpas, tokens));
}

#[test]
fn tiny_qwen3_equals_a_dense_reference_and_tp_2_equals_tp_1() {
    check_family("qwen3", TinyShape { qwen3: true, ..TinyShape::default() }, true);
}

#[test]
fn tiny_qwen3_moe_equals_a_dense_reference_and_tp_2_equals_tp_1() {
    let shape = TinyShape { qwen3: true, experts: 8, top_k: 2, ..TinyShape::default() };
    check_family("qwen3-moe", shape, false);
}

#[test]
fn tiny_mixtral_equals_a_dense_reference_and_tp_2_equals_tp_1() {
    check_family("mixtral", TinyShape { experts: 8, top_k: 2, ..TinyShape::default() }, true);
}

/// Each rank's share of the parallel plan, as the seam reports it: heads and KV heads split
/// (KV heads replicated when fewer than ranks), whole experts split under expert parallelism.
#[test]
fn ranks_report_their_share_of_the_parallel_plan() {
    use std::sync::Arc;

    use candle_core::{DType, Device};
    use tessera_models::{load_model, ModelConfig, ParallelPlan, PipelineParallel, TensorParallel};
    use tessera_parallel::TcpComm;

    let shape = TinyShape { qwen3: true, experts: 8, top_k: 2, kv_heads: 2, ..TinyShape::default() };
    let dir = std::env::temp_dir().join(format!("tessera-family-{}-plan", std::process::id()));
    write_hf(&dir, shape, &tiny_weights(shape), 1);
    let plans = |world: usize, ep: bool| -> Vec<ParallelPlan> {
        let group = TcpComm::local_group(world, Device::Cpu).unwrap();
        let handles: Vec<_> = group
            .into_iter()
            .map(|comm| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let cfg =
                        ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
                    let src = tessera_loader::SafetensorsSource::open(&dir, DType::F32, &Device::Cpu).unwrap();
                    let tp = TensorParallel::new(Arc::new(comm)).with_expert_parallel(ep);
                    let pp = PipelineParallel::single();
                    load_model(&cfg, &src, 64, DType::F32, &Device::Cpu, tp, pp).unwrap().parallel_plan()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let two = plans(2, true);
    for (r, p) in two.iter().enumerate() {
        assert_eq!(
            *p,
            ParallelPlan {
                tensor: (r, 2),
                stage: (0, 1),
                layers: 0..4,
                heads: (4, 8),
                kv_heads: (1, 2),
                kv_replicated: false,
                experts: Some((4, 8, true)),
            }
        );
    }
    let four = plans(4, false);
    assert!(four.iter().all(|p| p.kv_heads == (1, 2) && p.kv_replicated && p.experts == Some((8, 8, false))));
    println!("{}", four[3]);
    assert!(four[3].to_string().contains("tensor rank 3 of 4") && four[3].to_string().contains("(replicated)"));
    let _ = std::fs::remove_dir_all(&dir);
}
