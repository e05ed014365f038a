# Benchmark: CellTypist training, seed-scale case (simulated 28,911 cells x 15,674 genes, 8
# types: 17,311 reference cells train, the other 11,600 are held out), scannot
# train_celltypist() vs celltypist.train() (1.7.1, scikit-learn 1.6.1, defaults: all genes,
# lbfgs, max_iter 1000) in one run; both models' held-out accuracy is printed.
#   Rscript bench/celltypist_train.R [python-with-celltypist]
source("bench/common.R")
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args)) args[1] else Sys.getenv("SCANNOT_CELLTYPIST_PYTHON",
                                                 "/tmp/scannot-celltypist-venv/bin/python")
threads <- bench_threads
d <- seed_scale_data(threads)
x <- d$x
lab <- as.character(d$g)
n_ref <- 17311
ref <- x[, seq_len(n_ref)]
query <- x[, -seq_len(n_ref)]
rm(d); invisible(gc())

st <- system.time(model <- train_celltypist(ref, lab[seq_len(n_ref)], n_threads = threads))
t_ours <- st[["elapsed"]]
cpu_ours <- st[["user.self"]] + st[["sys.self"]]
pred <- annotate_celltypist(query, model, n_threads = threads)
acc_ours <- 100 * mean(as.character(pred$predicted_labels) == lab[-seq_len(n_ref)])
cat(sprintf("scannot train_celltypist (%d cells x %d genes, %d threads): %.3f s (CPU %.2f s); L-BFGS iterations %s\n",
            ncol(ref), nrow(ref), threads, t_ours, cpu_ours, paste(model$fit$n_iter, collapse = " ")))
cat(sprintf("scannot held-out accuracy: %.2f%%\n", acc_ours))

t_peer <- NA_real_
if (file.exists(py)) {
  dir <- tempfile("scannot-bench-ctt-"); dir.create(dir)
  for (nm in c("ref", "query")) {
    m <- get(nm)
    writeBin(m@x, file.path(dir, paste0(nm, "_x.bin"))); writeBin(m@i, file.path(dir, paste0(nm, "_i.bin")))
    writeBin(m@p, file.path(dir, paste0(nm, "_p.bin")))
  }
  writeLines(rownames(x), file.path(dir, "genes.txt"))
  writeLines(lab[seq_len(n_ref)], file.path(dir, "ref_labels.txt"))
  writeLines(lab[-seq_len(n_ref)], file.path(dir, "query_labels.txt"))
  n_genes <- nrow(x)
  rm(ref, query, x); invisible(gc())
  # celltypist.train defaults (n_jobs = None); its BLAS uses the machine's cores
  t_peer <- run_peer(py, c("bench/peers/celltypist_train_celltypist.py", dir, n_genes))
  cpu_peer <- as.numeric(sub(".*cpu_seconds=([0-9.]+).*", "\\1",
                              grep("cpu_seconds=", readLines(file.path(dir, "cpu.txt")), value = TRUE)))
  cat(sprintf("CPU time (all threads): celltypist %.1f s / scannot %.2f s = %.1fx\n",
              cpu_peer, cpu_ours, cpu_peer / cpu_ours))
  gold <- readLines(file.path(dir, "labels.txt"))
  cat(sprintf("labels equal to celltypist's model on held-out cells: %.2f%%\n",
              100 * mean(as.character(pred$predicted_labels) == gold)))
  unlink(dir, recursive = TRUE)
} else {
  cat("celltypist peer skipped: no Python with celltypist at ", py, "\n", sep = "")
}
ratio_line("celltypist_train", "celltypist", t_peer, t_ours)
