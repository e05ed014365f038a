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
/// counts below this (whole numbers) take their transform from a table
const LOG_TABLE: usize = 4096;
/// outputs per weight panel of the blocked first layer (the register block of the kernel)
pub(crate) const PANEL: usize = 32;
/// genes per chunk of the blocked first layer: a panel chunk is 1024 x 32 f32 = 128 KiB
const GENE_CHUNK: usize = 1024;

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
    /// `linear.wt` in f32 for the hot loop (f32 as in torch; sums accumulate in f32)
    wt32: Vec<f32>,
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
    /// `log1p(k)` (or `k` without log_variational) for whole counts `k < LOG_TABLE`
    log_table: Vec<f32>,
    /// the first layer's gene rows cut into panels of [`PANEL`] outputs (`[panel][gene][k]`),
    /// when its width is a multiple of [`PANEL`]: blocks of cells then reuse a cache-sized
    /// piece of the weights (empty otherwise)
    panels0: Vec<f32>,
    mean: Linear,
    var: Linear,
}

/// The first `n_genes` rows of a transposed weight (`rows x n_out`, row-major) cut into
/// panels of [`PANEL`] columns, `[panel][gene][k]`; empty if `n_out` is not a multiple of
/// [`PANEL`].
pub(crate) fn panels(wt: &[f32], n_genes: usize, n_out: usize) -> Vec<f32> {
    if n_out == 0 || n_out % PANEL != 0 {
        return Vec::new();
    }
    let mut v = Vec::with_capacity(n_genes * n_out);
    for p0 in (0..n_out).step_by(PANEL) {
        for g in 0..n_genes {
            v.extend_from_slice(&wt[g * n_out + p0..g * n_out + p0 + PANEL]);
        }
    }
    v
}

/// Per-thread scratch of [`ScviEncoder::cell`].
struct Scratch {
    h: Vec<f64>,
    h2: Vec<f64>,
    acc: Vec<f32>,
    nz: Vec<(u32, f32)>,
}

/// `y += sum_k v_k * w[g_k, :]` over the non-zeros `(g_k, v_k)`, `w` row-major with rows of
/// `y.len()`. Register-blocked: 32 outputs at a time stay in registers while the non-zeros
/// stream by, so only the weight rows are loaded.
#[inline(always)]
fn sparse_rows_body<const FUSED: bool>(y: &mut [f32], w: &[f32], nz: &[(u32, f32)]) {
    const C: usize = 32;
    let n = y.len();
    let mut c0 = 0;
    while c0 + C <= n {
        // two independent accumulator sets (even / odd non-zeros) keep twice as many FMA
        // chains in flight as one would
        let mut acc = [0.0f32; C];
        let mut acc2 = [0.0f32; C];
        let mut pairs = nz.chunks_exact(2);
        for pr in &mut pairs {
            let (g, v) = pr[0];
            let (g2, v2) = pr[1];
            let off = g as usize * n + c0;
            let off2 = g2 as usize * n + c0;
            let row: &[f32; C] = w[off..off + C].try_into().expect("row chunk");
            let row2: &[f32; C] = w[off2..off2 + C].try_into().expect("row chunk");
            for k in 0..C {
                if FUSED {
                    acc[k] = v.mul_add(row[k], acc[k]);
                    acc2[k] = v2.mul_add(row2[k], acc2[k]);
                } else {
                    acc[k] += v * row[k];
                    acc2[k] += v2 * row2[k];
                }
            }
        }
        for &(g, v) in pairs.remainder() {
            let off = g as usize * n + c0;
            let row: &[f32; C] = w[off..off + C].try_into().expect("row chunk");
            for k in 0..C {
                acc[k] = if FUSED {
                    v.mul_add(row[k], acc[k])
                } else {
                    acc[k] + v * row[k]
                };
            }
        }
        for ((o, a), a2) in y[c0..c0 + C].iter_mut().zip(acc).zip(acc2) {
            *o += a + a2;
        }
        c0 += C;
    }
    if c0 < n {
        for &(g, v) in nz {
            let off = g as usize * n;
            for (o, r) in y[c0..].iter_mut().zip(&w[off + c0..off + n]) {
                *o += v * r;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sparse_rows_avx2(y: &mut [f32], w: &[f32], nz: &[(u32, f32)]) {
    sparse_rows_body::<true>(y, w, nz)
}

pub(crate) fn sparse_rows(y: &mut [f32], w: &[f32], nz: &[(u32, f32)]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked just above)
            return unsafe { sparse_rows_avx2(y, w, nz) };
        }
    }
    sparse_rows_body::<false>(y, w, nz)
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
            let wt32 = linear.wt.iter().map(|&v| v as f32).collect();
            layers.push(FcLayer {
                linear,
                batch_norm,
                layer_norm: ln,
                takes_covariates,
                wt32,
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
        let log_table = (0..LOG_TABLE)
            .map(|k| {
                let k = k as f64;
                (if p.log_variational { k.ln_1p() } else { k }) as f32
            })
            .collect();
        let panels0 = layers
            .first()
            .map_or_else(Vec::new, |l| panels(&l.wt32, n_genes, l.linear.n_out));
        Ok(ScviEncoder {
            n_genes,
            log_variational: p.log_variational,
            n_cont,
            cat_widths,
            layers,
            log_table,
            panels0,
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
                let mut s = Scratch {
                    h: vec![0.0; max_h],
                    h2: vec![0.0; max_h],
                    acc: vec![0.0; max_h],
                    nz: Vec::new(),
                };
                let first = blk * block;
                let n_here = out.len() / (2 * nl);
                let pre0 = self.first_layer_block(counts, first, n_here);
                let n0 = self.layers.first().map_or(0, |l| l.linear.n_out);
                for (k, o) in out.chunks_mut(2 * nl).enumerate() {
                    let pre = pre0.as_ref().map(|p| &p[k * n0..(k + 1) * n0]);
                    self.cell(counts, first + k, cov, &codes, &mut s, pre, o);
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

    /// The transformed non-zero counts `(gene, log1p(x))` of cell `j`, appended to `nz`.
    fn cell_nonzeros(&self, counts: &ExprMatrix, j: usize, nz: &mut Vec<(u32, f32)>) {
        let tr = |v: f64| {
            if v < LOG_TABLE as f64 && v.fract() == 0.0 {
                self.log_table[v as usize]
            } else {
                (if self.log_variational { v.ln_1p() } else { v }) as f32
            }
        };
        match counts {
            ExprMatrix::Csc(m) => {
                let (rows, xs) = m.col(j);
                nz.reserve(rows.len());
                for (&g, &v) in rows.iter().zip(xs) {
                    if v != 0.0 {
                        nz.push((g as u32, tr(v)));
                    }
                }
            }
            ExprMatrix::Dense(m) => {
                for (g, &v) in m.col(j).iter().enumerate() {
                    if v != 0.0 {
                        nz.push((g as u32, tr(v)));
                    }
                }
            }
        }
    }

    /// The gene part of the first layer (`sum_g log1p(x_g) W[:, g]`, no bias) of cells
    /// `first..first + n`, cell after cell (`n x n_out`), computed panel by panel over gene
    /// chunks so that each cache-sized piece of the weights serves the whole block. `None`
    /// when the layer width is not a multiple of [`PANEL`] (then [`Self::cell`] does it).
    fn first_layer_block(&self, counts: &ExprMatrix, first: usize, n: usize) -> Option<Vec<f32>> {
        if self.panels0.is_empty() {
            return None;
        }
        let n_out = self.layers[0].linear.n_out;
        let mut nz = Vec::new();
        let mut starts = Vec::with_capacity(n + 1);
        starts.push(0);
        for k in 0..n {
            let a = nz.len();
            self.cell_nonzeros(counts, first + k, &mut nz);
            let cell = &mut nz[a..];
            if !cell.windows(2).all(|w| w[0].0 < w[1].0) {
                cell.sort_unstable_by_key(|e| e.0);
            }
            starts.push(nz.len());
        }
        let mut out = vec![0.0f32; n * n_out];
        let mut cursor = starts[..n].to_vec();
        for g0 in (0..self.n_genes).step_by(GENE_CHUNK) {
            let g1 = (g0 + GENE_CHUNK).min(self.n_genes) as u32;
            // each cell's non-zeros in this chunk
            let ranges: Vec<(usize, usize)> = (0..n)
                .map(|k| {
                    let a = cursor[k];
                    let len = nz[a..starts[k + 1]].partition_point(|e| e.0 < g1);
                    cursor[k] = a + len;
                    (a, a + len)
                })
                .collect();
            for (pi, panel) in self.panels0.chunks_exact(self.n_genes * PANEL).enumerate() {
                for (k, &(a, b)) in ranges.iter().enumerate() {
                    let o = k * n_out + pi * PANEL;
                    sparse_rows(&mut out[o..o + PANEL], panel, &nz[a..b]);
                }
            }
        }
        Some(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn cell(
        &self,
        counts: &ExprMatrix,
        j: usize,
        cov: &Covariates,
        codes: &[Option<&[u32]>],
        s: &mut Scratch,
        pre0: Option<&[f32]>,
        out: &mut [f64],
    ) {
        let Scratch { h, h2, acc, nz } = s;
        for (li, layer) in self.layers.iter().enumerate() {
            let lin = &layer.linear;
            let y = &mut h2[..lin.n_out];
            y.copy_from_slice(&lin.b);
            let n_feat = if li == 0 {
                let a = &mut acc[..lin.n_out];
                match pre0 {
                    Some(p) => a.copy_from_slice(p),
                    None => {
                        nz.clear();
                        self.cell_nonzeros(counts, j, nz);
                        a.fill(0.0);
                        sparse_rows(a, &layer.wt32, nz);
                    }
                }
                for (o, &v) in y.iter_mut().zip(a.iter()) {
                    *o += v as f64;
                }
                for (c, vals) in cov.continuous[..self.n_cont].iter().enumerate() {
                    axpy(y, vals[j], lin.row(self.n_genes + c));
                }
                self.n_genes + self.n_cont
            } else {
                // the previous layer's output after ReLU: about half zeros
                let x = &h[..self.layers[li - 1].linear.n_out];
                nz.clear();
                nz.extend(
                    x.iter()
                        .enumerate()
                        .filter(|(_, &v)| v != 0.0)
                        .map(|(i, &v)| (i as u32, v as f32)),
                );
                let a = &mut acc[..lin.n_out];
                a.fill(0.0);
                sparse_rows(a, &layer.wt32, nz);
                for (o, &v) in y.iter_mut().zip(a.iter()) {
                    *o += v as f64;
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

#[cfg(test)]
mod kernel_tests {
    use super::*;
    use crate::matrix::{CscOwned, DenseView};

    /// A one-layer encoder with given weights (no norms, no covariates).
    fn toy_encoder(n_genes: usize, n_out: usize) -> ScviEncoder {
        let wt: Vec<f64> = (0..n_genes * n_out)
            .map(|k| ((k * 7919 % 2003) as f64 - 1001.0) / 3001.0)
            .collect();
        let wt32: Vec<f32> = wt.iter().map(|&v| v as f32).collect();
        let lin = |n_in: usize, n_out: usize| Linear {
            n_in,
            n_out,
            wt: vec![0.01; n_in * n_out],
            b: vec![0.0; n_out],
        };
        let layer = FcLayer {
            linear: Linear {
                n_in: n_genes,
                n_out,
                wt,
                b: vec![0.1; n_out],
            },
            batch_norm: None,
            layer_norm: false,
            takes_covariates: true,
            wt32: wt32.clone(),
        };
        ScviEncoder {
            n_genes,
            log_variational: true,
            n_cont: 0,
            cat_widths: Vec::new(),
            layers: vec![layer],
            log_table: (0..LOG_TABLE).map(|k| (k as f64).ln_1p() as f32).collect(),
            panels0: panels(&wt32, n_genes, n_out),
            mean: lin(n_out, 3),
            var: lin(n_out, 3),
        }
    }

    /// The blocked first layer (panels x gene chunks over a block of cells) equals the
    /// per-cell kernel, for sparse and dense input, genes spanning several chunks, and
    /// non-integer counts (outside the log table).
    #[test]
    fn blocked_first_layer_equals_per_cell() {
        let (n_genes, n_cells) = (2 * GENE_CHUNK + 77, 23);
        let mut dense = vec![0.0f64; n_genes * n_cells];
        for (k, v) in dense.iter_mut().enumerate() {
            let r = (k * 2654435761usize) % 1000;
            if r < 250 {
                *v = (r % 13) as f64 + if r % 50 == 0 { 0.5 } else { 0.0 } + 1.0;
            }
        }
        dense[5] = 5000.0; // beyond the table
        let csc = CscOwned::from_dense(n_genes, n_cells, &dense);
        for n_out in [32usize, 128] {
            let enc = toy_encoder(n_genes, n_out);
            assert!(!enc.panels0.is_empty());
            for x in [
                ExprMatrix::Csc(csc.view()),
                ExprMatrix::Dense(DenseView::new(n_genes, n_cells, &dense).unwrap()),
            ] {
                let (first, n) = (3, 17);
                let got = enc.first_layer_block(&x, first, n).unwrap();
                for k in 0..n {
                    let mut nz = Vec::new();
                    enc.cell_nonzeros(&x, first + k, &mut nz);
                    let mut want = vec![0.0f32; n_out];
                    sparse_rows(&mut want, &enc.layers[0].wt32, &nz);
                    for (a, b) in got[k * n_out..(k + 1) * n_out].iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
            // the whole latent is the same with blocks of any size
            let x = ExprMatrix::Csc(csc.view());
            let a = enc.latent_blocked(&x, &Covariates::default(), 1).unwrap();
            let b = enc.latent_blocked(&x, &Covariates::default(), 64).unwrap();
            for (u, v) in a.mean.iter().zip(&b.mean) {
                assert!((u - v).abs() < 1e-5);
            }
        }
        assert!(panels(&[0.0; 40], 1, 40).is_empty());
    }

    /// The register-blocked first-layer kernel (SIMD and plain) against a plain f64 sum, for
    /// widths with and without a remainder after the 32-wide blocks.
    #[test]
    fn sparse_rows_equals_a_plain_sum() {
        let n_genes = 57;
        for n in [1usize, 31, 32, 45, 128, 130] {
            let w: Vec<f32> = (0..n_genes * n)
                .map(|k| ((k * 7919 % 1000) as f32 - 500.0) / 997.0)
                .collect();
            let nz: Vec<(u32, f32)> = (0..n_genes as u32)
                .filter(|g| g % 3 != 1)
                .map(|g| (g, (g as f32 + 1.0).ln()))
                .collect();
            let mut want = vec![0.5f64; n];
            for &(g, v) in &nz {
                for (o, &r) in want
                    .iter_mut()
                    .zip(&w[g as usize * n..(g as usize + 1) * n])
                {
                    *o += v as f64 * r as f64;
                }
            }
            for fast in [true, false] {
                let mut y = vec![0.5f32; n];
                if fast {
                    sparse_rows(&mut y, &w, &nz);
                } else {
                    sparse_rows_body::<false>(&mut y, &w, &nz);
                }
                for (a, b) in y.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-4,
                        "n={n} fast={fast}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
