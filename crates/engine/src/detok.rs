//! Output text: incremental detokenisation and stop strings, with hold-back so that a stop
//! string spanning several tokens is never sent to a streaming client.

use tokenizers::Tokenizer;

/// Number of prompt tokens kept as decoding context (so word-initial spaces decode right).
const CONTEXT_TOKENS: usize = 5;

/// Turns a growing list of token ids into a growing text.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl Detokenizer {
    pub fn new(prompt: &[u32], skip_special: bool) -> Self {
        let ctx = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        Self { ids: ctx.to_vec(), prefix_offset: 0, read_offset: ctx.len(), skip_special }
    }

    /// Add a token; returns the text it completes (may be empty while a multi-byte
    /// character is still incomplete).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| tok.decode(ids, self.skip_special).unwrap_or_default();
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).unwrap_or("").to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}

/// Accumulated output text with stop-string detection.
#[derive(Debug, Clone)]
pub struct OutputText {
    text: String,
    sent: usize,
    stop: Vec<String>,
    hold: usize,
    include_stop: bool,
}

impl OutputText {
    /// `include_stop`: keep the stop string that ended the text (vLLM's `include_stop_str_in_output`).
    pub fn new(stop: Vec<String>, include_stop: bool) -> Self {
        let hold = stop.iter().map(|s| s.len()).max().unwrap_or(0).saturating_sub(1);
        Self { text: String::new(), sent: 0, stop, hold, include_stop }
    }

    /// Append decoded text; with `check`, returns true when a stop string was found (the text
    /// is cut before it, or after it with `include_stop`).
    pub fn append(&mut self, delta: &str, check: bool) -> bool {
        if delta.is_empty() {
            return false;
        }
        let search_from = floor_char(&self.text, self.text.len().saturating_sub(self.hold));
        self.text.push_str(delta);
        if !check {
            return false;
        }
        let hit = self
            .stop
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|p| (search_from + p, s.len())))
            .min();
        if let Some((pos, len)) = hit {
            self.text.truncate(if self.include_stop { pos + len } else { pos });
            return true;
        }
        false
    }

    /// Text that is safe to send now (everything when `finished`).
    pub fn take_sendable(&mut self, finished: bool) -> String {
        let end =
            if finished { self.text.len() } else { floor_char(&self.text, self.text.len().saturating_sub(self.hold)) };
        if end <= self.sent {
            return String::new();
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_across_deltas_is_cut_and_never_sent() {
        let mut o = OutputText::new(vec!["END".into()], false);
        let mut sent = String::new();
        for d in ["Hello E", "N", "D tail"] {
            let stopped = o.append(d, true);
            sent.push_str(&o.take_sendable(stopped));
            if stopped {
                break;
            }
        }
        assert_eq!(sent, "Hello ");
        assert_eq!(o.text(), "Hello ");
    }

    #[test]
    fn include_stop_keeps_the_stop_string_and_unchecked_text_never_stops() {
        let mut o = OutputText::new(vec!["END".into()], true);
        assert!(!o.append("a END", false), "not checked before min_tokens");
        assert!(o.append(" b END c", true));
        assert_eq!(o.take_sendable(true), "a END b END");
    }

    #[test]
    fn without_stop_strings_everything_flows() {
        let mut o = OutputText::new(vec![], false);
        assert!(!o.append("héllo", true));
        assert_eq!(o.take_sendable(false), "héllo");
        assert_eq!(o.take_sendable(true), "");
    }

    #[test]
    fn hold_back_respects_char_boundaries() {
        let mut o = OutputText::new(vec!["xyz".into()], false);
        o.append("aé", true);
        // Holding back 2 bytes must not split 'é'.
        assert_eq!(o.take_sendable(false), "a");
        assert_eq!(o.take_sendable(true), "é");
    }
}
