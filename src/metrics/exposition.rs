//! The two text formats `/metrics` speaks, and which one a scraper asked
//! for: OpenMetrics 1.0 (what prometheus-client encodes) when the `Accept`
//! header names `application/openmetrics-text`, the classic Prometheus text
//! format 0.0.4 otherwise ([`to_classic`] rewrites the OpenMetrics text).
//!
//! The formats differ where it matters to parsers: OpenMetrics names a
//! counter's family without `_total` in `# HELP`/`# TYPE` (the samples carry
//! it), has `# UNIT`, exemplars and a final `# EOF`; the classic format names
//! the family as its sample (`nodetunnel_bytes_total`) and has none of the
//! rest. `promtool check metrics` accepts both outputs as they are.

/// Content type of the OpenMetrics answer.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the classic text format answer.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A text exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Classic,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a non-zero quality, the classic
    /// format otherwise (no header, `*/*`, `text/plain`).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or("");
                let refused = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f64>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Classic => CLASSIC_CONTENT_TYPE,
        }
    }
}

/// The classic text format (0.0.4) of OpenMetrics `text`: counter families
/// named with `_total` in `# HELP`/`# TYPE` (info families with `_info`,
/// as gauges), types the classic format lacks as `untyped`, no `# UNIT`, `# EOF`, `_created` samples or exemplars.
pub fn to_classic(text: &str) -> String {
    // Families whose classic name carries the suffix of their samples.
    let renamed: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, kind)| classic_suffix(kind.trim()).map(|s| (name, s)))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str("# HELP ");
            out.push_str(name);
            out.push_str(renamed.get(name).copied().unwrap_or(""));
            out.push(' ');
            out.push_str(help);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = kind.trim();
            out.push_str("# TYPE ");
            out.push_str(name);
            out.push_str(classic_suffix(kind).unwrap_or(""));
            out.push(' ');
            out.push_str(match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                "info" => "gauge",
                _ => "untyped",
            });
        } else if line.starts_with('#') {
            out.push_str(line);
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            if line[..name_end].ends_with("_created") {
                continue;
            }
            // An exemplar follows the value after " # ".
            let sample = line
                .match_indices(" # ")
                .map(|(at, _)| at)
                .find(|at| !in_label_value(line, *at))
                .map_or(line, |at| &line[..at]);
            out.push_str(sample);
        }
        out.push('\n');
    }
    out
}

/// The suffix OpenMetrics adds to the samples of a family of `kind`, which
/// the classic format puts in the family's name.
fn classic_suffix(kind: &str) -> Option<&'static str> {
    match kind {
        "counter" => Some("_total"),
        "info" => Some("_info"),
        _ => None,
    }
}

/// Whether byte `at` of a sample line lies inside a quoted label value.
fn in_label_value(line: &str, at: usize) -> bool {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if i >= at {
            break;
        }
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            _ => {}
        }
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_accept_header_gets_openmetrics_and_others_get_classic() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
                          application/openmetrics-text;version=0.0.1;q=0.4,\
                          text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text")),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Classic
        );
    }

    #[test]
    fn classic_names_counter_families_with_total_and_drops_openmetrics_only_lines() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\n\
                  a_bytes_total{d=\"x # y\"} 3 # {trace=\"1\"} 1.0\na_bytes_created 1.5\n\
                  # HELP g G.\n# TYPE g gauge\ng 1\n\
                  # HELP i I.\n# TYPE i info\ni_info{v=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\n\
             a_bytes_total{d=\"x # y\"} 3\n\
             # HELP g G.\n# TYPE g gauge\ng 1\n\
             # HELP i_info I.\n# TYPE i_info gauge\ni_info{v=\"1\"} 1\n"
        );
    }
}
