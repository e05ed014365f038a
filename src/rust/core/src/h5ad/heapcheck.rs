//! A guard against a libhdf5 (1.10.x) hang: a global heap collection ("GCOL", where
//! variable-length strings live) whose free-space object has size 0 makes libhdf5's heap
//! parser loop forever, and an object size that wraps the pointer sends it reading wild
//! memory. Both happen on truncated or corrupted files the moment a variable-length
//! string (an `encoding-type` attribute, an index) is read. Before HDF5 reads anything
//! of a file, the checking child of [`super::isolate`] finds every collection by its
//! signature ([`scan_except`]: the file less the raw data of its numeric datasets) and
//! replays the parser's walk over its objects; a walk that would not advance or would
//! leave the collection makes the file a format error. Where no child can be started,
//! [`check`] scans the whole file in parallel in this process. The verdicts are cached
//! per (path, size, modification time), so a file is scanned once however many elements
//! are read from it.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::SystemTime;

use rayon::prelude::*;

use crate::{ScError, ScResult};

type Key = (String, u64, Option<SystemTime>);

static VERDICTS: Mutex<Option<HashMap<Key, Result<(), String>>>> = Mutex::new(None);

/// Ok when no global heap collection of the file would hang or misdirect libhdf5.
pub(crate) fn check(path: &str) -> ScResult<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| ScError::Format(format!("cannot open '{path}': {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| ScError::Format(format!("cannot open '{path}': {e}")))?;
    let key: Key = (path.to_string(), meta.len(), meta.modified().ok());
    if let Some(v) = VERDICTS
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(&key).cloned()))
    {
        return v.map_err(ScError::Format);
    }
    let verdict = scan(&file, meta.len()).map_err(|e| format!("'{path}' is corrupt: {e}"));
    if let Ok(mut m) = VERDICTS.lock() {
        let m = m.get_or_insert_with(HashMap::new);
        if m.len() > 256 {
            m.clear();
        }
        m.insert(key, verdict.clone());
    }
    verdict.map_err(ScError::Format)
}

const BLOCK: u64 = 8 << 20;

fn scan(file: &std::fs::File, len: u64) -> Result<(), String> {
    let n_blocks = len.div_ceil(BLOCK);
    (0..n_blocks)
        .into_par_iter()
        .try_for_each_init(Vec::new, |buf, b| {
            let start = b * BLOCK;
            // overlap by 3 bytes so a signature across two blocks is found once
            let end = (start + BLOCK + 3).min(len);
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(buf, start)
                .map_err(|e| format!("cannot read the file: {e}"))?;
            for at in memchr::memmem::find_iter(buf, b"GCOL") {
                check_collection(file, len, start + at as u64)?;
            }
            Ok(())
        })
}

/// [`check`]'s scan on this thread only (for the checking child process of
/// [`super::isolate`], which must not use the thread pool), over the file except the
/// byte ranges `skip` (sorted, disjoint `[start, end)`: the raw data of numeric
/// datasets, where a "GCOL" would only be a coincidence of the values).
pub(crate) fn scan_except(
    file: &std::fs::File,
    len: u64,
    skip: &[(u64, u64)],
) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut at = 0u64;
    let mut gaps = Vec::with_capacity(skip.len() + 1);
    for &(a, b) in skip {
        if a > at {
            gaps.push((at, a.min(len)));
        }
        at = at.max(b);
    }
    if at < len {
        gaps.push((at, len));
    }
    for (a, b) in gaps {
        let mut start = a;
        while start < b {
            // overlap by 3 bytes so a signature across two blocks is found once
            let end = (start + BLOCK).min(b);
            let stop = (end + 3).min(len);
            buf.resize((stop - start) as usize, 0);
            file.read_exact_at(&mut buf, start)
                .map_err(|e| format!("cannot read the file: {e}"))?;
            for at in memchr::memmem::find_iter(&buf, b"GCOL") {
                if start + (at as u64) < end {
                    check_collection(file, len, start + at as u64)?;
                }
            }
            start = end;
        }
    }
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Replay libhdf5's walk over the objects of the collection at `addr` (8-byte lengths,
/// as in every file anndata / h5py write; other files are left to HDF5).
fn check_collection(file: &std::fs::File, len: u64, addr: u64) -> Result<(), String> {
    let mut head = [0u8; 16];
    if addr + 16 > len || file.read_exact_at(&mut head, addr).is_err() {
        return Ok(()); // HDF5 itself fails to read a collection cut by the end of file
    }
    if head[4] != 1 {
        return Ok(()); // not a collection (or a version HDF5 refuses)
    }
    let size = u64_at(&head, 8);
    if size < 16 || addr.checked_add(size).is_none_or(|e| e > len) {
        return Ok(()); // HDF5 refuses a collection past the end of file
    }
    let mut heap = vec![0u8; size as usize];
    file.read_exact_at(&mut heap, addr)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let mut p = 16u64;
    while p < size {
        if p + 16 > size {
            break; // a tail too small for an object header is free space
        }
        let idx = u16::from_le_bytes([heap[p as usize], heap[p as usize + 1]]);
        let osize = u64_at(&heap, p as usize + 8);
        let need = if idx > 0 {
            osize
                .checked_add(7)
                .map(|v| v & !7)
                .and_then(|v| v.checked_add(16))
        } else {
            Some(osize)
        };
        match need {
            Some(n) if n > 0 && n <= size - p => p += n,
            _ => {
                return Err(format!(
                    "the global heap collection at byte {addr} has an object of bad size \
                     {osize} at byte {}",
                    addr + p
                ))
            }
        }
    }
    Ok(())
}
