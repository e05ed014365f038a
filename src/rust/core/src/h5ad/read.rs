//! Reading AnnData elements from an HDF5 file.

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};

use hdf5::types::{TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Container, Dataset, Group, LocationType};
use hdf5_metno as hdf5;
use hdf5_sys::h5d::{H5Dread, H5Dvlen_reclaim};
use hdf5_sys::h5p::H5P_DEFAULT;
use hdf5_sys::h5s::H5S_ALL;
use hdf5_sys::h5t::{
    H5T_class_t, H5T_direction_t, H5T_sign_t, H5Tclose, H5Tget_class, H5Tget_member_name,
    H5Tget_member_offset, H5Tget_member_type, H5Tget_native_type, H5Tget_nmembers, H5Tget_sign,
    H5Tget_size, H5Tis_variable_str,
};

use super::{direct, Elem, Frame, MatrixKind, Sparse, Values};
use crate::{ScError, ScResult};

fn ferr(ctx: &str, e: impl std::fmt::Display) -> ScError {
    ScError::Format(format!("{ctx}: {e}"))
}

/// An open `.h5ad` file (read-only).
pub struct H5ad {
    file: hdf5::File,
    path: String,
    skipped: std::cell::RefCell<Vec<String>>,
}

/// A matrix element (X, a layer, obsp, raw/X) whose arrays can be read into
/// caller-owned buffers.
pub struct MatrixInfo {
    pub kind: MatrixKind,
    /// Shape as stored (AnnData: obs x var).
    pub shape: [usize; 2],
    /// Stored entries (sparse) or `shape[0] * shape[1]` (dense).
    pub nnz: usize,
    /// The stored values are integers (e.g. raw counts).
    pub integer: bool,
    name: String,
    /// the file's path and userblock size, for the parallel direct reads
    file_path: String,
    userblock: u64,
    data: Dataset,
    indices: Option<Dataset>,
    indptr: Option<Dataset>,
}

impl H5ad {
    /// Open a file and check that it looks like an AnnData file.
    pub fn open(path: &str) -> ScResult<Self> {
        Self::open_hint(path, None)
    }

    /// [`H5ad::open`] for a caller that reads the matrix `elem` next: when the file is
    /// checked now (its first open in this process), `on_size` gets the matrix's stored
    /// values and whether it is sparse as soon as the checking child knows them, while
    /// the child still walks the file (to start the zero fill of its memory, see
    /// [`super::mem::prefault`]); with a cached verdict it is not called.
    pub fn open_with_hint(path: &str, elem: &str, on_size: &dyn Fn(usize, bool)) -> ScResult<Self> {
        Self::open_hint(path, Some((elem, on_size)))
    }

    fn open_hint(path: &str, hint: Option<super::isolate::Hint>) -> ScResult<Self> {
        if !std::path::Path::new(path).is_file() {
            return Err(ScError::Format(format!(
                "'{path}' does not exist or is not a file"
            )));
        }
        // libhdf5 can hang on a corrupt global heap, and crash or hang on other corrupt
        // metadata: a child process checks the heaps, then walks the metadata
        super::isolate::check_hint(path, hint)?;
        Self::open_unchecked(path)
    }

    /// [`H5ad::open`] without the corruption guards (for the guard's own child process).
    pub(crate) fn open_unchecked(path: &str) -> ScResult<Self> {
        hdf5::silence_errors(true);
        let file = hdf5::File::open(path).map_err(|e| {
            ScError::Format(format!(
                "'{path}' is not a readable HDF5 file (truncated, corrupt or another format): {e}"
            ))
        })?;
        let me = H5ad {
            file,
            path: path.to_string(),
            skipped: Default::default(),
        };
        let enc = attr_string(&me.file, "encoding-type");
        let looks = matches!(enc.as_deref(), Some("anndata"))
            || me.exists("obs")
            || me.exists("var")
            || me.exists("X");
        if !looks {
            return Err(ScError::Format(format!(
                "'{path}' is an HDF5 file but not an AnnData (.h5ad) file: it has no X, obs or var"
            )));
        }
        Ok(me)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Elements that were skipped because their encoding is not supported (with why).
    pub fn take_skipped(&self) -> Vec<String> {
        std::mem::take(&mut self.skipped.borrow_mut())
    }

    /// Whether an object exists at a `/`-separated path.
    pub fn exists(&self, path: &str) -> bool {
        let mut g: Group = match self.file.group("/") {
            Ok(g) => g,
            Err(_) => return false,
        };
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for (k, part) in parts.iter().enumerate() {
            if !g.link_exists(part) {
                return false;
            }
            if k + 1 < parts.len() {
                g = match g.group(part) {
                    Ok(x) => x,
                    Err(_) => return false,
                };
            }
        }
        true
    }

    /// Member names of the group at `path` (sorted by name); empty if it does not exist.
    pub fn keys(&self, path: &str) -> ScResult<Vec<String>> {
        if !self.exists(path) {
            return Ok(vec![]);
        }
        let g = self
            .file
            .group(path)
            .map_err(|e| ferr(&format!("'{path}' is not a group"), e))?;
        g.member_names()
            .map_err(|e| ferr(&format!("cannot list '{path}'"), e))
    }

    /// A corrupt size must not turn into a huge allocation: `n` values need at least
    /// `n / 1100` bytes of file (gzip's best ratio is about 1032:1) unless the dataset
    /// has no storage yet (all fill values), which a few bytes describe.
    fn plausible(&self, path: &str, n: usize, ds: &Dataset) -> ScResult<()> {
        let file_len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let stored = ds.storage_size();
        if (n as u128) * 8 > (file_len as u128 + 4096) * 1100 || (stored > 0 && stored > file_len) {
            return Err(ScError::Format(format!(
                "matrix '{path}' claims {n} values, more than a {file_len}-byte file can hold: \
                 the file is corrupt"
            )));
        }
        Ok(())
    }

    /// Read any element.
    pub fn read(&self, path: &str) -> ScResult<Elem> {
        let (parent, name) = self.parent_of(path)?;
        read_elem(&parent, name, path, &self.skipped)
    }

    /// Read a data frame element (`obs`, `var`, `raw/var`).
    pub fn frame(&self, path: &str) -> ScResult<Frame> {
        match self.read(path)? {
            Elem::Frame(f) => Ok(f),
            // anndata < 0.7: a compound dataset with an `index` field
            Elem::Record(fields) => {
                let mut index = None;
                let mut columns = vec![];
                for (name, v) in fields {
                    if name == "index" && index.is_none() {
                        index = Some(
                            v.to_strings()
                                .into_iter()
                                .map(|s| s.unwrap_or_default())
                                .collect(),
                        );
                    } else {
                        let n = v.len();
                        columns.push((
                            name,
                            Elem::Array {
                                shape: vec![n],
                                values: v,
                            },
                        ));
                    }
                }
                let index = index.ok_or_else(|| {
                    ScError::Format(format!(
                        "'{path}' is a record array without an 'index' field"
                    ))
                })?;
                Ok(Frame {
                    index_name: "index".into(),
                    index,
                    columns,
                })
            }
            _ => Err(ScError::Format(format!("'{path}' is not a data frame"))),
        }
    }

    fn parent_of<'a>(&self, path: &'a str) -> ScResult<(Group, &'a str)> {
        let path = path.trim_matches('/');
        if !self.exists(path) {
            return Err(ScError::Format(format!(
                "'{}' has no element '{path}'",
                self.path
            )));
        }
        let (dir, name) = match path.rfind('/') {
            Some(k) => (&path[..k], &path[k + 1..]),
            None => ("/", path),
        };
        let g = self
            .file
            .group(dir)
            .map_err(|e| ferr(&format!("cannot open group '{dir}'"), e))?;
        Ok((g, name))
    }

    /// Describe a matrix element (sparse group or 2-D dense dataset).
    pub fn matrix(&self, path: &str) -> ScResult<MatrixInfo> {
        let (parent, name) = self.parent_of(path)?;
        let ctx = |e: hdf5::Error| ferr(&format!("cannot read matrix '{path}'"), e);
        match parent.loc_type_by_name(name).map_err(ctx)? {
            LocationType::Group => {
                let g = parent.group(name).map_err(ctx)?;
                let (csr, shape) = sparse_header(&g, path)?;
                let data = g.dataset("data").map_err(ctx)?;
                let indices = g.dataset("indices").map_err(ctx)?;
                let indptr = g.dataset("indptr").map_err(ctx)?;
                let nnz = data.size();
                let integer = is_integer(&data)?;
                if indices.size() != nnz {
                    return Err(ScError::Format(format!(
                        "sparse matrix '{path}': {} indices for {nnz} values",
                        indices.size()
                    )));
                }
                let major = if csr { shape[0] } else { shape[1] };
                if indptr.size() != major + 1 {
                    return Err(ScError::Format(format!(
                        "sparse matrix '{path}': indptr has {} entries, expected {}",
                        indptr.size(),
                        major + 1
                    )));
                }
                if nnz > i32::MAX as usize
                    || shape[0] > i32::MAX as usize
                    || shape[1] > i32::MAX as usize
                {
                    return Err(ScError::Format(format!(
                        "sparse matrix '{path}' has {nnz} entries or a dimension beyond 2^31-1, \
                         which R's dgCMatrix cannot hold"
                    )));
                }
                self.plausible(path, nnz, &data)?;
                Ok(MatrixInfo {
                    kind: if csr {
                        MatrixKind::Csr
                    } else {
                        MatrixKind::Csc
                    },
                    shape,
                    nnz,
                    integer,
                    name: path.to_string(),
                    file_path: self.path.clone(),
                    userblock: self.file.userblock(),
                    data,
                    indices: Some(indices),
                    indptr: Some(indptr),
                })
            }
            LocationType::Dataset => {
                let ds = parent.dataset(name).map_err(ctx)?;
                let sh = ds.shape();
                let shape = match sh.as_slice() {
                    [a, b] => [*a, *b],
                    [a] => [*a, 1],
                    _ => {
                        return Err(ScError::Format(format!(
                            "'{path}' is a {}-dimensional array, not a matrix",
                            sh.len()
                        )))
                    }
                };
                let integer = is_integer(&ds)?;
                if !integer && !is_float(&ds)? {
                    return Err(ScError::Format(format!("matrix '{path}' is not numeric")));
                }
                let nnz = shape[0]
                    .checked_mul(shape[1])
                    .filter(|&n| n == ds.size())
                    .ok_or_else(|| {
                        ScError::Format(format!("matrix '{path}' has a corrupt shape"))
                    })?;
                self.plausible(path, nnz, &ds)?;
                Ok(MatrixInfo {
                    kind: MatrixKind::Dense,
                    shape,
                    nnz,
                    integer,
                    name: path.to_string(),
                    file_path: self.path.clone(),
                    userblock: self.file.userblock(),
                    data: ds,
                    indices: None,
                    indptr: None,
                })
            }
            other => Err(ScError::Format(format!(
                "'{path}' is a {other:?}, not a matrix"
            ))),
        }
    }
}

fn is_integer(ds: &Dataset) -> ScResult<bool> {
    Ok(matches!(
        descriptor(ds)?,
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) | TypeDescriptor::Boolean
    ))
}

fn is_float(ds: &Dataset) -> ScResult<bool> {
    Ok(matches!(descriptor(ds)?, TypeDescriptor::Float(_)))
}

fn descriptor(c: &Container) -> ScResult<TypeDescriptor> {
    c.dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(|e| ferr("unsupported HDF5 data type", e))
}

/// `(is_csr, shape)` of a sparse group, from anndata >= 0.8 or legacy attributes.
fn sparse_header(g: &Group, path: &str) -> ScResult<(bool, [usize; 2])> {
    let enc = attr_string(g, "encoding-type")
        .or_else(|| attr_string(g, "h5sparse_format").map(|f| format!("{f}_matrix")));
    let csr = match enc.as_deref() {
        Some("csr_matrix") => true,
        Some("csc_matrix") => false,
        other => {
            return Err(ScError::Format(format!(
                "'{path}' is a group of encoding {other:?}, not a sparse matrix"
            )))
        }
    };
    let shape_attr = if g
        .attr_names()
        .map(|a| a.iter().any(|n| n == "shape"))
        .unwrap_or(false)
    {
        "shape"
    } else {
        "h5sparse_shape"
    };
    let shape: Vec<i64> = g
        .attr(shape_attr)
        .and_then(|a| safe_raw::<i64>(&a))
        .map_err(|e| ferr(&format!("sparse matrix '{path}' has no readable shape"), e))?;
    match shape.as_slice() {
        [a, b] if *a >= 0 && *b >= 0 => Ok((csr, [*a as usize, *b as usize])),
        _ => Err(ScError::Format(format!(
            "sparse matrix '{path}' has an invalid shape {shape:?}"
        ))),
    }
}

impl MatrixInfo {
    /// Read a sparse matrix's arrays into `x` (values, converted to f64), `i` (minor
    /// indices) and `p` (pointers), of lengths `nnz`, `nnz` and `major + 1`. Checks the
    /// structure and sorts indices within each major slice when the file has them unsorted.
    pub fn read_sparse_into(&self, x: &mut [f64], i: &mut [i32], p: &mut [i32]) -> ScResult<()> {
        let (Some(ind), Some(ptr)) = (&self.indices, &self.indptr) else {
            return Err(ScError::Format(format!("'{}' is not sparse", self.name)));
        };
        let (major, minor) = match self.kind {
            MatrixKind::Csr => (self.shape[0], self.shape[1]),
            _ => (self.shape[1], self.shape[0]),
        };
        if x.len() != self.nnz || i.len() != self.nnz || p.len() != major + 1 {
            return Err(ScError::Dims(
                "buffer lengths do not match the matrix".into(),
            ));
        }
        let ctx = |what: &str| {
            let name = self.name.clone();
            let what = what.to_string();
            move |e: hdf5::Error| ferr(&format!("cannot read '{name}/{what}'"), e)
        };
        direct::advise_huge(x);
        direct::advise_huge(i);
        // unfiltered little-endian arrays: parallel reads straight from the file
        if let Ok(file) = std::fs::File::open(&self.file_path) {
            if let Some(r) = self.read_sparse_direct(&file, ind, ptr, major, minor, x, i, p) {
                return r;
            }
        }
        if self.nnz > 0 {
            if matches!(
                descriptor(&self.data)?,
                TypeDescriptor::Float(hdf5::types::FloatSize::U4)
            ) {
                read_f32_widen(&self.data, x).map_err(ctx("data"))?;
            } else {
                self.data
                    .as_reader()
                    .read_into_raw(x)
                    .map_err(ctx("data"))?;
            }
            ind.as_reader().read_into_raw(i).map_err(ctx("indices"))?;
        }
        ptr.as_reader().read_into_raw(p).map_err(ctx("indptr"))?;
        check_compressed(&self.name, major, minor, self.nnz, p, i, x)
    }

    /// The direct path of [`MatrixInfo::read_sparse_into`] (`None`: an array is not
    /// stored for it; read through HDF5). `indptr` is read and checked first; then each
    /// task reads one range of the values (widened) and of the indices and checks the
    /// indices of that range while they are in cache (within every slice: strictly
    /// increasing, in `0..minor`). Only when a range fails (unsorted slices, or a corrupt
    /// file) does the whole structure go through [`check_compressed`], which sorts or
    /// reports the error.
    #[allow(clippy::too_many_arguments)]
    fn read_sparse_direct(
        &self,
        file: &std::fs::File,
        ind: &Dataset,
        ptr: &Dataset,
        major: usize,
        minor: usize,
        x: &mut [f64],
        i: &mut [i32],
        p: &mut [i32],
    ) -> Option<ScResult<()>> {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicBool, Ordering};
        let ub = self.userblock;
        let lx = direct::layout::<f64>(&self.data, file, ub, self.nnz)?;
        let li = direct::layout::<i32>(ind, file, ub, self.nnz)?;
        let rp = direct::read(ptr, file, ub, p)?;
        let run = || -> ScResult<()> {
            rp?;
            check_indptr(&self.name, major, self.nnz, p)?;
            let pr: &[i32] = p;
            let sorted = AtomicBool::new(true);
            x.par_chunks_mut(direct::TASK)
                .zip(i.par_chunks_mut(direct::TASK))
                .enumerate()
                .try_for_each_init(Vec::<u8>::new, |buf, (t, (xc, ic))| {
                    let first = t * direct::TASK;
                    lx.read_range(file, first, xc, buf)?;
                    li.read_range(file, first, ic, buf)?;
                    if !slices_sorted(pr, first, ic, minor) {
                        sorted.store(false, Ordering::Relaxed);
                    }
                    Ok::<(), ScError>(())
                })?;
            // pairs across task borders inside one slice
            let ok = sorted.load(Ordering::Relaxed)
                && (direct::TASK..self.nnz)
                    .step_by(direct::TASK)
                    .all(|a| pr.binary_search(&(a as i32)).is_ok() || i[a - 1] < i[a]);
            if ok {
                Ok(())
            } else {
                check_compressed(&self.name, major, minor, self.nnz, p, i, x)
            }
        };
        Some(run())
    }

    /// Read a dense matrix into `x` in the file's row-major order (= column-major
    /// `shape[1] x shape[0]`), converting to f64.
    pub fn read_dense_into(&self, x: &mut [f64]) -> ScResult<()> {
        if self.kind != MatrixKind::Dense {
            return Err(ScError::Format(format!("'{}' is not dense", self.name)));
        }
        if x.len() != self.nnz {
            return Err(ScError::Dims(
                "buffer length does not match the matrix".into(),
            ));
        }
        if self.nnz == 0 {
            return Ok(());
        }
        direct::advise_huge(x);
        if let Ok(file) = std::fs::File::open(&self.file_path) {
            if let Some(r) = direct::read(&self.data, &file, self.userblock, x) {
                return r;
            }
        }
        self.data
            .as_reader()
            .read_into_raw(x)
            .map_err(|e| ferr(&format!("cannot read '{}'", self.name), e))?;
        Ok(())
    }

    /// Owned copy of a sparse matrix.
    pub fn read_sparse(&self) -> ScResult<Sparse> {
        let major = match self.kind {
            MatrixKind::Csr => self.shape[0],
            MatrixKind::Csc => self.shape[1],
            MatrixKind::Dense => {
                return Err(ScError::Format(format!("'{}' is not sparse", self.name)))
            }
        };
        let mut x = vec![0.0; self.nnz];
        let mut i = vec![0i32; self.nnz];
        let mut p = vec![0i32; major + 1];
        self.read_sparse_into(&mut x, &mut i, &mut p)?;
        Ok(Sparse {
            csr: self.kind == MatrixKind::Csr,
            shape: self.shape,
            data: Values::F64(x),
            indices: i,
            indptr: p,
        })
    }
}

/// Read float32 values into an f64 buffer without a second buffer and without HDF5's
/// (slow) soft conversion: the raw f32 go into the upper half of `x`'s bytes, then are
/// widened front to back (writing `x[k]` only touches bytes of f32 values `<= k`,
/// which have already been consumed).
fn read_f32_widen(ds: &Dataset, x: &mut [f64]) -> hdf5::Result<()> {
    let n = x.len();
    let base = x.as_mut_ptr();
    // SAFETY: bytes [4n, 8n) of x, aligned to 4, are viewed as n f32 while nothing else
    // borrows x; the widening loop uses raw pointers only.
    unsafe {
        let upper = std::slice::from_raw_parts_mut(base.cast::<f32>().add(n), n);
        ds.as_reader().read_into_raw(upper)?;
        let src = base.cast::<f32>().add(n);
        for k in 0..n {
            let v = src.add(k).read();
            base.add(k).write(v as f64);
        }
    }
    Ok(())
}

/// Check that `indptr` runs from 0 to `nnz` without decreasing.
fn check_indptr(name: &str, major: usize, nnz: usize, p: &[i32]) -> ScResult<()> {
    let bad = |what: String| ScError::Format(format!("sparse matrix '{name}' is corrupt: {what}"));
    if p.len() != major + 1 || p[0] != 0 || p[major] as i64 != nnz as i64 {
        return Err(bad(format!(
            "indptr must run from 0 to {nnz}, got {} to {}",
            p.first().copied().unwrap_or(-1),
            p.last().copied().unwrap_or(-1)
        )));
    }
    for k in 0..major {
        let (a, b) = (p[k], p[k + 1]);
        if b < a || b as usize > nnz {
            return Err(bad(format!("indptr decreases or exceeds {nnz} at {k}")));
        }
    }
    Ok(())
}

/// Whether the indices `seg` (entries `first ..` of a compressed matrix with a checked
/// `indptr` `p`) are strictly increasing and in `0..minor` within each slice (the
/// pairs across `seg`'s own borders are the caller's). Branch-free over each slice, so
/// it runs at memory speed.
fn slices_sorted(p: &[i32], first: usize, seg: &[i32], minor: usize) -> bool {
    let end = first + seg.len();
    let major = p.len() - 1;
    let minor = minor as i64;
    // the slice holding `first` (p[0] = 0 <= first < nnz = p[major])
    let mut r = p
        .partition_point(|&v| (v as usize) <= first)
        .saturating_sub(1);
    let mut ok = true;
    while r < major && (p[r] as usize) < end {
        let lo = (p[r] as usize).max(first) - first;
        let hi = (p[r + 1] as usize).min(end) - first;
        if hi > lo {
            let s = &seg[lo..hi];
            ok &= s[0] >= 0 && (s[s.len() - 1] as i64) < minor;
            ok &= s.windows(2).fold(true, |acc, w| acc & (w[0] < w[1]));
        }
        r += 1;
    }
    ok
}

/// Validate compressed-sparse structure; sort indices inside slices where needed.
/// The pointers are checked first; the slices are then checked in parallel blocks (the
/// first failing block in order gives the error, so the message does not depend on
/// timing).
pub(crate) fn check_compressed(
    name: &str,
    major: usize,
    minor: usize,
    nnz: usize,
    p: &[i32],
    i: &mut [i32],
    x: &mut [f64],
) -> ScResult<()> {
    use rayon::prelude::*;
    let bad = |what: String| ScError::Format(format!("sparse matrix '{name}' is corrupt: {what}"));
    check_indptr(name, major, nnz, p)?;
    if i.len() != nnz || x.len() != nnz {
        return Err(bad("indices or values do not match indptr".into()));
    }
    // blocks of whole slices, about nnz / 64 entries each
    let target = (nnz / 64).max(1 << 16);
    let mut blocks: Vec<(usize, usize)> = Vec::new(); // slice ranges [k0, k1)
    let mut k0 = 0usize;
    for k in 0..major {
        if (p[k + 1] - p[k0]) as usize >= target {
            blocks.push((k0, k + 1));
            k0 = k + 1;
        }
    }
    if k0 < major || blocks.is_empty() {
        blocks.push((k0, major));
    }
    let mut parts: Vec<(usize, usize, &mut [i32], &mut [f64])> = Vec::with_capacity(blocks.len());
    let (mut ri, mut rx) = (i, x);
    for &(a, b) in &blocks {
        let len = (p[b] - p[a]) as usize;
        let (ci, ti) = std::mem::take(&mut ri).split_at_mut(len);
        let (cx, tx) = std::mem::take(&mut rx).split_at_mut(len);
        parts.push((a, b, ci, cx));
        ri = ti;
        rx = tx;
    }
    let results: Vec<ScResult<()>> = parts
        .into_par_iter()
        .map(|(k0, k1, i, x)| {
            let off = p[k0] as usize;
            for k in k0..k1 {
                let (a, b) = (p[k] as usize - off, p[k + 1] as usize - off);
                let mut sorted = true;
                for t in a..b {
                    let v = i[t];
                    if v < 0 || v as usize >= minor {
                        return Err(bad(format!("index {v} out of range 0..{minor}")));
                    }
                    if t > a && i[t - 1] >= v {
                        sorted = false;
                    }
                }
                if !sorted {
                    let mut pairs: Vec<(i32, f64)> = (a..b).map(|t| (i[t], x[t])).collect();
                    pairs.sort_by_key(|q| q.0);
                    if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
                        return Err(bad(format!("duplicate index in slice {k}")));
                    }
                    for (t, (ii, xx)) in (a..b).zip(pairs) {
                        i[t] = ii;
                        x[t] = xx;
                    }
                }
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect()
}

/// A string attribute (scalar or first element of an array), if present and readable.
pub(crate) fn attr_string(loc: &hdf5::Location, name: &str) -> Option<String> {
    let names = loc.attr_names().ok()?;
    if !names.iter().any(|n| n == name) {
        return None;
    }
    let a = loc.attr(name).ok()?;
    read_strings(&a).ok()?.into_iter().next().flatten()
}

fn has_attr(loc: &hdf5::Location, name: &str) -> bool {
    loc.attr_names()
        .map(|a| a.iter().any(|n| n == name))
        .unwrap_or(false)
}

/// A string-array attribute (`column-order`); an empty numeric array gives `[]`.
fn attr_strings(loc: &hdf5::Location, name: &str, ctx: &str) -> ScResult<Vec<String>> {
    if !has_attr(loc, name) {
        return Ok(vec![]);
    }
    let a = loc
        .attr(name)
        .map_err(|e| ferr(&format!("{ctx}: attribute '{name}'"), e))?;
    if a.size() == 0 {
        return Ok(vec![]);
    }
    Ok(read_strings(&a)
        .map_err(|e| ScError::Format(format!("{ctx}: attribute '{name}': {e}")))?
        .into_iter()
        .map(|s| s.unwrap_or_default())
        .collect())
}

fn is_string_type(td: &TypeDescriptor) -> bool {
    matches!(
        td,
        TypeDescriptor::VarLenUnicode
            | TypeDescriptor::VarLenAscii
            | TypeDescriptor::FixedAscii(_)
            | TypeDescriptor::FixedUnicode(_)
    )
}

/// `read_raw` after [`check_alloc`] (a corrupt extent is an error, not a huge allocation).
fn safe_raw<T: hdf5::H5Type>(c: &Container) -> hdf5::Result<Vec<T>> {
    check_alloc(c).map_err(|e| hdf5::Error::from(e.to_string()))?;
    c.read_raw::<T>()
}

/// Read a dataset or attribute as strings or values, whichever its type is (for the
/// metadata walk of [`super::isolate`]).
pub(crate) fn read_any(c: &Container) -> ScResult<()> {
    if is_string_type(&descriptor(c)?) {
        read_strings(c).map(|_| ())
    } else {
        read_values(c, "").map(|_| ())
    }
}

/// A corrupt extent must not become a huge allocation (an abort): the values of a
/// dataset or attribute (8 bytes each once read) need at least 1/1100 of that in file
/// bytes (gzip's best ratio is about 1032:1).
fn check_alloc(c: &Container) -> ScResult<()> {
    let file_len = std::fs::metadata(c.filename())
        .map(|m| m.len())
        .unwrap_or(0);
    if (c.size() as u128) * 8 > (file_len as u128 + 4096) * 1100 {
        return Err(ScError::Format(format!(
            "an element claims {} values, more than a {file_len}-byte file can hold: the \
             file is corrupt",
            c.size()
        )));
    }
    Ok(())
}

/// Read a dataset or attribute of strings (variable or fixed length).
fn read_strings(c: &Container) -> ScResult<Vec<Option<String>>> {
    check_alloc(c)?;
    let td = descriptor(c)?;
    let e = |e: hdf5::Error| ferr("cannot read strings", e);
    Ok(match td {
        TypeDescriptor::VarLenUnicode => {
            check_vlen_heap(c)?;
            c.read_raw::<VarLenUnicode>()
                .map_err(e)?
                .into_iter()
                .map(|s| Some(s.as_str().to_string()))
                .collect()
        }
        TypeDescriptor::VarLenAscii => {
            check_vlen_heap(c)?;
            c.read_raw::<VarLenAscii>()
                .map_err(e)?
                .into_iter()
                .map(|s| Some(s.as_str().to_string()))
                .collect()
        }
        TypeDescriptor::FixedAscii(n) | TypeDescriptor::FixedUnicode(n) => {
            let count = c.space().map_err(e)?.size();
            let bytes = read_native_bytes(c, count * n)?;
            bytes
                .chunks(n.max(1))
                .take(count)
                .map(|b| {
                    let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
                    Some(String::from_utf8_lossy(&b[..end]).trim_end().to_string())
                })
                .collect()
        }
        other => {
            return Err(ScError::Format(format!(
                "expected strings, found HDF5 type {other}"
            )))
        }
    })
}

/// Read a container with its own (file) data type into bytes: for fixed-length strings.
fn read_native_bytes(c: &Container, nbytes: usize) -> ScResult<Vec<u8>> {
    let mut buf = vec![0u8; nbytes];
    let dtype = c.dtype().map_err(|e| ferr("cannot read type", e))?;
    let tid = dtype.id();
    let id = c.id();
    let is_attr = c.id_type() == hdf5_sys::h5i::H5I_type_t::H5I_ATTR;
    let rc = hdf5::sync::sync(|| unsafe {
        if is_attr {
            hdf5_sys::h5a::H5Aread(id, tid, buf.as_mut_ptr().cast::<c_void>())
        } else {
            H5Dread(
                id,
                tid,
                H5S_ALL,
                H5S_ALL,
                H5P_DEFAULT,
                buf.as_mut_ptr().cast::<c_void>(),
            )
        }
    });
    if rc < 0 {
        return Err(ScError::Format("cannot read fixed-length strings".into()));
    }
    Ok(buf)
}

/// Read a numeric / boolean / string dataset into [`Values`].
fn read_values(c: &Container, path: &str) -> ScResult<Values> {
    check_alloc(c)?;
    let td = descriptor(c)?;
    let e = |e: hdf5::Error| ferr(&format!("cannot read '{path}'"), e);
    Ok(match td {
        TypeDescriptor::Float(_) => Values::F64(c.read_raw::<f64>().map_err(e)?),
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) => {
            let v: Vec<i64> = c.read_raw::<i64>().map_err(e)?;
            ints_to_values(v)
        }
        TypeDescriptor::Boolean => Values::Bool(c.read_raw::<bool>().map_err(e)?),
        ref t if is_string_type(t) => {
            Values::Str(read_strings(c).map_err(|er| ScError::Format(format!("'{path}': {er}")))?)
        }
        other => {
            return Err(ScError::Format(format!(
                "'{path}' has unsupported HDF5 type {other}"
            )))
        }
    })
}

fn ints_to_values(v: Vec<i64>) -> Values {
    if v.iter()
        .all(|&x| x > i32::MIN as i64 && x <= i32::MAX as i64)
    {
        Values::Int(v.into_iter().map(|x| x as i32).collect())
    } else {
        Values::F64(v.into_iter().map(|x| x as f64).collect())
    }
}

fn read_elem(
    parent: &Group,
    name: &str,
    path: &str,
    skipped: &std::cell::RefCell<Vec<String>>,
) -> ScResult<Elem> {
    let ctx = |e: hdf5::Error| ferr(&format!("cannot read '{path}'"), e);
    match parent.loc_type_by_name(name).map_err(ctx)? {
        LocationType::Group => {
            let g = parent.group(name).map_err(ctx)?;
            let enc = attr_string(&g, "encoding-type");
            if enc.is_none() && has_attr(&g, "h5sparse_format") {
                return read_sparse_group(&g, path).map(Elem::Sparse);
            }
            match enc.as_deref() {
                Some("csr_matrix") | Some("csc_matrix") => {
                    read_sparse_group(&g, path).map(Elem::Sparse)
                }
                Some("dataframe") => read_frame(&g, path, skipped).map(Elem::Frame),
                None if has_attr(&g, "_index") => read_frame(&g, path, skipped).map(Elem::Frame),
                Some("categorical") => read_categorical(&g, path),
                Some("nullable-integer")
                | Some("nullable-boolean")
                | Some("nullable-string-array") => {
                    let values = {
                        let d = g.dataset("values").map_err(ctx)?;
                        read_values(&d, path)?
                    };
                    let mask = match g.dataset("mask") {
                        Ok(m) => safe_raw::<bool>(&m).map_err(ctx)?,
                        Err(_) => vec![false; values.len()],
                    };
                    if mask.len() != values.len() {
                        return Err(ScError::Format(format!(
                            "'{path}': mask and values differ in length"
                        )));
                    }
                    Ok(Elem::Nullable { values, mask })
                }
                None | Some("dict") | Some("anndata") | Some("raw") => {
                    let mut out = vec![];
                    for m in g.member_names().map_err(ctx)? {
                        if m == "__categories" {
                            continue;
                        }
                        let sub = format!("{path}/{m}");
                        match read_elem(&g, &m, &sub, skipped) {
                            Ok(el) => out.push((m, el)),
                            Err(ScError::Input(why)) => skipped.borrow_mut().push(why),
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(Elem::Dict(out))
                }
                // unsupported encodings are skipped inside dicts (reported), an error elsewhere
                Some(other) => Err(ScError::Input(format!(
                    "'{path}' (encoding '{other}') is not supported and was skipped"
                ))),
            }
        }
        LocationType::Dataset => {
            let ds = parent.dataset(name).map_err(ctx)?;
            let td = descriptor(&ds)?;
            if let TypeDescriptor::Compound(_) = td {
                return read_record(&ds, path).map(Elem::Record);
            }
            if let TypeDescriptor::Reference(_) = td {
                return Err(ScError::Input(format!(
                    "'{path}' holds HDF5 object references (not supported) and was skipped"
                )));
            }
            let values = read_values(&ds, path)?;
            Ok(Elem::Array {
                shape: ds.shape(),
                values,
            })
        }
        other => Err(ScError::Input(format!(
            "'{path}' is a {other:?} (not supported) and was skipped"
        ))),
    }
}

fn read_sparse_group(g: &Group, path: &str) -> ScResult<Sparse> {
    let (csr, shape) = sparse_header(g, path)?;
    let ctx = |e: hdf5::Error| ferr(&format!("cannot read sparse matrix '{path}'"), e);
    let data = {
        let d = g.dataset("data").map_err(ctx)?;
        read_values(&d, path)?
    };
    let mut x: Vec<f64> = match &data {
        Values::F64(v) => v.clone(),
        Values::Int(v) => v.iter().map(|&a| a as f64).collect(),
        Values::Bool(v) => v.iter().map(|&a| a as u8 as f64).collect(),
        Values::Str(_) => return Err(ScError::Format(format!("'{path}' has string values"))),
    };
    let read_i32 = |n: &str| -> ScResult<Vec<i32>> {
        let v: Vec<i64> = g
            .dataset(n)
            .and_then(|d| safe_raw::<i64>(&d))
            .map_err(ctx)?;
        v.into_iter()
            .map(|a| {
                i32::try_from(a)
                    .map_err(|_| ScError::Format(format!("'{path}/{n}' has an entry beyond 2^31")))
            })
            .collect()
    };
    let mut indices = read_i32("indices")?;
    let indptr = read_i32("indptr")?;
    let (major, minor) = if csr {
        (shape[0], shape[1])
    } else {
        (shape[1], shape[0])
    };
    if indices.len() != x.len() {
        return Err(ScError::Format(format!(
            "'{path}': indices and data differ in length"
        )));
    }
    check_compressed(path, major, minor, x.len(), &indptr, &mut indices, &mut x)?;
    let data = match data {
        Values::Int(_) => Values::Int(x.iter().map(|&a| a as i32).collect()),
        _ => Values::F64(x),
    };
    Ok(Sparse {
        csr,
        shape,
        data,
        indices,
        indptr,
    })
}

fn read_categorical(g: &Group, path: &str) -> ScResult<Elem> {
    let ctx = |e: hdf5::Error| ferr(&format!("cannot read categorical '{path}'"), e);
    let codes_v: Vec<i64> = g
        .dataset("codes")
        .and_then(|d| safe_raw::<i64>(&d))
        .map_err(ctx)?;
    let categories = {
        let d = g.dataset("categories").map_err(ctx)?;
        read_values(&d, path)?
    };
    let ordered = if has_attr(g, "ordered") {
        g.attr("ordered")
            .and_then(|a| safe_raw::<bool>(&a))
            .map(|v| v.first().copied().unwrap_or(false))
            .or_else(|_| {
                g.attr("ordered")
                    .and_then(|a| safe_raw::<i8>(&a))
                    .map(|v| v.first().copied().unwrap_or(0) != 0)
            })
            .map_err(ctx)?
    } else {
        false
    };
    categorical(codes_v, categories, ordered, path)
}

fn categorical(codes: Vec<i64>, categories: Values, ordered: bool, path: &str) -> ScResult<Elem> {
    let n = categories.len() as i64;
    let codes = codes
        .into_iter()
        .map(|c| {
            if c < -1 || c >= n {
                Err(ScError::Format(format!(
                    "categorical '{path}' has code {c} outside -1..{}",
                    n - 1
                )))
            } else {
                Ok(c as i32)
            }
        })
        .collect::<ScResult<Vec<i32>>>()?;
    Ok(Elem::Categorical {
        codes,
        categories,
        ordered,
    })
}

fn read_frame(g: &Group, path: &str, skipped: &std::cell::RefCell<Vec<String>>) -> ScResult<Frame> {
    let index_name = attr_string(g, "_index").unwrap_or_else(|| "_index".to_string());
    let ctx = format!("data frame '{path}'");
    if !g.link_exists(&index_name) {
        return Err(ScError::Format(format!(
            "{ctx} has no index dataset '{index_name}'"
        )));
    }
    let idx_ds = g
        .dataset(&index_name)
        .map_err(|e| ferr(&format!("{ctx}: index"), e))?;
    let index: Vec<String> = read_values(&idx_ds, path)?
        .to_strings()
        .into_iter()
        .map(|s| s.unwrap_or_default())
        .collect();
    let order = attr_strings(g, "column-order", &ctx)?;
    let mut columns = Vec::with_capacity(order.len());
    for col in order {
        let sub = format!("{path}/{col}");
        if !g.link_exists(&col) {
            return Err(ScError::Format(format!(
                "{ctx}: column '{col}' is listed but missing"
            )));
        }
        // anndata 0.7: categorical codes with a `categories` reference into __categories/
        let legacy_cat = g
            .dataset(&col)
            .ok()
            .filter(|d| has_attr(d, "categories"))
            .filter(|_| g.link_exists("__categories"));
        let el = if let Some(d) = legacy_cat {
            let cats = g
                .group("__categories")
                .and_then(|c| c.dataset(&col))
                .map_err(|e| ferr(&format!("{ctx}: categories of '{col}'"), e))?;
            let categories = read_values(&cats, &sub)?;
            check_alloc(&d)?;
            let codes: Vec<i64> = d.read_raw::<i64>().map_err(|e| ferr(&sub, e))?;
            let ordered = if has_attr(&d, "ordered") {
                d.attr("ordered")
                    .and_then(|a| safe_raw::<bool>(&a))
                    .map(|v| v.first().copied().unwrap_or(false))
                    .unwrap_or(false)
            } else {
                false
            };
            categorical(codes, categories, ordered, &sub)?
        } else {
            match read_elem(g, &col, &sub, skipped) {
                Ok(el) => el,
                Err(ScError::Input(why)) => {
                    skipped.borrow_mut().push(why);
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        let len = elem_len(&el);
        if len != Some(index.len()) {
            return Err(ScError::Format(format!(
                "{ctx}: column '{col}' has {} values for {} rows",
                len.map(|l| l.to_string())
                    .unwrap_or_else(|| "a non-column element with".into()),
                index.len()
            )));
        }
        columns.push((col, el));
    }
    Ok(Frame {
        index_name,
        index,
        columns,
    })
}

fn elem_len(el: &Elem) -> Option<usize> {
    match el {
        Elem::Array { shape, values } if shape.len() == 1 => Some(values.len()),
        Elem::Categorical { codes, .. } => Some(codes.len()),
        Elem::Nullable { values, .. } => Some(values.len()),
        _ => None,
    }
}

/// Read a compound (record) dataset: one column per field.
fn read_record(ds: &Dataset, path: &str) -> ScResult<Vec<(String, Values)>> {
    let n = ds.size();
    let id = ds.id();
    let bad = |what: &str| ScError::Format(format!("record array '{path}': {what}"));
    let space = ds.space().map_err(|e| ferr(path, e))?;
    hdf5::sync::sync(|| unsafe {
        let ftype = hdf5_sys::h5d::H5Dget_type(id);
        if ftype < 0 {
            return Err(bad("no type"));
        }
        let mtype = H5Tget_native_type(ftype, H5T_direction_t::H5T_DIR_DEFAULT);
        H5Tclose(ftype);
        if mtype < 0 {
            return Err(bad("no native type"));
        }
        let size = H5Tget_size(mtype);
        let nm = H5Tget_nmembers(mtype);
        if size == 0 || nm < 0 {
            H5Tclose(mtype);
            return Err(bad("invalid compound type"));
        }
        let mut buf = vec![0u8; size * n];
        let rc = H5Dread(
            id,
            mtype,
            H5S_ALL,
            H5S_ALL,
            H5P_DEFAULT,
            buf.as_mut_ptr().cast(),
        );
        if rc < 0 {
            H5Tclose(mtype);
            return Err(bad("cannot read"));
        }
        let mut has_vlen = false;
        let mut out = Vec::with_capacity(nm as usize);
        let mut failure = None;
        for m in 0..nm as u32 {
            let cname = H5Tget_member_name(mtype, m);
            let fname = if cname.is_null() {
                format!("f{m}")
            } else {
                let s = CStr::from_ptr(cname).to_string_lossy().into_owned();
                hdf5_sys::h5::H5free_memory(cname.cast());
                s
            };
            let off = H5Tget_member_offset(mtype, m);
            let mt = H5Tget_member_type(mtype, m);
            let msize = H5Tget_size(mt);
            let class = H5Tget_class(mt);
            let at = |k: usize| &buf[k * size + off..k * size + off + msize];
            let vals = match class {
                H5T_class_t::H5T_FLOAT => match msize {
                    4 => Some(Values::F64(
                        (0..n)
                            .map(|k| f32::from_ne_bytes(at(k).try_into().unwrap()) as f64)
                            .collect(),
                    )),
                    8 => Some(Values::F64(
                        (0..n)
                            .map(|k| f64::from_ne_bytes(at(k).try_into().unwrap()))
                            .collect(),
                    )),
                    _ => None,
                },
                H5T_class_t::H5T_INTEGER | H5T_class_t::H5T_ENUM => {
                    let signed =
                        class == H5T_class_t::H5T_ENUM || H5Tget_sign(mt) == H5T_sign_t::H5T_SGN_2;
                    let v: Option<Vec<i64>> = (0..n)
                        .map(|k| {
                            let b = at(k);
                            Some(match (msize, signed) {
                                (1, true) => b[0] as i8 as i64,
                                (1, false) => b[0] as i64,
                                (2, true) => i16::from_ne_bytes(b.try_into().ok()?) as i64,
                                (2, false) => u16::from_ne_bytes(b.try_into().ok()?) as i64,
                                (4, true) => i32::from_ne_bytes(b.try_into().ok()?) as i64,
                                (4, false) => u32::from_ne_bytes(b.try_into().ok()?) as i64,
                                (8, _) => i64::from_ne_bytes(b.try_into().ok()?),
                                _ => return None,
                            })
                        })
                        .collect();
                    v.map(|v| {
                        if class == H5T_class_t::H5T_ENUM {
                            Values::Bool(v.into_iter().map(|x| x != 0).collect())
                        } else {
                            ints_to_values(v)
                        }
                    })
                }
                H5T_class_t::H5T_STRING => {
                    if H5Tis_variable_str(mt) > 0 {
                        has_vlen = true;
                        Some(Values::Str(
                            (0..n)
                                .map(|k| {
                                    let p = usize::from_ne_bytes(at(k).try_into().unwrap())
                                        as *const c_char;
                                    if p.is_null() {
                                        None
                                    } else {
                                        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
                                    }
                                })
                                .collect(),
                        ))
                    } else {
                        Some(Values::Str(
                            (0..n)
                                .map(|k| {
                                    let b = at(k);
                                    let end = b.iter().position(|&x| x == 0).unwrap_or(b.len());
                                    Some(String::from_utf8_lossy(&b[..end]).into_owned())
                                })
                                .collect(),
                        ))
                    }
                }
                _ => None,
            };
            H5Tclose(mt);
            match vals {
                Some(v) => out.push((fname, v)),
                None => {
                    failure = Some(format!("field '{fname}' has an unsupported type"));
                    break;
                }
            }
        }
        // frees the variable-length strings (a no-op for other members)
        let _ = has_vlen;
        H5Dvlen_reclaim(mtype, space.id(), H5P_DEFAULT, buf.as_mut_ptr().cast());
        H5Tclose(mtype);
        match failure {
            Some(f) => Err(bad(&f)),
            None => Ok(out),
        }
    })
}

/// libhdf5 1.10 trusts the global-heap IDs of variable-length strings: a corrupt ID makes
/// `H5HG_read` read out of bounds (a crash, not an error). For contiguous datasets, check
/// every ID against the heap collections in the file before HDF5 follows them.
fn check_vlen_heap(c: &Container) -> ScResult<()> {
    use std::collections::HashMap;
    use std::io::{Read, Seek, SeekFrom};
    if c.id_type() != hdf5_sys::h5i::H5I_type_t::H5I_DATASET {
        return Ok(());
    }
    let id = c.id();
    let offset = hdf5::sync::sync(|| unsafe { hdf5_sys::h5d::H5Dget_offset(id) });
    if offset == hdf5_sys::h5::HADDR_UNDEF {
        return Ok(()); // chunked or not allocated: HDF5 reads chunks itself
    }
    let n = c.size();
    let bad = |what: String| ScError::Format(format!("corrupt string data: {what}"));
    let mut f = std::fs::File::open(c.filename()).map_err(|e| bad(e.to_string()))?;
    let flen = f.metadata().map(|m| m.len()).unwrap_or(0);
    // superblock must be at 0 (no user block) for addresses to be file offsets
    let mut sig = [0u8; 8];
    if f.read_exact(&mut sig).is_err() || &sig != b"\x89HDF\r\n\x1a\n" {
        return Ok(());
    }
    let need = (n as u64)
        .checked_mul(16)
        .ok_or_else(|| bad("size overflow".into()))?;
    if offset.checked_add(need).is_none_or(|e| e > flen) {
        return Err(bad("the file is truncated".into()));
    }
    let mut raw = vec![0u8; need as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut raw))
        .map_err(|e| bad(e.to_string()))?;
    // (consecutive strings mostly share a collection: the last one is looked at first)
    let mut heaps: HashMap<u64, Vec<Option<u64>>> = HashMap::new();
    let mut last: Option<(u64, Vec<Option<u64>>)> = None;
    for d in raw.chunks_exact(16) {
        let len = u32::from_le_bytes(d[0..4].try_into().unwrap()) as u64;
        let addr = u64::from_le_bytes(d[4..12].try_into().unwrap());
        let idx = u32::from_le_bytes(d[12..16].try_into().unwrap());
        if addr == 0 && len == 0 {
            continue;
        }
        if last.as_ref().is_none_or(|l| l.0 != addr) {
            if let Some((a, objs)) = last.take() {
                heaps.insert(a, objs);
            }
            let objs = match heaps.remove(&addr) {
                Some(objs) => objs,
                None => read_heap_collection(&mut f, addr, flen).map_err(bad)?,
            };
            last = Some((addr, objs));
        }
        let objs = last.as_ref().map_or(&[][..], |l| &l.1[..]);
        match objs.get(idx as usize).copied().flatten() {
            Some(size) if size >= len => {}
            _ => {
                return Err(bad(format!(
                    "heap object {idx} at {addr} is missing or too small"
                )))
            }
        }
    }
    Ok(())
}

/// Object index -> size of a global heap collection ("GCOL") at `addr` (`None`: no
/// object of that index).
fn read_heap_collection(
    f: &mut std::fs::File,
    addr: u64,
    flen: u64,
) -> Result<Vec<Option<u64>>, String> {
    use std::io::{Read, Seek, SeekFrom};
    if addr.checked_add(16).is_none_or(|e| e > flen) {
        return Err(format!("heap address {addr} beyond the end of the file"));
    }
    let mut hdr = [0u8; 16];
    f.seek(SeekFrom::Start(addr))
        .and_then(|_| f.read_exact(&mut hdr))
        .map_err(|e| e.to_string())?;
    if &hdr[0..4] != b"GCOL" || hdr[4] != 1 {
        return Err(format!("no heap collection at {addr}"));
    }
    let size = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    if !(16..=(1 << 32)).contains(&size) || addr.checked_add(size).is_none_or(|e| e > flen) {
        return Err(format!("heap collection at {addr} has an invalid size"));
    }
    let mut body = vec![0u8; (size - 16) as usize];
    f.read_exact(&mut body).map_err(|e| e.to_string())?;
    let mut out: Vec<Option<u64>> = Vec::new();
    let mut p = 0usize;
    while p + 16 <= body.len() {
        let idx = u16::from_le_bytes(body[p..p + 2].try_into().unwrap());
        let osize = u64::from_le_bytes(body[p + 8..p + 16].try_into().unwrap());
        if idx == 0 {
            break; // free space: the rest of the collection
        }
        let padded = osize.div_ceil(8).saturating_mul(8);
        let end = (p as u64 + 16).saturating_add(padded);
        if end > body.len() as u64 {
            return Err(format!("heap object {idx} overruns its collection"));
        }
        let k = idx as usize;
        if out.len() <= k {
            out.resize(k + 1, None);
        }
        out[k] = Some(osize);
        p = end as usize;
    }
    Ok(out)
}
