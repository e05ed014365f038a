//! scvi-tools models without Python: read a saved `model.pt` ([`model_file`]) and run the
//! encoder in eval mode ([`vae`]) to get the same latent representation as
//! `model.get_latent_representation()`; scArches query training ([`train`], with the fused
//! likelihood in [`loss`]); and saving a model (the scArches query model) as scvi-tools'
//! `model.pt` ([`model_write`]).

#[cfg(all(target_arch = "x86_64", scannot_avx512))]
mod heads_avx512;
#[cfg(all(target_arch = "x86_64", scannot_avx512))]
mod latent_avx512;
pub mod loss;
pub(crate) mod loss_avx2;
#[cfg(all(target_arch = "x86_64", scannot_avx512))]
pub(crate) mod loss_avx512;
pub mod model_file;
pub mod model_write;
pub(crate) mod simd;
pub mod train;
pub mod vae;

pub use model_file::{
    find_model_file, parse_scvi_model, read_scvi_model, InitParams, ScviModelFile, SetupArgs,
    Tensor, TensorData,
};
pub use model_write::{
    query_model_file, scvi_model_bytes, write_scvi_model, write_torch_zip, QueryInfo,
};
pub use train::{
    kl_weight, max_epochs_heuristic, split_cells, EpochStats, LayerWeights, QueryData,
    SurgeryModel, TrainOptions, TrainResult,
};
pub use vae::{Covariates, LatentOutput, ScviEncoder};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod train_tests;
#[cfg(test)]
mod write_tests;
