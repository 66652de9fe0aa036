//! Token sampling: greedy, temperature, top-k, top-p, with a per-sequence seeded stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::SampleSpec;

/// First index of the maximum (ties resolve to the lowest id, like llama.cpp).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Choose the next token from one row of logits.
pub fn sample(logits: &[f32], spec: &SampleSpec) -> u32 {
    let c = &spec.config;
    if c.temperature <= 0.0 || c.top_k == 1 || logits.is_empty() {
        return argmax(logits);
    }
    // Candidates sorted by logit, descending, cut to top-k.
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = if c.top_k == 0 { idx.len() } else { c.top_k.min(idx.len()) };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - max) / c.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if c.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= c.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed ^ spec.output_index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut r = rng.random::<f32>() * total;
    for (p, &i) in probs.iter().zip(idx.iter()) {
        if r < *p {
            return i;
        }
        r -= p;
    }
    idx[idx.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingConfig;

    fn spec(temperature: f32, top_k: usize, top_p: f32, seed: u64, output_index: u64) -> SampleSpec {
        SampleSpec { config: SamplingConfig { temperature, top_p, top_k, seed }, output_index }
    }

    #[test]
    fn greedy_picks_first_max() {
        assert_eq!(sample(&[0.1, 3.0, 3.0, -1.0], &spec(0.0, 0, 1.0, 0, 0)), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let a: Vec<u32> = (0..20).map(|n| sample(&logits, &spec(1.0, 0, 1.0, 42, n))).collect();
        let b: Vec<u32> = (0..20).map(|n| sample(&logits, &spec(1.0, 0, 1.0, 42, n))).collect();
        let c: Vec<u32> = (0..20).map(|n| sample(&logits, &spec(1.0, 0, 1.0, 43, n))).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_and_top_p_restrict_candidates() {
        let logits = [5.0, 4.9, 0.0, -3.0];
        for n in 0..50 {
            let t = sample(&logits, &spec(1.0, 2, 1.0, 7, n));
            assert!(t == 0 || t == 1, "top_k=2 gave {t}");
            // top_p small keeps only the most likely token.
            assert_eq!(sample(&logits, &spec(1.0, 0, 0.1, 7, n)), 0);
        }
    }
}
