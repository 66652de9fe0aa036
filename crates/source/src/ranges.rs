//! A set of byte ranges held locally: sorted, disjoint, merged when they touch.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Byte ranges of a file already present in its local copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    /// Add `r`, merging with neighbours it touches or overlaps.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b < start || a > end {
                kept.push((a, b));
            } else {
                start = start.min(a);
                end = end.max(b);
            }
        }
        kept.push((start, end));
        kept.sort_unstable();
        self.0 = kept;
    }

    /// The parts of `r` not yet held.
    pub fn missing(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = r.start;
        for &(a, b) in &self.0 {
            if b <= at {
                continue;
            }
            if a >= r.end {
                break;
            }
            if a > at {
                out.push(at..a);
            }
            at = at.max(b);
            if at >= r.end {
                break;
            }
        }
        if at < r.end {
            out.push(at..r.end);
        }
        out
    }

    /// Whether all of `0..len` is held.
    pub fn covers(&self, len: u64) -> bool {
        self.missing(0..len).is_empty()
    }

    /// The same set rebuilt from its pairs (sorted, merged, empty pairs dropped, clipped to
    /// `len`): a sidecar read from disk is not trusted to be well-formed.
    pub fn normalized(&self, len: u64) -> Self {
        let mut out = Self::default();
        for &(a, b) in &self.0 {
            out.insert(a.min(len)..b.min(len));
        }
        out
    }

    /// Bytes held.
    pub fn held(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a).sum()
    }
}

/// Merge ranges that touch or lie within `gap` bytes of each other (sorted by start), so a
/// run of tiny neighbours becomes one request without reading much that was not asked for.
pub fn coalesce(mut ranges: Vec<Range<u64>>, gap: u64) -> Vec<Range<u64>> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Cut ranges into pieces of at most `chunk` bytes (one request each).
pub fn split(ranges: &[Range<u64>], chunk: u64) -> Vec<Range<u64>> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let end = r.end.min(at + chunk);
            out.push(at..end);
            at = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_missing_finds_the_holes() {
        let mut s = RangeSet::default();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(s.missing(0..50), vec![0..10, 20..30, 40..50]);
        assert_eq!(s.missing(12..18), Vec::<Range<u64>>::new());
        assert_eq!(s.missing(15..35), vec![20..30]);
        s.insert(20..30);
        assert_eq!(s.0, vec![(10, 40)]);
        s.insert(0..10);
        s.insert(40..45);
        assert_eq!(s.0, vec![(0, 45)]);
        assert!(s.covers(45) && !s.covers(46));
        assert_eq!(s.held(), 45);
        s.insert(5..100);
        assert_eq!(s.0, vec![(0, 100)]);
        let messy = RangeSet(vec![(50, 60), (5, 3), (0, 10), (8, 20), (90, 200)]);
        assert_eq!(messy.normalized(100).0, vec![(0, 20), (50, 60), (90, 100)]);
    }

    #[test]
    fn coalesce_joins_near_neighbours_and_split_cuts_chunks() {
        assert_eq!(coalesce(vec![20..30, 0..10, 12..15, 100..110], 2), vec![0..15, 20..30, 100..110]);
        assert_eq!(coalesce(vec![0..10, 10..20], 0), vec![0..20]);
        assert_eq!(split(&[0..10, 20..25], 4), vec![0..4, 4..8, 8..10, 20..24, 24..25]);
    }
}
