//! `cargo xtask test`: every test the project has, in one command.

use crate::ctx::Ctx;
use crate::{boot, kernel, setup, sh};
use anyhow::{bail, Result};
use std::process::Command;
use std::time::Instant;

/// One step's outcome.
struct Step {
    name: &'static str,
    ok: bool,
    passed: usize,
    failed: usize,
    note: String,
    secs: u64,
}

/// Sums `test result: ok. N passed; M failed` lines of cargo test output.
fn cargo_counts(out: &str) -> (usize, usize) {
    let mut p = 0;
    let mut f = 0;
    for l in out.lines().filter(|l| l.starts_with("test result:")) {
        let num = |key: &str| {
            l.split(';')
                .find_map(|part| {
                    part.trim()
                        .trim_start_matches("test result: ok.")
                        .trim_start_matches("test result: FAILED.")
                        .trim()
                        .strip_suffix(key)
                })
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0)
        };
        p += num("passed");
        f += num("failed");
    }
    (p, f)
}

fn cargo(ctx: &Ctx, name: &'static str, args: &[&str]) -> Step {
    let start = Instant::now();
    println!("test: {name}: cargo {}", args.join(" "));
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&ctx.repo)
        .args(args)
        .output();
    let (ok, text) = match out {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run cargo: {e}")),
    };
    let (passed, failed) = cargo_counts(&text);
    if !ok {
        println!("{}", sh::tail(&text, 60));
    }
    Step {
        name,
        ok,
        passed,
        failed: if ok { failed } else { failed.max(1) },
        note: if passed + failed > 0 {
            format!("{passed} passed, {failed} failed")
        } else {
            String::new()
        },
        secs: start.elapsed().as_secs(),
    }
}

pub fn run(ctx: &Ctx) -> Result<()> {
    let start = Instant::now();
    let mut steps = vec![
        cargo(ctx, "rustfmt", &["fmt", "--all", "--", "--check"]),
        cargo(
            ctx,
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ],
        ),
        cargo(ctx, "cargo test", &["test", "--workspace", "--quiet"]),
    ];

    let t = Instant::now();
    let built = setup::run(ctx).and_then(|tools| kernel::build(ctx, &tools));
    let kernel = match built {
        Ok(k) => {
            steps.push(Step {
                name: "kernel build",
                ok: true,
                passed: 0,
                failed: 0,
                note: String::new(),
                secs: t.elapsed().as_secs(),
            });
            Some(k)
        }
        Err(e) => {
            eprintln!("test: kernel build: {e:#}");
            steps.push(Step {
                name: "kernel build",
                ok: false,
                passed: 0,
                failed: 1,
                note: "failed".into(),
                secs: t.elapsed().as_secs(),
            });
            None
        }
    };

    if let Some(k) = &kernel {
        let t = Instant::now();
        let step = match boot::tcg_kunit(ctx, k, false, 180, "") {
            Ok(b) => {
                let res = b.check().and_then(|()| b.check_feature_absent());
                if let Err(e) = &res {
                    eprintln!("test: TCG boot + KUnit: {e:#}");
                }
                Step {
                    name: "TCG boot + KUnit",
                    ok: res.is_ok(),
                    passed: b.ktap.count(crate::ktap::Status::Pass),
                    failed: b.ktap.failed().max(usize::from(res.is_err())),
                    note: b.ktap.summary_line(),
                    secs: t.elapsed().as_secs(),
                }
            }
            Err(e) => {
                eprintln!("test: TCG boot + KUnit: {e:#}");
                Step {
                    name: "TCG boot + KUnit",
                    ok: false,
                    passed: 0,
                    failed: 1,
                    note: "boot failed".into(),
                    secs: t.elapsed().as_secs(),
                }
            }
        };
        steps.push(step);
    }

    println!("\n{:<20} {:<6} {:>6}  figures", "step", "result", "time");
    for s in &steps {
        println!(
            "{:<20} {:<6} {:>5}s  {}",
            s.name,
            if s.ok { "pass" } else { "FAIL" },
            s.secs,
            s.note
        );
    }
    let passed: usize = steps.iter().map(|s| s.passed).sum();
    let failed: usize = steps.iter().map(|s| s.failed).sum();
    println!("total time {}s", start.elapsed().as_secs());
    println!("test: {passed} passed, {failed} failed");
    if steps.iter().any(|s| !s.ok) {
        bail!(
            "{} of {} steps failed",
            steps.iter().filter(|s| !s.ok).count(),
            steps.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cargo_results() {
        let out = "test result: ok. 11 passed; 0 failed; 0 ignored\n\
                   test result: FAILED. 3 passed; 2 failed; 1 ignored\nfoo\n";
        assert_eq!(cargo_counts(out), (14, 2));
    }
}
