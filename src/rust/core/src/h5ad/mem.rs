//! Anonymous memory mappings for large matrix buffers that a binding hands out without
//! its host's allocator (see the R glue's `ext_vec`): page-aligned, backed by transparent
//! huge pages where the kernel offers them, zero until written.

use std::ffi::c_void;

/// A private anonymous read-write mapping of `bytes` bytes (with the huge-page hint), or
/// `None` when the system refuses it.
pub fn map(bytes: usize) -> Option<*mut c_void> {
    if bytes == 0 {
        return None;
    }
    // SAFETY: a fresh mapping chosen by the kernel; failure is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: the whole new mapping; a paging hint that leaves the contents alone.
    unsafe {
        libc::madvise(ptr, bytes, libc::MADV_HUGEPAGE)
    };
    Some(ptr)
}

/// Release a mapping made by [`map`].
///
/// # Safety
/// `ptr` and `bytes` are exactly those of one [`map`] call, and nothing uses the memory
/// afterwards.
pub unsafe fn unmap(ptr: *mut c_void, bytes: usize) {
    libc::munmap(ptr, bytes);
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
