//! Native AnnData (`.h5ad`) reading and writing on HDF5 (hdf5-metno over the system
//! libhdf5).
//!
//! Reading understands the encodings of anndata >= 0.8 (`encoding-type` /
//! `encoding-version` attributes: `anndata`, `csr_matrix`, `csc_matrix`, `array`,
//! `dataframe`, `categorical`, `nullable-integer`, `nullable-boolean`,
//! `nullable-string-array`, `string-array`, `string`, `numeric-scalar`, `dict`,
//! `rec-array`) and the legacy layouts of anndata 0.6/0.7 (`h5sparse_format`
//! sparse groups, categorical codes with a `categories` attribute pointing into
//! `__categories/`, compound-typed data frames). Matrices can be read straight into
//! caller-owned buffers ([`MatrixInfo::read_sparse_into`], [`MatrixInfo::read_dense_into`])
//! so a binding can hand out the file's arrays without a second copy.
//!
//! Every failure (not HDF5, truncated, corrupt, not AnnData, unsupported element) is a
//! [`ScError::Format`](crate::ScError::Format); nothing panics on bad files.

pub(crate) mod chunkidx;
pub(crate) mod direct;
mod heapcheck;
mod isolate;
pub mod mem;
mod read;
mod write;

#[cfg(test)]
mod tests;

pub use read::{H5ad, MatrixInfo};
pub use write::H5adWriter;

/// A one-dimensional column of values, in the narrowest type R can hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F64(Vec<f64>),
    /// Integers that fit in an i32 (wider ones are read as `F64`).
    Int(Vec<i32>),
    Bool(Vec<bool>),
    /// `None` = missing (only from nullable or fixed encodings that carry a mask).
    Str(Vec<Option<String>>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::F64(v) => v.len(),
            Values::Int(v) => v.len(),
            Values::Bool(v) => v.len(),
            Values::Str(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values as display strings (used for non-string categorical categories).
    pub fn to_strings(&self) -> Vec<Option<String>> {
        match self {
            Values::F64(v) => v.iter().map(|x| Some(format!("{x}"))).collect(),
            Values::Int(v) => v.iter().map(|x| Some(x.to_string())).collect(),
            Values::Bool(v) => v
                .iter()
                .map(|&x| Some(if x { "True" } else { "False" }.to_string()))
                .collect(),
            Values::Str(v) => v.clone(),
        }
    }
}

/// A data frame: row names, and columns in their on-disk order.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Name of the index column (anndata's `_index` attribute).
    pub index_name: String,
    pub index: Vec<String>,
    pub columns: Vec<(String, Elem)>,
}

/// A sparse matrix as stored (CSR: `indptr` over rows; CSC: over columns).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse {
    pub csr: bool,
    pub shape: [usize; 2],
    pub data: Values,
    pub indices: Vec<i32>,
    pub indptr: Vec<i32>,
}

/// One AnnData element.
#[derive(Debug, Clone, PartialEq)]
pub enum Elem {
    /// Dense array, row-major (C order) `shape`; `shape` is empty for a scalar.
    Array {
        shape: Vec<usize>,
        values: Values,
    },
    Sparse(Sparse),
    /// Codes are 0-based; -1 is missing.
    Categorical {
        codes: Vec<i32>,
        categories: Values,
        ordered: bool,
    },
    /// Nullable integer / boolean / string array: `mask[i]` true = missing.
    Nullable {
        values: Values,
        mask: Vec<bool>,
    },
    Frame(Frame),
    Dict(Vec<(String, Elem)>),
    /// Structured (record) array: one column per field, in field order.
    Record(Vec<(String, Values)>),
}

/// How a matrix element is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixKind {
    Csr,
    Csc,
    Dense,
}
