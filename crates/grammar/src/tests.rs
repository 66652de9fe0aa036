//! On a byte-level BPE tokenizer of 256 byte tokens, a few merged ones and `</s>`: every
//! walk through a grammar's masks (random allowed tokens) ends in text the constraint accepts,
//! and what cannot compile is refused with the construct named.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::*;

/// GPT-2's byte → char alphabet.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

const EOS: u32 = 260;

/// Bytes, then `"` + `{`-ish merges, then `</s>` at 260, in a vocabulary padded to 264.
fn tokenizer() -> tokenizers::Tokenizer {
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    let merges = [("\"", "a"), ("{", "\""), ("1", "2"), ("y", "e")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + i));
    }
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let spec = json!({
        "version": "1.0",
        "added_tokens": [{"id": EOS, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    spec.to_string().parse().expect("the test tokenizer")
}

fn grammars() -> Grammars {
    Grammars::new(&tokenizer(), 264, &[EOS]).expect("grammars")
}

/// Walk the masks with random allowed tokens until `</s>`; the text produced.
fn walk(g: &Grammars, c: &Constraint, seed: u64) -> String {
    let tok = tokenizer();
    let mut m = g.compile(c).expect("compiles");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..400 {
        let mask = m.mask().expect("mask");
        let allowed: Vec<u32> = (0..264).filter(|&t| mask.allows(t)).collect();
        assert!(!allowed.is_empty(), "an empty mask after {ids:?}");
        assert!(allowed.iter().all(|&t| t < 260 || t == EOS), "a padding or special token allowed");
        // End when allowed half of the time, and close strings and objects often, so that
        // walks through open-ended grammars (any object, free strings) stay short.
        let closers: Vec<u32> = allowed.iter().copied().filter(|&t| t < 256 && b"\"}]".contains(&(t as u8))).collect();
        let t = if allowed.contains(&EOS) && rng.random_bool(0.5) {
            EOS
        } else if !closers.is_empty() && rng.random_bool(0.5) {
            closers[rng.random_range(0..closers.len())]
        } else {
            allowed[rng.random_range(0..allowed.len())]
        };
        if t == EOS {
            assert!(m.is_complete(), "</s> allowed before the grammar is complete");
            return tok.decode(&ids, true).expect("decode");
        }
        m.commit(t).expect("commit an allowed token");
        ids.push(t);
    }
    panic!("no end in 400 tokens: {:?}", tok.decode(&ids, true));
}

#[test]
fn random_walks_through_the_masks_give_text_the_constraint_accepts() {
    let g = grammars();
    let schema = json!({
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "s": {"type": "string", "maxLength": 4, "pattern": "^[a-c]*$"},
            "e": {"enum": ["red", "blue"]}
        },
        "required": ["n", "e"],
        "additionalProperties": false
    });
    for seed in 0..20 {
        let text = walk(&g, &Constraint::JsonSchema(schema.clone()), seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let n = v["n"].as_i64().unwrap_or(-1);
        assert!((0..=99).contains(&n), "{text}");
        assert!(["red", "blue"].contains(&v["e"].as_str().unwrap_or("")), "{text}");
        if let Some(s) = v.get("s") {
            let s = s.as_str().unwrap_or("?");
            assert!(s.len() <= 4 && s.chars().all(|c| "abc".contains(c)), "{text}");
        }
        assert!(v.as_object().unwrap().keys().all(|k| ["n", "s", "e"].contains(&k.as_str())), "{text}");

        let text = walk(&g, &Constraint::Regex("[ab]{2,3}-[0-9]".into()), seed);
        let ok = text.len() >= 4
            && text[..text.len() - 2].chars().all(|c| c == 'a' || c == 'b')
            && text.ends_with(|c: char| c.is_ascii_digit())
            && text.as_bytes()[text.len() - 2] == b'-';
        assert!(ok, "{text:?}");

        let text = walk(&g, &Constraint::Choice(vec!["yes".into(), "no".into(), "maybe so".into()]), seed);
        assert!(["yes", "no", "maybe so"].contains(&text.as_str()), "{text:?}");

        let text = walk(&g, &Constraint::JsonObject, seed);
        assert!(serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()), "{text:?}");

        let lark = Constraint::Grammar("start: \"x\" num \"!\"\nnum: /[1-3]/".into());
        let text = walk(&g, &lark, seed);
        assert!(["x1!", "x2!", "x3!"].contains(&text.as_str()), "{text:?}");
    }
}

#[test]
fn a_fork_goes_on_from_the_same_place() {
    let g = grammars();
    let mut a = g.compile(&Constraint::Choice(vec!["ab".into(), "ac".into()])).unwrap();
    a.commit(u32::from(b'a')).unwrap();
    let mut b = a.fork();
    b.commit(u32::from(b'c')).unwrap();
    // `a` was not moved by `b`: it may still take `b` and `c`.
    let mask = a.mask().unwrap();
    assert!(mask.allows(u32::from(b'b')) && mask.allows(u32::from(b'c')) && !mask.allows(EOS));
    assert!(b.is_complete() && b.mask().unwrap().allows(EOS));
    assert_eq!(b.mask().unwrap().count(), 1, "only </s> after a complete choice");
}

#[test]
fn what_cannot_compile_is_refused_naming_the_construct() {
    let g = grammars();
    for (c, names) in [
        (Constraint::JsonSchema(json!({"not": {"type": "string"}})), "not"),
        (Constraint::JsonSchema(json!({"type": "string", "format": "no-such-format"})), "no-such-format"),
        (Constraint::JsonSchema(json!(7)), "JSON schema"),
        (Constraint::Regex("(unclosed".into()), "unclosed"),
        (Constraint::Grammar("start: undefined_rule".into()), "undefined_rule"),
        (Constraint::Choice(vec![]), "choice"),
    ] {
        match g.compile(&c) {
            Err(GrammarError::Invalid(e)) => assert!(e.contains(names), "{c:?}: {e}"),
            Err(e) => panic!("{c:?}: not Invalid: {e}"),
            Ok(_) => panic!("{c:?} compiled"),
        }
    }
}

#[test]
fn a_failed_matcher_ends_its_sequence() {
    let g = grammars();
    let mut m = g.compile(&Constraint::Regex("z+".into())).unwrap();
    assert!(m.commit(u32::from(b'q')).is_err(), "a token the grammar does not allow");
    let (mask, failed) = m.mask_or_end();
    assert!(failed.is_some());
    assert!(mask.allows(EOS) && mask.count() == 1, "only </s> after a failure");
}

#[test]
fn masks_limit_logits() {
    let g = grammars();
    let mut m = g.compile(&Constraint::Regex("z".into())).unwrap();
    let mut logits = vec![1.0f32; 270];
    m.mask().unwrap().apply(&mut logits);
    let open: Vec<usize> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, _)| i).collect();
    assert_eq!(open, vec![usize::from(b'z')], "only `z`, and nothing past the vocabulary");
}

#[test]
fn a_tokenizer_larger_than_the_model_or_without_eos_is_refused() {
    assert!(matches!(Grammars::new(&tokenizer(), 100, &[EOS]), Err(GrammarError::Tokenizer(_))));
    assert!(matches!(Grammars::new(&tokenizer(), 264, &[999]), Err(GrammarError::Tokenizer(_))));
}
