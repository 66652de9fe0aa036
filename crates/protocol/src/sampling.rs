//! Validation of request fields into [`SamplingParams`].

use crate::requests::CommonParams;
use crate::ProtocolError;

/// Log-probabilities (of the model's distribution, before sampling filters) of one token: what
/// the engine reports for a sampled token or a scored prompt token.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// 1-based rank of the token in the distribution (1 = most likely).
    #[serde(default)]
    pub rank: u32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Why a choice ended (`finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Validated sampling settings of one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = disabled.
    pub top_k: usize,
    /// 0 = disabled.
    pub min_p: f32,
    /// `None` = up to the model length.
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub repetition_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// Log-probabilities of each sampled token plus this many alternatives.
    pub logprobs: Option<usize>,
    /// Log-probabilities of each prompt token (after the first) plus this many alternatives.
    #[serde(default)]
    pub prompt_logprobs: Option<usize>,
    /// Number of choices.
    pub n: usize,
    pub skip_special_tokens: bool,
    /// Lower runs first (`--scheduling-policy priority`).
    pub priority: i64,
    /// The prefill/decode leg this request is (`kv_transfer_params`).
    #[serde(default)]
    pub kv: crate::KvIntent,
    /// What the output must match (structured outputs), if anything.
    #[serde(default)]
    pub constraint: Option<crate::StructuredOutput>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            max_tokens: None,
            min_tokens: 0,
            stop: vec![],
            stop_token_ids: vec![],
            include_stop_str_in_output: false,
            seed: None,
            ignore_eos: false,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: vec![],
            logprobs: None,
            prompt_logprobs: None,
            n: 1,
            skip_special_tokens: true,
            priority: 0,
            kv: crate::KvIntent::Local,
            constraint: None,
        }
    }
}

/// Model-provided defaults (from `generation_config.json`), used when a request omits a field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
}

/// Most alternatives returned per token (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: i64 = 20;
/// Most choices per request.
pub const MAX_N: i64 = 64;

fn finite(name: &str, v: f64) -> Result<f64, ProtocolError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(ProtocolError::param(name, format!("`{name}` must be a finite number")))
    }
}

/// `v` (when given) must be finite and within `lo..=hi`.
fn ranged(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, ProtocolError> {
    let Some(v) = v else { return Ok(None) };
    let v = finite(name, v)?;
    if !(lo..=hi).contains(&v) {
        return Err(ProtocolError::param(name, format!("`{name}` must be in [{lo}, {hi}], got {v}")));
    }
    Ok(Some(v as f32))
}

/// Refuse a known field this server cannot honour.
fn unsupported(name: &str, set: bool, why: &str) -> Result<(), ProtocolError> {
    if set {
        Err(ProtocolError::param(name, format!("`{name}` is not supported by this server: {why}")))
    } else {
        Ok(())
    }
}

/// `logprobs` / `top_logprobs` count: 0..=20.
pub fn logprobs_count(name: &str, k: i64) -> Result<usize, ProtocolError> {
    if (0..=MAX_LOGPROBS).contains(&k) {
        Ok(k as usize)
    } else {
        Err(ProtocolError::param(name, format!("`{name}` must be in [0, {MAX_LOGPROBS}], got {k}")))
    }
}

impl SamplingParams {
    /// Validate the shared fields; `max_tokens` may come from `max_completion_tokens` instead,
    /// `logprobs` is the endpoint's already-validated alternative count.
    pub fn from_common(
        c: &CommonParams,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
        defaults: &ModelDefaults,
    ) -> Result<Self, ProtocolError> {
        Self::check_unsupported(c)?;
        let temperature = ranged("temperature", c.temperature, 0.0, 2.0)?.or(defaults.temperature).unwrap_or(1.0);
        let top_p = match c.top_p {
            Some(p) => {
                let p = finite("top_p", p)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(ProtocolError::param("top_p", format!("`top_p` must be in (0, 1], got {p}")));
                }
                p as f32
            }
            None => defaults.top_p.unwrap_or(1.0),
        };
        let top_k = match c.top_k.or(defaults.top_k) {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ProtocolError::param("top_k", format!("`top_k` must be -1 (disabled) or >= 1, got {k}")))
            }
        };
        let kv = crate::KvTransferParams::intent(c.kv_transfer_params.as_ref())?;
        let max_tokens = match max_tokens {
            // The prefill leg answers one token, whatever limit the caller left in the body
            // (llm-d's older sidecar sets `max_tokens: 1` but not `max_completion_tokens`).
            _ if kv == crate::KvIntent::RemoteDecode => Some(1),
            None => None,
            // 0 is the legacy completions' scoring request (`echo` + `logprobs`): no new tokens.
            Some(m) if m >= 0 => Some(m as usize),
            Some(m) => {
                return Err(ProtocolError::param("max_tokens", format!("`max_tokens` must be at least 0, got {m}")))
            }
        };
        let min_tokens = match c.min_tokens {
            _ if kv == crate::KvIntent::RemoteDecode => 0,
            None => 0,
            Some(m) if m < 0 => {
                return Err(ProtocolError::param("min_tokens", format!("`min_tokens` must be >= 0, got {m}")))
            }
            Some(m) => m as usize,
        };
        if max_tokens.is_some_and(|mx| min_tokens > mx) {
            return Err(ProtocolError::param("min_tokens", "`min_tokens` must not exceed `max_tokens`"));
        }
        let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ProtocolError::param("stop", "stop strings must not be empty"));
        }
        if stop.len() > 16 {
            return Err(ProtocolError::param("stop", "at most 16 stop strings are allowed"));
        }
        let n = c.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ProtocolError::param("n", format!("`n` must be in [1, {MAX_N}], got {n}")));
        }
        let mut logit_bias = Vec::new();
        for (k, v) in c.logit_bias.iter().flatten() {
            let id: u32 = k.trim().parse().map_err(|_| {
                ProtocolError::param("logit_bias", format!("`logit_bias` keys must be token ids, got `{k}`"))
            })?;
            let b = ranged("logit_bias", Some(*v), -100.0, 100.0)?.unwrap_or(0.0);
            logit_bias.push((id, b));
        }
        logit_bias.sort_by_key(|x| x.0);
        let priority = c.priority.unwrap_or(0);
        Ok(Self {
            temperature,
            top_p,
            top_k,
            min_p: ranged("min_p", c.min_p, 0.0, 1.0)?.unwrap_or(0.0),
            max_tokens,
            min_tokens,
            stop,
            stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
            include_stop_str_in_output: c.include_stop_str_in_output,
            seed: c.seed.map(|s| s as u64),
            ignore_eos: c.ignore_eos,
            presence_penalty: ranged("presence_penalty", c.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0),
            frequency_penalty: ranged("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0),
            repetition_penalty: match ranged("repetition_penalty", c.repetition_penalty, 0.0, 100.0)? {
                Some(r) if r <= 0.0 => {
                    return Err(ProtocolError::param("repetition_penalty", "`repetition_penalty` must be > 0"))
                }
                r => r.unwrap_or(1.0),
            },
            logit_bias,
            logprobs,
            prompt_logprobs: c.prompt_logprobs.map(|k| logprobs_count("prompt_logprobs", k)).transpose()?,
            n: n as usize,
            skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
            priority,
            kv,
            constraint: crate::constraint(c)?,
        })
    }

    fn check_unsupported(c: &CommonParams) -> Result<(), ProtocolError> {
        unsupported("best_of", c.best_of.is_some_and(|b| Some(b) != c.n && b != 1), "use `n`")?;
        unsupported("use_beam_search", c.use_beam_search, "beam search is not implemented")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn extras_are_carried() {
        let c = common(
            r#"{"min_p":0.1,"presence_penalty":0.5,"frequency_penalty":-0.5,"repetition_penalty":1.2,
                "stop_token_ids":[7],"min_tokens":2,"logit_bias":{"9":-100,"3":5},"n":3,
                "skip_special_tokens":false,"include_stop_str_in_output":true,"priority":-4,
                "response_format":{"type":"text"},"best_of":3}"#,
        );
        let p = SamplingParams::from_common(&c, Some(10), Some(2), &ModelDefaults::default()).unwrap();
        assert_eq!((p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty), (0.1, 0.5, -0.5, 1.2));
        assert_eq!((p.stop_token_ids, p.min_tokens, p.n, p.priority), (vec![7], 2, 3, -4));
        assert_eq!(p.logit_bias, vec![(3, 5.0), (9, -100.0)]);
        assert_eq!(p.logprobs, Some(2));
        assert!(!p.skip_special_tokens && p.include_stop_str_in_output);
    }

    use super::*;

    fn common(json: &str) -> CommonParams {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_and_model_defaults() {
        let d = ModelDefaults { temperature: Some(0.2), top_p: None, top_k: Some(50) };
        let p = SamplingParams::from_common(&common("{}"), None, None, &d).unwrap();
        assert_eq!(p.temperature, 0.2);
        assert_eq!(p.top_k, 50);
        let p = SamplingParams::from_common(&common(r#"{"temperature":0}"#), Some(5), None, &d).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.max_tokens, Some(5));
    }

    #[test]
    fn each_bad_field_is_named() {
        let d = ModelDefaults::default();
        for (json, mt, param) in [
            (r#"{"temperature":3}"#, None, "temperature"),
            (r#"{"top_p":0}"#, None, "top_p"),
            (r#"{"top_k":-5}"#, None, "top_k"),
            (r#"{}"#, Some(-1), "max_tokens"),
            (r#"{"stop":[""]}"#, None, "stop"),
            (r#"{"n":0}"#, None, "n"),
            (r#"{"n":1000}"#, None, "n"),
            (r#"{"min_p":1.5}"#, None, "min_p"),
            (r#"{"presence_penalty":-3}"#, None, "presence_penalty"),
            (r#"{"frequency_penalty":9}"#, None, "frequency_penalty"),
            (r#"{"repetition_penalty":0}"#, None, "repetition_penalty"),
            (r#"{"min_tokens":-1}"#, None, "min_tokens"),
            (r#"{"min_tokens":9}"#, Some(3), "min_tokens"),
            (r#"{"logit_bias":{"abc":1}}"#, None, "logit_bias"),
            (r#"{"logit_bias":{"5":500}}"#, None, "logit_bias"),
            (r#"{"best_of":3}"#, None, "best_of"),
            (r#"{"prompt_logprobs":21}"#, None, "prompt_logprobs"),
            (r#"{"prompt_logprobs":-1}"#, None, "prompt_logprobs"),
            (r#"{"use_beam_search":true}"#, None, "use_beam_search"),
            (r#"{"response_format":{"type":"yaml"}}"#, None, "response_format"),
            (r#"{"guided_regex":["a+"]}"#, None, "guided_regex"),
        ] {
            let e = SamplingParams::from_common(&common(json), mt, None, &d).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{json}: {e}");
        }
    }
}
