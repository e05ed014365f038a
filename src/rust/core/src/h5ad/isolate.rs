//! libhdf5 1.10 trusts a file's metadata: a corrupted object header can crash it
//! (e.g. a segmentation fault in `H5A__copy` while listing attributes) or make it loop
//! forever, and no error return is possible then. So before a file is read in this
//! process, a forked child process first checks the file's global heap collections
//! (see [`super::heapcheck`]; outside the raw data of numeric datasets, found from their
//! object headers and chunk indexes), then walks all of its metadata the way a read
//! does: every group, every attribute (names and values), every dataset's type, shape,
//! creation properties and chunk index (libhdf5's walk only where [`super::chunkidx`]
//! could not read it), the string and small datasets and the AnnData elements other
//! than the matrices' values (which the parent reads through bounds-checked paths). If
//! the child finds a bad heap, dies from a signal, or runs past [`TIMEOUT`], the file is
//! a format error in the parent, which never touched the bad metadata. Where no child
//! can be started, the parent checks the heaps of the whole file itself. A child that
//! finished its walk closes all its descriptors and writes a last byte: the parent goes
//! on at once and a thread reaps the child (its exit, the teardown of its copy of the
//! parent's memory, took 5-25 ms). The verdict is cached per (path, size, modification
//! time): one walk per file version.
//!
//! The child restores the default action of the crash signals (the host's handlers, e.g.
//! R's, must not run there), runs only HDF5 calls on the forking thread (no rayon, no R)
//! and leaves with `_exit`; errors inside it are fine (the parent reports them properly on its own read).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use hdf5::{Group, LocationType};
use hdf5_metno as hdf5;

use super::read::H5ad;
use crate::{ScError, ScResult};

/// How long the child may walk a file.
const TIMEOUT: Duration = Duration::from_secs(120);

type Key = (String, u64, Option<SystemTime>);
static VERDICTS: Mutex<Option<HashMap<Key, Result<(), String>>>> = Mutex::new(None);

/// A matrix element the caller will read next, and what to do with its size (stored
/// values, and whether it is sparse) as soon as the child knows it (start the zero fill
/// of its memory while the child is still walking).
pub(crate) type Hint<'a> = (&'a str, &'a dyn Fn(usize, bool));

/// Ok when a child process walked the file's metadata without crashing or hanging.
/// With a `hint`, the size of the matrix `hint.0` is passed to `hint.1` while the child
/// walks (only when a child runs: a cached verdict calls nothing).
pub(crate) fn check_hint(path: &str, hint: Option<Hint>) -> ScResult<()> {
    let meta = std::fs::metadata(path)
        .map_err(|e| ScError::Format(format!("cannot open '{path}': {e}")))?;
    let key: Key = (path.to_string(), meta.len(), meta.modified().ok());
    if let Some(v) = VERDICTS
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(&key).cloned()))
    {
        return v.map_err(ScError::Format);
    }
    let verdict = in_child(path, hint);
    if let Ok(mut m) = VERDICTS.lock() {
        let m = m.get_or_insert_with(HashMap::new);
        if m.len() > 256 {
            m.clear();
        }
        m.insert(key, verdict.clone());
    }
    verdict.map_err(ScError::Format)
}

fn in_child(path: &str, hint: Option<Hint>) -> Result<(), String> {
    // Fork while holding the HDF5 lock (every HDF5 call of this crate and of hdf5-metno
    // takes it), so no other thread is inside libhdf5 or holds the lock at the fork; the
    // child's only thread owns it (reentrant) and never returns from the closure.
    //
    // The child inherits every open descriptor, and with those the HDF5 file locks
    // (flock belongs to the open file description, so a lock lives on in the child after
    // the parent closed the file). The parent therefore keeps the HDF5 lock until the
    // child reports (one byte on `ready`, or end of file if it died) that it closed the
    // inherited descriptors: no HDF5 call of another thread (a reopen of a file just
    // written and closed) can see a lock held only by the child.
    let mut ready = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array; failure is checked.
    let have_pipe = unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } == 0;
    let pid = hdf5::sync::sync(|| {
        // SAFETY: fork duplicates only this thread; the child runs HDF5 calls on it and
        // ends with _exit, never returning into the caller's frames.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // the host's crash handlers must not run in the child (R's would clean up the
            // parent's session temporary directory): a crash just ends the child
            for sig in [
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
                libc::SIGABRT,
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGPIPE,
            ] {
                // SAFETY: restores the default action in this single-threaded child.
                unsafe { libc::signal(sig, libc::SIG_DFL) };
            }
            close_inherited(path, if have_pipe { ready[1] } else { -1 });
            if have_pipe {
                // SAFETY: writes one byte to this child's pipe end.
                unsafe { libc::write(ready[1], [1u8].as_ptr().cast(), 1) };
            }
            let fd = if have_pipe { ready[1] } else { -1 };
            let want = hint.map(|h| h.0);
            let heap = std::panic::catch_unwind(|| child_main(path, want, fd)).unwrap_or(None);
            if let Some(msg) = heap {
                if have_pipe {
                    // SAFETY: writes the message (at most a few hundred bytes, within
                    // the pipe's buffer) to this child's pipe end.
                    unsafe { libc::write(ready[1], msg.as_ptr().cast(), msg.len()) };
                }
                // SAFETY: as below.
                unsafe { libc::_exit(HEAP_BAD) };
            }
            if have_pipe {
                // the walk is over: close every other descriptor (the file's, with any
                // lock on it), then tell the parent, which need not wait for this
                // process's exit (the teardown of its copy of the parent's memory)
                close_inherited("", ready[1]);
                // SAFETY: writes one byte to this child's pipe end.
                unsafe { libc::write(ready[1], [DONE_TAG].as_ptr().cast(), 1) };
            }
            // SAFETY: ends the child at once, without the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        if have_pipe {
            // SAFETY: the parent's copy of the write end is closed, so the pipe becomes
            // readable with the child's byte or at end of file (child gone, or no child:
            // fork failed); a child stuck before that is waited for at most 10 s here
            // (then as before: the walk's own timeout below).
            unsafe {
                libc::close(ready[1]);
                let mut pfd = libc::pollfd {
                    fd: ready[0],
                    events: libc::POLLIN,
                    revents: 0,
                };
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(10) {
                    let r = libc::poll(&mut pfd, 1, 100);
                    if r > 0 || (r < 0 && !interrupted()) {
                        break;
                    }
                }
            }
        }
        pid
    });
    // the read end, closed on every return below
    struct Fd(libc::c_int);
    impl Drop for Fd {
        fn drop(&mut self) {
            if self.0 >= 0 {
                // SAFETY: closes the parent's read end of the pipe, once.
                unsafe { libc::close(self.0) };
            }
        }
    }
    let rd = Fd(if have_pipe { ready[0] } else { -1 });
    // what the child wrote: its "ready" byte, then the hint's size record (SIZE_TAG), then
    // a heap error message (text: never SIZE_TAG) or, after a finished walk, DONE_TAG
    let mut got: Vec<u8> = Vec::new();
    let mut hinted = false;
    // returns whether the pipe is at end of file (the child has exited, or is exiting)
    let mut drain = |got: &mut Vec<u8>| -> bool {
        if rd.0 < 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            // SAFETY: a non-blocking read into a local buffer from our pipe end.
            let k = unsafe { libc::read(rd.0, buf.as_mut_ptr().cast(), buf.len()) };
            if k == 0 {
                eof = true;
            }
            if k <= 0 || got.len() > 1 << 16 {
                break;
            }
            got.extend_from_slice(&buf[..k as usize]);
        }
        if let (false, Some((_, f))) = (hinted, hint) {
            if got.len() >= 11 && got[1] == SIZE_TAG {
                hinted = true;
                let nnz = u64::from_le_bytes(got[2..10].try_into().unwrap_or([0; 8]));
                f(nnz as usize, got[10] == 1);
            }
        }
        eof
    };
    if rd.0 >= 0 {
        // SAFETY: sets O_NONBLOCK on our own pipe end.
        unsafe {
            let fl = libc::fcntl(rd.0, libc::F_GETFL);
            libc::fcntl(rd.0, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    if pid < 0 {
        // cannot fork: read as before, with the global heap check in this process
        return super::heapcheck::check(path).map_err(|e| e.to_string());
    }
    let start = Instant::now();
    let mut status: libc::c_int = 0;
    let mut eof = false;
    loop {
        // SAFETY: waits for our own child; status is a plain integer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        eof |= drain(&mut got);
        let at = if got.get(1) == Some(&SIZE_TAG) { 11 } else { 1 };
        if got.len() == at + 1 && got[at] == DONE_TAG {
            // the walk finished and the child closed its descriptors: only its exit is
            // left, reaped by a thread (or here, where none can be started)
            let reaper = std::thread::Builder::new()
                .name("scannot-reap".into())
                .spawn(move || {
                    let mut st: libc::c_int = 0;
                    // SAFETY: waits for our own child; status is a plain integer.
                    unsafe { libc::waitpid(pid, &mut st, 0) };
                });
            if reaper.is_err() {
                // SAFETY: as above.
                unsafe { libc::waitpid(pid, &mut status, 0) };
            }
            return Ok(());
        }
        if r < 0 {
            // the child was reaped elsewhere (e.g. a SIGCHLD handler): its verdict is
            // unknown; the global heap check runs here
            return super::heapcheck::check(path).map_err(|e| e.to_string());
        }
        if start.elapsed() > TIMEOUT {
            // SAFETY: kills and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!(
                "'{path}' is corrupt: reading its metadata did not finish in {} s",
                TIMEOUT.as_secs()
            ));
        }
        if rd.0 >= 0 && !eof {
            // wake as soon as the child writes (its size record) or exits (end of file:
            // the child never closes its write end itself), at the latest after 10 ms
            let mut pfd = libc::pollfd {
                fd: rd.0,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls our own pipe end, one pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        } else {
            // exiting (or no pipe): its status comes within moments
            std::thread::sleep(Duration::from_micros(if eof { 200 } else { 1000 }));
        }
    }
    // the child has exited: the rest of what it wrote, then end of file
    drain(&mut got);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == HEAP_BAD {
        let skip = if got.get(1) == Some(&SIZE_TAG) { 11 } else { 1 };
        let text = String::from_utf8_lossy(got.get(skip..).unwrap_or(&[])).into_owned();
        return Err(format!(
            "'{path}' is corrupt: {}",
            if text.is_empty() {
                "a global heap collection of the file has a bad object size".to_string()
            } else {
                text
            }
        ));
    }
    if libc::WIFSIGNALED(status) {
        return Err(format!(
            "'{path}' is corrupt: its HDF5 metadata crashes the HDF5 library (signal {})",
            libc::WTERMSIG(status)
        ));
    }
    Ok(())
}

fn interrupted() -> bool {
    std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
}

/// Close the descriptors the child inherited (other threads' HDF5 files with their
/// locks, sockets, pipes) except `keep` (its pipe to the parent), so that a file
/// another thread closes is really closed while the child walks. Kept: standard streams, and descriptors of the file being checked
/// itself (HDF5 shares an open file: the child's open of `path` may reuse the parent's
/// handle, whose descriptor must stay valid). The child touches no other inherited
/// HDF5 file and leaves with `_exit`, so the stale handles are never used.
fn close_inherited(path: &str, keep: libc::c_int) {
    use std::os::unix::fs::MetadataExt;
    // (an empty path: close them all)
    let (dev, ino) = if path.is_empty() {
        (u64::MAX, u64::MAX)
    } else {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        (meta.dev(), meta.ino())
    };
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // collect first: closing while listing would close the listing's own descriptor
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd <= 2 || fd == keep {
            continue;
        }
        // SAFETY: fstat on a descriptor number fills a plain struct (EBADF for the
        // listing's own, already closed descriptor).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            continue;
        }
        if st.st_dev as u64 == dev && st.st_ino as u64 == ino {
            continue;
        }
        // SAFETY: closes a descriptor of this single-threaded child only.
        unsafe { libc::close(fd) };
    }
}

/// Exit status of a child that found a bad global heap collection (its message follows
/// the "ready" byte on the pipe).
const HEAP_BAD: libc::c_int = 3;

/// First byte of the child's size record for a [`Hint`] (never in UTF-8 text).
const SIZE_TAG: u8 = 0xFF;

/// The child's last byte after a walk that ended (never in UTF-8 text).
const DONE_TAG: u8 = 0xFE;

/// The child's work: find the raw data of the file's numeric datasets (object headers
/// and chunk indexes only: nothing that reads a global heap), check the global heap
/// collections in the rest of the file (see [`super::heapcheck`]; the raw data is left
/// out: in a 400 MB matrix a "GCOL" is only a coincidence of the values, and scanning it
/// cost more than reading it), then walk the metadata. `Some(message)`: a bad heap.
fn child_main(path: &str, want: Option<&str>, fd: libc::c_int) -> Option<String> {
    hdf5::silence_errors(true);
    let (skip, indexed) = raw_data(path);
    if let Ok(file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if let Err(e) = super::heapcheck::scan_except(&file, len, &skip) {
            return Some(e);
        }
    }
    // (after the heap check: opening the element reads its string attributes)
    if let (Some(elem), true) = (want, fd >= 0) {
        let m = H5ad::open_unchecked(path).and_then(|f| f.matrix(elem));
        if let Ok(m) = m {
            let mut rec = [0u8; 10];
            rec[0] = SIZE_TAG;
            rec[1..9].copy_from_slice(&(m.nnz as u64).to_le_bytes());
            rec[9] = (m.kind != super::MatrixKind::Dense) as u8;
            // SAFETY: writes 10 bytes from a local array to this child's pipe end.
            unsafe { libc::write(fd, rec.as_ptr().cast(), rec.len()) };
        }
    }
    walk(path, &indexed);
    None
}

/// The raw data byte ranges of the file's numeric datasets (sorted, disjoint; empty
/// when any two overlap, as only in a corrupt file), and the datasets whose chunk index
/// [`super::chunkidx`] read (libhdf5 need not walk it here: the reader reads those
/// chunks from their addresses, or libhdf5 walks an index that was found sound).
fn raw_data(path: &str) -> (Vec<(u64, u64)>, HashSet<String>) {
    let mut ranges = Vec::new();
    let mut indexed = HashSet::new();
    let (Ok(f), Ok(file)) = (hdf5::File::open(path), std::fs::File::open(path)) else {
        return (ranges, indexed);
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut stack: Vec<(Group, usize)> = f.group("/").ok().map(|g| (g, 0)).into_iter().collect();
    while let Some((g, depth)) = stack.pop() {
        for name in g.member_names().unwrap_or_default() {
            match g.loc_type_by_name(&name) {
                Ok(LocationType::Group) if depth < 32 => {
                    if let Ok(s) = g.group(&name) {
                        stack.push((s, depth + 1));
                    }
                }
                Ok(LocationType::Dataset) => {
                    let Ok(d) = g.dataset(&name) else { continue };
                    if let Some(idx) = super::chunkidx::dataset_index(&d, &file) {
                        ranges.extend(idx.chunks.iter().map(|c| (c.addr, c.addr + c.size)));
                        indexed.insert(d.name());
                        continue;
                    }
                    let numeric = d.dtype().and_then(|t| t.to_descriptor()).is_ok_and(|t| {
                        use hdf5::types::TypeDescriptor as T;
                        matches!(t, T::Integer(_) | T::Unsigned(_) | T::Float(_) | T::Boolean)
                    });
                    if let (true, Some(a), Ok(t)) = (numeric, d.offset(), d.dtype()) {
                        let bytes = (d.size() as u64).saturating_mul(t.size() as u64);
                        if d.chunk().is_none()
                            && d.storage_size() == bytes
                            && a.checked_add(bytes).is_some_and(|e| e <= len)
                        {
                            ranges.push((a, a + bytes));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        if a == b {
            continue;
        }
        match merged.last_mut() {
            Some(l) if a < l.1 => return (Vec::new(), indexed),
            Some(l) if a == l.1 => l.1 = b,
            _ => merged.push((a, b)),
        }
    }
    (merged, indexed)
}

/// Everything a read touches, except the values of the matrices.
fn walk(path: &str, indexed: &HashSet<String>) {
    hdf5::silence_errors(true);
    if let Ok(f) = hdf5::File::open(path) {
        if let Ok(g) = f.group("/") {
            walk_group(&g, 0, indexed);
        }
    }
    if let Ok(f) = H5ad::open_unchecked(path) {
        for m in ["X", "raw/X"] {
            let _ = f.matrix(m);
        }
        for grp in ["layers", "obsp", "varp"] {
            for k in f.keys(grp).unwrap_or_default() {
                let _ = f.matrix(&format!("{grp}/{k}"));
            }
        }
        for fr in ["obs", "var", "raw/var"] {
            if f.exists(fr) {
                let _ = f.frame(fr);
            }
        }
        for el in ["obsm", "varm", "uns", "raw/varm"] {
            if f.exists(el) {
                let _ = f.read(el);
            }
        }
    }
}

fn attrs(loc: &hdf5::Location) {
    for n in loc.attr_names().unwrap_or_default() {
        if let Ok(a) = loc.attr(&n) {
            let _ = a.dtype().and_then(|t| t.to_descriptor());
            let _ = super::read::read_any(&a);
        }
    }
}

fn walk_group(g: &Group, depth: usize, indexed: &HashSet<String>) {
    if depth > 32 {
        return;
    }
    attrs(g);
    for name in g.member_names().unwrap_or_default() {
        match g.loc_type_by_name(&name) {
            Ok(LocationType::Group) => {
                if let Ok(s) = g.group(&name) {
                    walk_group(&s, depth + 1, indexed);
                }
            }
            Ok(LocationType::Dataset) => {
                if let Ok(d) = g.dataset(&name) {
                    attrs(&d);
                    let _ = d.shape();
                    let _ = d.filters();
                    let _ = d.chunk();
                    // (the data frames' columns are read below, by the reader's code)
                    let name = d.name();
                    let in_frame = ["/obs/", "/var/", "/raw/var/"]
                        .iter()
                        .any(|p| name.starts_with(p));
                    if d.size() <= 1 << 16 && !in_frame {
                        let _ = super::read::read_any(&d);
                    }
                    if !indexed.contains(&name) {
                        super::direct::walk_chunks(&d);
                    }
                }
            }
            _ => {}
        }
    }
}
