//! One error type for the whole core. Each variant maps to an R condition class
//! `scannot_error_<kind>` (see [`ScError::kind`]), so R users can catch precise failures.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ScError {
    /// An argument has the wrong value or shape.
    #[error("{0}")]
    Input(String),
    /// Matrix dimensions or slot lengths disagree.
    #[error("{0}")]
    Dims(String),
    /// Group labels are invalid (missing, too few cells...).
    #[error("{0}")]
    Groups(String),
    /// A numeric value is not allowed (NaN, negative counts...).
    #[error("{0}")]
    Value(String),
    /// The thread pool could not be built.
    #[error("{0}")]
    Threads(String),
    /// A file (pickle, torch archive, model) is unreadable, truncated or of an unsupported kind.
    #[error("{0}")]
    Format(String),
}

impl ScError {
    /// The R condition subclass suffix: `scannot_error_<kind>`.
    pub fn kind(&self) -> &'static str {
        match self {
            ScError::Input(_) => "input",
            ScError::Dims(_) => "dims",
            ScError::Groups(_) => "groups",
            ScError::Value(_) => "value",
            ScError::Threads(_) => "threads",
            ScError::Format(_) => "format",
        }
    }
}

pub type ScResult<T> = Result<T, ScError>;
