# Benchmark: read the seed-scale h5ad (28,911 cells x 15,674 genes, float32 CSR X written
# by Python anndata) with scannot::read_h5ad vs anndata.read_h5ad, in one run.
#   Rscript bench/h5ad.R [python-with-anndata]
# SCANNOT_BENCH_H5AD=<file>: read that file (e.g. the seed.h5ad of an earlier run) instead
# of simulating and writing one (which takes about a minute); it is not deleted.
suppressPackageStartupMessages(library(scannot))
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args)) args[1] else Sys.getenv("SCANNOT_PEER_PYTHON", "/tmp/scannot-anndata-venv/bin/python")
threads <- as.integer(Sys.getenv("SCANNOT_BENCH_THREADS", "2"))
if (!file.exists(py)) {
  cat("anndata peer skipped: no Python at ", py, " (run tools/fixtures/make_fixtures.sh)\n", sep = "")
  quit(status = 0)
}
rss_kb <- function(field) {
  s <- readLines("/proc/self/status")
  as.numeric(sub("[^0-9]*([0-9]+).*", "\\1", grep(paste0("^", field, ":"), s, value = TRUE)))
}
load <- function() tryCatch(sub(".*load average: ", "", system("uptime", intern = TRUE)),
                            error = function(e) "?")
cat("load average before:", load(), "\n")
reuse <- Sys.getenv("SCANNOT_BENCH_H5AD")
dir <- tempfile("scannot-bench-h5ad-"); dir.create(dir)
if (!nzchar(reuse) || !file.exists(reuse)) local({
  sim <- simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, seed = 2026, as = "list",
                         n_threads = threads)
  x <- normalize_counts(sim$counts, n_threads = threads)
  writeBin(x@x, file.path(dir, "x.bin"), size = 4)  # float32, as scanpy stores X
  writeBin(x@i, file.path(dir, "i.bin")); writeBin(x@p, file.path(dir, "p.bin"))
  writeLines(rownames(x), file.path(dir, "genes.txt"))
  writeLines(as.character(sim$cells$cell_type), file.path(dir, "types.txt"))
  system2(py, c("bench/peers/h5ad_anndata.py", "write", dir, ncol(x), nrow(x)))
})
invisible(gc())
f <- if (nzchar(reuse) && file.exists(reuse)) normalizePath(reuse) else file.path(dir, "seed.h5ad")
cat(sprintf("file: %s, %.0f MB\n", f, file.size(f) / 2^20))

# the first read in this R session (page cache warm from the write): it alone pays the
# kernel's zero fill of fresh mappings (kept for 10 s for later reads) and the metadata
# check in a child process (once per file version); anndata's reads all pay the zero
# fill of their (float32) arrays
t_first <- system.time(invisible(read_h5ad(f, as = "list", uns = FALSE)))[["elapsed"]]
invisible(gc())
rss0 <- rss_kb("VmRSS")
try(writeLines("5", "/proc/self/clear_refs"), silent = TRUE)  # reset the peak-RSS counter
a <- NULL
t1 <- system.time(a <- read_h5ad(f, as = "list"))[["elapsed"]]
peak_extra_mb <- (rss_kb("VmHWM") - rss0) / 1024
m <- a$X
mat_mb <- as.numeric(object.size(m@x) + object.size(m@i) + object.size(m@p)) / 2^20
cat(sprintf("X: %d genes x %d cells, %.1f M non-zeros, dgCMatrix %.0f MB; peak extra RSS during read %.0f MB (no second copy: <= matrix + obs)\n",
            nrow(m), ncol(m), length(m@x) / 1e6, mat_mb, peak_extra_mb))
tracemem(m@x)  # any later duplication of the slot would print a tracemem line
s <- Matrix::colSums(m)
t <- c(t1, sapply(1:2, function(i) { a <<- NULL; invisible(gc()); system.time(a <<- read_h5ad(f, as = "list"))[["elapsed"]] }))
t_scannot <- min(t)
cat(sprintf("scannot read_h5ad (as = \"list\"): %.3f s (best of 3); first read in the session %.3f s\n",
            t_scannot, t_first))
# the default result, a SingleCellExperiment (anndata's read_h5ad returns its own AnnData)
a <- NULL; invisible(gc())
t_sce <- min(sapply(1:3, function(i) {
  a <<- NULL; invisible(gc())
  system.time(a <<- read_h5ad(f))[["elapsed"]]
}))
a <- NULL; invisible(gc())
cat(sprintf("scannot read_h5ad (as = \"SingleCellExperiment\", the default): %.3f s (best of 3)\n", t_sce))
out <- system2(py, c("bench/peers/h5ad_anndata.py", "read", f), stdout = TRUE)
cat(out, sep = "\n")
t_peer <- as.numeric(sub(".*seconds=", "", grep("seconds=", out, value = TRUE)))
t_peer_first <- as.numeric(sub(".*first_seconds=([0-9.]+).*", "\\1", grep("first_seconds=", out, value = TRUE)))
cat(sprintf("RATIO h5ad read: anndata %.3f s / scannot %.3f s = %.2fx (best of 3 each)\n", t_peer, t_scannot, t_peer / t_scannot))
cat(sprintf("RATIO h5ad read into a SingleCellExperiment: anndata %.3f s (into an AnnData) / scannot %.3f s = %.2fx (best of 3 each)\n",
            t_peer, t_sce, t_peer / t_sce))
cat(sprintf("RATIO h5ad first read in the process: anndata %.3f s / scannot %.3f s = %.2fx\n",
            t_peer_first, t_first, t_peer_first / t_first))
# first reads in fresh processes (SCANNOT_BENCH_H5AD_FRESH rounds, default 6): both pay the
# kernel's supply of fresh memory, whose cost on a VM swings with what the kernel has at
# hand (transparent huge pages are fast when their 2 MB blocks are still backed by the
# host, 25x slower per page when not; numpy asks for them, scannot asks too but goes on
# with 4 KB pages at the first slow one), so medians over rounds are compared
n_fresh <- as.integer(Sys.getenv("SCANNOT_BENCH_H5AD_FRESH", "6"))
if (n_fresh > 0) {
  rscript <- file.path(R.home("bin"), "Rscript")
  code <- sprintf(paste0("suppressPackageStartupMessages(library(scannot)); ",
                         "cat(system.time(read_h5ad('%s', as = 'list'))[['elapsed']])"), f)
  one_scannot <- function() as.numeric(system2(rscript, c("-e", shQuote(code)), stdout = TRUE))
  one_anndata <- function() {
    o <- system2(py, c("bench/peers/h5ad_anndata.py", "read", f), stdout = TRUE)
    as.numeric(sub(".*first_seconds=([0-9.]+).*", "\\1", grep("first_seconds=", o, value = TRUE)))
  }
  # which tool goes first alternates between rounds: a process's first read draws on the
  # free memory the previous process left (huge pages still backed by the host are the
  # fast ones, and there are only so many), so a fixed order would favour one side
  fresh <- t(vapply(seq_len(n_fresh), function(r) {
    if (r %% 2 == 1) {
      s <- one_scannot(); a <- one_anndata()
    } else {
      a <- one_anndata(); s <- one_scannot()
    }
    c(scannot = s, anndata = a)
  }, c(scannot = 0, anndata = 0)))
  cat(sprintf("fresh-process first reads (%d rounds, the first tool alternating): scannot %s s; anndata %s s\n",
              n_fresh, paste(sprintf("%.3f", fresh[, "scannot"]), collapse = " "),
              paste(sprintf("%.3f", fresh[, "anndata"]), collapse = " ")))
  first <- rep(c("scannot", "anndata"), length.out = n_fresh)
  for (w in unique(first)) {
    m <- apply(fresh[first == w, , drop = FALSE], 2, stats::median)
    cat(sprintf("  rounds where %s went first: medians scannot %.3f s, anndata %.3f s\n",
                w, m[["scannot"]], m[["anndata"]]))
  }
  med <- apply(fresh, 2, stats::median)
  cat(sprintf("RATIO h5ad first read, fresh processes (median of %d): anndata %.3f s / scannot %.3f s = %.2fx\n",
              n_fresh, med[["anndata"]], med[["scannot"]], med[["anndata"]] / med[["scannot"]]))
}
cat("load average after:", load(), "\n")
unlink(dir, recursive = TRUE)
