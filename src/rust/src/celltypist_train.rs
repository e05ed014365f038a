//! Glue for CellTypist training and model writing (spec section 4.4, 4.5).

use crate::convert::{guard, threads};
use crate::expr_matrix;
use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::celltypist::CelltypistModel;
use scannot_core::celltypist_train as tr;
use scannot_core::{ScError, ScResult};

fn strings(v: &Strings) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn nonneg(v: i32, what: &str) -> ScResult<usize> {
    usize::try_from(v).map_err(|_| ScError::Input(format!("`{what}` must be >= 0")))
}

/// celltypist.train on a genes x cells matrix. `rows` 1-based genes to use, `labels` 1-based
/// class codes. Returns 1-based kept genes, scaler, gene-major coef, intercept, n_iter, t.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_celltypist_train(
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    rows: &[i32],
    labels: &[i32],
    n_classes: i32,
    with_mean: bool,
    use_sgd: bool,
    c: f64,
    max_iter: i32,
    alpha: f64,
    mini_batch: bool,
    batch_number: i32,
    batch_size: i32,
    epochs: i32,
    balance_cell_type: bool,
    feature_selection: bool,
    top_genes: i32,
    seed: f64,
    n_threads: i32,
) -> Result<List> {
    guard(|| {
        let m = expr_matrix(p, i, x, nrow, ncol, dense)?;
        let code = |v: i32, n: usize, what: &str| {
            usize::try_from(v - 1)
                .ok()
                .filter(|&u| u < n)
                .ok_or_else(|| ScError::Input(format!("{what} code {v} out of range")))
        };
        let rows: Vec<usize> = rows
            .iter()
            .map(|&r| code(r, m.nrow(), "gene"))
            .collect::<ScResult<_>>()?;
        let ncls = nonneg(n_classes, "n_classes")?;
        let y: Vec<usize> = labels
            .iter()
            .map(|&l| code(l, ncls, "label"))
            .collect::<ScResult<_>>()?;
        if !(seed.is_finite() && seed >= 0.0) {
            return Err(ScError::Input(
                "`seed` must be a non-negative number".into(),
            ));
        }
        let sgd = tr::SgdOptions {
            alpha,
            max_iter: nonneg(max_iter, "max_iter")?,
            tol: 1e-3,
            n_iter_no_change: 5,
            mini_batch,
            batch_number: nonneg(batch_number, "batch_number")?,
            batch_size: nonneg(batch_size, "batch_size")?.max(1),
            epochs: nonneg(epochs, "epochs")?,
            balance_cell_type,
            seed: seed as u64,
        };
        let o = tr::TrainOptions {
            with_mean,
            use_sgd,
            c,
            max_iter: sgd.max_iter,
            tol_lr: 1e-4,
            sgd,
            feature_selection,
            top_genes: nonneg(top_genes, "top_genes")?,
        };
        let t = threads(n_threads, || tr::train(&m, &rows, &y, ncls, &o))??;
        Ok(list!(
            genes = t.genes.iter().map(|&g| g as i32 + 1).collect::<Vec<i32>>(),
            mean = t.scaler.mean,
            var = t.scaler.var,
            scale = t.scaler.scale,
            n_rows = t.fit.n_rows as i32,
            coef = t.fit.coef,
            intercept = t.fit.intercept,
            n_iter = t.fit.n_iter,
            t = t.fit.t
        ))
    })
}

/// Write a CellTypist .pkl (celltypist 1.7.1 / scikit-learn 1.6.1 layout) atomically.
/// `scaler_var` empty = unknown.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_celltypist_write(
    path: &str,
    classifier: &str,
    classes: Strings,
    features: Strings,
    n_rows: i32,
    coef: &[f64],
    intercept: &[f64],
    scaler_mean: &[f64],
    scaler_scale: &[f64],
    scaler_var: &[f64],
    with_mean: bool,
    n_samples_seen: f64,
    c: f64,
    max_iter: i32,
    n_iter: &[i32],
    alpha: f64,
    t: f64,
    description_keys: Strings,
    description_values: Strings,
) -> Result<bool> {
    guard(|| {
        let model = CelltypistModel {
            classifier: classifier.to_string(),
            classes: strings(&classes),
            features: strings(&features),
            n_rows: nonneg(n_rows, "n_rows")?,
            coef: coef.to_vec(),
            intercept: intercept.to_vec(),
            scaler_mean: scaler_mean.to_vec(),
            scaler_scale: scaler_scale.to_vec(),
            with_mean,
            description: strings(&description_keys)
                .into_iter()
                .zip(strings(&description_values))
                .collect(),
            sklearn_version: Some(tr::SKLEARN_VERSION.into()),
        };
        let extras = tr::ModelExtras {
            scaler_var: (!scaler_var.is_empty()).then(|| scaler_var.to_vec()),
            n_samples_seen: n_samples_seen as i64,
            c,
            max_iter: max_iter as i64,
            n_iter: n_iter.to_vec(),
            alpha,
            t,
        };
        let bytes = tr::model_pickle(&model, &extras)?;
        write_atomic(std::path::Path::new(path), &bytes)?;
        Ok(true)
    })
}

/// Write to a temporary file next to `path`, then rename it into place.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> ScResult<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| ScError::Input(format!("'{}' is not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let io = |e: std::io::Error| ScError::Input(format!("cannot write '{}': {e}", path.display()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

extendr_module! {
    mod celltypist_train;
    fn rs_celltypist_train;
    fn rs_celltypist_write;
}
