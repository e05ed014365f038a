#' Number of threads used by scannot
#'
#' Heavy functions take `n_threads`; `NULL` means `getOption("scannot.threads")`,
#' and if that is unset, all cores.
#' @param n_threads `NULL` or a positive whole number.
#' @return The number of threads, an integer.
#' @export
#' @examples
#' scannot_threads()
#' scannot_threads(2)
scannot_threads <- function(n_threads = NULL) {
  call <- rlang::caller_env()
  if (is.null(n_threads)) n_threads <- getOption("scannot.threads", NULL)
  if (is.null(n_threads)) n_threads <- parallel::detectCores(logical = TRUE)
  if (!is.numeric(n_threads) || length(n_threads) != 1L || is.na(n_threads) ||
      n_threads < 1 || n_threads != round(n_threads) || n_threads > 1024) {
    abort_scannot("`n_threads` must be a positive whole number (or NULL for all cores).",
                  "input", call = call)
  }
  as.integer(n_threads)
}
