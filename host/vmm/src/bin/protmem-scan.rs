//! `protmem-scan`: counts how often a byte string occurs in the memory a
//! running process can read, the way a memory-disclosure bug in a VMM would
//! find a guest's secret.
//!
//! `protmem-scan PID NEEDLE` walks `/proc/PID/maps`; for every readable
//! mapping it reads the resident pages (`/proc/PID/pagemap` present bit, so
//! the scan does not fault in holes of the guest RAM memfd) through
//! `/proc/PID/mem` and counts the occurrences of NEEDLE. Prints one
//! `kpm-scan: ...` line per mapping with hits and a final
//! `kpm-scan: hits N mappings M bytes B` line; exit code 0 when the scan
//! ran (whatever it found), 1 when it could not.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

const PAGE: u64 = 4096;
/// Bytes read from /proc/PID/mem at once.
const CHUNK: u64 = 1 << 20;

/// One readable mapping: start, end and its name (path or `[heap]`).
struct Mapping {
    start: u64,
    end: u64,
    name: String,
}

fn readable_mappings(pid: u32) -> io::Result<Vec<Mapping>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = f.nth(3).unwrap_or("[anon]").to_string();
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        else {
            continue;
        };
        out.push(Mapping { start, end, name });
    }
    Ok(out)
}

/// Runs of resident pages of `start..end`, from pagemap; the whole range
/// if pagemap cannot be read.
fn resident_runs(pagemap: Option<&File>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let Some(pm) = pagemap else {
        return vec![(start, end)];
    };
    let npages = (end - start) / PAGE;
    let mut entries = vec![0u8; (npages * 8) as usize];
    if pm.read_exact_at(&mut entries, start / PAGE * 8).is_err() {
        return vec![(start, end)];
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(e.try_into().unwrap_or_default());
        // Bit 63: present; bit 62: swapped.
        if v & (3 << 62) == 0 {
            continue;
        }
        let a = start + i as u64 * PAGE;
        match runs.last_mut() {
            Some(r) if r.1 == a => r.1 += PAGE,
            _ => runs.push((a, a + PAGE)),
        }
    }
    runs
}

/// Occurrences of `needle` in `hay`.
fn count(hay: &[u8], needle: &[u8]) -> u64 {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

/// Hits of `needle` in `start..end` of `mem`, reading in chunks that
/// overlap by `needle.len() - 1` bytes so no hit is split.
fn scan_range(mem: &File, start: u64, end: u64, needle: &[u8]) -> (u64, u64) {
    let (mut hits, mut bytes) = (0, 0);
    let overlap = needle.len().saturating_sub(1) as u64;
    let mut at = start;
    let mut buf = vec![0u8; (CHUNK + overlap) as usize];
    while at < end {
        let len = (end - at).min(CHUNK + overlap) as usize;
        match mem.read_at(&mut buf[..len], at) {
            Ok(n) if n > 0 => {
                hits += count(&buf[..n], needle);
                bytes += n.min(CHUNK as usize) as u64;
                if n < len {
                    // Unreadable tail of a chunk: skip to the next page.
                    at = (at + n as u64).div_ceil(PAGE) * PAGE + PAGE;
                    continue;
                }
            }
            _ => {
                at += PAGE;
                continue;
            }
        }
        at += CHUNK;
    }
    (hits, bytes)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(pid), Some(needle)) = (args.get(1).and_then(|p| p.parse::<u32>().ok()), args.get(2))
    else {
        eprintln!("usage: protmem-scan PID NEEDLE");
        return ExitCode::FAILURE;
    };
    let maps = match readable_mappings(pid) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("protmem-scan: reading /proc/{pid}/maps: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mem = match File::open(format!("/proc/{pid}/mem")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("protmem-scan: opening /proc/{pid}/mem: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pagemap = File::open(format!("/proc/{pid}/pagemap")).ok();
    let needle = needle.as_bytes();
    let (mut total, mut bytes) = (0, 0);
    for m in &maps {
        let mut hits = 0;
        for (s, e) in resident_runs(pagemap.as_ref(), m.start, m.end) {
            let (h, b) = scan_range(&mem, s, e, needle);
            hits += h;
            bytes += b;
        }
        if hits > 0 {
            println!(
                "kpm-scan: {hits} hits in {:#x}-{:#x} {}",
                m.start, m.end, m.name
            );
        }
        total += hits;
    }
    println!(
        "kpm-scan: hits {total} mappings {} bytes {bytes}",
        maps.len()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_secret_in_its_own_heap() {
        // Built at run time so the needle's bytes exist only where we put them.
        let needle: String = "KPM-SCAN-SELFTEST-"
            .chars()
            .chain("qrstuv".chars().rev())
            .collect();
        let mut heap = Vec::new();
        for _ in 0..3 {
            heap.extend_from_slice(needle.as_bytes());
            heap.extend_from_slice(&[0u8; 5000]);
        }
        let pid = std::process::id();
        let maps = readable_mappings(pid).unwrap();
        let mem = File::open(format!("/proc/{pid}/mem")).unwrap();
        let pm = File::open(format!("/proc/{pid}/pagemap")).ok();
        let mut hits = 0;
        for m in &maps {
            for (s, e) in resident_runs(pm.as_ref(), m.start, m.end) {
                hits += scan_range(&mem, s, e, needle.as_bytes()).0;
            }
        }
        assert!(hits >= 3, "{hits}");
        std::hint::black_box(&heap);
    }

    #[test]
    fn counts_across_chunk_edges() {
        assert_eq!(count(b"abcabcab", b"abc"), 2);
        assert_eq!(count(b"ab", b"abc"), 0);
        assert_eq!(count(b"aaaa", b"aa"), 3);
    }
}
