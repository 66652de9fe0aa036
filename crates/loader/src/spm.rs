//! SentencePiece BPE vocabularies as GGUF carries them (`tokenizer.ggml.model = llama`: pieces,
//! scores, types; Gemma, Llama 2), rebuilt as a Hugging Face BPE tokenizer the way
//! `transformers` converts a SentencePiece model: a merge for every way a normal piece splits
//! into two normal pieces, ranked by the piece's score (highest first), byte fallback for
//! characters outside the vocabulary, spaces as `▁` (no dummy prefix unless the file asks).

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Sequence as NormalizerSequence};
use tokenizers::Tokenizer;

/// SentencePiece's normal piece type (GGUF `token_type` 1).
const NORMAL: i32 = 1;

/// The merges of a SentencePiece vocabulary: `(left, right)` for each split of a normal piece
/// into two normal pieces, highest-scoring pieces first (ties: left then right id).
fn merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
    let normal = |i: usize| types.get(i).is_none_or(|&t| t == NORMAL);
    let ids: HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|(i, _)| normal(*i)).map(|(i, t)| (t.as_str(), i)).collect();
    let mut out: Vec<(f32, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate().filter(|(i, _)| normal(*i)) {
        let score = scores.get(i).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        out.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    // Stable: within a score, the order above.
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    out.into_iter().map(|(_, l, r)| (tokens[l].clone(), tokens[r].clone())).collect()
}

/// The tokenizer (model, normalizer, decoder) of a SentencePiece BPE vocabulary.
pub(crate) fn build(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    unk: Option<&str>,
    space_prefix: bool,
) -> std::result::Result<Tokenizer, String> {
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges(tokens, scores, types)).byte_fallback(true);
    if let Some(u) = unk {
        bpe = bpe.unk_token(u.to_string()).fuse_unk(true);
    }
    let bpe = bpe.build().map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    let spaces = NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(|e| e.to_string())?);
    let normalizer = match space_prefix {
        true => NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new("▁".into())),
            spaces,
        ])),
        false => spaces,
    };
    tokenizer.with_normalizer(Some(normalizer)).map_err(|e| e.to_string())?;
    let back = Replace::new("▁", " ").map_err(|e| e.to_string())?;
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(back),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ]))));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let pieces = ["<unk>", "<0x0A>", "▁", "a", "b", "c", "ab", "bc", "▁a", "abc", "▁ab"];
        let tokens: Vec<String> = pieces.iter().map(|s| s.to_string()).collect();
        // Higher score merges first: "ab" before "bc".
        let scores = vec![0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0];
        let types = vec![2, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        (tokens, scores, types)
    }

    #[test]
    fn merges_follow_piece_scores_and_text_round_trips() {
        let (tokens, scores, types) = vocab();
        let m = merges(&tokens, &scores, &types);
        let pos = |l: &str, r: &str| m.iter().position(|x| x.0 == l && x.1 == r).unwrap();
        assert!(pos("a", "b") < pos("b", "c"), "{m:?}");
        assert!(m.iter().all(|x| x.0 != "<unk>" && x.1 != "<0x0A>"), "special pieces take no part");
        let t = build(&tokens, &scores, &types, Some("<unk>"), false).unwrap();
        let ids = t.encode("abc ab\n", false).unwrap().get_ids().to_vec();
        // "abc" then "▁ab", and the newline through byte fallback.
        assert_eq!(ids, vec![9, 10, 1]);
        assert_eq!(t.decode(&ids, false).unwrap(), "abc ab\n");
    }
}
