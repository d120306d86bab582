//! Command line of `protmem-vmm`.

use std::path::PathBuf;

use clap::Parser;

use crate::boot::MMIO_HOLE;
use crate::hypercalls::FailPolicy;

/// Command line the guest gets unless `--cmdline` is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Smallest RAM accepted.
const MIN_MEM: u64 = 16 << 20;

/// Errors in command-line values.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `--mem` did not parse or is out of range.
    #[error(
        "--mem {0:?}: expected MiB (`512`, `512M`) or GiB (`1G`), at least 16 MiB and \
         below the MMIO hole at 3 GiB"
    )]
    Mem(String),
}

/// The network device's backend and address (`--net tap=NAME[,mac=MAC]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Parses `--net`: `tap=NAME`, then optionally `,mac=aa:bb:cc:dd:ee:ff`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = crate::devices::virtio::net::DEFAULT_MAC;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", m)) => {
                let bytes: Vec<u8> = m
                    .split(':')
                    .map(|b| u8::from_str_radix(b, 16))
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("mac={m}: expected six hex bytes, aa:bb:cc:dd:ee:ff"))?;
                mac = bytes
                    .try_into()
                    .map_err(|_| format!("mac={m}: expected six hex bytes, aa:bb:cc:dd:ee:ff"))?;
                if mac[0] & 1 != 0 {
                    return Err(format!("mac={m}: a multicast address"));
                }
            }
            _ => return Err(format!("{part:?}: expected tap=NAME or mac=MAC")),
        }
    }
    let tap = tap.ok_or("expected tap=NAME")?;
    Ok(NetConfig { tap, mac })
}

/// Parses `--mem`: a number of MiB, or a number with an `M` or `G` suffix.
pub fn parse_mem(s: &str) -> Result<u64, CliError> {
    let err = || CliError::Mem(s.to_string());
    let (num, shift) = match s.strip_suffix(['G', 'g']) {
        Some(n) => (n, 30),
        None => (s.strip_suffix(['M', 'm']).unwrap_or(s), 20),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(err)?;
    if !(MIN_MEM..=MMIO_HOLE).contains(&bytes) {
        return Err(err());
    }
    Ok(bytes)
}

/// Where private guest memory lives under `--protect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtectMode {
    /// In a guest_memfd of a software-protected VM: never mapped by the VMM.
    Gmem,
    /// In the VMM's memfd, mapped for KVM; the device view fences it.
    View,
}

impl ProtectMode {
    /// The name `--protect=` takes and the stats file shows.
    pub fn name(self) -> &'static str {
        match self {
            ProtectMode::Gmem => "gmem",
            ProtectMode::View => "view",
        }
    }
}

/// Where virtio-blk requests are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BlkIo {
    /// On a thread of its own, woken by an ioeventfd on QueueNotify; the
    /// vCPU that notified goes back to the guest at once.
    #[default]
    Thread,
    /// On the vCPU thread that wrote QueueNotify, before it re-enters the
    /// guest (the behaviour before the I/O thread; for comparisons).
    Vcpu,
}

impl BlkIo {
    /// The name `--blk-io` takes and the stats file shows.
    pub fn name(self) -> &'static str {
        match self {
            BlkIo::Thread => "thread",
            BlkIo::Vcpu => "vcpu",
        }
    }
}

/// Boots a Linux bzImage on KVM with virtio-mmio devices and, with
/// `--protect`, enforces the guest's protected-memory hypercalls.
///
/// Exit code: 0 when the guest resets (i8042) or shuts down (triple
/// fault) with no `--reboots` left, 1 on a VMM error, 2 on a guest kernel
/// panic, 3 on `--timeout`.
#[derive(Debug, Parser)]
#[command(name = "protmem-vmm", version)]
pub struct Cli {
    /// Linux bzImage to boot (64-bit boot protocol).
    #[arg(long, value_name = "BZIMAGE")]
    pub kernel: PathBuf,
    /// initramfs to load below the top of RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, as it is: the ACPI tables describe the devices.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest RAM from GPA 0: MiB, or with an M/G suffix; below 3 GiB.
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs (the ACPI MADT and an MP table describe them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,
    /// Disk image for virtio-blk (slot 0: 0xd0000000, IRQ 5), opened read-write.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Where virtio-blk requests are served: `thread` (an I/O thread woken
    /// by an ioeventfd) or `vcpu` (synchronously in the notifying vCPU).
    #[arg(long, value_name = "WHERE", default_value = "thread")]
    pub blk_io: BlkIo,
    /// Add a virtio-rng device fed from /dev/urandom (slot 1: 0xd0001000, IRQ 6).
    #[arg(long)]
    pub rng: bool,
    /// Add a virtio-net device (slot 2: 0xd0002000, IRQ 7) on TAP interface
    /// NAME, which must exist or be creatable by this process; the guest
    /// gets MAC address MAC (default 06:00:0a:00:02:02).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    pub net: Option<NetConfig>,
    /// Offer protected memory (CPUID 0x40000001 EAX bit 18) and enforce the
    /// ENABLE/SHARE/UNSHARE hypercalls; needs a host kernel with the KVM
    /// protected-memory patches. `gmem` (the default): private pages live
    /// in a guest_memfd that this process never maps. `view`: all RAM stays
    /// mapped here and only device access to private pages is fenced (for
    /// hosts without KVM_SW_PROTECTED_POPULATE).
    #[arg(
        long,
        value_name = "MODE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "gmem"
    )]
    pub protect: Option<ProtectMode>,
    /// Write the serial console to PATH instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub serial_log: Option<PathBuf>,
    /// Write run statistics as JSON to PATH at exit.
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// Stop the VM after SECS seconds (exit code 3), reboots included.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Restart the VM in place on the first N guest resets (i8042 0xFE,
    /// triple fault), as a machine reset would: every vCPU stopped, RAM
    /// cleared and the kernel and initrd loaded again, devices and protection
    /// back to power-on (ENABLE needed again), fresh vCPUs; the disk keeps
    /// its contents and the stats count the whole run. The next reset ends
    /// the VMM with exit code 0; a panic still ends it.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub reboots: u64,
    /// TEST ONLY: ENABLE returns -KVM_ENOSYS and changes nothing.
    #[arg(long, requires = "protect", help_heading = "Test-only options")]
    pub fail_enable: bool,
    /// TEST ONLY: SHARE calls (after argument and state checks) fail with
    /// -KVM_EFAULT, changing nothing: every call, or every N-th.
    #[arg(
        long,
        value_name = "always|every:N",
        requires = "protect",
        help_heading = "Test-only options"
    )]
    pub fail_share: Option<FailPolicy>,
    /// TEST ONLY: the same for UNSHARE.
    #[arg(
        long,
        value_name = "always|every:N",
        requires = "protect",
        help_heading = "Test-only options"
    )]
    pub fail_unshare: Option<FailPolicy>,
    /// TEST ONLY: behave as a VMM that was taken over. Answer 0 to every
    /// conversion and keep every page and device mapping (the lie); on
    /// SIGUSR1 try to read and change vCPU state and private memory, one
    /// stderr line per attempt (`protmem-vmm: hostile: ...`), then create
    /// PATH. See host/vmm/src/hostile.rs.
    #[arg(
        long,
        value_name = "PATH",
        requires = "protect",
        help_heading = "Test-only options"
    )]
    pub hostile: Option<PathBuf>,
    /// TEST ONLY: with --hostile, also search the VMM's mapping of guest
    /// RAM for the bytes HEX encodes (the guest's secret) and overwrite them.
    #[arg(
        long,
        value_name = "HEX",
        requires = "hostile",
        help_heading = "Test-only options"
    )]
    pub hostile_needle: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("protmem-vmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--kernel", "bz"]).unwrap();
        assert_eq!(c.mem, 512 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(c.protect.is_none() && !c.rng && c.disk.is_none() && c.timeout.is_none());
        assert_eq!(c.blk_io, BlkIo::Thread);
        let v = parse(&["--kernel", "bz", "--blk-io", "vcpu"]).unwrap();
        assert_eq!(v.blk_io.name(), "vcpu");
        assert!(parse(&["--kernel", "bz", "--blk-io", "poll"]).is_err());
        assert_eq!(c.reboots, 0);
    }

    #[test]
    fn reboots_flag() {
        let c = parse(&["--kernel", "bz", "--reboots", "3", "--cpus", "4"]).unwrap();
        assert_eq!((c.reboots, c.cpus), (3, 4), "any number of vCPUs");
        for bad in ["two", "", "18446744073709551616"] {
            let e = parse(&["--kernel", "bz", "--reboots", bad]).unwrap_err();
            assert!(e.to_string().contains("--reboots <N>"), "{e}");
        }
        assert!(parse(&["--kernel", "bz", "--reboots", "-1"]).is_err());
        assert!(parse(&["--kernel", "bz", "--reboots"]).is_err());
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--reboots <N>"), "{help}");
    }

    #[test]
    fn full_command_line() {
        let c = parse(&[
            "--kernel",
            "bz",
            "--initrd",
            "i.cpio",
            "--mem",
            "1G",
            "--cpus",
            "2",
            "--disk",
            "d.img",
            "--rng",
            "--protect",
            "--serial-log",
            "s.log",
            "--stats-json",
            "s.json",
            "--timeout",
            "60",
            "--fail-share",
            "every:3",
            "--fail-unshare",
            "always",
            "--fail-enable",
        ])
        .unwrap();
        assert_eq!(c.mem, 1 << 30);
        assert_eq!(c.fail_share, Some(FailPolicy::Every(3)));
        assert_eq!(c.fail_unshare, Some(FailPolicy::Always));
        assert!(c.fail_enable && c.rng);
        assert_eq!(c.protect, Some(ProtectMode::Gmem), "bare --protect is gmem");
        assert_eq!(c.timeout, Some(60));
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["--kernel", "bz", "--mem", "3073"][..],
            &["--kernel", "bz", "--mem", "8M"],
            &["--kernel", "bz", "--mem", "lots"],
            &["--kernel", "bz", "--cpus", "0"],
            &["--kernel", "bz", "--fail-share", "every:0", "--protect"],
            &["--kernel", "bz", "--fail-enable"],
            &["--mem", "512"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        assert_eq!(parse_mem("3G").unwrap(), MMIO_HOLE);
        let e = parse(&["--kernel", "bz", "--mem", "4G"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"4G\""), "{e}");
    }

    #[test]
    fn net_option() {
        let net = |a: &str| parse(&["--kernel", "bz", "--net", a]).map(|c| c.net.unwrap());
        let n = net("tap=kpm0").unwrap();
        assert_eq!(
            (n.tap.as_str(), n.mac),
            ("kpm0", crate::devices::virtio::net::DEFAULT_MAC)
        );
        let n = net("tap=t1,mac=02:00:00:00:00:0a").unwrap();
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 10]);
        for bad in [
            "",
            "tap=",
            "kpm0",
            "tap=a,mac=1:2:3",
            "tap=a,mac=01:00:00:00:00:00",
            "tap=a,x=1",
        ] {
            assert!(net(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&["--kernel", "bz"]).unwrap().net.is_none());
    }

    #[test]
    fn protect_modes() {
        let mode = |a: &str| parse(&["--kernel", "bz", a]).map(|c| c.protect);
        assert_eq!(mode("--protect").unwrap(), Some(ProtectMode::Gmem));
        assert_eq!(mode("--protect=gmem").unwrap(), Some(ProtectMode::Gmem));
        assert_eq!(mode("--protect=view").unwrap(), Some(ProtectMode::View));
        let e = mode("--protect=kvm").unwrap_err().to_string();
        assert!(e.contains("gmem") && e.contains("view"), "{e}");
        // `--protect view` is not a mode: the value needs `=`.
        assert!(parse(&["--kernel", "bz", "--protect", "view"]).is_err());
    }

    #[test]
    fn help_marks_test_only_options() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Test-only options"), "{help}");
        assert!(help.contains("TEST ONLY: ENABLE returns -KVM_ENOSYS"));
    }
}
