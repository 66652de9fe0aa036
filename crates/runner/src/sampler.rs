//! Token sampling: logit processors (bias, min-tokens ban, repetition / presence / frequency
//! penalties), then greedy or temperature with top-k, top-p and min-p, on a per-sequence
//! seeded stream; optionally the log-probabilities of the model's distribution.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{SampleSpec, SamplingConfig, TokenLogprobs};

/// First index of the maximum (ties resolve to the lowest id, like llama.cpp).
fn argmax(logits: &[f32]) -> u32 {
    // The maximum over eight lanes (vectorises), then its first position; NaNs never win.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    logits.iter().position(|&x| x == max).unwrap_or(0) as u32
}

fn needs_processing(c: &SamplingConfig, output_index: u64) -> bool {
    c.needs_history() || !c.logit_bias.is_empty() || (output_index < c.min_tokens as u64 && !c.stop_ids.is_empty())
}

/// Apply the logit processors in vLLM's order: bias, min-tokens ban, penalties.
fn process(logits: &mut [f32], spec: &SampleSpec) {
    let c = &spec.config;
    for &(t, b) in &c.logit_bias {
        if let Some(l) = logits.get_mut(t as usize) {
            *l += b;
        }
    }
    if spec.output_index < c.min_tokens as u64 {
        for &t in &c.stop_ids {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    if !c.needs_history() {
        return;
    }
    let split = spec.prompt_len.min(spec.history.len());
    let (prompt, output) = spec.history.split_at(split);
    if c.repetition_penalty != 1.0 {
        let r = c.repetition_penalty;
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(output) {
            let i = t as usize;
            if i < logits.len() && !seen[i] {
                seen[i] = true;
                logits[i] = if logits[i] > 0.0 { logits[i] / r } else { logits[i] * r };
            }
        }
    }
    if c.presence_penalty != 0.0 || c.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= c.frequency_penalty * n as f32 + c.presence_penalty;
            }
        }
    }
}

/// `token`'s log-probability and rank, and the `k` most likely tokens under softmax(`logits`).
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let lp = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&x| x - lse);
    let mut top = Vec::with_capacity(k);
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        idx.truncate(k);
        idx.sort_unstable_by(by_logit_desc(logits));
        top = idx.into_iter().map(|t| (t, lp(t))).collect();
    }
    let own = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let rank = 1 + logits.iter().filter(|&&x| x > own).count() as u32;
    TokenLogprobs { logprob: lp(token), rank, top }
}

/// Choose the next token from one row of logits (and its log-probabilities when asked).
pub fn sample(logits: &[f32], spec: &SampleSpec) -> (u32, Option<TokenLogprobs>) {
    let processed;
    let work: &[f32] = if needs_processing(&spec.config, spec.output_index) {
        let mut l = logits.to_vec();
        process(&mut l, spec);
        processed = l;
        &processed
    } else {
        logits
    };
    let token = choose(work, spec);
    (token, spec.config.logprobs.map(|k| logprobs(logits, token, k)))
}

/// Descending by logit, ties to the lower id.
fn by_logit_desc(logits: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    move |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
}

/// Temperature sampling with top-k, top-p and min-p, without sorting the vocabulary: top-k
/// is a selection, min-p a threshold, and top-p sorts only a growing prefix of the
/// candidates until it holds the requested mass.
fn choose(logits: &[f32], spec: &SampleSpec) -> u32 {
    let c = &spec.config;
    if c.temperature <= 0.0 || c.top_k == 1 || logits.is_empty() {
        return argmax(logits);
    }
    let top = argmax(logits);
    let max = logits[top as usize];
    if max == f32::NEG_INFINITY {
        return top;
    }
    let weight = |i: u32| ((logits[i as usize] - max) / c.temperature).exp();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    if c.top_k > 0 && c.top_k < idx.len() {
        idx.select_nth_unstable_by(c.top_k - 1, by_logit_desc(logits));
        idx.truncate(c.top_k);
    }
    // The top-k set's mass normalises top-p; min-p is relative to the most likely token.
    let total: f32 = idx.iter().map(|&i| weight(i)).sum();
    if c.min_p > 0.0 {
        let floor = c.min_p; // weight(top) is 1
        idx.retain(|&i| i == top || weight(i) >= floor);
    }
    if c.top_p < 1.0 {
        let mut k = idx.len().min(64);
        loop {
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, by_logit_desc(logits));
            }
            idx[..k].sort_unstable_by(by_logit_desc(logits));
            let mut cum = 0.0;
            if let Some(n) = idx[..k].iter().position(|&i| {
                cum += weight(i) / total;
                cum >= c.top_p
            }) {
                idx.truncate(n + 1);
                break;
            }
            if k == idx.len() {
                break;
            }
            k = (k * 4).min(idx.len());
        }
    }
    let weights: Vec<f32> = idx.iter().map(|&i| weight(i)).collect();
    let kept: f32 = weights.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed ^ spec.output_index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut r = rng.random::<f32>() * kept;
    for (p, &i) in weights.iter().zip(idx.iter()) {
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

    fn spec(temperature: f32, top_k: usize, top_p: f32, seed: u64, output_index: u64) -> SampleSpec {
        SampleSpec {
            config: SamplingConfig { temperature, top_p, top_k, seed, ..Default::default() },
            output_index,
            history: vec![],
            prompt_len: 0,
        }
    }

    fn tok(logits: &[f32], s: &SampleSpec) -> u32 {
        sample(logits, s).0
    }

    #[test]
    fn greedy_picks_first_max() {
        assert_eq!(tok(&[0.1, 3.0, 3.0, -1.0], &spec(0.0, 0, 1.0, 0, 0)), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let a: Vec<u32> = (0..20).map(|n| tok(&logits, &spec(1.0, 0, 1.0, 42, n))).collect();
        let b: Vec<u32> = (0..20).map(|n| tok(&logits, &spec(1.0, 0, 1.0, 42, n))).collect();
        let c: Vec<u32> = (0..20).map(|n| tok(&logits, &spec(1.0, 0, 1.0, 43, n))).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_candidates() {
        let logits = [5.0, 4.9, 0.0, -3.0];
        for n in 0..50 {
            let t = tok(&logits, &spec(1.0, 2, 1.0, 7, n));
            assert!(t == 0 || t == 1, "top_k=2 gave {t}");
            // top_p small keeps only the most likely token.
            assert_eq!(tok(&logits, &spec(1.0, 0, 0.1, 7, n)), 0);
            let mut s = spec(1.0, 0, 1.0, 7, n);
            s.config.min_p = 0.5;
            let t = tok(&logits, &s);
            assert!(t == 0 || t == 1, "min_p=0.5 gave {t}");
        }
    }

    /// Over a large vocabulary the partial-sort sampler picks only from the set a full sort
    /// would keep (top-k, then the top-p prefix, then min-p), and reaches past its first
    /// 64-candidate window when top-p needs more.
    #[test]
    fn partial_selection_keeps_the_full_sort_candidates() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let logits: Vec<f32> = (0..5000).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let reference = |top_k: usize, top_p: f32, min_p: f32| -> Vec<u32> {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            idx.sort_unstable_by(by_logit_desc(&logits));
            idx.truncate(if top_k == 0 { idx.len() } else { top_k });
            let max = logits[idx[0] as usize];
            let w: Vec<f32> = idx.iter().map(|&i| (logits[i as usize] - max).exp()).collect();
            let total: f32 = w.iter().sum();
            let mut cum = 0.0;
            let keep_p = w.iter().position(|p| {
                cum += p / total;
                cum >= top_p
            });
            let keep_m = w.iter().take_while(|&&p| p >= min_p).count().max(1);
            let keep = keep_p.map_or(idx.len(), |n| n + 1).min(keep_m);
            idx.truncate(keep);
            idx
        };
        for (top_k, top_p, min_p) in [(0, 0.9, 0.0), (300, 0.5, 0.0), (0, 1.0, 0.6), (0, 0.95, 0.3), (0, 0.02, 0.0)] {
            let allowed = reference(top_k, top_p, min_p);
            let mut seen = std::collections::HashSet::new();
            for n in 0..400 {
                let mut s = spec(1.0, top_k, top_p, 3, n);
                s.config.min_p = min_p;
                let t = tok(&logits, &s);
                assert!(allowed.contains(&t), "top_k={top_k} top_p={top_p} min_p={min_p}: {t} is not a candidate");
                seen.insert(t);
            }
            if allowed.len() > 200 {
                assert!(seen.len() > 64, "top_p={top_p}: only {} distinct tokens of {}", seen.len(), allowed.len());
            }
        }
    }

    #[test]
    fn bias_ban_and_penalties_change_the_greedy_choice() {
        let logits = [2.0, 1.0, 0.5];
        let mut s = spec(0.0, 0, 1.0, 0, 0);
        s.config.logit_bias = vec![(2, 10.0)];
        assert_eq!(tok(&logits, &s), 2);
        let mut s = spec(0.0, 0, 1.0, 0, 0);
        s.config.stop_ids = vec![0];
        s.config.min_tokens = 1;
        assert_eq!(tok(&logits, &s), 1, "token 0 is banned before min_tokens");
        s.output_index = 1;
        assert_eq!(tok(&logits, &s), 0, "and allowed after");
        let mut s = spec(0.0, 0, 1.0, 0, 0);
        s.config.frequency_penalty = 0.6;
        s.history = vec![0, 0];
        s.prompt_len = 0;
        assert_eq!(tok(&logits, &s), 1, "2.0 - 2*0.6 < 1.0");
        s.prompt_len = 2;
        assert_eq!(tok(&logits, &s), 0, "prompt tokens are not frequency-penalised");
        let mut s = spec(0.0, 0, 1.0, 0, 0);
        s.config.repetition_penalty = 2.5;
        s.history = vec![0];
        s.prompt_len = 1;
        assert_eq!(tok(&logits, &s), 1, "2.0 / 2.5 < 1.0");
    }

    #[test]
    fn logprobs_are_of_the_unprocessed_distribution() {
        let logits = [1.0f32, 2.0, 3.0];
        let mut s = spec(0.0, 0, 1.0, 0, 0);
        s.config.logprobs = Some(2);
        let (t, lp) = sample(&logits, &s);
        let lp = lp.unwrap();
        assert_eq!(t, 2);
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((lp.logprob - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!(lp.top[0].1 >= lp.top[1].1);
    }
}
