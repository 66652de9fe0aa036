//! Every instruction set against the scalar reference on random blocks and odd shapes, and
//! the reference against plain f32 arithmetic within the activation quantization's bound.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quant::{
    kquant, quantize_row, quantize_row_k, quantize_rows, quantize_rows_k, scalar, ActBlock, ActBlockK, QMatrix, QType,
    QK, QK_K,
};
use crate::Isa;

const TYPES: [QType; 5] = [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0];

/// Random block bytes: any code pattern is valid; scales are small finite f16s.
fn random_matrix(ty: QType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QMatrix {
    let mut data = Vec::new();
    for _ in 0..rows * cols / QK {
        let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.random()).collect();
        b[0..2].copy_from_slice(&f16::from_f32(rng.random_range(0.001f32..0.05)).to_bits().to_le_bytes());
        if matches!(ty, QType::Q4_1 | QType::Q5_1) {
            b[2..4].copy_from_slice(&f16::from_f32(rng.random_range(-0.2f32..0.2)).to_bits().to_le_bytes());
        }
        data.extend(b);
    }
    QMatrix::new(ty, rows, cols, data).expect("block bytes")
}

fn random_x(m: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// `|got − want|` allowed for a float reassociation of the per-block terms.
fn reassociation_bound(w: &QMatrix, j: usize, acts: &[ActBlock]) -> f32 {
    let row = w.dequantize_row(j);
    let terms: f32 =
        row.chunks(QK).zip(acts).map(|(ws, a)| ws.iter().map(|v| v.abs()).sum::<f32>() * a.d * 127.0).sum();
    1e-5 * terms + 1e-6
}

fn check(ty: QType, n: usize, k: usize, m: usize, rng: &mut ChaCha8Rng) {
    let w = random_matrix(ty, n, k, rng);
    let x = random_x(m, k, rng);
    let acts = quantize_rows(&x, k);
    for &isa in Isa::available() {
        let mut out = vec![f32::NAN; m * n];
        w.matmul_on(isa, &x, m, &mut out).expect("matmul");
        for i in 0..m {
            let a = &acts[i * k / QK..(i + 1) * k / QK];
            for j in 0..n {
                let want = scalar::dot_row(ty, w.row(j), a);
                let got = out[i * n + j];
                if isa == Isa::Scalar {
                    assert_eq!(got.to_bits(), want.to_bits(), "{ty:?} scalar [{i},{j}] m={m} n={n} k={k}");
                } else {
                    let bound = reassociation_bound(&w, j, a);
                    assert!(
                        (got - want).abs() <= bound,
                        "{ty:?} {isa:?} [{i},{j}] m={m} n={n} k={k}: {got} vs {want} (bound {bound})"
                    );
                }
            }
        }
    }
}

#[test]
fn every_isa_equals_the_scalar_reference_on_odd_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for ty in TYPES {
        for m in 1..=33 {
            check(ty, 37, 96, m, &mut rng);
        }
        for (n, k, m) in [(1, 32, 1), (1, 608, 5), (300, 608, 4), (129, 1536, 9), (576, 576, 1)] {
            check(ty, n, k, m, &mut rng);
        }
    }
}

/// The reference itself: within the activation quantization error of plain f32 arithmetic
/// on the dequantized weights (each activation is off by at most half its block's step).
#[test]
fn the_reference_tracks_f32_arithmetic() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for ty in TYPES {
        let (n, k, m) = (19, 160, 3);
        let w = random_matrix(ty, n, k, &mut rng);
        let x = random_x(m, k, &mut rng);
        let mut out = vec![0f32; m * n];
        w.matmul_on(Isa::Scalar, &x, m, &mut out).expect("matmul");
        for i in 0..m {
            let xs = &x[i * k..(i + 1) * k];
            let mut a = vec![ActBlock { qs: [0; QK], d: 0.0, s: 0.0, isum: 0 }; k / QK];
            quantize_row(xs, &mut a);
            for j in 0..n {
                let wr = w.dequantize_row(j);
                let exact: f32 = wr.iter().zip(xs).map(|(a, b)| a * b).sum();
                // Half a step per activation (d rounded through f16: allow 0.6), plus the
                // Q8_1 sum's f16 rounding for the types with a minimum.
                let bound: f32 = wr
                    .chunks(QK)
                    .zip(&a)
                    .map(|(ws, b)| ws.iter().map(|v| v.abs()).sum::<f32>() * b.d * 0.6 + b.s.abs() * 2e-3)
                    .sum::<f32>()
                    + 1e-4;
                let got = out[i * n + j];
                assert!((got - exact).abs() <= bound, "{ty:?} [{i},{j}]: {got} vs exact {exact} (bound {bound})");
            }
        }
    }
}

#[test]
fn activations_follow_ggml_rounding() {
    let mut x = [0f32; QK];
    x[0] = 127.0; // amax 127 → d = 1, codes = round(x)
    x[1] = 2.5; // half away from zero, as C's roundf (not to even)
    x[2] = -2.5;
    x[3] = 0.49;
    let mut a = [ActBlock { qs: [0; QK], d: 0.0, s: 0.0, isum: 0 }];
    quantize_row(&x, &mut a);
    assert_eq!(&a[0].qs[..4], &[127, 3, -3, 0]);
    assert_eq!(a[0].d, 1.0);
    assert_eq!(a[0].isum, 127);
    assert_eq!(a[0].s, 127.0);
    // A scale that f16 cannot hold exactly is stored rounded; the codes use the exact one.
    let y: Vec<f32> = (0..QK).map(|i| i as f32 * 0.1).collect();
    quantize_row(&y, &mut a);
    let d = 3.1f32 / 127.0;
    assert_eq!(a[0].d, f16::from_f32(d).to_f32());
    assert_eq!(a[0].qs[31], 127);
    assert_eq!(a[0].qs[10], (1.0f32 / d).round() as i8);
}

#[test]
fn fused_rows_equal_the_separate_products() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (k, m) = (96, 5);
    let a = random_matrix(QType::Q4_1, 7, k, &mut rng);
    let b = random_matrix(QType::Q4_1, 5, k, &mut rng);
    let fused = QMatrix::concat_rows(&[&a, &b]).expect("same type and columns");
    let x = random_x(m, k, &mut rng);
    let (mut oa, mut ob, mut of) = (vec![0f32; m * 7], vec![0f32; m * 5], vec![0f32; m * 12]);
    a.matmul(&x, m, &mut oa).expect("a");
    b.matmul(&x, m, &mut ob).expect("b");
    fused.matmul(&x, m, &mut of).expect("fused");
    for i in 0..m {
        assert_eq!(&of[i * 12..i * 12 + 7], &oa[i * 7..(i + 1) * 7]);
        assert_eq!(&of[i * 12 + 7..(i + 1) * 12], &ob[i * 5..(i + 1) * 5]);
    }
    let q8 = random_matrix(QType::Q8_0, 2, k, &mut rng);
    assert!(QMatrix::concat_rows(&[&a, &q8]).is_err(), "types must match");
}

#[test]
fn bad_shapes_are_errors() {
    assert!(QMatrix::new(QType::Q4_0, 2, 48, vec![0; 36]).is_err(), "columns not a multiple of 32");
    assert!(QMatrix::new(QType::Q4_0, 2, 64, vec![0; 10]).is_err(), "wrong byte count");
    let w = QMatrix::new(QType::Q8_0, 2, 32, vec![0; 68]).expect("ok");
    assert!(w.matmul(&[0.0; 31], 1, &mut [0.0; 2]).is_err());
}

const K_TYPES: [QType; 3] = [QType::Q4K, QType::Q5K, QType::Q6K];

/// Random super-blocks: any code and sub-scale pattern is valid; the f16 super-scales are
/// small finite values (Q6_K keeps its `d` last).
fn random_k_matrix(ty: QType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QMatrix {
    let mut data = Vec::new();
    let half = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
    for _ in 0..rows * cols / QK_K {
        let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.random()).collect();
        if ty == QType::Q6K {
            b[208..210].copy_from_slice(&half(rng.random_range(0.0001f32..0.002)));
        } else {
            b[0..2].copy_from_slice(&half(rng.random_range(0.0001f32..0.002)));
            b[2..4].copy_from_slice(&half(rng.random_range(0.0f32..0.004)));
        }
        data.extend(b);
    }
    QMatrix::new(ty, rows, cols, data).expect("super-block bytes")
}

fn check_k(ty: QType, n: usize, k: usize, m: usize, rng: &mut ChaCha8Rng) {
    let w = random_k_matrix(ty, n, k, rng);
    let x = random_x(m, k, rng);
    let acts = quantize_rows_k(&x, k);
    let nb = k / QK_K;
    for &isa in Isa::available() {
        let mut out = vec![f32::NAN; m * n];
        w.matmul_on(isa, &x, m, &mut out).expect("matmul");
        for i in 0..m {
            let a = &acts[i * nb..(i + 1) * nb];
            for j in 0..n {
                let want = kquant::dot_row_k(ty, w.row(j), a);
                let got = out[i * n + j];
                if isa == Isa::Scalar {
                    assert_eq!(got.to_bits(), want.to_bits(), "{ty:?} scalar [{i},{j}] m={m} n={n} k={k}");
                } else {
                    // The integer sums are exact; only the f32 scaling is reassociated.
                    let terms: f32 = w.dequantize_row(j).iter().map(|v| v.abs()).sum::<f32>()
                        * a.iter().map(|b| b.d.abs()).fold(0.0, f32::max)
                        * 127.0;
                    let bound = 1e-5 * terms + 1e-6;
                    assert!(
                        (got - want).abs() <= bound,
                        "{ty:?} {isa:?} [{i},{j}] m={m} n={n} k={k}: {got} vs {want} (bound {bound})"
                    );
                }
            }
        }
    }
}

#[test]
fn k_quants_on_every_isa_equal_the_scalar_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for ty in K_TYPES {
        for m in 1..=33 {
            check_k(ty, 13, 256, m, &mut rng);
        }
        for (n, k, m) in [(1, 256, 1), (1, 768, 5), (67, 1536, 4), (129, 512, 9)] {
            check_k(ty, n, k, m, &mut rng);
        }
    }
}

/// The integer part of the SIMD paths is exact: with power-of-two weight and activation
/// scales (every float step exact) and one super-block, every path gives the reference's bits.
#[test]
fn k_quant_integer_sums_are_bit_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for ty in K_TYPES {
        let mut w = random_k_matrix(ty, 9, 256, &mut rng);
        let at = if ty == QType::Q6K { 208 } else { 0 };
        let mut data = Vec::new();
        for j in 0..9 {
            let mut b = w.row(j).to_vec();
            b[at..at + 2].copy_from_slice(&f16::from_f32(0.0078125).to_bits().to_le_bytes());
            if ty != QType::Q6K {
                b[2..4].copy_from_slice(&f16::from_f32(0.015625).to_bits().to_le_bytes());
            }
            data.extend(b);
        }
        w = QMatrix::new(ty, 9, 256, data).expect("blocks");
        // Codes/8 with a −127/8 in every row: iscale = 8, d = 1/8.
        let x: Vec<f32> = (0..3 * 256)
            .map(|i| if i % 256 == 0 { -127.0 / 8.0 } else { ((i * 37 % 255) as f32 - 127.0) / 8.0 })
            .collect();
        let acts = quantize_rows_k(&x, 256);
        for &isa in Isa::available() {
            let mut out = vec![0f32; 3 * 9];
            w.matmul_on(isa, &x, 3, &mut out).expect("matmul");
            for i in 0..3 {
                for j in 0..9 {
                    let (isum, imin) = kquant::block_sums_k(ty, w.row(j), &acts[i]);
                    let d = f16::from_le_bytes([w.row(j)[at], w.row(j)[at + 1]]).to_f32();
                    let want = d * acts[i].d * isum as f32
                        - if ty == QType::Q6K { 0.0 } else { 0.015625 * acts[i].d * imin as f32 };
                    assert_eq!(out[i * 9 + j], want, "{ty:?} {isa:?} [{i},{j}]");
                }
            }
        }
    }
}

#[test]
fn the_k_reference_tracks_f32_arithmetic() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for ty in K_TYPES {
        let (n, k, m) = (11, 512, 3);
        let w = random_k_matrix(ty, n, k, &mut rng);
        let x = random_x(m, k, &mut rng);
        let mut out = vec![0f32; m * n];
        w.matmul_on(Isa::Scalar, &x, m, &mut out).expect("matmul");
        let acts = quantize_rows_k(&x, k);
        for i in 0..m {
            let xs = &x[i * k..(i + 1) * k];
            for j in 0..n {
                let wr = w.dequantize_row(j);
                let exact: f32 = wr.iter().zip(xs).map(|(a, b)| a * b).sum();
                // Half a step per activation, plus f32 rounding of the scaled sums.
                let bound: f32 = wr
                    .chunks(QK_K)
                    .zip(&acts[i * k / QK_K..])
                    .map(|(ws, b)| ws.iter().map(|v| v.abs()).sum::<f32>() * b.d.abs() * 0.5)
                    .sum::<f32>()
                    * 1.001
                    + 1e-4;
                let got = out[i * n + j];
                assert!((got - exact).abs() <= bound, "{ty:?} [{i},{j}]: {got} vs exact {exact} (bound {bound})");
            }
        }
    }
}

#[test]
fn q8_k_activations_follow_ggml_rounding() {
    let mut x = [0f32; QK_K];
    x[0] = -127.0; // the largest magnitude is negative: iscale = −127/max = 1, d = 1
    x[1] = 2.5; // ties go to even (ggml's nearest_int), unlike Q8_0's roundf
    x[2] = 3.5;
    x[3] = -0.5;
    x[16] = 126.6;
    let mut a = [ActBlockK::ZERO];
    quantize_row_k(&x, &mut a);
    assert_eq!(a[0].d, 1.0);
    assert_eq!(&a[0].qs[..4], &[-127, 2, 4, 0]);
    assert_eq!(a[0].qs[16], 127);
    assert_eq!(a[0].bsums[0], -127 + 2 + 4);
    assert_eq!(a[0].bsums[1], 127);
    // A positive maximum gives a negative scale: the codes flip sign and it maps to −127.
    let y: Vec<f32> = (0..QK_K).map(|i| i as f32 / 255.0).collect();
    quantize_row_k(&y, &mut a);
    assert_eq!(a[0].qs[255], -127);
    assert_eq!(a[0].qs[128], -64);
    assert_eq!(a[0].d, 1.0 / (-127.0));
    let z = [0f32; QK_K];
    quantize_row_k(&z, &mut a);
    assert!(a[0].qs.iter().all(|&q| q == 0) && a[0].d == 0.0);
}

#[test]
fn k_quants_need_whole_super_blocks() {
    assert!(QMatrix::new(QType::Q4K, 1, 576, vec![0; 324]).is_err(), "576 is not a multiple of 256");
    assert!(QMatrix::new(QType::Q6K, 2, 256, vec![0; 420]).is_ok());
    assert_eq!(QType::from_name("Q5_K"), Some(QType::Q5K));
}

/// The 512-bit VNNI GEMM (pairs of column groups) gives exactly the 256-bit VNNI kernel's
/// bits on every packed type, including a trailing odd group and a partial last group.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_512_bit_gemm_equals_the_256_bit_one_bit_for_bit() {
    if !Isa::available().contains(&Isa::Avx512Vnni) {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    for ty in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        for (n, k, m) in [(37, 96, 9), (48, 608, 3), (8, 32, 1), (129, 256, 17)] {
            let w = random_matrix(ty, n, k, &mut rng);
            let p = w.packed().expect("packable type");
            let acts = quantize_rows(&random_x(m, k, &mut rng), k);
            let (mut wide, mut narrow) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            // SAFETY: the CPU has AVX-512 VNNI (checked above); `p` packs `w`, `acts` holds
            // `m` whole rows and each output holds `m × n` values.
            unsafe {
                crate::quant::x86_packed512::gemm(p, ty, 0..p.groups, &acts, k / QK, wide.as_mut_ptr(), n);
                crate::quant::x86_packed::vnni::gemm(p, ty, 0..p.groups, &acts, k / QK, narrow.as_mut_ptr(), n);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&wide), bits(&narrow), "{ty:?} n={n} k={k} m={m}");
        }
    }
}
