# Benchmark (issue 8 acceptance): Wilcoxon markers and CellTypist prediction on 1 M cells x
# 20 k genes read out of core from an h5ad file (X stays on disk), within a stated memory
# budget. Prints the time and the peak RSS (VmHWM) of each step.
#
#   Rscript bench/bioc_1m.R [n_cells] [budget_GB] [genes_per_cell]
#
# The h5ad file (log1p-CP10k values, float32 CSR, ~5 GB at 1 M cells) is simulated in
# chunks of 50 k cells (simulate_counts(genes_per_cell =), normalize_counts()) and written
# once; later runs reuse it. Its path: $SCANNOT_BENCH_H5AD (default
# ~/.cache/scannot-bench/bioc_<n_cells>.h5ad). Writing needs ~1 GB of memory and a few
# minutes; the benchmark itself runs in a fresh R process (`Rscript` again) so that the
# writer's memory does not count in its peak.
source(file.path("bench", "common.R"))
args <- commandArgs(trailingOnly = TRUE)
n_cells <- if (length(args) >= 1) as.numeric(args[1]) else 1e6
budget_gb <- if (length(args) >= 2) as.numeric(args[2]) else 4
gpc <- if (length(args) >= 3) as.numeric(args[3]) else 600
n_genes <- 20000
n_types <- 10
chunk <- 50000
path <- Sys.getenv("SCANNOT_BENCH_H5AD",
                   file.path(path.expand("~"), ".cache", "scannot-bench",
                             sprintf("bioc_%d_%d.h5ad", as.integer(n_cells), as.integer(gpc))))
load_avg <- function() paste(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3], collapse = " ")

write_bench_h5ad <- function(path) {
  suppressPackageStartupMessages(library(rhdf5))
  dir.create(dirname(path), recursive = TRUE, showWarnings = FALSE)
  tmp <- paste0(path, ".part")
  unlink(tmp)
  t0 <- Sys.time()
  # obs / var through scannot's writer (an empty X), then X replaced chunk by chunk
  k <- ceiling(n_cells / chunk)
  sizes <- c(rep(chunk, k - 1), n_cells - chunk * (k - 1))
  labels <- vector("list", k)
  first <- simulate_counts(n_cells = 10, n_genes = n_genes, n_types = n_types, seed = 1,
                           genes_per_cell = gpc, as = "list", n_threads = bench_threads)
  genes <- rownames(first$counts)
  h5createFile(tmp)
  h5createGroup(tmp, "X")
  h5createDataset(tmp, "X/data", dims = 0, maxdims = H5Sunlimited(), chunk = 2^20,
                  H5type = "H5T_NATIVE_FLOAT", level = 0)
  h5createDataset(tmp, "X/indices", dims = 0, maxdims = H5Sunlimited(), chunk = 2^20,
                  storage.mode = "integer", level = 0)
  indptr <- numeric(n_cells + 1)
  at <- 0
  col <- 0
  for (b in seq_len(k)) {
    sim <- simulate_counts(n_cells = sizes[b], n_genes = n_genes, n_types = n_types,
                           seed = 2026 + b, genes_per_cell = gpc, as = "list",
                           n_threads = bench_threads)
    x <- normalize_counts(sim$counts, n_threads = bench_threads)
    labels[[b]] <- as.character(sim$cells$cell_type)
    rm(sim)
    nb <- length(x@x)
    h5set_extent(tmp, "X/data", at + nb)
    h5set_extent(tmp, "X/indices", at + nb)
    h5write(x@x, tmp, "X/data", start = at + 1, count = nb)
    h5write(x@i, tmp, "X/indices", start = at + 1, count = nb)
    indptr[col + seq_len(ncol(x)) + 1] <- x@p[-1] + at
    at <- at + nb
    col <- col + ncol(x)
    rm(x)
    invisible(gc())
    cat(sprintf("  wrote cells %d / %d (%.0f M values, %.0f s)\n", as.integer(col),
                as.integer(n_cells), at / 1e6,
                as.numeric(difftime(Sys.time(), t0, units = "secs"))))
  }
  # obs and var: written by scannot from a 0-value matrix of the right shape
  meta <- tempfile(fileext = ".h5ad")
  empty <- Matrix::sparseMatrix(i = integer(), j = integer(), x = double(),
                                dims = c(n_genes, n_cells),
                                dimnames = list(genes, sprintf("cell%07d", seq_len(n_cells))))
  obs <- data.frame(cell_type = factor(unlist(labels)),
                    row.names = colnames(empty))
  if (requireNamespace("SingleCellExperiment", quietly = TRUE)) {
    sce <- SingleCellExperiment::SingleCellExperiment(list(X = empty), colData = obs)
    write_h5ad(sce, meta)
  } else {
    stop("SingleCellExperiment is needed to write the benchmark file")
  }
  fid <- H5Fopen(tmp)
  mid <- H5Fopen(meta, flags = "H5F_ACC_RDONLY")
  for (g in c("obs", "var")) H5Ocopy(mid, g, fid, g)
  H5Fclose(mid)
  H5Fclose(fid)
  unlink(meta)
  h5write(if (at < 2^31) as.integer(indptr) else indptr, tmp, "X/indptr")
  fid <- H5Fopen(tmp)
  gid <- H5Gopen(fid, "X")
  h5writeAttribute("csr_matrix", gid, "encoding-type", asScalar = TRUE,
                   variableLengthString = TRUE)
  h5writeAttribute("0.1.0", gid, "encoding-version", asScalar = TRUE,
                   variableLengthString = TRUE)
  h5writeAttribute(as.integer(c(n_cells, n_genes)), gid, "shape")
  H5Gclose(gid)
  H5Fclose(fid)
  file.rename(tmp, path)
  cat(sprintf("wrote %s: %.2f GB in %.0f s\n", path, file.size(path) / 2^30,
              as.numeric(difftime(Sys.time(), t0, units = "secs"))))
}

if (Sys.getenv("SCANNOT_BIOC_STEP") == "") {
  if (!file.exists(path)) {
    cat(sprintf("writing the benchmark file %s (once)\n", path))
    write_bench_h5ad(path)
  } else {
    cat(sprintf("using the cached benchmark file %s (%.2f GB)\n", path,
                file.size(path) / 2^30))
  }
  # each step in a fresh process, so that its peak RSS is its own
  # SCANNOT_BIOC_INMEM=1 adds the same steps on the matrix loaded in memory (read_h5ad),
  # for the time ratio (needs memory for the whole dgCMatrix: ~7.5 GB at 1 M cells)
  steps <- c("wilcoxon", "celltypist",
             if (nzchar(Sys.getenv("SCANNOT_BIOC_INMEM"))) c("wilcoxon_inmem", "celltypist_inmem"))
  for (step in steps) {
    status <- system2("Rscript", c("bench/bioc_1m.R", args),
                      env = c(sprintf("SCANNOT_BIOC_STEP=%s", step),
                              sprintf("SCANNOT_BENCH_H5AD=%s", path)))
    if (status != 0) cat(sprintf("step %s failed (status %d)\n", step, status))
  }
  quit(save = "no")
}

step <- Sys.getenv("SCANNOT_BIOC_STEP")
budget <- budget_gb * 1e9
# scannot.memory is the whole process's budget for a Wilcoxon pass: scannot sizes the gene
# ranges after room for R, the read blocks and the core's scratch; 0.2 GB more are kept
# for the cell metadata of a million cells
options(scannot.memory = budget - 0.2e9, scannot.block_size = min(2e8, budget / 20))
h <- open_h5ad_matrix(path)
print(h)
nnz <- unclass(h)$indptr[ncol(h) + 1]
where <- "out of core"
grp <- "cell_type"
if (grepl("_inmem$", step)) {
  t_load <- system.time(a <- read_h5ad(path, as = "list", uns = FALSE))[["elapsed"]]
  h <- a$X
  grp <- a$obs$cell_type
  rm(a)
  cat(sprintf("loaded in memory with read_h5ad() in %.1f s\n", t_load))
  step <- sub("_inmem$", "", step)
  where <- "in memory"
}
rss0 <- rss_kb("VmRSS") / 2^20
reset_peak()
if (step == "wilcoxon") {
  st <- system.time(res <- find_markers(h, grp, n_threads = bench_threads))
  what <- sprintf("find_markers (scanpy flavour, %d groups, all genes)",
                  length(unique(res$group)))
  extra <- sprintf("top marker per group: %s",
                   paste(tapply(res$gene, res$group, `[`, 1), collapse = ", "))
} else {
  model <- load_celltypist_model(system.file("extdata", "celltypist_default.pkl",
                                             package = "scannot"))
  st <- system.time(res <- suppressWarnings(annotate_celltypist(h, model,
                                                                n_threads = bench_threads)))
  what <- sprintf("annotate_celltypist (%d classes, best match)", length(model$cell_types))
  extra <- sprintf("labels: %s", paste(utils::head(names(sort(table(res$predicted_labels),
                                                               decreasing = TRUE)), 5),
                                       collapse = ", "))
}
peak <- rss_kb("VmHWM") / 2^20
cat(sprintf("%s on %d cells x %d genes (%.0f M non-zeros) %s, budget %.1f GB (scannot.memory %.2f GB, block %.0f MB), %d threads: %.1f s wall, %.1f s CPU (load average %s)\n",
            what, ncol(h), nrow(h), nnz / 1e6, where, budget_gb, getOption("scannot.memory") / 1e9,
            getOption("scannot.block_size") / 1e6, bench_threads, st[["elapsed"]],
            st[["user.self"]] + st[["sys.self"]], load_avg()))
cat(sprintf("RSS: %.2f GiB before, peak %.2f GiB = %.2f GB (VmHWM, whole R process) - budget %.1f GB: %s\n",
            rss0, peak, peak * 2^30 / 1e9, budget_gb,
            if (peak * 2^30 / 1e9 <= budget_gb) "within" else "OVER"))
cat(extra, "\n")
