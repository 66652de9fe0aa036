//! Token sampling: logit processors (bias, min-tokens ban, repetition / presence / frequency
//! penalties), then greedy or temperature with top-k, top-p and min-p, on a per-sequence
//! seeded stream; optionally the log-probabilities of the model's distribution.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{SampleSpec, SamplingConfig, TokenLogprobs};

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

/// `token`'s log-probability and the `k` most likely tokens under softmax(`logits`).
fn logprobs(logits: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let lp = |t: u32| logits.get(t as usize).map_or(f32::NEG_INFINITY, |&x| x - lse);
    let mut top = Vec::with_capacity(k);
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        top = idx.into_iter().map(|t| (t, lp(t))).collect();
    }
    TokenLogprobs { logprob: lp(token), top }
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

fn choose(logits: &[f32], spec: &SampleSpec) -> u32 {
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
    if max == f32::NEG_INFINITY {
        return idx[0];
    }
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - max) / c.temperature).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut keep = probs.len();
    if c.top_p < 1.0 {
        let mut cum = 0.0;
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= c.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    if c.min_p > 0.0 {
        // probs[0] is the largest; the list is sorted, so the cut is a prefix.
        let floor = c.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    probs.truncate(keep);
    idx.truncate(keep);
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
