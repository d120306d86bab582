//! virtio-net over a TAP: frames with their virtio-net header in both
//! directions, checksum and segmentation offloads, mergeable receive
//! buffers.
//!
//! Queue 0 receives, queue 1 transmits (no control queue, one pair).
//! Offered: `CSUM`/`GUEST_CSUM`, `HOST_TSO4/6` and `GUEST_TSO4/6` (the
//! offloads a Linux guest turns on), `MRG_RXBUF`, `MAC`, and
//! `VIRTIO_RING_F_EVENT_IDX`; the transport adds `VERSION_1` and
//! `ACCESS_PLATFORM`, so a protected guest's driver maps every buffer
//! through the DMA API and bounces it through its shared swiotlb pool. The
//! header is `struct virtio_net_hdr_v1` (12 bytes), which is also the
//! TAP's vnet header: the guest's offload requests go to the host kernel
//! unchanged, and frames the host hands over with checksums or segments
//! left to do reach the guest as the guest allowed at activation (the
//! TAP's offloads follow the negotiated `GUEST_*` bits).
//!
//! Both directions run on the event loop. Transmit: every available chain
//! of the TX queue is read (through the checked device view, one chain
//! per borrow of guest memory) into one frame for the TAP. Receive: when
//! the TAP has frames or the driver posts buffers, each frame goes into
//! as many receive buffers as it needs (`num_buffers` in its header), all
//! of them written under one borrow of guest memory; a frame that does
//! not fit in the buffers posted waits, the device asks the driver to
//! notify it when it adds some, and reading from the TAP stops until
//! then. A guest buffer the device may not access (a private page) drops
//! the frame, which is counted.

pub mod tap;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use serde::Serialize;
use serde_json::{json, Value};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use self::tap::{NetBackend, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN};
use super::{MemoryGuard, QueueCtx, VirtioDevice};

/// Receive queue.
pub const RX: usize = 0;
/// Transmit queue.
pub const TX: usize = 1;
/// Size of each queue.
const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB TSO packet, an Ethernet header
/// with a VLAN tag, the vnet header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 18 + 65535;
/// Offset of `num_buffers` in the vnet header.
const NUM_BUFFERS: usize = 10;
/// MAC address the guest gets unless another is given.
pub const DEFAULT_MAC: [u8; 6] = [0x06, 0x00, 0x0a, 0x00, 0x02, 0x02];

/// Network counters for the stats file (`virtio.net.requests`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStats {
    /// Frames received from the TAP and delivered to the guest.
    pub rx_frames: u64,
    /// Bytes of them, headers included: what the device wrote to guest
    /// memory (through the bounce pool, for a protected guest).
    pub rx_bytes: u64,
    /// Receive buffers filled.
    pub rx_buffers: u64,
    /// Frames that took more than one receive buffer (mergeable).
    pub rx_merged: u64,
    /// Times a frame waited for the driver to post receive buffers.
    pub rx_waits: u64,
    /// Frames dropped: no buffer could ever hold them, or a buffer was not
    /// accessible (a private page).
    pub rx_dropped: u64,
    /// Reads from the TAP that failed (other than `EAGAIN`).
    pub rx_backend_errors: u64,
    /// Frames the guest transmitted and the TAP took.
    pub tx_frames: u64,
    /// Bytes of them, headers included: what the device read from guest
    /// memory.
    pub tx_bytes: u64,
    /// Transmit chains dropped: malformed, too long, or not accessible.
    pub tx_dropped: u64,
    /// Writes to the TAP that failed.
    pub tx_backend_errors: u64,
}

/// A virtio-net device over backend `B` (a [`tap::Tap`]).
pub struct Net<B> {
    backend: B,
    mac: [u8; 6],
    /// Negotiated features while active, else 0.
    features: u64,
    /// One frame from the backend...
    rx_frame: Vec<u8>,
    /// ...of this length, not delivered yet (waiting for buffers).
    rx_pending: Option<usize>,
    tx_frame: Vec<u8>,
    stats: NetStats,
}

/// What delivering one received frame did.
enum Delivery {
    /// Delivered in this many buffers.
    Done(u64),
    /// The buffers posted (up to this available index) cannot hold it yet.
    Wait(u16),
    /// Dropped; this many buffers were returned empty.
    Dropped(u64),
}

impl<B: NetBackend> Net<B> {
    /// A device in front of `backend`, with MAC address `mac`.
    pub fn new(backend: B, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            features: 0,
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0; MAX_FRAME],
            stats: NetStats::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> NetStats {
        self.stats
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The TAP offloads the negotiated `features` allow: what the guest
    /// accepts in frames it receives.
    pub fn tap_offloads(features: u64) -> u32 {
        let has = |bit: u32| features & (1 << bit) != 0;
        let mut f = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            f |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                f |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                f |= TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_ECN) && f & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                f |= TUN_F_TSO_ECN;
            }
        }
        f
    }

    /// Reads one transmitted chain into a frame for the backend.
    fn tx_chain<M: GuestMemory>(&mut self, descs: &[Descriptor], mem: &M) {
        let mut len = 0;
        for d in descs.iter().filter(|d| !d.is_write_only()) {
            let l = d.len() as usize;
            let Some(dst) = self.tx_frame.get_mut(len..len + l) else {
                self.stats.tx_dropped += 1;
                return;
            };
            if mem.read_slice(dst, d.addr()).is_err() {
                self.stats.tx_dropped += 1;
                return;
            }
            len += l;
        }
        if len < VNET_HDR_LEN {
            self.stats.tx_dropped += 1;
            return;
        }
        match self.backend.write_frame(&self.tx_frame[..len]) {
            Ok(()) => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len as u64;
            }
            Err(_) => self.stats.tx_backend_errors += 1,
        }
    }

    /// Moves frames from the backend to the receive queue until the
    /// backend has none or the guest no room.
    fn process_rx<G: MemoryGuard>(&mut self, ctx: &mut QueueCtx<'_, G>) {
        if !ctx.ready(RX) {
            return;
        }
        let mergeable = self.features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        // Whether the ring was looked at again after a wait without a
        // frame delivered since: once is enough (more buffers notify).
        let mut relooked = false;
        loop {
            let n = match self.rx_pending {
                Some(n) => n,
                None => match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.stats.rx_backend_errors += 1;
                        return;
                    }
                },
            };
            if n < VNET_HDR_LEN {
                self.stats.rx_dropped += 1;
                self.rx_pending = None;
                continue;
            }
            self.rx_pending = Some(n);
            let frame = &mut self.rx_frame[..n];
            let stats = &mut self.stats;
            let Some(delivery) = ctx.with_queue(RX, |q, m| deliver(q, m, frame, mergeable, stats))
            else {
                // The rings are not accessible: keep the frame for later.
                return;
            };
            match delivery {
                Delivery::Done(k) => {
                    self.rx_pending = None;
                    relooked = false;
                    ctx.used(RX, k);
                }
                Delivery::Dropped(k) => {
                    self.rx_pending = None;
                    self.stats.rx_dropped += 1;
                    ctx.used(RX, k);
                }
                Delivery::Wait(seen) => {
                    self.stats.rx_waits += 1;
                    // Ask the driver to notify the queue when it posts
                    // another buffer, and look once more in case it did
                    // since the buffers were counted (virtio 1.x 2.7.10).
                    // With EVENT_IDX the request names the first buffer
                    // not yet posted (`seen`), not the first one still
                    // unused: the driver is past that one and would never
                    // notify.
                    let more = ctx.with_queue(RX, |q, m| {
                        let start = q.next_avail();
                        q.set_next_avail(seen);
                        let asked = q.enable_notification(m);
                        q.set_next_avail(start);
                        asked.is_ok()
                            && q.avail_idx(m, Ordering::Acquire)
                                .is_ok_and(|idx| idx.0 != seen)
                    });
                    if relooked || more != Some(true) {
                        return;
                    }
                    relooked = true;
                }
            }
        }
    }
}

/// Delivers `frame` (vnet header first) into the receive queue `q`:
/// takes as many available chains as it needs (one without mergeable
/// buffers), sets `num_buffers`, writes it and puts the chains in the used
/// ring. Nothing is written before enough buffers are found; if there are
/// not, the chains taken go back to the available ring.
fn deliver<M: GuestMemory>(
    q: &mut Queue,
    mem: &M,
    frame: &mut [u8],
    mergeable: bool,
    stats: &mut NetStats,
) -> Delivery {
    let start = q.next_avail();
    let mut chains: Vec<(u16, Vec<(GuestAddress, u32)>)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            let seen = q.next_avail();
            q.set_next_avail(start);
            return Delivery::Wait(seen);
        };
        let head = chain.head_index();
        let bufs: Vec<(GuestAddress, u32)> = chain
            .filter(|d| d.is_write_only())
            .map(|d| (d.addr(), d.len()))
            .collect();
        room += bufs.iter().map(|b| b.1 as usize).sum::<usize>();
        chains.push((head, bufs));
        if !mergeable || chains.len() >= usize::from(q.size()) {
            break;
        }
    }
    let give_back = |q: &mut Queue, chains: &[(u16, Vec<(GuestAddress, u32)>)]| {
        for (head, _) in chains {
            // A failure here leaves the queue as broken as the ring is.
            let _ = q.add_used(mem, *head, 0);
        }
        Delivery::Dropped(chains.len() as u64)
    };
    if room < frame.len() {
        // Even every buffer it may take cannot hold it.
        return give_back(q, &chains);
    }
    let count = chains.len() as u16;
    frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
    let mut at = 0;
    let mut lens = Vec::with_capacity(chains.len());
    for (_, bufs) in &chains {
        let mut used = 0u32;
        for &(addr, len) in bufs {
            let take = (len as usize).min(frame.len() - at);
            if take == 0 {
                break;
            }
            if mem.write_slice(&frame[at..at + take], addr).is_err() {
                return give_back(q, &chains);
            }
            at += take;
            used += take as u32;
        }
        lens.push(used);
    }
    for ((head, _), len) in chains.iter().zip(lens) {
        if q.add_used(mem, *head, len).is_err() {
            return Delivery::Dropped(0);
        }
    }
    stats.rx_frames += 1;
    stats.rx_bytes += frame.len() as u64;
    stats.rx_buffers += u64::from(count);
    if count > 1 {
        stats.rx_merged += 1;
    }
    Delivery::Done(u64::from(count))
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "net"
    }

    fn device_features(&self) -> u64 {
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .iter()
        .fold(0, |f, bit| f | 1 << bit)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_net_config: mac[6], then status, max_virtqueue_pairs
        // and mtu, which no feature offered here makes the driver read.
        let mut c = self.mac.to_vec();
        c.extend([0u8; 6]);
        c
    }

    fn activate(&mut self, features: u64) -> Result<(), String> {
        let offloads = Self::tap_offloads(features);
        self.backend
            .set_offload(offloads)
            .map_err(|e| format!("setting TAP offloads {offloads:#x}: {e}"))?;
        self.features = features;
        Ok(())
    }

    fn reset(&mut self) {
        self.features = 0;
        self.rx_pending = None;
    }

    fn queue_notify<G: MemoryGuard>(&mut self, queue: usize, ctx: &mut QueueCtx<'_, G>) {
        match queue {
            RX => self.process_rx(ctx),
            TX => ctx.process_chains(TX, |descs, mem| {
                self.tx_chain(descs, mem);
                0
            }),
            _ => {}
        }
    }

    fn backends(&self) -> Vec<(RawFd, u32)> {
        vec![(self.backend.fd(), 0)]
    }

    fn backend_event<G: MemoryGuard>(&mut self, _token: u32, ctx: &mut QueueCtx<'_, G>) {
        self.process_rx(ctx);
    }

    fn stats(&self) -> Value {
        json!(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::tap::SocketBackend;
    use super::*;
    use crate::devices::bus::MmioBus;
    use crate::devices::event_loop::EventLoop;
    use crate::devices::serial::tests::CountingIrq;
    use crate::devices::virtio::tests::{activate_queues, kick_queue, Rings};
    use crate::devices::virtio::{MmioTransport, Notify};
    use crate::devices::MmioDevice;
    use crate::exit::locked;
    use crate::protection::Protection;
    use hypercall::GpaRange;
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::Duration;
    use vm_memory::GuestMemoryMmap;

    type Mem = GuestMemoryMmap<()>;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A frame as the TAP gives it: a vnet header, then `len` payload
    /// bytes of a pattern.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    /// An active device on `mem` with every feature the driver wants of
    /// `want`; its RX rings at 0x1000, TX rings at 0x4000.
    fn device<G: MemoryGuard>(
        mem: G,
        want: u64,
    ) -> (
        MmioTransport<Net<SocketBackend>, CountingIrq, G>,
        UnixDatagram,
        Rings,
        Rings,
        CountingIrq,
    ) {
        let (backend, peer) = SocketBackend::pair().unwrap();
        let irq = CountingIrq::default();
        let mut t = MmioTransport::new(Net::new(backend, DEFAULT_MAC), irq.clone(), mem);
        let (rx, tx) = (Rings::new(0x1000, 16), Rings::new(0x4000, 16));
        activate_queues(&mut t, &[&rx, &tx], want);
        (t, peer, rx, tx, irq)
    }

    fn backend_event<G: MemoryGuard + Send>(
        t: &mut MmioTransport<Net<SocketBackend>, CountingIrq, G>,
    ) {
        let token = MmioDevice::backends(t)[0].token;
        MmioDevice::handle_event(t, token).unwrap();
    }

    #[test]
    fn features_config_and_offloads() {
        let m = mem();
        let (t, ..) = device(m.clone(), !0);
        let offered = t.device().device_features();
        for bit in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(offered & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(
            t.device().backend().offload,
            Some(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
            "set at DRIVER_OK from the guest's features"
        );
        let mut mac = [0u8; 6];
        let mut t = t;
        t.read(0x100, &mut mac[..4]);
        t.read(0x104, &mut mac[4..]);
        assert_eq!(mac, DEFAULT_MAC);
        // A guest without GUEST_CSUM gets no offloaded frames.
        let (t, ..) = device(m, !(1 << VIRTIO_NET_F_GUEST_CSUM));
        assert_eq!(t.device().backend().offload, Some(0));
        assert_eq!(
            Net::<SocketBackend>::tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4),
            0
        );
    }

    #[test]
    fn transmit_joins_the_chain_into_one_frame() {
        let m = mem();
        let (mut t, peer, _rx, mut tx, irq) = device(m.clone(), !0);
        let f = frame(1500, 3);
        m.write_slice(&f[..VNET_HDR_LEN], GuestAddress(0x20000))
            .unwrap();
        m.write_slice(&f[VNET_HDR_LEN..], GuestAddress(0x21000))
            .unwrap();
        tx.add_chain(
            &m,
            &[
                (0x20000, VNET_HDR_LEN as u32, false),
                (0x21000, 1500, false),
            ],
        );
        // A chain without a whole header is dropped, not sent.
        tx.add_chain(&m, &[(0x22000, 6, false)]);
        kick_queue(&mut t, TX as u32);
        let mut got = vec![0u8; 4096];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        peer.set_nonblocking(true).unwrap();
        assert!(peer.recv(&mut got).is_err(), "one frame only");
        assert_eq!(tx.used_idx(&m), 2);
        assert_eq!(tx.used_elem(&m, 0).1, 0);
        let s = t.device().counters();
        assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 1512, 1));
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn a_frame_spans_as_many_mergeable_buffers_as_it_needs() {
        let m = mem();
        let (mut t, peer, mut rx, _tx, irq) = device(m.clone(), !0);
        for i in 0..4 {
            rx.add_chain(&m, &[(0x30000 + i * 0x1000, 2048, true)]);
        }
        let f = frame(5000, 9);
        peer.send(&f).unwrap();
        peer.send(&frame(100, 1)).unwrap();
        backend_event(&mut t);
        assert_eq!(rx.used_idx(&m), 4, "3 buffers, then 1");
        let lens: Vec<u32> = (0..4).map(|i| rx.used_elem(&m, i).1).collect();
        assert_eq!(lens, [2048, 2048, 5012 - 4096, 112]);
        let mut got = vec![0u8; 5012];
        for (i, chunk) in got.chunks_mut(2048).enumerate() {
            m.read_slice(chunk, GuestAddress(0x30000 + i as u64 * 0x1000))
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
        let second = m.read_obj::<u16>(GuestAddress(0x33000 + 10)).unwrap();
        assert_eq!(second, 1);
        let s = t.device().counters();
        assert_eq!(
            (s.rx_frames, s.rx_buffers, s.rx_merged, s.rx_bytes),
            (2, 4, 1, 5124)
        );
        assert!(irq.count() >= 1);
    }

    #[test]
    fn a_frame_waits_for_buffers_and_goes_when_the_driver_posts_them() {
        let m = mem();
        let (mut t, peer, mut rx, _tx, _irq) = device(m.clone(), !0);
        rx.add_chain(&m, &[(0x30000, 2048, true)]);
        peer.send(&frame(3000, 5)).unwrap();
        backend_event(&mut t);
        assert_eq!(rx.used_idx(&m), 0, "not enough room: nothing used");
        assert_eq!(t.device().counters().rx_waits, 1);
        // The device asked to be notified when the next buffer is posted:
        // a Linux driver notifies when the index it publishes passes
        // avail_event (vring_need_event), and posting the second buffer
        // moves it from 1 to 2.
        let avail_event = m
            .read_obj::<u16>(GuestAddress(rx.used + 4 + 8 * 16))
            .unwrap();
        assert_eq!(avail_event, 1);
        let need_event = |event: u16, new: u16, old: u16| {
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        };
        assert!(need_event(avail_event, 2, 1), "the driver notifies");
        rx.add_chain(&m, &[(0x31000, 2048, true)]);
        kick_queue(&mut t, RX as u32);
        assert_eq!(rx.used_idx(&m), 2);
        assert_eq!(t.device().counters().rx_frames, 1);
    }

    #[test]
    fn without_mergeable_buffers_one_buffer_takes_a_frame_or_it_is_dropped() {
        let m = mem();
        let (mut t, peer, mut rx, _tx, _irq) = device(m.clone(), !(1 << VIRTIO_NET_F_MRG_RXBUF));
        rx.add_chain(&m, &[(0x30000, 1024, true)]);
        rx.add_chain(&m, &[(0x31000, 1024, true), (0x32000, 1024, true)]);
        peer.send(&frame(1500, 2)).unwrap();
        peer.send(&frame(1500, 2)).unwrap();
        backend_event(&mut t);
        assert_eq!(rx.used_idx(&m), 2);
        assert_eq!(rx.used_elem(&m, 0).1, 0, "too small: returned empty");
        assert_eq!(rx.used_elem(&m, 1).1, 1512, "a chain of two buffers");
        let s = t.device().counters();
        assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
    }

    #[test]
    fn private_buffers_are_never_written_and_the_frame_is_dropped() {
        let (guest, dev) = crate::ram::GuestRam::new(0x10_0000).unwrap().into_views();
        let mut dev = Protection::new(dev);
        dev.enable().unwrap();
        dev.share(GpaRange::new(0x1000, 6).unwrap()).unwrap(); // both rings
        dev.share(GpaRange::new(0x30000, 1).unwrap()).unwrap();
        let dev = Arc::new(RwLock::new(dev));
        let (mut t, peer, mut rx, _tx, _irq) = device(dev.clone(), !0);
        guest
            .write_slice(&[0x5a; 2048], GuestAddress(0x31000))
            .unwrap();
        rx.add_chain(&guest, &[(0x30000, 2048, true)]);
        rx.add_chain(&guest, &[(0x31000, 2048, true)]);
        peer.send(&frame(3000, 4)).unwrap();
        let denied = dev.read().unwrap().stats().denied;
        backend_event(&mut t);
        assert_eq!(rx.used_idx(&guest), 2);
        assert_eq!(
            (rx.used_elem(&guest, 0).1, rx.used_elem(&guest, 1).1),
            (0, 0)
        );
        let mut buf = [0u8; 2048];
        guest.read_slice(&mut buf, GuestAddress(0x31000)).unwrap();
        assert_eq!(buf, [0x5a; 2048], "the private page untouched");
        assert_eq!(t.device().counters().rx_dropped, 1);
        assert!(dev.read().unwrap().stats().denied > denied);
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("timed out waiting for {what}");
    }

    /// The device on the bus, served by the event loop: frames from the
    /// TAP wake it, and so does the guest's TX notification (its ioeventfd).
    #[test]
    fn the_event_loop_moves_frames_both_ways() {
        let m = mem();
        let (backend, peer) = SocketBackend::pair().unwrap();
        let net = MmioTransport::new(
            Net::new(backend, DEFAULT_MAC),
            CountingIrq::default(),
            m.clone(),
        )
        .with_notify(Notify::IoEventFd)
        .unwrap();
        let dev = Arc::new(Mutex::new(net));
        let mut bus = MmioBus::new();
        bus.insert(0xd000_2000, 0x1000, dev.clone()).unwrap();
        let (mut rx, mut tx) = (Rings::new(0x1000, 16), Rings::new(0x4000, 16));
        activate_queues(&mut *locked(&dev), &[&rx, &tx], !0);
        let ioevents = MmioDevice::ioevents(&*locked(&dev));
        assert_eq!(ioevents.len(), 2);
        let _l = EventLoop::spawn(&bus, |e| panic!("{e}")).unwrap();
        for i in 0..8 {
            rx.add_chain(&m, &[(0x30000 + i * 0x1000, 2048, true)]);
        }
        for i in 0..4u8 {
            peer.send(&frame(1000, i)).unwrap();
        }
        wait_until("four frames received", || rx.used_idx(&m) == 4);
        tx.add_chain(&m, &[(0x20000, 100, false)]);
        ioevents[TX].evt.write(1).unwrap();
        let mut got = [0u8; 200];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(peer.recv(&mut got).unwrap(), 100);
        wait_until("the TX chain used", || tx.used_idx(&m) == 1);
    }

    #[test]
    fn a_receive_ring_with_a_nonsense_index_does_not_hold_the_device() {
        let m = mem();
        let (mut t, peer, rx, _tx, _irq) = device(m.clone(), !0);
        m.write_obj(0x8000u16, GuestAddress(rx.avail + 2)).unwrap();
        peer.send(&frame(100, 1)).unwrap();
        backend_event(&mut t);
        kick_queue(&mut t, RX as u32);
        assert_eq!(rx.used_idx(&m), 0);
        assert_eq!(t.device().counters().rx_frames, 0);
    }
}
