//! Compact human formats shared by `status`, `check` and `top`: ages,
//! round trips, byte counts, rates, and ANSI colour for terminals.

use std::io::IsTerminal;
use std::time::Duration;

/// Whether stdout should get colour: a terminal, and `NO_COLOR` unset.
pub fn stdout_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An ANSI colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Colour {
    /// Good.
    Green,
    /// Attention.
    Yellow,
    /// Trouble.
    Red,
    /// Less important.
    Dim,
    /// Headings.
    Bold,
}

/// `text` in `colour` when `enabled`, unchanged otherwise.
pub fn paint(text: &str, colour: Colour, enabled: bool) -> String {
    if !enabled {
        return text.to_string();
    }
    let code = match colour {
        Colour::Green => "32",
        Colour::Yellow => "33",
        Colour::Red => "31",
        Colour::Dim => "2",
        Colour::Bold => "1",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// The colour of a tunnel state.
pub fn state_colour(state: &str) -> Colour {
    match state {
        "ready" => Colour::Green,
        "connecting" => Colour::Yellow,
        "backoff" => Colour::Red,
        _ => Colour::Dim,
    }
}

/// An age: `42s`, `5m12s`, `3h05m`, `2d03h`.
pub fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3_600,
        seconds % 3_600 / 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// A short duration given in seconds: `0.42ms`, `12.3ms`, `1.20s`, `-`
/// for none.
pub fn seconds(value: Option<f64>) -> String {
    match value {
        None => "-".to_string(),
        Some(s) if s < 0.001 => format!("{:.2}ms", s * 1000.0),
        Some(s) if s < 0.1 => format!("{:.1}ms", s * 1000.0),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.2}s"),
    }
}

/// A measured step duration (as [`seconds`]).
pub fn elapsed(d: Duration) -> String {
    seconds(Some(d.as_secs_f64()))
}

/// Bytes with a binary unit: `512B`, `1.5KiB`, `3.2MiB`, `1.0GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// `1048576` as `1,048,576`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate in bytes per second: `0B/s`, `1.5KiB/s`.
pub fn rate(bytes_per_second: f64) -> String {
    if !bytes_per_second.is_finite() || bytes_per_second < 0.5 {
        return "0B/s".to_string();
    }
    format!("{}/s", bytes(bytes_per_second.round() as u64))
}

/// `text` cut to `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Rows of cells as aligned columns (two spaces apart, the last column not
/// padded). `paint_cell` may colour a cell after padding (row, column,
/// padded text).
pub fn columns(rows: &[Vec<String>], paint_cell: impl Fn(usize, usize, &str) -> String) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; count];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let last = c + 1 == row.len();
            let padded = if last {
                cell.clone()
            } else {
                let pad = widths[c] - cell.chars().count();
                format!("{cell}{}  ", " ".repeat(pad))
            };
            line.push_str(&paint_cell(r, c, &padded));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped_by_commas() {
        for (n, text) in [
            (0, "0"),
            (999, "999"),
            (1_000, "1,000"),
            (65_536, "65,536"),
            (1_048_576, "1,048,576"),
            (u64::MAX, "18,446,744,073,709,551,615"),
        ] {
            assert_eq!(thousands(n), text);
        }
    }

    #[test]
    fn human_formats() {
        assert_eq!(age(42), "42s");
        assert_eq!(age(312), "5m12s");
        assert_eq!(age(3 * 3600 + 5 * 60), "3h05m");
        assert_eq!(age(2 * 86_400 + 3 * 3600), "2d03h");
        assert_eq!(seconds(None), "-");
        assert_eq!(seconds(Some(0.00042)), "0.42ms");
        assert_eq!(seconds(Some(0.0123)), "12.3ms");
        assert_eq!(seconds(Some(0.25)), "250ms");
        assert_eq!(seconds(Some(1.2)), "1.20s");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0MiB");
        assert_eq!(rate(0.0), "0B/s");
        assert_eq!(rate(2048.0), "2.0KiB/s");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn columns_align_and_colour_after_padding() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string(), "C".to_string()],
            vec!["long".to_string(), "x".to_string(), "y".to_string()],
        ];
        let out = columns(&rows, |_, _, t| t.to_string());
        assert_eq!(out, "A     BB  C\nlong  x   y\n");
        let painted = columns(&rows, |r, c, t| {
            if r == 1 && c == 0 {
                paint(t, Colour::Red, true)
            } else {
                t.to_string()
            }
        });
        assert!(painted.contains("\x1b[31mlong  \x1b[0m"), "{painted:?}");
    }
}
