//! Thin extendr glue of scannot: converts R objects to scannot-core types and back.
//!
//! Rules: matrix slots are borrowed (`&[i32]`, `&[f64]`), never copied and never
//! mutated; every function returns `Result` and runs inside [`guard`], so core errors
//! become classed R conditions (`[scannot_error_<kind>] message`, parsed by
//! `R/errors.R`) and panics never unwind into R.

use extendr_api::prelude::*;
use extendr_api::Result;
use extendr_ffi::SEXPTYPE;
use scannot_core::dotplot::{dotplot, DotplotOptions};
use scannot_core::matrix::{CscView, DenseView, ExprMatrix};
use scannot_core::{ScError, ScResult};

mod celltypist;
mod celltypist_train;
mod convert;
mod h5ad;
mod knn;
mod scvi;
mod scvi_train;
mod wilcoxon;
use convert::{guard, threads};

/// Matrix arguments as the R side passes them: dgCMatrix slots, or a dense column-major
/// double matrix in `x` (then `p` and `i` are empty).
pub(crate) fn expr_matrix<'a>(
    p: &'a [i32],
    i: &'a [i32],
    x: &'a [f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
) -> ScResult<ExprMatrix<'a>> {
    if nrow < 0 || ncol < 0 {
        return Err(ScError::Dims(
            "matrix dimensions must be non-negative".into(),
        ));
    }
    let (nr, nc) = (nrow as usize, ncol as usize);
    Ok(if dense {
        ExprMatrix::Dense(DenseView::new(nr, nc, x)?)
    } else {
        ExprMatrix::Csc(CscView::new(nr, nc, p, i, x)?)
    })
}

/// Dotplot aggregation (spec section 1). `genes` 0-based rows, `groups` 0-based codes (NA < 0).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_dotplot(
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    genes: &[i32],
    groups: &[i32],
    n_groups: i32,
    expression_cutoff: f64,
    mean_only_expressed: bool,
    standard_scale: &str,
    log: bool,
    n_threads: i32,
    expm1: bool,
) -> Result<List> {
    guard(|| {
        let m = expr_matrix(p, i, x, nrow, ncol, dense)?;
        let genes: Vec<usize> = genes
            .iter()
            .map(|&g| {
                usize::try_from(g).map_err(|_| ScError::Input("gene indices must be >= 0".into()))
            })
            .collect::<ScResult<_>>()?;
        let opt = DotplotOptions {
            expression_cutoff,
            mean_only_expressed,
            standard_scale: standard_scale.parse()?,
            log,
            expm1,
        };
        let ng = usize::try_from(n_groups).unwrap_or(0);
        let r = threads(n_threads, || dotplot(&m, &genes, groups, ng, &opt))??;
        let n_cells: Vec<f64> = r.n_cells.iter().map(|&n| n as f64).collect();
        Ok(list!(
            n_cells = n_cells,
            mean = r.mean,
            fraction = r.fraction,
            color = r.color
        ))
    })
}

/// log1p(x / total * target_sum) per cell; returns the new `x` (sparse) or values (dense).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_log_normalize(
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    target_sum: f64,
    n_threads: i32,
) -> Result<Vec<f64>> {
    guard(|| {
        let m = expr_matrix(p, i, x, nrow, ncol, dense)?;
        threads(n_threads, || match m {
            ExprMatrix::Csc(c) => scannot_core::normalize::log_normalize_csc(&c, target_sum),
            ExprMatrix::Dense(d) => scannot_core::normalize::log_normalize_dense(&d, target_sum),
        })?
    })
}

/// Simulated labelled counts (gamma-Poisson with real marker symbols and batches).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_simulate(
    n_cells: f64,
    n_genes: f64,
    n_types: i32,
    n_batches: i32,
    seed: f64,
    depth: f64,
    marker_fold: f64,
    batch_effect: f64,
    genes_per_cell: f64,
    n_threads: i32,
) -> Result<List> {
    guard(|| {
        let count = |v: f64, what: &str| {
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < i32::MAX as f64 {
                Ok(v as usize)
            } else {
                Err(ScError::Input(format!(
                    "{what} must be a whole number >= 0"
                )))
            }
        };
        let params = scannot_core::simulate::SimParams {
            n_cells: count(n_cells, "n_cells")?,
            n_genes: count(n_genes, "n_genes")?,
            n_types: count(n_types as f64, "n_types")?,
            n_batches: count(n_batches as f64, "n_batches")?,
            seed: count(seed.abs(), "seed")? as u64,
            depth,
            marker_fold,
            batch_effect,
        };
        if !genes_per_cell.is_nan() {
            // sparse generator: the slots are allocated once, at their final size, in R
            let plan = threads(n_threads, || {
                scannot_core::simulate::simulate_sparse_plan(&params, genes_per_cell)
            })??;
            let mut x = Robj::alloc_vector(SEXPTYPE::REALSXP, plan.nnz());
            let mut i = Robj::alloc_vector(SEXPTYPE::INTSXP, plan.nnz());
            {
                let xs = x.as_real_slice_mut().unwrap_or(&mut []);
                let is = i.as_integer_slice_mut().unwrap_or(&mut []);
                threads(n_threads, || plan.fill(is, xs))??;
            }
            let cell_type: Vec<i32> = plan.cell_type.iter().map(|&t| t as i32 + 1).collect();
            let batch: Vec<i32> = plan.batch.iter().map(|&b| b as i32 + 1).collect();
            return Ok(list!(
                p = plan.p.clone(),
                i = i,
                x = x,
                nrow = params.n_genes as i32,
                ncol = params.n_cells as i32,
                genes = plan.genes.clone(),
                type_names = plan.type_names.clone(),
                cell_type = cell_type,
                batch = batch,
                depth = plan.depth
            ));
        }
        let s = threads(n_threads, || scannot_core::simulate::simulate(&params))??;
        let cell_type: Vec<i32> = s.cell_type.iter().map(|&t| t as i32 + 1).collect();
        let batch: Vec<i32> = s.batch.iter().map(|&b| b as i32 + 1).collect();
        Ok(list!(
            p = s.counts.p,
            i = s.counts.i,
            x = s.counts.x,
            nrow = s.counts.nrow as i32,
            ncol = s.counts.ncol as i32,
            genes = s.genes,
            type_names = s.type_names,
            cell_type = cell_type,
            batch = batch
        ))
    })
}

/// Test hook: raise a core error of the given kind, or panic, to check the R mapping.
/// @noRd
#[extendr]
fn rs_test_error(kind: &str) -> Result<i32> {
    guard(|| match kind {
        "panic" => panic!("deliberate panic for testing"),
        "dims" => Err(ScError::Dims("deliberate dims error".into())),
        _ => Err(ScError::Input(format!("deliberate {kind} error"))),
    })
}

/// Test hook: address of a double vector's data, to prove slots reach Rust uncopied.
/// @noRd
#[extendr]
fn rs_data_address(x: &[f64]) -> String {
    format!("{:p}", x.as_ptr())
}

extendr_module! {
    mod scannot;
    use wilcoxon;
    use celltypist;
    use celltypist_train;
    use knn;
    use h5ad;
    use scvi;
    use scvi_train;
    fn rs_data_address;
    fn rs_dotplot;
    fn rs_log_normalize;
    fn rs_simulate;
    fn rs_test_error;
}

/// The R wrapper file's text (what rextendr would generate), for `gen-wrappers`.
pub fn r_wrappers(pkg: &str) -> String {
    let body = get_scannot_metadata()
        .make_r_wrappers(true, pkg)
        .unwrap_or_else(|e| format!("# wrapper generation failed: {e}\n"));
    format!(
        "# Generated by src/rust/src/bin/gen-wrappers.rs (tools/document.sh): do not edit.\n\
         # A cargo test (wrappers_up_to_date) fails when this file is stale.\n\n\
         #' @usage NULL\n#' @useDynLib {pkg}, .registration = TRUE\nNULL\n\n{body}"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrappers_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../R/extendr-wrappers.R");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == super::r_wrappers("scannot"),
            "R/extendr-wrappers.R is stale: run tools/document.sh"
        );
    }
}
