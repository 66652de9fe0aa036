//! The references against naive f64 loops, the CPU's fused kernels through the check, and
//! wrong "fused" kernels injected to see each one refused and the reference used instead.

use super::*;

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

const SHAPES: ServedShapes = ServedShapes { hidden: 576, inter: 1536, eps: 1e-5 };

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
    let k = Kernels::check(Kernels::candidates(&Device::Cpu), &Device::Cpu, DType::F32, SHAPES);
    for r in k.reports() {
        assert!(r.fused && r.reason.starts_with("passed"), "{r:?}");
    }
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
        !matches!(self.1, Fault::Unsupported) && CpuFused(self.0).supports(args)
    }
    fn run(&self, args: &OpArgs) -> Result<Vec<Tensor>> {
        let good = CpuFused(self.0).run(args)?;
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
        let k = Kernels::check(injected, &Device::Cpu, DType::F32, SHAPES);
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
    let k = Kernels::check(fine, &Device::Cpu, DType::F32, SHAPES);
    assert!(k.reports()[1].fused, "{:?}", k.reports());
    assert_eq!(k.reports()[0].reason, "no fused kernel");
    assert_eq!(
        flat(&k.silu_mul(&gu, 1536).unwrap()),
        flat(&CpuFused(FusedOp::SiluMul).run(&OpArgs::SiluMul { gu: &gu, inter: 1536 }).unwrap()[0])
    );
}
