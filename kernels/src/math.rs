//! Scalar maths the kernels share, written so that the compiler vectorises it inside an
//! item compiled with AVX2+FMA (`X = true`); compiled plainly it is the reference.

/// `a·b + c`, fused where the item is compiled with FMA (`X`), plain otherwise (a fused
/// multiply-add without the instruction is a slow library call).
#[inline(always)]
pub(crate) fn fma<const X: bool>(a: f32, b: f32, c: f32) -> f32 {
    if X {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for `x ≤ 0` (Cephes' polynomial; relative error below 2e-7 down to −87, where
/// the result is below 1e-37), in a form the compiler vectorises.
#[inline(always)]
pub(crate) fn exp_neg<const X: bool>(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest through the float adder (vectorises, unlike `round`); the integer
    // sits in the low mantissa bits of `t`.
    let t = x * std::f32::consts::LOG2_E + 12582912.0;
    let fx = t - 12582912.0;
    let n = t.to_bits().wrapping_sub(0x4B40_0000);
    let r = x - fx * 0.693_359_4 - fx * -2.121_944_4e-4;
    let z = r * r;
    let mut y = 1.987_569_1e-4f32;
    y = fma::<X>(y, r, 1.398_199_9e-3);
    y = fma::<X>(y, r, 8.333_452e-3);
    y = fma::<X>(y, r, 4.166_579_6e-2);
    y = fma::<X>(y, r, 1.666_666_5e-1);
    y = fma::<X>(y, r, 0.5);
    y = fma::<X>(y, z, r + 1.0);
    y * f32::from_bits(n.wrapping_add(127) << 23)
}

/// `Σ a[i]·b[i]` over eight running sums, combined as `((0+4)+(1+5))+((2+6)+(3+7))` (the
/// order attention's transposed-key path reproduces to the bit), in a form that vectorises.
#[inline(always)]
pub(crate) fn dot<const X: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = fma::<X>(x[l], y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
