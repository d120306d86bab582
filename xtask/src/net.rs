//! The network scenarios: a guest on the VMM's virtio-net, whose TAP L1
//! sets up, talking TCP to L1 through its bounce pool.
//!
//! For a run whose guest command line has `kpm.net`, the L1 script
//! ([`l1_up`], [`l1_down`]) creates the TAP `kpmtap0` with 10.0.2.1/24,
//! fills `/tmp/net-www` with a random blob (`kpm.netmib=N` MiB, default
//! 4) and a random 4 KiB page, serves them with busybox `httpd` on port
//! 8080, takes uploads on port 5001 with busybox `nc` (the sink records
//! each upload's checksum and size), and after the run prints what it
//! served and received (`kpm-l1: net-files`, `kpm-l1: net-uploads`). The
//! guest (`tests/guest/init`, `kpm.net`) brings eth0 up as 10.0.2.2,
//! downloads, uploads and makes many short requests, and prints its own
//! checksums; the judges compare the two sides.

use crate::e2e::{self, num, row, scan_row, stats, Row, Scenario};
use crate::nested::{L2Outcome, L2Run};

/// The TAP interface in L1.
pub const TAP: &str = "kpmtap0";
/// L1's address on it (the guest is 10.0.2.2).
const L1_ADDR: &str = "10.0.2.1/24";
/// Short requests the guest makes: 8 clients x 16.
const MANY: u64 = 128;
/// A secret for the scan of `net-protected` (as e2e's).
const SECRET: &str = "kpm.secret=c0ffee5ec2e7";
/// The bounce pool of `net-pool-pressure` (`swiotlb=`, 2 KiB slabs).
pub const PRESSURE_SLABS: u64 = 512;

/// Whether the guest of `cmdline` uses the network (`kpm.net`).
pub fn wants_net(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == "kpm.net")
}

/// MiB of the blob and the uploads (`kpm.netmib=`, default 4).
pub fn net_mib(cmdline: &str) -> u64 {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kpm.netmib="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(4)
}

/// The VMM arguments of a network run.
pub fn vmm_args() -> [String; 2] {
    ["--net".into(), format!("tap={TAP}")]
}

/// L1 script lines before run `r`'s VMM starts: the TAP, the files, the
/// HTTP server and the upload sink ("" for a run without the network).
pub fn l1_up(r: &L2Run) -> String {
    if !wants_net(&r.cmdline) {
        return String::new();
    }
    let n = &r.name;
    let count = net_mib(&r.cmdline) * 16;
    format!(
        "tunctl -t {TAP} >/dev/null\n\
         ip addr add {L1_ADDR} dev {TAP}\n\
         ip link set {TAP} up\n\
         mkdir -p /tmp/net-www\n\
         dd if=/dev/urandom of=/tmp/net-www/blob bs=65536 count={count} 2>/dev/null\n\
         dd if=/dev/urandom of=/tmp/net-www/small bs=4096 count=1 2>/dev/null\n\
         echo \"kpm-l1: net-files {n} blob $(sha256sum < /tmp/net-www/blob | cut -d' ' -f1) $(wc -c < /tmp/net-www/blob) small $(sha256sum < /tmp/net-www/small | cut -d' ' -f1)\"\n\
         cat > /tmp/net-sink <<'EOF'\n\
         #!/bin/sh\n\
         # One upload: its size back at once, its checksum to the list.\n\
         f=/tmp/net-up.$$\n\
         cat > $f\n\
         wc -c < $f\n\
         exec <&- >&-\n\
         echo \"$(sha256sum < $f | cut -d' ' -f1) $(wc -c < $f)\" >> /tmp/net-uploads\n\
         rm -f $f\n\
         EOF\n\
         chmod 755 /tmp/net-sink\n\
         : > /tmp/net-uploads\n\
         httpd -f -p 10.0.2.1:8080 -h /tmp/net-www &\n\
         httpd_pid=$!\n\
         nc -ll -p 5001 -e /tmp/net-sink &\n\
         sink_pid=$!\n"
    )
}

/// L1 script lines after run `r`'s VMM exited: what the sink received,
/// then everything taken down.
pub fn l1_down(r: &L2Run) -> String {
    if !wants_net(&r.cmdline) {
        return String::new();
    }
    let n = &r.name;
    format!(
        "sleep 1\n\
         kill $httpd_pid $sink_pid 2>/dev/null\n\
         wait $httpd_pid $sink_pid 2>/dev/null\n\
         echo \"kpm-l1: net-uploads {n} $(tr '\\n' ';' < /tmp/net-uploads)\"\n\
         tunctl -d {TAP} >/dev/null\n\
         rm -rf /tmp/net-www /tmp/net-uploads /tmp/net-sink\n"
    )
}

/// The network scenarios of `cargo xtask test`.
pub fn scenarios() -> Vec<Scenario> {
    let net = |name, expect, protect: &[&str], extra: &str, judge| {
        let mut s = e2e::scenario(name, expect, protect, extra, judge);
        s.run.vmm_args.extend(vmm_args());
        s
    };
    vec![
        net(
            "net-protected",
            "--protect with virtio-net on L1's TAP: random data each way and 128 short requests intact, every byte through the bounce pool, offloads and mergeable buffers negotiated, the secret scan finds nothing",
            &["--protect"],
            &format!("kunit.enable=0 kpm.net {SECRET}"),
            judge_protected,
        ),
        net(
            "net-unprotected",
            "without --protect: the same network traffic intact",
            &[],
            "kunit.enable=0 kpm.net",
            judge_unprotected,
        ),
        net(
            "net-pool-pressure",
            "--protect with a 1 MiB bounce pool, the receive ring posted, then 4 downloads and 4 uploads at once: all intact, the pool grows or the guest says it is full and keeps working",
            &["--protect"],
            &format!("kunit.enable=0 kpm.net kpm.netload swiotlb={PRESSURE_SLABS}"),
            judge_pressure,
        ),
    ]
}

/// A `key value key value ...` field of a line: the word after `key`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut w = line.split_whitespace();
    while let Some(k) = w.next() {
        if k == key {
            return w.next();
        }
    }
    None
}

/// What L1 served: (blob sha, blob bytes, small sha).
fn served(o: &L2Outcome) -> Option<(String, u64, String)> {
    let l = o
        .lines_after(&format!("kpm-l1: net-files {} ", o.name))
        .next()?;
    let bytes = field(l, "blob")
        .and_then(|_| l.split_whitespace().nth(2))
        .and_then(|b| b.parse().ok())?;
    Some((
        field(l, "blob")?.to_string(),
        bytes,
        field(l, "small")?.to_string(),
    ))
}

/// The uploads L1's sink received: (sha, bytes) each.
fn uploads(o: &L2Outcome) -> Vec<(String, u64)> {
    o.lines_after(&format!("kpm-l1: net-uploads {} ", o.name))
        .next()
        .unwrap_or("")
        .split(';')
        .filter_map(|u| {
            let mut w = u.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// `N sha;M sha;` (uniq -c) into (count, sha) pairs.
fn counted(list: &str) -> Vec<(u64, String)> {
    list.split(';')
        .filter_map(|e| {
            let mut w = e.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_string()))
        })
        .collect()
}

/// A guest transfer line (`sha S bytes B t0 T0 t1 T1 ...`): sha, bytes,
/// MiB/s by the guest clock.
pub fn transfer(line: &str) -> Option<(String, u64, Option<f64>)> {
    let bytes: u64 = field(line, "bytes")?.parse().ok()?;
    let secs = crate::bench::parse_timed(line).map(|(_, s)| s);
    let rate = secs
        .filter(|s| *s > 0.0)
        .map(|s| bytes as f64 / (1 << 20) as f64 / s);
    Some((field(line, "sha")?.to_string(), bytes, rate))
}

fn rate_text(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2} MiB/s"))
}

/// The rows every network scenario has: the interface, the download, the
/// upload and the short requests, each checked on both sides.
fn traffic_rows(o: &L2Outcome) -> Vec<Row> {
    let (blob, blob_bytes, small) = served(o).unwrap_or_default();
    let iface = e2e::kv(o, "net-if").unwrap_or("none").trim().to_string();
    let ping =
        e2e::kv(o, "net-ping").and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    let down = e2e::kv(o, "net-down").and_then(transfer);
    let up = e2e::kv(o, "net-up").and_then(transfer);
    let reply = e2e::kv(o, "net-up").and_then(|l| field(l, "reply"));
    let got = uploads(o);
    let many = e2e::kv(o, "net-many").unwrap_or("");
    let many_total: u64 = many
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let many_seen = counted(many.split_once("replies ").map_or("", |(_, l)| l));
    let mut rows = vec![row(
        "the guest's eth0 is up and reaches L1",
        iface.contains("mtu") && ping.is_some_and(|p| p < 30),
        format!(
            "eth0 {iface}; {} failed pings first",
            ping.map_or("?".into(), |p| p.to_string())
        ),
    )];
    rows.push(match &down {
        Some((sha, bytes, rate)) => row(
            "L1 -> guest: random data over HTTP, same checksum on both sides",
            !blob.is_empty() && *sha == blob && *bytes == blob_bytes,
            format!(
                "{} MiB, sha256 {} both, {}",
                bytes >> 20,
                &sha[..sha.len().min(16)],
                rate_text(*rate)
            ),
        ),
        None => row(
            "L1 -> guest: random data over HTTP, same checksum on both sides",
            false,
            "no net-down line",
        ),
    });
    rows.push(match &up {
        Some((sha, bytes, rate)) => row(
            "guest -> L1: random data over TCP, same checksum on both sides",
            got.first().is_some_and(|(s, b)| s == sha && b == bytes)
                && reply.is_some_and(|r| r == bytes.to_string()),
            format!(
                "{} MiB, guest sha256 {}, L1 {:?}, {}",
                bytes >> 20,
                &sha[..sha.len().min(16)],
                got.first().map(|(s, _)| &s[..s.len().min(16)]),
                rate_text(*rate)
            ),
        ),
        None => row(
            "guest -> L1: random data over TCP, same checksum on both sides",
            false,
            "no net-up line",
        ),
    });
    rows.push(row(
        "128 short HTTP connections, 8 in parallel: every reply intact",
        many_total == MANY
            && many_seen.len() == 1
            && many_seen[0] == (MANY, small.clone())
            && !small.is_empty(),
        format!(
            "{many_total} replies, {} distinct checksums",
            many_seen.len()
        ),
    ));
    rows
}

/// The VMM's side: what the device moved, nothing refused.
fn device_row(o: &L2Outcome) -> Row {
    let v = stats(o);
    let (rx, tx) = (
        num(&v, "virtio.net.requests.rx_bytes"),
        num(&v, "virtio.net.requests.tx_bytes"),
    );
    let denied = num(&v, "device_accesses.denied");
    let drops =
        num(&v, "virtio.net.requests.rx_dropped") + num(&v, "virtio.net.requests.tx_dropped");
    row(
        "virtio-net moved the traffic, nothing refused or dropped",
        rx > 0 && tx > 0 && denied == 0 && drops == 0,
        format!(
            "to the guest {:.1} MiB in {} frames ({} merged), from it {:.1} MiB in {} frames; denied {denied}, dropped {drops}",
            rx as f64 / (1 << 20) as f64,
            num(&v, "virtio.net.requests.rx_frames"),
            num(&v, "virtio.net.requests.rx_merged"),
            tx as f64 / (1 << 20) as f64,
            num(&v, "virtio.net.requests.tx_frames"),
        ),
    )
}

/// The virtio-net features the guest negotiated (sysfs bit string).
fn net_features(o: &L2Outcome) -> Option<String> {
    o.lines_after("kpm-init: virtio ")
        .find(|l| l.contains(" device 0x0001 "))
        .and_then(|l| l.split(" features ").nth(1))
        .map(|f| f.trim().to_string())
}

/// Offloads, mergeable buffers, event index and ACCESS_PLATFORM negotiated.
fn features_row(o: &L2Outcome) -> Row {
    const BITS: [(usize, &str); 9] = [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
        (5, "MAC"),
        (29, "EVENT_IDX"),
        (32, "VERSION_1"),
        (33, "ACCESS_PLATFORM"),
    ];
    let f = net_features(o).unwrap_or_default();
    let missing: Vec<&str> = BITS
        .iter()
        .filter(|(b, _)| f.as_bytes().get(*b) != Some(&b'1'))
        .map(|(_, n)| *n)
        .collect();
    row(
        "virtio-net: offloads, mergeable buffers, event index, ACCESS_PLATFORM",
        !f.is_empty() && missing.is_empty(),
        if f.is_empty() {
            "no virtio-net device in sysfs".to_string()
        } else if missing.is_empty() {
            "CSUM, GUEST_CSUM, TSO4/6 both ways, MRG_RXBUF, EVENT_IDX, ACCESS_PLATFORM".into()
        } else {
            format!("missing {}", missing.join(", "))
        },
    )
}

/// Bounce-pool figures of a network run (guest debugfs, 2 KiB slabs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pool {
    /// Slabs in use with the receive ring posted, before any traffic.
    pub posted: Option<u64>,
    /// The pool's slabs.
    pub nslabs: Option<u64>,
    /// The high water mark after the traffic.
    pub peak: Option<u64>,
    /// `swiotlb buffer is full` messages.
    pub full: Option<u64>,
    /// Packets virtio-net could not map for transmission (`queue failure`).
    pub tx_failed: Option<u64>,
}

/// The bounce-pool figures the guest printed.
pub fn pool(o: &L2Outcome) -> Pool {
    let posted = e2e::kv(o, "net-pool-posted");
    let after = e2e::kv(o, "net-pool-after");
    let f = |l: Option<&str>, k: &str| l.and_then(|l| field(l, k)?.parse().ok());
    Pool {
        posted: f(posted, "used"),
        nslabs: f(posted, "nslabs"),
        peak: f(after, "hiwater"),
        full: e2e::kv(o, "net-buffer-full").and_then(|l| l.trim().parse().ok()),
        tx_failed: e2e::kv(o, "net-txq-failures").and_then(|l| l.trim().parse().ok()),
    }
}

/// The bounce-pool row: at most `max_full` `swiotlb buffer is full`
/// messages (0: the pool fits the traffic; 1: a pool too small for it grows
/// and says so once).
fn pool_row(o: &L2Outcome, max_full: u64) -> Row {
    let Pool {
        posted: used,
        nslabs,
        peak: after,
        full,
        tx_failed,
    } = pool(o);
    let ok = used.is_some_and(|u| u > 0) && full.is_some_and(|f| f <= max_full);
    let show = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
    row(
        if max_full == 0 {
            "bounce pool: the receive ring posted, no `swiotlb buffer is full`"
        } else {
            "bounce pool: the receive ring posted; a pool too small grows, says so once, the guest keeps working"
        },
        ok,
        format!(
            "{} of {} slabs used with the ring posted ({} KiB), high water after the traffic {}; `swiotlb buffer is full` {}x (at most {max_full}); transmissions not mapped {}",
            show(used),
            show(nslabs),
            used.map_or(0, |u| u * 2),
            show(after),
            show(full),
            show(tx_failed),
        ),
    )
}

fn judge_protected(o: &L2Outcome) -> Vec<Row> {
    let v = stats(o);
    let mut rows = vec![
        e2e::booted(o),
        row(
            "the guest booted protected",
            o.console.contains("kvm_protmem: enabled") && num(&v, "enable_count") == 1,
            format!("enable_count {}", num(&v, "enable_count")),
        ),
        features_row(o),
    ];
    rows.extend(traffic_rows(o));
    rows.push(device_row(o));
    rows.push(pool_row(o, 0));
    rows.push(scan_row(o, false));
    rows
}

fn judge_unprotected(o: &L2Outcome) -> Vec<Row> {
    let mut rows = vec![
        e2e::booted(o),
        row(
            "the guest is not protected",
            o.console.contains("kvm_protmem: not offered by the host"),
            "dmesg `not offered`",
        ),
        features_row(o),
    ];
    rows.extend(traffic_rows(o));
    rows.push(device_row(o));
    rows
}

fn judge_pressure(o: &L2Outcome) -> Vec<Row> {
    let (blob, _, _) = served(o).unwrap_or_default();
    let load = e2e::kv(o, "net-load").unwrap_or("");
    let (down, up) = load
        .strip_prefix("down ")
        .and_then(|l| l.split_once(" up "))
        .map(|(d, u)| (counted(d), counted(u)))
        .unwrap_or_default();
    let sent = e2e::kv(o, "net-up").and_then(transfer);
    let got = uploads(o);
    // The boot pool (2 KiB slabs) as the guest shared it; the ring posted
    // may already have grown the pool beyond it (`SWIOTLB_DYNAMIC`).
    let shared = o
        .lines_after("kvm_protmem: swiotlb pool shared: ")
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let want = format!("{} MiB at ", PRESSURE_SLABS * 2 / 1024);
    let mut rows = vec![
        e2e::booted(o),
        row(
            "the boot bounce pool is the small one asked for",
            shared.starts_with(&want),
            format!(
                "swiotlb pool shared: {shared}; {:?} slabs with the ring posted",
                pool(o).nslabs
            ),
        ),
    ];
    rows.extend(traffic_rows(o));
    let up_ok = sent.as_ref().is_some_and(|(sha, bytes, _)| {
        up == [(4, bytes.to_string())]
            && got.len() == 5
            && got.iter().all(|(s, b)| s == sha && b == bytes)
    });
    rows.push(row(
        "4 downloads and 4 uploads at once: all intact on both sides",
        down == [(4, blob.clone())] && !blob.is_empty() && up_ok,
        format!(
            "downloads {down:?}; uploads answered {up:?}, L1 received {} intact of {}",
            got.iter()
                .filter(|(s, _)| sent.as_ref().is_some_and(|(sha, _, _)| s == sha))
                .count(),
            got.len()
        ),
    ));
    rows.push(device_row(o));
    rows.push(pool_row(o, 1));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(console: &str) -> L2Outcome {
        L2Outcome {
            name: "n".into(),
            exit: Some(0),
            console: console.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_l1_script_sets_up_and_takes_down_the_network_of_net_runs_only() {
        let run = |cmdline: &str| L2Run {
            name: "n".into(),
            vmm_args: vmm_args().to_vec(),
            cmdline: cmdline.into(),
            timeout: 60,
            qemu: false,
        };
        let up = l1_up(&run("kpm.net kpm.netmib=16"));
        assert!(up.contains("tunctl -t kpmtap0"), "{up}");
        assert!(up.contains("count=256"), "16 MiB: {up}");
        assert!(up.contains("nc -ll -p 5001 -e /tmp/net-sink &"));
        assert!(l1_down(&run("kpm.net")).contains("tunctl -d kpmtap0"));
        assert!(l1_up(&run("kpm.netbench kpm.io")).is_empty());
        assert_eq!(net_mib("x"), 4);
    }

    #[test]
    fn both_sides_are_compared() {
        let blob = "a".repeat(64);
        let small = "b".repeat(64);
        let up = "c".repeat(64);
        let good = format!(
            "kpm-l1: net-files n blob {blob} 4194304 small {small}\n\
             kpm-init: net-if 06:00:0a:00:02:02 mtu 1500\n\
             kpm-init: net-ping 0 failed\n\
             kpm-init: net-down sha {blob} bytes 4194304 t0 10.00 t1 12.00\n\
             kpm-init: net-up sha {up} bytes 4194304 t0 12.00 t1 16.00 reply 4194304\n\
             kpm-init: net-many 128 replies  128 {small};\n\
             kpm-l1: net-uploads n {up} 4194304;\n"
        );
        let rows = traffic_rows(&outcome(&good));
        assert!(
            rows.iter().all(|r| r.ok),
            "{:?}",
            rows.iter().map(|r| &r.figure).collect::<Vec<_>>()
        );
        assert!(rows[1].figure.contains("2.00 MiB/s"), "{}", rows[1].figure);
        assert!(rows[2].figure.contains("1.00 MiB/s"), "{}", rows[2].figure);
        // One reply of 128 changed, an upload L1 did not get whole.
        let bad = good
            .replace(&format!("128 {small};"), &format!("127 {small}; 1 {blob};"))
            .replace(&format!("n {up} 4194304;"), &format!("n {up} 4194000;"));
        let rows = traffic_rows(&outcome(&bad));
        assert_eq!(rows.iter().filter(|r| !r.ok).count(), 2);
    }

    #[test]
    fn pool_figures_are_read() {
        let o = outcome(
            "kpm-init: net-pool-posted used 200 hiwater 210 nslabs 512\n\
             kpm-init: net-pool-after used 220 hiwater 480 nslabs 512 transient 0\n\
             kpm-init: net-buffer-full 0\n\
             kpm-init: net-txq-failures 0\n",
        );
        assert_eq!(
            pool(&o),
            Pool {
                posted: Some(200),
                nslabs: Some(512),
                peak: Some(480),
                full: Some(0),
                tx_failed: Some(0),
            }
        );
        assert!(pool_row(&o, 0).ok);
        // A growing pool may say so once, never more, and must say how often.
        let once = outcome(&o.console.replace("net-buffer-full 0", "net-buffer-full 1"));
        assert!(!pool_row(&once, 0).ok);
        assert!(pool_row(&once, 1).ok);
        let twice = outcome(&o.console.replace("net-buffer-full 0", "net-buffer-full 2"));
        assert!(!pool_row(&twice, 1).ok);
        let unsaid = outcome(&o.console.replace("kpm-init: net-buffer-full 0\n", ""));
        assert!(!pool_row(&unsaid, 1).ok);
    }
}
