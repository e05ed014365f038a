//! Anonymous memory mappings for large matrix buffers that a binding hands out without
//! its host's allocator (see the R glue's `ext_vec`): page-aligned, with unspecified
//! contents (the caller fills all of them).
//!
//! Transparent huge pages: a fresh 4 KiB page costs the kernel more in bookkeeping than
//! in zeroing (651 MB: 0.18 s of system time on one core, against 0.06 s as 2 MiB pages).
//! But on virtual machines that hand free memory back to their host (free page
//! reporting, as on this project's Firecracker machines, which report free 2 MiB blocks)
//! a huge page whose block was already reported is slow to touch (4.4 ms per 2 MiB
//! instead of 0.17 ms, and 0.55 ms as 512 small pages). The kernel hands out blocks not
//! yet reported first, so [`prefault`] asks for huge pages, times each 2 MiB step, and at
//! the first slow one turns the hint off for the rest of the mapping (the remaining
//! small pages come from the fragmented free lists, which are not reported): at worst one
//! or two slow steps are paid. `SCANNOT_MAP_HUGE=0` turns that off, `SCANNOT_MAP_HUGE=1`
//! asks for huge pages behind every large mapping without timing them.
//!
//! Released mappings are kept for a short while and handed out again, the way jemalloc
//! keeps freed dirty pages for `dirty_decay_ms` (10 s by default): a fresh mapping costs
//! the kernel a zero fill of every page on first touch (on this project's virtual
//! machines about 7 GB/s, more than the whole read of an uncompressed matrix), while a
//! kept one is already backed. A mapping unused for [`DECAY`] is returned to the system
//! by a background thread; at most [`retain_cap`] bytes are kept; the environment
//! variable `SCANNOT_MAP_RETAIN=0` turns the reuse off.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a released mapping is kept for reuse.
pub const DECAY: Duration = Duration::from_secs(10);

/// Mapping sizes are multiples of this (one transparent huge page).
const GRAIN: usize = 2 << 20;

struct Kept {
    addr: usize,
    bytes: usize,
    since: Instant,
}

static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());
static REAPER: AtomicBool = AtomicBool::new(false);

fn retain_on() -> bool {
    std::env::var("SCANNOT_MAP_RETAIN").map_or(true, |v| v != "0")
}

/// Whether large buffers ask for transparent huge pages (`SCANNOT_MAP_HUGE=1`).
pub fn huge_pages() -> bool {
    std::env::var("SCANNOT_MAP_HUGE").is_ok_and(|v| v == "1")
}

/// A 2 MiB populate step slower than this means the huge page's block had been handed
/// back to the host (see the module documentation): 4.4 ms measured, against 0.17 ms for
/// a huge page and 0.55 ms for 512 small ones, CPU time of one core).
const SLOW_HUGE_STEP: Duration = Duration::from_micros(1500);

/// Bytes a populate step covers once small pages are used.
const SMALL_STEP: usize = 256 << 10;

/// Milliseconds since [`epoch`] of the last slow huge-page step (0: none yet).
static HUGE_SLOW_AT: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn since_epoch_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// CPU time of the calling thread: a slow huge page costs CPU time (the host's fault
/// is spent on this thread's virtual CPU), while wall time also counts preemption by
/// the reader's threads and the checking child on a busy machine.
#[cfg(target_os = "linux")]
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Record a slow huge-page step now (tests: the next [`prefault`]s use small pages).
#[cfg(test)]
pub(crate) fn note_slow_huge() {
    HUGE_SLOW_AT.fetch_max(since_epoch_ms(), Ordering::Relaxed);
}

/// Whether [`prefault`] tries huge pages now: not with `SCANNOT_MAP_HUGE=0`, and not
/// within [`DECAY`] of a slow huge-page step (its threads then go on with small pages).
fn try_huge() -> bool {
    !std::env::var("SCANNOT_MAP_HUGE").is_ok_and(|v| v == "0") && !recently_slow()
}

/// Whether a huge-page step was slow within [`DECAY`] (in this or another thread).
fn recently_slow() -> bool {
    let at = HUGE_SLOW_AT.load(Ordering::Relaxed);
    at != 0 && since_epoch_ms().saturating_sub(at) <= DECAY.as_millis() as u64
}

/// Most bytes kept for reuse: an eighth of the machine's memory, at most 4 GiB.
pub fn retain_cap() -> usize {
    (mem_total() / 8).min(4 << 30)
}

/// Bytes currently kept for reuse.
pub fn retained_bytes() -> usize {
    KEPT.try_lock()
        .map(|k| k.iter().map(|e| e.bytes).sum())
        .unwrap_or(0)
}

/// A new private anonymous read-write mapping of `len` bytes, or `None` when the system
/// refuses it.
fn fresh(len: usize) -> Option<*mut c_void> {
    // SAFETY: a fresh mapping chosen by the kernel; failure is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (ptr != libc::MAP_FAILED).then_some(ptr)
}

/// A private anonymous read-write mapping of at least `bytes` bytes: a kept one of a fitting size, else a new one. Returns the pointer and the
/// mapping's real length (what [`unmap`] takes), or `None` when the system refuses it.
pub fn map(bytes: usize) -> Option<(*mut c_void, usize)> {
    if bytes == 0 {
        return None;
    }
    let len = bytes.checked_next_multiple_of(GRAIN)?;
    if retain_on() {
        // try_lock: a fork taken while the reaper held the lock must not deadlock
        if let Ok(mut kept) = KEPT.try_lock() {
            // the smallest kept mapping that fits without wasting more than an eighth;
            // of equal ones the last kept (its pages are the likeliest still in cache)
            let best = kept
                .iter()
                .enumerate()
                .rev()
                .filter(|(_, e)| e.bytes >= len && e.bytes - len <= len / 8)
                .min_by_key(|(_, e)| e.bytes)
                .map(|(k, _)| k);
            if let Some(k) = best {
                let e = kept.remove(k);
                return Some((e.addr as *mut c_void, e.bytes));
            }
        }
    }
    let ptr = fresh(len)?;
    #[cfg(target_os = "linux")]
    if huge_pages() {
        // SAFETY: the whole new mapping; a paging hint that leaves the contents alone.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
    }
    Some((ptr, len))
}

/// Map `bytes` (as [`map`] would) now and have a background thread fault its pages in,
/// from the end backwards (`MADV_POPULATE_WRITE`, Linux 5.14+; elsewhere nothing is
/// done), keeping the mapping for the next [`map`] of that size: a reader that knows
/// which large buffers it will ask for next (`read_h5ad` while it reads `obs` and `var`
/// before `X`) gets the kernel's zero fill done on an otherwise idle core. Populating
/// never changes contents, so the thread may go on after the mapping was handed out
/// (its user's writes win; the thread only spares them page faults). Nothing is done
/// when reuse is off, a fitting mapping is already kept, or the kept bytes would pass
/// [`retain_cap`]. Returns whether a mapping was made.
pub fn prefault(bytes: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Some(len) = bytes.checked_next_multiple_of(GRAIN) else {
            return false;
        };
        if len == 0 || !retain_on() {
            return false;
        }
        let Ok(mut kept) = KEPT.try_lock() else {
            return false;
        };
        let total: usize = kept.iter().map(|e| e.bytes).sum();
        if total + len > retain_cap()
            || kept
                .iter()
                .any(|e| e.bytes >= len && e.bytes - len <= len / 8)
        {
            return false;
        }
        let Some(ptr) = fresh(len) else {
            return false;
        };
        let addr = ptr as usize;
        kept.push(Kept {
            addr,
            bytes: len,
            since: Instant::now(),
        });
        drop(kept);
        start_reaper();
        let mut huge = try_huge();
        if huge {
            epoch();
            // SAFETY: the whole new mapping, not yet handed out; a paging hint that
            // leaves the contents alone.
            unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        }
        let _ = std::thread::Builder::new()
            .name("scannot-prefault".into())
            .spawn(move || {
                let mut end = len;
                while end > 0 {
                    // huge pages one at a time; small ones in steps short enough that a
                    // mmap() of another thread (which waits for the step's hold on the
                    // address space) is not held up (0.07 ms instead of 0.55)
                    let step = if huge { GRAIN } else { SMALL_STEP };
                    let start = end.saturating_sub(step);
                    let t = thread_cpu();
                    // SAFETY: only faults pages of [start, end) in, as a write would, and
                    // never changes their contents; if the range was unmapped meanwhile
                    // (not before the reaper's 10 s, or after its user released it) the
                    // call fails or populates whatever is mapped there now, unchanged.
                    let r = unsafe {
                        libc::madvise(
                            (addr + start) as *mut c_void,
                            end - start,
                            libc::MADV_POPULATE_WRITE,
                        )
                    };
                    if r != 0 {
                        break;
                    }
                    if huge && (thread_cpu().saturating_sub(t) > SLOW_HUGE_STEP || recently_slow())
                    {
                        huge = false;
                        HUGE_SLOW_AT.fetch_max(since_epoch_ms(), Ordering::Relaxed);
                        if start > 0 {
                            // SAFETY: as above, a paging hint for the part not yet
                            // populated; the contents are untouched.
                            unsafe {
                                libc::madvise(addr as *mut c_void, start, libc::MADV_NOHUGEPAGE)
                            };
                        }
                    }
                    end = start;
                }
            });
        true
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = bytes;
        false
    }
}

/// Release a mapping made by [`map`]: kept for reuse (see the module documentation) or
/// returned to the system.
///
/// # Safety
/// `ptr` and `bytes` are exactly those returned by one [`map`] call, and nothing uses
/// the memory afterwards.
pub unsafe fn unmap(ptr: *mut c_void, bytes: usize) {
    if retain_on() {
        if let Ok(mut kept) = KEPT.try_lock() {
            let total: usize = kept.iter().map(|e| e.bytes).sum();
            if total + bytes <= retain_cap() {
                kept.push(Kept {
                    addr: ptr as usize,
                    bytes,
                    since: Instant::now(),
                });
                drop(kept);
                start_reaper();
                return;
            }
        }
    }
    libc::munmap(ptr, bytes);
}

/// Return every kept mapping to the system now.
pub fn release_kept() {
    let all: Vec<Kept> = match KEPT.lock() {
        Ok(mut k) => std::mem::take(&mut *k),
        Err(_) => return,
    };
    for e in all {
        // SAFETY: a mapping of `map` that its user released; nobody holds it.
        unsafe { libc::munmap(e.addr as *mut c_void, e.bytes) };
    }
}

fn start_reaper() {
    if REAPER.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("scannot-unmap".into())
        .spawn(reap);
    if spawned.is_err() {
        REAPER.store(false, Ordering::Release);
    }
}

/// The background thread: unmaps kept mappings older than [`DECAY`]; ends when none
/// is left.
fn reap() {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let (old, left) = match KEPT.lock() {
            Ok(mut k) => {
                let (old, keep): (Vec<Kept>, Vec<Kept>) =
                    k.drain(..).partition(|e| e.since.elapsed() >= DECAY);
                *k = keep;
                (old, k.len())
            }
            Err(_) => (Vec::new(), 0),
        };
        for e in old {
            // SAFETY: as in `release_kept`.
            unsafe { libc::munmap(e.addr as *mut c_void, e.bytes) };
        }
        if left == 0 {
            REAPER.store(false, Ordering::Release);
            // a mapping kept between the check and the store would have found the flag
            // still set: carry on for it
            let more = KEPT.lock().map(|k| !k.is_empty()).unwrap_or(false);
            if !more || REAPER.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// Physical memory of the machine in bytes (8 GiB when unknown).
pub fn mem_total() -> usize {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as usize * size as usize
    } else {
        8 << 30
    }
}
