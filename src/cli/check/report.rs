//! The results of a check and how they are shown: step by step as text,
//! as JSON (`--json`), and the `--all` summary table.

use std::fmt::Write as _;
use std::time::Duration;

use super::super::format::{self, paint, Colour};
use super::Step;

/// How a step went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Passed,
    /// It failed; the steps after it are skipped.
    Failed,
    /// Not run because an earlier step failed.
    Skipped,
}

/// One step's result.
#[derive(Clone, Debug)]
pub struct StepResult {
    /// Which step.
    pub step: Step,
    /// How it went.
    pub outcome: Outcome,
    /// How long it took.
    pub duration: Duration,
    /// What was found (the address, banner, algorithms, fingerprint...) or
    /// what went wrong.
    pub detail: String,
    /// What to do about a failure (may span lines).
    pub hint: Option<String>,
}

/// Everything `check` found about one target.
#[derive(Clone, Debug)]
pub struct Report {
    /// The node name, or the address as given.
    pub label: String,
    /// `host:port` of the sshd.
    pub endpoint: String,
    /// The SSH user.
    pub user: String,
    /// One result per step, in order.
    pub steps: Vec<StepResult>,
    /// Wall time of the whole check.
    pub elapsed: Duration,
}

impl Report {
    /// The first failed step.
    pub fn failure(&self) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.outcome == Outcome::Failed)
    }

    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        self.failure().is_none()
    }

    /// 0, or the failed step's [`Step::exit_code`].
    pub fn exit_code(&self) -> u8 {
        self.failure().map(|s| s.step.exit_code()).unwrap_or(0)
    }

    /// The heading line.
    pub fn header(&self) -> String {
        if self.label == self.endpoint {
            format!("nodetunnel check {} as {}", self.endpoint, self.user)
        } else {
            format!(
                "nodetunnel check {}: {} as {}",
                self.label, self.endpoint, self.user
            )
        }
    }

    /// The closing line.
    pub fn footer(&self, colour: bool) -> String {
        match self.failure() {
            None => paint(
                &format!(
                    "all {} steps passed in {}",
                    self.steps.len(),
                    format::elapsed(self.elapsed)
                ),
                Colour::Green,
                colour,
            ),
            Some(f) => paint(
                &format!(
                    "FAILED at {} (exit {}) after {}",
                    f.step.name(),
                    f.step.exit_code(),
                    format::elapsed(self.elapsed)
                ),
                Colour::Red,
                colour,
            ),
        }
    }

    /// The report for `--json`: `target`, `endpoint`, `user`, `passed`,
    /// `exit_code`, `failed_step` (its name or null), `elapsed_ms` and
    /// `steps` (each `step`, `outcome` = passed, failed or skipped,
    /// `duration_ms` (null when skipped), `detail`, `hint` or null).
    pub fn to_json(&self) -> serde_json::Value {
        let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let steps: Vec<serde_json::Value> = self
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "step": s.step.name(),
                    "outcome": match s.outcome {
                        Outcome::Passed => "passed",
                        Outcome::Failed => "failed",
                        Outcome::Skipped => "skipped",
                    },
                    "duration_ms": (s.outcome != Outcome::Skipped).then(|| millis(s.duration)),
                    "detail": s.detail,
                    "hint": s.hint,
                })
            })
            .collect();
        serde_json::json!({
            "target": self.label,
            "endpoint": self.endpoint,
            "user": self.user,
            "passed": self.passed(),
            "exit_code": self.exit_code(),
            "failed_step": self.failure().map(|f| f.step.name()),
            "elapsed_ms": millis(self.elapsed),
            "steps": steps,
        })
    }

    /// Heading, every step and the closing line.
    pub fn render(&self, colour: bool) -> String {
        let mut out = self.header();
        out.push('\n');
        for step in &self.steps {
            out.push_str(&render_step(step, colour));
        }
        out.push_str(&self.footer(colour));
        out.push('\n');
        out
    }
}

/// One step as printed: `  ✓ tcp connect        0.3ms  127.0.0.1:22`,
/// and the hint under a failure.
pub fn render_step(step: &StepResult, colour: bool) -> String {
    let (mark, mark_colour) = match step.outcome {
        Outcome::Passed => ("✓", Colour::Green),
        Outcome::Failed => ("✗", Colour::Red),
        Outcome::Skipped => ("-", Colour::Dim),
    };
    let time = match step.outcome {
        Outcome::Skipped => String::new(),
        _ => format::elapsed(step.duration),
    };
    let mut out = format!(
        "  {} {:<16} {:>8}  {}\n",
        paint(mark, mark_colour, colour),
        step.step.name(),
        time,
        step.detail
    );
    if let Some(hint) = &step.hint {
        for (i, line) in hint.lines().enumerate() {
            let prefix = if i == 0 { "hint: " } else { "      " };
            let _ = writeln!(out, "      {}{line}", paint(prefix, Colour::Yellow, colour));
        }
    }
    out
}

/// `--all` output: every failed node step by step, then the summary table
/// (failures first) and a count.
pub fn render_all(reports: &[Report], colour: bool) -> String {
    let mut out = String::new();
    for r in reports.iter().filter(|r| !r.passed()) {
        out.push_str(&r.render(colour));
        out.push('\n');
    }
    let mut sorted: Vec<&Report> = reports.iter().collect();
    sorted.sort_by_key(|r| (r.passed(), r.label.clone()));
    let mut rows = vec![vec![
        "NODE".to_string(),
        "RESULT".to_string(),
        "FAILED STEP".to_string(),
        "TIME".to_string(),
        "DETAIL".to_string(),
    ]];
    for r in &sorted {
        let (result, step, detail) = match r.failure() {
            None => ("ok".to_string(), "-".to_string(), String::new()),
            Some(f) => (
                "FAILED".to_string(),
                f.step.name().to_string(),
                format::truncate(&f.detail, 100),
            ),
        };
        rows.push(vec![
            r.label.clone(),
            result,
            step,
            format::elapsed(r.elapsed),
            detail,
        ]);
    }
    out.push_str(&format::columns(&rows, |row, c, text| {
        if row == 0 {
            paint(text, Colour::Bold, colour)
        } else if c == 1 {
            let c = if text.trim() == "ok" {
                Colour::Green
            } else {
                Colour::Red
            };
            paint(text, c, colour)
        } else {
            text.to_string()
        }
    }));
    let passed = reports.iter().filter(|r| r.passed()).count();
    let line = format!("{passed}/{} nodes passed every step", reports.len());
    let c = if passed == reports.len() {
        Colour::Green
    } else {
        Colour::Red
    };
    out.push_str(&paint(&line, c, colour));
    out.push('\n');
    out
}
