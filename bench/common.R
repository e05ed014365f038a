# Shared by the bench/*.R scripts: the seed-scale simulated case and peer plumbing.
suppressPackageStartupMessages(library(scannot))
bench_threads <- as.integer(Sys.getenv("SCANNOT_BENCH_THREADS", "2"))
peer_python <- Sys.getenv("SCANNOT_PEER_PYTHON", "/tmp/scannot-fixture-venv/bin/python")

rss_kb <- function(field) {
  s <- readLines("/proc/self/status")
  as.numeric(sub("[^0-9]*([0-9]+).*", "\\1", grep(paste0("^", field, ":"), s, value = TRUE)))
}
reset_peak <- function() try(writeLines("5", "/proc/self/clear_refs"), silent = TRUE)

# 28,911 cells x 15,674 genes, 8 cell types, 2 batches, log1p(CP10k)
seed_scale_data <- function(threads = bench_threads) {
  sim <- simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, seed = 2026,
                         as = "list", n_threads = threads)
  x <- normalize_counts(sim$counts, n_threads = threads)
  mb <- as.numeric(object.size(x@x) + object.size(x@i) + object.size(x@p)) / 2^20
  cat(sprintf("data: %d genes x %d cells, %.1f M non-zeros (%.1f%%), dgCMatrix %.0f MB\n",
              nrow(x), ncol(x), length(x@x) / 1e6, 100 * length(x@x) / prod(dim(x)), mb))
  list(x = x, g = sim$cells$cell_type, mb = mb)
}

# The dgCMatrix slots and labels as flat files for the peers (bench/peers/*).
export_for_peers <- function(x, g, dir = tempfile("scannot-bench-")) {
  dir.create(dir, showWarnings = FALSE)
  writeBin(x@x, file.path(dir, "x.bin")); writeBin(x@i, file.path(dir, "i.bin"))
  writeBin(x@p, file.path(dir, "p.bin"))
  writeLines(rownames(x), file.path(dir, "genes.txt"))
  writeLines(as.character(g), file.path(dir, "groups.txt"))
  writeLines(levels(g), file.path(dir, "levels.txt"))
  dir
}

# Run a peer command, echo its output, return its "seconds=" value (NA if it failed).
run_peer <- function(cmd, args, env = character()) {
  out <- suppressWarnings(system2(cmd, args, stdout = TRUE, stderr = TRUE, env = env))
  cat(paste0("  | ", out), sep = "\n")
  s <- grep("seconds=", out, value = TRUE)
  if (length(s)) as.numeric(sub(".*seconds=([0-9.eE+-]+).*", "\\1", s[length(s)])) else NA_real_
}

ratio_line <- function(task, peer, t_peer, t_ours) {
  if (is.na(t_peer)) {
    cat(sprintf("RATIO %s vs %s: peer not run\n", task, peer))
  } else {
    cat(sprintf("RATIO %s vs %s: %.3f s / %.3f s = %.1fx\n", task, peer, t_peer, t_ours,
                t_peer / t_ours))
  }
}
