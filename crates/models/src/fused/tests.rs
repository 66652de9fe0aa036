//! The references against naive f64 loops, the CPU's fused kernels through the check, and
//! wrong "fused" kernels injected to see each one refused and the reference used instead.

use super::cpu::CpuFused;
use super::inputs::Inputs;
use super::*;
use crate::ModelError;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 4001) as f32 / 1000.0 - 2.0)
        .collect()
}

fn tensor(v: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

const SHAPES: ServedShapes = ServedShapes {
    hidden: 576,
    inter: 1536,
    eps: 1e-5,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    interleaved: false,
    block_size: 16,
};

/// Small shapes for the naive comparisons.
const SMALL: ServedShapes = ServedShapes {
    hidden: 8,
    inter: 8,
    eps: 1e-5,
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
    interleaved: false,
    block_size: 4,
};

fn check(candidates: Vec<Arc<dyn FusedKernel>>, cache: DType) -> Kernels {
    Kernels::check(candidates, &Device::Cpu, DType::F32, cache, SHAPES)
}

#[test]
fn the_references_equal_naive_arithmetic() {
    for (rows, dim) in [(1, 1), (3, 64), (5, 577)] {
        let (x, d, w) = (values(rows * dim, 1), values(rows * dim, 2), values(dim, 3));
        let (sum, normed) = reference::add_rms_norm(
            &tensor(x.clone(), &[rows, dim]),
            &tensor(d.clone(), &[rows, dim]),
            &tensor(w.clone(), &[dim]),
            1e-5,
        )
        .unwrap();
        let (sum, normed) = (flat(&sum), flat(&normed));
        for r in 0..rows {
            let s: Vec<f64> = (0..dim).map(|i| x[r * dim + i] as f64 + d[r * dim + i] as f64).collect();
            let inv = 1.0 / (s.iter().map(|v| v * v).sum::<f64>() / dim as f64 + 1e-5).sqrt();
            for i in 0..dim {
                assert!((sum[r * dim + i] as f64 - s[i]).abs() <= 1e-6 * s[i].abs().max(1.0));
                let want = s[i] * inv * w[i] as f64;
                assert!((normed[r * dim + i] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "[{r},{i}]");
            }
        }
    }
    for (rows, inter) in [(1, 1), (4, 96), (3, 1537)] {
        let gu = values(rows * 2 * inter, 4);
        let out = flat(&reference::silu_mul(&tensor(gu.clone(), &[rows, 2 * inter]), inter).unwrap());
        for r in 0..rows {
            for i in 0..inter {
                let (g, u) = (gu[r * 2 * inter + i] as f64, gu[r * 2 * inter + inter + i] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((out[r * inter + i] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "[{r},{i}]");
            }
        }
    }
}

#[test]
fn the_cpu_kernels_pass_their_check_and_are_used() {
    for cache in [DType::F32, DType::F16, DType::BF16] {
        let k = check(Kernels::candidates(&Device::Cpu), cache);
        for r in k.reports() {
            if r.op == FusedOp::Rotary {
                assert_eq!((r.kernel, r.fused, r.reason.as_str()), ("none", false, "no fused kernel"));
            } else {
                assert!(r.fused && r.reason.starts_with("passed"), "{cache:?} {r:?}");
            }
        }
        assert_eq!(k.checked(), Some((DType::F32, cache, 16)));
    }
    let k = check(Kernels::candidates(&Device::Cpu), DType::F32);
    // The reference serves what the fused kernel does not take (here: f16).
    let gu = tensor(values(2 * 64, 5), &[1, 128]).to_dtype(DType::F16).unwrap();
    let want = reference::silu_mul(&gu, 64).unwrap();
    assert_eq!(
        flat(&k.silu_mul(&gu, 64).unwrap().to_dtype(DType::F32).unwrap()),
        flat(&want.to_dtype(DType::F32).unwrap())
    );
}

/// What a broken fused kernel can do.
#[derive(Clone, Copy)]
enum Fault {
    Skewed,
    Errors,
    Panics,
    Nan,
    Unsupported,
    None,
}

struct Injected(FusedOp, Fault);

impl FusedKernel for Injected {
    fn op(&self) -> FusedOp {
        self.0
    }
    fn name(&self) -> &'static str {
        "injected"
    }
    fn supports(&self, args: &OpArgs) -> bool {
        !matches!(self.1, Fault::Unsupported) && (self.0 == FusedOp::Rotary || CpuFused(self.0).supports(args))
    }
    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>> {
        let good = match self.0 {
            FusedOp::Rotary => reference::run(args)?,
            op => CpuFused(op).run(args)?,
        };
        match self.1 {
            Fault::Skewed => good.iter().map(|t| Ok((t * 1.01)?)).collect(),
            Fault::Errors => Err(ModelError::Config("injected failure".into())),
            Fault::Panics => panic!("injected panic"),
            Fault::Nan => good.iter().map(|t| Ok((t * f64::NAN)?)).collect(),
            Fault::Unsupported | Fault::None => Ok(good),
        }
    }
}

#[test]
fn a_wrong_fused_kernel_is_refused_and_the_reference_runs() {
    let gu = tensor(values(3 * 2 * 1536, 6), &[3, 2 * 1536]);
    let (x, d, w) =
        (tensor(values(3 * 576, 7), &[3, 576]), tensor(values(3 * 576, 8), &[3, 576]), tensor(values(576, 9), &[576]));
    for (fault, reason) in [
        (Fault::Skewed, "mismatch"),
        (Fault::Errors, "failed: "),
        (Fault::Panics, "failed: the kernel panicked"),
        (Fault::Nan, "mismatch"),
        (Fault::Unsupported, "unsupported"),
    ] {
        let injected: Vec<Arc<dyn FusedKernel>> =
            FusedOp::ALL.iter().map(|&op| Arc::new(Injected(op, fault)) as Arc<dyn FusedKernel>).collect();
        let k = check(injected, DType::F32);
        for r in k.reports() {
            assert!(!r.fused && r.kernel == "injected" && r.reason.starts_with(reason), "{:?}: {r:?}", fault as u8);
        }
        // Every op now runs the reference, to the bit.
        assert_eq!(flat(&k.silu_mul(&gu, 1536).unwrap()), flat(&reference::silu_mul(&gu, 1536).unwrap()));
        let (a, b) = k.add_rms_norm(&x, &d, &w, 1e-5).unwrap();
        let (ra, rb) = reference::add_rms_norm(&x, &d, &w, 1e-5).unwrap();
        assert_eq!((flat(&a), flat(&b)), (flat(&ra), flat(&rb)));
    }
    // A correct injected kernel passes, and is what runs (`Fault::None` is the CPU kernel's output).
    let fine: Vec<Arc<dyn FusedKernel>> = vec![Arc::new(Injected(FusedOp::SiluMul, Fault::None))];
    let k = check(fine, DType::F32);
    assert!(k.reports()[1].fused, "{:?}", k.reports());
    assert_eq!(k.reports()[0].reason, "no fused kernel");
    assert_eq!(
        flat(&k.silu_mul(&gu, 1536).unwrap()),
        flat(&CpuFused(FusedOp::SiluMul).run(&OpArgs::SiluMul { gu: &gu, inter: 1536 }).unwrap()[0])
    );
}

/// Rotation of each pair of `x` `[T, H, D]` by its token's angle, in f64.
fn naive_rotary(x: &[f32], cos: &[f32], sin: &[f32], (t, h, d): (usize, usize, usize), interleaved: bool) -> Vec<f64> {
    let mut out = vec![0f64; t * h * d];
    for ti in 0..t {
        for hi in 0..h {
            let row = (ti * h + hi) * d;
            for p in 0..d / 2 {
                let (a, b) = if interleaved { (2 * p, 2 * p + 1) } else { (p, p + d / 2) };
                let (c, s) = (cos[ti * d / 2 + p] as f64, sin[ti * d / 2 + p] as f64);
                let (x0, x1) = (x[row + a] as f64, x[row + b] as f64);
                out[row + a] = x0 * c - x1 * s;
                out[row + b] = x0 * s + x1 * c;
            }
        }
    }
    out
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn the_rotary_reference_equals_naive_arithmetic() {
    for interleaved in [false, true] {
        let shapes = ServedShapes { interleaved, ..SMALL };
        let i = Inputs::new(FusedOp::Rotary, &shapes, 5, &Device::Cpu, (DType::F32, DType::F32)).unwrap();
        let OpArgs::Rotary { q, k, cos, sin, .. } = i.args(None).unwrap() else { unreachable!() };
        let out = reference::run(&i.args(None).unwrap()).unwrap();
        let (c, s) = (flat(cos), flat(sin));
        close(&flat(&out[0]), &naive_rotary(&flat(q), &c, &s, (5, 4, 8), interleaved), 1e-6, "q");
        close(&flat(&out[1]), &naive_rotary(&flat(k), &c, &s, (5, 2, 8), interleaved), 1e-6, "k");
    }
}

#[test]
fn the_cache_write_and_attention_references_equal_naive_arithmetic() {
    let dev = Device::Cpu;
    let (h, kvh, d) = (SMALL.heads, SMALL.kv_heads, SMALL.head_dim);
    for rows in [1, 2, 9] {
        // Cache write: each new row lands in its slot, every other slot keeps its value.
        let i = Inputs::new(FusedOp::CacheWrite, &SMALL, rows, &dev, (DType::F32, DType::F32)).unwrap();
        let step = i.step().unwrap();
        let args = i.args(Some(&step)).unwrap();
        let OpArgs::CacheWrite { k_cache, k, .. } = args else { unreachable!() };
        let (before, rows_k) = (flat(k_cache), flat(k));
        let slots = step.host_slots().unwrap().to_vec();
        reference::run(&args).unwrap();
        let mut want: Vec<f64> = before.iter().map(|&v| v as f64).collect();
        for (r, &slot) in slots.iter().enumerate() {
            for c in 0..kvh * d {
                want[slot as usize * kvh * d + c] = rows_k[r * kvh * d + c] as f64;
            }
        }
        close(&flat(k_cache), &want, 0.0, "k cache");

        // Attention: softmax(q·k / sqrt(D)) · v over each query's visible context, per head.
        let i = Inputs::new(FusedOp::PagedAttention, &SMALL, rows, &dev, (DType::F32, DType::F32)).unwrap();
        let step = i.step().unwrap();
        let args = i.args(Some(&step)).unwrap();
        let OpArgs::PagedAttention { q, k_cache, v_cache, .. } = args else { unreachable!() };
        let (qv, kc, vc) = (flat(q), flat(k_cache), flat(v_cache));
        let got = flat(&reference::run(&args).unwrap()[0]);
        let mut want = vec![0f64; qv.len()];
        let bs = SMALL.block_size;
        for s in &step.meta.seqs {
            let slots = s.context_slots(bs);
            assert_eq!(slots.len(), s.ctx_len);
            for qi in 0..s.q_len {
                let (row, visible) = (s.q_start + qi, s.ctx_len - s.q_len + qi + 1);
                for hh in 0..h {
                    let g = hh / (h / kvh);
                    let at = |slot: u32, c: usize| (slot as usize * kvh + g) * d + c;
                    let q_at = |c: usize| qv[(row * h + hh) * d + c] as f64;
                    let scores: Vec<f64> = slots[..visible]
                        .iter()
                        .map(|&sl| (0..d).map(|c| q_at(c) * kc[at(sl, c)] as f64).sum::<f64>() / (d as f64).sqrt())
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let o: f64 = slots[..visible].iter().zip(&e).map(|(&sl, p)| p * vc[at(sl, c)] as f64).sum();
                        want[(row * h + hh) * d + c] = o / z;
                    }
                }
            }
        }
        close(&got, &want, 1e-5, &format!("attention, {rows} rows"));
    }
}

#[test]
fn the_step_mixes_decode_chunked_and_whole_prefills() {
    let i = Inputs::new(FusedOp::PagedAttention, &SMALL, 9, &Device::Cpu, (DType::F32, DType::F32)).unwrap();
    let step = i.step().unwrap();
    let spans: Vec<(usize, usize)> = step.meta.seqs.iter().map(|s| (s.q_len, s.ctx_len)).collect();
    assert_eq!(spans, vec![(1, 11), (4, 9), (4, 4)]);
    // Blocks out of order and block 0 unused (a kernel reading padding would read garbage).
    let tables: Vec<u32> = step.meta.seqs.iter().flat_map(|s| s.block_table.clone()).collect();
    assert!(!tables.contains(&0) && tables.windows(2).all(|w| w[0] > w[1]), "{tables:?}");
}

#[test]
fn a_wrong_attention_or_cache_write_is_refused_and_the_reference_runs() {
    for fault in [Fault::Skewed, Fault::Nan, Fault::Errors] {
        let injected: Vec<Arc<dyn FusedKernel>> = vec![
            Arc::new(Injected(FusedOp::CacheWrite, fault)),
            Arc::new(Injected(FusedOp::PagedAttention, fault)),
            Arc::new(CpuFused(FusedOp::SiluMul)),
        ];
        let k = check(injected, DType::F16);
        let by_op = |op| k.reports().iter().find(|r| r.op == op).unwrap().clone();
        for op in [FusedOp::CacheWrite, FusedOp::PagedAttention] {
            let r = by_op(op);
            assert!(!r.fused && (r.reason.starts_with("mismatch") || r.reason.starts_with("failed")), "{r:?}");
        }
        assert!(by_op(FusedOp::SiluMul).fused);
        // What runs is the reference, to the bit.
        let i = Inputs::new(FusedOp::PagedAttention, &SMALL, 7, &Device::Cpu, (DType::F32, DType::F16)).unwrap();
        let step = i.step().unwrap();
        let OpArgs::PagedAttention { q, k_cache, v_cache, .. } = i.args(Some(&step)).unwrap() else { unreachable!() };
        let got = k.paged_attention(q, k_cache, v_cache, &step, None).unwrap();
        assert_eq!(flat(&got), flat(&reference::paged_attention(q, k_cache, v_cache, &step, None).unwrap()));
    }
}

#[test]
fn tensor_parallel_ranks_use_a_fused_kernel_only_if_it_passed_on_every_rank() {
    let group = tessera_parallel::ShmHub::new(2);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let hub = group.clone();
            std::thread::spawn(move || {
                let comm = hub.join(rank, Device::Cpu).unwrap();
                let tp = TensorParallel::new(Arc::new(comm));
                // Rank 1's SiluMul is wrong; everything else is the CPU's.
                let mut candidates = cpu::candidates();
                if rank == 1 {
                    candidates.retain(|k| k.op() != FusedOp::SiluMul);
                    candidates.push(Arc::new(Injected(FusedOp::SiluMul, Fault::Skewed)));
                }
                let mine = check(candidates, DType::F32);
                let silu_here = mine.reports().iter().any(|r| r.op == FusedOp::SiluMul && r.fused);
                (silu_here, mine.agree(&tp, &Device::Cpu).unwrap())
            })
        })
        .collect();
    let out: Vec<(bool, Kernels)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!((out[0].0, out[1].0), (true, false), "the checks alone disagree");
    for (rank, (_, k)) in out.iter().enumerate() {
        for r in k.reports() {
            match r.op {
                FusedOp::SiluMul if rank == 0 => {
                    assert!(
                        !r.fused && r.reason == "refused by the group: passed on 1 of 2 tensor-parallel ranks",
                        "{r:?}"
                    )
                }
                FusedOp::SiluMul => assert!(!r.fused && r.reason.starts_with("mismatch"), "{r:?}"),
                FusedOp::Rotary => assert!(!r.fused),
                _ => assert!(r.fused, "rank {rank}: {r:?}"),
            }
        }
    }
}

/// A sliding window (Gemma 3's local layers): the CPU kernel equals the reference's masked
/// attention for windows shorter and longer than the contexts; a short window changes the
/// result (the test would notice it being ignored), a long one does not.
#[test]
fn sliding_window_attention_on_the_cpu_kernel_equals_the_reference() {
    let i = Inputs::new(FusedOp::PagedAttention, &SMALL, 9, &Device::Cpu, (DType::F32, DType::F32)).unwrap();
    let step = i.step().unwrap();
    let OpArgs::PagedAttention { q, k_cache, v_cache, .. } = i.args(Some(&step)).unwrap() else { unreachable!() };
    let cpu = CpuFused(FusedOp::PagedAttention);
    let full = flat(&reference::paged_attention(q, k_cache, v_cache, &step, None).unwrap());
    for w in [1, 2, 5, 1000] {
        let args = OpArgs::PagedAttention { q, k_cache, v_cache, step: &step, window: Some(w) };
        assert!(cpu.supports(&args));
        let got = flat(&cpu.run(&args).unwrap()[0]);
        let want = flat(&reference::paged_attention(q, k_cache, v_cache, &step, Some(w)).unwrap());
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d < 1e-5, "window {w}: {d}");
        let moved = want.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        match w {
            1 => assert!(moved > 1e-3, "a window of one position changes the result"),
            1000 => assert!(moved < 1e-6, "a window longer than every context changes nothing"),
            _ => {}
        }
    }
}
