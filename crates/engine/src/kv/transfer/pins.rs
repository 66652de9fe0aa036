//! Prefilled blocks waiting to be pulled, by one-shot token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Blocks of one prefilled request, pinned in the engine under `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    pub seq: u64,
    pub blocks: Vec<u32>,
    pub num_tokens: usize,
    pub deadline: Instant,
}

/// Pins by token. Claiming removes a pin, so a token works once and an expiry never frees
/// blocks that are being sent (the sender unpins them when done).
#[derive(Debug, Default)]
pub struct Pins {
    map: Mutex<HashMap<String, Pin>>,
}

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pin>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, token: String, pin: Pin) {
        self.lock().insert(token, pin);
    }

    /// Take the pin of `token` if it exists and has not expired.
    pub fn claim(&self, token: &str, now: Instant) -> Option<Pin> {
        let mut map = self.lock();
        match map.get(token) {
            Some(p) if p.deadline > now => map.remove(token),
            _ => None,
        }
    }

    /// Remove every pin past its deadline; their engine sequences, to unpin.
    pub fn take_expired(&self, now: Instant) -> Vec<u64> {
        let mut map = self.lock();
        let gone: Vec<String> = map.iter().filter(|(_, p)| p.deadline <= now).map(|(t, _)| t.clone()).collect();
        gone.iter().filter_map(|t| map.remove(t)).map(|p| p.seq).collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().values().map(|p| p.deadline).min()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_token_works_once_and_only_before_its_deadline() {
        let pins = Pins::default();
        let now = Instant::now();
        let pin = |seq, s| Pin { seq, blocks: vec![1, 2], num_tokens: 20, deadline: now + Duration::from_secs(s) };
        pins.insert("a".into(), pin(1, 10));
        pins.insert("b".into(), pin(2, 1));
        assert_eq!(pins.claim("nope", now), None);
        assert_eq!(pins.claim("a", now).map(|p| p.seq), Some(1));
        assert_eq!(pins.claim("a", now), None, "one-shot");
        let later = now + Duration::from_secs(2);
        assert_eq!(pins.claim("b", later), None, "expired");
        assert_eq!(pins.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(pins.take_expired(now), Vec::<u64>::new());
        assert_eq!(pins.take_expired(later), vec![2]);
        assert!(pins.is_empty());
    }
}
