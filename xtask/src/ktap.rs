//! A KTAP (KUnit) parser for console logs.
//!
//! Handles the printk timestamp prefix, nesting by indentation (4 spaces a
//! level), `# Subtest:` headers, `ok`/`not ok` results with `# SKIP`, and
//! suites that started but never reported a result (a crash mid-suite).
//! Counts leaf test cases; a parent that fails without a failing child
//! (suite init failure) counts as one failure.

use anyhow::{bail, Result};

/// Outcome of one test line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One leaf test case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub suite: String,
    pub name: String,
    pub status: Status,
}

/// What a log held.
#[derive(Debug, Default)]
pub struct Summary {
    pub cases: Vec<Case>,
    /// Top-level suites that reported a result, with their status.
    pub suites: Vec<(String, Status)>,
    /// Suites (or parameterised tests) that started and never finished.
    pub unfinished: Vec<String>,
    /// Failures of parents with no failing child.
    pub parent_failures: Vec<String>,
}

impl Summary {
    pub fn count(&self, s: Status) -> usize {
        self.cases.iter().filter(|c| c.status == s).count()
    }

    pub fn failed(&self) -> usize {
        self.count(Status::Fail) + self.parent_failures.len() + self.unfinished.len()
    }

    /// `KUnit: N passed, M failed, K skipped`.
    pub fn summary_line(&self) -> String {
        format!(
            "KUnit: {} passed, {} failed, {} skipped",
            self.count(Status::Pass),
            self.failed(),
            self.count(Status::Skip)
        )
    }

    /// Fails on any failure, on an empty log, or on a missing suite.
    pub fn check(&self, expected_suites: &[&str]) -> Result<()> {
        let mut problems = Vec::new();
        if self.cases.is_empty() {
            problems.push("no KTAP test results in the log".to_string());
        }
        for c in self.cases.iter().filter(|c| c.status == Status::Fail) {
            problems.push(format!("not ok: {}.{}", c.suite, c.name));
        }
        for p in &self.parent_failures {
            problems.push(format!("not ok: {p} (no failing case reported)"));
        }
        for u in &self.unfinished {
            problems.push(format!(
                "suite {u} started but never finished (crash or hang?)"
            ));
        }
        for s in expected_suites {
            if !self.suites.iter().any(|(n, _)| n == s) {
                problems.push(format!("expected suite {s} is missing"));
            }
        }
        if !problems.is_empty() {
            bail!("{}\n  {}", self.summary_line(), problems.join("\n  "));
        }
        Ok(())
    }
}

/// Strips a `[    1.234567] ` printk timestamp (and a `<6>` level) prefix.
fn strip_prefix(line: &str) -> &str {
    let l = line.trim_end_matches('\r');
    let l = match l.strip_prefix('[') {
        Some(rest) => match rest.find(']') {
            Some(i)
                if rest[..i]
                    .trim()
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.')
                    && i > 0 =>
            {
                let r = &rest[i + 1..];
                r.strip_prefix(' ').unwrap_or(r)
            }
            _ => l,
        },
        None => l,
    };
    l
}

/// Parses `ok N name # directive` / `not ok N name`.
fn parse_result(t: &str) -> Option<(Status, String)> {
    let (ok, rest) = if let Some(r) = t.strip_prefix("not ok ") {
        (false, r)
    } else if let Some(r) = t.strip_prefix("ok ") {
        (true, r)
    } else {
        return None;
    };
    let (num, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (name, directive) = match rest.split_once(" #") {
        Some((n, d)) => (n.trim(), d.trim()),
        None => (rest.trim(), ""),
    };
    let skip = directive.to_ascii_uppercase().starts_with("SKIP");
    let status = match (ok, skip) {
        (_, true) => Status::Skip,
        (true, false) => Status::Pass,
        (false, false) => Status::Fail,
    };
    Some((status, name.to_string()))
}

/// Parses every KTAP document in `log`.
pub fn parse(log: &str) -> Summary {
    let mut s = Summary::default();
    // Per depth: name from `# Subtest:` (at the children's indentation),
    // number of results seen at that depth since it opened, failing children.
    let mut names: Vec<Option<String>> = vec![None; 16];
    let mut children: Vec<usize> = vec![0; 16];
    let mut failing: Vec<usize> = vec![0; 16];
    for raw in log.lines() {
        let l = strip_prefix(raw);
        let indent = l.len() - l.trim_start_matches(' ').len();
        let depth = (indent / 4).min(14);
        let t = l.trim();
        if let Some(name) = t.strip_prefix("# Subtest: ") {
            if let Some(open) = names[depth].take() {
                if children[depth] == 0 || open != name {
                    s.unfinished.push(open);
                }
            }
            names[depth] = Some(name.trim().to_string());
            children[depth] = 0;
            failing[depth] = 0;
            continue;
        }
        let Some((status, name)) = parse_result(t) else {
            continue;
        };
        if children[depth + 1] > 0 || names[depth + 1].as_deref() == Some(name.as_str()) {
            // A parent: its children sit one level deeper.
            if status == Status::Fail && failing[depth + 1] == 0 {
                s.parent_failures.push(name.clone());
            }
            if status == Status::Fail {
                failing[depth] += 1;
            }
            if depth == 0 {
                s.suites.push((name.clone(), status));
            }
            names[depth + 1] = None;
            children[depth + 1] = 0;
            failing[depth + 1] = 0;
        } else {
            let suite = names[depth].clone().unwrap_or_default();
            if status == Status::Fail {
                failing[depth] += 1;
            }
            if depth == 0 {
                // A top-level result without children: an empty or skipped suite.
                s.suites.push((name.clone(), status));
                if status == Status::Fail {
                    s.parent_failures.push(name);
                }
            } else {
                s.cases.push(Case {
                    suite,
                    name,
                    status,
                });
            }
        }
        children[depth] += 1;
    }
    for n in names.into_iter().flatten() {
        s.unfinished.push(n);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    0.500000] KTAP version 1
[    0.500001] 1..2
[    0.500002]     KTAP version 1
[    0.500003]     # Subtest: kvm_protmem_abi
[    0.500004]     # speed: normal
[    0.500005]     1..3
[    0.500006]     ok 1 uapi_header_matches_abi
[    0.500007]     ok 2 ranges_are_checked # SKIP protection is off
[    0.500008]     not ok 3 calls_encode
[    0.500009] not ok 1 kvm_protmem_abi
[    0.500010]     KTAP version 1
[    0.500011]     # Subtest: params
[    0.500012]     1..1
[    0.500013]         KTAP version 1
[    0.500014]         # Subtest: p
[    0.500015]         ok 1 a
[    0.500016]         ok 2 b
[    0.500017]     ok 1 p
[    0.500018] ok 2 params
";

    #[test]
    fn counts_leaves_and_suites() {
        let s = parse(LOG);
        assert_eq!(s.count(Status::Pass), 3);
        assert_eq!(s.count(Status::Skip), 1);
        assert_eq!(s.count(Status::Fail), 1);
        assert_eq!(s.failed(), 1);
        assert_eq!(
            s.suites,
            [
                ("kvm_protmem_abi".into(), Status::Fail),
                ("params".into(), Status::Pass)
            ]
        );
        assert_eq!(s.cases[2].suite, "kvm_protmem_abi");
        assert_eq!(s.summary_line(), "KUnit: 3 passed, 1 failed, 1 skipped");
        assert!(s.check(&["params"]).is_err());
    }

    #[test]
    fn passing_log_checks_and_missing_suite_fails() {
        let log = LOG
            .replace("not ok 3", "ok 3")
            .replace("not ok 1 kvm", "ok 1 kvm");
        let s = parse(&log);
        assert!(s.check(&["kvm_protmem_abi", "params"]).is_ok());
        let e = s.check(&["rust_kernel_str"]).unwrap_err().to_string();
        assert!(
            e.contains("expected suite rust_kernel_str is missing"),
            "{e}"
        );
    }

    #[test]
    fn crash_mid_suite_is_a_failure() {
        let log = "KTAP version 1\n1..1\n    # Subtest: s\n    1..2\n    ok 1 a\nBUG: kernel NULL pointer\n";
        let s = parse(log);
        assert_eq!(s.unfinished, ["s"]);
        assert!(s.check(&[]).is_err());
    }

    #[test]
    fn empty_log_fails() {
        assert!(parse("Linux version 7.2\n").check(&[]).is_err());
    }

    #[test]
    fn suite_init_failure_counts() {
        let log = "    # Subtest: s\n    1..1\nnot ok 1 s\n";
        let s = parse(log);
        assert_eq!(s.parent_failures, ["s"]);
        assert_eq!(s.failed(), 1);
    }
}
