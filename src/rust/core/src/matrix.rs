//! Borrowed views of expression matrices, genes x cells, exactly as R stores them:
//! a dgCMatrix (CSC: `p`, `i`, `x` slots) or a column-major dense double matrix.
//! Nothing here copies the caller's memory.

use crate::error::{ScError, ScResult};

/// A compressed sparse column matrix over borrowed slots (R's dgCMatrix layout).
#[derive(Debug, Clone, Copy)]
pub struct CscView<'a> {
    nrow: usize,
    ncol: usize,
    p: &'a [i32],
    i: &'a [i32],
    x: &'a [f64],
}

impl<'a> CscView<'a> {
    /// Validate the slots and wrap them: lengths and monotone `p` (O(ncol)).
    ///
    /// Row indices are not scanned here (that would read the whole `i` slot on every
    /// call): like every dgCMatrix they must lie in `0..nrow` and be sorted within each
    /// column (the Matrix package's validity rule). An index out of range is still caught
    /// by Rust's bounds checks (an error, never memory corruption); call
    /// [`CscView::check_rows`] to verify both properties up front.
    pub fn new(
        nrow: usize,
        ncol: usize,
        p: &'a [i32],
        i: &'a [i32],
        x: &'a [f64],
    ) -> ScResult<Self> {
        if p.len() != ncol + 1 {
            return Err(ScError::Dims(format!(
                "sparse matrix has {} columns but its `p` slot has length {} (expected {}); \
                 the dgCMatrix is malformed, rebuild it with Matrix::sparseMatrix()",
                ncol,
                p.len(),
                ncol + 1
            )));
        }
        if i.len() != x.len() {
            return Err(ScError::Dims(format!(
                "sparse matrix slots `i` ({}) and `x` ({}) differ in length",
                i.len(),
                x.len()
            )));
        }
        if p[0] != 0 || p[ncol] as i64 != i.len() as i64 || p.windows(2).any(|w| w[1] < w[0]) {
            return Err(ScError::Dims(
                "sparse matrix column pointers `p` must start at 0, never decrease and end at \
                 the number of stored values"
                    .into(),
            ));
        }
        Ok(Self {
            nrow,
            ncol,
            p,
            i,
            x,
        })
    }

    /// Full check of the row indices: in range and strictly increasing within columns.
    pub fn check_rows(&self) -> ScResult<()> {
        use rayon::prelude::*;
        let bad = (0..self.ncol).into_par_iter().any(|j| {
            let (is, _) = self.col(j);
            is.iter().any(|&r| r < 0 || r as usize >= self.nrow)
                || is.windows(2).any(|w| w[1] <= w[0])
        });
        if bad {
            return Err(ScError::Dims(format!(
                "sparse matrix row indices must lie in 0..{} and increase within each column; \
                 rebuild the matrix with Matrix::sparseMatrix()",
                self.nrow
            )));
        }
        Ok(())
    }

    pub fn nrow(&self) -> usize {
        self.nrow
    }
    pub fn ncol(&self) -> usize {
        self.ncol
    }
    pub fn nnz(&self) -> usize {
        self.x.len()
    }
    pub fn p(&self) -> &'a [i32] {
        self.p
    }
    pub fn i(&self) -> &'a [i32] {
        self.i
    }
    pub fn x(&self) -> &'a [f64] {
        self.x
    }

    /// Row indices and values stored in column `j`.
    #[inline]
    pub fn col(&self, j: usize) -> (&'a [i32], &'a [f64]) {
        let (a, b) = (self.p[j] as usize, self.p[j + 1] as usize);
        (&self.i[a..b], &self.x[a..b])
    }
}

/// A column-major dense matrix over a borrowed slice.
#[derive(Debug, Clone, Copy)]
pub struct DenseView<'a> {
    nrow: usize,
    ncol: usize,
    x: &'a [f64],
}

impl<'a> DenseView<'a> {
    pub fn new(nrow: usize, ncol: usize, x: &'a [f64]) -> ScResult<Self> {
        if nrow.checked_mul(ncol) != Some(x.len()) {
            return Err(ScError::Dims(format!(
                "dense matrix of {nrow} x {ncol} needs {} values but has {}",
                nrow.saturating_mul(ncol),
                x.len()
            )));
        }
        Ok(Self { nrow, ncol, x })
    }
    pub fn nrow(&self) -> usize {
        self.nrow
    }
    pub fn ncol(&self) -> usize {
        self.ncol
    }
    /// Column `j` (all genes of one cell).
    #[inline]
    pub fn col(&self, j: usize) -> &'a [f64] {
        &self.x[j * self.nrow..(j + 1) * self.nrow]
    }
}

/// Either storage; genes are rows, cells are columns.
#[derive(Debug, Clone, Copy)]
pub enum ExprMatrix<'a> {
    Csc(CscView<'a>),
    Dense(DenseView<'a>),
}

impl ExprMatrix<'_> {
    pub fn nrow(&self) -> usize {
        match self {
            ExprMatrix::Csc(m) => m.nrow(),
            ExprMatrix::Dense(m) => m.nrow(),
        }
    }
    pub fn ncol(&self) -> usize {
        match self {
            ExprMatrix::Csc(m) => m.ncol(),
            ExprMatrix::Dense(m) => m.ncol(),
        }
    }
}

/// An owned CSC matrix (what generators and transforms return).
#[derive(Debug, Clone, PartialEq)]
pub struct CscOwned {
    pub nrow: usize,
    pub ncol: usize,
    pub p: Vec<i32>,
    pub i: Vec<i32>,
    pub x: Vec<f64>,
}

impl CscOwned {
    pub fn view(&self) -> CscView<'_> {
        CscView {
            nrow: self.nrow,
            ncol: self.ncol,
            p: &self.p,
            i: &self.i,
            x: &self.x,
        }
    }

    /// Dense column-major copy (for tests).
    pub fn to_dense(&self) -> Vec<f64> {
        let mut d = vec![0.0; self.nrow * self.ncol];
        for j in 0..self.ncol {
            let (a, b) = (self.p[j] as usize, self.p[j + 1] as usize);
            for k in a..b {
                d[j * self.nrow + self.i[k] as usize] += self.x[k];
            }
        }
        d
    }

    /// Build from a dense column-major matrix, storing non-zeros only.
    pub fn from_dense(nrow: usize, ncol: usize, d: &[f64]) -> Self {
        let mut p = vec![0i32];
        let (mut i, mut x) = (Vec::new(), Vec::new());
        for j in 0..ncol {
            for r in 0..nrow {
                let v = d[j * nrow + r];
                if v != 0.0 {
                    i.push(r as i32);
                    x.push(v);
                }
            }
            p.push(i.len() as i32);
        }
        Self {
            nrow,
            ncol,
            p,
            i,
            x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csc_validation_catches_bad_slots() {
        let p = [0, 1, 2];
        let i = [0, 1];
        let x = [1.0, 2.0];
        assert!(CscView::new(2, 2, &p, &i, &x).is_ok());
        assert!(matches!(
            CscView::new(2, 3, &p, &i, &x),
            Err(ScError::Dims(_))
        ));
        assert!(CscView::new(1, 2, &p, &i, &x)
            .unwrap()
            .check_rows()
            .is_err()); // row 1 >= 1
        assert!(CscView::new(2, 1, &[0, 2], &[1, 0], &x)
            .unwrap()
            .check_rows()
            .is_err()); // unsorted
        assert!(CscView::new(2, 2, &p, &i, &x).unwrap().check_rows().is_ok());
        assert!(CscView::new(2, 2, &[0, 2, 1], &i, &x).is_err()); // decreasing
        assert!(CscView::new(2, 2, &p, &i, &x[..1]).is_err());
        assert!(DenseView::new(2, 2, &x).is_err());
    }

    #[test]
    fn dense_round_trip() {
        let d = [0.0, 1.5, 0.0, 0.0, -2.0, 3.0];
        let m = CscOwned::from_dense(3, 2, &d);
        assert_eq!(m.x, vec![1.5, -2.0, 3.0]);
        assert_eq!(m.to_dense(), d.to_vec());
    }
}
