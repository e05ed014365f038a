//! scannot-core: the pure Rust algorithms of scannot (no R, no extendr).
//!
//! One module per capability. Every entry point takes borrowed views of the caller's
//! memory ([`matrix::ExprMatrix`]) and returns owned results or a [`error::ScError`].

pub mod celltypist;
pub mod celltypist_train;
pub mod dotplot;
pub mod error;
pub mod h5ad;
pub mod knn;
pub mod matrix;
pub mod normalize;
pub mod pickle;
pub mod scvi;
pub mod simulate;
pub mod threads;
pub mod wilcoxon;

pub use error::{ScError, ScResult};
