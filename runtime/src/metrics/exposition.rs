//! Writing families in the Prometheus text format (0.0.4) with prometheus-client's encoder.
//!
//! The shim's values are snapshots of counters that live elsewhere (VMM atomics, the agent's
//! answer, `/proc`), so they are written through a [`Collector`] at scrape time instead of
//! being mirrored into registered metric objects.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vmm::HistogramSnapshot;

/// Label pairs of one sample.
pub type Labels = Vec<(&'static str, String)>;

/// One sample's value.
#[derive(Debug, Clone)]
pub enum Value {
    Counter(u64),
    CounterF(f64),
    Gauge(f64),
    Histogram(HistogramSnapshot),
}

impl Value {
    fn metric_type(&self) -> MetricType {
        match self {
            Value::Counter(_) | Value::CounterF(_) => MetricType::Counter,
            Value::Gauge(_) => MetricType::Gauge,
            Value::Histogram(_) => MetricType::Histogram,
        }
    }

    fn write(&self, m: &mut MetricEncoder<'_>) -> std::fmt::Result {
        match self {
            Value::Counter(v) => m.encode_counter::<NoLabelSet, u64, f64>(v, None),
            Value::CounterF(v) => m.encode_counter::<NoLabelSet, f64, f64>(v, None),
            Value::Gauge(v) => m.encode_gauge(v),
            Value::Histogram(h) => m.encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &h.buckets, None),
        }
    }
}

/// One metric family: name (without `_total`: the encoder adds it to counters), help and
/// samples, all of the same type.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub samples: Vec<(Labels, Value)>,
}

impl Family {
    pub fn new(name: &'static str, help: &'static str) -> Self {
        Family { name, help, samples: Vec::new() }
    }

    /// Add a sample.
    pub fn with(mut self, labels: Labels, value: Value) -> Self {
        self.samples.push((labels, value));
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(name: &'static str, help: &'static str, value: Value) -> Self {
        Family::new(name, help).with(Vec::new(), value)
    }
}

/// Families to encode.
#[derive(Debug, Default)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for family in &self.0 {
            let Some((_, first)) = family.samples.first() else { continue };
            let mut m = encoder.encode_descriptor(family.name, family.help, None, first.metric_type())?;
            for (labels, value) in &family.samples {
                if labels.is_empty() {
                    value.write(&mut m)?;
                } else {
                    let mut labelled = m.encode_family(labels)?;
                    value.write(&mut labelled)?;
                }
            }
        }
        Ok(())
    }
}

/// Encode `families` as Prometheus text.
pub fn encode(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families)));
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        // Writing to a String cannot fail; a formatting bug would show here.
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition() {
        let h = HistogramSnapshot { buckets: vec![(0.1, 2), (1.0, 1), (f64::INFINITY, 1)], count: 4, sum_secs: 3.5 };
        let text = encode(vec![
            Family::new("tern_test_exits", "VM exits.").with(vec![("reason", "io_in".into())], Value::Counter(5)),
            Family::single("tern_test_memory_bytes", "Memory.", Value::Gauge(1024.0)),
            Family::single("tern_test_latency_seconds", "Latency.", Value::Histogram(h)),
            Family::new("tern_test_empty", "Skipped."),
        ]);
        assert!(text.contains("# TYPE tern_test_exits_total counter\n"), "{text}");
        assert!(text.contains("tern_test_exits_total{reason=\"io_in\"} 5\n"), "{text}");
        assert!(text.contains("tern_test_memory_bytes 1024"), "{text}");
        assert!(text.contains("tern_test_latency_seconds_bucket{le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("tern_test_latency_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("tern_test_latency_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("tern_test_latency_seconds_count 4\n"), "{text}");
        assert!(!text.contains("tern_test_empty"), "{text}");
    }
}
