//! The guest's devices and the model they share.
//!
//! Every MMIO device implements [`MmioDevice`] and sits on the
//! [`bus::MmioBus`] at its address range (rust-vmm's `vm-device` model):
//! the vCPU's exit dispatch, the machine reset, the quiesce before a
//! reboot, the hang report of `--timeout` and the stats file are each one
//! loop over the bus. A device that serves I/O off the vCPU threads names
//! the eventfds it wants: queue notifications, which KVM signals as
//! ioeventfds without an exit to userspace, and backend descriptors (a
//! TAP); the one [`event_loop::EventLoop`] thread waits on all of them
//! with epoll and hands each event to its device, under the device's lock.
//!
//! The virtio-mmio transport ([`virtio::MmioTransport`]) implements the
//! trait once for every virtio device; the probe implements it directly.
//! COM1 and the ACPI PM1 registers ([`acpi_pm`]) are port I/O devices and
//! stay outside the bus.
//!
//! Adding a device: write its model in its own file (for virtio, a
//! [`virtio::VirtioDevice`]) and register it in the VMM's bus
//! registration (`vmm::register_devices`).

pub mod acpi_pm;
pub mod bus;
pub mod event_loop;
pub mod probe;
pub mod serial;
pub mod virtio;

use std::os::fd::RawFd;
use std::sync::Arc;

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

/// A device failure that stops the VM (a guest's bad request is not one:
/// devices answer those with an error status and count them).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The virtio transport failed (its interrupt could not be raised).
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioError),
}

/// A queue notification the device wants KVM to signal on an eventfd
/// (`KVM_IOEVENTFD`): a guest write of `datamatch` (4 bytes) at `offset`
/// in the device's window signals `evt` instead of exiting to userspace.
#[derive(Clone, Debug)]
pub struct IoEvent {
    /// Offset of the register in the device's window.
    pub offset: u64,
    /// The value written (a queue index).
    pub datamatch: u32,
    /// The eventfd; the event loop drains it and calls
    /// [`MmioDevice::handle_event`] with `token`.
    pub evt: Arc<EventFd>,
    /// The device's name for this event.
    pub token: u32,
}

/// A backend descriptor the device wants to hear about (readable, edge
/// triggered: the device reads until `EAGAIN` or until it has no room).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The descriptor, owned by the device for as long as it exists.
    pub fd: RawFd,
    /// The device's name for its events.
    pub token: u32,
}

/// What a device says about itself in the hang report of `--timeout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HangLine {
    /// Nothing worth a line.
    None,
    /// One line of state.
    Line(String),
    /// The state could not be read now (a lock it needs is taken).
    Busy,
}

/// A device on the MMIO bus: its register window, its reset, the events
/// it serves off the vCPU threads, and what the VMM reports about it.
///
/// The bus keeps each device behind its own mutex: register accesses of
/// the vCPU threads and events of the event loop are serialised per
/// device, and devices run in parallel with each other.
pub trait MmioDevice: Send {
    /// Short name (`virtio-blk`, `probe`), for messages.
    fn name(&self) -> &'static str;
    /// Guest read of `data.len()` bytes at `offset` in the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` in the window.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Machine reset: back to the power-on state. The backend (a disk
    /// file, a TAP) and the counters stay.
    fn reset(&mut self);
    /// Stops touching guest memory before a reboot clears it; by default
    /// a reset.
    fn quiesce(&mut self) {
        self.reset();
    }
    /// The queue notifications to take as ioeventfds.
    fn ioevents(&self) -> Vec<IoEvent> {
        Vec::new()
    }
    /// The backend descriptors to wait on.
    fn backends(&self) -> Vec<Backend> {
        Vec::new()
    }
    /// An event named `token` (of [`MmioDevice::ioevents`] or
    /// [`MmioDevice::backends`]) fired.
    fn handle_event(&mut self, _token: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    /// `(key, counters)` of the device in the stats file's `virtio` object.
    fn stats(&self) -> Option<(&'static str, Value)> {
        None
    }
    /// The device's line in the hang report.
    fn hang_line(&self) -> HangLine {
        HangLine::None
    }
}
