//! Mixture-of-experts MLP (Mixtral's `block_sparse_moe` with experts of `w1`/`w3`/`w2`, or
//! Qwen 3 MoE's `mlp` with experts of `gate_proj`/`up_proj`/`down_proj`; a router `gate`
//! either way), written on the shared [`GatedMlp`] and [`Linear`] layers.
//!
//! Routing: softmax over every expert, the `top_k` most likely, weights renormalised
//! (Mixtral; Qwen 3 MoE when `norm_topk_prob`). Under
//! tensor parallelism every expert is sliced like a dense MLP (partial sums, all-reduced).
//! With expert parallelism whole experts are split over the group and tokens travel: each
//! rank routes its share of the (replicated) tokens, sends every (token, expert) pair to the
//! expert's rank, gets the expert outputs back, combines them, and the shares are gathered.
//! Under data-parallel expert parallelism the expert group is every rank of every replica:
//! the exchange is the same, and a replica without tokens still serves its experts
//! ([`Moe::forward`] of zero rows).

use candle_core::{DType, Tensor};

use crate::fused::Kernels;
use crate::layers::GatedMlp;
use crate::{part, Linear, MoeConfig, Result, TensorParallel, WeightSource};

#[derive(Debug, Clone)]
pub struct Moe {
    router: Linear,
    /// (global expert id, expert) held by this rank, by id.
    experts: Vec<(usize, GatedMlp)>,
    cfg: MoeConfig,
    expert_parallel: bool,
}

/// A token's experts and their weights.
type Route = Vec<(usize, f32)>;

impl Moe {
    /// The mixture of experts of the layer at `layer` (`model.layers.N`).
    pub fn load(
        src: &dyn WeightSource,
        layer: &str,
        hidden: usize,
        cfg: &MoeConfig,
        dtype: DType,
        tp: &TensorParallel,
    ) -> Result<Self> {
        let (sub, names) = cfg.layout.names();
        let prefix = format!("{layer}.{sub}");
        let inter = cfg.expert_inter;
        let router = Linear::load(src, &format!("{prefix}.gate"), cfg.experts, hidden, false, dtype)?;
        let ep = tp.expert_parallel();
        let mut experts = Vec::new();
        let group = tp.expert_comm();
        let (lo, hi) = if ep { part(cfg.experts, group.world_size(), group.rank()) } else { (0, cfg.experts) };
        for e in lo..hi {
            let p = format!("{prefix}.experts.{e}");
            let (index, count) = if ep { (0, 1) } else { (tp.rank(), tp.world()) };
            experts.push((e, GatedMlp::load_named(src, &p, names, hidden, inter, dtype, index, count)?));
        }
        Ok(Self { router, experts, cfg: cfg.clone(), expert_parallel: ep })
    }

    /// Experts held here, and whether whole experts are split over the group.
    pub fn held(&self) -> (usize, bool) {
        (self.experts.len(), self.expert_parallel)
    }

    /// The experts of every row of `x`.
    fn route(&self, x: &Tensor) -> Result<Vec<Route>> {
        let logits: Vec<Vec<f32>> = self.router.forward(x)?.to_dtype(DType::F32)?.to_vec2()?;
        Ok(logits
            .iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
                let mut ids: Vec<usize> = (0..p.len()).collect();
                ids.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                ids.truncate(self.cfg.top_k);
                let total: f32 = if self.cfg.renormalize { ids.iter().map(|&e| p[e]).sum() } else { p.iter().sum() };
                ids.into_iter().map(|e| (e, p[e] / total)).collect()
            })
            .collect())
    }

    /// For each (row, expert, weight) in `work` whose expert is held here: weight × expert(x[row]),
    /// summed per row into a `[rows of x, hidden]` tensor (experts in id order).
    fn apply(&self, kernels: &Kernels, x: &Tensor, work: &[(u32, usize, f32)]) -> Result<Tensor> {
        let mut out = x.zeros_like()?;
        for (e, mlp) in &self.experts {
            let (rows, weights): (Vec<u32>, Vec<f32>) =
                work.iter().filter(|w| w.1 == *e).map(|&(r, _, wt)| (r, wt)).unzip();
            if rows.is_empty() {
                continue;
            }
            let dev = x.device();
            let idx = Tensor::new(rows.as_slice(), dev)?;
            let y = mlp.forward(kernels, &x.index_select(&idx, 0)?)?;
            let wt = Tensor::from_vec(weights, (rows.len(), 1), dev)?.to_dtype(y.dtype())?;
            out = out.index_add(&idx, &y.broadcast_mul(&wt)?, 0)?;
        }
        Ok(out)
    }

    /// The layer's output for `x` (`[T, hidden]`, the same on every rank of the group).
    pub fn forward(&self, kernels: &Kernels, x: &Tensor, tp: &TensorParallel) -> Result<Tensor> {
        if !self.expert_parallel {
            let routes = self.route(x)?;
            let work: Vec<(u32, usize, f32)> =
                routes.iter().enumerate().flat_map(|(t, r)| r.iter().map(move |&(e, w)| (t as u32, e, w))).collect();
            return tp.all_reduce(&self.apply(kernels, x, &work)?);
        }
        // This rank's share of its replica's tokens (none on an idle replica).
        let (a, b) = part(x.dim(0)?, tp.world(), tp.rank());
        let mine = x.narrow(0, a, b - a)?.contiguous()?;
        let comm = tp.expert_comm();
        let world = comm.world_size();
        let routes = self.route(&mine)?;
        // Expert → the rank holding it (the split `load` used).
        let mut owner = vec![0; self.cfg.experts];
        for d in 0..world {
            let (lo, hi) = part(self.cfg.experts, world, d);
            owner[lo..hi].fill(d);
        }
        // Per destination rank: (my token row, expert, weight).
        let mut sends: Vec<Vec<(u32, usize, f32)>> = vec![Vec::new(); world];
        for (t, r) in routes.iter().enumerate() {
            for &(e, w) in r {
                sends[owner[e]].push((t as u32, e, w));
            }
        }
        let dev = x.device();
        let rows_of = |s: &[(u32, usize, f32)]| -> Result<Tensor> {
            let idx: Vec<u32> = s.iter().map(|w| w.0).collect();
            Ok(mine.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?)
        };
        let xs: Vec<Tensor> = sends.iter().map(|s| rows_of(s)).collect::<Result<_>>()?;
        let ids: Vec<Tensor> = sends
            .iter()
            .map(|s| Tensor::from_vec(s.iter().map(|w| w.1 as u32).collect::<Vec<u32>>(), s.len(), dev))
            .collect::<candle_core::Result<_>>()?;
        let got_x = comm.all_to_all(xs)?;
        let got_ids = comm.all_to_all(ids)?;
        // Run the received rows through their experts (weight 1: the sender weighs), in order.
        let mut replies = Vec::with_capacity(world);
        for (xr, ir) in got_x.iter().zip(&got_ids) {
            let ids: Vec<u32> = ir.to_vec1()?;
            let work: Vec<(u32, usize, f32)> =
                ids.iter().enumerate().map(|(j, &e)| (j as u32, e as usize, 1.0)).collect();
            replies.push(self.apply(kernels, xr, &work)?);
        }
        let back = comm.all_to_all(replies)?;
        let mut out = mine.zeros_like()?;
        for (s, y) in sends.iter().zip(&back) {
            if s.is_empty() {
                continue;
            }
            let idx: Vec<u32> = s.iter().map(|w| w.0).collect();
            let wt: Vec<f32> = s.iter().map(|w| w.2).collect();
            let wt = Tensor::from_vec(wt, (s.len(), 1), dev)?.to_dtype(y.dtype())?;
            out = out.index_add(&Tensor::new(idx.as_slice(), dev)?, &y.broadcast_mul(&wt)?, 0)?;
        }
        tp.all_gather(&out, 0)
    }
}
