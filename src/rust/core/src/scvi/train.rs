//! scArches surgery for SCVI models: query training as scvi-tools'
//! `SCVI.load_query_data(query, reference, freeze_dropout = ...)` followed by `model.train()`.
//!
//! What trains (`_set_params_online_update` with its defaults): every FCLayers Linear has a
//! gradient hook that keeps only the gradient of its categorical one-hot columns (all of them,
//! reference batches included) and zeroes the bias gradient; every other tensor (mean / var
//! encoders, `px_scale` / `px_dropout` heads, `px_r`, encoder BatchNorm) is frozen, except the
//! decoder BatchNorm's affine weight and bias (`freeze_batchnorm_decoder = False`), which train
//! in full. `l_encoder` is trainable but unused with the observed library size, so it gets no
//! gradient. Hence the backward pass needs no weight gradient of any frozen matrix: the decoder
//! heads are one GEMM forward and one GEMM back per minibatch, fused with the ZINB / NB loss
//! ([`super::loss`]).
//!
//! Mode: `load_query_data` leaves the module in eval mode and scvi-tools 1.4.2 with lightning
//! 2.2 or newer (2.6.6 pinned) keeps each submodule's mode during `train()`, so query training
//! runs in eval mode (verified with forward hooks: every BatchNorm1d and Dropout forward has
//! `training = False`, and the decoder BatchNorm running statistics and `num_batches_tracked`
//! are unchanged after training). BatchNorm therefore normalises with its running statistics
//! (an affine map per feature), in training and validation alike, and dropout is off
//! whatever `freeze_dropout` says.
//!
//! Loss per minibatch: `mean_cells[-log p(x | z, l) + kl_weight KL(q(z|x) || N(0, I))]`,
//! `z = qz_m + sqrt(qz_v) eps`, `kl_weight = epoch / 400` during warm-up. Optimiser: torch Adam
//! (lr 1e-3, eps 0.01, L2 weight decay 1e-6 added to the gradient). Split: `ceil(0.9 n)` train
//! cells (moving 1 or 2 cells of a last minibatch to validation), shuffled minibatches of 128.
//! Logged `elbo_*` = mean over the set's cells of reconstruction loss + unweighted KL.
//! Early stopping: `elbo_validation`, mode min, min_delta 0, patience 45.
//!
//! Scope: one-hot batch, batch norm and / or layer norm (any `use_batch_norm` /
//! `use_layer_norm`), gene dispersion, ZINB or NB likelihood, observed library size, normal
//! latent, no extra covariates. Noise comes from a seeded ChaCha RNG, not torch's, so runs
//! agree with scvi-tools in distribution (ELBO, latent geometry), not bit for bit.

use super::loss::{cell_loss_grad, CellCounts, Dispersion, LossScratch};
use super::model_file::{ScviModelFile, Tensor};
use super::vae::{panels, sparse_rows, LatentOutput, PANEL};
use crate::error::{ScError, ScResult};
use crate::matrix::ExprMatrix;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use std::cell::RefCell;

const LN_EPS: f32 = 1e-5;
const VAR_EPS: f32 = 1e-4;
/// at least this many rows of a minibatch per parallel task in the decoder heads (the
/// head GEMM loses efficiency below it)
const HEAD_ROWS: usize = 16;
/// genes per chunk of the sparse first encoder layer (a panel's chunk: 256 x 32 f32 = 32 KB)
const GENE_CHUNK: usize = 256;

thread_local! {
    /// per-thread head logits (rows x width) and loss scratch, reused across minibatches
    static HEAD_SCRATCH: RefCell<(Vec<f32>, LossScratch)> = RefCell::new(Default::default());
}

/// A Linear layer: feature weights (frozen) and one-hot covariate columns (trained).
#[derive(Debug, Clone)]
struct Layer {
    n_in: usize,
    n_out: usize,
    /// `n_out x n_in`, torch layout (feature columns only)
    w: Vec<f32>,
    /// the transpose, `n_in x n_out`, kept for the sparse first encoder layer
    wt: Vec<f32>,
    /// the transpose cut into panels of [`PANEL`] outputs (`[panel][input][k]`) when
    /// `n_out` is a multiple of [`PANEL`] (first encoder layer only; else empty)
    panels: Vec<f32>,
    b: Vec<f32>,
    /// `n_cov x n_out`: the covariate columns, one row per one-hot column (empty if none)
    wc: Vec<f32>,
    /// `n_out x n_x`: frozen feature columns after the `n_in` ones, fed separately (the
    /// continuous covariates of the first encoder layer; empty if none)
    wx: Vec<f32>,
    /// the BatchNorm1d after the Linear (`use_batch_norm`), if any
    bn: Option<BatchNorm>,
}

/// BatchNorm1d (eps 1e-3) in eval mode, as scvi-tools 1.4.2 runs it during query training:
/// `y = gamma (x - running_mean) / sqrt(running_var + eps) + beta`. The running statistics
/// never change (the loaded query module stays in eval mode under lightning >= 2.2); the
/// affine `gamma` / `beta` train in the decoder (`freeze_batchnorm_decoder = False`) and are
/// frozen in the encoder.
#[derive(Debug, Clone)]
struct BatchNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    /// `1 / sqrt(running_var + eps)`
    inv_sd: Vec<f32>,
    trainable: bool,
}

const BN_EPS: f64 = 1e-3;

impl BatchNorm {
    /// Reads `<base>.weight`, `.bias`, `.running_mean`, `.running_var` (`n` features each).
    fn read(m: &ScviModelFile, base: &str, n: usize, trainable: bool) -> ScResult<Self> {
        let get = |what: &str| -> ScResult<Vec<f32>> {
            let (shape, v) = tensor_f32(m, &format!("{base}.{what}"))?;
            if shape != [n] {
                return Err(ScError::Dims(format!(
                    "{base}.{what} has shape {shape:?}, expected [{n}]"
                )));
            }
            Ok(v)
        };
        let gamma = get("weight")?;
        let beta = get("bias")?;
        let mean = get("running_mean")?;
        let inv_sd = get("running_var")?
            .iter()
            .map(|&v| (1.0 / (v as f64 + BN_EPS).sqrt()) as f32)
            .collect();
        Ok(BatchNorm {
            gamma,
            beta,
            mean,
            inv_sd,
            trainable,
        })
    }

    /// In place on `rows x n` values; keeps the normalised values in `xhat` when the affine
    /// parameters train (their gradient needs them), else leaves it empty.
    fn forward(&self, x: &mut [f32], xhat: &mut Vec<f32>) {
        let n = self.gamma.len();
        xhat.clear();
        for row in x.chunks_mut(n) {
            for (j, v) in row.iter_mut().enumerate() {
                let h = (*v - self.mean[j]) * self.inv_sd[j];
                if self.trainable {
                    xhat.push(h);
                }
                *v = self.gamma[j] * h + self.beta[j];
            }
        }
    }

    /// `d` (`rows x n`): the gradient w.r.t. the output on entry, w.r.t. the input on return;
    /// the gradients of gamma and beta (when trainable) are returned.
    fn backward(&self, d: &mut [f32], xhat: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
        let n = self.gamma.len();
        let grads = self.trainable.then(|| {
            let (mut dg, mut db) = (vec![0.0f32; n], vec![0.0f32; n]);
            for (row, xr) in d.chunks(n).zip(xhat.chunks(n)) {
                for j in 0..n {
                    dg[j] += row[j] * xr[j];
                    db[j] += row[j];
                }
            }
            (dg, db)
        });
        for row in d.chunks_mut(n) {
            for (j, v) in row.iter_mut().enumerate() {
                *v *= self.gamma[j] * self.inv_sd[j];
            }
        }
        grads
    }
}

fn tensor_f32(m: &ScviModelFile, key: &str) -> ScResult<(Vec<usize>, Vec<f32>)> {
    let t: &Tensor = m.tensor(key).ok_or_else(|| {
        ScError::Format(format!(
            "the state dict has no '{key}'; the model is not a scvi-tools VAE this reader knows"
        ))
    })?;
    let v = t
        .to_f32()
        .ok_or_else(|| ScError::Format(format!("{key} is not a floating-point tensor")))?;
    Ok((t.shape.clone(), v))
}

impl Layer {
    /// Read `<base>.weight` / `<base>.bias` with `n_in` feature columns, then `n_cov_old`
    /// covariate columns, and append `n_new` freshly initialised covariate columns
    /// (torch's default Linear init `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` of the enlarged layer).
    #[allow(clippy::too_many_arguments)]
    fn read(
        m: &ScviModelFile,
        base: &str,
        n_in: usize,
        n_x: usize,
        n_cov_old: usize,
        n_new: usize,
        rng: &mut ChaCha8Rng,
        keep_transpose: bool,
    ) -> ScResult<Self> {
        let (ws, w) = tensor_f32(m, &format!("{base}.weight"))?;
        let (bs, b) = tensor_f32(m, &format!("{base}.bias"))?;
        let n_out = ws.first().copied().unwrap_or(0);
        if ws.len() != 2 || ws[1] != n_in + n_x + n_cov_old || bs != [n_out] {
            return Err(ScError::Dims(format!(
                "{base}.weight has shape {ws:?} (bias {bs:?}); expected [{n_out}, {}] from the \
                 model description",
                n_in + n_x + n_cov_old
            )));
        }
        let n_all = n_in + n_x + n_cov_old;
        let mut wf = vec![0.0f32; n_out * n_in];
        let mut wx = vec![0.0f32; n_out * n_x];
        let n_cov = n_cov_old + n_new;
        let mut wc = vec![0.0f32; n_cov * n_out];
        let bound = 1.0 / ((n_in + n_x + n_cov) as f32).sqrt();
        for o in 0..n_out {
            wf[o * n_in..(o + 1) * n_in].copy_from_slice(&w[o * n_all..o * n_all + n_in]);
            wx[o * n_x..(o + 1) * n_x]
                .copy_from_slice(&w[o * n_all + n_in..o * n_all + n_in + n_x]);
            for c in 0..n_cov_old {
                wc[c * n_out + o] = w[o * n_all + n_in + n_x + c];
            }
        }
        for c in n_cov_old..n_cov {
            for o in 0..n_out {
                wc[c * n_out + o] = rng.random_range(-bound..bound);
            }
        }
        let wt = if keep_transpose {
            let mut t = vec![0.0f32; n_in * n_out];
            for o in 0..n_out {
                for i in 0..n_in {
                    t[i * n_out + o] = wf[o * n_in + i];
                }
            }
            t
        } else {
            Vec::new()
        };
        let panels = if keep_transpose {
            panels(&wt, n_in, n_out)
        } else {
            Vec::new()
        };
        Ok(Layer {
            n_in,
            n_out,
            w: wf,
            wt,
            panels,
            b,
            wc,
            wx,
            bn: None,
        })
    }

    fn n_cov(&self) -> usize {
        self.wc.len() / self.n_out.max(1)
    }

    /// `out (rows x n_out) = x (rows x n_in) W^T + b + covariate columns`; `codes` holds
    /// `k` one-hot column indices per row (`rows x k`).
    fn forward(&self, x: &[f32], codes: &[u32], out: &mut [f32]) {
        let rows = out.len() / self.n_out.max(1);
        for (r, o) in out.chunks_mut(self.n_out).enumerate().take(rows) {
            o.copy_from_slice(&self.b);
            self.add_cov(o, codes, r, rows);
        }
        gemm_xwt(rows, self.n_in, self.n_out, x, &self.w, out, 1.0);
    }

    /// Add the covariate columns of row `r` (of `rows`) to `o`.
    #[inline]
    fn add_cov(&self, o: &mut [f32], codes: &[u32], r: usize, rows: usize) {
        if self.wc.is_empty() || rows == 0 {
            return;
        }
        let k = codes.len() / rows;
        for &c in &codes[r * k..(r + 1) * k] {
            let c = c as usize;
            for (v, w) in o
                .iter_mut()
                .zip(&self.wc[c * self.n_out..(c + 1) * self.n_out])
            {
                *v += w;
            }
        }
    }

    /// `dx (rows x n_in) = dy (rows x n_out) W`.
    fn backward_input(&self, dy: &[f32], rows: usize, dx: &mut [f32], beta: f32) {
        gemm_xw(rows, self.n_out, self.n_in, dy, &self.w, dx, beta);
    }
}

/// `c (m x n) = a (m x k) * W^T + beta c` with W stored `n x k` (torch layout); rows of `a`
/// split over the rayon pool.
fn gemm_xwt(m: usize, k: usize, n: usize, a: &[f32], w: &[f32], c: &mut [f32], beta: f32) {
    gemm_rows(m, k, n, a, w, (1, k as isize), c, beta);
}

/// `c (m x n) = a (m x k) * W + beta c` with W stored `k x n` (torch layout of a layer with
/// k outputs and n inputs).
fn gemm_xw(m: usize, k: usize, n: usize, a: &[f32], w: &[f32], c: &mut [f32], beta: f32) {
    gemm_rows(m, k, n, a, w, (n as isize, 1), c, beta);
}

/// `c (m x n) = a (m x k) * B + beta c` where `B (k x n)` is read from `w` with the given
/// (row, column) strides; rows of `a` split over the rayon pool.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    w: &[f32],
    (rsw, csw): (isize, isize),
    c: &mut [f32],
    beta: f32,
) {
    debug_assert!(w.len() >= k * n);
    debug_assert!(beta == 0.0 || beta == 1.0);
    let accum = if beta == 0.0 {
        Accum::Replace
    } else {
        Accum::Add
    };
    let chunk = m.div_ceil(rayon::current_num_threads().max(1)).max(8);
    c[..m * n]
        .par_chunks_mut(chunk * n)
        .zip(a[..m * k].par_chunks(chunk * k))
        .for_each(|(cc, aa)| {
            let rows = cc.len() / n;
            let av = MatRef::from_row_major_slice(aa, rows, k);
            // SAFETY: `w` holds k x n values at the given strides (checked above in debug).
            let bv = unsafe { MatRef::from_raw_parts(w.as_ptr(), k, n, rsw, csw) };
            let cv = MatMut::from_row_major_slice_mut(cc, rows, n);
            matmul(cv, accum, av, bv, 1.0f32, Par::Seq);
        });
}

/// `sum(a * b)` (`b = None`: `sum(a)`) in 16 independent f32 lanes (so that it vectorises),
/// the lanes added last; the layer widths are small (128), well inside f32's accuracy.
#[inline]
fn lane_dot(a: &[f32], b: Option<&[f32]>, shift: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut ai = a.chunks_exact(16);
    match b {
        Some(b) => {
            let mut bi = b.chunks_exact(16);
            for (x, y) in (&mut ai).zip(&mut bi) {
                for k in 0..16 {
                    acc[k] += x[k] * y[k];
                }
            }
            for (k, (x, y)) in ai.remainder().iter().zip(bi.remainder()).enumerate() {
                acc[k] += x * y;
            }
        }
        None if shift != 0.0 => {
            // sum((a - shift)^2)
            for x in &mut ai {
                for k in 0..16 {
                    acc[k] += (x[k] - shift) * (x[k] - shift);
                }
            }
            for (k, x) in ai.remainder().iter().enumerate() {
                acc[k] += (x - shift) * (x - shift);
            }
        }
        None => {
            for x in &mut ai {
                for k in 0..16 {
                    acc[k] += x[k];
                }
            }
            for (k, x) in ai.remainder().iter().enumerate() {
                acc[k] += x;
            }
        }
    }
    acc.iter().sum()
}

/// LayerNorm (optional) and ReLU in place on `rows x n` pre-activations (no dropout: the
/// query trains in eval mode). Keeps what the backward pass needs: the normalised values in
/// `y` and `1/sd` per row.
fn activate(pre: &mut [f32], n: usize, ln: bool, y: &mut [f32], inv_sd: &mut [f32]) {
    pre.par_chunks_mut(n)
        .zip(y.par_chunks_mut(n))
        .zip(inv_sd.par_iter_mut())
        .for_each(|((p, yy), isd)| {
            if ln {
                let nf = n as f32;
                let mu = lane_dot(p, None, 0.0) / nf;
                let var = if mu == 0.0 {
                    lane_dot(p, Some(p), 0.0)
                } else {
                    lane_dot(p, None, mu)
                } / nf;
                let inv = 1.0 / (var + LN_EPS).sqrt();
                for v in p.iter_mut() {
                    *v = (*v - mu) * inv;
                }
                *isd = inv;
            }
            yy.copy_from_slice(p);
            for v in p.iter_mut() {
                *v = v.max(0.0);
            }
        });
}

/// Back through ReLU and LayerNorm: `d` holds the gradient w.r.t. the layer output on entry
/// and w.r.t. the pre-activation on return.
fn deactivate(d: &mut [f32], n: usize, ln: bool, y: &[f32], inv_sd: &[f32]) {
    d.par_chunks_mut(n)
        .zip(y.par_chunks(n))
        .zip(inv_sd.par_iter())
        .for_each(|((dd, yy), &isd)| {
            for (v, &yv) in dd.iter_mut().zip(yy) {
                if yv <= 0.0 {
                    *v = 0.0;
                }
            }
            if ln {
                let nf = n as f32;
                let md = lane_dot(dd, None, 0.0) / nf;
                let mdy = lane_dot(dd, Some(yy), 0.0) / nf;
                for (v, &yv) in dd.iter_mut().zip(yy) {
                    *v = isd * (*v - md - yv * mdy);
                }
            }
        });
}

/// The query data prepared for training: per cell its non-zero counts (with their lgamma
/// constants under the model's frozen dispersion), library size and batch code.
pub struct QueryData {
    n_cells: usize,
    start: Vec<usize>,
    genes: Vec<u32>,
    x: Vec<f32>,
    /// `(gene, log1p(x))` (or x without log_variational): the encoder input
    xin: Vec<(u32, f32)>,
    /// per cell: the sum of `lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)` over its
    /// non-zeros (constant under the frozen dispersion)
    lgc: Vec<f64>,
    library: Vec<f32>,
    /// per cell, `n_codes` one-hot column indices (batch, then each extra categorical
    /// covariate with more than one level, offset into the layers' covariate columns)
    codes: Vec<u32>,
    n_codes: usize,
    /// per cell, the continuous covariates (`n_cells x n_cont`)
    cont: Vec<f32>,
    /// per cell, the end (index into `xin`) of its non-zeros in each block of
    /// [`GENE_CHUNK`] genes (`n_cells x ceil(G / GENE_CHUNK)`): the blocks of the sparse
    /// first encoder layer
    chunk_ends: Vec<usize>,
    n_chunks: usize,
}

impl QueryData {
    pub fn n_cells(&self) -> usize {
        self.n_cells
    }

    fn cell(&self, j: usize) -> CellCounts<'_> {
        let r = self.start[j]..self.start[j + 1];
        CellCounts {
            genes: &self.genes[r.clone()],
            x: &self.x[r.clone()],
            lgc: self.lgc[j],
            library: self.library[j],
        }
    }
}

/// Options of [`SurgeryModel::train`]; `Default` gives scvi-tools' defaults.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// `None`: scvi's heuristic `min(round(20000 / n * 400), 400)`, at least 1
    pub max_epochs: Option<usize>,
    pub batch_size: usize,
    pub train_size: f64,
    pub lr: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `None` or `Some(0)`: no warm-up (kl weight = max)
    pub n_epochs_kl_warmup: Option<usize>,
    pub max_kl_weight: f64,
    pub min_kl_weight: f64,
    pub early_stopping: bool,
    pub early_stopping_patience: usize,
    pub early_stopping_min_delta: f64,
    /// compute the validation ELBO every epoch (always on with early stopping)
    pub validate: bool,
    pub seed: u64,
    /// `freeze_dropout` of load_query_data. No effect, as in scvi-tools 1.4.2: the query
    /// module trains in eval mode (see the module notes), so dropout is off either way.
    pub freeze_dropout: bool,
    /// an explicit (train, validation) split of the cells instead of the seeded one
    pub split: Option<(Vec<usize>, Vec<usize>)>,
    pub n_threads: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            max_epochs: None,
            batch_size: 128,
            train_size: 0.9,
            lr: 1e-3,
            eps: 0.01,
            weight_decay: 1e-6,
            n_epochs_kl_warmup: Some(400),
            max_kl_weight: 1.0,
            min_kl_weight: 0.0,
            early_stopping: false,
            early_stopping_patience: 45,
            early_stopping_min_delta: 0.0,
            validate: true,
            seed: 0,
            freeze_dropout: false,
            split: None,
            n_threads: 1,
        }
    }
}

/// scvi's `get_max_epochs_heuristic`.
pub fn max_epochs_heuristic(n_obs: usize) -> usize {
    let e = ((20_000.0 / n_obs.max(1) as f64) * 400.0).round() as usize;
    e.clamp(1, 400)
}

/// scvi's `_compute_kl_weight` by epoch.
pub fn kl_weight(epoch: usize, opts: &TrainOptions) -> f64 {
    let slope = opts.max_kl_weight - opts.min_kl_weight;
    match opts.n_epochs_kl_warmup {
        Some(n) if n > 0 && epoch < n => slope * (epoch as f64 / n as f64) + opts.min_kl_weight,
        _ => opts.max_kl_weight,
    }
}

/// The (train, validation) split of scvi's DataSplitter with `train_size`, seeded.
pub fn split_cells(
    n: usize,
    train_size: f64,
    batch_size: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut n_train = (train_size * n as f64).ceil() as usize;
    let mut n_val = n - n_train.min(n);
    let rem = n_train % batch_size.max(1);
    if (rem == 1 || rem == 2) && n_train > rem {
        n_train -= rem;
        if n_val > 0 {
            n_val += rem;
        }
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    idx.shuffle(&mut rng);
    let val = idx[..n_val].to_vec();
    let train = idx[n_val..n_val + n_train].to_vec();
    (train, val)
}

/// One epoch's record (`elbo_*` are per-cell means; validation values are NaN when not
/// computed).
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    pub kl_weight: f64,
    pub elbo_train: f64,
    pub reconstruction_loss_train: f64,
    pub kl_local_train: f64,
    pub elbo_validation: f64,
    pub reconstruction_loss_validation: f64,
    pub kl_local_validation: f64,
}

#[derive(Debug, Clone)]
pub struct TrainResult {
    pub history: Vec<EpochStats>,
    pub stopped_early: bool,
    pub cancelled: bool,
    pub train_indices: Vec<usize>,
    pub validation_indices: Vec<usize>,
}

/// Per-minibatch sums (over cells) and the gradients of the covariate columns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub reconstruction_sum: f64,
    pub kl_sum: f64,
    /// per-cell reconstruction loss and KL
    pub reconstruction: Vec<f64>,
    pub kl: Vec<f64>,
    /// gradients of `mean(rec + kl_weight KL)` w.r.t. the covariate columns, per encoder
    /// layer then per decoder layer, each `n_cov x n_out`; then those of gamma and beta of
    /// each trainable BatchNorm (decoder layers with batch norm), in layer order
    pub grads: Vec<Vec<f32>>,
}

/// An SCVI model prepared for scArches query training.
#[derive(Debug, Clone)]
pub struct SurgeryModel {
    n_genes: usize,
    n_latent: usize,
    n_batch: usize,
    /// levels of each extra categorical covariate (old and appended)
    cat_levels: Vec<usize>,
    /// continuous covariates: the first decoder layer's last `n_cont` feature inputs and,
    /// with encode_covariates, the first encoder layer's `wx`
    n_cont: usize,
    log_variational: bool,
    enc: Vec<Layer>,
    mean: Layer,
    var: Layer,
    dec: Vec<Layer>,
    /// the px_scale head then (ZINB) the px_dropout head: `n_heads * G x H`
    heads_w: Vec<f32>,
    /// the same packed for the AVX-512 head kernel ([`super::heads_avx512`]); empty where
    /// that kernel is not used
    #[cfg_attr(not(all(target_arch = "x86_64", scannot_avx512)), allow(dead_code))]
    heads_packed: Vec<f32>,
    zinb: bool,
    disp: Dispersion,
    ln_enc: bool,
    ln_dec: bool,
}

impl SurgeryModel {
    /// Build the query model from a saved SCVI model (reference or query), appending
    /// `n_new_batches` new batch levels whose one-hot columns are initialised as torch does
    /// (seeded; the values differ from torch's own draw).
    pub fn from_model(m: &ScviModelFile, n_new_batches: usize, seed: u64) -> ScResult<Self> {
        Self::from_model_covs(m, n_new_batches, &[], seed)
    }

    /// [`Self::from_model`] for a model with extra covariates: `n_new_cats[i]` new levels of
    /// the i-th extra categorical covariate (appended after the reference's, as
    /// `transfer_fields(extend_categories = True)`). As scvi-tools' `load_query_data`, the
    /// freshly initialised covariate columns of each layer (new batch and new categorical
    /// levels together) are appended after all of the reference's columns; the one-hot
    /// columns are then read positionally (batch, then each categorical covariate). The
    /// continuous covariates' weights are frozen, all one-hot columns train.
    pub fn from_model_covs(
        m: &ScviModelFile,
        n_new_batches: usize,
        n_new_cats: &[usize],
        seed: u64,
    ) -> ScResult<Self> {
        let p = &m.init;
        if let Some(name) = &m.model_name {
            if name != "SCVI" {
                return Err(ScError::Input(format!(
                    "query training supports SCVI models; this model is a {name}"
                )));
            }
        }
        let unsupported = |what: String| {
            Err(ScError::Input(format!(
                "query training supports SCVI models with the scArches settings \
                 (gene dispersion, one-hot batch); this model has \
                 {what}"
            )))
        };
        if !matches!(
            p.use_batch_norm.as_str(),
            "none" | "both" | "encoder" | "decoder"
        ) {
            return unsupported(format!("use_batch_norm = '{}'", p.use_batch_norm));
        }
        let bn_enc = matches!(p.use_batch_norm.as_str(), "both" | "encoder");
        let bn_dec = matches!(p.use_batch_norm.as_str(), "both" | "decoder");
        if p.dispersion != "gene" {
            return unsupported(format!("dispersion = '{}'", p.dispersion));
        }
        if p.gene_likelihood != "zinb" && p.gene_likelihood != "nb" {
            return unsupported(format!("gene_likelihood = '{}'", p.gene_likelihood));
        }
        if !p.use_observed_lib_size {
            return unsupported("use_observed_lib_size = False".into());
        }
        if p.latent_distribution != "normal" {
            return unsupported(format!("latent_distribution = '{}'", p.latent_distribution));
        }
        if p.batch_representation != "one-hot" {
            return unsupported(format!(
                "batch_representation = '{}'",
                p.batch_representation
            ));
        }
        if n_new_cats.len() != m.extra_categorical.len() {
            return Err(ScError::Input(format!(
                "the model has {} extra categorical covariates, {} were given; pass the \
                 query's categorical covariates (categorical_covariate_keys of the reference)",
                m.extra_categorical.len(),
                n_new_cats.len()
            )));
        }
        if m.setup.size_factor_key.is_some() {
            return unsupported("a size_factor_key".into());
        }
        let g = m.var_names.len();
        let n_batch_old = m.n_batch;
        let n_batch = n_batch_old + n_new_batches;
        // one-hot widths as FCLayers has them: a covariate with one level has no column
        let width = |k: usize| if k > 1 { k } else { 0 };
        let cat_levels: Vec<usize> = m
            .extra_categorical
            .iter()
            .zip(n_new_cats)
            .map(|((_, c), &k)| c.len() + k)
            .collect();
        let old_cov = width(n_batch_old)
            + m.extra_categorical
                .iter()
                .map(|(_, c)| width(c.len()))
                .sum::<usize>();
        let new_cov = width(n_batch) + cat_levels.iter().map(|&k| width(k)).sum::<usize>();
        let n_new = new_cov - old_cov;
        let n_cont = m.extra_continuous.len();
        let enc_cont = if p.encode_covariates { n_cont } else { 0 };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ln_enc = matches!(p.use_layer_norm.as_str(), "both" | "encoder");
        let ln_dec = matches!(p.use_layer_norm.as_str(), "both" | "decoder");

        let mut enc = Vec::new();
        let mut n_prev = g;
        for i in 0..p.n_layers {
            let takes = p.encode_covariates && (i == 0 || p.deeply_inject_covariates);
            let (oc, nn) = if takes { (old_cov, n_new) } else { (0, 0) };
            let mut l = Layer::read(
                m,
                &format!("z_encoder.encoder.fc_layers.Layer {i}.0"),
                n_prev,
                if i == 0 { enc_cont } else { 0 },
                oc,
                nn,
                &mut rng,
                i == 0,
            )?;
            if bn_enc {
                let base = format!("z_encoder.encoder.fc_layers.Layer {i}.1");
                l.bn = Some(BatchNorm::read(m, &base, l.n_out, false)?);
            }
            n_prev = l.n_out;
            enc.push(l);
        }
        if m.tensor(&format!(
            "z_encoder.encoder.fc_layers.Layer {}.0.weight",
            p.n_layers
        ))
        .is_some()
        {
            return Err(ScError::Format(format!(
                "the state dict has more encoder layers than n_layers = {}",
                p.n_layers
            )));
        }
        let mean = Layer::read(
            m,
            "z_encoder.mean_encoder",
            n_prev,
            0,
            0,
            0,
            &mut rng,
            false,
        )?;
        let var = Layer::read(m, "z_encoder.var_encoder", n_prev, 0, 0, 0, &mut rng, false)?;
        let nl = mean.n_out;
        let mut dec = Vec::new();
        // the decoder's first layer takes [z, continuous covariates]
        let mut n_prev = nl + n_cont;
        for i in 0..p.n_layers {
            let takes = i == 0 || p.deeply_inject_covariates;
            let (oc, nn) = if takes { (old_cov, n_new) } else { (0, 0) };
            let mut l = Layer::read(
                m,
                &format!("decoder.px_decoder.fc_layers.Layer {i}.0"),
                n_prev,
                0,
                oc,
                nn,
                &mut rng,
                false,
            )?;
            if bn_dec {
                let base = format!("decoder.px_decoder.fc_layers.Layer {i}.1");
                l.bn = Some(BatchNorm::read(m, &base, l.n_out, true)?);
            }
            n_prev = l.n_out;
            dec.push(l);
        }
        let h = n_prev;
        let zinb = p.gene_likelihood == "zinb";
        let mut heads_w = Vec::new();
        let mut heads_b = Vec::new();
        let mut names = vec!["decoder.px_scale_decoder.0"];
        if zinb {
            names.push("decoder.px_dropout_decoder");
        }
        for name in names {
            let l = Layer::read(m, name, h, 0, 0, 0, &mut rng, false)?;
            if l.n_out != g {
                return Err(ScError::Dims(format!(
                    "{name} has {} outputs for {g} genes",
                    l.n_out
                )));
            }
            heads_w.extend_from_slice(&l.w);
            heads_b.extend_from_slice(&l.b);
        }
        let (rs, px_r) = tensor_f32(m, "px_r")?;
        if rs != [g] {
            return Err(ScError::Dims(format!(
                "px_r has shape {rs:?}, expected [{g}]"
            )));
        }
        let (b_scale, b_pi) = heads_b.split_at(g);
        #[allow(unused_mut)]
        let mut heads_packed = Vec::new();
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        {
            if super::simd::avx512() {
                heads_packed = super::heads_avx512::pack(&heads_w, heads_w.len() / h, h);
            }
        }
        Ok(SurgeryModel {
            n_genes: g,
            n_latent: nl,
            n_batch,
            cat_levels,
            n_cont,
            log_variational: p.log_variational,
            enc,
            mean,
            var,
            dec,
            heads_w,
            heads_packed,
            zinb,
            disp: Dispersion::with_bias(&px_r, b_scale, b_pi),
            ln_enc,
            ln_dec,
        })
    }

    /// The heads' logits without their biases: `logits (rows x width) = h (rows x H) W^T`.
    fn head_logits(&self, h: &[f32], rows: usize, hd: usize, logits: &mut [f32]) {
        let width = self.heads_w.len() / hd.max(1);
        #[cfg(all(target_arch = "x86_64", scannot_avx512))]
        {
            if !self.heads_packed.is_empty() {
                // SAFETY: packed only where the CPU has AVX-512 (see `from_model`).
                unsafe {
                    super::heads_avx512::forward(h, rows, hd, &self.heads_packed, width, logits)
                };
                return;
            }
        }
        matmul(
            MatMut::from_row_major_slice_mut(logits, rows, width),
            Accum::Replace,
            MatRef::from_row_major_slice(h, rows, hd),
            MatRef::from_row_major_slice(&self.heads_w, width, hd).transpose(),
            1.0f32,
            Par::Seq,
        );
    }

    /// [`Self::head_logits`] by faer (the portable path), for tests.
    #[cfg(test)]
    pub(crate) fn head_logits_both(&self, h: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
        let hd = self.dec.last().map_or(self.n_latent, |l| l.n_out);
        let width = self.heads_w.len() / hd;
        let mut fast = vec![f32::NAN; rows * width];
        self.head_logits(h, rows, hd, &mut fast);
        let mut plain = vec![f32::NAN; rows * width];
        matmul(
            MatMut::from_row_major_slice_mut(&mut plain, rows, width),
            Accum::Replace,
            MatRef::from_row_major_slice(h, rows, hd),
            MatRef::from_row_major_slice(&self.heads_w, width, hd).transpose(),
            1.0f32,
            Par::Seq,
        );
        (fast, plain)
    }

    pub fn n_genes(&self) -> usize {
        self.n_genes
    }
    pub fn n_latent(&self) -> usize {
        self.n_latent
    }
    pub fn n_batch(&self) -> usize {
        self.n_batch
    }
    /// Levels of each extra categorical covariate (the reference's and the appended ones).
    pub fn cat_levels(&self) -> &[usize] {
        &self.cat_levels
    }
    /// Number of extra continuous covariates.
    pub fn n_cont(&self) -> usize {
        self.n_cont
    }

    /// The trainable covariate columns, per encoder layer then decoder layer (`n_cov x n_out`).
    pub fn covariate_weights(&self) -> Vec<&[f32]> {
        self.enc
            .iter()
            .chain(&self.dec)
            .map(|l| &l.wc[..])
            .collect()
    }

    /// Mutable access to the covariate columns (same order as [`Self::covariate_weights`]).
    pub fn covariate_weights_mut(&mut self) -> Vec<&mut [f32]> {
        self.enc
            .iter_mut()
            .chain(self.dec.iter_mut())
            .map(|l| &mut l.wc[..])
            .collect()
    }

    /// What Adam updates, in the order of [`StepOutput::grads`]: the covariate columns per
    /// encoder then decoder layer, then gamma and beta of each trainable BatchNorm.
    fn params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut bn = Vec::new();
        let mut out = Vec::new();
        for l in self.enc.iter_mut().chain(self.dec.iter_mut()) {
            out.push(&mut l.wc);
            if let Some(b) = l.bn.as_mut().filter(|b| b.trainable) {
                bn.push(&mut b.gamma);
                bn.push(&mut b.beta);
            }
        }
        out.extend(bn);
        out
    }

    /// The trained BatchNorm affine parameters (the decoder's, with batch norm): per layer its
    /// state-dict base key (`decoder.px_decoder.fc_layers.Layer i.1`), `weight` (gamma) and
    /// `bias` (beta). Running statistics are not trained (see [`BatchNorm`]).
    pub fn batch_norm_affine(&self) -> Vec<(String, Vec<f32>, Vec<f32>)> {
        let named = |prefix: &str, layers: &[Layer]| -> Vec<(String, Vec<f32>, Vec<f32>)> {
            layers
                .iter()
                .enumerate()
                .filter_map(|(i, l)| {
                    let b = l.bn.as_ref().filter(|b| b.trainable)?;
                    Some((
                        format!("{prefix}.fc_layers.Layer {i}.1"),
                        b.gamma.clone(),
                        b.beta.clone(),
                    ))
                })
                .collect()
        };
        let mut out = named("z_encoder.encoder", &self.enc);
        out.extend(named("decoder.px_decoder", &self.dec));
        out
    }

    /// Mutable gamma and beta of the trainable BatchNorm layers (order of
    /// [`Self::batch_norm_affine`]), for tests.
    #[cfg(test)]
    pub(crate) fn batch_norm_affine_mut(&mut self) -> Vec<(&mut Vec<f32>, &mut Vec<f32>)> {
        self.enc
            .iter_mut()
            .chain(self.dec.iter_mut())
            .filter_map(|l| {
                let b = l.bn.as_mut().filter(|b| b.trainable)?;
                Some((&mut b.gamma, &mut b.beta))
            })
            .collect()
    }

    /// Check and index the query counts (genes x cells, the model's gene order) and batch
    /// codes (0-based, < n_batch).
    pub fn prepare(&self, counts: &ExprMatrix, batch: &[u32]) -> ScResult<QueryData> {
        self.prepare_covs(counts, batch, &[], &[])
    }

    /// [`Self::prepare`] with the extra covariates: `cats[i]` the 0-based codes of the i-th
    /// categorical covariate (< its level count in the query model), `cont[c]` the values of
    /// the c-th continuous covariate, one per cell each.
    pub fn prepare_covs(
        &self,
        counts: &ExprMatrix,
        batch: &[u32],
        cats: &[Vec<u32>],
        cont: &[Vec<f64>],
    ) -> ScResult<QueryData> {
        let n = counts.ncol();
        if cats.len() != self.cat_levels.len() || cont.len() != self.n_cont {
            return Err(ScError::Input(format!(
                "the model has {} extra categorical and {} continuous covariates; {} and {} \
                 were given (pass the reference's categorical_covariate_keys and \
                 continuous_covariate_keys columns of the query)",
                self.cat_levels.len(),
                self.n_cont,
                cats.len(),
                cont.len()
            )));
        }
        for (i, c) in cats.iter().enumerate() {
            if c.len() != n {
                return Err(ScError::Dims(format!(
                    "{} codes of categorical covariate {} for {n} cells",
                    c.len(),
                    i + 1
                )));
            }
            if let Some(v) = c.iter().find(|&&v| v as usize >= self.cat_levels[i]) {
                return Err(ScError::Input(format!(
                    "code {v} of categorical covariate {} is outside its {} levels",
                    i + 1,
                    self.cat_levels[i]
                )));
            }
        }
        for (i, c) in cont.iter().enumerate() {
            if c.len() != n {
                return Err(ScError::Dims(format!(
                    "{} values of continuous covariate {} for {n} cells",
                    c.len(),
                    i + 1
                )));
            }
            if c.iter().any(|v| !v.is_finite()) {
                return Err(ScError::Value(format!(
                    "continuous covariate {} has missing or non-finite values",
                    i + 1
                )));
            }
        }
        if counts.nrow() != self.n_genes {
            return Err(ScError::Dims(format!(
                "the counts have {} genes but the model has {}; align the genes to the model \
                 first (same genes, same order)",
                counts.nrow(),
                self.n_genes
            )));
        }
        if batch.len() != n {
            return Err(ScError::Dims(format!(
                "{} batch codes for {n} cells",
                batch.len()
            )));
        }
        if let Some(b) = batch.iter().find(|&&b| b as usize >= self.n_batch) {
            return Err(ScError::Input(format!(
                "batch code {b} is outside the query model's {} batches",
                self.n_batch
            )));
        }
        // lgamma(theta) per gene and lgamma(x + 1) for small integer counts, computed once
        let lg_theta: Vec<f64> = self
            .disp
            .theta
            .iter()
            .map(|&t| super::loss::ln_gamma(t as f64))
            .collect();
        let lg_fact: Vec<f64> = (0..1024)
            .map(|k| super::loss::ln_gamma(k as f64 + 1.0))
            .collect();
        let lgamma_c = |v: f64, g: usize| -> f64 {
            let k = v as usize;
            let lf = if k as f64 == v && k < lg_fact.len() {
                lg_fact[k]
            } else {
                super::loss::ln_gamma(v + 1.0)
            };
            super::loss::ln_gamma(v + self.disp.theta[g] as f64) - lg_theta[g] - lf
        };
        // per block of cells in parallel: (genes, x, xin, per-cell lgc, library, cell ends)
        type Block = (
            Vec<u32>,
            Vec<f32>,
            Vec<(u32, f32)>,
            Vec<f64>,
            Vec<f32>,
            Vec<usize>,
        );
        let blocks: Vec<ScResult<Block>> = (0..n)
            .collect::<Vec<_>>()
            .par_chunks(256)
            .map(|cells| {
                let (mut genes, mut x, mut xin, mut lgc) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                let (mut library, mut ends) = (Vec::new(), Vec::new());
                for &j in cells {
                    let (mut lib, mut lg_sum) = (0.0f64, 0.0f64);
                    let mut push = |g: usize, v: f64| -> ScResult<()> {
                        if !v.is_finite() || v < 0.0 {
                            return Err(ScError::Value(format!(
                                "counts must be finite and non-negative, found {v}; scVI \
                                 takes raw counts"
                            )));
                        }
                        if v > 0.0 {
                            genes.push(g as u32);
                            x.push(v as f32);
                            let xe = if self.log_variational { v.ln_1p() } else { v };
                            xin.push((g as u32, xe as f32));
                            lg_sum += lgamma_c(v, g);
                            lib += v;
                        }
                        Ok(())
                    };
                    match counts {
                        ExprMatrix::Csc(m) => {
                            let (rows, vals) = m.col(j);
                            for (&g, &v) in rows.iter().zip(vals) {
                                push(g as usize, v)?;
                            }
                        }
                        ExprMatrix::Dense(m) => {
                            for (g, &v) in m.col(j).iter().enumerate() {
                                push(g, v)?;
                            }
                        }
                    }
                    let c0 = ends.last().copied().unwrap_or(0);
                    if !genes[c0..].windows(2).all(|w| w[0] < w[1]) {
                        // unsorted row indices: order this cell's entries by gene
                        let mut idx: Vec<usize> = (c0..genes.len()).collect();
                        idx.sort_by_key(|&e| genes[e]);
                        let gs: Vec<u32> = idx.iter().map(|&e| genes[e]).collect();
                        let xs: Vec<f32> = idx.iter().map(|&e| x[e]).collect();
                        let xi: Vec<(u32, f32)> = idx.iter().map(|&e| xin[e]).collect();
                        genes[c0..].copy_from_slice(&gs);
                        x[c0..].copy_from_slice(&xs);
                        xin[c0..].copy_from_slice(&xi);
                    }
                    if lib <= 0.0 {
                        return Err(ScError::Value(format!(
                            "cell {} has no counts; scVI needs a positive library size \
                             (filter empty cells first)",
                            j + 1
                        )));
                    }
                    library.push(lib as f32);
                    lgc.push(lg_sum);
                    ends.push(genes.len());
                }
                Ok((genes, x, xin, lgc, library, ends))
            })
            .collect();
        let mut start = vec![0usize];
        let (mut genes, mut x, mut xin, mut lgc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut library = Vec::with_capacity(n);
        for blk in blocks {
            let (g, xv, xi, lg, lib, ends) = blk?;
            let off = genes.len();
            start.extend(ends.iter().map(|e| e + off));
            genes.extend(g);
            x.extend(xv);
            xin.extend(xi);
            lgc.extend(lg);
            library.extend(lib);
        }
        // one-hot column indices per cell, FCLayers' order: batch, then each categorical
        // covariate (a covariate with one level has no column)
        let width = |k: usize| if k > 1 { k } else { 0 };
        let groups: Vec<(usize, &[u32])> = std::iter::once((self.n_batch, batch))
            .chain(
                self.cat_levels
                    .iter()
                    .zip(cats)
                    .map(|(&k, c)| (k, c.as_slice())),
            )
            .filter(|&(k, _)| width(k) > 0)
            .collect();
        let n_codes = groups.len();
        let mut codes = Vec::with_capacity(n * n_codes);
        for j in 0..n {
            let mut off = 0u32;
            for &(k, c) in &groups {
                codes.push(off + c[j]);
                off += k as u32;
            }
        }
        let mut cont_rows = Vec::with_capacity(n * self.n_cont);
        for j in 0..n {
            cont_rows.extend(cont.iter().map(|c| c[j] as f32));
        }
        let n_chunks = self.n_genes.div_ceil(GENE_CHUNK).max(1);
        let mut chunk_ends = vec![0usize; n * n_chunks];
        chunk_ends
            .par_chunks_mut(n_chunks)
            .enumerate()
            .for_each(|(j, ends)| {
                let (mut e, stop) = (start[j], start[j + 1]);
                for (c, end) in ends.iter_mut().enumerate() {
                    let g1 = ((c + 1) * GENE_CHUNK) as u32;
                    while e < stop && genes[e] < g1 {
                        e += 1;
                    }
                    *end = e;
                }
            });
        Ok(QueryData {
            n_cells: n,
            chunk_ends,
            n_chunks,
            start,
            genes,
            x,
            xin,
            lgc,
            library,
            codes,
            n_codes,
            cont: cont_rows,
        })
    }

    /// Encoder forward for `cells`: per-layer (pre-activation normalised `y`, 1/sd) and
    /// the final hidden layer, then mean and variance.
    fn encode(&self, data: &QueryData, cells: &[usize], st: &mut State) {
        let bsz = cells.len();
        let k = data.n_codes;
        let codes: Vec<u32> = cells
            .iter()
            .flat_map(|&j| data.codes[j * k..(j + 1) * k].iter().copied())
            .collect();
        st.codes = codes;
        let nc = self.n_cont;
        for (li, l) in self.enc.iter().enumerate() {
            let n = l.n_out;
            let mut pre = vec![0.0f32; bsz * n];
            if li == 0 {
                // cells split over the threads; within a thread, panel by panel so that a
                // cache-sized slice of the weights serves all its cells
                let per = bsz.div_ceil(rayon::current_num_threads().max(1)).max(1);
                pre.par_chunks_mut(per * n)
                    .zip(cells.par_chunks(per))
                    .for_each(|(oc, cc)| {
                        for (o, &j) in oc.chunks_mut(n).zip(cc) {
                            o.copy_from_slice(&l.b);
                            l.add_cov(o, &data.codes, j, data.n_cells);
                            if !l.wx.is_empty() {
                                // continuous covariates (encode_covariates), frozen weights
                                let x = &data.cont[j * nc..(j + 1) * nc];
                                for (a, wr) in o.iter_mut().zip(l.wx.chunks(nc)) {
                                    *a += wr.iter().zip(x).map(|(w, v)| w * v).sum::<f32>();
                                }
                            }
                        }
                        let nz = |j: usize| &data.xin[data.start[j]..data.start[j + 1]];
                        if l.panels.is_empty() {
                            for (o, &j) in oc.chunks_mut(n).zip(cc) {
                                sparse_rows(o, &l.wt, nz(j));
                            }
                        } else {
                            // genes in chunks whose panel slice fits the L1 cache; each cell's
                            // non-zeros are sorted by gene, their chunk ends precomputed (see
                            // `prepare`)
                            let nc = data.n_chunks;
                            let mut ranges = vec![(0usize, 0usize); cc.len()];
                            for ci in 0..l.n_in.div_ceil(GENE_CHUNK) {
                                for (r, &j) in ranges.iter_mut().zip(cc) {
                                    let a = if ci == 0 {
                                        data.start[j]
                                    } else {
                                        data.chunk_ends[j * nc + ci - 1]
                                    };
                                    *r = (a, data.chunk_ends[j * nc + ci]);
                                }
                                for (pi, panel) in l.panels.chunks_exact(l.n_in * PANEL).enumerate()
                                {
                                    for (o, &(a, b)) in oc.chunks_mut(n).zip(&ranges) {
                                        sparse_rows(
                                            &mut o[pi * PANEL..(pi + 1) * PANEL],
                                            panel,
                                            &data.xin[a..b],
                                        );
                                    }
                                }
                            }
                        }
                    });
            } else {
                l.forward(&st.enc_out[li - 1], &st.codes, &mut pre);
            }
            let mut xhat = Vec::new();
            if let Some(bn) = &l.bn {
                bn.forward(&mut pre, &mut xhat);
            }
            st.enc_bn.push(xhat);
            let mut y = vec![0.0f32; bsz * n];
            let mut isd = vec![1.0f32; bsz];
            activate(&mut pre, n, self.ln_enc, &mut y, &mut isd);
            st.enc_y.push(y);
            st.enc_isd.push(isd);
            st.enc_out.push(pre);
        }
        let h = st.enc_out.last().expect("at least one layer");
        let nl = self.n_latent;
        st.mu = vec![0.0; bsz * nl];
        st.u = vec![0.0; bsz * nl];
        self.mean.forward(h, &st.codes, &mut st.mu);
        self.var.forward(h, &st.codes, &mut st.u);
        st.v = st.u.iter().map(|&u| u.exp() + VAR_EPS).collect();
    }

    /// Forward (and backward when `grad`) of one minibatch. `eps` is `cells x n_latent`
    /// (z = mu + sqrt(v) eps).
    pub(crate) fn step(
        &self,
        data: &QueryData,
        cells: &[usize],
        eps: &[f32],
        kl_weight: f64,
        grad: bool,
    ) -> StepOutput {
        let bsz = cells.len();
        let nl = self.n_latent;
        let mut st = State::default();
        self.encode(data, cells, &mut st);
        let z: Vec<f32> = (0..bsz * nl)
            .map(|i| st.mu[i] + st.v[i].sqrt() * eps[i])
            .collect();
        let kl: Vec<f64> = (0..bsz)
            .map(|r| {
                (0..nl)
                    .map(|k| {
                        let (m, v) = (st.mu[r * nl + k] as f64, st.v[r * nl + k] as f64);
                        0.5 * (v + m * m - 1.0 - v.ln())
                    })
                    .sum()
            })
            .collect();
        // decoder: [z, continuous covariates]
        let nc = self.n_cont;
        let mut dec_in = if nc == 0 {
            z.clone()
        } else {
            let mut v = Vec::with_capacity(bsz * (nl + nc));
            for (r, &j) in cells.iter().enumerate() {
                v.extend_from_slice(&z[r * nl..(r + 1) * nl]);
                v.extend_from_slice(&data.cont[j * nc..(j + 1) * nc]);
            }
            v
        };
        let mut dec_y = Vec::new();
        let mut dec_isd = Vec::new();
        let mut dec_bn = Vec::new();
        let mut dec_inputs = Vec::new();
        for l in &self.dec {
            let mut pre = vec![0.0f32; bsz * l.n_out];
            l.forward(&dec_in, &st.codes, &mut pre);
            let mut xhat = Vec::new();
            if let Some(bn) = &l.bn {
                bn.forward(&mut pre, &mut xhat);
            }
            dec_bn.push(xhat);
            let mut y = vec![0.0f32; bsz * l.n_out];
            let mut isd = vec![1.0f32; bsz];
            activate(&mut pre, l.n_out, self.ln_dec, &mut y, &mut isd);
            dec_y.push(y);
            dec_isd.push(isd);
            dec_inputs.push(std::mem::replace(&mut dec_in, pre));
        }
        let hdec = dec_in;
        let hd = self.dec.last().map_or(nl, |l| l.n_out);
        // heads + loss (+ gradient w.r.t. the last decoder hidden layer), fused per row block
        let g = self.n_genes;
        let nh = if self.zinb { 2 } else { 1 };
        let width = nh * g;
        let scale = 1.0 / bsz as f32;
        let mut rec = vec![0.0f64; bsz];
        let mut dh = vec![0.0f32; bsz * hd];
        let rows_per_task = bsz
            .div_ceil(rayon::current_num_threads().max(1))
            .max(HEAD_ROWS);
        rec.par_chunks_mut(rows_per_task)
            .zip(dh.par_chunks_mut(rows_per_task * hd))
            .zip(hdec.par_chunks(rows_per_task * hd))
            .zip(cells.par_chunks(rows_per_task))
            .for_each(|(((rc, dhc), hc), cc)| {
                HEAD_SCRATCH.with(|cell| {
                    let (logits, scratch) = &mut *cell.borrow_mut();
                    let rows = cc.len();
                    logits.resize(rows * width, 0.0);
                    let logits = &mut logits[..rows * width];
                    // the heads' biases are added by the loss (`self.disp`)
                    let wv = MatRef::from_row_major_slice(&self.heads_w, width, hd);
                    self.head_logits(hc, rows, hd, logits);
                    for ((row, r), &j) in logits.chunks_mut(width).zip(rc.iter_mut()).zip(cc) {
                        let (a, pi) = row.split_at_mut(g);
                        let pi = if self.zinb { Some(pi) } else { None };
                        *r = cell_loss_grad(a, pi, scratch, &data.cell(j), &self.disp, scale);
                    }
                    if grad {
                        matmul(
                            MatMut::from_row_major_slice_mut(dhc, rows, hd),
                            Accum::Replace,
                            MatRef::from_row_major_slice(logits, rows, width),
                            wv,
                            1.0f32,
                            Par::Seq,
                        );
                    }
                })
            });
        let reconstruction_sum = rec.iter().sum();
        let kl_sum = kl.iter().sum();
        let mut grads = Vec::new();
        if grad {
            let mut dec_grads = Vec::new();
            let mut bn_grads = Vec::new();
            let mut d = dh;
            for (li, l) in self.dec.iter().enumerate().rev() {
                deactivate(&mut d, l.n_out, self.ln_dec, &dec_y[li], &dec_isd[li]);
                if let Some(bn) = &l.bn {
                    if let Some((dg, db)) = bn.backward(&mut d, &dec_bn[li]) {
                        bn_grads.push(db);
                        bn_grads.push(dg);
                    }
                }
                dec_grads.push(cov_grad(l, &d, &st.codes));
                let mut dx = vec![0.0f32; bsz * l.n_in];
                l.backward_input(&d, bsz, &mut dx, 0.0);
                d = dx;
            }
            dec_grads.reverse();
            if nc > 0 {
                // keep dL/dz of the first layer's [z, continuous] input
                let w = nl + nc;
                d = (0..bsz * nl).map(|i| d[(i / nl) * w + i % nl]).collect();
            }
            // d = dL/dz
            let kw = (kl_weight as f32) * scale;
            let mut dmu = vec![0.0f32; bsz * nl];
            let mut du = vec![0.0f32; bsz * nl];
            for i in 0..bsz * nl {
                let (m, v) = (st.mu[i], st.v[i]);
                let sd = v.sqrt();
                dmu[i] = d[i] + kw * m;
                let dv = d[i] * eps[i] / (2.0 * sd) + kw * 0.5 * (1.0 - 1.0 / v);
                du[i] = dv * (v - VAR_EPS);
            }
            let he = self.mean.n_in;
            let mut d = vec![0.0f32; bsz * he];
            self.mean.backward_input(&dmu, bsz, &mut d, 0.0);
            self.var.backward_input(&du, bsz, &mut d, 1.0);
            let mut enc_grads = Vec::new();
            for (li, l) in self.enc.iter().enumerate().rev() {
                deactivate(&mut d, l.n_out, self.ln_enc, &st.enc_y[li], &st.enc_isd[li]);
                if let Some(bn) = &l.bn {
                    if let Some((dg, db)) = bn.backward(&mut d, &st.enc_bn[li]) {
                        bn_grads.push(db);
                        bn_grads.push(dg);
                    }
                }
                enc_grads.push(cov_grad(l, &d, &st.codes));
                if li > 0 {
                    let mut dx = vec![0.0f32; bsz * l.n_in];
                    l.backward_input(&d, bsz, &mut dx, 0.0);
                    d = dx;
                }
            }
            enc_grads.reverse();
            // collected last layer first, beta before gamma: reversed, encoder then decoder
            // layers, gamma then beta
            bn_grads.reverse();
            grads = enc_grads;
            grads.extend(dec_grads);
            grads.extend(bn_grads);
        }
        StepOutput {
            reconstruction_sum,
            kl_sum,
            reconstruction: rec,
            kl,
            grads,
        }
    }

    /// Latent mean and variance (eval mode, as `get_latent_representation(return_dist=True)`),
    /// cells x latent column-major.
    pub fn latent(&self, data: &QueryData, n_threads: usize) -> ScResult<LatentOutput> {
        let n = data.n_cells;
        let nl = self.n_latent;
        let mut mean = vec![0.0; n * nl];
        let mut var = vec![0.0; n * nl];
        crate::threads::with_threads(n_threads.max(1), || {
            let cells: Vec<usize> = (0..n).collect();
            for blk in cells.chunks(1024) {
                let mut st = State::default();
                self.encode(data, blk, &mut st);
                for (r, &j) in blk.iter().enumerate() {
                    for k in 0..nl {
                        mean[k * n + j] = st.mu[r * nl + k] as f64;
                        var[k * n + j] = st.v[r * nl + k] as f64;
                    }
                }
            }
        })?;
        Ok(LatentOutput {
            n_cells: n,
            n_latent: nl,
            mean,
            var,
        })
    }

    /// Per-cell reconstruction loss and KL at `z = mean` (eval mode, no sampling).
    pub fn loss_at_mean(
        &self,
        data: &QueryData,
        n_threads: usize,
    ) -> ScResult<(Vec<f64>, Vec<f64>)> {
        let n = data.n_cells;
        crate::threads::with_threads(n_threads.max(1), || {
            let cells: Vec<usize> = (0..n).collect();
            let mut rec = Vec::with_capacity(n);
            let mut kl = Vec::with_capacity(n);
            for blk in cells.chunks(256) {
                let eps = vec![0.0f32; blk.len() * self.n_latent];
                let o = self.step(data, blk, &eps, 1.0, false);
                rec.extend(o.reconstruction);
                kl.extend(o.kl);
            }
            (rec, kl)
        })
    }

    /// Query training. `on_epoch` is called after every epoch (on the caller's thread);
    /// `cancelled` is polled between minibatches, and a `true` stops training (the model keeps
    /// the updates made so far).
    pub fn train(
        &mut self,
        data: &QueryData,
        opts: &TrainOptions,
        on_epoch: &mut dyn FnMut(&EpochStats),
        cancelled: &dyn Fn() -> bool,
    ) -> ScResult<TrainResult> {
        let n = data.n_cells;
        if n == 0 {
            return Err(ScError::Input("the query has no cells".into()));
        }
        if opts.batch_size == 0 {
            return Err(ScError::Input("batch_size must be positive".into()));
        }
        let (train_idx, val_idx) = match &opts.split {
            Some((t, v)) => {
                if t.iter().chain(v).any(|&j| j >= n) {
                    return Err(ScError::Input(
                        "the split names cells outside the query".into(),
                    ));
                }
                (t.clone(), v.clone())
            }
            None => split_cells(n, opts.train_size, opts.batch_size, opts.seed),
        };
        if train_idx.is_empty() {
            return Err(ScError::Input("the training set is empty".into()));
        }
        let max_epochs = opts.max_epochs.unwrap_or_else(|| max_epochs_heuristic(n));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.n_threads.max(1))
            .build()
            .map_err(|e| ScError::Threads(format!("could not start threads: {e}")))?;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed.wrapping_add(1));
        let nl = self.n_latent;
        let n_params = self.params_mut().len();
        let mut adam_m: Vec<Vec<f32>> = self
            .params_mut()
            .iter()
            .map(|p| vec![0.0; p.len()])
            .collect();
        let mut adam_v = adam_m.clone();
        let mut t_step = 0i32;
        let (b1, b2) = (0.9f64, 0.999f64);
        // no dropout, whatever `freeze_dropout`: scvi-tools trains the query in eval mode
        // (`step` has none)
        let mut history = Vec::new();
        let (mut best, mut wait) = (f64::INFINITY, 0usize);
        let mut stopped_early = false;
        let mut was_cancelled = false;
        let mut order = train_idx.clone();
        'epochs: for epoch in 0..max_epochs {
            let klw = kl_weight(epoch, opts);
            order.shuffle(&mut rng);
            let (mut rec_t, mut kl_t) = (0.0, 0.0);
            for mb in order.chunks(opts.batch_size) {
                if cancelled() {
                    was_cancelled = true;
                    break 'epochs;
                }
                let eps: Vec<f32> = (0..mb.len() * nl)
                    .map(|_| StandardNormal.sample(&mut rng))
                    .collect();
                let out = pool.install(|| self.step(data, mb, &eps, klw, true));
                rec_t += out.reconstruction_sum;
                kl_t += out.kl_sum;
                // Adam (torch): L2 weight decay added to the gradient
                t_step += 1;
                let bc1 = 1.0 - b1.powi(t_step);
                let bc2 = 1.0 - b2.powi(t_step);
                let step_size = (opts.lr / bc1) as f32;
                let bc2s = bc2.sqrt() as f32;
                let (b1f, b2f) = (b1 as f32, b2 as f32);
                let (wd, ae) = (opts.weight_decay as f32, opts.eps as f32);
                let params = self.params_mut();
                debug_assert_eq!(params.len(), n_params);
                for (k, p) in params.into_iter().enumerate() {
                    let gk = &out.grads[k];
                    for i in 0..p.len() {
                        let gi = gk[i] + wd * p[i];
                        let m = &mut adam_m[k][i];
                        let v = &mut adam_v[k][i];
                        *m = b1f * *m + (1.0 - b1f) * gi;
                        *v = b2f * *v + (1.0 - b2f) * gi * gi;
                        p[i] -= step_size * *m / (v.sqrt() / bc2s + ae);
                    }
                }
            }
            let nt = train_idx.len() as f64;
            let mut stats = EpochStats {
                epoch,
                kl_weight: klw,
                elbo_train: (rec_t + kl_t) / nt,
                reconstruction_loss_train: rec_t / nt,
                kl_local_train: kl_t / nt,
                elbo_validation: f64::NAN,
                reconstruction_loss_validation: f64::NAN,
                kl_local_validation: f64::NAN,
            };
            if (opts.validate || opts.early_stopping) && !val_idx.is_empty() {
                let (mut rv, mut kv) = (0.0, 0.0);
                for mb in val_idx.chunks(opts.batch_size) {
                    let eps: Vec<f32> = (0..mb.len() * nl)
                        .map(|_| StandardNormal.sample(&mut rng))
                        .collect();
                    let out = pool.install(|| self.step(data, mb, &eps, klw, false));
                    rv += out.reconstruction_sum;
                    kv += out.kl_sum;
                }
                let nv = val_idx.len() as f64;
                stats.elbo_validation = (rv + kv) / nv;
                stats.reconstruction_loss_validation = rv / nv;
                stats.kl_local_validation = kv / nv;
            }
            on_epoch(&stats);
            let elbo_v = stats.elbo_validation;
            history.push(stats);
            if opts.early_stopping && elbo_v.is_finite() {
                if elbo_v - opts.early_stopping_min_delta < best {
                    best = elbo_v;
                    wait = 0;
                } else {
                    wait += 1;
                    if wait >= opts.early_stopping_patience {
                        stopped_early = true;
                        break;
                    }
                }
            }
        }
        Ok(TrainResult {
            history,
            stopped_early,
            cancelled: was_cancelled,
            train_indices: train_idx,
            validation_indices: val_idx,
        })
    }
}

/// Gradient of the covariate columns: the pre-activation gradient summed over the cells of
/// each code.
fn cov_grad(l: &Layer, d: &[f32], codes: &[u32]) -> Vec<f32> {
    let n = l.n_out;
    let mut g = vec![0.0f32; l.wc.len()];
    if l.n_cov() == 0 {
        return g;
    }
    let rows = d.len() / n.max(1);
    let k = codes.len() / rows.max(1);
    for (row, cs) in d.chunks(n).zip(codes.chunks(k.max(1))) {
        for &c in cs.iter().take(k) {
            let c = c as usize;
            for (a, &v) in g[c * n..(c + 1) * n].iter_mut().zip(row) {
                *a += v;
            }
        }
    }
    g
}

#[derive(Default)]
struct State {
    codes: Vec<u32>,
    enc_y: Vec<Vec<f32>>,
    enc_isd: Vec<Vec<f32>>,
    /// per layer: BatchNorm's normalised values (trainable BatchNorm only, else empty)
    enc_bn: Vec<Vec<f32>>,
    enc_out: Vec<Vec<f32>>,
    mu: Vec<f32>,
    u: Vec<f32>,
    v: Vec<f32>,
}

/// One FC Linear layer of the query model, as [`SurgeryModel::layer_weights`] gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// state-dict base key, e.g. `z_encoder.encoder.fc_layers.Layer 0.0` (`.weight` appended)
    pub key: String,
    pub n_out: usize,
    /// feature inputs, continuous covariates included (the one-hot columns come after them)
    pub n_in: usize,
    /// feature weights, `n_out x n_in` (torch layout)
    pub w: Vec<f32>,
    /// covariate (one-hot) columns, `n_cov x n_out`, one row per column; empty if none
    pub wc: Vec<f32>,
}

impl SurgeryModel {
    /// The encoder then decoder FC layers' current weights with their state-dict keys, for
    /// saving the query model (`scvi::model_write`). Biases, heads and `px_r` are frozen and
    /// equal the reference's.
    pub fn layer_weights(&self) -> Vec<LayerWeights> {
        let named = |prefix: &str, layers: &[Layer]| -> Vec<LayerWeights> {
            layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    // the continuous covariates' columns (`wx`) follow the feature columns
                    let n_x = l.wx.len() / l.n_out.max(1);
                    let w = if n_x == 0 {
                        l.w.clone()
                    } else {
                        let mut w = Vec::with_capacity(l.n_out * (l.n_in + n_x));
                        for o in 0..l.n_out {
                            w.extend_from_slice(&l.w[o * l.n_in..(o + 1) * l.n_in]);
                            w.extend_from_slice(&l.wx[o * n_x..(o + 1) * n_x]);
                        }
                        w
                    };
                    LayerWeights {
                        key: format!("{prefix}.fc_layers.Layer {i}.0"),
                        n_out: l.n_out,
                        n_in: l.n_in + n_x,
                        w,
                        wc: l.wc.clone(),
                    }
                })
                .collect()
        };
        let mut out = named("z_encoder.encoder", &self.enc);
        out.extend(named("decoder.px_decoder", &self.dec));
        out
    }
}
