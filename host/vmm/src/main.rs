//! `protmem-vmm`: parses the command line, runs the VM, writes the stats and
//! exits with the run's exit code (see `--help`).

use clap::Parser;
use kvm_protmem_vmm::cli::Cli;
use kvm_protmem_vmm::exit::StopReason;
use kvm_protmem_vmm::stats::Stats;
use kvm_protmem_vmm::vmm;

fn main() {
    let cli = Cli::parse();
    let stats = match vmm::run(&cli) {
        Ok(outcome) => outcome.stats,
        Err(e) => {
            eprintln!("protmem-vmm: {e}");
            Stats::stopped(&StopReason::Error(e.to_string()), cli.protect)
        }
    };
    let mut code = stats.exit_code;
    if let Some(path) = &cli.stats_json {
        if let Err(e) = stats.write_json(path) {
            eprintln!("protmem-vmm: {e}");
            code = code.max(1);
        }
    }
    eprintln!("{}", stats.summary());
    std::process::exit(code);
}
