//! Build, boot and test orchestrator for the KVM protected-memory project.
//!
//! `cargo xtask setup | kernel | boot | test`: see `--help`.

mod bench;
mod bench_boot;
mod boot;
mod ctx;
mod e2e;
mod hostile;
mod initramfs;
mod kernel;
mod ktap;
mod nested;
mod net;
mod overlay;
mod qemu;
mod selftests;
mod series;
mod setup;
mod sh;
mod smp;
mod stock;
mod test;
mod uapi;
mod verify;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "KVM protected memory: set up, build, boot and test")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the build dependencies and fetch the pinned kernel source,
    /// rust-src and bindgen into the cache (idempotent).
    Setup,
    /// Lay the overlay on the pinned tree, configure and build the kernel.
    Kernel,
    /// Build the kernel, boot it under QEMU TCG and check its KUnit results.
    Boot {
        /// Do not echo the guest console (it is always written to the log).
        #[arg(long)]
        quiet: bool,
        /// Seconds before the boot is declared hung.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// Extra kernel command-line arguments.
        #[arg(long, default_value = "")]
        append: String,
    },
    /// Summarise the KTAP (KUnit) output found in a console log.
    Ktap {
        /// The log file to parse.
        log: std::path::PathBuf,
    },
    /// Boot a protected guest on the real host path (QEMU TCG -> our kernel
    /// as KVM host -> our VMM -> our kernel as guest) and verify it.
    Demo {
        /// Echo the consoles (always written to the log).
        #[arg(long)]
        verbose: bool,
    },
    /// Run end-to-end scenarios in one L1 boot (all when none is named).
    Scenarios {
        /// Scenario names (see `cargo xtask scenarios --list`).
        names: Vec<String>,
        /// List the scenarios and exit.
        #[arg(long)]
        list: bool,
        /// Echo the consoles (always written to the log).
        #[arg(long)]
        verbose: bool,
    },
    /// Benchmarks: boot, conversion cost, disk I/O and bounce-pool pressure
    /// of unprotected, view, gmem and per-page guests, side by side in one
    /// L1 boot; writes BENCHMARKS.md and SVG plots.
    Bench {
        /// Runs per configuration (interleaved).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Directory for BENCHMARKS.md and the plots (default: the
        /// repository root).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Soak: N consecutive L2 boots of one scenario (by default the
    /// protected gmem boot with the full KUnit suite and disk I/O) in one L1
    /// boot (not in `test`); prints the spread of boot times.
    Soak {
        /// Number of L2 boots.
        #[arg(default_value_t = 20)]
        n: usize,
        /// The scenario to repeat; several, comma-separated, run in turn
        /// (N rounds).
        #[arg(long, default_value = "protected")]
        scenario: String,
    },
    /// Run every test: cargo checks and tests, kernel build, TCG boot with
    /// KUnit, and the end-to-end scenarios.
    Test,
    /// Export the whole change as a `git format-patch` series against the
    /// pinned base (with a cover letter), check that it applies to the
    /// pristine files and equals the built tree, and run checkpatch.
    Series {
        /// Where to write the series (default: a directory in the cache).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Also build the kernel after each patch (incrementally, in a
        /// scratch tree) and report the first step that fails.
        #[arg(long)]
        bisect: bool,
    },
    /// Lint our kernel Rust the way the tree does, on the built tree:
    /// `make rustfmtcheck`, rustdoc of our crate, `make CLIPPY=1`.
    Lint,
    /// Read a guest's console log or `dmesg` output and print a verdict
    /// table; exits non-zero unless the guest is protected and healthy.
    Verify {
        /// The log file (`dmesg > guest.log` inside the guest, or a console
        /// capture).
        log: std::path::PathBuf,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let ctx = ctx::Ctx::new()?;
    match cli.cmd {
        Cmd::Setup => setup::run(&ctx).map(|_| ()),
        Cmd::Kernel => {
            let tools = setup::run(&ctx)?;
            kernel::build(&ctx, &tools).map(|_| ())
        }
        Cmd::Boot {
            quiet,
            timeout,
            append,
        } => {
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            let report = boot::tcg_kunit(&ctx, &k, !quiet, timeout, &append)?;
            report.check()?;
            report.check_feature_absent()
        }
        Cmd::Ktap { log } => {
            let text = std::fs::read_to_string(&log)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", log.display()))?;
            let s = ktap::parse(&text);
            println!("{}", s.summary_line());
            s.check(&[])
        }
        Cmd::Demo { verbose } => {
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            let vmm = nested::build_vmm(&ctx)?;
            e2e::run(
                &ctx,
                &k,
                &vmm,
                vec![e2e::protected(), e2e::protected_view()],
                verbose,
                "demo-l1.log",
            )
            .map(|_| ())
        }
        Cmd::Scenarios {
            names,
            list,
            verbose,
        } => {
            let mut all = e2e::all();
            let mut stock = e2e::stock_host();
            if list {
                for s in all.iter().chain(&stock) {
                    println!("{:<28} {}", s.name, s.expect);
                    if s.name == selftests::RUN {
                        for t in selftests::LIST {
                            println!("  {:<54} {}", t.name(), t.guards);
                        }
                    }
                }
                return Ok(());
            }
            if !names.is_empty() {
                for n in &names {
                    if !all.iter().chain(&stock).any(|s| s.name == n) {
                        anyhow::bail!("no scenario named {n} (see --list)");
                    }
                }
                all.retain(|s| names.iter().any(|n| n == s.name));
                stock.retain(|s| names.iter().any(|n| n == s.name));
            }
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            let vmm = nested::build_vmm(&ctx)?;
            // Our L1 always runs (the KVM handler test); the stock L1 only
            // for its own scenarios.
            let ours = if names.is_empty() || !all.is_empty() {
                e2e::run(&ctx, &k, &vmm, all, verbose, "scenarios-l1.log").map(|_| ())
            } else {
                Ok(())
            };
            let theirs = if stock.is_empty() {
                Ok(())
            } else {
                let host = stock::host(&ctx)?;
                let l1 = nested::L1::Stock(&host);
                e2e::run_on(&ctx, &l1, &k, &vmm, stock, verbose, "stock-l1.log").map(|_| ())
            };
            ours.and(theirs)
        }
        Cmd::Bench { runs, out } => {
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            let vmm = nested::build_vmm(&ctx)?;
            let out = out.unwrap_or_else(|| ctx.repo.clone());
            bench::run(&ctx, &k, &vmm, runs, &out)
        }
        Cmd::Soak { n, scenario } => {
            for name in scenario.split(',') {
                if !e2e::all().iter().any(|s| s.name == name) {
                    anyhow::bail!("no scenario named {name} on our L1 (see `scenarios --list`)");
                }
                if name == selftests::RUN {
                    anyhow::bail!(
                        "{name} is no L2 boot to repeat: `cargo xtask scenarios {name}` runs it"
                    );
                }
            }
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            let vmm = nested::build_vmm(&ctx)?;
            e2e::soak(&ctx, &k, &vmm, n, &scenario)
        }
        Cmd::Test => test::run(&ctx),
        Cmd::Lint => {
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            kernel::lint(&ctx, &tools, &k)
        }
        Cmd::Verify { log } => verify::run(&log),
        Cmd::Series { out, bisect } => {
            let tools = setup::run(&ctx)?;
            let k = kernel::build(&ctx, &tools)?;
            let ex = series::run(&ctx, &tools.pristine, &k.tree, out, series::From::User)?;
            if bisect {
                kernel::bisect(&ctx, &tools, &ex)?;
            }
            Ok(())
        }
    }
}
