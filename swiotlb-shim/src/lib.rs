// SPDX-License-Identifier: GPL-2.0

//! Guest-side range logic for sharing pages with a KVM protected-memory
//! host (cargo build).
//!
//! The logic lives in `ranges.rs`, which the kernel build also compiles,
//! unchanged, into the guest. There it reaches the ABI as `crate::abi`;
//! here that name is the `hypercall` crate.

#![no_std]

use hypercall as abi;

mod ranges;

pub use ranges::*;

#[cfg(test)]
mod tests;
