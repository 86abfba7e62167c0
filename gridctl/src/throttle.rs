//! The bandwidth limit of a pull (`app migrate … --import --max_rate=BYTES`): the stream from the
//! source grid is read no faster than the limit, so `ssh` (and TCP under it) back-pressures the
//! source, and the copy never takes more of the link than the operator allowed.
//!
//! A token bucket: [`Pace`] is the arithmetic (pure, so it is tested without a clock), and
//! [`Throttled`] a reader that sleeps as the bucket says.

use std::io::{self, Read};
use std::time::{Duration, Instant};

/// How much unused allowance a pull may save up after a pause: a quarter second's worth, so a
/// stall on the source side is not followed by a burst far above the limit.
const BURST: f64 = 0.25;

/// Token-bucket arithmetic: bytes allowed so far against bytes moved.
#[derive(Debug, Clone)]
pub struct Pace {
    rate: f64,
    /// Allowance in bytes; negative while the reader is ahead of the limit.
    tokens: f64,
    /// The time of the last [`Pace::after`], from the start.
    last: Duration,
}

impl Pace {
    /// A pace of `rate` bytes per second (at least 1), starting with no allowance saved up.
    pub fn new(rate: u64) -> Pace {
        Pace {
            rate: rate.max(1) as f64,
            tokens: 0.0,
            last: Duration::ZERO,
        }
    }

    /// The most bytes one read should take: a tenth of a second's worth (at least 4 KiB), so
    /// the pace is smooth rather than one long sleep after one long read.
    pub fn chunk(&self) -> usize {
        ((self.rate / 10.0) as usize).max(4096)
    }

    /// Records `n` bytes moved at `now` (time since the start) and returns how long to wait
    /// before moving more.
    pub fn after(&mut self, n: usize, now: Duration) -> Duration {
        let gained = now.saturating_sub(self.last).as_secs_f64() * self.rate;
        self.last = self.last.max(now);
        self.tokens = (self.tokens + gained).min(self.rate * BURST) - n as f64;
        if self.tokens < 0.0 {
            Duration::from_secs_f64(-self.tokens / self.rate)
        } else {
            Duration::ZERO
        }
    }
}

/// A reader that moves at most `rate` bytes per second on average.
pub struct Throttled<R> {
    inner: R,
    pace: Pace,
    start: Instant,
}

impl<R: Read> Throttled<R> {
    pub fn new(inner: R, rate: u64) -> Throttled<R> {
        Throttled {
            inner,
            pace: Pace::new(rate),
            start: Instant::now(),
        }
    }
}

impl<R: Read> Read for Throttled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.pace.chunk());
        let n = self.inner.read(&mut buf[..want])?;
        let wait = self.pace.after(n, self.start.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_pace_holds_the_average_to_the_rate() {
        // 1 MB/s: 64 reads of 100 kB, each as fast as it comes, must take 6.4 s in all.
        let mut p = Pace::new(1_000_000);
        let mut now = Duration::ZERO;
        for _ in 0..64 {
            now += p.after(100_000, now);
        }
        assert!((now.as_secs_f64() - 6.4).abs() < 0.01, "{now:?}");
    }

    #[test]
    fn a_slow_source_is_not_held_back_and_a_pause_buys_no_big_burst() {
        let mut p = Pace::new(1_000_000);
        // Slower than the limit: no waiting.
        assert_eq!(p.after(100_000, secs(0.2)), Duration::ZERO);
        assert_eq!(p.after(100_000, secs(0.4)), Duration::ZERO);
        // After a 10 s pause, only a quarter second's worth goes by without waiting.
        assert_eq!(p.after(250_000, secs(10.4)), Duration::ZERO);
        let w = p.after(500_000, secs(10.4));
        assert!((w.as_secs_f64() - 0.5).abs() < 0.001, "{w:?}");
    }

    #[test]
    fn reads_are_cut_to_a_tenth_of_a_second_and_bytes_arrive_whole() {
        assert_eq!(Pace::new(8 << 20).chunk(), (8 << 20) / 10);
        assert_eq!(Pace::new(100).chunk(), 4096);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // Fast enough that the test does not wait to speak of.
        let mut r = Throttled::new(&data[..], 1 << 40);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        // A slow limit takes a tenth of a second's worth per read, however big the buffer.
        let mut r = Throttled::new(&data[..], 40960);
        let mut big = vec![0u8; 1 << 20];
        assert_eq!(r.read(&mut big).unwrap(), 4096);
    }
}
