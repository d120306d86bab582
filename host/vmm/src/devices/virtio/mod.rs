//! virtio-mmio transport (version 2, modern) and the devices behind it.
//!
//! Each device sits in a 4 KiB slot at `0xd000_0000 + slot * 0x1000` and
//! raises GSI `5 + slot`; the VMM announces the present ones in the ACPI
//! DSDT (`LNRO0005`, [`crate::acpi`]). Every device
//! offers `VIRTIO_F_VERSION_1` and `VIRTIO_F_ACCESS_PLATFORM`.
//!
//! [`MmioTransport`] is the one [`MmioDevice`] of every virtio device: it
//! owns the registers, the status state machine, the queues and the
//! device's handle to guest memory, and calls the [`VirtioDevice`] model:
//! [`VirtioDevice::activate`] when the driver sets DRIVER_OK,
//! [`VirtioDevice::queue_notify`] when the driver notifies a queue (its
//! ioeventfd, served by the event loop, or a QueueNotify write on the
//! vCPU), [`VirtioDevice::backend_event`] when its backend has something.
//! The model reaches its queues and guest memory only through a
//! [`QueueCtx`], which exists only while the device is active and borrows
//! guest memory one descriptor chain at a time ([`MemoryGuard`]); before a
//! queue is touched its three rings must be accessible to the device view,
//! otherwise the notification is dropped and counted.
//!
//! Notifications are suppressed both ways as the driver and the device
//! negotiated: while the transport drains a queue it tells the driver not
//! to notify it (`VRING_USED_F_NO_NOTIFY`, or the `avail_event` index
//! with `VIRTIO_RING_F_EVENT_IDX`), and it raises the interrupt only when
//! the driver asks for one (`VRING_AVAIL_F_NO_INTERRUPT`, or the
//! `used_event` index).

pub mod blk;
pub mod net;
pub mod rng;

use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;
use serde_json::{json, Value};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Backend, DeviceError, HangLine, IoEvent, MmioDevice};
use crate::protection::Protection;

/// Guest-physical address of slot 0.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// ISA IRQ of slot 0.
pub const FIRST_IRQ: u32 = 5;
/// "virt", the value of the MagicValue register.
const MAGIC: u32 = 0x7472_6976;
/// Version 2: the modern (virtio 1.x) register layout.
const MMIO_VERSION: u32 = 2;
/// Bytes of one split-ring descriptor.
const DESC_SIZE: u64 = 16;
/// Device event tokens from here on are the model's backend events;
/// below, queue indices.
const BACKEND_TOKEN: u32 = 0x1_0000;

/// Transport feature bits every device offers.
pub const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);

/// Register window of slot `slot`.
pub const fn slot_addr(slot: u64) -> u64 {
    MMIO_BASE + slot * MMIO_SIZE
}

/// IRQ of slot `slot`.
pub const fn slot_irq(slot: u32) -> u32 {
    FIRST_IRQ + slot
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Raising the device's interrupt failed.
    #[error("raising the interrupt of virtio device type {device} failed: {msg}")]
    Irq {
        /// virtio device type.
        device: u32,
        /// The trigger's error, printed.
        msg: String,
    },
    /// Creating a queue's notification eventfd failed.
    #[error("creating the notification eventfd of virtio device type {device}: {err}")]
    EventFd {
        /// virtio device type.
        device: u32,
        /// The OS error.
        err: std::io::Error,
    },
}

/// A virtio device model behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// The device's key in the stats file (`blk`, `rng`, `net`).
    fn name(&self) -> &'static str;
    /// Device-specific feature bits (the transport adds its own).
    fn device_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device configuration space.
    fn config(&self) -> Vec<u8>;
    /// The driver set DRIVER_OK with `features` negotiated: the device is
    /// live from now until [`VirtioDevice::reset`]. An error leaves it
    /// inactive (the transport sets DEVICE_NEEDS_RESET).
    fn activate(&mut self, _features: u64) -> Result<(), String> {
        Ok(())
    }
    /// The driver (or the machine) reset the device.
    fn reset(&mut self) {}
    /// The driver made buffers available in queue `queue`. By default
    /// every available chain goes through [`VirtioDevice::handle_chain`].
    fn queue_notify<G: MemoryGuard>(&mut self, queue: usize, ctx: &mut QueueCtx<'_, G>) {
        ctx.process_chains(queue, |descs, mem| self.handle_chain(queue, descs, mem));
    }
    /// Handles one descriptor chain of queue `queue`, returns the used length.
    ///
    /// `descs` is the chain as virtio-queue walked it: a chain cut short by
    /// a refused access arrives truncated.
    fn handle_chain<M: GuestMemory>(
        &mut self,
        _queue: usize,
        _descs: &[Descriptor],
        _mem: &M,
    ) -> u32 {
        0
    }
    /// Backend descriptors to wait on, with the device's tokens for them.
    fn backends(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// The backend descriptor named `token` is readable (only while active).
    fn backend_event<G: MemoryGuard>(&mut self, _token: u32, _ctx: &mut QueueCtx<'_, G>) {}
    /// The device's own counters for the stats file.
    fn stats(&self) -> Value;
}

/// Transport counters for the stats file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TransportStats {
    /// Queue notifications (QueueNotify writes and ioeventfd wake-ups).
    pub notifies: u64,
    /// Descriptor chains completed.
    pub chains: u64,
    /// Notifications dropped because a ring was not accessible.
    pub ring_denials: u64,
    /// Used-ring updates that failed (ring became inaccessible mid-way).
    pub used_ring_failures: u64,
    /// Status writes refused (out of order, or clearing bits).
    pub bad_status_writes: u64,
    /// Queue register writes refused (before FEATURES_OK or after DRIVER_OK).
    pub early_queue_writes: u64,
    /// Interrupts not raised because the driver asked for none
    /// (`VRING_AVAIL_F_NO_INTERRUPT`, or its `used_event` index).
    pub interrupts_suppressed: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// DRIVER_OK writes whose activation the device refused.
    pub activate_failures: u64,
}

/// Where the driver's queue notifications are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// KVM signals an ioeventfd per queue; the event loop serves it.
    IoEventFd,
    /// The QueueNotify write exits to the VMM and the vCPU serves it.
    Vcpu,
}

/// A virtio-mmio register window in front of device `D`, raising `T` and
/// reaching guest memory through `G`.
pub struct MmioTransport<D, T, G> {
    device: D,
    irq: T,
    mem: G,
    queue_evts: Vec<Arc<EventFd>>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    stats: TransportStats,
}

impl<D: VirtioDevice, T: Trigger, G: MemoryGuard> MmioTransport<D, T, G> {
    /// Wraps `device`, raising `irq` on used buffers and reaching guest
    /// memory through `mem` once the driver activated it. Notifications
    /// exit to the VMM (see [`MmioTransport::with_notify`]).
    pub fn new(device: D, irq: T, mem: G) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            irq,
            mem,
            queue_evts: Vec::new(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            stats: TransportStats::default(),
        }
    }

    /// Serves notifications as [`Notify`] says: with `IoEventFd`, one
    /// eventfd per queue for KVM to signal ([`MmioDevice::ioevents`]).
    pub fn with_notify(mut self, notify: Notify) -> Result<Self, VirtioError> {
        self.queue_evts.clear();
        if notify == Notify::IoEventFd {
            for _ in 0..self.queues.len() {
                let evt = EventFd::new(EFD_NONBLOCK).map_err(|err| VirtioError::EventFd {
                    device: self.device.device_type(),
                    err,
                })?;
                self.queue_evts.push(Arc::new(evt));
            }
        }
        Ok(self)
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// Transport counters.
    pub fn stats(&self) -> TransportStats {
        self.stats
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    /// One line of transport state for a hang report: status, interrupt
    /// status, and per queue the device's next avail/used positions and
    /// the indices the driver and device published in the rings (read
    /// through `mem`, so a private ring shows as unreadable).
    pub fn debug_line<M: GuestMemory>(&self, mem: &M) -> String {
        let mut s = format!(
            "virtio type={} status={:#x} interrupt_status={:#x}",
            self.device.device_type(),
            self.status,
            self.interrupt_status
        );
        for (i, q) in self.queues.iter().enumerate() {
            let idx = |r: Result<std::num::Wrapping<u16>, virtio_queue::Error>| {
                r.map_or("unreadable".to_string(), |w| w.0.to_string())
            };
            s.push_str(&format!(
                " q{i}:ready={} size={} next_avail={} next_used={} avail.idx={} used.idx={}",
                q.ready(),
                q.size(),
                q.next_avail(),
                q.next_used(),
                idx(q.avail_idx(mem, Ordering::Acquire)),
                idx(q.used_idx(mem, Ordering::Acquire)),
            ));
        }
        s
    }

    fn features(&self) -> u64 {
        self.device.device_features() | TRANSPORT_FEATURES
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Device reset: status 0, features unnegotiated, every queue
    /// unconfigured (not ready, maximum size, addresses and indices zero),
    /// no interrupt pending, the model inactive. The guest triggers it by
    /// writing 0 to Status; the VMM calls it on a reboot. The device's
    /// backend and the counters are kept (a disk stays a disk).
    pub fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queues.iter_mut().for_each(QueueT::reset);
        self.device.reset();
    }

    /// Guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config = self.device.config();
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            if let Some(src) = config.get(start..start + data.len()) {
                data.copy_from_slice(src);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let v = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => 0,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self.selected().is_some_and(|q| q.ready()).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset`; a QueueNotify serves the queue.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VirtioError> {
        // Config space is read-only for the features offered here.
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) || data.len() != 4 || offset % 4 != 0 {
            return Ok(());
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let configurable = self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if configurable => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NOTIFY => return self.queue_notify(v as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.write_status(v),
            reg => self.write_queue_reg(reg, v),
        }
        Ok(())
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let Some(mut v) = next_status(self.status, v) else {
            self.stats.bad_status_writes += 1;
            return;
        };
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let accepted = self.driver_features;
            let ok = accepted & !self.features() == 0 && accepted & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // Negotiation failed: the driver reads FEATURES_OK back as
                // clear, and nothing that needs it may stay set.
                v &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            }
        }
        let activating =
            v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        self.status = v;
        if activating {
            let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
            self.queues
                .iter_mut()
                .for_each(|q| q.set_event_idx(event_idx));
            if let Err(e) = self.device.activate(self.driver_features) {
                eprintln!(
                    "protmem-vmm: virtio device type {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.stats.activate_failures += 1;
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
    }

    fn write_queue_reg(&mut self, reg: u32, v: u32) {
        // Queues are set up between FEATURES_OK and DRIVER_OK (virtio 1.x
        // 3.1.1); a queue can always be disabled.
        let setup = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        let disabling = reg == VIRTIO_MMIO_QUEUE_READY && v == 0;
        if !setup && !disabling {
            self.stats.early_queue_writes += 1;
            return;
        }
        let Some(q) = self.selected() else { return };
        if q.ready() && reg != VIRTIO_MMIO_QUEUE_READY {
            return;
        }
        match reg {
            VIRTIO_MMIO_QUEUE_NUM => q.set_size(v as u16),
            VIRTIO_MMIO_QUEUE_READY => q.set_ready(v == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    /// Serves queue `index` (the driver notified it, by a QueueNotify write
    /// or its ioeventfd) and raises the interrupt if the device used
    /// buffers and the driver wants one.
    pub fn queue_notify(&mut self, index: usize) -> Result<(), VirtioError> {
        self.stats.notifies += 1;
        self.run_device(|device, ctx| device.queue_notify(index, ctx))
    }

    /// Runs the model with a [`QueueCtx`] if the device is active, then
    /// signals the queues it used.
    fn run_device(
        &mut self,
        f: impl FnOnce(&mut D, &mut QueueCtx<'_, G>),
    ) -> Result<(), VirtioError> {
        if !self.active() {
            return Ok(());
        }
        let mut ctx = QueueCtx {
            queues: &mut self.queues,
            mem: &self.mem,
            stats: &mut self.stats,
            used: 0,
        };
        f(&mut self.device, &mut ctx);
        let used = ctx.used;
        let mut raise = false;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if used & (1 << i) == 0 {
                continue;
            }
            // The used index must be visible before the driver's flags are
            // read, or a driver that re-enables interrupts and then checks
            // the used ring could miss both (virtio 1.x 2.7.7).
            fence(Ordering::SeqCst);
            if self.mem.with(|m| wants_interrupt(q, m)) {
                raise = true;
            } else {
                self.stats.interrupts_suppressed += 1;
            }
        }
        if !raise {
            return Ok(());
        }
        self.stats.interrupts += 1;
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        self.irq.trigger().map_err(|e| VirtioError::Irq {
            device: self.device.device_type(),
            msg: format!("{e:?}"),
        })
    }
}

impl<D, T, G> MmioDevice for MmioTransport<D, T, G>
where
    D: VirtioDevice,
    T: Trigger + Send,
    G: MemoryGuard + Send,
{
    fn name(&self) -> &'static str {
        match self.device.name() {
            "blk" => "virtio-blk",
            "rng" => "virtio-rng",
            "net" => "virtio-net",
            _ => "virtio",
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        Ok(MmioTransport::write(self, offset, data)?)
    }

    fn reset(&mut self) {
        MmioTransport::reset(self)
    }

    fn ioevents(&self) -> Vec<IoEvent> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| IoEvent {
                offset: u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
                datamatch: i as u32,
                evt: evt.clone(),
                token: i as u32,
            })
            .collect()
    }

    fn backends(&self) -> Vec<Backend> {
        self.device
            .backends()
            .into_iter()
            .map(|(fd, token)| Backend {
                fd,
                token: BACKEND_TOKEN + token,
            })
            .collect()
    }

    fn handle_event(&mut self, token: u32) -> Result<(), DeviceError> {
        if token < BACKEND_TOKEN {
            return Ok(self.queue_notify(token as usize)?);
        }
        let t = token - BACKEND_TOKEN;
        Ok(self.run_device(|device, ctx| device.backend_event(t, ctx))?)
    }

    fn stats(&self) -> Option<(&'static str, Value)> {
        Some((
            self.device.name(),
            json!({"transport": self.stats, "requests": self.device.stats()}),
        ))
    }

    fn hang_line(&self) -> HangLine {
        match self.mem.try_with(|m| self.debug_line(m)) {
            Some(l) => HangLine::Line(l),
            None => HangLine::Busy,
        }
    }
}

/// A device's view of its queues while it is active: the queues, guest
/// memory (borrowed per chain through the [`MemoryGuard`]) and the
/// transport counters. The transport signals the queues marked used when
/// the device returns.
pub struct QueueCtx<'a, G> {
    queues: &'a mut [Queue],
    mem: &'a G,
    stats: &'a mut TransportStats,
    used: u64,
}

impl<G: MemoryGuard> QueueCtx<'_, G> {
    /// Handles every available chain of queue `index` with `f` (which
    /// returns the used length) and puts it in the used ring, one chain
    /// per memory borrow.
    ///
    /// The driver is told not to notify the queue while it is drained,
    /// then notifications are enabled again (virtio 1.x 2.7.10: with
    /// `EVENT_IDX`, `avail_event` becomes the next chain to serve), and if
    /// the driver published chains meanwhile, the queue is drained and
    /// notifications enabled once more: `avail_event` must name the chain
    /// after the last one served, or the driver, already past it, never
    /// notifies again. A pass that serves nothing after notifications said
    /// there was more ends it: a ring whose index makes no sense (it never
    /// yields a chain) cannot keep this thread here.
    pub fn process_chains(&mut self, index: usize, mut f: impl FnMut(&[Descriptor], &G::M) -> u32) {
        let mem = self.mem;
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.ready()) else {
            return;
        };
        let mut after_more = false;
        loop {
            let quiet =
                mem.with(|m| rings_accessible(queue, m) && queue.disable_notification(m).is_ok());
            let mut served = 0u64;
            let stop = loop {
                match mem.with(|m| next_chain(queue, m, &mut f)) {
                    Step::Used => {
                        served += 1;
                        self.stats.chains += 1;
                        self.used |= 1 << index;
                    }
                    Step::Empty => break false,
                    Step::RingDenied => {
                        self.stats.ring_denials += 1;
                        break true;
                    }
                    Step::UsedRingFailed => {
                        // Handled, but the driver will not hear of it.
                        self.stats.chains += 1;
                        self.stats.used_ring_failures += 1;
                        break true;
                    }
                }
            };
            if stop || !quiet || (after_more && served == 0) {
                break;
            }
            if !mem.with(|m| queue.enable_notification(m)).unwrap_or(false) {
                break;
            }
            after_more = true;
        }
    }

    /// Runs `f` on queue `index` with guest memory borrowed once, if the
    /// queue is ready and its rings accessible (else the attempt is
    /// counted as a ring denial and `None` returned).
    pub fn with_queue<R>(
        &mut self,
        index: usize,
        f: impl FnOnce(&mut Queue, &G::M) -> R,
    ) -> Option<R> {
        let mem = self.mem;
        let queue = self.queues.get_mut(index).filter(|q| q.ready())?;
        let r = mem.with(|m| rings_accessible(queue, m).then(|| f(queue, m)));
        if r.is_none() {
            self.stats.ring_denials += 1;
        }
        r
    }

    /// Whether queue `index` exists and the driver made it ready.
    pub fn ready(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(Queue::ready)
    }

    /// Records `n` chains put in queue `index`'s used ring: the transport
    /// raises the interrupt if the driver wants one.
    pub fn used(&mut self, index: usize, n: u64) {
        if n > 0 {
            self.stats.chains += n;
            self.used |= 1 << index;
        }
    }

    /// Counts a used-ring update that failed.
    pub fn used_ring_failed(&mut self) {
        self.stats.used_ring_failures += 1;
    }
}

/// Handles the next available chain of `queue`, if any.
fn next_chain<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    f: &mut impl FnMut(&[Descriptor], &M) -> u32,
) -> Step {
    if !rings_accessible(queue, mem) {
        return Step::RingDenied;
    }
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Step::Empty;
    };
    let head = chain.head_index();
    let descs: Vec<Descriptor> = chain.collect();
    let len = f(&descs, mem);
    if queue.add_used(mem, head, len).is_err() {
        return Step::UsedRingFailed;
    }
    Step::Used
}

/// What handling one chain did.
enum Step {
    /// A chain was handled and put in the used ring.
    Used,
    /// No chain was available.
    Empty,
    /// A ring is not accessible to the device.
    RingDenied,
    /// A chain was handled, but the used ring could not be written.
    UsedRingFailed,
}

/// Guest memory as a device borrows it, one descriptor chain at a time.
///
/// The VMM's implementation is the protection lock: a borrow holds it for
/// reading, so an UNSHARE (which takes it for writing) waits until the
/// chain in flight is done, and every later access sees the page private.
pub trait MemoryGuard {
    /// The memory a borrow gives.
    type M: GuestMemory;
    /// Runs `f` with the memory borrowed.
    fn with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> R;
    /// Runs `f` if the memory can be borrowed without waiting.
    fn try_with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> Option<R> {
        Some(self.with(f))
    }
}

impl MemoryGuard for RwLock<Protection> {
    type M = Protection;

    fn with<R>(&self, f: impl FnOnce(&Protection) -> R) -> R {
        f(&self.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn try_with<R>(&self, f: impl FnOnce(&Protection) -> R) -> Option<R> {
        self.try_read().ok().map(|p| f(&p))
    }
}

impl<P: MemoryGuard> MemoryGuard for Arc<P> {
    type M = P::M;

    fn with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> R {
        P::with(self, f)
    }

    fn try_with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> Option<R> {
        P::try_with(self, f)
    }
}

impl<P: MemoryGuard> MemoryGuard for &P {
    type M = P::M;

    fn with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> R {
        P::with(self, f)
    }

    fn try_with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> Option<R> {
        P::try_with(self, f)
    }
}

impl MemoryGuard for Protection {
    type M = Protection;

    fn with<R>(&self, f: impl FnOnce(&Protection) -> R) -> R {
        f(self)
    }
}

impl MemoryGuard for vm_memory::GuestMemoryMmap<()> {
    type M = Self;

    fn with<R>(&self, f: impl FnOnce(&Self) -> R) -> R {
        f(self)
    }
}

/// The device status after the driver writes `v` (not 0: that resets) to
/// Status while it is `cur`, or `None` if the write is out of order:
/// the driver may only add bits, in the order ACKNOWLEDGE, DRIVER,
/// FEATURES_OK, DRIVER_OK (virtio 1.x 3.1.1), and FAILED at any time.
/// FEATURES_OK is then subject to feature negotiation.
pub fn next_status(cur: u32, v: u32) -> Option<u32> {
    const KNOWN: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK
        | VIRTIO_CONFIG_S_FAILED;
    // DEVICE_NEEDS_RESET is the device's: a driver writing back what it
    // read keeps it, and cannot set it.
    let (cur_driver, kept) = (
        cur & !VIRTIO_CONFIG_S_NEEDS_RESET,
        cur & VIRTIO_CONFIG_S_NEEDS_RESET,
    );
    let v = v & !kept;
    let needs = |bit: u32, before: u32| v & bit == 0 || v & before != 0;
    let ok = v & cur_driver == cur_driver
        && v & !KNOWN == 0
        && needs(VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        && needs(VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER)
        && needs(VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK);
    ok.then_some(v | kept)
}

/// Whether the driver wants an interrupt for the buffers just used in
/// `q`: with `VIRTIO_RING_F_EVENT_IDX`, when the used index passed its
/// `used_event`; without, unless it set `VRING_AVAIL_F_NO_INTERRUPT` in
/// the available ring's flags (virtio-queue's `needs_notification`
/// ignores that flag, so it is read here). An unreadable ring never
/// suppresses.
fn wants_interrupt<M: GuestMemory>(q: &mut Queue, mem: &M) -> bool {
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    !mem.read_obj::<u16>(GuestAddress(q.avail_ring()))
        .is_ok_and(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}

/// Whether the descriptor table, available ring and used ring of `q` are
/// all accessible through `mem` (split-ring sizes, virtio 1.x 2.7; with
/// the event-index words).
fn rings_accessible<M: GuestMemory>(q: &Queue, mem: &M) -> bool {
    let n = u64::from(q.size());
    let rings = [
        (q.desc_table(), DESC_SIZE * n, Permissions::Read),
        (q.avail_ring(), 6 + 2 * n, Permissions::Read),
        (q.used_ring(), 6 + 8 * n, Permissions::Write),
    ];
    rings
        .iter()
        .all(|&(addr, len, perm)| mem.check_range(GuestAddress(addr), len as usize, perm))
}

#[cfg(test)]
pub(crate) mod tests {
    //! A minimal driver side: lays out split rings in guest memory and
    //! programs a transport the way Linux's virtio_mmio does.

    use super::*;
    use crate::devices::serial::tests::CountingIrq;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestMemoryBackend};

    /// Split-ring layout of one queue in guest memory.
    pub(crate) struct Rings {
        pub(crate) desc: u64,
        pub(crate) avail: u64,
        pub(crate) used: u64,
        pub(crate) size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Rings {
        /// Rings of `size` entries in the 3 pages from `base`.
        pub(crate) fn new(base: u64, size: u16) -> Self {
            Rings {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// Adds a chain of `(gpa, len, device_writable)` buffers, makes it
        /// available and returns its head.
        pub(crate) fn add_chain<G: GuestMemoryBackend>(
            &mut self,
            guest: &G,
            bufs: &[(u64, u32, bool)],
        ) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let d = Descriptor::new(addr, len, flags, self.next_desc);
                guest
                    .write_obj(d, GuestAddress(self.desc + u64::from(idx) * DESC_SIZE))
                    .unwrap();
            }
            let slot = u64::from(self.avail_idx % self.size);
            guest
                .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            guest
                .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
            head
        }

        /// Used-ring index.
        pub(crate) fn used_idx<G: GuestMemoryBackend>(&self, guest: &G) -> u16 {
            guest.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used element `i`: (descriptor head, length).
        pub(crate) fn used_elem<G: GuestMemoryBackend>(&self, guest: &G, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(i % self.size);
            (
                guest.read_obj(GuestAddress(at)).unwrap(),
                guest.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }
    }

    fn w<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
        reg: u32,
        v: u32,
    ) {
        t.write(u64::from(reg), &v.to_le_bytes()).unwrap();
    }

    pub(crate) fn r<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
        reg: u32,
    ) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates all offered features and sets queue 0 up on `rings`.
    pub(crate) fn activate<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
        rings: &Rings,
    ) {
        activate_queues(t, &[rings], !0);
    }

    /// Negotiates the offered features that are in `want`, sets queue `i`
    /// up on `rings[i]` and sets DRIVER_OK.
    pub(crate) fn activate_queues<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
        rings: &[&Rings],
        want: u64,
    ) {
        w(t, VIRTIO_MMIO_STATUS, 0);
        w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w(t, VIRTIO_MMIO_STATUS, s);
        for sel in 0..2 {
            w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            let f = r(t, VIRTIO_MMIO_DEVICE_FEATURES) & (want >> (32 * sel)) as u32;
            w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            w(t, VIRTIO_MMIO_DRIVER_FEATURES, f);
        }
        w(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_ne!(r(t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        for (i, rings) in rings.iter().enumerate() {
            w(t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
            assert_eq!(r(t, VIRTIO_MMIO_QUEUE_READY), 0);
            assert!(r(t, VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(rings.size));
            w(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(rings.size));
            for (lo, hi, a) in [
                (
                    VIRTIO_MMIO_QUEUE_DESC_LOW,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH,
                    rings.desc,
                ),
                (
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                    rings.avail,
                ),
                (
                    VIRTIO_MMIO_QUEUE_USED_LOW,
                    VIRTIO_MMIO_QUEUE_USED_HIGH,
                    rings.used,
                ),
            ] {
                w(t, lo, a as u32);
                w(t, hi, (a >> 32) as u32);
            }
            w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        let s = s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        w(t, VIRTIO_MMIO_STATUS, s);
    }

    /// Writes QueueNotify for queue `q`.
    pub(crate) fn kick_queue<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
        q: u32,
    ) {
        w(t, VIRTIO_MMIO_QUEUE_NOTIFY, q);
    }

    /// Writes QueueNotify for queue 0.
    pub(crate) fn kick<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
    ) {
        w(t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    /// A device that fills every writable buffer with its queue index.
    #[derive(Default)]
    struct Echo {
        /// Extra feature bits offered.
        extra: u64,
        /// `activate` refuses.
        refuse: bool,
        /// Features of each activation.
        activations: Vec<u64>,
        resets: u32,
        /// Whether the driver was told not to notify while a chain was
        /// handled (the used ring's flags or event index as seen then).
        quiet_seen: Vec<u16>,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "echo"
        }
        fn stats(&self) -> Value {
            Value::Null
        }
        fn device_features(&self) -> u64 {
            (1 << 3) | self.extra
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn config(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        }
        fn activate(&mut self, features: u64) -> Result<(), String> {
            self.activations.push(features);
            if self.refuse {
                return Err("no backend".into());
            }
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn handle_chain<M: GuestMemory>(&mut self, q: usize, descs: &[Descriptor], mem: &M) -> u32 {
            // Rings of the tests: used ring at 0x3000, 16 entries; its
            // flags, and the avail_event word after the entries.
            let flags = mem.read_obj::<u16>(GuestAddress(0x3000)).unwrap_or(0xffff);
            let avail_event = mem
                .read_obj::<u16>(GuestAddress(0x3000 + 4 + 8 * 16))
                .unwrap_or(0xffff);
            self.quiet_seen.push(flags | avail_event << 8);
            let mut n = 0;
            for d in descs.iter().filter(|d| d.is_write_only()) {
                let buf = vec![q as u8 + 0xe0; d.len() as usize];
                if mem.write_slice(&buf, d.addr()).is_ok() {
                    n += d.len();
                }
            }
            n
        }
    }

    fn mem() -> vm_memory::GuestMemoryMmap {
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn identification_registers() {
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), mem());
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            0b11,
            "VERSION_1, ACCESS_PLATFORM"
        );
        let mut cfg = [0u8; 4];
        t.read(0x104, &mut cfg);
        assert_eq!(cfg, [5, 6, 7, 8]);
        t.read(0x106, &mut cfg);
        assert_eq!(cfg, [0; 4], "past the end of config space");
        let mut odd = [0xffu8; 2];
        t.read(0x0, &mut odd);
        assert_eq!(odd, [0, 0], "registers are 32-bit only");
    }

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

    #[test]
    fn status_bits_come_in_order_and_never_go_back() {
        assert_eq!(next_status(0, ACK), Some(ACK));
        assert_eq!(next_status(ACK, ACK | DRV), Some(ACK | DRV));
        assert_eq!(
            next_status(0, ACK | DRV),
            Some(ACK | DRV),
            "several steps at once"
        );
        assert_eq!(next_status(0, DRV), None, "DRIVER before ACKNOWLEDGE");
        assert_eq!(
            next_status(ACK | DRV, ACK | DRV | DOK),
            None,
            "DRIVER_OK before FEATURES_OK"
        );
        assert_eq!(
            next_status(ACK | DRV | FOK, ACK | FOK),
            None,
            "clears DRIVER"
        );
        assert_eq!(
            next_status(ACK, ACK | 0x40),
            None,
            "NEEDS_RESET is the device's"
        );
        let failed = ACK | DRV | VIRTIO_CONFIG_S_FAILED;
        assert_eq!(next_status(ACK | DRV, failed), Some(failed));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        #[test]
        fn status_machine_holds_under_any_writes(writes in proptest::collection::vec(0u32..256, 0..24)) {
            let m = mem();
            let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
            w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
            for v in writes {
                let before = t.status();
                w(&mut t, VIRTIO_MMIO_STATUS, v);
                let s = t.status();
                if v == 0 {
                    proptest::prop_assert_eq!(s, 0);
                    continue;
                }
                // Never clears a bit, never skips a step.
                proptest::prop_assert_eq!(s & before, before);
                proptest::prop_assert!(s & DRV == 0 || s & ACK != 0);
                proptest::prop_assert!(s & FOK == 0 || s & DRV != 0);
                proptest::prop_assert!(s & DOK == 0 || s & FOK != 0);
                // Queues only change between FEATURES_OK and DRIVER_OK.
                let want = if t.queues[0].size() == 8 { 4 } else { 8 };
                w(&mut t, VIRTIO_MMIO_QUEUE_NUM, want);
                let configurable = s & FOK != 0 && s & (DOK | VIRTIO_CONFIG_S_FAILED) == 0;
                proptest::prop_assert_eq!(u32::from(t.queues[0].size()) == want, configurable);
            }
        }
    }

    #[test]
    fn queue_setup_before_features_ok_is_refused() {
        let m = mem();
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
        w(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_ne!(t.queues[0].size(), 8);
        assert!(!t.queues[0].ready());
        assert_eq!(t.stats().early_queue_writes, 2);
        w(&mut t, VIRTIO_MMIO_STATUS, ACK | DRV | DOK);
        assert_eq!(
            t.status(),
            ACK | DRV,
            "DRIVER_OK before FEATURES_OK refused"
        );
        assert_eq!(t.stats().bad_status_writes, 1);
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits() {
        let m = mem();
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w(&mut t, VIRTIO_MMIO_STATUS, s);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(
            t.status() & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "legacy driver refused"
        );
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b111);
        w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(
            t.status() & VIRTIO_CONFIG_S_FEATURES_OK,
            0,
            "bit 34 not offered"
        );
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b01);
        w(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        assert_ne!(t.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0, "reset");
    }

    #[test]
    fn notify_processes_chains_and_interrupts() {
        let m = mem();
        let irq = CountingIrq::default();
        let mut t = MmioTransport::new(Echo::default(), irq.clone(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        let h0 = rings.add_chain(&m, &[(0x8000, 4, false), (0x9000, 16, true)]);
        let h1 = rings.add_chain(&m, &[(0xa000, 8, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 2);
        assert_eq!(rings.used_elem(&m, 0), (u32::from(h0), 16));
        assert_eq!(rings.used_elem(&m, 1), (u32::from(h1), 8));
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0xa000)).unwrap(),
            0xe0e0_e0e0_e0e0_e0e0
        );
        assert_eq!(irq.count(), 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        kick(&mut t);
        assert_eq!(irq.count(), 1, "nothing new, no interrupt");
        assert_eq!(t.stats().chains, 2);
        assert_eq!(t.stats().notifies, 2);

        // The driver suppresses interrupts: used, but not raised.
        m.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(rings.avail))
            .unwrap();
        rings.add_chain(&m, &[(0xa000, 8, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 3);
        assert_eq!(irq.count(), 1, "suppressed");
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(t.stats().interrupts_suppressed, 1);
        m.write_obj(0u16, GuestAddress(rings.avail)).unwrap();
        rings.add_chain(&m, &[(0xa000, 8, true)]);
        kick(&mut t);
        assert_eq!(irq.count(), 2, "raised again once the flag is clear");
    }

    /// Every register value the driver can read, for each queue selected.
    fn registers<D: VirtioDevice, T: Trigger, G: MemoryGuard>(
        t: &mut MmioTransport<D, T, G>,
    ) -> Vec<(u32, u32, u32)> {
        let mut out = Vec::new();
        for sel in 0..2 {
            w(t, VIRTIO_MMIO_QUEUE_SEL, sel);
            for fsel in 0..2 {
                w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, fsel);
                out.push((
                    sel,
                    VIRTIO_MMIO_DEVICE_FEATURES + 0x100 * fsel,
                    r(t, VIRTIO_MMIO_DEVICE_FEATURES),
                ));
            }
            w(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
            for reg in (0..VIRTIO_MMIO_CONFIG + 8).step_by(4) {
                out.push((sel, reg, r(t, reg)));
            }
        }
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        out
    }

    #[test]
    fn reset_returns_an_active_device_to_its_initial_registers() {
        let m = mem();
        let irq = CountingIrq::default();
        let mut t = MmioTransport::new(Echo::default(), irq.clone(), m.clone());
        let initial = registers(&mut t);
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        rings.add_chain(&m, &[(0x9000, 16, true)]);
        rings.add_chain(&m, &[(0xa000, 16, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 2);
        assert_ne!(registers(&mut t), initial, "activated");

        t.reset();
        assert_eq!(registers(&mut t), initial);
        assert_eq!(t.status(), 0);
        assert_eq!(t.driver_features, 0, "features unnegotiated");
        let q = &t.queues[0];
        assert!(!q.ready());
        assert_eq!(
            (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()),
            (16, 0, 0, 0)
        );
        assert_eq!((q.next_avail(), q.next_used()), (0, 0));
        kick(&mut t);
        assert_eq!(t.stats().chains, 2, "a reset device ignores notifications");
        assert_eq!(t.stats().notifies, 2, "counters are cumulative");

        // A new driver (the next kernel) sets it up on other rings from index 0.
        let mut rings = Rings::new(0x20000, 8);
        activate(&mut t, &rings);
        let head = rings.add_chain(&m, &[(0xb000, 4, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 1);
        assert_eq!(rings.used_elem(&m, 0), (u32::from(head), 4));
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn queue_address_is_frozen_while_ready() {
        let m = mem();
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
        let rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
        assert_eq!(t.queues[0].desc_table(), 0x1000);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no queue 7");
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    }

    #[test]
    fn the_device_is_activated_at_driver_ok_and_reset_with_the_transport() {
        let m = mem();
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
        let rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        assert_eq!(t.device().activations, [(1 << 3) | TRANSPORT_FEATURES]);
        let s = t.status();
        w(&mut t, VIRTIO_MMIO_STATUS, s);
        assert_eq!(t.device().activations.len(), 1, "once per DRIVER_OK");
        let resets = t.device().resets;
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.device().resets, resets + 1);

        // A device that cannot start: DEVICE_NEEDS_RESET, and its queues
        // are never served.
        let echo = Echo {
            refuse: true,
            ..Echo::default()
        };
        let mut t = MmioTransport::new(echo, CountingIrq::default(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(t.stats().activate_failures, 1);
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 0);
        // The driver writing back what it read keeps the bit; a reset clears it.
        let s = t.status();
        w(&mut t, VIRTIO_MMIO_STATUS, s);
        assert_eq!(t.stats().bad_status_writes, 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn the_driver_is_told_not_to_notify_while_a_queue_is_drained() {
        use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
        let m = mem();
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        let no_notify = VRING_USED_F_NO_NOTIFY as u16;
        assert!(t.device().quiet_seen.iter().all(|f| f & 0xff == no_notify));
        assert_eq!(
            m.read_obj::<u16>(GuestAddress(rings.used)).unwrap(),
            0,
            "notifications enabled again when done"
        );
    }

    #[test]
    fn with_event_idx_interrupts_follow_used_event() {
        let m = mem();
        let irq = CountingIrq::default();
        let echo = Echo {
            extra: 1 << VIRTIO_RING_F_EVENT_IDX,
            ..Echo::default()
        };
        let mut t = MmioTransport::new(echo, irq.clone(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        let used_event = GuestAddress(rings.avail + 4 + 2 * 16);
        let avail_event = GuestAddress(rings.used + 4 + 8 * 16);
        // used_event 0: interrupt once the first buffer is used.
        m.write_obj(0u16, used_event).unwrap();
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        assert_eq!(irq.count(), 1);
        assert_eq!(
            m.read_obj::<u16>(avail_event).unwrap(),
            1,
            "the driver may notify from the next buffer on"
        );
        // The driver wants the interrupt only after the 4th used buffer.
        m.write_obj(3u16, used_event).unwrap();
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        assert_eq!(irq.count(), 1, "used index 2 has not passed 3");
        assert_eq!(t.stats().interrupts_suppressed, 1);
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        assert_eq!(irq.count(), 2, "used index 4 passed 3");
        assert_eq!(t.stats().interrupts, 2);
        // The avail ring's NO_INTERRUPT flag means nothing with EVENT_IDX.
        m.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(rings.avail))
            .unwrap();
        m.write_obj(4u16, used_event).unwrap();
        rings.add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        assert_eq!(irq.count(), 3);
    }

    /// Guest memory whose driver publishes one more chain (a 4-byte
    /// writable buffer) on another CPU, as it were, at the device's second
    /// borrow after it served its first chain: after its drain found the
    /// ring empty, just before it enables notifications again.
    struct RacingDriver {
        mem: vm_memory::GuestMemoryMmap,
        rings: std::cell::RefCell<Rings>,
        borrows_after_first: std::cell::Cell<u32>,
    }

    impl MemoryGuard for RacingDriver {
        type M = vm_memory::GuestMemoryMmap;

        fn with<R>(&self, f: impl FnOnce(&Self::M) -> R) -> R {
            if self.rings.borrow().used_idx(&self.mem) == 1 {
                let n = self.borrows_after_first.get() + 1;
                self.borrows_after_first.set(n);
                if n == 2 {
                    self.rings
                        .borrow_mut()
                        .add_chain(&self.mem, &[(0x8000, 4, true)]);
                }
            }
            f(&self.mem)
        }
    }

    /// With `EVENT_IDX`, `avail_event` names the chain after the last one
    /// served, also when the driver published while notifications were
    /// being enabled again: a driver already past `avail_event` never
    /// notifies again (the stalls of virtio-net's transmit queue).
    #[test]
    fn avail_event_follows_chains_published_while_notifications_come_back() {
        let m = mem();
        let echo = Echo {
            extra: 1 << VIRTIO_RING_F_EVENT_IDX,
            ..Echo::default()
        };
        let guard = RacingDriver {
            mem: m.clone(),
            rings: std::cell::RefCell::new(Rings::new(0x1000, 16)),
            borrows_after_first: std::cell::Cell::new(0),
        };
        let mut t = MmioTransport::new(echo, CountingIrq::default(), &guard);
        activate(&mut t, &guard.rings.borrow());
        guard.rings.borrow_mut().add_chain(&m, &[(0x8000, 4, true)]);
        kick(&mut t);
        let avail_event = GuestAddress(0x3000 + 4 + 8 * 16);
        assert!(
            guard.borrows_after_first.get() >= 2,
            "the driver published its second chain"
        );
        assert_eq!(guard.rings.borrow().used_idx(&m), 2, "both chains served");
        assert_eq!(
            m.read_obj::<u16>(avail_event).unwrap(),
            2,
            "the driver is asked to notify from the third chain on"
        );
    }

    /// A driver that publishes an available index the ring cannot hold
    /// (more than its size ahead) gets nothing served, and the device
    /// returns instead of looking again and again.
    #[test]
    fn an_available_index_that_makes_no_sense_does_not_hold_the_device() {
        let m = mem();
        let mut t = MmioTransport::new(Echo::default(), CountingIrq::default(), m.clone());
        let rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        m.write_obj(0x8000u16, GuestAddress(rings.avail + 2))
            .unwrap();
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 0);
        assert_eq!(t.stats().chains, 0);
    }
}
