//! Library-size normalisation: `log1p(x / (total / target_sum))` per cell, as scanpy's
//! `normalize_total(target_sum = 1e4)` followed by `log1p`. Structure (`p`, `i`) is kept,
//! so the R side reuses the input's slots and only a new `x` is allocated.

use crate::error::{ScError, ScResult};
use crate::matrix::{CscView, DenseView};
use rayon::prelude::*;

fn check_finite_nonneg(x: &[f64]) -> ScResult<()> {
    if let Some(v) = x.par_iter().find_any(|v| !v.is_finite() || **v < 0.0) {
        return Err(ScError::Value(format!(
            "counts must be finite and non-negative, found {v}; normalise raw counts \
             (e.g. the `counts` layer), not already transformed values"
        )));
    }
    Ok(())
}

#[inline]
fn scale_of(total: f64, target_sum: f64) -> f64 {
    // scanpy: counts_per_cell / target_sum, with zero totals replaced by 1
    let s = total / target_sum;
    if s == 0.0 {
        1.0
    } else {
        s
    }
}

/// New `x` slot of the normalised sparse matrix (cells are columns).
pub fn log_normalize_csc(m: &CscView, target_sum: f64) -> ScResult<Vec<f64>> {
    if !(target_sum > 0.0 && target_sum.is_finite()) {
        return Err(ScError::Input(
            "target_sum must be a positive number".into(),
        ));
    }
    check_finite_nonneg(m.x())?;
    let mut out = vec![0.0; m.nnz()];
    let p = m.p();
    // split `out` into per-column chunks
    let mut rest: &mut [f64] = &mut out;
    let mut chunks: Vec<(usize, &mut [f64])> = Vec::with_capacity(m.ncol());
    for j in 0..m.ncol() {
        let len = (p[j + 1] - p[j]) as usize;
        let (a, b) = rest.split_at_mut(len);
        chunks.push((j, a));
        rest = b;
    }
    chunks.into_par_iter().for_each(|(j, dst)| {
        let (_, xs) = m.col(j);
        let total: f64 = xs.iter().sum();
        let s = scale_of(total, target_sum);
        for (d, v) in dst.iter_mut().zip(xs) {
            *d = (v / s).ln_1p();
        }
    });
    Ok(out)
}

/// Normalised copy of a dense column-major matrix.
pub fn log_normalize_dense(m: &DenseView, target_sum: f64) -> ScResult<Vec<f64>> {
    if !(target_sum > 0.0 && target_sum.is_finite()) {
        return Err(ScError::Input(
            "target_sum must be a positive number".into(),
        ));
    }
    let n = m.nrow();
    let mut out = vec![0.0; n * m.ncol()];
    if n == 0 {
        return Ok(out);
    }
    for j in 0..m.ncol() {
        check_finite_nonneg(m.col(j))?;
    }
    out.par_chunks_mut(n).enumerate().for_each(|(j, dst)| {
        let xs = m.col(j);
        let s = scale_of(xs.iter().sum(), target_sum);
        for (d, v) in dst.iter_mut().zip(xs) {
            *d = (v / s).ln_1p();
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::CscOwned;
    use proptest::prelude::*;

    #[test]
    fn matches_formula_and_zero_cells() {
        // 3 genes x 3 cells, the last cell empty
        let d = [1.0, 0.0, 3.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0];
        let m = CscOwned::from_dense(3, 3, &d);
        let x = log_normalize_csc(&m.view(), 1e4).unwrap();
        assert!((x[0] - (1.0f64 / (4.0 / 1e4)).ln_1p()).abs() < 1e-12);
        assert!((x[1] - (3.0f64 / (4.0 / 1e4)).ln_1p()).abs() < 1e-12);
        assert!((x[2] - (1e4f64).ln_1p()).abs() < 1e-12);
        let dn = log_normalize_dense(&DenseView::new(3, 3, &d).unwrap(), 1e4).unwrap();
        assert_eq!(&dn[6..], &[0.0, 0.0, 0.0]);
        assert!((dn[0] - x[0]).abs() < 1e-15);
    }

    #[test]
    fn rejects_negative_and_nan() {
        let m = CscOwned::from_dense(1, 2, &[-1.0, 2.0]);
        assert!(matches!(
            log_normalize_csc(&m.view(), 1e4),
            Err(ScError::Value(_))
        ));
        let m = CscOwned::from_dense(1, 2, &[f64::NAN, 2.0]);
        assert!(log_normalize_csc(&m.view(), 1e4).is_err());
        assert!(log_normalize_csc(&m.view(), 0.0).is_err());
    }

    proptest! {
        #[test]
        fn sparse_equals_dense(vals in proptest::collection::vec(0u32..20, 24)) {
            let d: Vec<f64> = vals.iter().map(|&v| if v < 12 { 0.0 } else { v as f64 }).collect();
            let s = CscOwned::from_dense(4, 6, &d);
            let xs = log_normalize_csc(&s.view(), 1e4).unwrap();
            let xd = log_normalize_dense(&DenseView::new(4, 6, &d).unwrap(), 1e4).unwrap();
            let back = CscOwned { x: xs, ..s.clone() }.to_dense();
            for (a, b) in back.iter().zip(&xd) {
                prop_assert!((a - b).abs() < 1e-12);
            }
        }
    }
}
