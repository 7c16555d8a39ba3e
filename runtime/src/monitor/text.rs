//! Merging the Prometheus text of many shims into one exposition, with per-sandbox labels.
//!
//! Each family's `# HELP`/`# TYPE` must appear once and its samples together, so the
//! monitor parses every scrape into families and writes them back grouped by name, adding
//! `sandbox_id`, `cri_uid`, `cri_name` and `cri_namespace` to every sample.

use std::collections::HashMap;

/// One family gathered from all sandboxes.
#[derive(Debug, Default)]
struct MergedFamily {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// Families in first-seen order.
#[derive(Debug, Default)]
pub struct Merger {
    order: Vec<String>,
    families: HashMap<String, MergedFamily>,
}

/// Escape a label value (backslash, double quote, newline).
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `k1="v1",k2="v2"` for the given pairs.
pub fn label_prefix(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v))).collect::<Vec<_>>().join(",")
}

/// Put `prefix` (already formatted labels) first in the label set of sample line `line`.
/// `None` for a line that is not a sample.
pub fn inject_labels(line: &str, prefix: &str) -> Option<String> {
    if prefix.is_empty() {
        return Some(line.to_owned());
    }
    let name_end = line.find(['{', ' '])?;
    let (name, rest) = line.split_at(name_end);
    if name.is_empty() {
        return None;
    }
    if let Some(inner) = rest.strip_prefix('{') {
        if inner.starts_with('}') {
            Some(format!("{name}{{{prefix}{inner}"))
        } else {
            Some(format!("{name}{{{prefix},{inner}"))
        }
    } else {
        Some(format!("{name}{{{prefix}}}{rest}"))
    }
}

impl Merger {
    pub fn new() -> Self {
        Merger::default()
    }

    fn family(&mut self, name: &str) -> &mut MergedFamily {
        if !self.families.contains_key(name) {
            self.order.push(name.to_owned());
        }
        self.families.entry(name.to_owned()).or_default()
    }

    /// Add one scrape's text; every sample gets `labels` (formatted by [`label_prefix`]).
    /// Families not accepted by `keep` are skipped.
    pub fn add(&mut self, text: &str, labels: &str, keep: &dyn Fn(&str) -> bool) {
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                current = Some(name.to_owned());
                if keep(name) {
                    let f = self.family(name);
                    f.help.get_or_insert_with(|| help.to_owned());
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
                current = Some(name.to_owned());
                if keep(name) {
                    let f = self.family(name);
                    f.kind.get_or_insert_with(|| kind.to_owned());
                }
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let Some(sample) = inject_labels(line, labels) else { continue };
                // A sample belongs to the family declared last (histogram `_bucket`/`_sum`/
                // `_count` lines follow their family's TYPE); an undeclared one is its own.
                let name = match &current {
                    Some(c) if line.starts_with(c.as_str()) => c.clone(),
                    _ => line.split(['{', ' ']).next().unwrap_or_default().to_owned(),
                };
                if keep(&name) {
                    self.family(&name).samples.push(sample);
                }
            }
        }
    }

    /// The merged exposition.
    pub fn finish(self, out: &mut String) {
        for name in &self.order {
            let Some(f) = self.families.get(name) else { continue };
            if f.samples.is_empty() {
                continue;
            }
            if let Some(help) = &f.help {
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            if let Some(kind) = &f.kind {
                out.push_str(&format!("# TYPE {name} {kind}\n"));
            }
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIM: &str = "# HELP tern_x_total X.\n# TYPE tern_x_total counter\ntern_x_total{reason=\"a\"} 1\n\
                        # HELP tern_h_seconds H.\n# TYPE tern_h_seconds histogram\ntern_h_seconds_bucket{le=\"1\"} 2\n\
                        tern_h_seconds_bucket{le=\"+Inf\"} 2\ntern_h_seconds_sum 0.5\ntern_h_seconds_count 2\n";

    #[test]
    fn labels_go_first() {
        assert_eq!(inject_labels("m 1", "a=\"b\"").unwrap(), "m{a=\"b\"} 1");
        assert_eq!(inject_labels("m{le=\"1\"} 1", "").unwrap(), "m{le=\"1\"} 1");
        assert_eq!(inject_labels("m{} 1", "a=\"b\"").unwrap(), "m{a=\"b\"} 1");
        assert_eq!(inject_labels("m{x=\"y\"} 1", "a=\"b\"").unwrap(), "m{a=\"b\",x=\"y\"} 1");
        assert_eq!(label_prefix(&[("k", "a\"b\\c\nd")]), "k=\"a\\\"b\\\\c\\nd\"");
    }

    #[test]
    fn families_are_merged_once_with_all_samples() {
        let mut m = Merger::new();
        m.add(SHIM, &label_prefix(&[("sandbox_id", "s1")]), &|_| true);
        m.add(SHIM, &label_prefix(&[("sandbox_id", "s2")]), &|_| true);
        let mut out = String::new();
        m.finish(&mut out);
        assert_eq!(out.matches("# TYPE tern_x_total counter").count(), 1, "{out}");
        assert_eq!(out.matches("# TYPE tern_h_seconds histogram").count(), 1, "{out}");
        assert!(
            out.contains(
                "tern_x_total{sandbox_id=\"s1\",reason=\"a\"} 1\ntern_x_total{sandbox_id=\"s2\",reason=\"a\"} 1\n"
            ),
            "{out}"
        );
        assert!(out.contains("tern_h_seconds_sum{sandbox_id=\"s2\"} 0.5\n"), "{out}");
        let hist_block = out.split("# TYPE tern_h_seconds histogram\n").nth(1).unwrap();
        assert_eq!(hist_block.lines().count(), 8, "{out}");
    }

    #[test]
    fn filter_keeps_whole_families() {
        let mut m = Merger::new();
        m.add(SHIM, "sandbox_id=\"s\"", &|name| name.starts_with("tern_h"));
        let mut out = String::new();
        m.finish(&mut out);
        assert!(!out.contains("tern_x_total"), "{out}");
        assert!(out.contains("tern_h_seconds_count{sandbox_id=\"s\"} 2"), "{out}");
    }
}
