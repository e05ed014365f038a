//! Glue of scArches query training (scannot-core `scvi::train`).

use crate::convert::guard;
use crate::expr_matrix;
use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::scvi::{
    query_model_file, read_scvi_model, write_scvi_model, QueryInfo, SurgeryModel, TrainOptions,
};
use scannot_core::{ScError, ScResult};
use std::os::raw::{c_int, c_void};
use std::time::Instant;

extern "C" {
    fn R_ToplevelExec(fun: Option<unsafe extern "C" fn(*mut c_void)>, data: *mut c_void) -> c_int;
    fn R_CheckUserInterrupt();
}

unsafe extern "C" fn check_interrupt(_: *mut c_void) {
    R_CheckUserInterrupt();
}

/// True when the user pressed Ctrl-C / Esc: `R_CheckUserInterrupt` run under
/// `R_ToplevelExec`, so the interrupt cannot jump over Rust frames. Main thread only.
fn user_interrupted() -> bool {
    // SAFETY: called on R's main thread (the training loop runs on the calling thread).
    unsafe { R_ToplevelExec(Some(check_interrupt), std::ptr::null_mut()) == 0 }
}

/// The per-epoch metrics under scvi-tools' history names (validation ones only when
/// computed).
fn history_columns(h: &[scannot_core::scvi::EpochStats]) -> Vec<(String, Vec<f64>)> {
    type Get = fn(&scannot_core::scvi::EpochStats) -> f64;
    let cols: [(&str, Get); 7] = [
        ("elbo_train", |e| e.elbo_train),
        ("reconstruction_loss_train", |e| e.reconstruction_loss_train),
        ("kl_local_train", |e| e.kl_local_train),
        ("kl_global_train", |_| 0.0),
        ("elbo_validation", |e| e.elbo_validation),
        ("reconstruction_loss_validation", |e| {
            e.reconstruction_loss_validation
        }),
        ("kl_local_validation", |e| e.kl_local_validation),
    ];
    cols.iter()
        .map(|(k, f)| (k.to_string(), h.iter().map(f).collect::<Vec<f64>>()))
        .filter(|(_, v)| !v.is_empty() && v.iter().any(|x| x.is_finite()))
        .collect()
}

/// scArches query training of an SCVI model and the query latent.
/// `batch`: 0-based codes in the query model's batch order (reference levels, then the
/// new levels `new_levels`). `cats`: list per extra categorical covariate (model order) of
/// 0-based codes (reference levels, then the new ones `new_cats[[k]]`, a character vector);
/// `conts`: list per extra
/// continuous covariate of double vectors. `max_epochs` < 1: scvi's heuristic. `progress`: NULL or an R
/// function(epoch, elbo_train, elbo_validation) called after every epoch. `save_dir`: ""
/// or the folder to write the query model's `model.pt` into (scvi-tools' layout).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_scvi_map_query(
    model_path: &str,
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    batch: &[i32],
    new_levels: Strings,
    cats: List,
    new_cats: List,
    conts: List,
    max_epochs: i32,
    batch_size: i32,
    train_size: f64,
    lr: f64,
    weight_decay: f64,
    n_epochs_kl_warmup: i32,
    early_stopping: bool,
    early_stopping_patience: i32,
    freeze_dropout: bool,
    seed: f64,
    n_threads: i32,
    progress: Robj,
    save_dir: &str,
) -> Result<List> {
    let progress_fn = if progress.is_null() {
        None
    } else {
        Some(
            progress
                .as_function()
                .ok_or_else(|| Error::Other("progress must be NULL or a function".into()))?,
        )
    };
    let out = guard(|| -> ScResult<_> {
        let m = read_scvi_model(std::path::Path::new(model_path))?;
        let new_levels: Vec<String> = new_levels.iter().map(|s| s.to_string()).collect();
        let n_new = new_levels.len();
        let seed = if seed.is_finite() && seed >= 0.0 {
            seed as u64
        } else {
            0
        };
        let cats: Vec<Vec<u32>> = cats
            .values()
            .map(|v| {
                v.as_integer_slice()
                    .filter(|c| c.iter().all(|&b| b >= 0))
                    .map(|c| c.iter().map(|&b| b as u32).collect())
                    .ok_or_else(|| {
                        ScError::Input(
                            "categorical covariate codes must be integers >= 0 (no NA)".into(),
                        )
                    })
            })
            .collect::<ScResult<_>>()?;
        let conts: Vec<Vec<f64>> = conts
            .values()
            .map(|v| {
                v.as_real_slice().map(|c| c.to_vec()).ok_or_else(|| {
                    ScError::Input("continuous covariates must be double vectors".into())
                })
            })
            .collect::<ScResult<_>>()?;
        let new_cats: Vec<Vec<String>> = new_cats
            .values()
            .map(|v| {
                if v.len() == 0 {
                    return Ok(Vec::new());
                }
                v.as_str_vector()
                    .map(|s| s.iter().map(|x| x.to_string()).collect())
                    .ok_or_else(|| {
                        ScError::Input(
                            "the new levels of a categorical covariate must be character".into(),
                        )
                    })
            })
            .collect::<ScResult<_>>()?;
        let n_new_cats: Vec<usize> = new_cats.iter().map(Vec::len).collect();
        let mut s = SurgeryModel::from_model_covs(&m, n_new, &n_new_cats, seed)?;
        let counts = expr_matrix(p, i, x, nrow, ncol, dense)?;
        if batch.iter().any(|&b| b < 0) {
            return Err(ScError::Input("batch codes must be >= 0 (no NA)".into()));
        }
        let codes: Vec<u32> = batch.iter().map(|&b| b as u32).collect();
        let data = s.prepare_covs(&counts, &codes, &cats, &conts)?;
        let threads = if n_threads > 0 {
            n_threads as usize
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        if batch_size < 1 {
            return Err(ScError::Input(
                "batch_size must be a positive integer".into(),
            ));
        }
        if !(train_size > 0.0 && train_size <= 1.0) {
            return Err(ScError::Input("train_size must be in (0, 1]".into()));
        }
        let opts = TrainOptions {
            max_epochs: (max_epochs > 0).then_some(max_epochs as usize),
            batch_size: batch_size as usize,
            train_size,
            lr,
            weight_decay,
            n_epochs_kl_warmup: (n_epochs_kl_warmup > 0).then_some(n_epochs_kl_warmup as usize),
            early_stopping,
            early_stopping_patience: early_stopping_patience.max(1) as usize,
            seed,
            freeze_dropout,
            n_threads: threads,
            ..Default::default()
        };
        let mut seconds = Vec::new();
        let mut t0 = Instant::now();
        let mut cb_error = None;
        let res = s.train(
            &data,
            &opts,
            &mut |e| {
                seconds.push(t0.elapsed().as_secs_f64());
                if let (Some(f), None) = (&progress_fn, &cb_error) {
                    if let Err(err) = f.call(pairlist!(
                        e.epoch as f64 + 1.0,
                        e.elbo_train,
                        e.elbo_validation
                    )) {
                        cb_error = Some(err.to_string());
                    }
                }
                t0 = Instant::now();
            },
            &user_interrupted,
        )?;
        if let Some(e) = cb_error {
            return Err(ScError::Input(format!("the progress function failed: {e}")));
        }
        let lat = s.latent(&data, threads)?;
        let saved = if save_dir.is_empty() {
            None
        } else {
            let info = QueryInfo {
                new_batch_levels: new_levels,
                new_cat_levels: new_cats,
                n_obs: data.n_cells(),
                train_indices: res.train_indices.clone(),
                validation_indices: res.validation_indices.clone(),
                seed,
                history: history_columns(&res.history),
            };
            let q = query_model_file(&m, &s, &info)?;
            Some(write_scvi_model(&q, std::path::Path::new(save_dir))?)
        };
        Ok((res, lat, seconds, s.n_batch(), saved))
    })?;
    let (res, lat, seconds, n_batch, saved) = out;
    let saved: Robj = match saved {
        Some(p) => p.to_string_lossy().into_owned().into(),
        None => ().into(),
    };
    let h = &res.history;
    let col = |f: &dyn Fn(&scannot_core::scvi::EpochStats) -> f64| -> Vec<f64> {
        h.iter().map(f).collect()
    };
    let history = list!(
        epoch = col(&|e| e.epoch as f64 + 1.0),
        kl_weight = col(&|e| e.kl_weight),
        elbo_train = col(&|e| e.elbo_train),
        reconstruction_loss_train = col(&|e| e.reconstruction_loss_train),
        kl_local_train = col(&|e| e.kl_local_train),
        elbo_validation = col(&|e| e.elbo_validation),
        reconstruction_loss_validation = col(&|e| e.reconstruction_loss_validation),
        kl_local_validation = col(&|e| e.kl_local_validation),
        seconds = seconds
    );
    let one_based = |v: &[usize]| -> Vec<i32> { v.iter().map(|&j| j as i32 + 1).collect() };
    Ok(list!(
        latent = lat.mean,
        latent_var = lat.var,
        n_latent = lat.n_latent as i32,
        history = history,
        stopped_early = res.stopped_early,
        cancelled = res.cancelled,
        n_batch = n_batch as i32,
        train_indices = one_based(&res.train_indices),
        validation_indices = one_based(&res.validation_indices),
        model_file = saved
    ))
}

extendr_module! {
    mod scvi_train;
    fn rs_scvi_map_query;
}
