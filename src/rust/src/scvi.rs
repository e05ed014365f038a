//! Glue for scvi-tools models (spec section 5): loading a saved `model.pt` once into an R
//! external pointer, and the eval-mode encoder latent.
//!
//! The external pointer holds a [`ScviHandle`] (the parsed file and the ready encoder). It
//! does not survive `saveRDS()` (R restores it as a NULL pointer); the R side checks with
//! `rs_scvi_loaded()` and re-loads from the model's path.

use crate::convert::{guard, threads};
use crate::expr_matrix;
use extendr_api::prelude::*;
use extendr_api::Result;
use scannot_core::scvi::{read_scvi_model, Covariates, ScviEncoder, ScviModelFile};
use scannot_core::{ScError, ScResult};
use std::path::Path;

/// A loaded scvi-tools model: what the R object's external pointer owns.
pub(crate) struct ScviHandle {
    /// the whole file (decoder weights, registry) for query training (`scvi_map_query`)
    #[allow(dead_code)]
    pub(crate) model: ScviModelFile,
    pub(crate) encoder: ScviEncoder,
}

/// The handle behind an R external pointer made by `rs_scvi_load()`; an error (not a panic)
/// for anything else, including a pointer restored NULL by `readRDS()`.
pub(crate) fn scvi_handle(ptr: &Robj) -> ScResult<ExternalPtr<ScviHandle>> {
    if !ptr.is_external_pointer() {
        return Err(ScError::Input(
            "the model handle is not an external pointer; load the model with load_scvi_model()"
                .into(),
        ));
    }
    ExternalPtr::<ScviHandle>::try_from(ptr).map_err(|_| {
        ScError::Input(
            "the model handle is empty (the model object was saved and restored, which drops \
             its weights) or foreign; load the model again with load_scvi_model()"
                .into(),
        )
    })
}

fn opt(s: &Option<String>) -> Robj {
    match s {
        Some(s) => s.into(),
        None => ().into(),
    }
}

/// Read a saved scvi-tools model (folder or model.pt) and build its encoder; returns the
/// external pointer and the model description as plain vectors.
/// @noRd
#[extendr]
fn rs_scvi_load(path: &str) -> Result<List> {
    guard(|| {
        let model = read_scvi_model(Path::new(path))?;
        let encoder = ScviEncoder::from_model(&model)?;
        let p = &model.init;
        let s = &model.setup;
        let (cat_keys, cat_levels): (Vec<String>, Vec<Vec<String>>) =
            model.extra_categorical.iter().cloned().unzip();
        let cat_levels = List::from_values(cat_levels);
        let kwargs: Vec<String> = p.kwargs.iter().map(|(k, _)| k.clone()).collect();
        let desc = list!(
            var_names = model.var_names.clone(),
            n_hidden = p.n_hidden as i32,
            n_latent = encoder.n_latent() as i32,
            n_layers = p.n_layers as i32,
            dropout_rate = p.dropout_rate,
            dispersion = p.dispersion.clone(),
            gene_likelihood = p.gene_likelihood.clone(),
            latent_distribution = p.latent_distribution.clone(),
            use_observed_lib_size = p.use_observed_lib_size,
            use_batch_norm = p.use_batch_norm.clone(),
            use_layer_norm = p.use_layer_norm.clone(),
            encode_covariates = p.encode_covariates,
            deeply_inject_covariates = p.deeply_inject_covariates,
            batch_representation = p.batch_representation.clone(),
            log_variational = p.log_variational,
            kwargs = kwargs,
            layer = opt(&s.layer),
            batch_key = opt(&s.batch_key),
            labels_key = opt(&s.labels_key),
            size_factor_key = opt(&s.size_factor_key),
            batch_mapping = model.batch_mapping.clone(),
            n_batch = model.n_batch as i32,
            labels_mapping = model.labels_mapping.clone(),
            cat_keys = cat_keys,
            cat_levels = cat_levels,
            cont_keys = model.extra_continuous.clone(),
            scvi_version = opt(&model.scvi_version),
            model_name = opt(&model.model_name),
            encoder_uses_covariates = encoder.uses_covariates()
        );
        let ptr = ExternalPtr::new(ScviHandle { model, encoder });
        Ok(list!(ptr = ptr, desc = desc))
    })
}

/// Whether `ptr` is a live model handle (FALSE after saveRDS/readRDS or for other objects).
/// @noRd
#[extendr]
fn rs_scvi_loaded(ptr: Robj) -> bool {
    scvi_handle(&ptr).is_ok()
}

fn codes(v: &Robj, what: &str) -> ScResult<Vec<u32>> {
    let s = v
        .as_integer_slice()
        .ok_or_else(|| ScError::Input(format!("{what} codes must be an integer vector")))?;
    s.iter()
        .map(|&c| {
            u32::try_from(c).map_err(|_| {
                ScError::Input(format!("{what} codes must be >= 0 and not NA (got {c})"))
            })
        })
        .collect()
}

/// Encoder latent mean and variance (cells x latent, column-major) of raw counts aligned to
/// the model's genes. `batch` holds 0-based codes (may be empty when the encoder ignores
/// batch); `cats` a list of 0-based code vectors, `conts` a list of double vectors, in the
/// model's covariate order. `non_integer`: some count is not a whole number.
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_scvi_latent(
    ptr: Robj,
    p: &[i32],
    i: &[i32],
    x: &[f64],
    nrow: i32,
    ncol: i32,
    dense: bool,
    batch: Robj,
    cats: List,
    conts: List,
    batch_size: i32,
    n_threads: i32,
) -> Result<List> {
    guard(|| {
        let h = scvi_handle(&ptr)?;
        let m = expr_matrix(p, i, x, nrow, ncol, dense)?;
        let batch = if batch.is_null() || batch.len() == 0 {
            None
        } else {
            Some(codes(&batch, "batch")?)
        };
        let cats: Vec<Vec<u32>> = cats
            .values()
            .enumerate()
            .map(|(k, v)| codes(&v, &format!("categorical covariate {}", k + 1)))
            .collect::<ScResult<_>>()?;
        let conts_robj: Vec<Robj> = conts.values().collect();
        let conts: Vec<&[f64]> = conts_robj
            .iter()
            .map(|v| {
                v.as_real_slice().ok_or_else(|| {
                    ScError::Input("continuous covariates must be double vectors".into())
                })
            })
            .collect::<ScResult<_>>()?;
        let cov = Covariates {
            batch: batch.as_deref(),
            categorical: cats.iter().map(|c| c.as_slice()).collect(),
            continuous: conts,
        };
        let block = usize::try_from(batch_size)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| ScError::Input("batch_size must be a whole number >= 1".into()))?;
        // scVI takes raw counts: non-whole values (normalised data) are flagged for a
        // warning by the pass that transforms the counts
        let enc = &h.encoder;
        let (out, non_integer) = threads(n_threads, || enc.latent_counts(&m, &cov, block))??;
        Ok(list!(
            mean = out.mean,
            var = out.var,
            n_cells = out.n_cells as i32,
            n_latent = out.n_latent as i32,
            non_integer = non_integer
        ))
    })
}

extendr_module! {
    mod scvi;
    fn rs_scvi_load;
    fn rs_scvi_loaded;
    fn rs_scvi_latent;
}
