//! Throughput and latency numbers, and their JSON lines.

use std::time::Duration;

/// Bytes moved in a wall time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Throughput {
    /// Decimal gigabits per second (0 for an empty interval).
    pub fn gbit_s(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 * 8.0 / secs / 1e9
        } else {
            0.0
        }
    }

    pub fn to_json(self, test: &str) -> String {
        format!(
            r#"{{"test":"{test}","bytes":{},"seconds":{:.6},"gbit_s":{:.6}}}"#,
            self.bytes,
            self.elapsed.as_secs_f64(),
            self.gbit_s()
        )
    }
}

/// The `percent`th percentile (1 to 100) of ascending `sorted`, nearest-rank: the smallest
/// sample with at least `percent`% of all samples at or below it. `None` when empty.
pub fn percentile(sorted: &[u64], percent: u32) -> Option<u64> {
    let n = sorted.len();
    let percent = usize::try_from(percent.clamp(1, 100)).ok()?;
    let rank = (percent * n).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// Round-trip latencies of an `rr` test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub count: usize,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: f64,
    pub min_ns: u64,
    pub max_ns: u64,
}

impl Latency {
    /// Summarize round-trip times in nanoseconds (sorts them); `None` when there are none.
    pub fn from_samples(samples: &mut [u64]) -> Option<Latency> {
        samples.sort_unstable();
        let total: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Some(Latency {
            count: samples.len(),
            p50_ns: percentile(samples, 50)?,
            p99_ns: percentile(samples, 99)?,
            mean_ns: total as f64 / samples.len() as f64,
            min_ns: *samples.first()?,
            max_ns: *samples.last()?,
        })
    }

    pub fn to_json(self, size: u32) -> String {
        let us = |ns: u64| ns as f64 / 1e3;
        format!(
            r#"{{"test":"rr","count":{},"size":{size},"p50_us":{:.3},"p99_us":{:.3},"mean_us":{:.3},"min_us":{:.3},"max_us":{:.3}}}"#,
            self.count,
            us(self.p50_ns),
            us(self.p99_ns),
            self.mean_ns / 1e3,
            us(self.min_ns),
            us(self.max_ns)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&hundred, 50), Some(50));
        assert_eq!(percentile(&hundred, 99), Some(99));
        assert_eq!(percentile(&hundred, 100), Some(100));
        assert_eq!(percentile(&hundred, 1), Some(1));
        // 4 samples: p50 is the 2nd, p99 the 4th (ceil(0.99 * 4) = 4).
        assert_eq!(percentile(&[10, 20, 30, 40], 50), Some(20));
        assert_eq!(percentile(&[10, 20, 30, 40], 99), Some(40));
        // 1000 samples: p99 is the 990th.
        let thousand: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&thousand, 99), Some(990));
    }

    #[test]
    fn percentile_of_one_or_no_sample() {
        assert_eq!(percentile(&[7], 50), Some(7));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn latency_summary_sorts_and_averages() {
        let mut samples = vec![4000, 1000, 3000, 2000];
        let l = Latency::from_samples(&mut samples).expect("samples");
        assert_eq!((l.count, l.p50_ns, l.p99_ns, l.min_ns, l.max_ns), (4, 2000, 4000, 1000, 4000));
        assert!((l.mean_ns - 2500.0).abs() < 1e-9);
        assert_eq!(
            l.to_json(64),
            r#"{"test":"rr","count":4,"size":64,"p50_us":2.000,"p99_us":4.000,"mean_us":2.500,"min_us":1.000,"max_us":4.000}"#
        );
        assert_eq!(Latency::from_samples(&mut []), None);
    }

    #[test]
    fn throughput_is_decimal_gigabits() {
        let t = Throughput { bytes: 1_250_000_000, elapsed: Duration::from_secs(2) };
        assert!((t.gbit_s() - 5.0).abs() < 1e-9);
        assert_eq!(t.to_json("send"), r#"{"test":"send","bytes":1250000000,"seconds":2.000000,"gbit_s":5.000000}"#);
        assert_eq!(Throughput { bytes: 5, elapsed: Duration::ZERO }.gbit_s(), 0.0);
    }
}
