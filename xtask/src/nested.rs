//! The real host path: QEMU TCG boots our kernel as an L1 KVM host (AMD
//! SVM with nested paging), whose `/init` runs our VMM to boot the same
//! kernel as L2, once per scenario, all in one L1 boot.
//!
//! The L1 initramfs holds busybox, the VMM with its shared libraries, the
//! L2 kernel and initramfs, a disk image with known content, and a script
//! that xtask writes: one VMM run per scenario between marker lines
//! (`kpm-l1: begin NAME` ... `kpm-l1: end NAME`) that carry the VMM's
//! exit code, its stats JSON and checksums of the disk afterwards.

use crate::boot::{self, Console, End};
use crate::ctx::Ctx;
use crate::initramfs::{self, Initramfs};
use crate::kernel::Kernel;
use crate::selftests;
use crate::setup::{self, Qemu};
use crate::sh;
use crate::stock::StockHost;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Size of the test disk, and of the region with known content at its start.
pub const DISK_BYTES: usize = 4 << 20;
pub const KNOWN_BYTES: usize = 1 << 20;
/// Disk size of benchmark runs ([`L2Run::disk_mib`]).
pub const BENCH_DISK_MIB: u64 = 96;

/// The disk's known content: a pattern no two pages of which are equal.
pub fn disk_image() -> Vec<u8> {
    let mut d = vec![0u8; DISK_BYTES];
    for (i, b) in d[..KNOWN_BYTES].iter_mut().enumerate() {
        *b = ((i * 131 + i / 4096 * 7) % 251) as u8;
    }
    d
}

/// SHA-256 of the disk's known region, as `sha256sum` prints it.
pub fn known_sha256() -> String {
    format!("{:x}", Sha256::digest(&disk_image()[..KNOWN_BYTES]))
}

/// One L2 boot inside L1.
#[derive(Clone)]
pub struct L2Run {
    /// Scenario name: letters, digits, `-`.
    pub name: String,
    /// Extra VMM arguments (`--protect`, test knobs).
    pub vmm_args: Vec<String>,
    /// L2 kernel command line (the VMM appends its virtio-mmio devices).
    pub cmdline: String,
    /// Seconds before the VMM stops the guest (`--timeout`).
    pub timeout: u64,
    /// Boot the guest under QEMU/KVM inside L1 instead of our VMM (a
    /// control: same guest, same L1, another VMM; of `vmm_args` only
    /// `--cpus N` is used, as `-smp N`).
    pub qemu: bool,
}

impl L2Run {
    /// `-smp` of a QEMU run: the `--cpus` of `vmm_args`, else 1.
    pub fn qemu_cpus(&self) -> u32 {
        self.vmm_args
            .windows(2)
            .find(|w| w[0] == "--cpus")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(1)
    }

    /// Size of the run's disk: the benchmarks (`kpm.bench`, `kpm.pressure`)
    /// use a 64 MiB area from 16 MiB on; everyone else the image as it is.
    pub fn disk_mib(&self) -> Option<u64> {
        self.cmdline
            .split_whitespace()
            .any(|w| w == "kpm.bench" || w == "kpm.pressure")
            .then_some(BENCH_DISK_MIB)
    }

    /// Whether the VMM plays a compromised VMM (`kpm.hostile` in the
    /// guest's command line): the L1 script starts it with `--hostile` and
    /// the needle, and signals it once the guest holds its secret.
    pub fn hostile(&self) -> bool {
        self.cmdline.split_whitespace().any(|w| w == "kpm.hostile")
    }

    /// Whether the guest runs kexec (`kpm.kexec`, `kpm.kdump`,
    /// `kpm.kexec-refused` in tests/guest/init): it boots the kexec
    /// initramfs.
    pub fn kexecs(&self) -> bool {
        self.cmdline
            .split_whitespace()
            .any(|w| w == "kpm.kexec" || w == "kpm.kdump" || w == "kpm.kexec-refused")
    }
}

/// What one L2 boot left.
#[derive(Debug, Default)]
pub struct L2Outcome {
    pub name: String,
    /// The VMM's exit code, if the run finished.
    pub exit: Option<i32>,
    /// The VMM's stats JSON, as written.
    pub stats: Option<String>,
    /// L2 console and VMM messages between the run's markers.
    pub console: String,
    /// SHA-256 of the disk's second MiB after the run.
    pub disk_copy_sha: Option<String>,
    /// Host wall-clock seconds from `begin` to the guest's userspace and
    /// to the VMM's exit, as the markers reached L0.
    pub secs_to_userspace: Option<f64>,
    pub secs_total: Option<f64>,
    /// `kpm-` marker lines of this run with their host wall-clock seconds
    /// since the run's `begin` marker.
    pub marks: Vec<(f64, String)>,
}

impl L2Outcome {
    /// Host seconds between the first markers starting with `from` and `to`.
    pub fn secs_between(&self, from: &str, to: &str) -> Option<f64> {
        let at = |p: &str| {
            self.marks
                .iter()
                .find(|(_, l)| l.starts_with(p))
                .map(|(t, _)| *t)
        };
        Some(at(to)? - at(from)?)
    }
}

impl L2Outcome {
    /// The console lines that start with `prefix`, prefix removed.
    pub fn lines_after<'a>(&'a self, prefix: &str) -> impl Iterator<Item = &'a str> + 'a {
        let prefix = prefix.to_string();
        self.console.lines().filter_map(move |l| {
            let l = l.trim_end_matches('\r');
            l.find(prefix.as_str()).map(|i| &l[i + prefix.len()..])
        })
    }

    /// Like [`Self::lines_after`], with the line mended where a kernel
    /// message cut into it: the serial console prints printk lines of
    /// other CPUs in the middle of a userspace write, so `ab[ 8.601] msg`
    /// and a later line `cd` were one line `abcd`.
    pub fn mended_lines_after(&self, prefix: &str) -> Vec<String> {
        let lines: Vec<&str> = self
            .console
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            let Some(at) = l.find(prefix) else {
                continue;
            };
            let rest = &l[at + prefix.len()..];
            match kernel_stamp_at(rest) {
                Some(cut) => {
                    // The line goes on after the kernel message(s): the next
                    // line that is not a kernel message of its own.
                    let tail = lines[i + 1..]
                        .iter()
                        .find(|n| kernel_stamp_at(n) != Some(0))
                        .copied()
                        .unwrap_or("");
                    out.push(format!("{}{tail}", &rest[..cut]));
                }
                None => out.push(rest.to_string()),
            }
        }
        out
    }

    /// The last 40 lines of this run's console.
    pub fn tail(&self) -> String {
        sh::tail(&self.console, 40)
    }
}

/// Where a printk line (`[` spaces, seconds, `.`, 6 digits, `] `) starts
/// in `l`, if it does.
pub(crate) fn kernel_stamp_at(l: &str) -> Option<usize> {
    l.match_indices('[').map(|(i, _)| i).find(|&i| {
        let Some(end) = l[i..].find("] ") else {
            return false;
        };
        let stamp = l[i + 1..i + end].trim_start();
        stamp.split_once('.').is_some_and(|(s, us)| {
            !s.is_empty()
                && s.bytes().all(|b| b.is_ascii_digit())
                && us.len() == 6
                && us.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// Builds the VMM and the KVM host-handler test (release) and returns the
/// VMM binary; the test binary sits next to it.
pub fn build_vmm(ctx: &Ctx) -> Result<PathBuf> {
    println!("nested: building the VMM (cargo build --release -p kvm-protmem-vmm)");
    sh::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&ctx.repo)
            .args(["build", "--quiet", "--release", "-p", "kvm-protmem-vmm"]),
    )?;
    let bin = ctx.repo.join("target/release/protmem-vmm");
    if !bin.is_file() {
        bail!("cargo built the VMM but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Shared libraries `bin` needs, from `ldd`.
fn libraries(bin: &Path, root: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut ldd = Command::new("ldd");
    ldd.arg(bin);
    if let Some(r) = root {
        ldd.env("LD_LIBRARY_PATH", setup::lib_path(r));
    }
    let out = sh::output(&mut ldd)?;
    let mut libs = Vec::new();
    for l in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match l.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// 4 KiB disk blocks of the secret-scan handshake: the guest writes
/// `kpm-scan-ready` into the first once its secret is planted; L1 writes
/// `kpm-scan-done` into the second after the scan (tests/guest/init).
pub const SCAN_READY_BLOCK: u64 = 768;
pub const SCAN_DONE_BLOCK: u64 = 769;

/// The secret a guest booted with `kpm.secret=KEY` keeps in private memory
/// (tests/guest/init): `KPM-SECRET-` and KEY with each hex digit 0-9a-f
/// mapped to g-v, so that the secret's bytes appear nowhere in what the
/// VMM loaded (kernel, initrd, command line).
pub fn secret_needle(cmdline: &str) -> Option<String> {
    let key = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kpm.secret="))?;
    let mapped: Option<String> = key
        .chars()
        .map(|c| c.to_digit(16).and_then(|d| char::from_u32('g' as u32 + d)))
        .collect();
    Some(format!("KPM-SECRET-{}", mapped?))
}

/// Name of the run of the KVM host-handler test (`protmem-kvm-test`).
pub const KVM_TEST: &str = "kvm-handlers";

/// The L1 script: the KVM host-handler test, then one VMM run per
/// scenario, each between markers.
pub fn l1_script(runs: &[L2Run], kvm_test: bool) -> String {
    let mut s = String::from("# Generated by cargo xtask: one L2 boot per scenario.\n");
    if kvm_test {
        s.push_str(&format!(
            "echo 'kpm-l1: begin {KVM_TEST}'\n/vmm/protmem-kvm-test\necho \"kpm-l1: exit {KVM_TEST} $?\"\necho 'kpm-l1: end {KVM_TEST}'\n"
        ));
    }
    for r in runs {
        if r.name == selftests::RUN {
            s.push_str(&selftests::script());
            continue;
        }
        let n = &r.name;
        // With a secret: the VMM runs in the background while L1 waits for
        // the guest's ready block, scans the VMM, and releases the guest.
        // With --hostile the VMM attacks (SIGUSR1) before the scan, and
        // says when it is done by creating a file.
        let mut hostile_args = String::new();
        let mut attack = String::new();
        if let (true, Some(needle)) = (r.hostile(), secret_needle(&r.cmdline)) {
            // Hex: the needle's bytes must not sit in the VMM's arguments,
            // where the secret scan would find them.
            let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
            hostile_args = format!(" --hostile /tmp/{n}.hostile-done --hostile-needle {hex}");
            attack = format!(
                "kill -USR1 $pid\n\
                 j=0\n\
                 while [ $j -lt 120 ] && [ ! -e /tmp/{n}.hostile-done ] && kill -0 $pid 2>/dev/null; do sleep 1; j=$((j + 1)); done\n\
                 echo \"kpm-l1: hostile-done {n} after ${{j}}s\"\n"
            );
        }
        let (bg, scan) = match secret_needle(&r.cmdline) {
            Some(needle) => (
                " &",
                format!(
                    "pid=$!\n\
                     i=0\n\
                     while [ $i -lt 300 ] && kill -0 $pid 2>/dev/null; do\n\
                     \tdd if=/tmp/{n}.img bs=4096 skip={SCAN_READY_BLOCK} count=1 2>/dev/null | grep -q kpm-scan-ready && break\n\
                     \tsleep 1; i=$((i + 1))\n\
                     done\n\
                     {attack}\
                     echo \"kpm-l1: scan-start {n} after ${{i}}s\"\n\
                     /vmm/protmem-scan $pid {}\n\
                     printf kpm-scan-done | dd of=/tmp/{n}.img bs=4096 seek={SCAN_DONE_BLOCK} conv=notrunc 2>/dev/null\n\
                     wait $pid\n",
                    shell_quote(&needle)
                ),
            ),
            None => ("", String::new()),
        };
        if r.qemu {
            // QEMU's console on stdout, not a tty (stdin /dev/null), so the
            // harness sees each line when it is printed.
            s.push_str(&format!(
                "echo 'kpm-l1: begin {n}'\n\
                 cp /l2/disk.img /tmp/{n}.img\n\
                 timeout {} /qemu/qemu-system-x86_64 -L /qemu/share -enable-kvm -cpu qemu64 \\\n  \
                 -m 512M -smp {} -nodefaults -vga none -display none -monitor none -no-reboot \\\n  \
                 -serial stdio -kernel /l2/bzImage -initrd /l2/initrd.cpio -append {} \\\n  \
                 -drive file=/tmp/{n}.img,if=virtio,format=raw </dev/null\n\
                 echo \"kpm-l1: exit {n} $?\"\n\
                 echo \"kpm-l1: disk-copy {n} $(dd if=/tmp/{n}.img bs=4096 skip=256 count=256 2>/dev/null | sha256sum)\"\n\
                 rm -f /tmp/{n}.img\n\
                 echo 'kpm-l1: end {n}'\n",
                r.timeout,
                r.qemu_cpus(),
                shell_quote(&r.cmdline),
            ));
            continue;
        }
        let grow = r
            .disk_mib()
            .map(|m| format!("truncate -s {m}M /tmp/{n}.img\n"))
            .unwrap_or_default();
        s.push_str(&format!(
            "echo 'kpm-l1: begin {n}'\n\
             cp /l2/disk.img /tmp/{n}.img\n\
             {grow}\
             {net_up}\
             /vmm/protmem-vmm --kernel /l2/bzImage --initrd /l2/{initrd} --disk /tmp/{n}.img --rng \\\n  \
             --stats-json /tmp/{n}.json --timeout {} --cmdline {} {}{hostile_args}{bg}\n\
             {scan}\
             echo \"kpm-l1: exit {n} $?\"\n\
             {net_down}\
             echo \"kpm-l1: stats {n} $(tr -d '\\n' < /tmp/{n}.json 2>/dev/null)\"\n\
             echo \"kpm-l1: disk-copy {n} $(dd if=/tmp/{n}.img bs=4096 skip=256 count=256 2>/dev/null | sha256sum)\"\n\
             rm -f /tmp/{n}.img\n\
             echo 'kpm-l1: end {n}'\n",
            r.timeout,
            shell_quote(&r.cmdline),
            r.vmm_args.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
            initrd = if r.kexecs() {
                "initrd-kexec.cpio"
            } else {
                "initrd.cpio"
            },
            net_up = crate::net::l1_up(r),
            net_down = crate::net::l1_down(r),
        ));
    }
    s
}

/// CPUs of the L1 host: 1, or `KVM_PROTMEM_L1_CPUS` (an experiment). On
/// Debian's QEMU, more CPUs (multi-threaded TCG) reset the L1 within
/// seconds once it ran a nested SVM guest; with qemu/patches/0001 two
/// CPUs ran the SMP scenarios (qemu/README.md), but one stays the default
/// until the whole suite has run that way.
pub fn l1_cpus() -> u32 {
    std::env::var("KVM_PROTMEM_L1_CPUS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| (1..=8).contains(&n))
        .unwrap_or(1)
}

/// Splits an L1 console log into per-run outcomes.
pub fn split_runs(log: &str, runs: &[L2Run]) -> Vec<L2Outcome> {
    let mut out: Vec<L2Outcome> = Vec::new();
    let mut cur: Option<L2Outcome> = None;
    for line in log.lines() {
        let l = line.trim_end_matches('\r');
        if let Some(name) = l.strip_prefix("kpm-l1: begin ") {
            cur = Some(L2Outcome {
                name: name.to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(o) = cur.as_mut() else { continue };
        let field = |key: &str| {
            l.strip_prefix(&format!("kpm-l1: {key} {} ", o.name))
                .map(str::to_string)
        };
        if let Some(code) = field("exit") {
            o.exit = code.trim().parse().ok();
        } else if let Some(js) = field("stats") {
            o.stats = (!js.trim().is_empty()).then(|| js.trim().to_string());
        } else if let Some(sha) = field("disk-copy") {
            o.disk_copy_sha = sha.split_whitespace().next().map(str::to_string);
        } else if l == format!("kpm-l1: end {}", o.name) {
            out.extend(cur.take());
        } else {
            o.console.push_str(l);
            o.console.push('\n');
        }
    }
    // A run that never ended (L1 died or timed out) still reports what it has.
    out.extend(cur);
    for r in runs {
        if !out.iter().any(|o| o.name == r.name) {
            out.push(L2Outcome {
                name: r.name.clone(),
                ..Default::default()
            });
        }
    }
    out
}

/// Puts the shared libraries `bin` needs into the initramfs at their paths;
/// `dirs` holds what is there already (directories and libraries).
fn add_libraries(
    i: &mut Initramfs,
    dirs: &mut std::collections::BTreeSet<String>,
    bin: &Path,
) -> Result<()> {
    add_libraries_from(i, dirs, bin, None)
}

/// [`add_libraries`] for a binary unpacked under `root` with libraries of
/// its own there: those land at their paths relative to `root`.
fn add_libraries_from(
    i: &mut Initramfs,
    dirs: &mut std::collections::BTreeSet<String>,
    bin: &Path,
    root: Option<&Path>,
) -> Result<()> {
    for lib in libraries(bin, root)? {
        let inside = root.and_then(|r| lib.strip_prefix(r).ok());
        let rel = match inside {
            Some(p) => p.to_string_lossy().to_string(),
            None => lib.to_string_lossy().trim_start_matches('/').to_string(),
        };
        if !dirs.insert(rel.clone()) {
            continue;
        }
        let mut p = Path::new(&rel).parent();
        let mut chain = Vec::new();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            chain.push(d.to_string_lossy().to_string());
            p = d.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) && !["lib", "lib64"].contains(&d.as_str()) {
                i.dir(&d);
            }
        }
        // Follow the symlink: the initramfs gets the real file's bytes.
        let real = std::fs::canonicalize(&lib)
            .with_context(|| format!("cannot resolve {}", lib.display()))?;
        i.copy(&rel, 0o755, &real)?;
    }
    Ok(())
}

/// The initramfs of a guest that kexecs (tests/guest/init, `kpm.kexec`,
/// `kpm.kdump`, `kpm.kexec-refused`): the plain one's files, `kexec` from
/// Debian's kexec-tools with its libraries, and under /kexec the next
/// kernel (this same bzImage), a copy of it without `XLF_KVM_PROTMEM` (a
/// kernel that cannot run as a protected guest, which a protected one
/// must refuse to load) and their initramfs: the plain one with
/// `vmcore-dmesg`, which reads the crashed kernel's log out of
/// /proc/vmcore.
fn l2_kexec_initrd(ctx: &Ctx, k: &Kernel) -> Result<Vec<u8>> {
    let root = setup::kexec_root(&ctx.cache);
    let tool = |name: &str| -> Result<PathBuf> {
        let p = root.join("sbin").join(name);
        if !p.is_file() {
            bail!(
                "{} is missing: kexec-tools is unpacked by `cargo xtask setup`",
                p.display()
            );
        }
        Ok(p)
    };
    let with_tool = |name: &str| -> Result<Initramfs> {
        let bin = tool(name)?;
        let mut i = initramfs::busybox_base(&ctx.repo)?;
        let mut dirs = std::collections::BTreeSet::new();
        for d in ["sbin", "lib", "lib64"] {
            i.dir(d);
            dirs.insert(d.to_string());
        }
        i.copy(&format!("sbin/{name}"), 0o755, &bin)?;
        add_libraries_from(&mut i, &mut dirs, &bin, Some(&root))?;
        Ok(i)
    };
    let next = with_tool("vmcore-dmesg")?.finish();
    let mut i = with_tool("kexec")?;
    i.dir("kexec");
    i.copy("kexec/bzImage", 0o644, &k.bzimage)?;
    let image = std::fs::read(&k.bzimage)
        .with_context(|| format!("cannot read {}", k.bzimage.display()))?;
    i.file(
        "kexec/bzImage-noprotmem",
        0o644,
        &without_protmem_flag(image).with_context(|| k.bzimage.display().to_string())?,
    );
    i.file("kexec/initrd.cpio", 0o644, &next);
    Ok(i.finish())
}

/// Offset of the setup header's `xloadflags` in a bzImage (boot protocol
/// 2.12+, Documentation/arch/x86/boot.rst).
const XLOADFLAGS: usize = 0x236;
/// `XLF_KVM_PROTMEM` (arch/x86/include/uapi/asm/bootparam.h): the kernel
/// can run as a KVM protected memory guest.
const XLF_KVM_PROTMEM: u16 = 1 << 8;

/// `image` (a bzImage that has `XLF_KVM_PROTMEM`) with the bit cleared:
/// what a kernel built without `CONFIG_KVM_PROTMEM_GUEST` says.
fn without_protmem_flag(mut image: Vec<u8>) -> Result<Vec<u8>> {
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        bail!("not a bzImage: no `HdrS` setup header signature at 0x202");
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x020c || image.len() < XLOADFLAGS + 2 {
        bail!("boot protocol {version:#x} has no xloadflags (2.12+)");
    }
    let flags = u16::from_le_bytes([image[XLOADFLAGS], image[XLOADFLAGS + 1]]);
    if flags & XLF_KVM_PROTMEM == 0 {
        bail!("xloadflags {flags:#06x} lack XLF_KVM_PROTMEM: the kernel does not say it can run protected");
    }
    image[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&(flags & !XLF_KVM_PROTMEM).to_le_bytes());
    Ok(image)
}

/// Firmware QEMU needs to boot a Linux kernel with `-nodefaults -vga none`
/// (PLATFORM.md, "QEMU as the L2 VMM inside L1").
const QEMU_FIRMWARE: [&str; 4] = [
    "bios-256k.bin",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "kvmvapic.bin",
];

/// Puts Debian's QEMU (setup's choice), its libraries and the firmware it
/// loads into the initramfs under /qemu, for control runs.
fn add_qemu(
    ctx: &Ctx,
    i: &mut Initramfs,
    dirs: &mut std::collections::BTreeSet<String>,
) -> Result<()> {
    let q = Qemu::debian(&ctx.cache);
    let bin = if q.bin.is_absolute() {
        q.bin.clone()
    } else {
        PathBuf::from(
            sh::output(Command::new("sh").args(["-c", "command -v qemu-system-x86_64"]))?.trim(),
        )
    };
    i.dir("qemu").dir("qemu/share");
    i.copy("qemu/qemu-system-x86_64", 0o755, &bin)?;
    add_libraries(i, dirs, &bin)?;
    let data = q.data.unwrap_or_else(|| PathBuf::from("/usr/share/qemu"));
    for fw in QEMU_FIRMWARE {
        let found = [data.join(fw), Path::new("/usr/share/seabios").join(fw)]
            .into_iter()
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "QEMU firmware {fw} is neither in {} nor in /usr/share/seabios",
                    data.display()
                )
            })?;
        let real = std::fs::canonicalize(&found)?;
        i.copy(&format!("qemu/share/{fw}"), 0o644, &real)?;
    }
    Ok(())
}

/// The kernel L1 runs.
pub enum L1<'a> {
    /// Ours (the L2 kernel too), with the project's KVM patches built in.
    Ours,
    /// A stock distribution kernel; /init loads its KVM modules. The KVM
    /// handler test, which needs our patches, is not run there.
    Stock(&'a StockHost),
}

/// Boots L1 once and runs every L2 boot in it.
pub fn run(
    ctx: &Ctx,
    k: &Kernel,
    vmm: &Path,
    runs: &[L2Run],
    echo: bool,
    log_name: &str,
) -> Result<(Console, Vec<L2Outcome>)> {
    run_on(ctx, &L1::Ours, k, vmm, runs, echo, log_name)
}

/// Boots `l1` once and runs every L2 boot (our kernel `k`) in it.
pub fn run_on(
    ctx: &Ctx,
    l1: &L1<'_>,
    k: &Kernel,
    vmm: &Path,
    runs: &[L2Run],
    echo: bool,
    log_name: &str,
) -> Result<(Console, Vec<L2Outcome>)> {
    let work = ctx.cache.join("nested");
    std::fs::create_dir_all(&work)?;
    let l2_initrd = initramfs::busybox(&ctx.repo, &[])?;
    let script = l1_script(runs, matches!(l1, L1::Ours));

    let mut i = Initramfs::new();
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "etc", "l2", "vmm", "lib", "lib64", "l1",
    ] {
        i.dir(d);
    }
    i.chardev("dev/console", 5, 1).chardev("dev/null", 1, 3);
    i.copy("bin/busybox", 0o755, Path::new("/bin/busybox"))?;
    i.symlink("bin/sh", "busybox");
    i.copy("init", 0o755, &ctx.repo.join("tests/host/init"))?;
    i.file("l1/run.sh", 0o755, script.as_bytes());
    i.copy("vmm/protmem-vmm", 0o755, vmm)?;
    for tool in ["protmem-kvm-test", "protmem-scan"] {
        i.copy(&format!("vmm/{tool}"), 0o755, &vmm.with_file_name(tool))?;
    }
    let mut dirs = std::collections::BTreeSet::new();
    add_libraries(&mut i, &mut dirs, vmm)?;
    if runs.iter().any(|r| r.qemu) {
        add_qemu(ctx, &mut i, &mut dirs)?;
    }
    if runs.iter().any(|r| r.name == selftests::RUN) {
        selftests::add(ctx, k, &mut i);
    }
    let l1_kernel = match l1 {
        L1::Ours => k.bzimage.clone(),
        L1::Stock(h) => {
            i.dir("modules");
            for m in &h.modules {
                let name = m.file_name().unwrap_or_default().to_string_lossy();
                i.copy(&format!("modules/{name}"), 0o644, m)?;
            }
            h.vmlinuz.clone()
        }
    };
    i.copy("l2/bzImage", 0o644, &k.bzimage)?;
    i.file("l2/initrd.cpio", 0o644, &l2_initrd);
    if runs.iter().any(L2Run::kexecs) {
        i.file("l2/initrd-kexec.cpio", 0o644, &l2_kexec_initrd(ctx, k)?);
    }
    i.file("l2/disk.img", 0o644, &disk_image());
    let l1_initrd = work.join("l1.cpio");
    std::fs::write(&l1_initrd, i.finish())?;

    let mut cmd = boot::qemu_tcg(
        ctx,
        "EPYC,+svm,+npt",
        l1_cpus(),
        "3G",
        &l1_kernel,
        &l1_initrd,
        // loglevel=4: L1's errors reach the console, its warnings do not:
        // a warning (the clocksource watchdog's, under TCG) printed in the
        // middle of an L2 line used to cut it in two.
        // kvm.force_emulation_prefix: the L1 tests (protmem-kvm-test and
        // mainline's selftests) make KVM emulate chosen instructions.
        "console=ttyS0 panic=-1 kvm_amd.npt=1 kvm.force_emulation_prefix=1 kunit.enable=0 loglevel=4",
    );
    // L1's RAM is backed before L1 starts. Here L0 is itself a VM, where
    // the first touch of a page costs about 13 us (3 GiB in 10 s): left
    // to L1's first use, that cost fell on whichever L2 boot first used
    // a stretch of L1's memory (the first round of a benchmark, and the
    // boots that use the most: guest_memfd, a large disk) and made up to
    // 1.7 s of its boot time, the same phases slower throughout.
    cmd.arg("-mem-prealloc");
    let total = 60 + runs.iter().map(|r| r.timeout + 20).sum::<u64>();
    let which = match l1 {
        L1::Ours => "our kernel".to_string(),
        L1::Stock(h) => format!("stock {}", h.package),
    };
    println!(
        "nested: L1 = {which} on QEMU TCG -cpu EPYC,+svm,+npt -smp {}; {} L2 boot(s) in it (timeout {total}s)",
        l1_cpus(),
        runs.len()
    );
    // A hung L1 (or an L2 its VMM cannot stop) ends with where its CPU
    // is, after 330 silent seconds (past the VMM's own --timeout, whose
    // report comes first when L1 still runs), not at the overall timeout.
    let stall = boot::Stall {
        monitor: work.join("l1-monitor.sock"),
        system_map: match l1 {
            L1::Ours => k.build.join("System.map"),
            L1::Stock(_) => PathBuf::new(),
        },
        after: Duration::from_secs(330),
    };
    let _ = std::fs::remove_file(&stall.monitor);
    cmd.args(stall.qemu_args());
    let console = boot::run_console_watched(
        &mut cmd,
        &ctx.logs().join(log_name),
        echo,
        Duration::from_secs(total),
        Some(&stall),
    )?;
    println!(
        "nested: L1 log {} ({}s)",
        console.log.display(),
        console.elapsed.as_secs()
    );
    if console.end == End::TimedOut {
        bail!(
            "L1 did not finish within {total}s\n--- tail ---\n{}",
            console.tail(40)
        );
    }
    if !console.text.contains("kpm-l1: all runs done") {
        bail!(
            "L1 stopped before its script finished\n--- tail ---\n{}",
            console.tail(40)
        );
    }
    let mut outcomes = split_runs(&console.text, runs);
    for o in &mut outcomes {
        let at = |prefix: &str| {
            console
                .markers
                .iter()
                .find(|(_, l)| l.starts_with(prefix))
                .map(|(t, _)| *t)
        };
        let begin = at(&format!("kpm-l1: begin {}", o.name));
        let up = console
            .markers
            .iter()
            .skip_while(|(_, l)| !l.starts_with(&format!("kpm-l1: begin {}", o.name)))
            .find(|(_, l)| l.starts_with("kpm-init: userspace up"))
            .map(|(t, _)| *t);
        let exit = at(&format!("kpm-l1: exit {}", o.name));
        if let (Some(b), Some(e)) = (begin, exit) {
            o.marks = console
                .markers
                .iter()
                .filter(|(t, _)| *t >= b && *t <= e)
                .map(|(t, l)| ((*t - b).as_secs_f64(), l.clone()))
                .collect();
        }
        if let Some(b) = begin {
            o.secs_to_userspace = up
                .filter(|u| Some(*u) < exit)
                .map(|u| (u - b).as_secs_f64());
            o.secs_total = exit.map(|e| (e - b).as_secs_f64());
        }
    }
    Ok((console, outcomes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_a_kernel_message_cut_into_is_mended() {
        let o = super::L2Outcome {
            console: "kpm-init: reader cpu0 pass0 abcd[    8.601089] clocksource: Watchdog remote CPU 2 read timed out\r\n\
                      [    8.602000] another message\r\n\
                      ef01\r\n\
                      kpm-init: reader cpu1 pass0 1234 [not a stamp] x\n"
                .to_string(),
            ..Default::default()
        };
        assert_eq!(
            o.mended_lines_after("kpm-init: reader "),
            ["cpu0 pass0 abcdef01", "cpu1 pass0 1234 [not a stamp] x"]
        );
        assert_eq!(super::kernel_stamp_at("[  123.000001] x"), Some(0));
        assert_eq!(super::kernel_stamp_at("[1.5] x"), None);
    }

    use super::*;

    #[test]
    fn disk_pattern_is_known_and_pages_differ() {
        let d = disk_image();
        assert_eq!(d.len(), DISK_BYTES);
        assert_ne!(d[0..4096], d[4096..8192]);
        assert!(d[KNOWN_BYTES..].iter().all(|&b| b == 0));
        assert_eq!(known_sha256().len(), 64);
    }

    #[test]
    fn secret_needle_maps_hex_digits() {
        assert_eq!(
            secret_needle("a kpm.secret=09af b").as_deref(),
            Some("KPM-SECRET-gpqv")
        );
        assert_eq!(secret_needle("kpm.secret=xyz"), None, "not hex");
        assert_eq!(secret_needle("kpm.io"), None);
        let runs = vec![L2Run {
            name: "s".into(),
            vmm_args: vec![],
            cmdline: "kpm.secret=12".into(),
            timeout: 60,
            qemu: false,
        }];
        let script = l1_script(&runs, true);
        assert!(script.contains("--cmdline 'kpm.secret=12'  &"), "{script}");
        assert!(
            script.contains("/vmm/protmem-scan $pid 'KPM-SECRET-hi'"),
            "{script}"
        );
        assert!(
            script.contains("wait $pid\necho \"kpm-l1: exit s $?\""),
            "{script}"
        );
        assert!(!script.contains("--hostile"), "{script}");
        // A hostile run: the VMM gets the needle and the done file, and is
        // signalled between the guest's ready block and the scan.
        let runs = vec![L2Run {
            name: "h".into(),
            vmm_args: vec![],
            cmdline: "kpm.secret=12 kpm.hostile".into(),
            timeout: 60,
            qemu: false,
        }];
        let script = l1_script(&runs, false);
        assert!(
            script.contains(
                "--hostile /tmp/h.hostile-done --hostile-needle 4b504d2d5345435245542d6869 &"
            ),
            "{script}"
        );
        let (kill, scan) = (
            script.find("kill -USR1 $pid").unwrap(),
            script.find("/vmm/protmem-scan $pid").unwrap(),
        );
        assert!(
            script.find("kpm-scan-ready").unwrap() < kill && kill < scan,
            "{script}"
        );
    }

    #[test]
    fn script_and_split_round_trip() {
        let runs = vec![L2Run {
            name: "a".into(),
            vmm_args: vec!["--protect".into()],
            cmdline: "x 'y'".into(),
            timeout: 60,
            qemu: false,
        }];
        let s = l1_script(&runs, true);
        assert!(s.contains("--protect"));
        assert!(s.contains("'x '\\''y'\\'''"));
        let log = "noise\nkpm-l1: begin a\n[ 1.0] kvm_protmem: enabled\nkpm-l1: exit a 0\n\
                   kpm-l1: stats a {\"x\":1}\nkpm-l1: disk-copy a abc  -\nkpm-l1: end a\n";
        let o = split_runs(log, &runs);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].exit, Some(0));
        assert_eq!(o[0].stats.as_deref(), Some("{\"x\":1}"));
        assert_eq!(o[0].disk_copy_sha.as_deref(), Some("abc"));
        assert_eq!(
            o[0].lines_after("kvm_protmem: ").collect::<Vec<_>>(),
            ["enabled"]
        );
    }

    #[test]
    fn the_protmem_flag_is_cleared_and_nothing_else() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&0x017fu16.to_le_bytes());
        let out = without_protmem_flag(img.clone()).unwrap();
        assert_eq!(
            u16::from_le_bytes([out[XLOADFLAGS], out[XLOADFLAGS + 1]]),
            0x007f
        );
        let diff = img.iter().zip(&out).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 1, "only the flag's byte changes");
        // A kernel that does not set the bit, or no bzImage: refused.
        assert!(without_protmem_flag(out).is_err());
        assert!(without_protmem_flag(vec![0u8; 0x400]).is_err());
        let mut old = img;
        old[0x206..0x208].copy_from_slice(&0x020bu16.to_le_bytes());
        assert!(without_protmem_flag(old).is_err());
    }

    #[test]
    fn missing_run_is_reported_empty() {
        let runs = vec![L2Run {
            name: "b".into(),
            vmm_args: vec![],
            cmdline: String::new(),
            timeout: 60,
            qemu: false,
        }];
        let o = split_runs("kpm-l1: begin b\npartial\n", &runs);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].exit, None);
        assert!(o[0].console.contains("partial"));
    }
}
