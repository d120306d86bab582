//! The guest's devices: COM1, the virtio-mmio transport and its devices,
//! and the probe.

pub mod probe;
pub mod serial;
pub mod virtio;
