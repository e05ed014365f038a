# Benchmark: seed-scale weighted kNN label transfer (86,332 reference x 28,911 query
# cells, 10-d latent, k = 15), scannot knn_transfer() vs scArches 0.6.1 in one run.
#   Rscript bench/knn.R [python-with-scarches]
# Simulated latents (seeded), 20 cell types with centres ~ N(0, 1.5^2) per dimension:
#  * "programs" (timed against scArches): each type varies along 3 random directions
#    (cell = centre + A_type z, z ~ N(0, 0.8^2 I_3)) plus N(0, 0.15^2) noise in all 10
#    dimensions -- low intrinsic dimension within a type, as in an scVI latent;
#  * "isotropic" (worst case for any exact search): cell = centre + N(0, 0.6^2 I_10).
# scArches' brute-force search and Python loop cost the same on both.
suppressPackageStartupMessages(library(scannot))
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args)) args[1] else Sys.getenv("SCANNOT_SCARCHES_PYTHON", "/tmp/scannot-scarches-venv/bin/python")
threads <- as.integer(Sys.getenv("SCANNOT_BENCH_THREADS", "2"))
n_ref <- 86332L; n_query <- 28911L; dim <- 10L; k <- 15L

set.seed(2026)
centres <- matrix(rnorm(20 * dim, sd = 1.5), 20)
programs <- lapply(1:20, function(i) matrix(rnorm(dim * 3), dim))
simulate <- function(n, kind) {
  type <- sample(20, n, replace = TRUE)
  x <- centres[type, ]
  if (kind == "programs") {
    z <- matrix(rnorm(n * 3, sd = 0.8), n)
    for (i in 1:20) {
      w <- type == i
      x[w, ] <- x[w, ] + z[w, , drop = FALSE] %*% t(programs[[i]])
    }
    x <- x + matrix(rnorm(n * dim, sd = 0.15), n)
  } else {
    x <- x + matrix(rnorm(n * dim, sd = 0.6), n)
  }
  list(x = x, type = type)
}
sim_ref <- simulate(n_ref, "programs")
sim_qry <- simulate(n_query, "programs")
ref <- sim_ref$x
qry <- sim_qry$x
labels <- data.frame(cell_type = sprintf("type_%02d", sim_ref$type), stringsAsFactors = FALSE)
cat(sprintf("data: %d reference x %d query cells, %d dimensions, k = %d, %d threads\n",
            n_ref, n_query, dim, k, threads))

invisible(knn_transfer(qry[1:100, ], ref, "cell_type", k = k, reference_labels = labels,
                       n_threads = threads))  # warm-up
res <- NULL
t <- sapply(1:5, function(i) system.time(
  res <<- knn_transfer(qry, ref, "cell_type", k = k, reference_labels = labels,
                       n_threads = threads))[["elapsed"]])
t_scannot <- min(t)
cat(sprintf("scannot knn_transfer (programs latent): %.3f s (best of 5; median %.3f s)\n",
            t_scannot, stats::median(t)))
iso_ref <- simulate(n_ref, "isotropic")
iso_qry <- simulate(n_query, "isotropic")
iso_lab <- data.frame(cell_type = sprintf("type_%02d", iso_ref$type))
t_iso <- min(sapply(1:3, function(i) system.time(
  knn_transfer(iso_qry$x, iso_ref$x, "cell_type", k = k, reference_labels = iso_lab,
               n_threads = threads))[["elapsed"]]))
cat(sprintf("scannot knn_transfer (isotropic latent, worst case): %.3f s (best of 3)\n", t_iso))

if (file.exists(py)) {
  dir <- tempfile("scannot-bench-knn-"); dir.create(dir)
  writeBin(as.vector(t(ref)), file.path(dir, "reference.bin"))
  writeBin(as.vector(t(qry)), file.path(dir, "query.bin"))
  writeLines(labels$cell_type, file.path(dir, "labels.txt"))
  out <- system2(py, c("bench/peers/knn_scarches.py", dir, n_ref, n_query, dim, k),
                 stdout = TRUE, stderr = FALSE)
  cat(grep("seconds=", out, value = TRUE), sep = "\n")
  t_peer <- as.numeric(sub(".*seconds=", "", grep("seconds=", out, value = TRUE)))
  gl <- readLines(file.path(dir, "scarches_labels.txt"))
  gu <- readBin(file.path(dir, "scarches_uncert.bin"), "double", n = n_query)
  cat(sprintf("agreement with scArches: labels %.4f%% identical, max |uncertainty diff| %.2e\n",
              100 * mean(gl == res$cell_type_transfer), max(abs(gu - res$cell_type_uncertainty))))
  cat(sprintf("RATIO knn_transfer: scArches %.3f s / scannot %.3f s = %.0fx\n", t_peer,
              t_scannot, t_peer / t_scannot))
  cat(sprintf("RATIO knn_transfer isotropic (same scArches time; its cost is data-independent): %.0fx\n",
              t_peer / t_iso))
  unlink(dir, recursive = TRUE)
} else {
  cat("scArches peer skipped: no Python with scarches at ", py,
      " (run tools/fixtures/make_fixtures.sh or set SCANNOT_SCARCHES_PYTHON)\n", sep = "")
}
