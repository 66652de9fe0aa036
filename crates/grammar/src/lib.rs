//! Structured outputs: a request's [`Constraint`] (a JSON schema, any JSON object, a regex, a
//! choice of strings, a Lark grammar) compiled with llguidance against the served tokenizer
//! into a per-sequence [`Constrained`] matcher, which gives the allowed-token mask of each step
//! and takes each sampled token.
//!
//! Owns: the token environment (every token's bytes, the end-of-sequence ids), compiling, the
//! masks. Must not touch: sampling arithmetic (the runner applies a mask to its logits),
//! scheduling, HTTP or files.

use std::sync::{Arc, Mutex, MutexGuard};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
pub use tessera_protocol::Constraint;

/// What went wrong, in words a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The request's schema or grammar cannot be compiled (a 400 naming the construct).
    #[error("{0}")]
    Invalid(String),
    /// The tokenizer cannot back a grammar (a start-up error).
    #[error("structured outputs: {0}")]
    Tokenizer(String),
    /// The matcher failed while generating (e.g. a token the grammar does not allow).
    #[error("structured output: {0}")]
    Matcher(String),
}

pub type Result<T> = std::result::Result<T, GrammarError>;

/// Every token's bytes as the grammar sees them: byte-level BPE tokens (GPT-2's alphabet,
/// `Ġ` for a space) mapped back to bytes, SentencePiece's `▁` to a space and its `<0x..>`
/// byte tokens to their byte. Special tokens get llguidance's marker byte, so no grammar
/// emits them; ids past the tokenizer's (a padded vocabulary) are empty and never allowed.
fn token_bytes(tokenizer: &tokenizers::Tokenizer, vocab: usize) -> Result<Vec<Vec<u8>>> {
    let json = tokenizer.to_string(false).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
    let v: Value = serde_json::from_str(&json).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
    let mut words = llguidance::token_bytes_from_tokenizer_json(&v)
        .map_err(|e| GrammarError::Tokenizer(format!("cannot read the tokenizer's tokens: {e}")))?;
    if words.len() > vocab {
        return Err(GrammarError::Tokenizer(format!("the tokenizer has {} tokens, the model {vocab}", words.len())));
    }
    words.resize(vocab, Vec::new());
    Ok(words)
}

/// The compiler of one served model's grammars.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    vocab: usize,
    /// Only the end-of-sequence tokens.
    end: Mask,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab", &self.vocab).finish()
    }
}

impl Grammars {
    /// For a model whose logits have `vocab` entries and which ends a sequence with any of `eos`.
    pub fn new(tokenizer: &tokenizers::Tokenizer, vocab: usize, eos: &[u32]) -> Result<Self> {
        let words = token_bytes(tokenizer, vocab)?;
        let eos: Vec<u32> = eos.iter().copied().filter(|&t| (t as usize) < vocab).collect();
        let Some(&first) = eos.first() else {
            return Err(GrammarError::Tokenizer("no end-of-sequence token inside the vocabulary".into()));
        };
        let n = u32::try_from(vocab).map_err(|_| GrammarError::Tokenizer(format!("a vocabulary of {vocab}")))?;
        let trie = TokTrie::from(&TokRxInfo::new(n, first), &words).with_eos_tokens(&eos);
        let mut end = SimpleVob::alloc(vocab);
        eos.iter().for_each(|&t| end.allow_token(t));
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        factory.set_stderr_log_level(0);
        factory.limits_mut().verbose_errors = false;
        Ok(Self { factory: Arc::new(factory), vocab, end: Mask(end) })
    }

    /// Entries in a mask (the model's logits width).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Compile `c` for one sequence. JSON is generated compactly (no free whitespace between
    /// tokens, as vLLM's default), so a small model cannot wander off in blank lines.
    pub fn compile(&self, c: &Constraint) -> Result<Constrained> {
        let compact = json!({"whitespace_flexible": false});
        let grammar = match c {
            Constraint::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(o) = schema.as_object_mut() {
                    o.entry("x-guidance").or_insert(compact);
                } else if !schema.is_boolean() {
                    return Err(GrammarError::Invalid("a JSON schema must be an object or a boolean".into()));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(json!({"type": "object", "x-guidance": compact}))
            }
            Constraint::Regex(r) => TopLevelGrammar::from_regex(r),
            Constraint::Choice(options) => {
                if options.is_empty() {
                    return Err(GrammarError::Invalid("`choice` needs at least one option".into()));
                }
                let alts: Vec<String> = options.iter().map(|o| Value::String(o.clone()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Constraint::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self.factory.create_parser(grammar).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(e));
        }
        Ok(Constrained { matcher, vocab: self.vocab, end: self.end.clone() })
    }
}

/// One sequence's position in its grammar.
pub struct Constrained {
    matcher: Matcher,
    vocab: usize,
    end: Mask,
}

/// The tokens allowed next.
#[derive(Clone)]
pub struct Mask(SimpleVob);

impl Mask {
    /// Disallowed tokens' logits become −∞ (a row of `logits` may be narrower or wider than
    /// the mask: the extra entries are disallowed).
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= self.0.len() || !self.0.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }
}

impl Constrained {
    /// The tokens allowed next, or only the end-of-sequence tokens (and the error) when the
    /// matcher failed: the sequence then ends at once, the others of the step go on.
    pub fn mask_or_end(&mut self) -> (Mask, Option<GrammarError>) {
        match self.mask() {
            Ok(m) => (m, None),
            Err(e) => (self.end.clone(), Some(e)),
        }
    }

    /// The tokens allowed next; only the end-of-sequence tokens once the grammar is complete.
    pub fn mask(&mut self) -> Result<Mask> {
        let m = self.matcher.compute_mask_or_eos().map_err(|e| GrammarError::Matcher(e.to_string()))?;
        debug_assert!(m.len() >= self.vocab);
        Ok(Mask(m))
    }

    /// Advance past a sampled token (an end-of-sequence token ends the grammar).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| GrammarError::Matcher(e.to_string()))
    }

    /// Whether the grammar is complete (only an end-of-sequence token may follow).
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// A copy at the same position (the other choices of an `n > 1` request).
    pub fn fork(&self) -> Constrained {
        Constrained { matcher: self.matcher.deep_clone(), vocab: self.vocab, end: self.end.clone() }
    }
}

/// A sequence's matcher, shared by the engine (which compiles it) and the rank that samples
/// (which masks and commits). Equal only to itself.
#[derive(Clone)]
pub struct GrammarHandle(Arc<Mutex<Constrained>>);

impl GrammarHandle {
    pub fn new(c: Constrained) -> Self {
        Self(Arc::new(Mutex::new(c)))
    }

    pub fn lock(&self) -> MutexGuard<'_, Constrained> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PartialEq for GrammarHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for GrammarHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarHandle")
    }
}

#[cfg(test)]
mod tests;
