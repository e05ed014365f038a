//! h5ad glue: matrices are read by HDF5 straight into freshly allocated R vectors (one
//! allocation each for x / i / p, no copy afterwards) and written from borrowed slots;
//! everything else goes through scannot-core's element tree.

use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::h5ad::{Elem, Frame, H5ad, H5adWriter, MatrixKind, Sparse, Values};
use scannot_core::{ScError, ScResult};

use crate::convert::guard;
use extendr_ffi::SEXPTYPE;

/// Large matrix vectors outside R's vector heap.
///
/// R starts a garbage collection before every large allocation that does not fit its
/// current vector heap, and a big allocation escalates it to a full collection (about
/// 0.15 s with Matrix loaded); reading a 54 M-entry matrix allocated two such vectors,
/// and those collections cost more than the whole read does in Python. So `x` and `i`
/// of a large matrix live in memory mapped here (filled once by the read) and reach R as ALTREP vectors whose data pointer is that memory:
/// every R and C function sees an ordinary double / integer vector (`REAL()` /
/// `INTEGER()` return the mapping; writes go to it; `saveRDS` / `duplicate` write or
/// copy the values as a standard vector). The mapping is released by the finalizer of
/// the vector's external pointer when R collects it (kept a few seconds for the next
/// large read, see `scannot_core::h5ad::mem`: a fresh mapping costs a zero fill of every
/// page).
///
/// R does not see this memory, so it cannot count it towards its collection triggers:
/// while such vectors not yet collected take more than a quarter of the machine's
/// memory, new matrices use R's own allocation again (with its collections).
mod ext_vec {
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    use extendr_api::prelude::*;
    use extendr_ffi::SEXPTYPE;
    use extendr_ffi::{
        R_ClearExternalPtr, R_ExternalPtrAddr, R_MakeExternalPtr, R_NilValue,
        R_RegisterCFinalizerEx, R_altrep_class_t, R_altrep_data1, R_make_altinteger_class,
        R_make_altreal_class, R_new_altrep, R_set_altrep_Length_method,
        R_set_altvec_Dataptr_method, R_set_altvec_Dataptr_or_null_method, R_xlen_t, Rboolean,
        Rf_protect, Rf_unprotect, SEXP,
    };
    use scannot_core::h5ad::mem;

    /// Vectors smaller than this use R's allocation (the environment variable
    /// `SCANNOT_H5AD_MAPPED_MIN_BYTES` overrides it, for tests).
    fn min_bytes() -> usize {
        std::env::var("SCANNOT_H5AD_MAPPED_MIN_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(32 << 20)
    }

    /// Bytes of mapped vectors not yet released.
    pub(super) fn live_bytes() -> usize {
        LIVE.load(Ordering::Relaxed)
    }

    /// Bytes mapped and not yet released by a finalizer.
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    struct Buf {
        ptr: *mut c_void,
        bytes: usize,
        len: usize,
    }

    /// # Safety
    /// `x` is a vector of one of this module's classes (data1 = external pointer to a
    /// live `Buf`, or cleared after finalization, which R never does while `x` lives).
    unsafe fn buf<'a>(x: SEXP) -> Option<&'a Buf> {
        (R_ExternalPtrAddr(R_altrep_data1(x)) as *const Buf).as_ref()
    }

    extern "C" fn length(x: SEXP) -> R_xlen_t {
        // SAFETY: called by R for vectors of this class only.
        unsafe { buf(x).map_or(0, |b| b.len as R_xlen_t) }
    }

    extern "C" fn dataptr(x: SEXP, _writeable: Rboolean) -> *mut c_void {
        // SAFETY: as in `length`.
        unsafe { buf(x).map_or(std::ptr::null_mut(), |b| b.ptr) }
    }

    extern "C" fn dataptr_or_null(x: SEXP) -> *const c_void {
        dataptr(x, Rboolean::TRUE) as *const c_void
    }

    extern "C" fn finalize(e: SEXP) {
        // SAFETY: `e` is the external pointer made in `alloc`; its address is a boxed Buf
        // owned by it, released once (the pointer is cleared).
        unsafe {
            let p = R_ExternalPtrAddr(e) as *mut Buf;
            if !p.is_null() {
                let b = Box::from_raw(p);
                mem::unmap(b.ptr, b.bytes);
                LIVE.fetch_sub(b.bytes, Ordering::Relaxed);
                R_ClearExternalPtr(e);
            }
        }
    }

    /// Class pointers (as addresses: SEXP is not Sync), made once on R's thread.
    static CLASSES: OnceLock<(usize, usize)> = OnceLock::new();

    fn classes() -> (SEXP, SEXP) {
        let (r, i) = *CLASSES.get_or_init(|| {
            // SAFETY: R API calls on R's main thread (extendr functions run there);
            // the classes live in R's ALTREP registry for the whole session.
            unsafe {
                let mk = |c: R_altrep_class_t| {
                    R_set_altrep_Length_method(c, Some(length));
                    R_set_altvec_Dataptr_method(c, Some(dataptr));
                    R_set_altvec_Dataptr_or_null_method(c, Some(dataptr_or_null));
                    c.ptr as usize
                };
                let r = mk(R_make_altreal_class(
                    c"scannot_h5ad_real".as_ptr(),
                    c"scannot".as_ptr(),
                    std::ptr::null_mut(),
                ));
                let i = mk(R_make_altinteger_class(
                    c"scannot_h5ad_int".as_ptr(),
                    c"scannot".as_ptr(),
                    std::ptr::null_mut(),
                ));
                (r, i)
            }
        });
        (r as SEXP, i as SEXP)
    }

    /// Start faulting in, on a background thread, the mappings that [`alloc`] will take
    /// for a matrix of `nnz` stored values (`sparse`: also its indices), where it would
    /// map them (see `scannot_core::h5ad::mem::prefault`).
    pub(super) fn prefault(nnz: usize, sparse: bool) {
        let mut live = LIVE.load(Ordering::Relaxed);
        for (on, esize) in [(true, 8usize), (sparse, 4)] {
            let bytes = nnz.saturating_mul(esize);
            if !on || bytes < min_bytes() || live + bytes > mem::mem_total() / 4 {
                continue;
            }
            live += bytes;
            mem::prefault(bytes);
        }
    }

    /// A double (`real = true`) or integer vector of length `len`, uninitialized (the
    /// caller fills all of it): mapped memory for large ones, else R's allocation.
    pub(super) fn alloc(real: bool, len: usize) -> Robj {
        let esize = if real { 8 } else { 4 };
        let bytes = len.saturating_mul(esize);
        let plain = || {
            Robj::alloc_vector(
                if real {
                    SEXPTYPE::REALSXP
                } else {
                    SEXPTYPE::INTSXP
                },
                len,
            )
        };
        if bytes == 0
            || bytes < min_bytes()
            || LIVE.load(Ordering::Relaxed) + bytes > mem::mem_total() / 4
        {
            return plain();
        }
        let Some((ptr, bytes)) = mem::map(bytes) else {
            return plain();
        };
        LIVE.fetch_add(bytes, Ordering::Relaxed);
        let (rc, ic) = classes();
        let b = Box::into_raw(Box::new(Buf { ptr, bytes, len }));
        // SAFETY: R API calls on R's thread; the external pointer owns the Buf (its
        // finalizer unmaps it, also at exit); the ALTREP object keeps the pointer alive.
        unsafe {
            let e = Rf_protect(R_MakeExternalPtr(b.cast(), R_NilValue, R_NilValue));
            R_RegisterCFinalizerEx(e, Some(finalize), Rboolean::TRUE);
            let class = R_altrep_class_t {
                ptr: if real { rc } else { ic },
            };
            let v = Rf_protect(R_new_altrep(class, e, R_NilValue));
            let out = Robj::from_sexp(v);
            Rf_unprotect(2);
            out
        }
    }
}

fn r_values(v: &Values) -> Robj {
    match v {
        Values::F64(x) => Doubles::from_values(x.iter().copied()).into(),
        Values::Int(x) => Integers::from_values(x.iter().map(|&a| Rint::from(a))).into(),
        Values::Bool(x) => Logicals::from_values(x.iter().map(|&a| Rbool::from(a))).into(),
        Values::Str(x) => Strings::from_values(x.iter().map(|s| match s {
            Some(s) => Rstr::from(s.as_str()),
            None => Rstr::na(),
        }))
        .into(),
    }
}

fn set(mut r: Robj, name: &str, value: impl Into<Robj>) -> ScResult<Robj> {
    r.set_attrib(name, value.into())
        .map_err(|e| ScError::Format(format!("cannot set attribute {name}: {e}")))?;
    Ok(r)
}

fn named_list(items: Vec<(String, Robj)>) -> ScResult<Robj> {
    let (names, values): (Vec<String>, Vec<Robj>) = items.into_iter().unzip();
    List::from_names_and_values(names, values)
        .map(|l| l.into())
        .map_err(|e| ScError::Format(e.to_string()))
}

/// Mask -> NA, in the R type of the values.
fn masked(values: &Values, mask: &[bool]) -> Robj {
    match values {
        Values::F64(x) => Doubles::from_values(x.iter().zip(mask).map(|(&a, &m)| {
            if m {
                Rfloat::na()
            } else {
                Rfloat::from(a)
            }
        }))
        .into(),
        Values::Int(x) => Integers::from_values(x.iter().zip(mask).map(|(&a, &m)| {
            if m {
                Rint::na()
            } else {
                Rint::from(a)
            }
        }))
        .into(),
        Values::Bool(x) => Logicals::from_values(x.iter().zip(mask).map(|(&a, &m)| {
            if m {
                Rbool::na()
            } else {
                Rbool::from(a)
            }
        }))
        .into(),
        Values::Str(x) => Strings::from_values(x.iter().zip(mask).map(|(s, &m)| match (s, m) {
            (Some(s), false) => Rstr::from(s.as_str()),
            _ => Rstr::na(),
        }))
        .into(),
    }
}

fn frame_robj(f: &Frame) -> ScResult<Robj> {
    let cols = f
        .columns
        .iter()
        .map(|(n, e)| Ok((n.clone(), elem_robj(e)?)))
        .collect::<ScResult<Vec<_>>>()?;
    let l = list!(
        index = Strings::from_values(f.index.iter().map(|s| s.as_str())),
        index_name = f.index_name.as_str(),
        columns = named_list(cols)?
    );
    set(l.into(), "class", "scannot_h5ad_frame")
}

fn sparse_robj(s: &Sparse) -> ScResult<Robj> {
    let x: Vec<f64> = match &s.data {
        Values::F64(v) => v.clone(),
        Values::Int(v) => v.iter().map(|&a| a as f64).collect(),
        Values::Bool(v) => v.iter().map(|&a| a as u8 as f64).collect(),
        Values::Str(_) => return Err(ScError::Format("sparse matrix of strings".into())),
    };
    let l = list!(
        x = x,
        i = s.indices.clone(),
        p = s.indptr.clone(),
        shape = vec![s.shape[0] as i32, s.shape[1] as i32],
        csr = s.csr
    );
    set(l.into(), "class", "scannot_h5ad_sparse")
}

/// Elements as R objects: vectors, matrices (row-major data transposed to R's order),
/// factors, NA for masked values; frames / records / sparse as classed lists that
/// `R/h5ad.R` finishes.
fn elem_robj(e: &Elem) -> ScResult<Robj> {
    Ok(match e {
        Elem::Array { shape, values } => match shape.len() {
            0 | 1 => r_values(values),
            2 => {
                let (r, c) = (shape[0], shape[1]);
                let t = |k: usize| (k % r) * c + k / r; // R position k -> row-major index
                let out: Robj = match values {
                    Values::F64(x) => Doubles::from_values((0..r * c).map(|k| x[t(k)])).into(),
                    Values::Int(x) => {
                        Integers::from_values((0..r * c).map(|k| Rint::from(x[t(k)]))).into()
                    }
                    Values::Bool(x) => {
                        Logicals::from_values((0..r * c).map(|k| Rbool::from(x[t(k)]))).into()
                    }
                    Values::Str(x) => Strings::from_values((0..r * c).map(|k| match &x[t(k)] {
                        Some(s) => Rstr::from(s.as_str()),
                        None => Rstr::na(),
                    }))
                    .into(),
                };
                set(out, "dim", vec![r as i32, c as i32])?
            }
            _ => {
                let dims: Vec<i32> = shape.iter().rev().map(|&d| d as i32).collect();
                let out = set(r_values(values), "dim", dims)?;
                set(out, "h5ad_rowmajor", true)?
            }
        },
        Elem::Sparse(s) => sparse_robj(s)?,
        Elem::Categorical {
            codes,
            categories,
            ordered,
        } => {
            let codes = Integers::from_values(codes.iter().map(|&c| {
                if c < 0 {
                    Rint::na()
                } else {
                    Rint::from(c + 1)
                }
            }));
            let levels = categories.to_strings();
            let mut seen = std::collections::HashSet::new();
            if levels
                .iter()
                .any(|l| l.is_none() || !seen.insert(l.clone()))
            {
                return Err(ScError::Format(
                    "categorical with missing or duplicated categories".into(),
                ));
            }
            let out = set(codes.into(), "levels", r_values(&Values::Str(levels)))?;
            if *ordered {
                set(out, "class", ["ordered", "factor"])?
            } else {
                set(out, "class", "factor")?
            }
        }
        Elem::Nullable { values, mask } => masked(values, mask),
        Elem::Frame(f) => frame_robj(f)?,
        Elem::Dict(items) => named_list(
            items
                .iter()
                .map(|(k, v)| Ok((k.clone(), elem_robj(v)?)))
                .collect::<ScResult<Vec<_>>>()?,
        )?,
        Elem::Record(fields) => {
            let l = named_list(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), r_values(v)))
                    .collect(),
            )?;
            set(l, "class", "scannot_h5ad_record")?
        }
    })
}

fn open(path: &str) -> ScResult<H5ad> {
    H5ad::open(path)
}

/// Structure of a file: which top-level elements and keys exist.
/// @noRd
#[extendr]
fn rs_h5ad_keys(path: &str, group: &str) -> Result<Vec<String>> {
    guard(|| open(path)?.keys(group))
}

/// Whether an element exists.
/// @noRd
#[extendr]
fn rs_h5ad_exists(path: &str, elem: &str) -> Result<bool> {
    guard(|| Ok(open(path)?.exists(elem)))
}

/// Read any element; unsupported sub-elements are listed in attribute "skipped".
/// @noRd
#[extendr]
fn rs_h5ad_read_elem(path: &str, elem: &str) -> Result<Robj> {
    guard(|| {
        let f = open(path)?;
        let out = match elem {
            "obs" | "var" | "raw/var" => Elem::Frame(f.frame(elem)?),
            _ => f.read(elem)?,
        };
        let r = elem_robj(&out)?;
        let skipped = f.take_skipped();
        if skipped.is_empty() {
            Ok(r)
        } else {
            set(r, "skipped", skipped)
        }
    })
}

/// Read a matrix element into newly allocated R vectors (HDF5 converts the values to
/// double while reading into them). Returns list(kind, shape, integer, x, i, p).
/// @noRd
#[extendr]
fn rs_h5ad_read_matrix(path: &str, elem: &str) -> Result<List> {
    guard(|| {
        let f = open(path)?;
        let m = f.matrix(elem)?;
        let shape = vec![m.shape[0] as f64, m.shape[1] as f64];
        let kind = match m.kind {
            MatrixKind::Csr => "csr",
            MatrixKind::Csc => "csc",
            MatrixKind::Dense => "dense",
        };
        let mut x = ext_vec::alloc(true, m.nnz);
        if m.kind == MatrixKind::Dense {
            m.read_dense_into(x.as_real_slice_mut().unwrap_or(&mut []))?;
            return Ok(list!(
                kind = kind,
                shape = shape,
                integer = m.integer,
                x = x
            ));
        }
        let major = if m.kind == MatrixKind::Csr {
            m.shape[0]
        } else {
            m.shape[1]
        };
        let mut i = ext_vec::alloc(false, m.nnz);
        let mut p = Robj::alloc_vector(SEXPTYPE::INTSXP, major + 1);
        m.read_sparse_into(
            x.as_real_slice_mut().unwrap_or(&mut []),
            i.as_integer_slice_mut().unwrap_or(&mut []),
            p.as_integer_slice_mut().unwrap_or(&mut []),
        )?;
        Ok(list!(
            kind = kind,
            shape = shape,
            integer = m.integer,
            x = x,
            i = i,
            p = p
        ))
    })
}

/// Start the kernel's zero fill of the memory a later `rs_h5ad_read_matrix(path, elem)`
/// will take, on a background thread: while the file's first check runs (the checking
/// child reports the matrix's size), else now (read_h5ad calls it first, then reads obs
/// and var). Returns whether the element is a matrix; errors are left to the read.
/// @noRd
#[extendr]
fn rs_h5ad_prefault(path: &str, elem: &str) -> bool {
    let r = guard(|| {
        let f = H5ad::open_with_hint(path, elem, &ext_vec::prefault)?;
        if !f.exists(elem) {
            return Ok(false);
        }
        let m = f.matrix(elem)?;
        ext_vec::prefault(m.nnz, m.kind != MatrixKind::Dense);
        Ok(true)
    });
    r.unwrap_or(false)
}

fn str_vec(x: &Robj, what: &str) -> ScResult<Vec<Option<String>>> {
    let it = x
        .as_str_iter()
        .ok_or_else(|| ScError::Input(format!("{what}: expected a character vector")))?;
    Ok(it
        .map(|s| if s.is_na() { None } else { Some(s.to_string()) })
        .collect())
}

/// R object -> element. Lists carrying a `scannot_h5ad` class attribute are typed
/// descriptions built by R/h5ad.R (frames); other lists are dicts.
fn robj_elem(x: &Robj, path: &str) -> ScResult<Elem> {
    let bad = |m: &str| ScError::Input(format!("cannot write '{path}': {m}"));
    if x.inherits("scannot_h5ad_frame") {
        let l = x.as_list().ok_or_else(|| bad("bad frame"))?;
        let get = |k: &str| l.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
        let index = str_vec(&get("index").ok_or_else(|| bad("no index"))?, path)?
            .into_iter()
            .map(|s| s.ok_or_else(|| bad("row names must not be NA")))
            .collect::<ScResult<Vec<_>>>()?;
        let cols = get("columns")
            .and_then(|c| c.as_list())
            .ok_or_else(|| bad("no columns"))?;
        let columns = cols
            .iter()
            .map(|(n, v)| {
                let sub = format!("{path}/{n}");
                let el = robj_elem(&v, &sub)?;
                match &el {
                    Elem::Array { shape, .. } if shape.len() == 1 && shape[0] == index.len() => {}
                    Elem::Array { shape, .. } if shape.is_empty() && index.len() == 1 => {}
                    Elem::Categorical { codes, .. } if codes.len() == index.len() => {}
                    Elem::Nullable { mask, .. } if mask.len() == index.len() => {}
                    _ => {
                        return Err(bad(&format!(
                            "column '{n}' is not a vector with one value per row"
                        )))
                    }
                }
                let el = match el {
                    Elem::Array { values, .. } => Elem::Array {
                        shape: vec![index.len()],
                        values,
                    },
                    e => e,
                };
                Ok((n.to_string(), el))
            })
            .collect::<ScResult<Vec<_>>>()?;
        return Ok(Elem::Frame(Frame {
            index_name: "_index".into(),
            index,
            columns,
        }));
    }
    if x.is_factor() {
        let codes: Vec<i32> = x
            .as_integer_slice()
            .ok_or_else(|| bad("bad factor"))?
            .iter()
            .map(|&c| if c == i32::MIN { -1 } else { c - 1 })
            .collect();
        let levels = x
            .get_attrib("levels")
            .map(|l| str_vec(&l, path))
            .transpose()?
            .unwrap_or_default();
        return Ok(Elem::Categorical {
            codes,
            categories: Values::Str(levels),
            ordered: x.inherits("ordered"),
        });
    }
    if let Some(l) = x.as_list() {
        let items = l
            .iter()
            .enumerate()
            .map(|(k, (n, v))| {
                let key = if n.is_empty() || n == "NA" {
                    k.to_string()
                } else {
                    n.to_string()
                };
                let sub = format!("{path}/{key}");
                Ok((key, robj_elem(&v, &sub)?))
            })
            .collect::<ScResult<Vec<_>>>()?;
        return Ok(Elem::Dict(items));
    }
    let n = x.len();
    let (values, na): (Values, Vec<bool>) = match x.rtype() {
        Rtype::Doubles => (
            Values::F64(x.as_real_slice().unwrap_or(&[]).to_vec()),
            vec![],
        ),
        Rtype::Integers => {
            let v = x.as_integer_slice().unwrap_or(&[]);
            let na: Vec<bool> = v.iter().map(|&a| a == i32::MIN).collect();
            (
                Values::Int(
                    v.iter()
                        .map(|&a| if a == i32::MIN { 0 } else { a })
                        .collect(),
                ),
                na,
            )
        }
        Rtype::Logicals => {
            let v = x.as_logical_slice().unwrap_or(&[]);
            let na: Vec<bool> = v.iter().map(|a| a.is_na()).collect();
            (Values::Bool(v.iter().map(|a| a.is_true()).collect()), na)
        }
        Rtype::Strings => {
            let v = str_vec(x, path)?;
            let na: Vec<bool> = v.iter().map(|s| s.is_none()).collect();
            (Values::Str(v), na)
        }
        Rtype::Null => return Ok(Elem::Dict(vec![])),
        other => return Err(bad(&format!("R type {other:?} is not supported"))),
    };
    if na.iter().any(|&m| m) {
        let values = match values {
            Values::Str(v) => {
                Values::Str(v.into_iter().map(|s| s.or(Some(String::new()))).collect())
            }
            v => v,
        };
        return Ok(Elem::Nullable { values, mask: na });
    }
    let shape = match x.get_attrib("dim").and_then(|d| d.as_integer_vector()) {
        Some(d) if d.len() == 2 => {
            // R column-major r x c -> row-major
            let (r, c) = (d[0] as usize, d[1] as usize);
            let t = |k: usize| (k % c) * r + k / c;
            let values = match values {
                Values::F64(v) => Values::F64((0..r * c).map(|k| v[t(k)]).collect()),
                Values::Int(v) => Values::Int((0..r * c).map(|k| v[t(k)]).collect()),
                Values::Bool(v) => Values::Bool((0..r * c).map(|k| v[t(k)]).collect()),
                Values::Str(v) => Values::Str((0..r * c).map(|k| v[t(k)].clone()).collect()),
            };
            return Ok(Elem::Array {
                shape: vec![r, c],
                values,
            });
        }
        Some(_) => return Err(bad("arrays of more than 2 dimensions are not supported")),
        None if n == 1 && x.get_attrib("h5ad_array").is_none() => vec![],
        None => vec![n],
    };
    Ok(Elem::Array { shape, values })
}

/// Write an AnnData file. `items` is a named list in write order: names are element
/// paths; values are `list(type = "sparse", csr, shape, x, i, p, f32)`,
/// `list(type = "dense", shape, x, f32)` (x already row-major), or any R object for
/// [`robj_elem`].
/// @noRd
#[extendr]
fn rs_h5ad_write(path: &str, items: List) -> Result<()> {
    guard(|| {
        let w = H5adWriter::create(path)?;
        for (name, v) in items.iter() {
            let typed = v
                .as_list()
                .filter(|_| v.inherits("scannot_h5ad_matrix"))
                .and_then(|l| {
                    let ty = l
                        .iter()
                        .find(|(n, _)| *n == "type")
                        .and_then(|(_, t)| t.as_str().map(|s| s.to_string()));
                    ty.map(|t| (t, l))
                });
            match typed {
                Some((t, l)) if t == "sparse" || t == "dense" => {
                    let get = |k: &str| l.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
                    let shape = get("shape")
                        .and_then(|s| {
                            s.as_real_vector().or_else(|| {
                                s.as_integer_vector()
                                    .map(|v| v.iter().map(|&a| a as f64).collect())
                            })
                        })
                        .filter(|s| s.len() == 2)
                        .ok_or_else(|| ScError::Input(format!("'{name}': bad shape")))?;
                    let shape = [shape[0] as usize, shape[1] as usize];
                    let f32 = get("f32").and_then(|b| b.as_bool()).unwrap_or(false);
                    let xr = get("x").ok_or_else(|| ScError::Input(format!("'{name}': no x")))?;
                    let x = xr
                        .as_real_slice()
                        .ok_or_else(|| ScError::Input(format!("'{name}': x must be double")))?;
                    if t == "dense" {
                        if x.len() != shape[0] * shape[1] {
                            return Err(ScError::Dims(format!(
                                "'{name}': values do not match the shape"
                            )));
                        }
                        w.write_dense(name, shape, x, f32)?;
                    } else {
                        let ir =
                            get("i").ok_or_else(|| ScError::Input(format!("'{name}': no i")))?;
                        let pr =
                            get("p").ok_or_else(|| ScError::Input(format!("'{name}': no p")))?;
                        let csr = get("csr").and_then(|b| b.as_bool()).unwrap_or(true);
                        w.write_sparse(
                            name,
                            csr,
                            shape,
                            x,
                            ir.as_integer_slice().unwrap_or(&[]),
                            pr.as_integer_slice().unwrap_or(&[]),
                            f32,
                        )?;
                    }
                }
                _ => w.write(name, &robj_elem(&v, name)?)?,
            }
        }
        w.finish()
    })
}

/// Bytes of large matrix vectors currently held outside R's heap (for tests).
/// @noRd
#[extendr]
fn rs_h5ad_mapped_bytes() -> f64 {
    ext_vec::live_bytes() as f64
}

extendr_module! {
    mod h5ad;
    fn rs_h5ad_mapped_bytes;
    fn rs_h5ad_keys;
    fn rs_h5ad_exists;
    fn rs_h5ad_read_elem;
    fn rs_h5ad_read_matrix;
    fn rs_h5ad_prefault;
    fn rs_h5ad_write;
}
