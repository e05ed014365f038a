//! The scVI encoder in eval mode: the latent mean `qz.loc` (and variance) exactly as
//! scvi-tools' `get_latent_representation()` computes it.
//!
//! Per cell: `log1p(x)` (if `log_variational`) → [continuous covariates if
//! `encode_covariates`] → FCLayers (each layer: Linear on `[h, onehot(batch), onehot(cat_1)...]`
//! (covariates at layer 0 always, at later layers only with `deeply_inject_covariates`),
//! BatchNorm1d with running statistics (eps 1e-3), LayerNorm without affine (eps 1e-5), ReLU;
//! dropout is off in eval) → `mean_encoder` (latent mean) and `exp(var_encoder) + 1e-4`.
//! Categorical covariates with at most one category have no one-hot columns. The default SCVI
//! (`encode_covariates = False`) encoder sees no covariate at all.
//!
//! Computation is in f64 from the f32 weights; the first layer walks only the non-zero counts,
//! and cells are processed in parallel blocks (rayon; use [`crate::threads::with_threads`]).

use super::model_file::{ScviModelFile, Tensor};
use crate::error::{ScError, ScResult};
use crate::matrix::ExprMatrix;
use rayon::prelude::*;

const BN_EPS: f64 = 1e-3;
const LN_EPS: f64 = 1e-5;
const VAR_EPS: f64 = 1e-4;

/// A Linear layer stored transposed (`in x out`, row-major) so that one input feature adds a
/// contiguous row to the output.
#[derive(Debug, Clone)]
struct Linear {
    n_in: usize,
    n_out: usize,
    wt: Vec<f64>,
    b: Vec<f64>,
}

impl Linear {
    fn from_tensors(w: &Tensor, b: &Tensor, name: &str) -> ScResult<Self> {
        let (n_out, n_in) = match w.shape[..] {
            [o, i] => (o, i),
            _ => {
                return Err(ScError::Dims(format!(
                    "{name}.weight has shape {:?}; a Linear weight is 2-D",
                    w.shape
                )))
            }
        };
        if b.shape != [n_out] {
            return Err(ScError::Dims(format!(
                "{name}.bias has shape {:?}, expected [{n_out}]",
                b.shape
            )));
        }
        let wv = w.to_f64().ok_or_else(|| not_float(name))?;
        let mut wt = vec![0.0; n_in * n_out];
        for o in 0..n_out {
            for i in 0..n_in {
                wt[i * n_out + o] = wv[o * n_in + i];
            }
        }
        Ok(Linear {
            n_in,
            n_out,
            wt,
            b: b.to_f64().ok_or_else(|| not_float(name))?,
        })
    }

    #[inline]
    fn row(&self, i: usize) -> &[f64] {
        &self.wt[i * self.n_out..(i + 1) * self.n_out]
    }

    /// `out = b + W x` for a dense input.
    fn apply(&self, x: &[f64], out: &mut [f64]) {
        out.copy_from_slice(&self.b);
        for (i, &xi) in x.iter().enumerate() {
            if xi != 0.0 {
                axpy(out, xi, self.row(i));
            }
        }
    }
}

#[inline]
fn axpy(out: &mut [f64], a: f64, row: &[f64]) {
    for (o, r) in out.iter_mut().zip(row) {
        *o += a * r;
    }
}

fn not_float(name: &str) -> ScError {
    ScError::Format(format!("{name} is not a floating-point tensor"))
}

/// BatchNorm1d in eval mode folded into `x * scale + shift`.
#[derive(Debug, Clone)]
struct BatchNorm {
    scale: Vec<f64>,
    shift: Vec<f64>,
}

#[derive(Debug, Clone)]
struct FcLayer {
    linear: Linear,
    batch_norm: Option<BatchNorm>,
    layer_norm: bool,
    /// whether the one-hot covariates are appended to this layer's input
    takes_covariates: bool,
}

/// The scVI `z_encoder`, ready to run.
#[derive(Debug, Clone)]
pub struct ScviEncoder {
    n_genes: usize,
    log_variational: bool,
    /// continuous covariates appended to the input (encode_covariates only)
    n_cont: usize,
    /// one-hot widths in input order: batch then the extra categorical covariates;
    /// 0 for covariates with at most one category (no columns) or not encoded
    cat_widths: Vec<usize>,
    layers: Vec<FcLayer>,
    mean: Linear,
    var: Linear,
}

/// Covariates of the cells, in the model's codes.
#[derive(Debug, Clone, Default)]
pub struct Covariates<'a> {
    /// Batch code (index into the model's batch categories) per cell.
    pub batch: Option<&'a [u32]>,
    /// One code vector per extra categorical covariate, in the model's order.
    pub categorical: Vec<&'a [u32]>,
    /// One value vector per extra continuous covariate, in the model's order.
    pub continuous: Vec<&'a [f64]>,
}

/// Latent mean and variance, cells x latent, column-major (R's layout).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentOutput {
    pub n_cells: usize,
    pub n_latent: usize,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl ScviEncoder {
    /// Build the encoder of a saved SCVI model; refuses variants it cannot reproduce exactly.
    pub fn from_model(m: &ScviModelFile) -> ScResult<Self> {
        let p = &m.init;
        if let Some(name) = &m.model_name {
            if name != "SCVI" && name != "SCANVI" {
                return Err(ScError::Input(format!(
                    "the model is a {name}; only SCVI (and SCANVI) encoders are supported"
                )));
            }
        }
        if p.latent_distribution != "normal" {
            return Err(ScError::Input(format!(
                "the model uses latent_distribution = '{}'; only 'normal' is supported (the \
                 'ln' latent is a Monte Carlo estimate scvi-tools itself does not reproduce)",
                p.latent_distribution
            )));
        }
        if p.batch_representation != "one-hot" {
            return Err(ScError::Input(format!(
                "the model uses batch_representation = '{}'; only 'one-hot' is supported",
                p.batch_representation
            )));
        }
        let bn = matches!(p.use_batch_norm.as_str(), "both" | "encoder");
        let ln = matches!(p.use_layer_norm.as_str(), "both" | "encoder");
        let n_genes = m.var_names.len();
        let (n_cont, cat_widths) = if p.encode_covariates {
            let mut w = vec![m.n_batch];
            w.extend(m.extra_categorical.iter().map(|(_, c)| c.len()));
            (
                m.extra_continuous.len(),
                w.into_iter().map(|n| if n > 1 { n } else { 0 }).collect(),
            )
        } else {
            (0, Vec::new())
        };
        let n_cov: usize = cat_widths.iter().sum();

        let get = |k: &str| -> ScResult<&Tensor> {
            m.tensor(k).ok_or_else(|| {
                ScError::Format(format!(
                    "the state dict has no '{k}'; the model is not a scvi-tools VAE this reader \
                     knows"
                ))
            })
        };
        let mut layers = Vec::new();
        for i in 0.. {
            let base = format!("z_encoder.encoder.fc_layers.Layer {i}");
            if m.tensor(&format!("{base}.0.weight")).is_none() {
                break;
            }
            let linear = Linear::from_tensors(
                get(&format!("{base}.0.weight"))?,
                get(&format!("{base}.0.bias"))?,
                &format!("{base}.0"),
            )?;
            let takes_covariates = i == 0 || p.deeply_inject_covariates;
            let n_prev = if i == 0 {
                n_genes + n_cont
            } else {
                layers.last().map_or(0, |l: &FcLayer| l.linear.n_out)
            };
            let expect = n_prev + if takes_covariates { n_cov } else { 0 };
            if linear.n_in != expect {
                return Err(ScError::Dims(format!(
                    "{base}.0.weight takes {} inputs but the model description implies {expect} \
                     ({n_prev} features + {} covariate columns); the attr_dict and the weights \
                     disagree",
                    linear.n_in,
                    if takes_covariates { n_cov } else { 0 }
                )));
            }
            let batch_norm = if bn {
                let f = |s: &str| -> ScResult<Vec<f64>> {
                    let k = format!("{base}.1.{s}");
                    let t = get(&k)?;
                    if t.shape != [linear.n_out] {
                        return Err(ScError::Dims(format!(
                            "{k} has shape {:?}, expected [{}]",
                            t.shape, linear.n_out
                        )));
                    }
                    t.to_f64().ok_or_else(|| not_float(&k))
                };
                let (w, b, rm, rv) = (
                    f("weight")?,
                    f("bias")?,
                    f("running_mean")?,
                    f("running_var")?,
                );
                let scale: Vec<f64> = w
                    .iter()
                    .zip(&rv)
                    .map(|(w, v)| w / (v + BN_EPS).sqrt())
                    .collect();
                let shift = b
                    .iter()
                    .zip(&rm)
                    .zip(&scale)
                    .map(|((b, m), s)| b - m * s)
                    .collect();
                Some(BatchNorm { scale, shift })
            } else {
                None
            };
            layers.push(FcLayer {
                linear,
                batch_norm,
                layer_norm: ln,
                takes_covariates,
            });
        }
        if layers.len() != p.n_layers {
            return Err(ScError::Format(format!(
                "the state dict has {} encoder layers but init_params_ says n_layers = {}",
                layers.len(),
                p.n_layers
            )));
        }
        let h = layers.last().map_or(0, |l| l.linear.n_out);
        let mean = Linear::from_tensors(
            get("z_encoder.mean_encoder.weight")?,
            get("z_encoder.mean_encoder.bias")?,
            "z_encoder.mean_encoder",
        )?;
        let var = Linear::from_tensors(
            get("z_encoder.var_encoder.weight")?,
            get("z_encoder.var_encoder.bias")?,
            "z_encoder.var_encoder",
        )?;
        if mean.n_in != h || var.n_in != h || var.n_out != mean.n_out {
            return Err(ScError::Dims(format!(
                "the latent layers take {} / {} inputs but the last hidden layer has {h}",
                mean.n_in, var.n_in
            )));
        }
        Ok(ScviEncoder {
            n_genes,
            log_variational: p.log_variational,
            n_cont,
            cat_widths,
            layers,
            mean,
            var,
        })
    }

    pub fn n_genes(&self) -> usize {
        self.n_genes
    }

    pub fn n_latent(&self) -> usize {
        self.mean.n_out
    }

    /// True when the latent depends on the batch (and other covariates).
    pub fn uses_covariates(&self) -> bool {
        self.n_cont > 0 || self.cat_widths.iter().any(|&w| w > 0)
    }

    /// Latent mean and variance of each cell. `counts` are raw counts, genes (rows, in the
    /// model's gene order) x cells.
    pub fn latent(&self, counts: &ExprMatrix, cov: &Covariates) -> ScResult<LatentOutput> {
        self.latent_blocked(counts, cov, 64)
    }

    /// [`Self::latent`] with `block` cells per parallel work unit (scvi-tools' `batch_size`;
    /// the result does not depend on it).
    pub fn latent_blocked(
        &self,
        counts: &ExprMatrix,
        cov: &Covariates,
        block: usize,
    ) -> ScResult<LatentOutput> {
        let block = block.max(1);
        let n_cells = counts.ncol();
        if counts.nrow() != self.n_genes {
            return Err(ScError::Dims(format!(
                "the counts have {} genes but the model has {}; align the genes to the model \
                 first (same genes, same order)",
                counts.nrow(),
                self.n_genes
            )));
        }
        let invalid = |v: &&f64| !v.is_finite() || **v < 0.0;
        let bad = match counts {
            ExprMatrix::Csc(m) => m.x().iter().find(invalid).copied(),
            ExprMatrix::Dense(m) => {
                (0..n_cells).find_map(|j| m.col(j).iter().find(invalid).copied())
            }
        };
        if let Some(v) = bad {
            return Err(ScError::Value(format!(
                "counts must be finite and non-negative, found {v}; scVI takes raw counts"
            )));
        }
        // covariates: only those the encoder uses are required
        let mut codes: Vec<Option<&[u32]>> = Vec::new();
        if !self.cat_widths.is_empty() {
            codes.push(cov.batch);
            for k in 0..self.cat_widths.len() - 1 {
                codes.push(cov.categorical.get(k).copied());
            }
        }
        for (k, (&w, c)) in self.cat_widths.iter().zip(&codes).enumerate() {
            if w == 0 {
                continue;
            }
            let what = if k == 0 {
                "batch".to_string()
            } else {
                format!("categorical covariate {k}")
            };
            let c = c.ok_or_else(|| {
                ScError::Input(format!(
                    "the model encodes covariates (encode_covariates = True): give the {what} \
                     of every cell"
                ))
            })?;
            if c.len() != n_cells {
                return Err(ScError::Dims(format!(
                    "{} {what} codes for {n_cells} cells",
                    c.len()
                )));
            }
            if let Some(bad) = c.iter().find(|&&x| x as usize >= w) {
                return Err(ScError::Input(format!(
                    "{what} code {bad} is outside the model's {w} categories; map new levels \
                     by query training (scArches) first"
                )));
            }
        }
        if cov.continuous.len() < self.n_cont {
            return Err(ScError::Input(format!(
                "the model encodes {} continuous covariate(s); {} given",
                self.n_cont,
                cov.continuous.len()
            )));
        }
        for c in &cov.continuous[..self.n_cont] {
            if c.len() != n_cells {
                return Err(ScError::Dims(format!(
                    "{} continuous covariate values for {n_cells} cells",
                    c.len()
                )));
            }
        }

        let nl = self.n_latent();
        // per cell: latent mean then var
        let mut per_cell = vec![0.0f64; n_cells * 2 * nl];
        per_cell
            .par_chunks_mut(block * 2 * nl)
            .enumerate()
            .for_each(|(blk, out)| {
                let max_h = self
                    .layers
                    .iter()
                    .map(|l| l.linear.n_out)
                    .max()
                    .unwrap_or(0);
                let mut h = vec![0.0; max_h];
                let mut h2 = vec![0.0; max_h];
                for (k, o) in out.chunks_mut(2 * nl).enumerate() {
                    let j = blk * block + k;
                    self.cell(counts, j, cov, &codes, &mut h, &mut h2, o);
                }
            });
        let mut mean = vec![0.0; n_cells * nl];
        let mut var = vec![0.0; n_cells * nl];
        for j in 0..n_cells {
            for l in 0..nl {
                mean[l * n_cells + j] = per_cell[j * 2 * nl + l];
                var[l * n_cells + j] = per_cell[j * 2 * nl + nl + l];
            }
        }
        Ok(LatentOutput {
            n_cells,
            n_latent: nl,
            mean,
            var,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn cell(
        &self,
        counts: &ExprMatrix,
        j: usize,
        cov: &Covariates,
        codes: &[Option<&[u32]>],
        h: &mut Vec<f64>,
        h2: &mut Vec<f64>,
        out: &mut [f64],
    ) {
        let tr = |v: f64| if self.log_variational { v.ln_1p() } else { v };
        for (li, layer) in self.layers.iter().enumerate() {
            let lin = &layer.linear;
            let y = &mut h2[..lin.n_out];
            y.copy_from_slice(&lin.b);
            let n_feat = if li == 0 {
                match counts {
                    ExprMatrix::Csc(m) => {
                        let (rows, xs) = m.col(j);
                        for (&g, &v) in rows.iter().zip(xs) {
                            if v != 0.0 {
                                axpy(y, tr(v), lin.row(g as usize));
                            }
                        }
                    }
                    ExprMatrix::Dense(m) => {
                        for (g, &v) in m.col(j).iter().enumerate() {
                            if v != 0.0 {
                                axpy(y, tr(v), lin.row(g));
                            }
                        }
                    }
                }
                for (c, vals) in cov.continuous[..self.n_cont].iter().enumerate() {
                    axpy(y, vals[j], lin.row(self.n_genes + c));
                }
                self.n_genes + self.n_cont
            } else {
                let x = &h[..self.layers[li - 1].linear.n_out];
                for (i, &xi) in x.iter().enumerate() {
                    if xi != 0.0 {
                        axpy(y, xi, lin.row(i));
                    }
                }
                x.len()
            };
            if layer.takes_covariates {
                let mut off = n_feat;
                for (&w, c) in self.cat_widths.iter().zip(codes) {
                    if w == 0 {
                        continue;
                    }
                    if let Some(c) = c {
                        axpy(y, 1.0, lin.row(off + c[j] as usize));
                    }
                    off += w;
                }
            }
            if let Some(bn) = &layer.batch_norm {
                for ((v, s), t) in y.iter_mut().zip(&bn.scale).zip(&bn.shift) {
                    *v = *v * s + t;
                }
            }
            if layer.layer_norm {
                let n = y.len() as f64;
                let mu = y.iter().sum::<f64>() / n;
                let var = y.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
                let inv = 1.0 / (var + LN_EPS).sqrt();
                for v in y.iter_mut() {
                    *v = (*v - mu) * inv;
                }
            }
            for v in y.iter_mut() {
                *v = v.max(0.0);
            }
            std::mem::swap(h, h2);
        }
        let last = &h[..self.mean.n_in];
        let nl = self.mean.n_out;
        let (m, v) = out.split_at_mut(nl);
        self.mean.apply(last, m);
        self.var.apply(last, v);
        for x in v.iter_mut() {
            *x = x.exp() + VAR_EPS;
        }
    }
}
