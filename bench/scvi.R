# Benchmark: scVI latent (encoder mean), seed-scale case: simulated counts, 4,000 genes,
# a reference of 3,000 cells trains an scvi-tools model with the scArches settings (briefly,
# outside the timing), 11,600 query cells get their latent from scannot::scvi_latent() and
# scvi-tools' get_latent_representation(), in one run on the same threads.
#   Rscript bench/scvi.R [python-with-scvi-tools]
suppressPackageStartupMessages(library(scannot))
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args)) args[1] else Sys.getenv("SCANNOT_SCVI_PYTHON",
                                                 "/tmp/scannot-scvi-venv/bin/python")
threads <- as.integer(Sys.getenv("SCANNOT_BENCH_THREADS", "2"))
epochs <- as.integer(Sys.getenv("SCANNOT_SCVI_EPOCHS", "3"))
if (!file.exists(py)) {
  cat("scvi-tools peer skipped: no Python with scvi-tools at ", py,
      " (run tools/fixtures/make_fixtures.sh or set SCANNOT_SCVI_PYTHON)\n", sep = "")
  quit(status = 0)
}
n_query <- 11600
sim <- simulate_counts(n_cells = 3000 + n_query, n_genes = 4000, n_types = 8, n_batches = 2,
                       seed = 2026, as = "list", n_threads = threads)
x <- sim$counts
batch <- as.character(sim$cells$batch)
ref <- x[, seq_len(3000)]
query <- x[, -seq_len(3000)]
qbatch <- batch[-seq_len(3000)]
cat(sprintf("query: %d genes x %d cells, %.1f%% non-zero (raw counts)\n", nrow(query),
            ncol(query), 100 * length(query@x) / prod(dim(query))))
dir <- tempfile("scannot-bench-scvi-"); dir.create(dir)
for (nm in c("ref", "query")) {
  m <- get(nm)
  writeBin(m@x, file.path(dir, paste0(nm, "_x.bin"))); writeBin(m@i, file.path(dir, paste0(nm, "_i.bin")))
  writeBin(m@p, file.path(dir, paste0(nm, "_p.bin")))
}
writeLines(rownames(x), file.path(dir, "genes.txt"))
writeLines(batch[seq_len(3000)], file.path(dir, "ref_batch.txt"))
writeLines(qbatch, file.path(dir, "query_batch.txt"))
out <- system2(py, c("bench/peers/scvi_latent.py", dir, nrow(x), threads, epochs),
               stdout = TRUE, stderr = TRUE)
cat(paste0("  | ", grep("seconds=|train|Error|error", out, value = TRUE)), sep = "\n")
s <- grep("seconds=", out, value = TRUE)
t_peer <- if (length(s)) as.numeric(sub(".*seconds=", "", s)) else NA_real_

t_load <- system.time(model <- load_scvi_model(file.path(dir, "model")))[["elapsed"]]
print(model)
invisible(scvi_latent(query, model, batch_key = qbatch, n_threads = threads)) # warm-up
z <- NULL
# best of 5 (as the peer), timed with a microsecond clock (system.time() counts whole
# milliseconds, 3 % of this call)
t <- sapply(1:5, function(i) {
  t0 <- Sys.time()
  z <<- scvi_latent(query, model, batch_key = qbatch, n_threads = threads)
  as.numeric(difftime(Sys.time(), t0, units = "secs"))
})
t_scannot <- min(t)
cat(sprintf("scannot load_scvi_model: %.3f s; scvi_latent (%d threads): %.4f s (best of 5)\n",
            t_load, threads, t_scannot))
if (!is.na(t_peer)) {
  gold <- matrix(readBin(file.path(dir, "latent.bin"), "double", ncol(query) * model$n_latent),
                 ncol(query))
  cat(sprintf("max |scannot - scvi-tools| latent: %.2e\n", max(abs(unclass(z) - gold))))
  cat(sprintf("RATIO scvi_latent: scvi-tools %.3f s / scannot %.4f s = %.1fx\n",
              t_peer, t_scannot, t_peer / t_scannot))
} else {
  cat("RATIO scvi_latent: peer not run\n")
}
keep <- Sys.getenv("SCANNOT_BENCH_KEEP", "")
if (nzchar(keep)) {
  # for profiling without R: src/rust/core/examples/scvi_latent_speed.rs reads this folder
  writeLines(as.character(match(qbatch, model$batch_levels) - 1L), file.path(dir, "query_codes.txt"))
  dir.create(keep, showWarnings = FALSE, recursive = TRUE)
  file.copy(list.files(dir, full.names = TRUE), keep, recursive = TRUE)
  cat("kept the data in ", keep, "\n", sep = "")
}
unlink(dir, recursive = TRUE)
