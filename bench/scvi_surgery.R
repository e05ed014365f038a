# Benchmark: scArches surgery (scVI query training) per epoch, scannot scvi_map_query() vs
# scvi-tools 1.4.2 (load_query_data + train) in one run, same threads.
#   Rscript bench/scvi_surgery.R [python-with-scvi-tools] [epochs]
#   SCANNOT_SCVI_SETTINGS=default Rscript bench/scvi_surgery.R   # scvi-tools' default SCVI
#     (1 layer, batch norm, no layer norm, dropout 0.1) instead of the scArches settings
# Data: the seed-scale simulation (28,911 cells x 15,674 genes, 2 batches), the 4,000 genes with
# the largest total counts. Query = the first 11,600 cells of batch2 (new batch level "query"),
# reference = the other 17,311 cells (batch1, batch2). The peer trains the reference (scArches
# settings: 2 layers, layer norm, no batch norm, encode_covariates, dropout 0.2; 10 epochs,
# cached in the data folder) and both then train the query from it with freeze_dropout = TRUE.
# Per-epoch time includes the validation pass. Also compares the final validation ELBO and the
# kNN (k = 15, leave-one-out within the query) cell-type accuracy of the two latents.
source(file.path("bench", "common.R"))
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args) >= 1) args[1] else Sys.getenv("SCANNOT_SCVI_PYTHON", "/tmp/scannot-scvi-venv/bin/python")
epochs <- if (length(args) >= 2) as.integer(args[2]) else 5L
dir <- Sys.getenv("SCANNOT_SCVI_BENCH_DIR", file.path(tempdir(), "scvi-surgery"))
settings <- Sys.getenv("SCANNOT_SCVI_SETTINGS", "scarches")
if (!settings %in% c("scarches", "default")) stop("SCANNOT_SCVI_SETTINGS: scarches or default")
ref_dir <- file.path(dir, if (settings == "scarches") "ref" else "ref_default")
label <- if (settings == "scarches") "" else ", scvi-tools default settings (batch norm)"

sim <- simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, seed = 2026,
                       as = "list", n_threads = bench_threads)
counts <- sim$counts
keep <- sort(order(Matrix::rowSums(counts), decreasing = TRUE)[1:4000])
counts <- counts[keep, ]
b <- as.character(sim$cells$batch)
# query: the first 11,600 cells of batch2 (new level "query"); the rest of batch2 stays in
# the reference as its second batch
is_query <- b == "batch2" & cumsum(b == "batch2") <= 11600
batch <- ifelse(is_query, "query", b)
cat(sprintf("data: %d genes, %d reference + %d query cells\n", nrow(counts),
            sum(!is_query), sum(is_query)))
if (!file.exists(file.path(dir, "set.txt"))) {
  dir.create(dir, showWarnings = FALSE, recursive = TRUE)
  writeBin(as.numeric(counts@x), file.path(dir, "x.bin"))
  writeBin(counts@i, file.path(dir, "i.bin")); writeBin(counts@p, file.path(dir, "p.bin"))
  writeLines(rownames(counts), file.path(dir, "genes.txt"))
  writeLines(batch, file.path(dir, "batch.txt"))
  writeLines(ifelse(is_query, "query", "ref"), file.path(dir, "set.txt"))
}

t_peer <- NA_real_
if (file.exists(py)) {
  t_peer <- run_peer(py, c("bench/peers/scvi_surgery.py", dir, bench_threads, 10, epochs, settings),
                     env = "PYTHONWARNINGS=ignore")
} else {
  cat("scvi-tools python not found: ", py, "\n")
}
if (!file.exists(file.path(ref_dir, "model.pt"))) {
  cat("RATIO scArches surgery epoch vs scvi-tools: no reference model (peer not run)\n")
  quit(status = 0)
}

q <- counts[, is_query]
colnames(q) <- paste0("c", which(is_query) - 1L)
meta <- data.frame(batch = batch[is_query], row.names = colnames(q))
res <- scvi_map_query(q, model = ref_dir, batch_key = "batch", obs = meta,
                      max_epochs = epochs, early_stopping = FALSE, seed = 0,
                      n_threads = bench_threads, progress = FALSE)
h <- res$history
t_ours <- stats::median(h$seconds)
cat(sprintf("scannot: epochs %s s; final elbo_validation %.3f\n",
            paste(sprintf("%.2f", h$seconds), collapse = ", "), h$elbo_validation[nrow(h)]))
ratio_line(paste0("scArches surgery epoch (11.6k cells x 4k genes", label, ")"), "scvi-tools 1.4.2",
           t_peer, t_ours)

knn_acc <- function(z, lab, k = 15) {
  # leave-one-out majority vote among the k nearest query cells (sampled 2,000 cells)
  set.seed(1)
  idx <- sample(nrow(z), min(2000, nrow(z)))
  hit <- vapply(idx, function(i) {
    d <- colSums((t(z) - z[i, ])^2)
    d[i] <- Inf
    nn <- order(d)[1:k]
    names(which.max(table(lab[nn]))) == as.character(lab[i])
  }, logical(1))
  mean(hit)
}
lab <- sim$cells$cell_type[is_query]
hp <- file.path(ref_dir, "scvi_history.csv")
if (file.exists(hp)) {
  ph <- utils::read.csv(hp)
  zp <- as.matrix(utils::read.csv(file.path(ref_dir, "scvi_latent.csv"), header = FALSE))
  cat(sprintf("final elbo_validation: scannot %.3f, scvi-tools %.3f (%.2f%%)\n",
              h$elbo_validation[nrow(h)], ph$elbo_validation[nrow(ph)],
              100 * (h$elbo_validation[nrow(h)] / ph$elbo_validation[nrow(ph)] - 1)))
  cat(sprintf("kNN cell-type accuracy of the query latent: scannot %.3f, scvi-tools %.3f\n",
              knn_acc(res$latent, lab), knn_acc(zp, lab)))
}
