# Classed errors: every error scannot raises inherits from "scannot_error" and a
# subclass naming what was wrong, so callers can catch precisely.

abort_scannot <- function(message, class, call = rlang::caller_env(), ...) {
  rlang::abort(message, class = c(paste0("scannot_error_", class), "scannot_error"),
               call = call, ...)
}

# Evaluate a call into the Rust core and turn its errors into classed conditions.
# The glue prefixes core errors with "[scannot_error_<kind>] "; anything else
# (which should not happen) becomes scannot_error_internal.
rs_call <- function(expr, call = rlang::caller_env()) {
  tryCatch(expr, error = function(e) {
    msg <- conditionMessage(e)
    m <- regmatches(msg, regexec("\\[(scannot_error_[a-z_]+)\\] ([\\s\\S]*)", msg, perl = TRUE))[[1]]
    if (length(m) == 3) {
      rlang::abort(trimws(m[3]), class = c(m[2], "scannot_error"), call = call)
    }
    rlang::abort(paste0("internal error in scannot's Rust core: ", msg),
                 class = c("scannot_error_internal", "scannot_error"), call = call)
  })
}

check_flag <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.logical(x) || length(x) != 1L || is.na(x)) {
    abort_scannot(sprintf("`%s` must be TRUE or FALSE.", arg), "input", call = call)
  }
  x
}

check_number <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.numeric(x) || length(x) != 1L || is.na(x)) {
    abort_scannot(sprintf("`%s` must be a single number.", arg), "input", call = call)
  }
  as.numeric(x)
}

check_string <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.character(x) || length(x) != 1L || is.na(x) || !nzchar(x)) {
    abort_scannot(sprintf("`%s` must be a single non-empty string.", arg), "input",
                  call = call)
  }
  x
}
