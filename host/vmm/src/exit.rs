//! Exit dispatch: the VM's devices and a pure function from one vCPU exit to
//! what happens next.
//!
//! [`Exit`] mirrors the kvm-ioctls `VcpuExit` variants this VMM handles, so
//! unit tests feed [`Machine::handle_exit`] made-up exits; the KVM run loop
//! in [`crate::vmm`] only converts and forwards (Firecracker's
//! `handle_kvm_exit` pattern).
//!
//! Port I/O: COM1 at 0x3f8; a minimal, stateless i8042 at 0x60/0x64 whose
//! command 0xFE (pulse reset) resets the machine; CMOS at 0x70/0x71 reads 0
//! (so Linux does not spin on the RTC update flag); the ACPI PM1 registers
//! at 0x600..0x606 ([`AcpiPm`]); any other port reads all-ones. MMIO: virtio-blk in slot 0, virtio-rng in slot 1, the probe
//! device; anything else reads 0.
//!
//! A guest reset (i8042 0xFE, a triple fault, a reset system event) becomes
//! [`Action::Reboot`] while `--reboots` has reboots left, else it stops the
//! VM; a panic seen on the console always stops it. The KVM shell then stops
//! every vCPU, calls [`Machine::settle`] and [`Machine::reset`], and boots
//! again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hypercall::{Hypercall, KVM_HC_ENABLE_MEM_PROTECTED};
use serde::Serialize;
use vm_superio::Trigger;

use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::MmioBus;
use crate::devices::serial::{PanicState, PanicWatch, SerialPort, COM1_BASE, COM1_LEN};
use crate::gmem::GmemError;
use crate::hypercalls::{HypercallError, HypercallHandler};
use crate::protection::{Access, Protection, ProtectionError};

/// i8042 data port.
const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
const I8042_CMD: u16 = 0x64;
/// i8042 command: pulse the CPU reset line.
const I8042_RESET: u8 = 0xfe;
/// CMOS index and data ports.
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
/// `KVM_SYSTEM_EVENT_SHUTDOWN` / `KVM_SYSTEM_EVENT_RESET`.
const SYSTEM_EVENT_SHUTDOWN: u32 = kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN;
const SYSTEM_EVENT_RESET: u32 = kvm_bindings::KVM_SYSTEM_EVENT_RESET;

/// One vCPU exit, as the dispatcher sees it.
#[derive(Debug)]
pub enum Exit<'a> {
    /// `in` (or `rep ins`) from `port`; fill `data`, `size` bytes per
    /// element.
    IoIn {
        /// Port.
        port: u16,
        /// Bytes per element: 1, 2 or 4.
        size: usize,
        /// Elements to return, `size` bytes each.
        data: &'a mut [u8],
    },
    /// `out` (or `rep outs`) to `port`: `size` bytes per element.
    IoOut {
        /// Port.
        port: u16,
        /// Bytes per element: 1, 2 or 4.
        size: usize,
        /// Elements written, in order.
        data: &'a [u8],
    },
    /// MMIO read at `addr`; fill `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Bytes to return.
        data: &'a mut [u8],
    },
    /// MMIO write at `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// `KVM_EXIT_HYPERCALL`: `ret` is what KVM puts in the guest's RAX;
    /// with `applied`, KVM already carried the call out and `ret` can only
    /// refuse it (KVM then undoes it).
    Hypercall {
        /// Hypercall number.
        nr: u64,
        /// Arguments a0..a5.
        args: [u64; 6],
        /// `KVM_EXIT_HYPERCALL_APPLIED`.
        applied: bool,
        /// Return value slot (`kvm_run.hypercall.ret`).
        ret: &'a mut u64,
    },
    /// HLT with no in-kernel irqchip to wait in.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN`: triple fault.
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT` of type `kind`.
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_MEMORY_FAULT`: KVM could not map a guest access.
    MemoryFault {
        /// `KVM_MEMORY_EXIT_FLAG_*` (PRIVATE: the access was private).
        flags: u64,
        /// First GPA.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// Anything else, described.
    Other(String),
}

/// Most `KVM_EXIT_MEMORY_FAULT`s in a row a vCPU may re-enter from while
/// no conversion is reported.
pub const MAX_FAULT_STREAK: u32 = 64;

/// What a vCPU's exit handling keeps between its exits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuExitState {
    /// `KVM_EXIT_MEMORY_FAULT`s since the vCPU's last other exit and since
    /// the last conversion reported to the VMM.
    pub fault_streak: u32,
    /// Conversions the VMM had seen (ENABLEs, SHAREs and UNSHAREs KVM
    /// applied) at the vCPU's last memory fault.
    pub fault_conversions: u64,
    /// What this vCPU's ENABLE just populated (GPA, length), for the vCPU
    /// thread to pre-fault before it enters the guest again.
    pub prefault: Vec<(u64, u64)>,
    /// What this vCPU's SHARE just made shared (GPA, length), likewise.
    pub prefault_shared: Option<(u64, u64)>,
}

impl VcpuExitState {
    /// Counts a memory fault; `conversions` is the VMM's conversion count
    /// now. A conversion reported since the previous fault starts the
    /// streak afresh: while another vCPU keeps converting the page, a vCPU
    /// may lose the race many times in a row (with vCPUs on CPUs of their
    /// own, one flipping a page back and forth starved a reader for 65
    /// faults), which is progress, not a fault that does not go away.
    pub fn count_fault(&mut self, conversions: u64) -> u32 {
        if conversions != self.fault_conversions {
            self.fault_conversions = conversions;
            self.fault_streak = 0;
        }
        self.fault_streak += 1;
        self.fault_streak
    }
}

/// What to do with a `KVM_EXIT_MEMORY_FAULT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Enter the guest again: the fault lost a race with a conversion.
    /// `seen`: the VMM's map already shows the conversion.
    Retry {
        /// The access disagrees with the VMM's map.
        seen: bool,
    },
    /// Stop the VM, for this reason.
    Stop(String),
}

/// Decides on a `KVM_EXIT_MEMORY_FAULT` of an access that was private
/// (`access_private`, the exit's `KVM_MEMORY_EXIT_FLAG_PRIVATE`) to a
/// range that the VMM's own shared map says is private (`Some(true)`),
/// shared (`Some(false)`), or not RAM (`None`), the `streak`-th of the
/// vCPU in a row.
///
/// In a software-protected VM whose memory KVM owns (`kvm_owned`),
/// KVM takes an access's private bit from the page's attribute when the
/// fault starts and checks it again once it has a consistent view; if
/// another vCPU's SHARE or UNSHARE changed the attribute in between, KVM
/// exits with the old value. It happens to a vCPU touching a page another
/// converts, e.g. `load_unaligned_zeropad()` reading across into the next
/// page. Entering again faults afresh with the attribute as it is now.
/// The VMM cannot read attributes (KVM owns them), only compare the
/// access with its map, which follows each conversion once KVM reported
/// it: if they differ, the map already shows the conversion that raced;
/// if they agree, the conversion's exit is still on its way on the other
/// vCPU, or the VMM refused it and KVM undid it. Both are retried, at
/// most [`MAX_FAULT_STREAK`] times in a row with no conversion reported in
/// between ([`VcpuExitState::count_fault`]), so that a fault that does not
/// go away (no race at all) stops the VM instead of spinning. A VM whose
/// attributes KVM does not own has no private memory to race with.
pub fn memory_fault_action(
    kvm_owned: bool,
    access_private: bool,
    map_private: Option<bool>,
    streak: u32,
) -> FaultAction {
    if !kvm_owned {
        return FaultAction::Stop("the VM has no KVM-owned private memory".into());
    }
    let Some(map_private) = map_private else {
        return FaultAction::Stop("the range is not guest RAM".into());
    };
    if streak > MAX_FAULT_STREAK {
        return FaultAction::Stop(format!(
            "{streak} memory faults in a row on this vCPU: not a race with a conversion"
        ));
    }
    FaultAction::Retry {
        seen: map_private != access_private,
    }
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Reset request (i8042 0xFE or a reset system event): a clean reboot.
    Reset,
    /// Triple fault or shutdown system event.
    Shutdown,
    /// HLT exit without an irqchip.
    Halt,
    /// The guest kernel panicked.
    Panic,
    /// `--timeout` expired.
    Timeout,
    /// The VMM failed.
    Error(String),
}

impl StopReason {
    /// Process exit code: 0 for a guest-requested reset or shutdown.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Reset | StopReason::Shutdown | StopReason::Halt => 0,
            StopReason::Error(_) => 1,
            StopReason::Panic => 2,
            StopReason::Timeout => 3,
        }
    }

    /// Short name for the stats file and summary.
    pub fn name(&self) -> &'static str {
        match self {
            StopReason::Reset => "reset",
            StopReason::Shutdown => "shutdown",
            StopReason::Halt => "halt",
            StopReason::Panic => "panic",
            StopReason::Timeout => "timeout",
            StopReason::Error(_) => "error",
        }
    }
}

/// What the vCPU does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest.
    Continue,
    /// The guest reset the machine (`Reset` or `Shutdown`, the reason that
    /// would have stopped it) and reboots are left: restart it in place.
    Reboot(StopReason),
    /// Stop the VM.
    Stop(StopReason),
}

/// One reboot done, as the stats file lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ResetRecord {
    /// The boot that ended (1 = first).
    pub boot: u64,
    /// How it ended: `reset` (i8042, reset event) or `shutdown` (triple fault).
    pub reason: &'static str,
    /// Pages shared when it ended; the reset dropped them.
    pub pages_shared: u64,
    /// Whether protection was enabled when it ended.
    pub protection_enabled: bool,
}

/// Which boot the VM is in, how many guest resets still reboot it, and what
/// each reboot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Boots {
    current: u64,
    reboots_left: u64,
    resets: Vec<ResetRecord>,
}

impl Boots {
    /// First boot, with `reboots` reboots allowed (`--reboots`).
    pub fn new(reboots: u64) -> Self {
        Boots {
            current: 1,
            reboots_left: reboots,
            resets: Vec::new(),
        }
    }

    /// The current boot: 1 + reboots done.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Reboots still allowed.
    pub fn reboots_left(&self) -> u64 {
        self.reboots_left
    }

    /// The reboots done, in order.
    pub fn resets(&self) -> &[ResetRecord] {
        &self.resets
    }
}

/// Exit counters for the stats file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Hypercalls.
    pub hypercall: u64,
    /// MMIO accesses that hit no device.
    pub mmio_unhandled: u64,
    /// `KVM_EXIT_MEMORY_FAULT` exits: the conversion race (re-entered)
    /// or a fault that stopped the VM.
    pub memory_fault: u64,
    /// Re-entered: the VMM's map already showed the conversion that raced.
    pub memory_fault_after_conversion: u64,
    /// Re-entered: the VMM's map did not show a conversion (yet).
    pub memory_fault_before_conversion: u64,
}

/// [`ExitCounts`] as the vCPU threads bump them, each without a lock.
#[derive(Debug, Default)]
pub struct ExitCounters {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    hypercall: AtomicU64,
    mmio_unhandled: AtomicU64,
    memory_fault: AtomicU64,
    memory_fault_after_conversion: AtomicU64,
    memory_fault_before_conversion: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl ExitCounters {
    /// The counts now.
    pub fn snapshot(&self) -> ExitCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitCounts {
            io_in: get(&self.io_in),
            io_out: get(&self.io_out),
            mmio_read: get(&self.mmio_read),
            mmio_write: get(&self.mmio_write),
            hypercall: get(&self.hypercall),
            mmio_unhandled: get(&self.mmio_unhandled),
            memory_fault: get(&self.memory_fault),
            memory_fault_after_conversion: get(&self.memory_fault_after_conversion),
            memory_fault_before_conversion: get(&self.memory_fault_before_conversion),
        }
    }
}

/// Locks `m`; a thread that panicked while holding it does not stop the
/// others (device state stays consistent per register access).
pub fn locked<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// All device state of the VM, raising interrupts through `T`, shared by
/// the vCPU threads and the device event loop.
///
/// Each device has its own lock, so exits to different devices run in
/// parallel. Lock order, outermost first: `boots`, `hypercalls`, then a
/// device (`serial`, one device of the bus), then `prot`. Device
/// emulation holds `prot` for reading while it touches guest memory;
/// ENABLE, SHARE and UNSHARE hold it for writing, so a conversion waits
/// for the accesses in flight and no access starts until it is done.
pub struct Machine<T: Trigger> {
    /// COM1.
    pub serial: Mutex<SerialPort<T>>,
    /// The ACPI PM1 registers.
    pm: Mutex<AcpiPm>,
    /// The console's panic state, read without the serial lock.
    panic: PanicWatch,
    /// The MMIO devices (virtio transports, the probe).
    pub bus: MmioBus,
    /// The checked device view of RAM; devices hold clones of the handle.
    pub prot: Arc<RwLock<Protection>>,
    /// Protected-memory hypercalls.
    pub hypercalls: Mutex<HypercallHandler>,
    /// Exit counters.
    pub exits: ExitCounters,
    /// Boot count and reboots left.
    pub boots: Mutex<Boots>,
}

impl<T: Trigger> Machine<T> {
    /// Builds the machine from its parts, every lock free. `prot` is the
    /// handle the devices of `bus` were given.
    pub fn new(
        serial: SerialPort<T>,
        bus: MmioBus,
        prot: Arc<RwLock<Protection>>,
        hypercalls: HypercallHandler,
        boots: Boots,
    ) -> Self {
        Machine {
            panic: serial.console().panic_watch(),
            serial: Mutex::new(serial),
            pm: Mutex::default(),
            bus,
            prot,
            hypercalls: Mutex::new(hypercalls),
            exits: ExitCounters::default(),
            boots: Mutex::new(boots),
        }
    }

    /// The device view, for reading (device accesses, figures).
    pub fn prot(&self) -> RwLockReadGuard<'_, Protection> {
        self.prot.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device view, for a conversion or a reset.
    pub fn prot_mut(&self) -> RwLockWriteGuard<'_, Protection> {
        self.prot.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles one exit of a vCPU that keeps no state of its own (tests,
    /// one-off exits): see [`Machine::handle_vcpu_exit`].
    pub fn handle_exit(&self, exit: Exit<'_>) -> Action {
        self.handle_vcpu_exit(&mut VcpuExitState::default(), exit)
    }

    /// Handles one exit of the vCPU whose exit state is `vcpu`.
    pub fn handle_vcpu_exit(&self, vcpu: &mut VcpuExitState, exit: Exit<'_>) -> Action {
        if let Exit::MemoryFault { flags, gpa, size } = exit {
            return self.memory_fault(vcpu, flags, gpa, size);
        }
        vcpu.fault_streak = 0;
        match exit {
            Exit::IoIn { port, size, data } => {
                bump(&self.exits.io_in);
                for element in data.chunks_mut(size.max(1)) {
                    self.io_in(port, element);
                }
                Action::Continue
            }
            Exit::IoOut { port, size, data } => {
                bump(&self.exits.io_out);
                for element in data.chunks(size.max(1)) {
                    let action = self.io_out(port, element);
                    if action != Action::Continue {
                        return action;
                    }
                }
                Action::Continue
            }
            Exit::MmioRead { addr, data } => {
                bump(&self.exits.mmio_read);
                self.mmio_read(addr, data);
                Action::Continue
            }
            Exit::MmioWrite { addr, data } => {
                bump(&self.exits.mmio_write);
                self.mmio_write(addr, data)
            }
            Exit::Hypercall {
                nr,
                args,
                applied,
                ret,
            } => {
                bump(&self.exits.hypercall);
                // guest_memfd mode asked KVM to own what is private: a
                // conversion it did not apply would be ours to fake.
                let kvm_owned = self.prot().gmem_stats().is_some();
                if applied != kvm_owned {
                    return Action::Stop(StopReason::Error(format!(
                        "KVM_EXIT_HYPERCALL {nr} {} KVM_EXIT_HYPERCALL_APPLIED, but the VM {} \
                         KVM_CAP_X86_PROTECTED_MEMORY",
                        if applied { "with" } else { "without" },
                        if kvm_owned { "has" } else { "does not have" }
                    )));
                }
                let mut hypercalls = locked(&self.hypercalls);
                let result =
                    hypercalls.handle(&mut self.prot_mut(), nr, [args[0], args[1], args[2]]);
                match result {
                    Ok(value) => {
                        *ret = value;
                        if nr == KVM_HC_ENABLE_MEM_PROTECTED && value == 0 {
                            vcpu.prefault = self.prot_mut().take_populated();
                        }
                        if let (0, Some(Ok(Hypercall::Share(r)))) =
                            (value, Hypercall::decode(nr, [args[0], args[1], args[2]]))
                        {
                            vcpu.prefault_shared = Some((r.gpa(), r.len()));
                        }
                        Action::Continue
                    }
                    // A stop (reboot, --timeout) interrupted ENABLE's
                    // populate: this thread leaves at its stop check,
                    // before it could enter the guest again, and the stop
                    // decides how the boot ends.
                    Err(HypercallError::Enable(ProtectionError::Gmem(
                        GmemError::Interrupted { .. },
                    ))) => Action::Continue,
                    Err(e) => Action::Stop(StopReason::Error(e.to_string())),
                }
            }
            Exit::Hlt => self.guest_stop(StopReason::Halt),
            // A triple fault resets a PC.
            Exit::Shutdown => self.guest_reset(StopReason::Shutdown),
            Exit::SystemEvent { kind } => match kind {
                // Power off: not a reset.
                SYSTEM_EVENT_SHUTDOWN => self.guest_stop(StopReason::Shutdown),
                SYSTEM_EVENT_RESET => self.guest_reset(StopReason::Reset),
                other => Action::Stop(StopReason::Error(format!("KVM system event {other}"))),
            },
            Exit::FailEntry { reason } => Action::Stop(StopReason::Error(format!(
                "KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"
            ))),
            Exit::InternalError => {
                Action::Stop(StopReason::Error("KVM_EXIT_INTERNAL_ERROR".to_string()))
            }
            Exit::MemoryFault { .. } => unreachable!("handled above"),
            Exit::Other(what) => Action::Stop(StopReason::Error(format!("unhandled exit {what}"))),
        }
    }

    /// `KVM_EXIT_MEMORY_FAULT` on vCPU `vcpu`: see [`memory_fault_action`].
    fn memory_fault(&self, vcpu: &mut VcpuExitState, flags: u64, gpa: u64, size: u64) -> Action {
        bump(&self.exits.memory_fault);
        let access_private = flags & u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0;
        let (gmem, access) = {
            let prot = self.prot();
            (prot.gmem_stats(), prot.classify(gpa, size.max(1)))
        };
        let kvm_owned = gmem.is_some();
        let conversions = gmem.map_or(0, |g| g.enables + g.to_shared + g.to_private);
        let map = match access {
            Access::NotRam => None,
            Access::Allowed => Some(false),
            Access::Private => Some(true),
        };
        let streak = vcpu.count_fault(conversions);
        match memory_fault_action(kvm_owned, access_private, map, streak) {
            FaultAction::Retry { seen } => {
                bump(if seen {
                    &self.exits.memory_fault_after_conversion
                } else {
                    &self.exits.memory_fault_before_conversion
                });
                Action::Continue
            }
            FaultAction::Stop(why) => Action::Stop(StopReason::Error(format!(
                "KVM_EXIT_MEMORY_FAULT: KVM could not map a {} guest access to GPAs \
                 {gpa:#x}..{:#x} (flags {flags:#x}): {why}",
                if access_private { "private" } else { "shared" },
                gpa.saturating_add(size)
            ))),
        }
    }

    /// A guest-initiated stop, turned into `Panic` if the console saw one.
    fn guest_stop(&self, reason: StopReason) -> Action {
        if self.panicking() {
            Action::Stop(StopReason::Panic)
        } else {
            Action::Stop(reason)
        }
    }

    /// A guest reset: a reboot while reboots are left, else a stop; a panic
    /// seen on the console always stops.
    fn guest_reset(&self, reason: StopReason) -> Action {
        match self.guest_stop(reason) {
            Action::Stop(r @ (StopReason::Reset | StopReason::Shutdown))
                if locked(&self.boots).reboots_left > 0 =>
            {
                Action::Reboot(r)
            }
            other => other,
        }
    }

    /// How the boot ended, once every vCPU stopped: `first` is the action
    /// that ended it, `later` what other vCPUs reported before they stopped.
    /// A reboot gives way to an error or a panic (reported or on the
    /// console); anything else stands.
    pub fn settle(&self, first: Action, later: impl IntoIterator<Item = Action>) -> Action {
        if !matches!(first, Action::Reboot(_)) {
            return first;
        }
        let mut panic = self.panicking();
        for action in later {
            match action {
                Action::Stop(e @ StopReason::Error(_)) => return Action::Stop(e),
                Action::Stop(StopReason::Panic) => panic = true,
                _ => {}
            }
        }
        if panic {
            Action::Stop(StopReason::Panic)
        } else {
            first
        }
    }

    /// Whether the console saw a kernel panic.
    pub fn panicking(&self) -> bool {
        self.panic.state() != PanicState::None
    }

    /// One element of an `in`.
    fn io_in(&self, port: u16, data: &mut [u8]) {
        if let Some(off) = port.checked_sub(COM1_BASE).filter(|o| *o < COM1_LEN) {
            data.fill(0);
            if let Some(first) = data.first_mut() {
                *first = locked(&self.serial).read(off as u8);
            }
            return;
        }
        if locked(&self.pm).read(port, data) {
            return;
        }
        let fill = match port {
            I8042_DATA | I8042_CMD | CMOS_INDEX | CMOS_DATA => 0,
            _ => 0xff,
        };
        data.fill(fill);
    }

    /// One element of an `out`.
    fn io_out(&self, port: u16, data: &[u8]) -> Action {
        let Some(&value) = data.first() else {
            return Action::Continue;
        };
        if let Some(off) = port.checked_sub(COM1_BASE).filter(|o| *o < COM1_LEN) {
            let mut serial = locked(&self.serial);
            if let Err(e) = serial.write(off as u8, value) {
                return Action::Stop(StopReason::Error(e.to_string()));
            }
            if serial.console().panic_state() == PanicState::Ended {
                return Action::Stop(StopReason::Panic);
            }
            return Action::Continue;
        }
        if locked(&self.pm).write(port, data) {
            return Action::Continue;
        }
        if port == I8042_CMD && value == I8042_RESET {
            return self.guest_reset(StopReason::Reset);
        }
        Action::Continue
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.bus.read(addr, data) {
            bump(&self.exits.mmio_unhandled);
            data.fill(0);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> Action {
        match self.bus.write(addr, data) {
            None => {
                bump(&self.exits.mmio_unhandled);
                Action::Continue
            }
            Some(Ok(())) => Action::Continue,
            Some(Err(e)) => Action::Stop(StopReason::Error(e.to_string())),
        }
    }
}

impl<T: Trigger + Clone> Machine<T> {
    /// Machine reset for a reboot after `reason`: records the boot that
    /// ended, counts the reboot, and puts every device back to its power-on
    /// state: UART registers, virtio transports (status 0, queues
    /// unconfigured, features unnegotiated), the probe's GPA register, the
    /// ACPI PM1 registers, and protection (off, map empty, device view RW).
    /// The i8042 and CMOS models hold no state. The disk file, the console stream and every
    /// counter carry on.
    ///
    /// Call it only with every vCPU stopped and guest RAM cleared; then load
    /// the kernel again and start fresh vCPUs.
    pub fn reset(&self, reason: &StopReason) -> Result<(), ProtectionError> {
        let mut boots = locked(&self.boots);
        let mut hypercalls = locked(&self.hypercalls);
        {
            let prot = self.prot();
            let boot = boots.current;
            boots.resets.push(ResetRecord {
                boot,
                reason: reason.name(),
                pages_shared: prot.shared_pages(),
                protection_enabled: prot.enabled(),
            });
        }
        boots.current += 1;
        boots.reboots_left = boots.reboots_left.saturating_sub(1);
        locked(&self.serial).reset();
        locked(&self.pm).reset();
        self.bus.reset();
        hypercalls.start_boot(boots.current);
        self.prot_mut().reset()
    }

    /// Stops device activity on guest memory before a reboot clears RAM:
    /// the virtio transports go back to reset, so a notification still
    /// pending for the event loop finds no queue to process.
    pub fn quiesce(&self) {
        self.bus.quiesce();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::probe::{ProbeDevice, PROBE_BASE, PROBE_SIZE, REG_ALLOWED, REG_MAGIC};
    use crate::devices::serial::tests::{Captured, CountingIrq};
    use crate::devices::virtio::blk::Block;
    use crate::devices::virtio::rng::{EntropySource, Rng};
    use crate::devices::virtio::tests::r;
    use crate::devices::virtio::{slot_addr, MmioTransport, MMIO_SIZE};
    use crate::hypercalls::{FailKnobs, KVM_HC_MAP_GPA_RANGE};
    use hypercall::{
        KVM_ENOSYS, KVM_EPERM, KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE, KVM_HC_MEM_UNSHARE,
    };
    use std::io::Cursor;
    use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_MAGIC_VALUE};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    type Prot = Arc<RwLock<Protection>>;
    pub(crate) type TestMachine = Machine<CountingIrq>;
    pub(crate) type BlkT = Arc<Mutex<MmioTransport<Block, CountingIrq, Prot>>>;
    pub(crate) type RngT = Arc<Mutex<MmioTransport<Rng<EntropySource>, CountingIrq, Prot>>>;

    /// A machine with 1 MiB of RAM and, `with_devices`, virtio-blk (an
    /// empty disk) in slot 0, virtio-rng in slot 1 and the probe, as the
    /// VMM registers them; the transports, for tests to drive directly.
    pub(crate) fn machine_with(with_devices: bool) -> (TestMachine, Option<(BlkT, RngT)>) {
        let view = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let prot = Arc::new(RwLock::new(Protection::new(view)));
        let mut bus = MmioBus::new();
        let devices = with_devices.then(|| {
            let file = std::fs::File::open("/dev/null").unwrap();
            let source: EntropySource = Box::new(Cursor::new(vec![7u8; 64]));
            let irq = CountingIrq::default;
            let blk = Arc::new(Mutex::new(MmioTransport::new(
                Block::from_file(file, 0),
                irq(),
                prot.clone(),
            )));
            let rng = Arc::new(Mutex::new(MmioTransport::new(
                Rng::new(source),
                irq(),
                prot.clone(),
            )));
            bus.insert(slot_addr(0), MMIO_SIZE, blk.clone()).unwrap();
            bus.insert(slot_addr(1), MMIO_SIZE, rng.clone()).unwrap();
            bus.insert(
                PROBE_BASE,
                PROBE_SIZE,
                Arc::new(Mutex::new(ProbeDevice::new(prot.clone()))),
            )
            .unwrap();
            (blk, rng)
        });
        let (sink, out) = Captured::sink();
        let m = Machine::new(
            SerialPort::new(CountingIrq::default(), sink),
            bus,
            prot,
            HypercallHandler::new(FailKnobs::default()),
            Boots::new(0),
        );
        OUTPUT.with(|o| *o.borrow_mut() = Some(out));
        (m, devices)
    }

    thread_local! {
        /// The console output of the last machine this test thread built.
        static OUTPUT: std::cell::RefCell<Option<Captured>> =
            const { std::cell::RefCell::new(None) };
    }

    /// What the console of `m` (the last machine built on this thread) wrote.
    pub(crate) fn console_output(m: &TestMachine) -> Vec<u8> {
        let out = OUTPUT.with(|o| o.borrow().clone()).unwrap();
        out.after(locked(&m.serial).console().sink())
    }

    pub(crate) fn machine(with_devices: bool) -> TestMachine {
        machine_with(with_devices).0
    }

    fn out(m: &Machine<CountingIrq>, port: u16, s: &[u8]) -> Action {
        let mut last = Action::Continue;
        for b in s {
            last = m.handle_exit(Exit::IoOut {
                port,
                size: 1,
                data: std::slice::from_ref(b),
            });
        }
        last
    }

    fn hypercall(m: &Machine<CountingIrq>, nr: u64, a: [u64; 3]) -> u64 {
        let mut ret = 0xdead;
        let args = [a[0], a[1], a[2], 0, 0, 0];
        assert_eq!(
            m.handle_exit(Exit::Hypercall {
                applied: false,
                nr,
                args,
                ret: &mut ret
            }),
            Action::Continue
        );
        ret
    }

    #[test]
    fn console_output_and_reset() {
        let m = machine(false);
        assert_eq!(out(&m, 0x3f8, b"hello\n"), Action::Continue);
        assert_eq!(console_output(&m), b"hello\n");
        assert_eq!(m.exits.snapshot().io_out, 6);
        let mut status = [0xaau8];
        m.handle_exit(Exit::IoIn {
            port: 0x64,
            size: 1,
            data: &mut status,
        });
        assert_eq!(status, [0], "i8042 never busy");
        let mut unknown = [0u8; 4];
        m.handle_exit(Exit::IoIn {
            port: 0xcfc,
            size: 4,
            data: &mut unknown,
        });
        assert_eq!(unknown, [0xff; 4]);
        assert_eq!(out(&m, 0x64, &[0xfe]), Action::Stop(StopReason::Reset));
        assert_eq!(
            m.handle_exit(Exit::Shutdown),
            Action::Stop(StopReason::Shutdown)
        );
        assert_eq!(
            m.handle_exit(Exit::SystemEvent {
                kind: SYSTEM_EVENT_RESET
            }),
            Action::Stop(StopReason::Reset)
        );
        assert_eq!(StopReason::Reset.exit_code(), 0);
    }

    /// A console whose stdout nobody reads: the vCPU's exits to COM1
    /// return at once and the panic is seen without the serial lock.
    #[test]
    fn a_stalled_console_blocks_no_vcpu() {
        use crate::devices::serial::tests::Stalled;
        use crate::devices::serial::ConsoleSink;
        let (_release, stalled) = std::sync::mpsc::channel();
        let sink = ConsoleSink::with_capacity(Stalled(stalled, Captured::default()), 4096).unwrap();
        let m = Machine::new(
            SerialPort::new(CountingIrq::default(), sink.clone()),
            MmioBus::new(),
            machine(false).prot.clone(),
            HypercallHandler::new(FailKnobs::default()),
            Boots::new(0),
        );
        let start = std::time::Instant::now();
        for _ in 0..200 {
            assert_eq!(out(&m, 0x3f8, &[b'z'; 80]), Action::Continue);
            out(&m, 0x3f8, b"\n");
        }
        out(&m, 0x3f8, b"Kernel panic - not syncing: stalled stdout\n");
        assert!(m.panicking());
        let a = out(&m, 0x3f8, b"---[ end Kernel panic - not syncing: x ]---\n");
        assert_eq!(a, Action::Stop(StopReason::Panic));
        assert!(!sink.flush(std::time::Duration::from_millis(50)));
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        assert!(sink.dropped() > 0);
    }

    #[test]
    fn rep_port_io_handles_every_element() {
        let m = machine(false);
        // `rep outsb` of a whole string to COM1 in one exit.
        let a = m.handle_exit(Exit::IoOut {
            port: 0x3f8,
            size: 1,
            data: b"rep\n",
        });
        assert_eq!(a, Action::Continue);
        assert_eq!(console_output(&m), b"rep\n");
        // `rep insw` from an unknown port: every element all-ones.
        let mut words = [0u8; 8];
        m.handle_exit(Exit::IoIn {
            port: 0x510,
            size: 2,
            data: &mut words,
        });
        assert_eq!(words, [0xff; 8]);
        // The ACPI PM1 registers: PM1_EN keeps GBL_EN, PM1_CNT says ACPI
        // mode (SCI_EN).
        m.handle_exit(Exit::IoOut {
            port: 0x602,
            size: 2,
            data: &[0x20, 0x00],
        });
        let mut pm1_en = [0u8; 4];
        m.handle_exit(Exit::IoIn {
            port: 0x602,
            size: 2,
            data: &mut pm1_en,
        });
        assert_eq!(pm1_en, [0x20, 0, 0x20, 0], "`rep insw`: PM1_EN twice");
        let mut pm1_cnt = [0u8; 2];
        m.handle_exit(Exit::IoIn {
            port: 0x604,
            size: 2,
            data: &mut pm1_cnt,
        });
        assert_eq!(pm1_cnt, [1, 0]);
        // `rep insb` from COM1's LSR: every element is a register read.
        let mut lsr = [0u8; 3];
        m.handle_exit(Exit::IoIn {
            port: 0x3fd,
            size: 1,
            data: &mut lsr,
        });
        assert!(lsr.iter().all(|b| *b == lsr[0] && *b != 0), "{lsr:?}");
        // A reset in the middle of a `rep outsb` to the i8042 ends there.
        let m = machine(false);
        let a = m.handle_exit(Exit::IoOut {
            port: 0x64,
            size: 1,
            data: &[0xfd, 0xfe, 0xfd],
        });
        assert_eq!(a, Action::Stop(StopReason::Reset));
        assert_eq!(m.exits.snapshot().io_out, 1, "one exit");
    }

    #[test]
    fn panic_wins_over_reset_and_ends_the_vm() {
        let m = machine(false);
        out(
            &m,
            0x3f8,
            b"Kernel panic - not syncing: Attempted to kill init!\n",
        );
        assert_eq!(out(&m, 0x64, &[0xfe]), Action::Stop(StopReason::Panic));
        assert_eq!(
            m.handle_exit(Exit::Shutdown),
            Action::Stop(StopReason::Panic)
        );
        let a = out(
            &m,
            0x3f8,
            b"---[ end Kernel panic - not syncing: Attempted ]---\n",
        );
        assert_eq!(a, Action::Stop(StopReason::Panic));
        assert_ne!(StopReason::Panic.exit_code(), 0);
    }

    #[test]
    fn hypercalls_write_rax() {
        let m = machine(false);
        assert_eq!(
            hypercall(&m, KVM_HC_MEM_SHARE, [0, 1, 0]),
            KVM_EPERM.wrapping_neg()
        );
        assert_eq!(hypercall(&m, KVM_HC_ENABLE_MEM_PROTECTED, [0; 3]), 0);
        assert_eq!(hypercall(&m, KVM_HC_MEM_SHARE, [0x1000, 1, 0]), 0);
        assert_eq!(
            hypercall(&m, KVM_HC_MAP_GPA_RANGE, [0, 1, 0]),
            KVM_ENOSYS.wrapping_neg()
        );
        assert_eq!(m.prot().shared_pages(), 1);
        assert_eq!(m.exits.snapshot().hypercall, 4);
    }

    /// A guest_memfd side whose populate fails with `error`.
    struct FailingPopulate(fn() -> GmemError);

    impl crate::gmem::PrivateMemory for FailingPopulate {
        fn populate(&mut self, _gpa: u64, _len: u64) -> Result<(), GmemError> {
            Err((self.0)())
        }
    }

    #[test]
    fn memory_faults_are_retried_only_as_a_race_and_only_so_often() {
        use FaultAction::{Retry, Stop};
        // The access disagrees with the map: the map shows the conversion.
        assert_eq!(
            memory_fault_action(true, false, Some(true), 1),
            Retry { seen: true }
        );
        assert_eq!(
            memory_fault_action(true, true, Some(false), 1),
            Retry { seen: true }
        );
        // They agree: the conversion's exit is on its way, or was undone.
        assert_eq!(
            memory_fault_action(true, true, Some(true), 1),
            Retry { seen: false }
        );
        assert_eq!(
            memory_fault_action(true, false, Some(false), MAX_FAULT_STREAK),
            Retry { seen: false }
        );
        for (owned, map, streak) in [
            (false, Some(true), 1),
            (true, None, 1),
            (true, Some(true), MAX_FAULT_STREAK + 1),
        ] {
            assert!(
                matches!(memory_fault_action(owned, false, map, streak), Stop(_)),
                "{owned} {map:?} {streak}"
            );
        }
    }

    /// KVM's side of ENABLE, for a machine in gmem mode: nothing to do.
    struct NoPopulate;

    impl crate::gmem::PrivateMemory for NoPopulate {
        fn populate(&mut self, _gpa: u64, _len: u64) -> Result<(), GmemError> {
            Ok(())
        }
    }

    /// A machine whose private memory KVM owns (a guest_memfd side is
    /// attached), after the guest's ENABLE and a SHARE of page 5.
    fn gmem_machine() -> TestMachine {
        let m = machine(false);
        let memfd = crate::ram::GuestRam::new(0x10_0000).unwrap();
        let (_kvm, dev) = memfd.into_views();
        let file = dev
            .iter()
            .next()
            .unwrap()
            .file_offset()
            .unwrap()
            .file()
            .try_clone()
            .unwrap();
        m.prot_mut()
            .attach_gmem(crate::gmem::Gmem::new(Box::new(NoPopulate), file));
        for (nr, gpa) in [(KVM_HC_ENABLE_MEM_PROTECTED, 0), (KVM_HC_MEM_SHARE, 0x5000)] {
            let mut ret = 0x55;
            let a = m.handle_exit(Exit::Hypercall {
                nr,
                args: [gpa, 1, 0, 0, 0, 0],
                applied: true,
                ret: &mut ret,
            });
            assert_eq!((a, ret), (Action::Continue, 0));
        }
        m
    }

    fn fault(m: &TestMachine, vcpu: &mut VcpuExitState, private: bool, gpa: u64) -> Action {
        let flags = if private {
            u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE)
        } else {
            0
        };
        m.handle_vcpu_exit(
            vcpu,
            Exit::MemoryFault {
                flags,
                gpa,
                size: 0x1000,
            },
        )
    }

    #[test]
    fn a_vcpu_that_lost_the_race_with_a_conversion_enters_again() {
        let m = gmem_machine();
        let mut v = VcpuExitState::default();
        // A private access to page 5, which the other vCPU just shared;
        // a shared access to page 6, which is private.
        assert_eq!(fault(&m, &mut v, true, 0x5000), Action::Continue);
        assert_eq!(fault(&m, &mut v, false, 0x6000), Action::Continue);
        // A shared access to page 5: its UNSHARE's exit is still coming.
        assert_eq!(fault(&m, &mut v, false, 0x5000), Action::Continue);
        let e = m.exits.snapshot();
        assert_eq!(
            (
                e.memory_fault,
                e.memory_fault_after_conversion,
                e.memory_fault_before_conversion
            ),
            (3, 2, 1)
        );
        // Any other exit ends the streak; the streak is per vCPU.
        m.handle_vcpu_exit(&mut v, Exit::Hlt);
        assert_eq!(v.fault_streak, 0);
        let mut other = VcpuExitState::default();
        for i in 1..=MAX_FAULT_STREAK {
            assert_eq!(fault(&m, &mut v, true, 0x5000), Action::Continue, "{i}");
        }
        assert_eq!(fault(&m, &mut other, true, 0x5000), Action::Continue);
        match fault(&m, &mut v, true, 0x5000) {
            Action::Stop(StopReason::Error(e)) => {
                assert!(e.contains("65 memory faults in a row"), "{e}")
            }
            a => panic!("{a:?}"),
        }
        // A conversion reported in between starts the streak afresh: a
        // page another vCPU keeps flipping is progress, however often the
        // reader loses.
        let mut v = VcpuExitState::default();
        for round in 0..4 {
            for i in 1..=MAX_FAULT_STREAK {
                assert_eq!(
                    fault(&m, &mut v, true, 0x5000),
                    Action::Continue,
                    "{round} {i}"
                );
            }
            let nr = if round % 2 == 0 {
                KVM_HC_MEM_UNSHARE
            } else {
                KVM_HC_MEM_SHARE
            };
            let mut ret = 0x55;
            let a = m.handle_exit(Exit::Hypercall {
                nr,
                args: [0x5000, 1, 0, 0, 0, 0],
                applied: true,
                ret: &mut ret,
            });
            assert_eq!((a, ret), (Action::Continue, 0));
        }
        // Not RAM: no race can explain it.
        match fault(&m, &mut other, false, 0x10_0000) {
            Action::Stop(StopReason::Error(e)) => assert!(e.contains("not guest RAM"), "{e}"),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn a_memory_fault_without_kvm_owned_memory_stops_the_vm() {
        let m = machine(false);
        match fault(&m, &mut VcpuExitState::default(), true, 0x5000) {
            Action::Stop(StopReason::Error(e)) => {
                assert!(
                    e.starts_with("KVM_EXIT_MEMORY_FAULT: KVM could not map a private"),
                    "{e}"
                )
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn an_enable_interrupted_by_a_stop_is_no_error_of_its_own() {
        use std::io::{Seek, Write as _};
        let cases: [(fn() -> GmemError, bool); 2] = [
            (
                || GmemError::Interrupted {
                    at: 0x1000,
                    left: 0x2000,
                },
                true,
            ),
            (
                || GmemError::Kvm {
                    op: "KVM_SW_PROTECTED_POPULATE",
                    start: 0,
                    end: 0x1000,
                    err: std::io::Error::from_raw_os_error(libc::EFAULT),
                },
                false,
            ),
        ];
        for (error, continues) in cases {
            let m = machine(false);
            // A shared backing with data, so that ENABLE has something to
            // populate.
            let path = std::env::temp_dir()
                .join(format!("protmem-exit-{}-{continues}", std::process::id()));
            let mut shared = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            std::fs::remove_file(&path).unwrap();
            shared.seek(std::io::SeekFrom::Start(0x1000)).unwrap();
            shared.write_all(&[1u8; 0x1000]).unwrap();
            shared.set_len(0x10_0000).unwrap();
            let g = crate::gmem::Gmem::new(Box::new(FailingPopulate(error)), shared);
            m.prot_mut().attach_gmem(g);
            let mut ret = 0x77;
            let a = m.handle_exit(Exit::Hypercall {
                nr: KVM_HC_ENABLE_MEM_PROTECTED,
                args: [0; 6],
                applied: true,
                ret: &mut ret,
            });
            if continues {
                assert_eq!(a, Action::Continue, "the stop ends the thread");
            } else {
                assert!(matches!(a, Action::Stop(StopReason::Error(_))), "{a:?}");
            }
        }
    }

    #[test]
    fn a_conversion_kvm_applied_without_guest_memfd_stops_the_vm() {
        // Without --protect=gmem KVM must not apply conversions itself,
        // and with it every conversion must come applied.
        let m = machine(false);
        let mut ret = 0x55;
        let action = m.handle_exit(Exit::Hypercall {
            nr: KVM_HC_MEM_SHARE,
            args: [0x1000, 1, 0, 0, 0, 0],
            applied: true,
            ret: &mut ret,
        });
        match action {
            Action::Stop(StopReason::Error(e)) => {
                assert!(e.contains("KVM_EXIT_HYPERCALL_APPLIED"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ret, 0x55, "the guest's return value left alone");
        assert_eq!(m.prot().shared_pages(), 0);
    }

    #[test]
    fn mmio_routes_to_devices_and_probe() {
        let (m, devices) = machine_with(true);
        let (blk, _) = devices.unwrap();
        let mut magic = [0u8; 4];
        m.handle_exit(Exit::MmioRead {
            addr: 0xd000_0000 + u64::from(VIRTIO_MMIO_MAGIC_VALUE),
            data: &mut magic,
        });
        assert_eq!(&magic, b"virt");
        assert_eq!(r(&mut locked(&blk), VIRTIO_MMIO_DEVICE_ID), 2);
        let mut id = [0u8; 4];
        m.handle_exit(Exit::MmioRead {
            addr: 0xd000_1000 + u64::from(VIRTIO_MMIO_DEVICE_ID),
            data: &mut id,
        });
        assert_eq!(u32::from_le_bytes(id), 4, "rng in slot 1");
        m.handle_exit(Exit::MmioWrite {
            addr: PROBE_BASE,
            data: &0x2000u64.to_le_bytes(),
        });
        let mut v = [0u8; 8];
        m.handle_exit(Exit::MmioRead {
            addr: PROBE_BASE + REG_ALLOWED,
            data: &mut v,
        });
        assert_eq!(u64::from_le_bytes(v), 1);
        m.handle_exit(Exit::MmioRead {
            addr: PROBE_BASE + REG_MAGIC,
            data: &mut v,
        });
        assert_eq!(u64::from_le_bytes(v) as u32, crate::devices::probe::MAGIC);
        let mut none = [0xffu8; 4];
        m.handle_exit(Exit::MmioRead {
            addr: 0xd000_5000,
            data: &mut none,
        });
        assert_eq!(none, [0; 4]);
        assert_eq!(m.exits.snapshot().mmio_unhandled, 1);
        let off = machine(false);
        off.handle_exit(Exit::MmioRead {
            addr: 0xd000_0000,
            data: &mut magic,
        });
        assert_eq!(magic, [0; 4], "absent device");
    }

    #[test]
    fn resets_reboot_while_reboots_are_left() {
        let m = machine(false);
        *locked(&m.boots) = Boots::new(2);
        let reboot = Action::Reboot(StopReason::Reset);
        assert_eq!(out(&m, 0x64, &[0xfe]), reboot, "i8042");
        assert_eq!(
            m.handle_exit(Exit::Shutdown),
            Action::Reboot(StopReason::Shutdown),
            "triple fault"
        );
        assert_eq!(
            m.handle_exit(Exit::SystemEvent {
                kind: SYSTEM_EVENT_RESET
            }),
            reboot
        );
        assert_eq!(
            m.handle_exit(Exit::SystemEvent {
                kind: SYSTEM_EVENT_SHUTDOWN
            }),
            Action::Stop(StopReason::Shutdown),
            "power off is no reset"
        );
        assert_eq!(out(&m, 0x64, &[0xfd]), Action::Continue);
        assert_eq!(
            locked(&m.boots).reboots_left(),
            2,
            "deciding consumes nothing"
        );

        m.reset(&StopReason::Reset).unwrap();
        assert_eq!(out(&m, 0x64, &[0xfe]), reboot);
        m.reset(&StopReason::Shutdown).unwrap();
        let boots = locked(&m.boots).clone();
        assert_eq!((boots.current(), boots.reboots_left()), (3, 0));
        assert_eq!(
            out(&m, 0x64, &[0xfe]),
            Action::Stop(StopReason::Reset),
            "the reset after the last reboot ends the VM"
        );
        assert_eq!(
            m.handle_exit(Exit::Shutdown),
            Action::Stop(StopReason::Shutdown)
        );
        assert_eq!(StopReason::Reset.exit_code(), 0);
    }

    #[test]
    fn a_panic_never_reboots() {
        let m = machine(false);
        *locked(&m.boots) = Boots::new(5);
        out(&m, 0x3f8, b"Kernel panic - not syncing: oops\n");
        assert_eq!(out(&m, 0x64, &[0xfe]), Action::Stop(StopReason::Panic));
        assert_eq!(
            m.handle_exit(Exit::Shutdown),
            Action::Stop(StopReason::Panic)
        );
        assert_eq!(StopReason::Panic.exit_code(), 2);
    }

    #[test]
    fn settle_lets_errors_and_panics_beat_a_reboot() {
        let m = machine(false);
        let reboot = Action::Reboot(StopReason::Reset);
        let err = Action::Stop(StopReason::Error("KVM_RUN: boom".into()));
        let panic = Action::Stop(StopReason::Panic);
        assert_eq!(m.settle(reboot.clone(), []), reboot);
        assert_eq!(
            m.settle(reboot.clone(), [Action::Reboot(StopReason::Shutdown)]),
            reboot,
            "the first reset wins"
        );
        assert_eq!(m.settle(reboot.clone(), [panic.clone(), err.clone()]), err);
        assert_eq!(m.settle(reboot.clone(), [panic.clone()]), panic);
        assert_eq!(m.settle(panic.clone(), [reboot.clone()]), panic);
        let stop = Action::Stop(StopReason::Reset);
        assert_eq!(m.settle(stop.clone(), [err.clone()]), stop, "a stop stands");
        out(&m, 0x3f8, b"Kernel panic - not syncing: late\n");
        assert_eq!(m.settle(reboot, []), panic, "panic on the console");
    }

    #[test]
    fn reset_puts_devices_and_protection_back_to_power_on() {
        use crate::devices::virtio::tests::{activate, Rings};
        use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_STATUS};
        let (m, devices) = machine_with(true);
        let (blk, rng) = devices.unwrap();
        *locked(&m.boots) = Boots::new(1);
        activate(&mut locked(&blk), &Rings::new(0x1000, 16));
        activate(&mut locked(&rng), &Rings::new(0x4000, 16));
        out(&m, 0x3f9, &[0x02]); // IER
        out(&m, 0x602, &[0x20]); // PM1_EN: GBL_EN
        m.handle_exit(Exit::MmioWrite {
            addr: PROBE_BASE,
            data: &0x3000u64.to_le_bytes(),
        });
        assert_eq!(hypercall(&m, KVM_HC_ENABLE_MEM_PROTECTED, [0; 3]), 0);
        assert_eq!(hypercall(&m, KVM_HC_MEM_SHARE, [0x1000, 3, 0]), 0);
        let exits = m.exits.snapshot();

        m.reset(&StopReason::Shutdown).unwrap();
        let blk_status = r(&mut locked(&blk), VIRTIO_MMIO_STATUS);
        let rng_status = r(&mut locked(&rng), VIRTIO_MMIO_STATUS);
        let blk_ready = r(&mut locked(&blk), VIRTIO_MMIO_QUEUE_READY);
        assert_eq!([blk_status, rng_status, blk_ready], [0; 3]);
        let mut ier = [0xffu8];
        m.handle_exit(Exit::IoIn {
            port: 0x3f9,
            size: 1,
            data: &mut ier,
        });
        assert_eq!(ier, [0], "UART at power-on");
        let mut pm1_en = [0xffu8; 2];
        m.handle_exit(Exit::IoIn {
            port: 0x602,
            size: 2,
            data: &mut pm1_en,
        });
        assert_eq!(pm1_en, [0; 2], "PM1_EN at power-on");
        let mut gpa = [0xffu8; 8];
        m.handle_exit(Exit::MmioRead {
            addr: PROBE_BASE,
            data: &mut gpa,
        });
        assert_eq!(gpa, [0; 8], "probe GPA register");
        assert!(!m.prot().enabled());
        assert_eq!(m.prot().shared_pages(), 0);
        assert_eq!(
            hypercall(&m, KVM_HC_MEM_SHARE, [0x1000, 1, 0]),
            KVM_EPERM.wrapping_neg(),
            "a normal VM until ENABLE"
        );
        assert_eq!(locked(&m.boots).current(), 2);
        assert_eq!(
            locked(&m.boots).resets(),
            [ResetRecord {
                boot: 1,
                reason: "shutdown",
                pages_shared: 3,
                protection_enabled: true,
            }]
        );
        assert_eq!(hypercall(&m, KVM_HC_ENABLE_MEM_PROTECTED, [0; 3]), 0);
        let boots: Vec<u64> = locked(&m.hypercalls)
            .enables()
            .iter()
            .map(|e| e.boot)
            .collect();
        assert_eq!(boots, [1, 2]);
        assert_eq!(
            m.exits.snapshot().hypercall,
            exits.hypercall + 2,
            "exit counters carry on"
        );
    }

    #[test]
    fn errors_stop_with_a_message() {
        let m = machine(false);
        let a = m.handle_exit(Exit::FailEntry { reason: 0x80000021 });
        assert_eq!(
            a,
            Action::Stop(StopReason::Error(
                "KVM_EXIT_FAIL_ENTRY, hardware reason 0x80000021".into()
            ))
        );
        assert!(matches!(
            m.handle_exit(Exit::Other("Debug".into())),
            Action::Stop(StopReason::Error(_))
        ));
        assert_eq!(StopReason::Error(String::new()).exit_code(), 1);
        assert_eq!(StopReason::Timeout.name(), "timeout");
    }
}
