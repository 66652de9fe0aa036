//! Validation of request fields into [`SamplingParams`].

use crate::requests::CommonParams;
use crate::ProtocolError;

/// Why a choice ended (`finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = disabled.
    pub top_k: usize,
    /// `None` = up to the model length.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, max_tokens: None, stop: vec![], seed: None, ignore_eos: false }
    }
}

/// Model-provided defaults (from `generation_config.json`), used when a request omits a field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
}

impl SamplingParams {
    /// Validate the shared fields; `max_tokens` may come from `max_completion_tokens` instead.
    pub fn from_common(
        c: &CommonParams,
        max_tokens: Option<i64>,
        defaults: &ModelDefaults,
    ) -> Result<Self, ProtocolError> {
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(ProtocolError::param(name, format!("`{name}` must be a finite number")))
            }
        };
        let temperature = match c.temperature {
            Some(t) => {
                let t = finite("temperature", t)?;
                if !(0.0..=2.0).contains(&t) {
                    return Err(ProtocolError::param(
                        "temperature",
                        format!("`temperature` must be in [0, 2], got {t}"),
                    ));
                }
                t as f32
            }
            None => defaults.temperature.unwrap_or(1.0),
        };
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
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => {
                return Err(ProtocolError::param("max_tokens", format!("`max_tokens` must be at least 1, got {m}")))
            }
        };
        let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ProtocolError::param("stop", "stop strings must not be empty"));
        }
        if stop.len() > 16 {
            return Err(ProtocolError::param("stop", "at most 16 stop strings are allowed"));
        }
        if let Some(n) = c.n {
            if n != 1 {
                return Err(ProtocolError::param("n", format!("`n` = {n} is not supported by this server; use n = 1")));
            }
        }
        let seed = c.seed.map(|s| s as u64);
        Ok(Self { temperature, top_p, top_k, max_tokens, stop, seed, ignore_eos: c.ignore_eos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: &str) -> CommonParams {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_and_model_defaults() {
        let d = ModelDefaults { temperature: Some(0.2), top_p: None, top_k: Some(50) };
        let p = SamplingParams::from_common(&common("{}"), None, &d).unwrap();
        assert_eq!(p.temperature, 0.2);
        assert_eq!(p.top_k, 50);
        let p = SamplingParams::from_common(&common(r#"{"temperature":0}"#), Some(5), &d).unwrap();
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
            (r#"{"n":2}"#, None, "n"),
        ] {
            let e = SamplingParams::from_common(&common(json), mt, &d).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{json}: {e}");
        }
    }
}
