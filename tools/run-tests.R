# Runs the testthat suite against the installed scannot and prints one closing line
# "testthat: N passed, N failed, N skipped"; exits non-zero on any failure.
suppressPackageStartupMessages({ library(testthat); library(scannot) })
res <- as.data.frame(test_dir("tests/testthat", package = "scannot", load_package = "installed",
                              reporter = "summary", stop_on_failure = FALSE))
failed <- sum(res$failed) + sum(res$error)
cat(sprintf("testthat: %d passed, %d failed, %d skipped\n", sum(res$passed), failed,
            sum(res$skipped)))
quit(status = if (failed > 0) 1 else 0)
