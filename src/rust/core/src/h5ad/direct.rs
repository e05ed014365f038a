//! A parallel fast path for the big one-dimensional arrays of a sparse matrix (`data`,
//! `indices`, `indptr`): when a dataset is stored without filters (anndata's default:
//! contiguous, or chunked with no compression), little-endian, in the type the caller
//! wants (or float32 for float64 output), its bytes are read straight from the file at
//! the addresses HDF5 reports, by several threads at once (`pread`, no HDF5 call, so no
//! global HDF5 lock), into the caller's buffer. Any other layout returns `None` and the
//! caller reads through HDF5 as before.
//!
//! Safety against bad files: every address and size comes from HDF5's own metadata and
//! is checked against the file length and the dataset's extent; a short read is an
//! error, never an out-of-bounds write.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};

use hdf5::types::{FloatSize, IntSize, TypeDescriptor};
use hdf5::Dataset;
use hdf5_metno as hdf5;
use hdf5_sys::h5::{haddr_t, hsize_t, HADDR_UNDEF};
use hdf5_sys::h5d::H5Dget_chunk_info_by_coord;
use hdf5_sys::h5t::{H5T_order_t, H5Tget_order};
use rayon::prelude::*;

use crate::{ScError, ScResult};

/// Element type of a fast read.
pub(crate) trait Raw: Copy + Send + Sync + 'static {
    /// Whether the dataset's stored type can be read as `Self` without conversion, or as
    /// float32 widened to `Self` (returns `Some(true)`).
    fn stored(td: &TypeDescriptor) -> Option<bool>;
    /// The value of a stored float32 (little-endian bytes).
    fn widen(b: &[u8]) -> Self;
}

impl Raw for i32 {
    fn stored(td: &TypeDescriptor) -> Option<bool> {
        matches!(td, TypeDescriptor::Integer(IntSize::U4)).then_some(false)
    }
    fn widen(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i32
    }
}

impl Raw for f64 {
    fn stored(td: &TypeDescriptor) -> Option<bool> {
        match td {
            TypeDescriptor::Float(FloatSize::U8) => Some(false),
            TypeDescriptor::Float(FloatSize::U4) => Some(true),
            _ => None,
        }
    }
    fn widen(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64
    }
}

/// A run of elements stored contiguously in the file.
#[derive(Clone, Copy)]
struct Piece {
    /// first element (index into the output)
    start: usize,
    len: usize,
    /// file offset of its first byte
    addr: u64,
}

/// Where the elements of an unfiltered one-dimensional dataset lie in the file, or
/// `None` when the fast path does not apply.
fn pieces(
    ds: &Dataset,
    file: &std::fs::File,
    n: usize,
    esize: usize,
    file_len: u64,
) -> Option<Vec<Piece>> {
    if ds.size() != n || !ds.filters().is_empty() {
        return None;
    }
    let dcpl = ds.dcpl().ok()?;
    if !dcpl.external().is_empty() {
        return None;
    }
    let fits = |addr: u64, len: usize| {
        addr.checked_add((len * esize) as u64)
            .is_some_and(|end| end <= file_len)
    };
    let out = if let Some(chunk) = ds.chunk() {
        let c = *chunk.first()?;
        if c == 0 || chunk.len() != 1 || ds.ndim() != 1 {
            return None;
        }
        // the index read from the file's bytes (one visit per node); libhdf5's lookups
        // below only where it is not understood
        if let Some(v) = super::chunkidx::dataset_index(ds, file)
            .and_then(|idx| pieces_from_index(&idx, n, c, esize, file_len))
        {
            return Some(v);
        }
        let mut v = Vec::with_capacity(n.div_ceil(c));
        for start in (0..n).step_by(c) {
            let coord: [hsize_t; 1] = [start as hsize_t];
            let (mut mask, mut addr, mut size) = (0u32, 0 as haddr_t, 0 as hsize_t);
            // SAFETY: valid dataset id; the coordinate array has the dataset's rank (1);
            // the outputs are plain integers.
            let id = ds.id();
            let rc = hdf5::sync::sync(|| unsafe {
                H5Dget_chunk_info_by_coord(id, coord.as_ptr(), &mut mask, &mut addr, &mut size)
            });
            let len = c.min(n - start);
            // an unallocated chunk (fill values) or an odd size: leave it to HDF5
            if rc < 0 || addr == HADDR_UNDEF || size as usize != c * esize || !fits(addr, len) {
                return None;
            }
            v.push(Piece { start, len, addr });
        }
        v
    } else {
        let addr = ds.offset()?;
        if !fits(addr, n) {
            return None;
        }
        vec![Piece {
            start: 0,
            len: n,
            addr,
        }]
    };
    Some(out)
}

/// The pieces of `n` elements in chunks of `c` from an index read by
/// [`super::chunkidx`]: every chunk from 0 to `n` present exactly once, unfiltered,
/// of full size, inside the file (chunks past `n`, left by a shrunk dataset, are not
/// read); otherwise `None`.
fn pieces_from_index(
    idx: &super::chunkidx::Index1d,
    n: usize,
    c: usize,
    esize: usize,
    file_len: u64,
) -> Option<Vec<Piece>> {
    let bytes = (c as u64).checked_mul(esize as u64)?;
    if idx.chunk != c as u64 || idx.esize != esize as u64 {
        return None;
    }
    let want = n.div_ceil(c);
    let mut v = Vec::with_capacity(want);
    for (k, ch) in idx
        .chunks
        .iter()
        .take_while(|ch| ch.offset[0] < n as u64)
        .enumerate()
    {
        let start = k * c;
        if ch.offset[0] != start as u64 || ch.size != bytes || ch.mask != 0 {
            return None;
        }
        let len = c.min(n - start);
        if ch.addr.checked_add(bytes).is_none_or(|e| e > file_len) {
            return None;
        }
        v.push(Piece {
            start,
            len,
            addr: ch.addr,
        });
    }
    (v.len() == want).then_some(v)
}

fn little_endian(ds: &Dataset) -> bool {
    let Ok(t) = ds.dtype() else { return false };
    // SAFETY: a valid datatype id owned by `t`; H5Tget_order does not take ownership.
    let id = t.id();
    let o = hdf5::sync::sync(|| unsafe { H5Tget_order(id) });
    o == H5T_order_t::H5T_ORDER_LE
}

/// Identity of a dataset in one version of a file: device, inode, length, modification
/// time (s, ns) of the file; the dataset's path; element count and stored size.
type LayoutKey = (u64, u64, u64, i64, i64, String, usize, usize);

/// Layouts already looked up. The chunk addresses come from [`super::chunkidx`] (one
/// visit per index node); where it does not understand the index, from libhdf5 1.10,
/// which walks the chunk index from its start per chunk (about 50 ms for the 2,048
/// chunks of the seed matrix's values). A file read again (same inode, length and
/// modification time) reuses them; the reads themselves still check every address
/// against the file's length.
static LAYOUTS: Mutex<Vec<(LayoutKey, Arc<Vec<Piece>>)>> = Mutex::new(Vec::new());

/// Join pieces that follow each other in the file (the usual chunk layout) into one.
fn merge(pieces: Vec<Piece>, esize: usize) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for pc in pieces {
        match out.last_mut() {
            Some(l)
                if l.start + l.len == pc.start && l.addr + (l.len * esize) as u64 == pc.addr =>
            {
                l.len += pc.len
            }
            _ => out.push(pc),
        }
    }
    out
}

/// Where the elements of an unfiltered dataset lie in the file and how they become `T`
/// (see [`layout`]).
pub(crate) struct Layout {
    pieces: Arc<Vec<Piece>>,
    /// stored as float32, widened to `T`
    widen: bool,
    /// bytes per stored element
    esize: usize,
}

/// The layout of `n` elements of `ds` for a direct read into a `[T]` through `file` (the
/// same file, opened separately), or `None` when the fast path does not apply (read
/// through HDF5).
pub(crate) fn layout<T: Raw>(
    ds: &Dataset,
    file: &std::fs::File,
    userblock: u64,
    n: usize,
) -> Option<Layout> {
    if !cfg!(target_endian = "little") || userblock != 0 {
        return None;
    }
    let td = ds.dtype().ok()?.to_descriptor().ok()?;
    let widen = T::stored(&td)?;
    if !little_endian(ds) {
        return None;
    }
    let esize = if widen { 4 } else { std::mem::size_of::<T>() };
    let meta = file.metadata().ok()?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        ds.name(),
        n,
        esize,
    );
    let cached = LAYOUTS
        .lock()
        .ok()
        .and_then(|m| m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()));
    let pieces = match cached {
        Some(p) => p,
        None => {
            let p = Arc::new(merge(pieces(ds, file, n, esize, meta.len())?, esize));
            if let Ok(mut m) = LAYOUTS.lock() {
                if m.len() >= 64 {
                    m.remove(0);
                }
                m.push((key, p.clone()));
            }
            p
        }
    };
    Some(Layout {
        pieces,
        widen,
        esize,
    })
}

impl Layout {
    /// Read elements `first .. first + dst.len()` into `dst` (`buf`: staging bytes for a
    /// widening read, reused between calls).
    pub(crate) fn read_range<T: Raw>(
        &self,
        file: &std::fs::File,
        first: usize,
        dst: &mut [T],
        buf: &mut Vec<u8>,
    ) -> ScResult<()> {
        let end = first + dst.len();
        let esize = self.esize;
        let mut k = self.pieces.partition_point(|pc| pc.start + pc.len <= first);
        while k < self.pieces.len() && self.pieces[k].start < end {
            let pc = &self.pieces[k];
            let (s, e) = (first.max(pc.start), end.min(pc.start + pc.len));
            let out = &mut dst[s - first..e - first];
            let addr = pc.addr + ((s - pc.start) * esize) as u64;
            let short = |e: std::io::Error, len: usize| {
                ScError::Format(format!(
                    "cannot read {len} bytes at offset {addr}: {e} (truncated or corrupt file)"
                ))
            };
            if self.widen {
                buf.resize(out.len() * esize, 0);
                file.read_exact_at(buf, addr)
                    .map_err(|e| short(e, buf.len()))?;
                for (d, b) in out.iter_mut().zip(buf.chunks_exact(4)) {
                    *d = T::widen(b);
                }
            } else {
                let len = std::mem::size_of_val(out);
                // SAFETY: T is i32 or f64 (plain data: every byte pattern is a value);
                // the byte view covers exactly `out`, which nothing else borrows, and
                // the file's little-endian bytes are the target's layout.
                let bytes =
                    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), len) };
                file.read_exact_at(bytes, addr).map_err(|e| short(e, len))?;
            }
            k += 1;
        }
        Ok(())
    }
}

/// Elements per parallel task of a direct read: 64 k (256-512 KB of reads, so the
/// staging buffer of a widening read and the freshly written output stay in cache).
pub(crate) const TASK: usize = 1 << 16;

/// Read the whole `ds` (one-dimensional, or contiguous in row-major order) into `out` through `file` (the same file, opened
/// separately), in parallel. `None`: the fast path does not apply (read through HDF5).
pub(crate) fn read<T: Raw>(
    ds: &Dataset,
    file: &std::fs::File,
    userblock: u64,
    out: &mut [T],
) -> Option<ScResult<()>> {
    let lay = layout::<T>(ds, file, userblock, out.len())?;
    Some(
        out.par_chunks_mut(TASK)
            .enumerate()
            .try_for_each_init(Vec::<u8>::new, |buf, (t, dst)| {
                lay.read_range(file, t * TASK, dst, buf)
            }),
    )
}

/// Ask the kernel for transparent huge pages (2 MiB) behind a large, not yet touched
/// output buffer (as numpy does for its arrays): filling half a gigabyte of fresh memory
/// then takes a few hundred page faults instead of a hundred thousand. Only a hint: the
/// contents are unchanged, and errors (no THP support) are ignored. Only with
/// `SCANNOT_MAP_HUGE=1` (see [`super::mem`] for why it is off by default).
pub(crate) fn advise_huge<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        let len = std::mem::size_of_val(buf);
        if len < 8 << 20 || !super::mem::huge_pages() {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = if page > 0 { page as usize } else { 4096 };
        let start = buf.as_mut_ptr() as usize;
        let (a, e) = (
            (start + page - 1) & !(page - 1),
            (start + len) & !(page - 1),
        );
        if e > a {
            // SAFETY: [a, e) lies inside `buf`, which this function borrows mutably;
            // MADV_HUGEPAGE changes only the paging policy, never the contents.
            unsafe { libc::madvise(a as *mut libc::c_void, e - a, libc::MADV_HUGEPAGE) };
        }
    }
}

/// Look up every chunk of a one-dimensional chunked dataset through libhdf5 (for the
/// metadata walk of [`super::isolate`], for indexes [`super::chunkidx`] does not read:
/// a corrupt chunk index must crash the child, not the reader).
pub(crate) fn walk_chunks(ds: &Dataset) {
    let Some(chunk) = ds.chunk() else { return };
    let (n, c) = (ds.size(), chunk.first().copied().unwrap_or(0));
    if ds.ndim() != 1 || c == 0 || n / c > 1 << 20 {
        return;
    }
    let id = ds.id();
    for start in (0..n).step_by(c) {
        let coord: [hsize_t; 1] = [start as hsize_t];
        let (mut mask, mut addr, mut size) = (0u32, 0 as haddr_t, 0 as hsize_t);
        // SAFETY: as in `pieces`.
        let rc = hdf5::sync::sync(|| unsafe {
            H5Dget_chunk_info_by_coord(id, coord.as_ptr(), &mut mask, &mut addr, &mut size)
        });
        if rc < 0 {
            return;
        }
    }
}
