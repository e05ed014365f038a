//! Run work on a rayon pool of an exact size, chosen by the caller (`n_threads` in R).

use crate::error::{ScError, ScResult};

/// Run `f` inside a dedicated rayon pool with `n_threads` threads (0 = all cores).
pub fn with_threads<T: Send, F: FnOnce() -> T + Send>(n_threads: usize, f: F) -> ScResult<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n_threads)
        .build()
        .map_err(|e| ScError::Threads(format!("could not start {n_threads} threads: {e}")))?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_requested_size() {
        assert_eq!(with_threads(1, rayon::current_num_threads).unwrap(), 1);
        assert_eq!(with_threads(3, rayon::current_num_threads).unwrap(), 3);
    }
}
