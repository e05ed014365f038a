//! Writing AnnData elements with anndata's (>= 0.8) encodings.

use hdf5::types::VarLenUnicode;
use hdf5::{Group, H5Type, Location};
use hdf5_metno as hdf5;

use super::{Elem, Frame, Sparse, Values};
use crate::{ScError, ScResult};

fn werr(ctx: &str, e: impl std::fmt::Display) -> ScError {
    ScError::Format(format!("cannot write {ctx}: {e}"))
}

/// A new `.h5ad` file being written. Call [`H5adWriter::finish`] to close it.
pub struct H5adWriter {
    file: hdf5::File,
    path: String,
}

fn vlen(s: &str, ctx: &str) -> ScResult<VarLenUnicode> {
    s.parse::<VarLenUnicode>()
        .map_err(|_| ScError::Value(format!("{ctx}: string {s:?} contains a NUL character")))
}

fn set_str_attr(loc: &Location, name: &str, value: &str) -> ScResult<()> {
    let v = vlen(value, name)?;
    loc.new_attr::<VarLenUnicode>()
        .create(name)
        .and_then(|a| a.write_scalar(&v))
        .map_err(|e| werr(&format!("attribute '{name}'"), e))
}

fn set_encoding(loc: &Location, ty: &str, version: &str) -> ScResult<()> {
    set_str_attr(loc, "encoding-type", ty)?;
    set_str_attr(loc, "encoding-version", version)
}

fn new_ds<T: H5Type>(
    g: &Group,
    name: &str,
    data: &[T],
    shape: &[usize],
) -> ScResult<hdf5::Dataset> {
    let view = ndarray::ArrayView::from_shape(ndarray::IxDyn(shape), data)
        .map_err(|e| ScError::Dims(format!("'{name}': {e}")))?;
    g.new_dataset_builder()
        .with_data(view)
        .create(name)
        .map_err(|e| werr(&format!("dataset '{name}'"), e))
}

fn strings_vlen(v: &[Option<String>], ctx: &str) -> ScResult<Vec<VarLenUnicode>> {
    v.iter()
        .map(|s| match s {
            Some(s) => vlen(s, ctx),
            None => Err(ScError::Value(format!(
                "{ctx}: missing (NA) strings cannot be stored in a plain string array; \
                 use a factor (categorical, NA = code -1) or a nullable string array"
            ))),
        })
        .collect()
}

fn write_values(g: &Group, name: &str, v: &Values, shape: &[usize], enc: &str) -> ScResult<()> {
    let ds = match v {
        Values::F64(x) => new_ds(g, name, x, shape)?,
        Values::Int(x) => new_ds(g, name, x, shape)?,
        Values::Bool(x) => new_ds(g, name, x, shape)?,
        Values::Str(x) => {
            let s = strings_vlen(x, name)?;
            let ds = new_ds(g, name, &s, shape)?;
            let enc = if shape.is_empty() {
                "string"
            } else {
                "string-array"
            };
            set_encoding(&ds, enc, "0.2.0")?;
            return Ok(());
        }
    };
    set_encoding(&ds, enc, "0.2.0")
}

impl H5adWriter {
    /// Create (truncate) `path` and write the root `anndata` encoding.
    pub fn create(path: &str) -> ScResult<Self> {
        hdf5::silence_errors(true);
        let file = hdf5::File::create(path)
            .map_err(|e| ScError::Format(format!("cannot create '{path}': {e}")))?;
        set_encoding(&file, "anndata", "0.1.0")?;
        Ok(H5adWriter {
            file,
            path: path.to_string(),
        })
    }

    /// Flush and close.
    pub fn finish(self) -> ScResult<()> {
        self.file
            .flush()
            .map_err(|e| ScError::Format(format!("cannot flush '{}': {e}", self.path)))?;
        self.file
            .close()
            .map_err(|e| ScError::Format(format!("cannot close '{}': {e}", self.path)))
    }

    /// The group that will hold `path`'s last component; missing parents become dicts.
    fn parent(&self, path: &str) -> ScResult<(Group, String)> {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some((last, dirs)) = parts.split_last() else {
            return Err(ScError::Input("empty element path".into()));
        };
        let mut g = self.file.group("/").map_err(|e| werr("root", e))?;
        for d in dirs {
            g = if g.link_exists(d) {
                g.group(d).map_err(|e| werr(d, e))?
            } else {
                let ng = g.create_group(d).map_err(|e| werr(d, e))?;
                set_encoding(&ng, "dict", "0.1.0")?;
                ng
            };
        }
        if g.link_exists(last) {
            return Err(ScError::Input(format!("element '{path}' written twice")));
        }
        Ok((g, last.to_string()))
    }

    /// Write a sparse matrix from borrowed arrays (`csr`: `indptr` runs over rows).
    #[allow(clippy::too_many_arguments)]
    pub fn write_sparse(
        &self,
        path: &str,
        csr: bool,
        shape: [usize; 2],
        data: &[f64],
        indices: &[i32],
        indptr: &[i32],
        as_f32: bool,
    ) -> ScResult<()> {
        let major = if csr { shape[0] } else { shape[1] };
        if indices.len() != data.len() || indptr.len() != major + 1 {
            return Err(ScError::Dims(format!(
                "'{path}': sparse arrays do not match the shape"
            )));
        }
        let (parent, name) = self.parent(path)?;
        let g = parent.create_group(&name).map_err(|e| werr(path, e))?;
        set_encoding(&g, if csr { "csr_matrix" } else { "csc_matrix" }, "0.1.0")?;
        let sh = [shape[0] as i64, shape[1] as i64];
        g.new_attr_builder()
            .with_data(&sh[..])
            .create("shape")
            .map_err(|e| werr("shape", e))?;
        if as_f32 {
            let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
            new_ds(&g, "data", &v, &[v.len()])?;
        } else {
            new_ds(&g, "data", data, &[data.len()])?;
        }
        new_ds(&g, "indices", indices, &[indices.len()])?;
        new_ds(&g, "indptr", indptr, &[indptr.len()])?;
        Ok(())
    }

    /// Write a dense 2-D array given in row-major order.
    pub fn write_dense(
        &self,
        path: &str,
        shape: [usize; 2],
        rowmajor: &[f64],
        as_f32: bool,
    ) -> ScResult<()> {
        let (parent, name) = self.parent(path)?;
        let ds = if as_f32 {
            let v: Vec<f32> = rowmajor.iter().map(|&x| x as f32).collect();
            new_ds(&parent, &name, &v, &shape)?
        } else {
            new_ds(&parent, &name, rowmajor, &shape)?
        };
        set_encoding(&ds, "array", "0.2.0")
    }

    /// Write any element.
    pub fn write(&self, path: &str, el: &Elem) -> ScResult<()> {
        let (parent, name) = self.parent(path)?;
        write_elem(&parent, &name, el, path)
    }
}

fn write_elem(parent: &Group, name: &str, el: &Elem, path: &str) -> ScResult<()> {
    match el {
        Elem::Array { shape, values } => {
            let enc = if shape.is_empty() {
                "numeric-scalar"
            } else {
                "array"
            };
            write_values(parent, name, values, shape, enc)
        }
        Elem::Sparse(Sparse {
            csr,
            shape,
            data,
            indices,
            indptr,
        }) => {
            let g = parent.create_group(name).map_err(|e| werr(path, e))?;
            set_encoding(&g, if *csr { "csr_matrix" } else { "csc_matrix" }, "0.1.0")?;
            let sh = [shape[0] as i64, shape[1] as i64];
            g.new_attr_builder()
                .with_data(&sh[..])
                .create("shape")
                .map_err(|e| werr("shape", e))?;
            write_values(&g, "data", data, &[data.len()], "array")?;
            new_ds(&g, "indices", indices, &[indices.len()])?;
            new_ds(&g, "indptr", indptr, &[indptr.len()])?;
            Ok(())
        }
        Elem::Categorical {
            codes,
            categories,
            ordered,
        } => {
            let g = parent.create_group(name).map_err(|e| werr(path, e))?;
            set_encoding(&g, "categorical", "0.2.0")?;
            g.new_attr::<bool>()
                .create("ordered")
                .and_then(|a| a.write_scalar(ordered))
                .map_err(|e| werr("ordered", e))?;
            let n = categories.len();
            if let Some(c) = codes.iter().find(|&&c| c < -1 || c as i64 >= n as i64) {
                return Err(ScError::Value(format!(
                    "'{path}': category code {c} out of range"
                )));
            }
            let cd = if n < 127 {
                let v: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
                new_ds(&g, "codes", &v, &[v.len()])?
            } else if n < 32767 {
                let v: Vec<i16> = codes.iter().map(|&c| c as i16).collect();
                new_ds(&g, "codes", &v, &[v.len()])?
            } else {
                new_ds(&g, "codes", codes, &[codes.len()])?
            };
            set_encoding(&cd, "array", "0.2.0")?;
            write_values(&g, "categories", categories, &[n], "array")
        }
        Elem::Nullable { values, mask } => {
            let g = parent.create_group(name).map_err(|e| werr(path, e))?;
            let enc = match values {
                Values::Int(_) => "nullable-integer",
                Values::Bool(_) => "nullable-boolean",
                Values::Str(_) => "nullable-string-array",
                Values::F64(_) => {
                    return Err(ScError::Input(format!(
                        "'{path}': nullable floats are stored as NaN, not masked"
                    )))
                }
            };
            set_encoding(&g, enc, "0.1.0")?;
            match values {
                // masked slots get a placeholder, never NaN/NA text
                Values::Str(s) => {
                    let filled: Vec<Option<String>> = s
                        .iter()
                        .map(|x| Some(x.clone().unwrap_or_default()))
                        .collect();
                    write_values(&g, "values", &Values::Str(filled), &[s.len()], "array")?;
                }
                v => write_values(&g, "values", v, &[v.len()], "array")?,
            }
            write_values(
                &g,
                "mask",
                &Values::Bool(mask.clone()),
                &[mask.len()],
                "array",
            )
        }
        Elem::Frame(f) => write_frame(parent, name, f, path),
        Elem::Dict(items) => {
            let g = parent.create_group(name).map_err(|e| werr(path, e))?;
            set_encoding(&g, "dict", "0.1.0")?;
            for (k, v) in items {
                if k.contains('/') || k.is_empty() {
                    return Err(ScError::Value(format!(
                        "'{path}': key {k:?} cannot be an HDF5 name (empty or contains '/')"
                    )));
                }
                write_elem(&g, k, v, &format!("{path}/{k}"))?;
            }
            Ok(())
        }
        Elem::Record(_) => Err(ScError::Input(format!(
            "'{path}': writing record arrays is not supported; store a data frame instead"
        ))),
    }
}

fn write_frame(parent: &Group, name: &str, f: &Frame, path: &str) -> ScResult<()> {
    let g = parent.create_group(name).map_err(|e| werr(path, e))?;
    set_encoding(&g, "dataframe", "0.2.0")?;
    let index_name = if f.index_name.is_empty() {
        "_index"
    } else {
        &f.index_name
    };
    set_str_attr(&g, "_index", index_name)?;
    let cols: Vec<VarLenUnicode> = f
        .columns
        .iter()
        .map(|(c, _)| vlen(c, "column name"))
        .collect::<ScResult<_>>()?;
    if cols.is_empty() {
        let empty: [f64; 0] = [];
        g.new_attr_builder()
            .with_data(&empty[..])
            .create("column-order")
    } else {
        g.new_attr_builder()
            .with_data(&cols[..])
            .create("column-order")
    }
    .map_err(|e| werr("column-order", e))?;
    let idx: Vec<Option<String>> = f.index.iter().map(|s| Some(s.clone())).collect();
    write_values(
        &g,
        index_name,
        &Values::Str(idx),
        &[f.index.len()],
        "string-array",
    )?;
    for (c, el) in &f.columns {
        if c == index_name || c.contains('/') || c.is_empty() {
            return Err(ScError::Value(format!(
                "'{path}': column name {c:?} is empty, contains '/' or clashes with the index"
            )));
        }
        write_elem(&g, c, el, &format!("{path}/{c}"))?;
    }
    Ok(())
}
