//! libhdf5 1.10 trusts a file's metadata: a corrupted object header can crash it
//! (e.g. a segmentation fault in `H5A__copy` while listing attributes) or make it loop
//! forever, and no error return is possible then. So before a file is read in this
//! process, a forked child process walks all of its metadata the way a read does: every
//! group, every attribute (names and values), every dataset's type, shape, creation
//! properties and chunk index, the string and small datasets and the AnnData elements
//! other than the matrices' values (which the parent reads through bounds-checked
//! paths). If the child dies from a signal, or runs past [`TIMEOUT`], the file is a
//! format error in the parent, which never touched the bad metadata. The verdict is
//! cached per (path, size, modification time): one walk per file version.
//!
//! The child restores the default action of the crash signals (the host's handlers, e.g.
//! R's, must not run there), runs only HDF5 calls on the forking thread (no rayon, no R)
//! and leaves with `_exit`; errors inside it are fine (the parent reports them properly on its own read).

use std::collections::HashMap;
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

/// Ok when a child process walked the file's metadata without crashing or hanging.
pub(crate) fn check(path: &str) -> ScResult<()> {
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
    let verdict = in_child(path);
    if let Ok(mut m) = VERDICTS.lock() {
        let m = m.get_or_insert_with(HashMap::new);
        if m.len() > 256 {
            m.clear();
        }
        m.insert(key, verdict.clone());
    }
    verdict.map_err(ScError::Format)
}

fn in_child(path: &str) -> Result<(), String> {
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
                // SAFETY: writes one byte to, then closes, this child's pipe end.
                unsafe {
                    libc::write(ready[1], [1u8].as_ptr().cast(), 1);
                    libc::close(ready[1]);
                }
            }
            let _ = std::panic::catch_unwind(|| walk(path));
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
                libc::close(ready[0]);
            }
        }
        pid
    });
    if pid < 0 {
        return Ok(()); // cannot fork: read as before
    }
    let start = Instant::now();
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waits for our own child; status is a plain integer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if r < 0 {
            return Ok(()); // the child was reaped elsewhere (e.g. a SIGCHLD handler)
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
        std::thread::sleep(Duration::from_millis(if start.elapsed().as_millis() < 50 {
            1
        } else {
            10
        }));
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
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let (dev, ino) = (meta.dev(), meta.ino());
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

/// Everything a read touches, except the values of the matrices.
fn walk(path: &str) {
    hdf5::silence_errors(true);
    if let Ok(f) = hdf5::File::open(path) {
        if let Ok(g) = f.group("/") {
            walk_group(&g, 0);
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

fn walk_group(g: &Group, depth: usize) {
    if depth > 32 {
        return;
    }
    attrs(g);
    for name in g.member_names().unwrap_or_default() {
        match g.loc_type_by_name(&name) {
            Ok(LocationType::Group) => {
                if let Ok(s) = g.group(&name) {
                    walk_group(&s, depth + 1);
                }
            }
            Ok(LocationType::Dataset) => {
                if let Ok(d) = g.dataset(&name) {
                    attrs(&d);
                    let _ = d.shape();
                    let _ = d.filters();
                    let _ = d.chunk();
                    if d.size() <= 1 << 16 {
                        let _ = super::read::read_any(&d);
                    }
                    super::direct::walk_chunks(&d);
                }
            }
            _ => {}
        }
    }
}
