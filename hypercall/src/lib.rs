// SPDX-License-Identifier: GPL-2.0

//! KVM protected-memory paravirtual ABI (cargo build).
//!
//! The definitions live in `abi.rs`, which the kernel build also compiles,
//! unchanged, into the guest. This file only adds what a cargo crate needs.

#![no_std]

mod abi;

pub use abi::*;

#[cfg(test)]
mod tests;
