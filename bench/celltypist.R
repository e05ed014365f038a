# Benchmark: CellTypist annotate, seed-scale case (simulated 28,911 cells x 15,674 genes:
# 17.3k reference cells train a model with celltypist, 11.6k query cells are annotated),
# scannot vs celltypist 1.7.1 in one run (best match, no voting, model file from celltypist).
#   Rscript bench/celltypist.R [python-with-celltypist]
suppressPackageStartupMessages(library(scannot))
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args)) args[1] else Sys.getenv("SCANNOT_CELLTYPIST_PYTHON",
                                                 "/tmp/scannot-celltypist-venv/bin/python")
threads <- as.integer(Sys.getenv("SCANNOT_BENCH_THREADS", "2"))
if (!file.exists(py)) {
  cat("celltypist peer skipped: no Python with celltypist at ", py,
      " (run tools/fixtures/make_fixtures.sh or set SCANNOT_CELLTYPIST_PYTHON)\n", sep = "")
  quit(status = 0)
}
sim <- simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, seed = 2026, as = "list",
                       n_threads = threads)
x <- normalize_counts(sim$counts, n_threads = threads)
lab <- as.character(sim$cells$cell_type)
rm(sim); invisible(gc())
n_ref <- 17311
ref <- x[, seq_len(n_ref)]
query <- x[, -seq_len(n_ref)]
# the reference only needs to give a model of the real size: 3,000 cells keep training short
ref <- ref[, seq_len(3000)]
cat(sprintf("query: %d genes x %d cells, %.1f%% non-zero\n", nrow(query), ncol(query),
            100 * length(query@x) / prod(dim(query))))
dir <- tempfile("scannot-bench-ct-"); dir.create(dir)
for (nm in c("ref", "query")) {
  m <- get(nm)
  writeBin(m@x, file.path(dir, paste0(nm, "_x.bin"))); writeBin(m@i, file.path(dir, paste0(nm, "_i.bin")))
  writeBin(m@p, file.path(dir, paste0(nm, "_p.bin")))
}
writeLines(rownames(x), file.path(dir, "genes.txt"))
writeLines(lab[seq_len(3000)], file.path(dir, "ref_labels.txt"))
writeLines(colnames(query), file.path(dir, "query_cells.txt"))
out <- system2(py, c("bench/peers/celltypist_celltypist.py", dir, nrow(x)), stdout = TRUE)
cat(out, sep = "\n")
t_peer <- as.numeric(sub(".*seconds=", "", grep("seconds=", out, value = TRUE)))

t_load <- system.time(model <- load_celltypist_model(file.path(dir, "model.pkl")))[["elapsed"]]
print(model)
invisible(annotate_celltypist(query, model, n_threads = threads))  # warm-up
r <- NULL
t <- sapply(1:5, function(i) system.time(
  r <<- annotate_celltypist(query, model, return_probabilities = TRUE, n_threads = threads))[["elapsed"]])
t_scannot <- min(t)
cat(sprintf("scannot load_celltypist_model: %.3f s; annotate_celltypist (%d threads): %.4f s (best of 5)\n",
            t_load, threads, t_scannot))
gold <- readLines(file.path(dir, "labels.txt"))
prob <- matrix(readBin(file.path(dir, "prob.bin"), "double", ncol(query) * length(model$cell_types)),
               ncol(query))
cat(sprintf("labels identical: %.4f%%; max |scannot - celltypist| probability: %.2e\n",
            100 * mean(as.character(r$predicted_labels) == gold),
            max(abs(attr(r, "probability") - prob))))
cat(sprintf("RATIO celltypist_annotate: celltypist %.3f s / scannot %.4f s = %.1fx\n",
            t_peer, t_scannot, t_peer / t_scannot))
unlink(dir, recursive = TRUE)
