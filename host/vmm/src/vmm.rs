//! The KVM shell: builds the VM from the command line and runs it.
//!
//! Everything here is a thin layer over kvm-ioctls, in the order the KVM API
//! requires (irqchip before vCPUs, CPUID before the first KVM_RUN); every
//! decision is taken by [`Machine::handle_exit`] and the modules it uses,
//! which are tested without KVM. This file needs a real `/dev/kvm` and is
//! exercised only by booting a guest.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_EXIT_HYPERCALL,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootError};
use crate::cli::Cli;
use crate::cpuid::{self, CpuidConfig};
use crate::exit::{Action, Boots, EntropySource, Exit, Machine, StopReason, BLK_SLOT, RNG_SLOT};
use crate::hypercalls::{self, FailKnobs, HypercallError, HypercallHandler};
use crate::mptable::{self, MptableError};
use crate::probe::Probe;
use crate::protection::Protection;
use crate::ram::{GuestRam, RamError};
use crate::serial::{PanicState, SerialPort, COM1_IRQ};
use crate::stats::Stats;
use crate::virtio::blk::{Block, BlockError};
use crate::virtio::rng::Rng;
use crate::virtio::rng::{RngError, URANDOM};
use crate::virtio::{slot_addr, slot_irq, MmioTransport};

/// Three pages below 4 GiB that KVM needs for the TSS on Intel (harmless on
/// AMD); outside RAM and the MMIO windows used here.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// How long a panicking guest may keep printing before the VM is stopped.
const PANIC_GRACE: Duration = Duration::from_secs(5);
/// How often the main thread checks the timeout and panic grace.
const TICK: Duration = Duration::from_millis(100);

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
    /// Protected-memory capability.
    #[error(transparent)]
    Hypercall(#[from] HypercallError),
    /// Disk.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// Entropy source.
    #[error(transparent)]
    Rng(#[from] RngError),
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

/// An interrupt line: an eventfd registered with KVM as an irqfd.
pub struct IrqEvent(EventFd);

impl Trigger for IrqEvent {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqEvent, VmmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|err| VmmError::EventFd { irq: gsi, err })?;
    vm.register_irqfd(&evt, gsi)
        .map_err(kvm_err(format!("KVM_IRQFD for IRQ {gsi}")))?;
    Ok(IrqEvent(evt))
}

/// The machine as the vCPU threads share it.
type SharedMachine = Arc<Mutex<Machine<IrqEvent, Box<dyn Write + Send>>>>;

/// How the run ended.
pub struct Outcome {
    /// Why the VM stopped.
    pub reason: StopReason,
    /// Counters at that moment.
    pub stats: Stats,
}

/// Builds the VM described by `cli`, runs it until it stops, and returns why.
pub fn run(cli: &Cli) -> Result<Outcome, VmmError> {
    // Inputs first: a typo fails before anything touches KVM.
    let mut kernel = open("kernel", &cli.kernel)?;
    let mut initrd = match &cli.initrd {
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
    let blk = cli.disk.as_deref().map(Block::open).transpose()?;
    let rng = if cli.rng {
        let f = File::open(URANDOM).map_err(|err| RngError::Open { path: URANDOM, err })?;
        Some(Rng::new(Box::new(f) as EntropySource))
    } else {
        None
    };
    let console: Box<dyn Write + Send> = match &cli.serial_log {
        Some(p) => Box::new(File::create(p).map_err(|err| VmmError::Open {
            what: "serial log",
            path: p.display().to_string(),
            err,
        })?),
        None => Box::new(io::stdout()),
    };

    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    if cli.protect {
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
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config::default())
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let (kvm_view, device_view) = GuestRam::new(cli.mem)?.into_views();
    // The memslot points at this mapping for the rest of the process: leak
    // it so that nothing can unmap it while a vCPU may still run.
    let kvm_view: &'static GuestMemoryMmap = Box::leak(Box::new(kvm_view));
    let host = kvm_view
        .get_host_address(GuestAddress(0))
        .map_err(|_| RamError::BadSize(cli.mem))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: cli.mem,
        userspace_addr: host as u64,
    };
    // SAFETY: `host .. host + cli.mem` is the KVM view's shared mapping of
    // the memfd, leaked above so it stays mapped as long as the VM exists;
    // the guest may write it at any time, and the VMM only reaches it
    // through vm-memory's volatile accessors, never through references.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

    let mut virtio = Vec::new();
    if blk.is_some() {
        virtio.push((slot_addr(BLK_SLOT.into()), slot_irq(BLK_SLOT)));
    }
    if rng.is_some() {
        virtio.push((slot_addr(RNG_SLOT.into()), slot_irq(RNG_SLOT)));
    }
    let cmdline = boot::build_cmdline(&cli.cmdline, &virtio)?;
    let initrd_arg = initrd.as_mut().map(|(f, len)| (f, *len));
    let info = boot::load(kvm_view, cli.mem, &mut kernel, initrd_arg, &cmdline)?;
    mptable::write(kvm_view, cli.cpus)?;

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for id in 0..cli.cpus {
        vcpus.push(create_vcpu(&vm, &supported, id, cli, info.entry)?);
    }

    let machine = Machine {
        serial: SerialPort::new(irq_line(&vm, COM1_IRQ)?, console),
        blk: match blk {
            Some(b) => Some(MmioTransport::new(b, irq_line(&vm, slot_irq(BLK_SLOT))?)),
            None => None,
        },
        rng: match rng {
            Some(r) => Some(MmioTransport::new(r, irq_line(&vm, slot_irq(RNG_SLOT))?)),
            None => None,
        },
        probe: Probe::default(),
        prot: Protection::new(device_view),
        hypercalls: HypercallHandler::new(FailKnobs {
            enable: cli.fail_enable,
            share: cli.fail_share.unwrap_or_default(),
            unshare: cli.fail_unshare.unwrap_or_default(),
        }),
        exits: Default::default(),
        boots: Boots::new(0),
    };
    let machine: SharedMachine = Arc::new(Mutex::new(machine));
    let (tx, rx) = mpsc::channel();
    for (id, vcpu) in (0u8..).zip(vcpus) {
        let (m, tx) = (machine.clone(), tx.clone());
        thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(vcpu, m, tx))
            .map_err(|err| VmmError::Thread { id, err })?;
    }

    let start = Instant::now();
    let deadline = cli.timeout.map(|s| start + Duration::from_secs(s));
    let mut panic_since = None;
    let reason = loop {
        match rx.recv_timeout(TICK) {
            Ok(reason) => break reason,
            Err(RecvTimeoutError::Disconnected) => {
                break StopReason::Error("every vCPU thread ended".into())
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break StopReason::Timeout;
        }
        let panicking = lock(&machine).serial.console().panic_state() != PanicState::None;
        if panicking && now - *panic_since.get_or_insert(now) >= PANIC_GRACE {
            break StopReason::Panic;
        }
    };
    let mut m = lock(&machine);
    if let Err(e) = m.serial.flush() {
        eprintln!("protmem-vmm: flushing the console: {e}");
    }
    let stats = Stats::collect(&m, &reason, cli.protect);
    Ok(Outcome { reason, stats })
}

fn lock(m: &SharedMachine) -> std::sync::MutexGuard<'_, Machine<IrqEvent, Box<dyn Write + Send>>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        protect: cli.protect,
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

/// Converts a kvm-ioctls exit into the dispatcher's [`Exit`].
fn convert(exit: VcpuExit<'_>) -> Exit<'_> {
    match exit {
        VcpuExit::IoIn(port, data) => Exit::IoIn { port, data },
        VcpuExit::IoOut(port, data) => Exit::IoOut { port, data },
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
        VcpuExit::Hypercall(h) => Exit::Hypercall {
            nr: h.nr,
            args: h.args,
            ret: h.ret,
        },
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
        VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
        VcpuExit::InternalError => Exit::InternalError,
        other => Exit::Other(format!("{other:?}")),
    }
}

/// Runs one vCPU until the dispatcher stops the VM or KVM_RUN fails.
fn vcpu_loop(mut vcpu: VcpuFd, machine: SharedMachine, stop: Sender<StopReason>) {
    loop {
        let action = match vcpu.run() {
            Ok(exit) => {
                let exit = convert(exit);
                lock(&machine).handle_exit(exit)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Continue,
            Err(e) => Action::Stop(StopReason::Error(format!("KVM_RUN: {e}"))),
        };
        if let Action::Stop(reason) = action {
            // The receiver only goes away when the VMM is exiting anyway.
            let _ = stop.send(reason);
            return;
        }
    }
}
