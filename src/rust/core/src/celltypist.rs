//! CellTypist: reading its model files and predicting exactly as `celltypist.annotate` does
//! (spec section 4).
//!
//! * [`read_model`] decodes a CellTypist `.pkl` (a pickled dict with `Model`, `Scaler_` and
//!   `description`) through the safe pickle reader: nothing in the file is executed.
//! * [`match_features`] reproduces the gene matching (after anndata's `var_names_make_unique`).
//! * [`check_log1p_cp10k`] is CellTypist's input check (first 1000 cells, first cell's sum).
//! * [`predict`] computes the decision scores `X' · coefᵀ + intercept` with
//!   `X' = min((x - mean) / scale, 10)`, and the sigmoid probabilities, in parallel over cells.
//!   Sparse input is never densified: the score of an all-zero cell is computed once and each
//!   stored value adds its correction (exact in real arithmetic).
//! * [`prob_match_labels`] and [`majority_vote`] give the 'prob match' strings and the
//!   over-cluster vote (ties to the alphabetically first label, strict `min_prop`).

use crate::error::{ScError, ScResult};
use crate::matrix::ExprMatrix;
use crate::pickle::{self, numpy, Value};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};

/// A CellTypist model as plain arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct CelltypistModel {
    /// `LogisticRegression` or `SGDClassifier` (the class name in the file).
    pub classifier: String,
    /// Cell types, `classes_` (sorted by scikit-learn).
    pub classes: Vec<String>,
    /// Gene names, `features`.
    pub features: Vec<String>,
    /// Rows of `coef_`: the number of classes, or 1 for a binary model.
    pub n_rows: usize,
    /// `coef_` stored gene-major: `coef[f * n_rows + k]` (an R matrix `n_rows x F`).
    pub coef: Vec<f64>,
    /// `intercept_`, length `n_rows`.
    pub intercept: Vec<f64>,
    /// `Scaler_.mean_` (zeros when the scaler has none).
    pub scaler_mean: Vec<f64>,
    /// `Scaler_.scale_` (ones when the scaler has none).
    pub scaler_scale: Vec<f64>,
    /// `Scaler_.with_mean`.
    pub with_mean: bool,
    /// The `description` dict, values as text.
    pub description: Vec<(String, String)>,
    /// `_sklearn_version` of the classifier, when present.
    pub sklearn_version: Option<String>,
}

fn fmt_err(msg: impl Into<String>) -> ScError {
    ScError::Format(msg.into())
}

fn attrs<'a>(v: &'a Value, what: &str) -> ScResult<(&'a str, &'a Value)> {
    let o = v.as_object().ok_or_else(|| {
        fmt_err(format!(
            "'{what}' in the CellTypist model is a {}, not a scikit-learn object",
            v.describe()
        ))
    })?;
    let name = o.callable_name().map(|(_, n)| n).unwrap_or("?");
    let state = o
        .state
        .as_ref()
        .filter(|s| s.as_dict().is_some())
        .ok_or_else(|| fmt_err(format!("'{what}' ({name}) has no attribute dict")))?;
    Ok((name, state))
}

fn array_f64(state: &Value, key: &str, what: &str) -> ScResult<Option<(Vec<usize>, Vec<f64>)>> {
    match state.get(key) {
        None | Some(Value::None) => Ok(None),
        Some(v) => {
            let a = numpy::ndarray(v)?;
            let x = a
                .to_f64()
                .ok_or_else(|| fmt_err(format!("{what}.{key} is not a numeric array")))?;
            Ok(Some((a.shape, x)))
        }
    }
}

/// Decode a CellTypist model file (the bytes of the `.pkl`).
pub fn read_model(bytes: &[u8]) -> ScResult<CelltypistModel> {
    let top = pickle::parse(bytes)?;
    if top.as_dict().is_none() {
        return Err(fmt_err(format!(
            "this pickle holds a {}, not a CellTypist model (a dict with 'Model', 'Scaler_' and \
             'description')",
            top.describe()
        )));
    }
    let get = |k: &str| {
        top.get(k).ok_or_else(|| {
            fmt_err(format!(
                "this pickle is not a CellTypist model: it has no '{k}' entry (expected 'Model', \
                 'Scaler_' and 'description')"
            ))
        })
    };
    let (classifier, m) = attrs(get("Model")?, "Model")?;
    let (_, sc) = attrs(get("Scaler_")?, "Scaler_")?;

    let (cshape, coef) = array_f64(m, "coef_", "Model")?
        .ok_or_else(|| fmt_err("the classifier has no coef_: it was never fitted"))?;
    let (n_rows, n_feat) = match cshape[..] {
        [r, f] => (r, f),
        [f] => (1, f),
        _ => return Err(fmt_err("Model.coef_ must be a matrix")),
    };
    let intercept = match array_f64(m, "intercept_", "Model")? {
        Some((_, x)) => x,
        None => match m.get("intercept_").and_then(numpy::scalar_f64) {
            Some(x) => vec![x],
            None => vec![0.0; n_rows],
        },
    };
    if intercept.len() != n_rows {
        return Err(fmt_err(format!(
            "Model.intercept_ has {} values for {n_rows} rows of coef_",
            intercept.len()
        )));
    }
    let strings = |key: &str, obj: &Value, what: &str| -> ScResult<Vec<String>> {
        let v = obj
            .get(key)
            .ok_or_else(|| fmt_err(format!("{what} has no '{key}'")))?;
        let a = numpy::ndarray(v)?;
        if let Some(s) = a.to_strings() {
            return Ok(s);
        }
        // integer class labels: keep their text
        a.to_i64()
            .map(|v| v.iter().map(|i| i.to_string()).collect())
            .ok_or_else(|| fmt_err(format!("{what}.{key} is not an array of strings")))
    };
    let classes = strings("classes_", m, "Model")?;
    let features = strings("features", m, "Model (a CellTypist model adds 'features')")?;
    let expected_rows = if classes.len() == 2 { 1 } else { classes.len() };
    if n_rows != expected_rows && n_rows != classes.len() {
        return Err(fmt_err(format!(
            "Model.coef_ has {n_rows} rows for {} classes",
            classes.len()
        )));
    }
    if features.len() != n_feat {
        return Err(fmt_err(format!(
            "the model has {} features but coef_ has {n_feat} columns",
            features.len()
        )));
    }
    let with_mean = sc.get("with_mean").and_then(Value::as_bool).unwrap_or(true);
    let scaler_mean = array_f64(sc, "mean_", "Scaler_")?
        .map(|x| x.1)
        .unwrap_or_else(|| vec![0.0; n_feat]);
    let scaler_scale = array_f64(sc, "scale_", "Scaler_")?
        .map(|x| x.1)
        .unwrap_or_else(|| vec![1.0; n_feat]);
    if scaler_mean.len() != n_feat || scaler_scale.len() != n_feat {
        return Err(fmt_err(format!(
            "the scaler has {} means and {} scales for {n_feat} features",
            scaler_mean.len(),
            scaler_scale.len()
        )));
    }
    // C-order (rows x features) -> gene-major
    let mut coef_gm = vec![0.0; coef.len()];
    for k in 0..n_rows {
        for f in 0..n_feat {
            coef_gm[f * n_rows + k] = coef[k * n_feat + f];
        }
    }
    let description = match top.get("description") {
        Some(Value::Dict(d)) => d
            .iter()
            .filter_map(|(k, v)| {
                let k = k.as_str()?.to_string();
                let v = match v {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    Value::Float(f) => f.to_string(),
                    Value::Bool(b) => if *b { "True" } else { "False" }.into(),
                    Value::None => "None".into(),
                    other => numpy::scalar_f64(other)
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| other.describe()),
                };
                Some((k, v))
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(CelltypistModel {
        classifier: classifier.to_string(),
        classes,
        features,
        n_rows,
        coef: coef_gm,
        intercept,
        scaler_mean,
        scaler_scale,
        with_mean,
        description,
        sklearn_version: m
            .get("_sklearn_version")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// anndata's `make_index_unique` (what `var_names_make_unique` applies): later copies of a
/// name become `name-1`, `name-2`, ..., skipping names that already exist.
pub fn make_unique(names: &[String]) -> Vec<String> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(names.len());
    let dup: Vec<bool> = names.iter().map(|n| !seen.insert(n.as_str())).collect();
    if !dup.iter().any(|&d| d) {
        return names.to_vec();
    }
    let mut values: HashSet<String> = names.iter().cloned().collect();
    let mut counter: HashMap<&str, usize> = HashMap::new();
    let mut out = names.to_vec();
    for (i, n) in names.iter().enumerate() {
        if !dup[i] {
            continue;
        }
        loop {
            let c = counter.entry(n.as_str()).or_insert(0);
            *c += 1;
            let t = format!("{n}-{c}");
            if values.insert(t.clone()) {
                out[i] = t;
                break;
            }
        }
    }
    out
}

/// CellTypist's gene matching: the query genes (made unique first) that are model features,
/// in query order, as `(query row, model feature index)`. Exact, case-sensitive.
pub fn match_features(query: &[String], features: &[String]) -> ScResult<Vec<(usize, usize)>> {
    let mut idx: HashMap<&str, usize> = HashMap::with_capacity(features.len());
    for (i, f) in features.iter().enumerate() {
        idx.entry(f.as_str()).or_insert(i);
    }
    let kept: Vec<(usize, usize)> = make_unique(query)
        .iter()
        .enumerate()
        .filter_map(|(r, g)| idx.get(g.as_str()).map(|&m| (r, m)))
        .collect();
    if kept.is_empty() {
        return Err(ScError::Input(
            "no gene of the data is a feature of the model; the data needs gene symbols as \
             row names, as the model uses (e.g. 'CD3D', 'MS4A1')"
                .into(),
        ));
    }
    Ok(kept)
}

/// CellTypist's input check: the first 1000 cells must lie in `[0, 9.22]` (log1p of counts
/// per 10k). Returns `Σ expm1(x)` of the first cell (CellTypist warns when it is not 1e4 ± 1).
pub fn check_log1p_cp10k(m: &ExprMatrix) -> ScResult<f64> {
    let n = m.ncol().min(1000);
    let (mut lo, mut hi, mut nan) = (f64::INFINITY, f64::NEG_INFINITY, false);
    let mut visit = |v: f64| {
        nan |= v.is_nan();
        lo = lo.min(v);
        hi = hi.max(v);
    };
    let mut first = 0.0;
    match m {
        ExprMatrix::Csc(c) => {
            for j in 0..n {
                c.col(j).1.iter().for_each(|&v| visit(v));
            }
            if c.ncol() > 0 {
                first = c.col(0).1.iter().map(|&v| v.exp_m1()).sum();
            }
        }
        ExprMatrix::Dense(d) => {
            for j in 0..n {
                d.col(j).iter().for_each(|&v| visit(v));
            }
            if d.ncol() > 0 {
                first = d.col(0).iter().map(|&v| v.exp_m1()).sum();
            }
        }
    }
    if nan || lo < 0.0 || hi > 9.22 {
        return Err(ScError::Value(format!(
            "CellTypist expects log1p-normalised expression to 10,000 counts per cell \
             (values in [0, 9.22]), but the first {n} cells range from {lo} to {hi}{}. \
             Normalise the raw counts first, e.g. normalize_counts() (or Seurat's NormalizeData \
             with the default LogNormalize and scale.factor = 1e4), or pass the counts with \
             `normalize = TRUE`.",
            if nan { " and contain NaN" } else { "" }
        )));
    }
    Ok(first)
}

/// A CellTypist model as borrowed arrays (what [`predict`] needs).
#[derive(Debug, Clone, Copy)]
pub struct ModelView<'a> {
    /// Number of classes (2 for a binary model with one coef row).
    pub n_classes: usize,
    /// Rows of coef: `n_classes`, or 1 for a binary model.
    pub n_rows: usize,
    /// Gene-major coef: `coef[f * n_rows + k]`.
    pub coef: &'a [f64],
    pub intercept: &'a [f64],
    pub mean: &'a [f64],
    pub scale: &'a [f64],
    pub with_mean: bool,
}

impl ModelView<'_> {
    fn n_features(&self) -> usize {
        self.mean.len()
    }

    fn validate(&self) -> ScResult<()> {
        let f = self.n_features();
        let ok = (self.n_rows == self.n_classes || (self.n_rows == 1 && self.n_classes == 2))
            && self.n_rows > 0
            && self.coef.len() == f * self.n_rows
            && self.intercept.len() == self.n_rows
            && self.scale.len() == f;
        if ok {
            Ok(())
        } else {
            Err(ScError::Dims(
                "the CellTypist model's arrays disagree in size (coef, intercept, scaler, \
                 classes); reload it with load_celltypist_model()"
                    .into(),
            ))
        }
    }
}

/// Decision scores and probabilities, cells x classes, column-major (as R matrices).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub n_cells: usize,
    pub n_classes: usize,
    pub decision: Vec<f64>,
    pub probability: Vec<f64>,
    /// 'best match': index of the largest decision score (first on ties).
    pub best: Vec<usize>,
}

const CLIP: f64 = 10.0;

#[inline]
fn scaled(v: f64, mean: f64, scale: f64) -> f64 {
    let z = (v - mean) / scale;
    if z > CLIP {
        CLIP
    } else {
        z
    }
}

/// scipy's `expit`.
#[inline]
pub fn expit(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// CellTypist's prediction on a genes x cells matrix; `kept` from [`match_features`].
pub fn predict(m: &ExprMatrix, kept: &[(usize, usize)], model: &ModelView) -> ScResult<Prediction> {
    model.validate()?;
    let nf = model.n_features();
    let nrow = m.nrow();
    if kept.iter().any(|&(r, f)| r >= nrow || f >= nf) {
        return Err(ScError::Dims(
            "matched gene indices are out of range".into(),
        ));
    }
    let r = model.n_rows;
    let mean = |f: usize| if model.with_mean { model.mean[f] } else { 0.0 };
    let n = m.ncol();
    // per-cell rows of raw scores (n_rows wide)
    let mut rows = vec![0.0; n * r];
    match m {
        ExprMatrix::Csc(c) => {
            // score of a cell whose kept genes are all zero, Neumaier-compensated
            let z0: Vec<f64> = kept
                .iter()
                .map(|&(_, f)| scaled(0.0, mean(f), model.scale[f]))
                .collect();
            let mut base = model.intercept.to_vec();
            let mut comp = vec![0.0; r];
            for (&(_, f), &z) in kept.iter().zip(&z0) {
                let w = &model.coef[f * r..(f + 1) * r];
                for k in 0..r {
                    let t = z * w[k];
                    let s = base[k] + t;
                    comp[k] += if base[k].abs() >= t.abs() {
                        (base[k] - s) + t
                    } else {
                        (t - s) + base[k]
                    };
                    base[k] = s;
                }
            }
            for k in 0..r {
                base[k] += comp[k];
            }
            // row -> position in kept
            let mut pos = vec![u32::MAX; nrow];
            for (q, &(row, _)) in kept.iter().enumerate() {
                pos[row] = q as u32;
            }
            // row indices are bounds-checked here instead of a separate pass over `i`
            let bad_row = std::sync::atomic::AtomicBool::new(false);
            rows.par_chunks_mut(r).enumerate().for_each(|(j, acc)| {
                acc.copy_from_slice(&base);
                let (is, xs) = c.col(j);
                for (&i, &v) in is.iter().zip(xs) {
                    let q = match pos.get(i as usize) {
                        Some(&q) => q,
                        None => {
                            bad_row.store(true, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                    };
                    if q == u32::MAX {
                        continue;
                    }
                    let f = kept[q as usize].1;
                    let d = scaled(v, mean(f), model.scale[f]) - z0[q as usize];
                    if d != 0.0 {
                        let w = &model.coef[f * r..(f + 1) * r];
                        for k in 0..r {
                            acc[k] += d * w[k];
                        }
                    }
                }
            });
            if bad_row.into_inner() {
                return Err(ScError::Dims(format!(
                    "sparse matrix row indices must lie in 0..{nrow}; rebuild the matrix with \
                     Matrix::sparseMatrix()"
                )));
            }
        }
        ExprMatrix::Dense(d) => {
            rows.par_chunks_mut(r).enumerate().for_each(|(j, acc)| {
                acc.copy_from_slice(model.intercept);
                let col = d.col(j);
                for &(row, f) in kept {
                    let z = scaled(col[row], mean(f), model.scale[f]);
                    let w = &model.coef[f * r..(f + 1) * r];
                    for k in 0..r {
                        acc[k] += z * w[k];
                    }
                }
            });
        }
    }
    let kc = model.n_classes;
    let mut decision = vec![0.0; n * kc];
    let mut best = vec![0usize; n];
    for j in 0..n {
        let row = &rows[j * r..(j + 1) * r];
        if r == 1 && kc == 2 {
            decision[j] = -row[0];
            decision[n + j] = row[0];
        } else {
            for k in 0..kc {
                decision[k * n + j] = row[k];
            }
        }
        let mut b = 0;
        for k in 1..kc {
            if decision[k * n + j] > decision[b * n + j] {
                b = k;
            }
        }
        best[j] = b;
    }
    let probability = decision.par_iter().map(|&x| expit(x)).collect();
    Ok(Prediction {
        n_cells: n,
        n_classes: kc,
        decision,
        probability,
        best,
    })
}

/// 'prob match' labels: the classes with probability `> p_thres`, joined by `|` in class
/// order, or `Unassigned`.
pub fn prob_match_labels(p: &Prediction, classes: &[String], p_thres: f64) -> Vec<String> {
    let n = p.n_cells;
    (0..n)
        .map(|j| {
            let hits: Vec<&str> = (0..p.n_classes)
                .filter(|&k| p.probability[k * n + j] > p_thres)
                .map(|k| classes[k].as_str())
                .collect();
            if hits.is_empty() {
                "Unassigned".to_string()
            } else {
                hits.join("|")
            }
        })
        .collect()
}

/// CellTypist's majority vote. `labels[i]` indexes `label_names`, `clusters[i]` is a cluster
/// code `< n_clusters`. Returns one label per cluster (`None` for a cluster without cells):
/// the most frequent label, ties to the one that sorts first (by code point, as Python), and
/// `Heterogeneous` when its share is `< min_prop`.
pub fn majority_vote(
    labels: &[usize],
    label_names: &[String],
    clusters: &[usize],
    n_clusters: usize,
    min_prop: f64,
) -> ScResult<Vec<Option<String>>> {
    if labels.len() != clusters.len() {
        return Err(ScError::Dims(format!(
            "{} predicted labels but {} over-clustering labels",
            labels.len(),
            clusters.len()
        )));
    }
    let nl = label_names.len();
    if labels.iter().any(|&l| l >= nl) || clusters.iter().any(|&c| c >= n_clusters) {
        return Err(ScError::Input("label or cluster code out of range".into()));
    }
    // rank of each label in sorted order
    let mut order: Vec<usize> = (0..nl).collect();
    order.sort_by(|&a, &b| label_names[a].cmp(&label_names[b]));
    let mut counts = vec![0usize; n_clusters * nl];
    for (&l, &c) in labels.iter().zip(clusters) {
        counts[c * nl + l] += 1;
    }
    Ok((0..n_clusters)
        .map(|c| {
            let row = &counts[c * nl..(c + 1) * nl];
            let size: usize = row.iter().sum();
            if size == 0 {
                return None;
            }
            let mut best = order[0];
            for &l in &order[1..] {
                if row[l] > row[best] {
                    best = l;
                }
            }
            let freq = row[best] as f64 / size as f64;
            Some(if freq < min_prop {
                "Heterogeneous".to_string()
            } else {
                label_names[best].clone()
            })
        })
        .collect())
}

#[cfg(test)]
mod tests;
