//! `cargo xtask test`: every test the project has, in one command.

use crate::ctx::Ctx;
use crate::{bench, boot, e2e, kernel, nested, series, setup, sh, stock, uapi};
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

fn step(name: &'static str, t: Instant, res: Result<(usize, usize, String)>) -> Step {
    let secs = t.elapsed().as_secs();
    match res {
        Ok((passed, failed, note)) => Step {
            name,
            ok: failed == 0,
            passed,
            failed,
            note,
            secs,
        },
        Err(e) => {
            eprintln!("test: {name}: {e:#}");
            Step {
                name,
                ok: false,
                passed: 0,
                failed: 1,
                // The first line names what failed (the scenarios, the
                // step): the summary table is often all a CI log keeps.
                note: format!("{e:#}")
                    .lines()
                    .next()
                    .unwrap_or("failed")
                    .chars()
                    .take(160)
                    .collect(),
                secs,
            }
        }
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
    let built = setup::run(ctx).and_then(|tools| kernel::build(ctx, &tools).map(|k| (tools, k)));
    let (tools, k) = match built {
        Ok(tk) => {
            steps.push(step("kernel build", t, Ok((0, 0, String::new()))));
            tk
        }
        Err(e) => {
            steps.push(step("kernel build", t, Err(e)));
            return finish(start, &steps);
        }
    };

    let t = Instant::now();
    let res = uapi::check(&tools, &k).map(|n| (n, 0, format!("{n} constants equal")));
    steps.push(step("uapi vs ABI (bindgen)", t, res));

    let t = Instant::now();
    let res = series::run(ctx, &tools.pristine, &k.tree, None, series::From::CheckOnly).map(|ex| {
        (
            ex.patches.len(),
            0,
            format!(
                "{} patches: git am = built tree, checkpatch clean",
                ex.patches.len()
            ),
        )
    });
    steps.push(step("series (am, checkpatch)", t, res));

    let t = Instant::now();
    let res = sh::output(tools.make(&k.tree, &k.build).arg("rustfmtcheck")).map(|_| {
        (
            1,
            0,
            "make rustfmtcheck: the tree's Rust, ours included, is formatted".to_string(),
        )
    });
    steps.push(step("kernel rustfmtcheck", t, res));

    let t = Instant::now();
    let res = kernel::rustdoc(ctx, &tools, &k)
        .map(|index| (1, 0, format!("0 warnings; {}", index.display())));
    steps.push(step("kernel rustdoc (our crate)", t, res));

    let t = Instant::now();
    let res = kernel::clippy(&tools, &k).map(|line| (1, 0, line));
    steps.push(step("kernel clippy (CLIPPY=1)", t, res));

    let t = Instant::now();
    let res = kernel::kconfig_checks(ctx, &tools, &k).map(|l| (l.len(), 0, l.join("; ")));
    steps.push(step("Kconfig (RUST=n, KVM_GUEST=n)", t, res));

    let t = Instant::now();
    let res = boot::tcg_kunit(ctx, &k, false, 180, "").and_then(|b| {
        let verdict = b.check().and_then(|()| b.check_feature_absent());
        let (p, f) = (b.ktap.count(crate::ktap::Status::Pass), b.ktap.failed());
        verdict.map(|()| (p, f, b.ktap.summary_line()))
    });
    steps.push(step("TCG boot + KUnit", t, res));

    let t = Instant::now();
    let vmm = nested::build_vmm(ctx);
    let res = vmm
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|vmm| e2e::run(ctx, &k, vmm, e2e::all(), false, "test-l1.log"));
    let res = res.map(|(p, f)| (p, f, format!("{p} scenarios passed, {f} failed")));
    steps.push(step("nested L1/L2 scenarios", t, res));

    let t = Instant::now();
    let res = vmm
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|vmm| {
            // One run of every benchmark configuration: the pipeline works and
            // every figure is there. Times are printed, never asserted.
            let out = ctx.cache.join("bench-smoke");
            bench::run(ctx, &k, vmm, 1, &out).map(|()| {
                (
                    1,
                    0,
                    format!("report complete: {}", out.join("BENCHMARKS.md").display()),
                )
            })
        });
    steps.push(step("bench smoke (1 run)", t, res));

    let t = Instant::now();
    let res = vmm.map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|vmm| {
        let host = stock::host(ctx)?;
        let l1 = nested::L1::Stock(&host);
        e2e::run_on(ctx, &l1, &k, &vmm, e2e::stock_host(), false, "stock-l1.log")
    });
    let res = res.map(|(p, f)| (p, f, format!("{p} scenarios passed, {f} failed")));
    steps.push(step("stock-host L1 scenarios", t, res));

    finish(start, &steps)
}

fn finish(start: Instant, steps: &[Step]) -> Result<()> {
    println!("\n{:<24} {:<6} {:>6}  figures", "step", "result", "time");
    for s in steps {
        println!(
            "{:<24} {:<6} {:>5}s  {}",
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
