//! scvi-tools models without Python: read a saved `model.pt` ([`model_file`]) and run the
//! encoder in eval mode ([`vae`]) to get the same latent representation as
//! `model.get_latent_representation()`.

pub mod model_file;
pub mod vae;

pub use model_file::{
    find_model_file, parse_scvi_model, read_scvi_model, InitParams, ScviModelFile, SetupArgs,
    Tensor, TensorData,
};
pub use vae::{Covariates, LatentOutput, ScviEncoder};

#[cfg(test)]
mod tests;
