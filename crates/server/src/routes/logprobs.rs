//! Engine log-probabilities → the chat and completions `logprobs` shapes.

use std::collections::BTreeMap;

use tessera_protocol::TokenLogprobs;
use tessera_protocol::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob, PromptLogprobs, TopLogprob};

use crate::state::ServedModel;

/// The text of one token as clients see it (special tokens shown).
fn token_text(m: &ServedModel, id: u32) -> String {
    m.tokenizer.decode(&[id], false).unwrap_or_default()
}

/// JSON has no -inf: a banned token reports vLLM's floor instead.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

pub(crate) fn chat(m: &ServedModel, ids: &[u32], lps: &[TokenLogprobs]) -> ChatLogprobs {
    let content = ids
        .iter()
        .zip(lps)
        .map(|(&id, lp)| {
            let token = token_text(m, id);
            ChatTokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: finite(lp.logprob),
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|&(t, l)| {
                        let token = token_text(m, t);
                        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: finite(l) }
                    })
                    .collect(),
            }
        })
        .collect();
    ChatLogprobs { content }
}

/// `offset`: where the first token's text starts in the choice's text (after an echoed prompt).
pub(crate) fn completion(m: &ServedModel, ids: &[u32], lps: &[TokenLogprobs], offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for (&id, lp) in ids.iter().zip(lps) {
        let token = token_text(m, id);
        out.text_offset.push(at);
        at += token.len();
        out.tokens.push(token);
        out.token_logprobs.push(Some(finite(lp.logprob)));
        let top: BTreeMap<String, f32> = lp.top.iter().map(|&(t, l)| (token_text(m, t), finite(l))).collect();
        out.top_logprobs.push(Some(top));
    }
    out
}

/// The echoed prompt's entries (OpenAI's legacy `echo` + `logprobs`): offsets from 0, `k`
/// alternatives, `null` where nothing predicts the token (the first).
pub(crate) fn echo(m: &ServedModel, ids: &[u32], lps: &[Option<TokenLogprobs>], k: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = 0;
    for (i, &id) in ids.iter().enumerate() {
        let token = token_text(m, id);
        out.text_offset.push(at);
        at += token.len();
        out.tokens.push(token);
        let lp = lps.get(i).and_then(Option::as_ref);
        out.token_logprobs.push(lp.map(|l| finite(l.logprob)));
        out.top_logprobs.push(lp.map(|l| l.top.iter().take(k).map(|&(t, v)| (token_text(m, t), finite(v))).collect()));
    }
    out
}

/// vLLM's `prompt_logprobs`: per prompt token, itself and `k` alternatives by token id.
pub(crate) fn prompt(m: &ServedModel, ids: &[u32], lps: &[Option<TokenLogprobs>], k: usize) -> PromptLogprobs {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            let lp = lps.get(i)?.as_ref()?;
            let entry = |t: u32, logprob: f32, rank: u32| {
                (t.to_string(), PromptLogprob { logprob: finite(logprob), rank, decoded_token: token_text(m, t) })
            };
            let mut map: BTreeMap<String, PromptLogprob> =
                lp.top.iter().take(k).enumerate().map(|(r, &(t, v))| entry(t, v, r as u32 + 1)).collect();
            let own = entry(id, lp.logprob, lp.rank);
            map.insert(own.0, own.1);
            Some(map)
        })
        .collect()
}
