//! The KVM shell: builds the VM from the command line and runs it.
//!
//! Everything here is a thin layer over kvm-ioctls, in the order the KVM API
//! requires (irqchip before vCPUs, CPUID before the first KVM_RUN); every
//! decision is taken by [`Machine::handle_exit`] and the modules it uses,
//! which are tested without KVM. This file needs a real `/dev/kvm` and is
//! exercised only by booting a guest.
//!
//! A reboot (`--reboots`) restarts the machine in place, in this order:
//! 1. a vCPU's exit handler returns [`Action::Reboot`]; its thread reports
//!    it and ends;
//! 2. the main thread stops every other vCPU thread ([`kick`]: stop flag,
//!    `SIGRTMIN` and `immediate_exit`) and joins them all, so no vCPU is in
//!    KVM_RUN and every vCPU fd is closed;
//! 3. [`Machine::settle`] lets a panic or error reported meanwhile win;
//! 4. the old VM fd is closed (KVM destroys the VM: vCPUs, irqchip, PIT,
//!    irqfds, memslot);
//! 5. guest RAM is cleared ([`ram::clear`]) while the old kernel's private
//!    pages are still closed to devices, then [`Machine::reset`] puts the
//!    devices and protection back to power-on (device view RW again);
//! 6. the kernel, initrd, zero page, page tables, MP table and ACPI tables
//!    are loaded as at first boot, and a new VM is built exactly as the
//!    first one (same memfd mapping as memslot 0, same irq eventfds, vCPUs
//!    with fresh CPUID, LAPIC LINTs and boot registers), and its vCPU
//!    threads start.
//!
//! A fresh KVM VM rather than re-initialised vCPUs guarantees that no state
//! of the old kernel survives in KVM: MSRs (kvm-clock, steal time, async PF
//! and PV EOI areas that KVM would keep writing into guest RAM), LAPIC and
//! I/O APIC, PIT, pending events, AP wait-for-SIPI states.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_EXIT_HYPERCALL,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError};
use crate::cli::{BlkIo, Cli, ProtectMode};
use crate::cpuid::{self, CpuidConfig};
use crate::devices::bus::{BusError, MmioBus};
use crate::devices::event_loop::{EventLoop, EventLoopError};
use crate::devices::probe::{ProbeDevice, PROBE_BASE, PROBE_SIZE};
use crate::devices::serial::{ConsoleSink, SerialPort, COM1_IRQ};
use crate::devices::virtio::blk::{Block, BlockError};
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::{EntropySource, Rng, RngError, URANDOM};
use crate::devices::virtio::{
    slot_addr, slot_irq, MmioTransport, Notify, VirtioDevice, VirtioError, MMIO_SIZE,
};
use crate::diag;
use crate::exit::{locked, Action, Boots, Exit, Machine, StopReason, VcpuExitState};
use crate::gmem::Gmem;
use crate::gmem_kvm::{self, HostError, KvmPrivate};
use crate::hostile::{Hostile, HostileError};
use crate::hypercalls::{self, FailKnobs, HypercallError, HypercallHandler};
use crate::kick::{self, KickError, VcpuThreads};
use crate::kvm_stats;
use crate::mptable::{self, MptableError};
use crate::protection::{Protection, ProtectionError};
use crate::ram::{self, GuestRam, RamError};
use crate::stats::Stats;

/// Three pages below 4 GiB that KVM needs for the TSS on Intel (harmless on
/// AMD); outside RAM and the MMIO windows used here.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// How long a panicking guest may keep printing before the VM is stopped.
const PANIC_GRACE: Duration = Duration::from_secs(5);
/// How often the main thread checks the timeout and panic grace.
const TICK: Duration = Duration::from_millis(100);
/// How long the exit waits for the console's writer to catch up.
const CONSOLE_FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How long the vCPU threads of a rebooting VM may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Opening an input or output file failed.
    #[error("opening {what} {path}: {err}")]
    Open {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: {err}")]
    Kvm {
        /// The operation.
        op: String,
        /// kvm-ioctls' error.
        err: kvm_ioctls::Error,
    },
    /// Building the CPUID table failed.
    #[error("building the CPUID table for vCPU {id} failed: {msg}")]
    Cpuid {
        /// vCPU id.
        id: u8,
        /// The error, printed.
        msg: String,
    },
    /// Creating an interrupt eventfd failed.
    #[error("creating the eventfd for IRQ {irq} failed: {err}")]
    EventFd {
        /// The IRQ.
        irq: u32,
        /// The OS error.
        err: io::Error,
    },
    /// Starting the console's writer thread failed.
    #[error("starting the console writer thread: {0}")]
    Console(io::Error),
    /// Starting the device event loop failed.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// Placing a device on the bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Setting up a virtio transport failed.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// Spawning a vCPU thread failed.
    #[error("spawning the thread of vCPU {id} failed: {err}")]
    Thread {
        /// vCPU id.
        id: u8,
        /// The OS error.
        err: io::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Boot setup.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Protected-memory capability.
    #[error(transparent)]
    Hypercall(#[from] HypercallError),
    /// Setting up --hostile failed.
    #[error(transparent)]
    Hostile(#[from] HostileError),
    /// Disk.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// Entropy source.
    #[error(transparent)]
    Rng(#[from] RngError),
    /// Network backend.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Rewinding the kernel or initrd to load it again for a reboot failed.
    #[error("rewinding {what} {path} to load it for boot {boot}: {err}")]
    Rewind {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The boot it was loaded for.
        boot: u64,
        /// The OS error.
        err: io::Error,
    },
    /// Resetting protection for a reboot failed.
    #[error("resetting protection for the reboot after boot {boot}: {err}")]
    Reset {
        /// The boot that ended.
        boot: u64,
        /// The mprotect error.
        err: ProtectionError,
    },
    /// Stopping the vCPU threads for a reboot failed.
    #[error(transparent)]
    Kick(#[from] KickError),
    /// `--protect=gmem` on a host that lacks what it needs.
    #[error(transparent)]
    GmemHost(#[from] HostError),
    /// Duplicating the guest RAM memfd for the guest_memfd side failed.
    #[error("duplicating the guest RAM memfd for --protect=gmem: {0}")]
    GmemDup(io::Error),
}

fn kvm_err(op: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    let op = op.into();
    move |err| VmmError::Kvm { op, err }
}

fn open(what: &'static str, path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|err| VmmError::Open {
        what,
        path: path.display().to_string(),
        err,
    })
}

/// An interrupt line: an eventfd registered as an irqfd with each VM the
/// run creates (one per boot). Clones share the eventfd.
#[derive(Clone)]
pub struct IrqEvent(Arc<EventFd>);

impl IrqEvent {
    fn new(gsi: u32) -> Result<Self, VmmError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|err| VmmError::EventFd { irq: gsi, err })?;
        Ok(IrqEvent(Arc::new(evt)))
    }
}

impl Trigger for IrqEvent {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The machine as the vCPU threads and the I/O thread share it.
type SharedMachine = Arc<Machine<IrqEvent>>;

/// How the run ended.
pub struct Outcome {
    /// Why the VM stopped.
    pub reason: StopReason,
    /// Counters at that moment.
    pub stats: Stats,
}

/// What every boot of the run is built from.
struct Setup<'a> {
    cli: &'a Cli,
    kvm: Kvm,
    supported: CpuId,
    /// The KVM view of guest RAM: memslot 0 of every VM, where boots load.
    ram: &'static GuestMemoryMmap,
    kernel: File,
    initrd: Option<(File, u64)>,
    cmdline: Cmdline,
    /// `(window, GSI)` of each virtio device, for the DSDT.
    virtio: Vec<(u64, u32)>,
    /// GSI and eventfd of each interrupt line.
    irqs: Vec<(u32, IrqEvent)>,
    /// The queue notifications KVM signals on eventfds: (GPA, value, eventfd).
    ioevents: Vec<(u64, u32, Arc<EventFd>)>,
    /// Whether the TSC-rate note went to stderr already (once per run).
    tsc_note_printed: std::cell::Cell<bool>,
}

impl Setup<'_> {
    /// Loads the kernel, initrd, command line, zero page, page tables, GDT,
    /// MP table and ACPI tables into RAM, the same for every boot; returns
    /// the entry.
    fn load(&mut self, boot: u64) -> Result<u64, VmmError> {
        let rewind = |what, path: &Path, file: &mut File| {
            file.rewind().map_err(|err| VmmError::Rewind {
                what,
                path: path.to_path_buf(),
                boot,
                err,
            })
        };
        rewind("kernel", &self.cli.kernel, &mut self.kernel)?;
        if let (Some((f, _)), Some(path)) = (self.initrd.as_mut(), self.cli.initrd.as_deref()) {
            rewind("initrd", path, f)?;
        }
        let initrd = self.initrd.as_mut().map(|(f, len)| (f, *len));
        let info = boot::load(
            self.ram,
            self.cli.mem,
            &mut self.kernel,
            initrd,
            &self.cmdline,
        )?;
        mptable::write(self.ram, self.cli.cpus)?;
        acpi::write(self.ram, self.cli.cpus, &self.virtio)?;
        Ok(info.entry)
    }

    /// Creates a KVM VM over guest RAM and the interrupt lines, with its
    /// vCPUs set up to enter the kernel at `entry`; with `--protect=gmem`
    /// a software-protected VM whose memslot has a guest_memfd, returned
    /// as the [`Gmem`] to attach to the machine's protection.
    fn create_vm(&self, entry: u64) -> Result<NewVm, VmmError> {
        let cli = self.cli;
        let gmem_mode = cli.protect == Some(ProtectMode::Gmem);
        let vm = if gmem_mode {
            self.kvm
                .create_vm_with_type(gmem_kvm::VM_TYPE)
                .map_err(kvm_err("KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)"))?
        } else {
            self.kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?
        };
        let vm = Arc::new(vm);
        if gmem_mode {
            // KVM applies the protected-memory hypercalls and keeps the
            // guest's state from us; it must be enabled before any vCPU.
            gmem_kvm::enable_protected_memory(&vm)?;
        } else if cli.protect.is_some() {
            let offered = vm.check_extension_int(Cap::ExitHypercall).max(0) as u64;
            let mask = hypercalls::exit_hypercall_mask(offered)?;
            let cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_HYPERCALL,
                args: [mask, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(kvm_err(format!(
                "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, {mask:#x})"
            )))?;
        }
        if cli.protect.is_some() {
            disable_hypercall_patching(&vm)?;
        }
        pin_tsc_khz(&vm, self.tsc_note_printed.get());
        self.tsc_note_printed.set(true);
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config::default())
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let host = self
            .ram
            .get_host_address(GuestAddress(0))
            .map_err(|_| RamError::BadSize(cli.mem))?;
        let mut gmem_fd = None;
        let gmem = if gmem_mode {
            // SAFETY: as below: the KVM view is leaked by `run`.
            let gmem = unsafe { gmem_kvm::add_gmem_slot(&vm, cli.mem, host as u64) }?;
            if cli.hostile.is_some() {
                gmem_fd = Some(gmem.try_clone().map_err(VmmError::GmemDup)?);
            }
            let shared = self.memfd().map_err(VmmError::GmemDup)?;
            let private = KvmPrivate::new(vm.clone(), gmem, host as u64);
            Some(Gmem::new(Box::new(private), shared))
        } else {
            let region = kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: cli.mem,
                userspace_addr: host as u64,
            };
            // The guest may write it at any time; the VMM only reaches it
            // through vm-memory's volatile accessors, never through
            // references.
            // SAFETY: `host .. host + cli.mem` is the KVM view's mapping of
            // the memfd, leaked by `run`, so it stays mapped as long as any VM.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            None
        };
        for (gsi, evt) in &self.irqs {
            vm.register_irqfd(&evt.0, *gsi)
                .map_err(kvm_err(format!("KVM_IRQFD for IRQ {gsi}")))?;
        }
        for (addr, datamatch, evt) in &self.ioevents {
            // The driver writes the queue index (u32) to QueueNotify; other
            // values still exit.
            vm.register_ioevent(evt, &IoEventAddress::Mmio(*addr), *datamatch)
                .map_err(kvm_err(format!(
                    "KVM_IOEVENTFD at {addr:#x} (value {datamatch})"
                )))?;
        }

        let mut vcpus = Vec::new();
        for id in 0..cli.cpus {
            vcpus.push(create_vcpu(&vm, &self.supported, id, cli, entry)?);
        }
        Ok(NewVm {
            vm,
            vcpus,
            gmem,
            gmem_fd,
        })
    }

    /// A new descriptor of the guest RAM memfd.
    fn memfd(&self) -> io::Result<File> {
        let region = self.ram.iter().next();
        let fo = region.and_then(|r| r.file_offset());
        fo.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?
            .file()
            .try_clone()
    }

    /// Steps 4-6 of the reboot sequence (module docs): `vm` must be the old
    /// VM with every vCPU thread joined.
    fn reboot(
        &mut self,
        vm: Arc<VmFd>,
        machine: &SharedMachine,
        why: &StopReason,
    ) -> Result<NewVm, VmmError> {
        // The guest_memfd side holds the old VM too: drop both, so KVM
        // destroys the VM and frees its guest_memfd (private pages).
        drop(machine.prot_mut().detach_gmem());
        drop(vm);
        // The event loop may still hold a notification of the old guest:
        // with the queues reset it finds nothing to do in RAM being cleared.
        machine.quiesce();
        ram::clear(self.ram)?;
        let ended = locked(&machine.boots).current();
        machine
            .reset(why)
            .map_err(|err| VmmError::Reset { boot: ended, err })?;
        let boot = ended + 1;
        eprintln!(
            "protmem-vmm: guest {} ended boot {}; booting again (boot {boot})",
            why.name(),
            boot - 1
        );
        let entry = self.load(boot)?;
        self.create_vm(entry)
    }
}

/// Turns off KVM's rewriting of a guest hypercall instruction of the other
/// vendor (`vmcall` on AMD, `vmmcall` on Intel) in guest memory
/// (`KVM_X86_QUIRK_FIX_HYPERCALL_INSN`): the host must not write a protected
/// guest's code. The guest gets #UD instead; ours issues the right one.
fn disable_hypercall_patching(vm: &VmFd) -> Result<(), VmmError> {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
        args: [
            u64::from(kvm_bindings::KVM_X86_QUIRK_FIX_HYPERCALL_INSN),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(kvm_err(
        "KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_FIX_HYPERCALL_INSN)",
    ))
}

/// `KVM_SET_TSC_KHZ` and `KVM_GET_TSC_KHZ` (`_IO(KVMIO, 0xa2/0xa3)`); on
/// a VM fd (Linux 6.0+) they set and read the vCPUs' default TSC rate.
const KVM_SET_TSC_KHZ: libc::c_ulong = 0xaea2;
const KVM_GET_TSC_KHZ: libc::c_ulong = 0xaea3;

/// Pins the guest TSC rate of `vm` to the host's current TSC rate, before
/// any vCPU exists.
///
/// KVM takes the default from `max_tsc_khz`, which it captures when it is
/// initialised; on a host whose CPU lacks a constant TSC (a nested host, a
/// TCG CPU model) that happens before the kernel's refined TSC calibration,
/// so the default can be far from the rate the TSC really runs at. Without
/// TSC scaling KVM then keeps the stale rate for the vCPUs ("kvm: user
/// requested TSC rate below hardware speed") and converts every TSC
/// deadline the guest arms into nanoseconds with it: each timer fires late
/// by the ratio, and a guest that sleeps may not wake for minutes. Rate 0
/// asks KVM for the host's `tsc_khz` as it is now. Hosts without the VM
/// ioctl keep KVM's default.
fn pin_tsc_khz(vm: &VmFd, quiet: bool) {
    // SAFETY: KVM_GET_TSC_KHZ and KVM_SET_TSC_KHZ on a VM fd take an
    // integer argument and touch no memory of ours.
    let before = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_GET_TSC_KHZ) };
    // SAFETY: as above.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_val(vm, KVM_SET_TSC_KHZ, 0) };
    if rc != 0 {
        return;
    }
    // SAFETY: as above.
    let after = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_GET_TSC_KHZ) };
    if !quiet && before > 0 && after > 0 && before != after {
        eprintln!(
            "protmem-vmm: KVM's default guest TSC rate was {before} kHz, the host TSC runs at \
             {after} kHz: guest TSC rate pinned to {after} kHz"
        );
    }
}

/// A VM just created: its fd, vCPUs and, in gmem mode, its private side.
struct NewVm {
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    gmem: Option<Gmem>,
    /// Another descriptor of the guest_memfd, for --hostile's attempts.
    gmem_fd: Option<File>,
}

/// The devices of the machine, and what KVM and the kernel command line
/// need to know of them.
#[derive(Default)]
struct Devices {
    bus: MmioBus,
    /// GSI and eventfd (registered as an irqfd) of each device's line.
    irqs: Vec<(u32, IrqEvent)>,
    /// `(window, GSI)` of each virtio device, for the DSDT.
    virtio: Vec<(u64, u32)>,
}

impl Devices {
    /// Puts virtio `device` in slot `slot` (its window and IRQ follow from
    /// it), reaching guest memory through `prot`.
    fn add_virtio<D: VirtioDevice + 'static>(
        &mut self,
        slot: u32,
        device: D,
        notify: Notify,
        prot: &Arc<RwLock<Protection>>,
    ) -> Result<(), VmmError> {
        let (base, irq) = (slot_addr(slot.into()), slot_irq(slot));
        let evt = IrqEvent::new(irq)?;
        let t = MmioTransport::new(device, evt.clone(), prot.clone()).with_notify(notify)?;
        self.bus.insert(base, MMIO_SIZE, Arc::new(Mutex::new(t)))?;
        self.irqs.push((irq, evt));
        self.virtio.push((base, irq));
        Ok(())
    }
}

/// The bus registration: every device of the machine, at its address.
/// Devices that reach guest memory get `prot`, the checked device view.
fn register_devices(cli: &Cli, prot: &Arc<RwLock<Protection>>) -> Result<Devices, VmmError> {
    let mut d = Devices::default();
    if let Some(path) = &cli.disk {
        let notify = match cli.blk_io {
            BlkIo::Thread => Notify::IoEventFd,
            BlkIo::Vcpu => Notify::Vcpu,
        };
        d.add_virtio(0, Block::open(path)?, notify, prot)?;
    }
    if cli.rng {
        let f = File::open(URANDOM).map_err(|err| RngError::Open { path: URANDOM, err })?;
        let rng = Rng::new(Box::new(f) as EntropySource);
        d.add_virtio(1, rng, Notify::IoEventFd, prot)?;
    }
    if let Some(net) = &cli.net {
        let tap = Tap::open(&net.tap)?;
        d.add_virtio(2, Net::new(tap, net.mac), Notify::IoEventFd, prot)?;
    }
    let probe = ProbeDevice::new(prot.clone());
    d.bus
        .insert(PROBE_BASE, PROBE_SIZE, Arc::new(Mutex::new(probe)))?;
    Ok(d)
}

/// Builds the VM described by `cli`, runs it until it stops, and returns why.
///
/// Errors before the first boot runs are returned; anything failing later
/// (a reboot included) stops the VM with [`StopReason::Error`] and keeps
/// the stats.
pub fn run(cli: &Cli) -> Result<Outcome, VmmError> {
    // Inputs first: a typo fails before anything touches KVM.
    let kernel = open("kernel", &cli.kernel)?;
    let initrd = match &cli.initrd {
        Some(p) => {
            let f = open("initrd", p)?;
            let len = f.metadata().map_err(|err| VmmError::Open {
                what: "initrd",
                path: p.display().to_string(),
                err,
            })?;
            Some((f, len.len()))
        }
        None => None,
    };
    let out: Box<dyn Write + Send> = match &cli.serial_log {
        Some(p) => Box::new(File::create(p).map_err(|err| VmmError::Open {
            what: "serial log",
            path: p.display().to_string(),
            err,
        })?),
        None => Box::new(io::stdout()),
    };
    let console = ConsoleSink::spawn(out).map_err(VmmError::Console)?;

    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    if cli.protect == Some(ProtectMode::Gmem) {
        gmem_kvm::check_host(&kvm)?;
    }
    kick::install()?;
    let (kvm_view, device_view) = GuestRam::new(cli.mem)?.into_views();
    // Every VM's memslot points at this mapping for the rest of the process:
    // leak it so that nothing can unmap it while a vCPU may still run.
    let kvm_view: &'static GuestMemoryMmap = Box::leak(Box::new(kvm_view));

    // Devices reach RAM through the device view only (the checked
    // accessor); with gmem, the private side is attached to it below.
    let prot = Arc::new(RwLock::new(Protection::new(device_view)));
    let devices = register_devices(cli, &prot)?;
    let cmdline = boot::build_cmdline(&cli.cmdline)?;
    let serial_irq = IrqEvent::new(COM1_IRQ)?;
    let mut irqs = vec![(COM1_IRQ, serial_irq.clone())];
    irqs.extend(devices.irqs.iter().cloned());
    let ioevents = devices
        .bus
        .iter()
        .flat_map(|e| {
            let io = locked(&e.device).ioevents();
            io.into_iter()
                .map(|io| (e.base + io.offset, io.datamatch, io.evt))
        })
        .collect();

    let mut setup = Setup {
        cli,
        kvm,
        supported,
        ram: kvm_view,
        kernel,
        initrd,
        cmdline,
        virtio: devices.virtio.clone(),
        irqs,
        ioevents,
        tsc_note_printed: Default::default(),
    };
    let entry = setup.load(1)?;
    let NewVm {
        vm,
        vcpus,
        gmem,
        gmem_fd,
    } = setup.create_vm(entry)?;

    if let Some(g) = gmem {
        prot.write()
            .unwrap_or_else(PoisonError::into_inner)
            .attach_gmem(g);
    }
    let hypercalls = HypercallHandler::new(FailKnobs {
        enable: cli.fail_enable,
        share: cli.fail_share.unwrap_or_default(),
        unshare: cli.fail_unshare.unwrap_or_default(),
        lie: cli.hostile.is_some(),
    });
    let hostile = match &cli.hostile {
        Some(done) => Some(Arc::new(Hostile::new(
            done.clone(),
            cli.hostile_needle.clone(),
            setup.memfd().map_err(VmmError::GmemDup)?,
            cli.protect == Some(ProtectMode::Gmem),
            usize::from(cli.cpus),
        )?)),
        None => None,
    };
    // The VMM's own mapping of all guest RAM (the memslot's), for --hostile.
    let ram_mapping = [(
        setup
            .ram
            .get_host_address(GuestAddress(0))
            .map_err(|_| RamError::BadSize(cli.mem))? as u64,
        cli.mem,
    )];
    let machine: SharedMachine = Arc::new(Machine::new(
        SerialPort::new(serial_irq, console),
        devices.bus,
        prot,
        hypercalls,
        Boots::new(cli.reboots),
    ));

    // One channel for the run: vCPU threads and the device event loop
    // report the action that ends a boot.
    let (tx, rx) = mpsc::channel();
    let events = tx.clone();
    let _event_loop = EventLoop::spawn(&machine.bus, move |e| {
        // The receiver only goes away when the VMM is exiting anyway.
        let _ = events.send(Action::Stop(StopReason::Error(format!(
            "device event loop: {e}"
        ))));
    })?;
    let start = Instant::now();
    let deadline = cli.timeout.map(|s| start + Duration::from_secs(s));
    let mut panic_since = None;
    let mut kvm_counters = kvm_stats::Watch::default();
    kvm_counters.start(&*vm, &vcpus);
    let mut threads = start_vcpus(vcpus, &machine, &tx, &hostile)?;
    let mut vm = vm;
    let mut gmem_fd = gmem_fd;
    let reason = loop {
        let mut tick = |t: &VcpuThreads| {
            if let Some(h) = &hostile {
                h.poll(&vm, gmem_fd.as_ref(), &ram_mapping, || t.kick());
            }
        };
        let first = wait_for_end(
            &rx,
            &threads,
            &machine,
            deadline,
            &mut panic_since,
            &mut tick,
        );
        if first == Action::Stop(StopReason::Timeout) {
            report_hang(&vm, &machine, threads);
            break StopReason::Timeout;
        }
        let Action::Reboot(_) = first else {
            // A final stop: the process exits with the vCPUs as they are.
            break stop_reason(first);
        };
        // Every vCPU thread returns from KVM_RUN and ends before anything
        // is reset.
        if let Err(e) = threads.stop(STOP_TIMEOUT) {
            break StopReason::Error(VmmError::from(e).to_string());
        }
        let later: Vec<Action> = rx.try_iter().collect();
        let settled = machine.settle(first, later);
        let Action::Reboot(why) = settled else {
            break stop_reason(settled);
        };
        kvm_counters.harvest();
        let next = setup.reboot(vm, &machine, &why).and_then(|new| {
            if let Some(g) = new.gmem {
                machine.prot_mut().attach_gmem(g);
            }
            kvm_counters.start(&*new.vm, &new.vcpus);
            Ok((
                new.vm,
                new.gmem_fd,
                start_vcpus(new.vcpus, &machine, &tx, &hostile)?,
            ))
        });
        match next {
            Ok((new_vm, fd, t)) => (vm, gmem_fd, threads) = (new_vm, fd, t),
            Err(e) => break StopReason::Error(e.to_string()),
        }
    };
    // The console's writer may be stuck on a stalled stdout: wait for it
    // a little, never for good.
    let sink = locked(&machine.serial).console().sink().clone();
    if !sink.flush(CONSOLE_FLUSH_WAIT) {
        eprintln!(
            "protmem-vmm: the console output did not take the last {} bytes within {CONSOLE_FLUSH_WAIT:?}",
            sink.backlog()
        );
    }
    let blk_io = cli.disk.as_ref().map(|_| cli.blk_io);
    let mut stats = Stats::collect(&machine, &reason, cli.protect, blk_io);
    kvm_counters.harvest();
    stats.kvm = kvm_counters.totals();
    stats.hostile = hostile.map(|h| h.attempts());
    Ok(Outcome { reason, stats })
}

/// Set on `--timeout`: each vCPU thread prints its state as it stops.
static DUMP_ON_STOP: AtomicBool = AtomicBool::new(false);
/// How long the hang report waits for a device or the protection lock.
const REPORT_LOCK_WAIT: Duration = Duration::from_secs(2);

/// On `--timeout`: prints the I/O APIC, every virtqueue and every vCPU
/// (which the kick takes out of KVM_RUN) to stderr, one line each.
fn report_hang(vm: &VmFd, machine: &SharedMachine, threads: VcpuThreads) {
    eprintln!("protmem-vmm: timeout: state of the guest");
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    match vm.get_irqchip(&mut chip) {
        Ok(()) => {
            // SAFETY: KVM filled the I/O APIC member of the union, as
            // chip_id asked; every bit pattern is a valid u64.
            let io = unsafe { chip.chip.ioapic };
            // SAFETY: as above, the entries are plain 64-bit words.
            let redir: Vec<u64> = io.redirtbl.iter().map(|e| unsafe { e.bits }).collect();
            eprintln!("protmem-vmm: {}", diag::ioapic_line(&redir, io.irr));
        }
        Err(e) => eprintln!("protmem-vmm: KVM_GET_IRQCHIP(IOAPIC): {e}"),
    }
    // A thread stuck in a device holds that device's lock: the bus says
    // so instead of waiting for it.
    for line in machine.bus.hang_lines(REPORT_LOCK_WAIT) {
        eprintln!("protmem-vmm: {line}");
    }
    DUMP_ON_STOP.store(true, Ordering::SeqCst);
    if let Err(e) = threads.stop(STOP_TIMEOUT) {
        eprintln!("protmem-vmm: {e}");
    }
}

/// Prints vCPU `id`'s registers, local APIC and TSC deadline (hang report);
/// for a guest whose state KVM keeps from us, what we cannot see.
fn dump_vcpu(id: u8, vcpu: &VcpuFd) {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    let mp = vcpu.get_mp_state().map(|m| m.mp_state).unwrap_or(u32::MAX);
    let regs = match vcpu.get_regs() {
        Ok(r) => (r.rip, r.rflags),
        Err(e) if e.errno() == libc::EPERM => {
            eprintln!("protmem-vmm: {}", diag::vcpu_locked_line(id, mp));
            return;
        }
        Err(_) => (0, 0),
    };
    let lapic: Vec<u8> = vcpu
        .get_lapic()
        .map(|l| l.regs.iter().map(|b| *b as u8).collect())
        .unwrap_or_default();
    let mut msrs = kvm_bindings::Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        },
    ])
    .ok();
    let (deadline, tsc) = match msrs.as_mut().map(|m| (vcpu.get_msrs(m), m)) {
        Some((Ok(2), m)) => (m.as_slice()[0].data, m.as_slice()[1].data),
        _ => (0, 0),
    };
    eprintln!(
        "protmem-vmm: {}",
        diag::vcpu_line(id, regs.0, regs.1, mp, &lapic, deadline, tsc)
    );
}

/// The stop reason of an action that ended a boot.
fn stop_reason(action: Action) -> StopReason {
    match action {
        Action::Stop(reason) => reason,
        other => StopReason::Error(format!("boot ended with {other:?}")),
    }
}

/// Starts one thread per vCPU; they report the action that ends the boot.
fn start_vcpus(
    vcpus: Vec<VcpuFd>,
    machine: &SharedMachine,
    tx: &Sender<Action>,
    hostile: &Option<Arc<Hostile>>,
) -> Result<VcpuThreads, VmmError> {
    let mut threads = VcpuThreads::new();
    for (id, vcpu) in (0u8..).zip(vcpus) {
        let (m, tx, stop) = (machine.clone(), tx.clone(), threads.stop_flag());
        let hostile = hostile.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(id, vcpu, m, tx, stop, hostile))
            .map_err(|err| VmmError::Thread { id, err })?;
        threads.push(id, handle);
    }
    Ok(threads)
}

/// Waits until a vCPU ends the boot, `--timeout` passes or a panicking
/// guest has had its grace time; returns a [`Action::Reboot`] or a
/// [`Action::Stop`].
fn wait_for_end(
    rx: &Receiver<Action>,
    threads: &VcpuThreads,
    machine: &SharedMachine,
    deadline: Option<Instant>,
    panic_since: &mut Option<Instant>,
    tick: &mut dyn FnMut(&VcpuThreads),
) -> Action {
    loop {
        match rx.recv_timeout(TICK) {
            Ok(action) => return action,
            Err(RecvTimeoutError::Disconnected) => {
                return Action::Stop(StopReason::Error("every vCPU thread ended".into()))
            }
            Err(RecvTimeoutError::Timeout) => tick(threads),
        }
        if threads.all_ended() {
            // A thread reports before it ends; look once more for it.
            return rx.try_recv().unwrap_or_else(|_| {
                Action::Stop(StopReason::Error(
                    "every vCPU thread ended without a reason (a thread panicked?)".into(),
                ))
            });
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Action::Stop(StopReason::Timeout);
        }
        // A panic that a crash kernel took over (kdump) is over: its grace
        // starts again at the next one.
        if !machine.panicking() {
            *panic_since = None;
        } else if now - *panic_since.get_or_insert(now) >= PANIC_GRACE {
            return Action::Stop(StopReason::Panic);
        }
    }
}

/// Creates vCPU `id`: CPUID, LAPIC LINT wiring, and for the boot CPU the
/// 64-bit entry state. Application processors wait for INIT/SIPI in the
/// in-kernel LAPIC.
fn create_vcpu(
    vm: &VmFd,
    supported: &CpuId,
    id: u8,
    cli: &Cli,
    entry: u64,
) -> Result<VcpuFd, VmmError> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(kvm_err(format!("KVM_CREATE_VCPU {id}")))?;
    let cfg = CpuidConfig {
        vcpu_id: u32::from(id),
        nr_vcpus: u32::from(cli.cpus),
        protect: cli.protect.is_some(),
        tsc_deadline: vm.check_extension(Cap::TscDeadlineTimer),
        // The rate `pin_tsc_khz` set for the VM; 0 (unknown) if KVM cannot say.
        tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
    };
    let entries = cpuid::patch(supported.as_slice(), cfg);
    let table = CpuId::from_entries(&entries).map_err(|e| VmmError::Cpuid {
        id,
        msg: format!("{e:?}"),
    })?;
    vcpu.set_cpuid2(&table)
        .map_err(kvm_err(format!("KVM_SET_CPUID2 on vCPU {id}")))?;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(kvm_err(format!("KVM_GET_LAPIC on vCPU {id}")))?;
    boot::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(format!("KVM_SET_LAPIC on vCPU {id}")))?;
    if id == 0 {
        vcpu.set_regs(&boot::regs(entry))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot::sregs(sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&boot::fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
    }
    Ok(vcpu)
}

/// Converts a kvm-ioctls exit into the dispatcher's [`Exit`]; `io_size` is
/// the element size of a port I/O exit (kvm-ioctls passes on only the
/// bytes of all `rep` elements together).
fn convert(exit: VcpuExit<'_>, io_size: usize) -> Exit<'_> {
    match exit {
        VcpuExit::IoIn(port, data) => Exit::IoIn {
            port,
            size: io_size,
            data,
        },
        VcpuExit::IoOut(port, data) => Exit::IoOut {
            port,
            size: io_size,
            data,
        },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
        VcpuExit::Hypercall(h) => Exit::Hypercall {
            nr: h.nr,
            args: h.args,
            // kvm-ioctls reads the flags word's low half as `longmode`.
            applied: u64::from(h.longmode) & gmem_kvm::KVM_EXIT_HYPERCALL_APPLIED != 0,
            ret: h.ret,
        },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
        VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
        VcpuExit::InternalError => Exit::InternalError,
        VcpuExit::MemoryFault { flags, gpa, size } => Exit::MemoryFault { flags, gpa, size },
        other => Exit::Other(format!("{other:?}")),
    }
}

/// What [`map_ahead`] did: bytes mapped, microseconds (host clock), and
/// whether it got through every range; `refused` names the range KVM
/// refused and why.
struct MapAhead {
    bytes: u64,
    us: u64,
    complete: bool,
    refused: Option<(u64, u64, std::io::Error)>,
}

/// `KVM_PRE_FAULT_MEMORY` of each range (GPA, length) on `vcpu`, in
/// order, until one is refused or a signal cuts it short.
fn map_ahead(vcpu: &VcpuFd, ranges: &[(u64, u64)]) -> MapAhead {
    let started = std::time::Instant::now();
    let mut done = MapAhead {
        bytes: 0,
        us: 0,
        complete: true,
        refused: None,
    };
    for &(gpa, len) in ranges {
        match gmem_kvm::pre_fault(vcpu, gpa, len) {
            Ok(gmem_kvm::PreFault::Done) => done.bytes += len,
            Ok(gmem_kvm::PreFault::Interrupted) => {
                done.complete = false;
                break;
            }
            Err(e) => {
                done.complete = false;
                done.refused = Some((gpa, len, e));
                break;
            }
        }
    }
    done.us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    done
}

/// Maps what this vCPU's ENABLE just populated (`ranges`) before the
/// guest runs again: the guest wrote those pages before ENABLE and touches
/// many again right away (its kernel, page tables, initramfs), and each
/// would otherwise be a nested page fault of its own. A host KVM that
/// refuses it leaves them to fault in on demand, as before.
fn prefault(vcpu: &VcpuFd, machine: &SharedMachine, ranges: &[(u64, u64)]) {
    let m = map_ahead(vcpu, ranges);
    if let Some((gpa, len, e)) = &m.refused {
        eprintln!("protmem-vmm: KVM_PRE_FAULT_MEMORY({gpa:#x}+{len:#x}): {e}; the guest faults these pages in");
    }
    machine
        .prot_mut()
        .record_prefault(m.bytes, m.us, m.complete);
}

/// Maps the range (`gpa`, `len`) this vCPU's SHARE just made shared
/// before the guest runs again. Nothing in it is backed yet: the guest's
/// swiotlb pool, the largest share, is neither cleared at boot (guest
/// patch 0015) nor used until I/O, and swiotlb hands its slots out in
/// turn, so without this each page's first use in I/O is a nested page
/// fault, and a new page of the shared memfd, in the middle of a transfer.
/// Here KVM allocates and maps them in one ioctl. A host KVM that refuses
/// leaves them to fault in on demand (said once).
fn prefault_shared(vcpu: &VcpuFd, machine: &SharedMachine, gpa: u64, len: u64) {
    let m = map_ahead(vcpu, &[(gpa, len)]);
    let first_incomplete = machine
        .prot()
        .record_shared_prefault(m.bytes, m.us, m.complete);
    if let (true, Some((gpa, len, e))) = (first_incomplete, &m.refused) {
        eprintln!(
            "protmem-vmm: KVM_PRE_FAULT_MEMORY({gpa:#x}+{len:#x}) after a SHARE: {e}; the guest faults shared pages in (said once)"
        );
    }
}

/// Runs vCPU `id` until the dispatcher ends the boot (the action is sent on
/// `events`), KVM_RUN fails, or `stop` is set (a reboot; nothing is sent).
fn vcpu_loop(
    id: u8,
    mut vcpu: VcpuFd,
    machine: SharedMachine,
    events: Sender<Action>,
    stop: Arc<AtomicBool>,
    hostile: Option<Arc<Hostile>>,
) {
    let run = vcpu.get_kvm_run() as *const kvm_bindings::kvm_run;
    let immediate_exit = std::ptr::addr_of_mut!(vcpu.get_kvm_run().immediate_exit);
    // The byte is otherwise written only by the kernel and by
    // `set_kvm_immediate_exit` below, on this thread.
    // SAFETY: it lies in this vCPU's kvm_run mapping, mapped as long as
    // `vcpu`; `_kick` is a local, disarmed (dropped) before `vcpu`.
    let _kick = unsafe { kick::Armed::new(immediate_exit) };
    kick::set_thread_stop_flag(stop.clone());
    let mut exits = VcpuExitState::default();
    while !stop.load(Ordering::SeqCst) {
        let mut completed = false;
        let action = match vcpu.run() {
            Ok(exit) => {
                // `run` points into this vCPU's kvm_run mapping, mapped as
                // long as `vcpu`; after a KVM_EXIT_IO the kernel has filled
                // `io` and does not write it until the next KVM_RUN. The
                // exit's data slice lies at `io.data_offset`, past the struct.
                // SAFETY: as above; this read aliases nothing borrowed.
                let io_size =
                    unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() };
                let action =
                    machine.handle_vcpu_exit(&mut exits, convert(exit, usize::from(io_size)));
                if !exits.prefault.is_empty() {
                    prefault(&vcpu, &machine, &std::mem::take(&mut exits.prefault));
                }
                if let Some((gpa, len)) = exits.prefault_shared.take() {
                    prefault_shared(&vcpu, &machine, gpa, len);
                }
                action
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick or another signal: disarm, then check `stop`.
                // KVM completed the last exit's I/O before it returned.
                vcpu.set_kvm_immediate_exit(0);
                completed = true;
                if stop.load(Ordering::SeqCst) && DUMP_ON_STOP.load(Ordering::SeqCst) {
                    dump_vcpu(id, &vcpu);
                }
                Action::Continue
            }
            Err(e) => Action::Stop(StopReason::Error(format!("KVM_RUN on vCPU {id}: {e}"))),
        };
        // Only with nothing pending: a state write between an MMIO or I/O
        // exit and the KVM_RUN that completes it loses the instruction's
        // result (protmem-kvm-test's `pending` check). The attack kicks
        // until every vCPU thread got here.
        if let (Some(h), true) = (&hostile, completed) {
            h.on_vcpu(id, &vcpu);
        }
        if action != Action::Continue {
            // The receiver only goes away when the VMM is exiting anyway.
            let _ = events.send(action);
            return;
        }
    }
}
