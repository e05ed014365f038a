//! Error, panic and thread plumbing shared by every glue function.

use extendr_api::Error;
use scannot_core::{ScError, ScResult};

/// Run `f`, turning core errors into `[scannot_error_<kind>] message` R errors and
/// panics into `[scannot_error_internal]` errors, so nothing unwinds into R.
pub fn guard<T, F: FnOnce() -> ScResult<T>>(f: F) -> extendr_api::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Other(format!("[scannot_error_{}] {}", e.kind(), e))),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Other(format!(
                "[scannot_error_internal] internal error in scannot's Rust core ({msg}); \
                 please report it with a reproducible example"
            )))
        }
    }
}

/// Run `f` on a rayon pool of `n` threads (`n <= 0`: all cores).
pub fn threads<T: Send, F: FnOnce() -> T + Send>(n: i32, f: F) -> ScResult<T> {
    if n > 1024 {
        return Err(ScError::Input(format!(
            "n_threads = {n} is too large; use at most the number of cores"
        )));
    }
    scannot_core::threads::with_threads(n.max(0) as usize, f)
}
