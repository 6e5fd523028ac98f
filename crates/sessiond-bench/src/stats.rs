//! Latency histograms, result rows and their formatting.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency a histogram holds, in nanoseconds (one minute); longer ones are clamped.
const MAX_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds, with 3 significant figures.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_NS, 3)
        .map_err(|e| anyhow::anyhow!("cannot create a latency histogram: {e:?}"))
}

/// Records one latency, clamped to the histogram's range.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos())
        .unwrap_or(MAX_NS)
        .clamp(1, MAX_NS);
    h.saturating_record(ns);
}

/// Adds `other`'s counts into `into`.
pub fn merge(into: &mut Histogram<u64>, other: &Histogram<u64>) -> anyhow::Result<()> {
    into.add(other)
        .map_err(|e| anyhow::anyhow!("cannot merge latency histograms: {e:?}"))
}

/// The quantiles reported for a scenario.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest recorded.
    pub max: Duration,
    /// Mean.
    pub mean: Duration,
}

impl Latencies {
    /// The quantiles of a nanosecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        let q = |x: f64| Duration::from_nanos(h.value_at_quantile(x));
        Self {
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            max: Duration::from_nanos(h.max()),
            // The mean is a float of nanoseconds: rounding to whole nanoseconds is intended.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            mean: Duration::from_nanos(h.mean().round() as u64),
        }
    }

    /// `p50 …, p99 …, p99.9 …, max …` on one line.
    pub fn line(&self) -> String {
        format!(
            "p50 {}, p99 {}, p99.9 {}, max {}, mean {}",
            fmt_duration(self.p50),
            fmt_duration(self.p99),
            fmt_duration(self.p999),
            fmt_duration(self.max),
            fmt_duration(self.mean),
        )
    }
}

/// A latency in the unit that suits it: ns below 1 µs, µs below 1 ms, else ms.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

/// A rate rounded to a whole number, with thousands separators: `1,234,567`.
pub fn fmt_rate(r: f64) -> String {
    // Rates are positive and far below 2^53: rounding to an integer is what is printed.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = r.max(0.0).round() as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Operations per second over `elapsed`.
pub fn rate(ops: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        // Counts stay far below 2^53, so the conversion is exact.
        #[allow(clippy::cast_precision_loss)]
        let ops = ops as f64;
        ops / secs
    } else {
        0.0
    }
}

/// One row of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub scenario: String,
    /// Operations per second.
    pub throughput: f64,
    /// The unit of `throughput`, for example `req/s`.
    pub unit: &'static str,
    /// Latency quantiles.
    pub latencies: Latencies,
    /// Throughput relative to the bare-axum ceiling, where that comparison applies.
    pub ratio: Option<f64>,
}

/// The summary table, in markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | throughput | p50 | p99 | p99.9 | ratio |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let ratio = r
            .ratio
            .map_or_else(|| "—".to_owned(), |x| format!("{x:.2}"));
        out.push_str(&format!(
            "| {} | {} {} | {} | {} | {} | {} |\n",
            r.scenario,
            fmt_rate(r.throughput),
            r.unit,
            fmt_duration(r.latencies.p50),
            fmt_duration(r.latencies.p99),
            fmt_duration(r.latencies.p999),
            ratio,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_get_thousands_separators() {
        assert_eq!(fmt_rate(0.0), "0");
        assert_eq!(fmt_rate(999.4), "999");
        assert_eq!(fmt_rate(1000.0), "1,000");
        assert_eq!(fmt_rate(1_234_567.0), "1,234,567");
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(fmt_duration(Duration::from_nanos(950)), "950 ns");
        assert_eq!(fmt_duration(Duration::from_nanos(1_240)), "1.2 µs");
        assert_eq!(fmt_duration(Duration::from_micros(2_500)), "2.50 ms");
    }

    #[test]
    fn histograms_record_and_merge() {
        let mut a = new_histogram().unwrap();
        let mut b = new_histogram().unwrap();
        record(&mut a, Duration::from_micros(10));
        record(&mut b, Duration::from_micros(30));
        record(&mut b, Duration::ZERO);
        merge(&mut a, &b).unwrap();
        assert_eq!(a.len(), 3);
        let l = Latencies::of(&a);
        assert!(l.p50 >= Duration::from_micros(9) && l.p50 <= Duration::from_micros(11));
        assert!(l.max >= Duration::from_micros(29));
    }
}
