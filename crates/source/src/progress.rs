//! Download progress: bytes done of the total, rate and ETA logged at a steady cadence (a bar
//! instead on a terminal), and one final line with the time taken and GB/s.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Progress of one download or load. Cheap to update from many tasks.
pub struct Progress {
    label: String,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    finished: AtomicBool,
    bar: Option<indicatif::ProgressBar>,
}

/// How often progress is logged: `TESSERA_PROGRESS_INTERVAL` seconds (default 2).
fn interval() -> Duration {
    let secs = std::env::var("TESSERA_PROGRESS_INTERVAL").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs.clamp(0.05, 3600.0))
}

impl Progress {
    /// Start reporting `label` with `total` bytes expected (0 if not known yet).
    pub fn start(label: impl Into<String>, total: u64) -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                b.set_style(style);
            }
            b
        });
        let label = label.into();
        if let Some(b) = &bar {
            b.set_message(label.clone());
        }
        let p = Arc::new(Self {
            label,
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            started: Instant::now(),
            finished: AtomicBool::new(false),
            bar,
        });
        if p.bar.is_none() {
            let weak = Arc::downgrade(&p);
            let _ = std::thread::Builder::new().name("tessera-progress".into()).spawn(move || report(weak));
        }
        p
    }

    /// Count `n` more bytes done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// One line: done / total (percent), rate, ETA.
    pub fn line(&self) -> String {
        let (done, total) = (self.done(), self.total.load(Ordering::Relaxed));
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        let rate = done as f64 / secs;
        let mut s = format!("{}: {} / {}", self.label, human(done), human(total));
        if total > 0 {
            s += &format!(" ({:.0}%)", 100.0 * done as f64 / total as f64);
        }
        s += &format!(", {}/s", human(rate as u64));
        if total > done && rate > 0.0 {
            s += &format!(", ETA {:.0}s", (total - done) as f64 / rate);
        }
        s
    }

    /// Stop reporting and log the time taken and the rate.
    pub fn finish(&self) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {} in {:.1}s ({:.2} GB/s)",
            self.label,
            human(self.done()),
            secs,
            self.done() as f64 / secs.max(1e-6) / 1e9
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Log a line every interval while bytes arrive; finish once the expected total is reached.
fn report(p: Weak<Progress>) {
    let every = interval();
    let mut last = 0;
    loop {
        std::thread::sleep(every);
        let Some(p) = p.upgrade() else { return };
        if p.finished.load(Ordering::Relaxed) {
            return;
        }
        let (done, total) = (p.done(), p.total.load(Ordering::Relaxed));
        if total > 0 && done >= total {
            p.finish();
            return;
        }
        if done != last {
            tracing::info!("{}", p.line());
            last = done;
        }
    }
}

/// Bytes for people: B, KiB, MiB, GiB.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_has_bytes_percent_rate_and_eta() {
        let p = Progress::start("s3://b/m", 4 << 30);
        p.add(1 << 30);
        let l = p.line();
        assert!(l.starts_with("s3://b/m: 1.00 GiB / 4.00 GiB (25%), "), "{l}");
        assert!(l.contains("/s, ETA "), "{l}");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.50 KiB");
    }
}
