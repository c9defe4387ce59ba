//! `report --results FILE [--markdown OUT]`: one line per metric
//! (`metric=... nodetunnel=... openssh=... ratio=...`) on stdout, and the
//! markdown table (with goals and the raw runs) in OUT.
//!
//! Results file: tab-separated `metric unit nodetunnel openssh goal raw`;
//! a value that was not measured is `NaN`. Goals: `ratio>=X`, `ratio<=X`,
//! `nt>=X`, `nt<=X`, `nt<X`, or `-`.

use std::fmt::Write as _;

use crate::args::Args;

struct Row {
    metric: String,
    unit: String,
    nt: f64,
    ssh: f64,
    goal: String,
    raw: String,
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(r: &Row) -> f64 {
    r.nt / r.ssh
}

/// (goal text for the table, met?) for a row.
fn goal(r: &Row) -> (String, Option<bool>) {
    let g = r.goal.as_str();
    let parse = |s: &str| s.parse::<f64>().ok();
    let check = |v: f64, op: &str, x: f64| -> Option<bool> {
        if v.is_nan() {
            return None;
        }
        Some(match op {
            ">=" => v >= x,
            "<=" => v <= x,
            "<" => v < x,
            _ => return None,
        })
    };
    for (prefix, what) in [("ratio", "ratio"), ("nt", "nodetunnel")] {
        for op in [">=", "<=", "<"] {
            if let Some(x) = g
                .strip_prefix(prefix)
                .and_then(|s| s.strip_prefix(op))
                .and_then(parse)
            {
                let v = if prefix == "ratio" { ratio(r) } else { r.nt };
                let text = if prefix == "ratio" {
                    format!("{what} {op} {x}")
                } else {
                    format!("{what} {op} {x} {}", r.unit)
                };
                return (text, check(v, op, x));
            }
        }
    }
    ("".into(), None)
}

pub fn run(args: &Args) -> Result<(), String> {
    let path = args.require("results")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 5 {
            return Err(format!("{path}:{}: expected 6 tab-separated fields", n + 1));
        }
        let v = |s: &str| s.trim().parse::<f64>().unwrap_or(f64::NAN);
        rows.push(Row {
            metric: f[0].to_string(),
            unit: f[1].to_string(),
            nt: v(f[2]),
            ssh: v(f[3]),
            goal: f[4].to_string(),
            raw: f.get(5).unwrap_or(&"").to_string(),
        });
    }
    for r in &rows {
        println!(
            "metric={} nodetunnel={} openssh={} ratio={}",
            r.metric,
            num(r.nt),
            num(r.ssh),
            num(ratio(r))
        );
    }
    if let Some(out) = args.get("markdown") {
        let mut md = String::new();
        md.push_str("| metric | unit | nodetunnel | OpenSSH | ratio | goal | met |\n");
        md.push_str("|---|---|---:|---:|---:|---|---|\n");
        for r in &rows {
            let (g, met) = goal(r);
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                md,
                "| `{}` | {} | {} | {} | {} | {} | {} |",
                r.metric,
                r.unit,
                num(r.nt),
                num(r.ssh),
                num(ratio(r)),
                g,
                met
            );
        }
        md.push_str("\nRaw values of the repetitions (the table shows medians):\n\n");
        for r in &rows {
            if !r.raw.is_empty() {
                let _ = writeln!(md, "- `{}`: {}", r.metric, r.raw);
            }
        }
        std::fs::write(out, md).map_err(|e| format!("{out}: {e}"))?;
    }
    Ok(())
}
