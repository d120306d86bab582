// SPDX-License-Identifier: GPL-2.0

//! The cost of a conversion, measured on demand through debugfs.
//!
//! Writing a page count to `kvm_protmem/bench_convert` allocates that many
//! pages (in blocks of up to `MAX_PAGE_ORDER`, each physically
//! contiguous), zeroes them, then for each block times
//! `set_memory_decrypted()` (SHARE) and `set_memory_encrypted()` (UNSHARE)
//! in guest TSC cycles: the whole kernel path a driver pays, page tables
//! and hypercalls included. Reading the file prints the last result:
//!
//! `pages P blocks B hypercalls H share_cycles S unshare_cycles U tsc_khz K`
//!
//! A block the host refused to convert is leaked, never freed: its state
//! is unknown, so it must not return to the page allocator.

use crate::{hv, state, sys, State, SHARED};
use kernel::{
    prelude::*,
    sync::atomic::{Atomic, Relaxed},
    uaccess::UserSliceReader,
};

/// Most pages one measurement may take: 256 MiB.
const MAX_PAGES: u64 = (256 << 20) >> sys::PAGE_SHIFT;

/// One measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    /// Pages converted both ways.
    pub pages: u64,
    /// Blocks they were allocated in (one `set_memory_*()` call each way).
    pub blocks: u64,
    /// SHARE and UNSHARE hypercalls issued.
    pub hypercalls: u64,
    /// TSC cycles in `set_memory_decrypted()`, all blocks.
    pub share_cycles: u64,
    /// TSC cycles in `set_memory_encrypted()`, all blocks.
    pub unshare_cycles: u64,
}

/// The last [`Figures`], field by field (pages 0: none yet).
static LAST: [Atomic<u64>; 5] = [const { Atomic::new(0) }; 5];

/// The largest block order for `left` pages.
fn order_for(left: u64) -> u32 {
    (u64::BITS - 1 - left.leading_zeros()).min(sys::MAX_PAGE_ORDER)
}

/// Shares and unshares `pages` freshly allocated pages; see the module.
pub(crate) fn measure(pages: u64) -> Result<Figures> {
    if pages == 0 || pages > MAX_PAGES {
        return Err(EINVAL);
    }
    if state() != State::Enabled {
        return Err(ENODEV);
    }
    let mut blocks: KVec<sys::Block> = KVec::new();
    let mut left = pages;
    while left > 0 {
        let block = sys::Block::alloc(order_for(left)).ok_or(ENOMEM)?;
        left -= block.pages() as u64;
        blocks.push(block, GFP_KERNEL)?;
    }
    let calls = || {
        let l = SHARED.lock();
        l.stats.shares + l.stats.unshares
    };
    let before = calls();
    let mut f = Figures {
        pages,
        blocks: blocks.len() as u64,
        ..Figures::default()
    };
    let mut refused = None;
    for (i, block) in blocks.iter_mut().enumerate() {
        // Nothing private may reach the host: the pages held someone's data.
        block.zero();
        let t0 = hv::tsc();
        // SAFETY: zeroed just now; nothing else maps the block.
        let shared = unsafe { block.share() };
        let t1 = hv::tsc();
        let private = if shared == 0 {
            // SAFETY: no device was given the block.
            unsafe { block.unshare() }
        } else {
            shared
        };
        let t2 = hv::tsc();
        if private != 0 {
            refused = Some(i);
            break;
        }
        f.share_cycles += t1 - t0;
        f.unshare_cycles += t2 - t1;
    }
    if let Some(i) = refused {
        // Its state is unknown: never give it back to the page allocator.
        if let Ok(block) = blocks.remove(i) {
            block.leak();
        }
        return Err(EIO);
    }
    f.hypercalls = calls() - before;
    drop(blocks);
    for (slot, v) in LAST.iter().zip([
        f.pages,
        f.blocks,
        f.hypercalls,
        f.share_cycles,
        f.unshare_cycles,
    ]) {
        slot.store(v, Relaxed);
    }
    Ok(f)
}

/// The debugfs write: a page count.
pub(crate) fn write(_: &(), r: &mut UserSliceReader) -> Result {
    let mut buf = [0u8; 24];
    let n = r.len();
    if n > buf.len() {
        return Err(EINVAL);
    }
    r.read_slice(&mut buf[..n])?;
    let s = core::str::from_utf8(&buf[..n]).map_err(|_| EINVAL)?;
    let pages = s.trim().parse::<u64>().map_err(|_| EINVAL)?;
    measure(pages).map(|_| ())
}

/// The debugfs read: the last result.
pub(crate) fn show(_: &(), f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
    let v: [u64; 5] = core::array::from_fn(|i| LAST[i].load(Relaxed));
    writeln!(
        f,
        "pages {} blocks {} hypercalls {} share_cycles {} unshare_cycles {} tsc_khz {}",
        v[0],
        v[1],
        v[2],
        v[3],
        v[4],
        sys::tsc_khz()
    )
}
