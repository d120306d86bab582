//! Userspace VMM for KVM protected-memory Linux guests.
//!
//! Boots a bzImage with an initramfs on KVM, gives it a serial console,
//! virtio-mmio block, entropy and network devices on an MMIO bus
//! ([`devices`]) and a probe device, and, with
//! `--protect`, enforces the guest's protected-memory hypercalls: devices
//! reach guest RAM only through [`protection::Protection`], which refuses
//! private pages. The KVM-touching code is the thin shell in [`vmm`]; the
//! rest is plain logic tested without KVM.

#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]
#![warn(rust_2018_idioms)]

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod cpuid;
pub mod devices;
pub mod diag;
pub mod exit;
pub mod gmem;
pub mod gmem_kvm;
pub mod hostile;
pub mod hypercalls;
pub mod kick;
pub mod kvm_stats;
pub mod mptable;
pub mod protection;
pub mod ram;
pub mod stats;
pub mod vmm;
