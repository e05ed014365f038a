//! Glue for CellTypist (spec section 4): model file reading, prediction, majority vote.

use crate::convert::{guard, threads};
use crate::expr_matrix;
use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::celltypist as ct;
use scannot_core::{ScError, ScResult};

fn strings(v: &Strings) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Read a CellTypist .pkl without executing it; plain vectors for the R model object.
/// @noRd
#[extendr]
fn rs_celltypist_read(path: &str) -> Result<List> {
    guard(|| {
        let bytes = std::fs::read(path)
            .map_err(|e| ScError::Input(format!("cannot read the model file '{path}': {e}")))?;
        let m = ct::read_model(&bytes)?;
        let (dk, dv): (Vec<String>, Vec<String>) = m.description.into_iter().unzip();
        Ok(list!(
            classifier = m.classifier,
            classes = m.classes,
            features = m.features,
            n_rows = m.n_rows as i32,
            coef = m.coef,
            intercept = m.intercept,
            scaler_mean = m.scaler_mean,
            scaler_scale = m.scaler_scale,
            with_mean = m.with_mean,
            description_keys = dk,
            description_values = dv,
            sklearn_version = m.sklearn_version.unwrap_or_default()
        ))
    })
}

/// CellTypist prediction on a genes x cells matrix. `coef` is the n_rows x F matrix
/// (column-major = gene-major). Returns decision/probability (cells x classes, column-major),
/// 1-based best-match codes, prob-match labels (when asked) and the first cell's expm1 sum.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_celltypist_predict(
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    genes: Strings,
    features: Strings,
    classes: Strings,
    n_rows: i32,
    coef: &[f64],
    intercept: &[f64],
    scaler_mean: &[f64],
    scaler_scale: &[f64],
    with_mean: bool,
    check_input: bool,
    prob_match: bool,
    p_thres: f64,
    n_threads: i32,
) -> Result<List> {
    guard(|| {
        let m = expr_matrix(p, i, x, nrow, ncol, dense)?;
        let genes = strings(&genes);
        if genes.len() != m.nrow() {
            return Err(ScError::Dims(format!(
                "{} gene names for {} rows",
                genes.len(),
                m.nrow()
            )));
        }
        let first_sum = if check_input {
            ct::check_log1p_cp10k(&m)?
        } else {
            f64::NAN
        };
        let features = strings(&features);
        let classes = strings(&classes);
        let kept = ct::match_features(&genes, &features)?;
        let view = ct::ModelView {
            n_classes: classes.len(),
            n_rows: usize::try_from(n_rows).map_err(|_| ScError::Input("n_rows < 0".into()))?,
            coef,
            intercept,
            mean: scaler_mean,
            scale: scaler_scale,
            with_mean,
        };
        if features.len() != scaler_mean.len() {
            return Err(ScError::Dims(
                "the model's features and scaler differ in length".into(),
            ));
        }
        let pred = threads(n_threads, || -> ScResult<_> {
            let pred = ct::predict(&m, &kept, &view)?;
            let labels = if prob_match {
                ct::prob_match_labels(&pred, &classes, p_thres)
            } else {
                Vec::new()
            };
            Ok((pred, labels))
        })??;
        let (pred, labels) = pred;
        let best: Vec<i32> = pred.best.iter().map(|&b| b as i32 + 1).collect();
        Ok(list!(
            decision = pred.decision,
            probability = pred.probability,
            best = best,
            prob_labels = labels,
            n_matched = kept.len() as i32,
            first_cell_sum = first_sum
        ))
    })
}

/// Majority vote: `labels` and `clusters` are 1-based codes; one label per cluster.
/// @noRd
#[extendr]
fn rs_celltypist_vote(
    labels: &[i32],
    label_names: Strings,
    clusters: &[i32],
    n_clusters: i32,
    min_prop: f64,
) -> Result<Vec<String>> {
    guard(|| {
        let code = |v: i32| {
            usize::try_from(v - 1).map_err(|_| ScError::Input("codes must be >= 1".into()))
        };
        let l: Vec<usize> = labels.iter().map(|&v| code(v)).collect::<ScResult<_>>()?;
        let c: Vec<usize> = clusters.iter().map(|&v| code(v)).collect::<ScResult<_>>()?;
        let nc = usize::try_from(n_clusters).unwrap_or(0);
        let v = ct::majority_vote(&l, &strings(&label_names), &c, nc, min_prop)?;
        Ok(v.into_iter().map(|s| s.unwrap_or_default()).collect())
    })
}

extendr_module! {
    mod celltypist;
    fn rs_celltypist_read;
    fn rs_celltypist_predict;
    fn rs_celltypist_vote;
}
