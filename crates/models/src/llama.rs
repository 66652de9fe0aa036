//! The llama-family decoder (Llama 2/3, Mistral, Qwen 2, Qwen 3 dense and MoE, Mixtral,
//! SmolLM, and Gemma 3 through its [`crate::DecoderStyle`]: GELU-tanh MLP, scaled
//! embeddings, sandwich norms, query/key norms, interleaved sliding-window and global layers
//! with their own rotary bases) on the shared layers.
//! Stateless: the paged KV cache is passed to [`Llama::forward`].
//!
//! Tensor parallel (Megatron layout): q/k/v and gate/up are column-parallel (each rank its
//! heads / its slice of the intermediate dimension), o and down are row-parallel followed by an
//! all-reduce, the embedding and lm_head are vocabulary-parallel (masked lookup + all-reduce,
//! local logits + all-gather). KV heads are replicated when there are fewer than ranks.

use candle_core::{DType, Device, Tensor};

use crate::attention::StepTables;
use crate::fused::{KernelReport, Kernels, ServedShapes};
use crate::layers::{Embedding, GatedMlp, SharedInput};
use crate::lora::{adapts_mlp, add_lora, llama_layout, LoraAdapter, LoraConfig, Target};
use crate::moe::Moe;
use crate::{
    BatchInput, HeadLayout, KvCache, Linear, ModelConfig, ModelError, PipelineParallel, Result, RmsNorm, Rotary, Shard,
    TensorParallel, WeightSource,
};

#[derive(Debug, Clone)]
struct Attention {
    /// q, k and v.
    qkv: SharedInput,
    o: Linear,
    /// Per-head RMSNorm of queries and keys (Qwen 3), over `head_dim`.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
    /// Sandwich norms (Gemma): on the attention output and on the MLP output.
    post_attn_norm: Option<RmsNorm>,
    post_mlp_norm: Option<RmsNorm>,
    /// Sliding-window attention span, and whether the layer takes the local rotary tables.
    window: Option<usize>,
}

/// A dense MLP (its partial sums all-reduced by the caller) or a mixture of experts (which
/// completes its own output).
#[derive(Debug, Clone)]
enum Mlp {
    Dense(GatedMlp),
    Moe(Moe),
}

/// A llama-family decoder.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: ModelConfig,
    /// First pipeline stage only.
    embed: Option<Embedding>,
    /// This stage's layers (a contiguous range of the model's).
    blocks: Vec<Block>,
    /// Last pipeline stage only.
    norm: Option<RmsNorm>,
    lm_head: Option<Linear>,
    rotary: Rotary,
    /// The sliding-window layers' rotary tables (Gemma 3: their own base).
    rotary_local: Option<Rotary>,
    dtype: DType,
    device: Device,
    tp: TensorParallel,
    pp: PipelineParallel,
    heads: HeadLayout,
    /// The fused kernels that passed their check on this device (the reference for the rest).
    kernels: Kernels,
}

impl Llama {
    /// Build from a weight source. `max_positions` sizes the rotary tables.
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_parallel(cfg, src, max_positions, dtype, device, TensorParallel::single())
    }

    /// Build this rank's share of the model (only its slices of the weights are loaded).
    pub fn load_parallel(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        max_positions: usize,
        dtype: DType,
        device: &Device,
        tp: TensorParallel,
    ) -> Result<Self> {
        Self::load_pipelined(cfg, src, max_positions, dtype, device, tp, PipelineParallel::single())
    }

    /// Build this rank's share: its pipeline stage's layers, sliced for its tensor rank.
    pub fn load_pipelined(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        max_positions: usize,
        dtype: DType,
        device: &Device,
        tp: TensorParallel,
        pp: PipelineParallel,
    ) -> Result<Self> {
        cfg.validate()?;
        let layers = pp.layers(cfg.num_layers)?;
        let (rank, world) = (tp.rank(), tp.world());
        let heads = HeadLayout::new(cfg, rank, world)?;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let vocab = tp.shard(0);
        let untied = !cfg.tie_word_embeddings && src.contains("lm_head.weight");
        let embed_w = if pp.is_first() || (pp.is_last() && !untied) {
            Some(src.get_shard("model.embed_tokens.weight", &[cfg.vocab_size, h], vocab)?)
        } else {
            None
        };
        let embed = match (&embed_w, pp.is_first()) {
            (Some(w), true) => Some(Embedding::from_weight(w, dtype, vocab.range(cfg.vocab_size).0, world == 1)?),
            _ => None,
        };
        let lm_head = match (pp.is_last(), untied, embed_w) {
            (false, _, _) => None,
            (true, true, _) => Some(Linear::load_shard(src, "lm_head", cfg.vocab_size, h, false, dtype, vocab)?),
            (true, false, Some(w)) => Some(Linear::from_weight(w, None)?),
            (true, false, None) => return Err(ModelError::MissingWeight("model.embed_tokens.weight".into())),
        };
        let offset = cfg.style.norm_offset;
        let load_norm = |name: &str, dim: usize| RmsNorm::load_offset(src, name, dim, cfg.rms_norm_eps, dtype, offset);
        let norm = if pp.is_last() { Some(load_norm("model.norm.weight", h)?) } else { None };
        let (col, row) = (tp.shard(0), tp.shard(1));
        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let p = format!("model.layers.{i}");
            let b = cfg.attention_bias;
            let (nq, nkv, kv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd, heads.kv_shard);
            let attn = Attention {
                qkv: SharedInput::new(vec![
                    Linear::load_shard(src, &format!("{p}.self_attn.q_proj"), nq, h, b, dtype, col)?,
                    Linear::load_shard(src, &format!("{p}.self_attn.k_proj"), nkv, h, b, dtype, kv)?,
                    Linear::load_shard(src, &format!("{p}.self_attn.v_proj"), nkv, h, b, dtype, kv)?,
                ]),
                o: Linear::load_shard(src, &format!("{p}.self_attn.o_proj"), h, nq, false, dtype, row)?,
                qk_norm: if cfg.qk_norm() {
                    let norm = |n: &str| load_norm(&format!("{p}.self_attn.{n}.weight"), hd);
                    Some((norm("q_norm")?, norm("k_norm")?))
                } else {
                    None
                },
            };
            let sandwich = cfg.style.sandwich_norms;
            let (mlp_norm, post_attn_norm, post_mlp_norm) = if sandwich {
                (
                    load_norm(&format!("{p}.pre_feedforward_layernorm.weight"), h)?,
                    Some(load_norm(&format!("{p}.post_attention_layernorm.weight"), h)?),
                    Some(load_norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?),
                )
            } else {
                (load_norm(&format!("{p}.post_attention_layernorm.weight"), h)?, None, None)
            };
            blocks.push(Block {
                attn_norm: load_norm(&format!("{p}.input_layernorm.weight"), h)?,
                attn,
                mlp_norm,
                mlp: match cfg.moe_at(i) {
                    None => Mlp::Dense(
                        GatedMlp::load(src, &format!("{p}.mlp"), h, cfg.intermediate_size, dtype, rank, world)?
                            .with_activation(cfg.style.activation),
                    ),
                    Some(m) => Mlp::Moe(Moe::load(src, &p, h, m, dtype, &tp)?),
                },
                post_attn_norm,
                post_mlp_norm,
                window: cfg.window_at(i),
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rotary: Rotary::new(cfg, max_positions, dtype, device)?,
            rotary_local: match cfg.style.rope_local_theta {
                Some(theta) => {
                    let local = ModelConfig { rope_theta: theta, rope_scaling: None, ..cfg.clone() };
                    Some(Rotary::new(&local, max_positions, dtype, device)?)
                }
                None => None,
            },
            dtype,
            device: device.clone(),
            tp,
            pp,
            heads,
            kernels: Kernels::reference(),
        })
    }

    /// Load this rank's share of a LoRA adapter from `src` (Hugging Face names): its
    /// pipeline stage's layers, each projection's factor sliced like the base weight.
    pub fn load_lora(&self, name: &str, config: LoraConfig, src: &dyn WeightSource) -> Result<LoraAdapter> {
        let (rank, world) = (self.tp.rank(), self.tp.world());
        let (col, row) = (Shard::new(0, rank, world), Shard::new(1, rank, world));
        let layout = llama_layout(&self.cfg, col, row, self.heads.kv_shard);
        let layers = self.pp.layers(self.cfg.num_layers)?;
        let interleaved = self.cfg.rope_interleaved.then_some(self.cfg.head_dim);
        LoraAdapter::load(name, config, src, layers, layout, self.dtype, interleaved)
    }

    /// What this rank holds: its groups' places, layers, heads and experts.
    pub fn parallel_plan(&self) -> crate::ParallelPlan {
        let cfg = &self.cfg;
        let layers = self.pp.layers(cfg.num_layers).unwrap_or(0..cfg.num_layers);
        let experts = self.blocks.iter().find_map(|b| match &b.mlp {
            Mlp::Moe(m) => Some(m.held()),
            Mlp::Dense(_) => None,
        });
        crate::ParallelPlan {
            tensor: (self.tp.rank(), self.tp.world()),
            stage: (self.pp.stage, self.pp.stages),
            layers,
            heads: (self.heads.heads, cfg.num_heads),
            kv_heads: (self.heads.kv_heads, cfg.num_kv_heads),
            kv_replicated: self.heads.kv_heads * self.tp.world() > cfg.num_kv_heads,
            experts: experts.zip(cfg.moe.as_ref()).map(|((held, ep), m)| (held, m.experts, ep)),
        }
    }

    /// Check each fused kernel against its reference on this device at the served shapes,
    /// with a cache of `cache_dtype` in blocks of `block_size`, then let the tensor-parallel
    /// ranks vote (a collective: every rank of the group calls it). Until then every op runs
    /// its reference; the worker checks once, knowing the cache it serves.
    pub fn check_kernels(&mut self, cache_dtype: DType, block_size: usize) -> Result<()> {
        let cfg = &self.cfg;
        let shapes = ServedShapes {
            hidden: cfg.hidden_size,
            inter: {
                let (a, b) = crate::part(cfg.intermediate_size, self.tp.world(), self.tp.rank());
                (b - a).max(1)
            },
            eps: cfg.rms_norm_eps as f32,
            heads: self.heads.heads,
            kv_heads: self.heads.kv_heads,
            head_dim: cfg.head_dim,
            interleaved: cfg.rope_interleaved,
            block_size,
        };
        let checked = Kernels::check(Kernels::candidates(&self.device), &self.device, self.dtype, cache_dtype, shapes);
        self.kernels = checked.agree(&self.tp, &self.device)?;
        Ok(())
    }

    /// What the start-up check decided for each fused kernel (fused or reference, and why).
    pub fn kernel_reports(&self) -> &[KernelReport] {
        self.kernels.reports()
    }

    /// The (activation, cache) dtypes and block size the kernels were last checked with.
    pub fn kernels_checked(&self) -> Option<(DType, DType, usize)> {
        self.kernels.checked()
    }

    /// Data-parallel expert parallelism, on a replica with no step of its own while others
    /// step: take part in every MoE layer's token exchange with no tokens (serving this rank's
    /// experts to the other replicas). Nothing else runs and no cache is touched.
    pub fn idle_expert_pass(&self) -> Result<()> {
        if !self.tp.experts_span_replicas() {
            return Ok(());
        }
        let none = Tensor::zeros((0, self.cfg.hidden_size), self.dtype, &self.device)?;
        for b in &self.blocks {
            if let Mlp::Moe(moe) = &b.mlp {
                moe.forward(&self.kernels, &none, &self.tp)?;
            }
        }
        Ok(())
    }

    /// Pipeline stages of the model (1 without pipeline parallelism).
    pub fn pipeline_stages(&self) -> usize {
        self.pp.stages
    }

    /// Layers held (and cached) by this rank's pipeline stage.
    pub fn num_local_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Key/value heads held by this rank (its KV cache is sized for these).
    pub fn local_kv_heads(&self) -> usize {
        self.heads.kv_heads
    }

    pub fn tensor_parallel(&self) -> &TensorParallel {
        &self.tp
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Run one batch: writes this step's keys/values into `cache` and returns the logits
    /// of the rows in `input.logits_indices`, `[S, vocab]` (f32).
    pub fn forward(&self, input: &BatchInput, cache: &KvCache) -> Result<Tensor> {
        let logits = self.forward_stage(input, cache)?;
        self.route_logits(vec![logits])
    }

    /// This pipeline stage's part of the forward: the last stage returns its logits, the
    /// others hand their activations on and return `None` (no logits travel yet, so that
    /// stage 0 can go on with the next micro-batch).
    pub fn forward_stage(&self, input: &BatchInput, cache: &KvCache) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let t = input.tokens.dim(0)?;
        if t == 0 {
            return Err(ModelError::Config("empty batch".into()));
        }
        let (hd, nh, nkv) = (cfg.head_dim, self.heads.heads, self.heads.kv_heads);
        let (cos, sin) = self.rotary.tables_for(&input.positions)?;
        let local = match &self.rotary_local {
            Some(r) => Some(r.tables_for(&input.positions)?),
            None => None,
        };
        // Scores scaled by 1/sqrt(query_pre_attn_scalar): the kernels scale by 1/sqrt(head_dim).
        let q_scale = cfg.style.query_pre_attn_scalar.map(|s| (hd as f64 / s).sqrt()).filter(|f| *f != 1.0);
        let step = StepTables::new(&input.attn, nkv, hd);
        let k_ = &self.kernels;
        let mut x = match &self.embed {
            Some(e) if cfg.style.scale_embeddings => {
                (self.tp.all_reduce(&e.forward(&input.tokens)?)? * (cfg.hidden_size as f64).sqrt())?
            }
            Some(e) => self.tp.all_reduce(&e.forward(&input.tokens)?)?,
            None => self.pp.recv_activations()?,
        };
        // `h` is the normed input of the next sub-layer; the residual add and the next norm
        // are one step (fused on the CPU).
        let mut h = match self.blocks.first() {
            Some(b) => b.attn_norm.forward(&x)?,
            None => x.clone(),
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let lora = &input.lora;
            let [q, k, v]: [Tensor; 3] = b
                .attn
                .qkv
                .forward_lora(&h, lora, i, &[Target::Q, Target::K, Target::V])?
                .try_into()
                .map_err(|_| ModelError::Config("q/k/v count".into()))?;
            let q = q.reshape((t, nh, hd))?;
            let k = k.reshape((t, nkv, hd))?;
            let v = v.reshape((t, nkv, hd))?;
            let (q, k) = match &b.attn.qk_norm {
                Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
                None => (q, k),
            };
            let (c, s) = match (&local, b.window) {
                (Some((c, s)), Some(_)) => (c, s),
                _ => (&cos, &sin),
            };
            let (q, k) = k_.rotary(&q, &k, c, s, cfg.rope_interleaved)?;
            let q = match q_scale {
                Some(f) => (q * f)?,
                None => q,
            };
            let (kc, vc) = cache.layer(i);
            k_.cache_write(kc, vc, &k, &v, &step)?;
            let a = k_.paged_attention(&q, kc, vc, &step, b.window)?;
            let o = b.attn.o.forward(&a)?;
            let o = if lora.is_empty() { o } else { add_lora(o, &a, lora, i, &[(Target::O, 0)])? };
            let o = self.tp.all_reduce(&o)?;
            let o = match &b.post_attn_norm {
                Some(n) => n.forward(&o)?,
                None => o,
            };
            let (x1, h1) = b.mlp_norm.add_forward(k_, &x, &o)?;
            let m = match &b.mlp {
                Mlp::Dense(d) if adapts_mlp(lora, i) => self.tp.all_reduce(&d.forward_lora(k_, &h1, lora, i)?)?,
                Mlp::Dense(d) => self.tp.all_reduce(&d.forward(k_, &h1)?)?,
                Mlp::Moe(moe) => moe.forward(k_, &h1, &self.tp)?,
            };
            let m = match &b.post_mlp_norm {
                Some(n) => n.forward(&m)?,
                None => m,
            };
            (x, h) = match self.blocks.get(i + 1) {
                Some(next) => next.attn_norm.add_forward(k_, &x1, &m)?,
                None => ((x1 + m)?, h1),
            };
        }
        let logits = match (&self.norm, &self.lm_head) {
            (Some(norm), Some(head)) => {
                let x = norm.forward(&x.index_select(&input.logits_indices, 0)?)?;
                Some(self.tp.all_gather(&head.forward(&x)?.to_dtype(DType::F32)?, 1)?)
            }
            _ => {
                self.pp.send_activations(&x)?;
                None
            }
        };
        Ok(logits)
    }

    /// Deliver the logits of `parts` (micro-batches in order, as [`Llama::forward_stage`]
    /// returned them) to world rank 0, which samples: rank 0 gets them concatenated, every
    /// other rank an empty `[0, vocab]`. Without a pipeline the logits stay where they are.
    pub fn route_logits(&self, parts: Vec<Option<Tensor>>) -> Result<Tensor> {
        let mut got = Vec::with_capacity(parts.len());
        for p in parts {
            if let Some(l) = self.pp.route_logits(p)? {
                got.push(l);
            }
        }
        if got.is_empty() {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        Ok(Tensor::cat(&got, 0)?)
    }
}
