//! The chunk index of a chunked dataset, read from the file's bytes.
//!
//! libhdf5 1.10 finds a chunk's address by walking the dataset's chunk index from its
//! root for every chunk asked for (`H5Dget_chunk_info_by_coord`): about 50 ms for the
//! 2,048 chunks of each array of the seed matrix, paid once in the checking child and
//! once in the reader on the first read of a file. Reading the index here visits each of
//! its nodes once (a few dozen `pread`s).
//!
//! Understood: the layouts that anndata / h5py (library version bounds "earliest", the
//! default) and hdf5-metno write: superblock versions 0-3 with 8-byte offsets and
//! lengths and base address 0, version 1 object headers and version 2 (`OHDR`) ones,
//! the version 3 data layout message with a version 1 B-tree ("TREE") chunk index.
//! Anything else (other layout versions, fixed / extensible array or version 2 B-tree
//! indexes of newer library versions) returns `None`, and the caller asks libhdf5.
//!
//! Every read is bounds-checked against the file length and capped in size; counts are
//! checked against what the bytes can hold; the tree walk requires each child's level to
//! be one less than its parent's (so no cycle can be followed) and stops after a fixed
//! number of nodes. A corrupt or truncated file gives `None`, never a panic and never a
//! read outside the file.

use std::os::unix::fs::FileExt;

use hdf5_metno as hdf5;

/// One chunk of a dataset, as the index records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkRec {
    /// Element offset of the chunk's first element along each dimension.
    pub offset: [u64; 1],
    /// File address of the chunk's (possibly filtered) bytes.
    pub addr: u64,
    /// Stored bytes.
    pub size: u64,
    /// Filters skipped for this chunk (bit k: filter k of the pipeline).
    pub mask: u32,
}

/// The chunk index of a one-dimensional chunked dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Index1d {
    /// Elements per chunk.
    pub chunk: u64,
    /// Bytes per element (the layout's last dimension).
    pub esize: u64,
    /// Every chunk the index holds, sorted by offset.
    pub chunks: Vec<ChunkRec>,
}

/// Largest metadata block read in one go (an object header chunk, a B-tree node).
const MAX_BLOCK: u64 = 1 << 20;
/// Most object header blocks (first chunk and continuations) followed.
const MAX_OH_BLOCKS: usize = 64;
/// Most B-tree nodes visited.
const MAX_NODES: usize = 1 << 16;

struct Src<'a> {
    file: &'a std::fs::File,
    len: u64,
    /// bytes still allowed to be read (a valid index is read once, so at most the
    /// file's length; a corrupt one pointing many times at the same nodes stops here)
    budget: std::cell::Cell<u64>,
}

impl Src<'_> {
    fn read(&self, addr: u64, n: u64) -> Option<Vec<u8>> {
        if n > MAX_BLOCK || addr.checked_add(n)? > self.len || n > self.budget.get() {
            return None;
        }
        self.budget.set(self.budget.get() - n);
        let mut b = vec![0u8; n as usize];
        self.file.read_exact_at(&mut b, addr).ok()?;
        Some(b)
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

const SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// The superblock at byte 0 uses 8-byte offsets and lengths and base address 0.
fn superblock_ok(src: &Src) -> bool {
    let Some(b) = src.read(0, 48.min(src.len)) else {
        return false;
    };
    if b.len() < 24 || &b[..8] != SIGNATURE {
        return false;
    }
    match b[8] {
        0 | 1 => {
            // sizes at 13 and 14; base address after the K values (and, version 1,
            // the indexed storage K and 2 reserved bytes)
            let base_at = if b[8] == 0 { 24 } else { 28 };
            b[13] == 8 && b[14] == 8 && u64_at(&b, base_at) == Some(0)
        }
        2 | 3 => b[9] == 8 && b[10] == 8 && u64_at(&b, 12) == Some(0),
        _ => false,
    }
}

/// The body of the first message of type `want` in the object header at `addr`.
fn find_message(src: &Src, addr: u64, want: u16) -> Option<Vec<u8>> {
    let head = src.read(addr, 16.min(src.len.checked_sub(addr)?))?;
    if head.get(..4) == Some(b"OHDR") {
        find_message_v2(src, addr, want)
    } else {
        find_message_v1(src, addr, want)
    }
}

fn find_message_v1(src: &Src, addr: u64, want: u16) -> Option<Vec<u8>> {
    let head = src.read(addr, 16)?;
    if head[0] != 1 {
        return None;
    }
    let n_msgs = u16_at(&head, 2)? as usize;
    let size = u32_at(&head, 8)? as u64;
    let mut blocks = vec![(addr.checked_add(16)?, size)];
    let mut seen = 0usize;
    let mut k = 0;
    while k < blocks.len() {
        if k >= MAX_OH_BLOCKS {
            return None;
        }
        let (start, len) = blocks[k];
        let b = src.read(start, len)?;
        let mut p = 0usize;
        while p + 8 <= b.len() && seen < n_msgs {
            let ty = u16_at(&b, p)?;
            let sz = u16_at(&b, p + 2)? as usize;
            let body = b.get(p + 8..p + 8 + sz)?;
            seen += 1;
            if ty == want {
                return Some(body.to_vec());
            }
            if ty == 0x0010 {
                blocks.push((u64_at(body, 0)?, u64_at(body, 8)?));
            }
            p += 8 + sz;
        }
        k += 1;
    }
    None
}

fn find_message_v2(src: &Src, addr: u64, want: u16) -> Option<Vec<u8>> {
    let head = src.read(addr, 40.min(src.len.checked_sub(addr)?))?;
    if head.get(4) != Some(&2) {
        return None;
    }
    let flags = *head.get(5)?;
    let mut p = 6usize;
    if flags & 0x20 != 0 {
        p += 16;
    }
    if flags & 0x10 != 0 {
        p += 4;
    }
    let width = 1usize << (flags & 3);
    let mut size = 0u64;
    for (k, &byte) in head.get(p..p + width)?.iter().enumerate() {
        size |= (byte as u64) << (8 * k);
    }
    p += width;
    let order = flags & 0x04 != 0;
    let mhead = if order { 6 } else { 4 };
    // (start of messages, their length) of each block
    let mut blocks = vec![(addr.checked_add(p as u64)?, size)];
    let mut k = 0;
    while k < blocks.len() {
        if k >= MAX_OH_BLOCKS {
            return None;
        }
        let (start, len) = blocks[k];
        let b = src.read(start, len)?;
        let mut q = 0usize;
        while q + mhead <= b.len() {
            let ty = b[q] as u16;
            let sz = u16_at(&b, q + 1)? as usize;
            let body = b.get(q + mhead..q + mhead + sz)?;
            if ty == want {
                return Some(body.to_vec());
            }
            if ty == 0x0010 {
                // a continuation block: "OCHK", messages, 4-byte checksum
                let (ca, cl) = (u64_at(body, 0)?, u64_at(body, 8)?);
                let sig = src.read(ca, 4)?;
                if sig != b"OCHK" || cl < 8 {
                    return None;
                }
                blocks.push((ca + 4, cl - 8));
            }
            q += mhead + sz;
        }
        k += 1;
    }
    None
}

/// The chunk index of the one-dimensional chunked dataset whose object header is at
/// `ohdr` in `file` (`len` bytes), or `None` (not understood, not one-dimensional,
/// chunked, or corrupt: ask libhdf5).
pub(crate) fn index_1d(file: &std::fs::File, len: u64, ohdr: u64) -> Option<Index1d> {
    if !cfg!(target_endian = "little") {
        return None;
    }
    let src = Src {
        file,
        len,
        budget: std::cell::Cell::new(len.saturating_add(MAX_BLOCK)),
    };
    if !superblock_ok(&src) {
        return None;
    }
    let layout = find_message(&src, ohdr, 0x0008)?;
    // version 3, class 2 (chunked), dimensionality 2 (one dimension + the element size)
    if layout.first() != Some(&3) || layout.get(1) != Some(&2) || layout.get(2) != Some(&2) {
        return None;
    }
    let root = u64_at(&layout, 3)?;
    let chunk = u32_at(&layout, 11)? as u64;
    let esize = u32_at(&layout, 15)? as u64;
    if chunk == 0 || esize == 0 {
        return None;
    }
    let mut chunks = Vec::new();
    let mut nodes = 0usize;
    walk(&src, root, None, &mut nodes, &mut chunks)?;
    chunks.sort_by_key(|c| c.offset[0]);
    if chunks.windows(2).any(|w| w[0].offset == w[1].offset) {
        return None;
    }
    Some(Index1d {
        chunk,
        esize,
        chunks,
    })
}

/// Key: chunk size u32, filter mask u32, two offsets u64 (element, then byte in element).
const KEY: usize = 4 + 4 + 2 * 8;

fn walk(
    src: &Src,
    addr: u64,
    level: Option<u8>,
    nodes: &mut usize,
    out: &mut Vec<ChunkRec>,
) -> Option<()> {
    *nodes += 1;
    if *nodes > MAX_NODES {
        return None;
    }
    let head = src.read(addr, 24)?;
    if &head[..4] != b"TREE" || head[4] != 1 {
        return None;
    }
    let lvl = head[5];
    if level.is_some_and(|l| l != lvl) {
        return None;
    }
    let entries = u16_at(&head, 6)? as u64;
    let body = src.read(addr + 24, entries * (KEY as u64 + 8) + KEY as u64)?;
    // keys (the first offset of each child, then the end) never decrease
    let key_off = |e: usize| u64_at(&body, e * (KEY + 8) + 8);
    for e in 0..entries as usize {
        if key_off(e)? > key_off(e + 1)? {
            return None;
        }
    }
    for e in 0..entries as usize {
        let k = e * (KEY + 8);
        let child = u64_at(&body, k + KEY)?;
        if lvl == 0 {
            let size = u32_at(&body, k)? as u64;
            let mask = u32_at(&body, k + 4)?;
            let off = u64_at(&body, k + 8)?;
            if u64_at(&body, k + 16)? != 0 {
                return None;
            }
            if child.checked_add(size)? > src.len {
                return None;
            }
            out.push(ChunkRec {
                offset: [off],
                addr: child,
                size,
                mask,
            });
        } else {
            walk(src, child, Some(lvl - 1), nodes, out)?;
        }
    }
    Some(())
}

/// The file address of an object's header (from libhdf5's object info), or `None`.
pub(crate) fn object_addr(loc: &hdf5::Location) -> Option<u64> {
    let info = loc.loc_info().ok()?;
    // the token is opaque in the bindings: libhdf5 1.10 has the address itself
    // (`LocationToken(1234)`), 1.12+ a token whose first 8 bytes are the address
    let s = format!("{:?}", info.token);
    let inner = s.strip_prefix("LocationToken(")?.strip_suffix(')')?;
    if let Ok(a) = inner.parse::<u64>() {
        return Some(a);
    }
    let list = inner.split('[').nth(1)?.split(']').next()?;
    let bytes: Vec<u8> = list
        .split(',')
        .map(|t| t.trim().parse::<u8>().ok())
        .collect::<Option<_>>()?;
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// The chunk index of an open one-dimensional chunked dataset, read from `file` (the
/// same file, opened separately), or `None`.
pub(crate) fn dataset_index(ds: &hdf5::Dataset, file: &std::fs::File) -> Option<Index1d> {
    if ds.ndim() != 1 || ds.chunk().is_none() {
        return None;
    }
    let len = file.metadata().ok()?.len();
    index_1d(file, len, object_addr(ds)?)
}
