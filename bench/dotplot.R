# Benchmark: seed-scale dotplot (28,911 cells x 15,674 genes, 8 groups, ~12% non-zero),
# 20 marker genes, scannot vs scanpy (sc.pl.dotplot data frames) in one run.
#   Rscript bench/dotplot.R [python-with-scanpy]
suppressPackageStartupMessages(library(scannot))
args <- commandArgs(trailingOnly = TRUE)
py <- if (length(args)) args[1] else Sys.getenv("SCANNOT_PEER_PYTHON", "/tmp/scannot-fixture-venv/bin/python")
threads <- as.integer(Sys.getenv("SCANNOT_BENCH_THREADS", "2"))

rss_kb <- function(field) {
  s <- readLines("/proc/self/status")
  as.numeric(sub("[^0-9]*([0-9]+).*", "\\1", grep(paste0("^", field, ":"), s, value = TRUE)))
}
sim <- simulate_counts(n_cells = 28911, n_genes = 15674, n_types = 8, seed = 2026, as = "list",
                       n_threads = threads)
x <- normalize_counts(sim$counts, n_threads = threads)
sim$counts <- NULL; invisible(gc())
g <- sim$cells$cell_type
markers <- list(T = c("CD3D", "CD3E", "IL7R", "CCR7"), CD8 = c("CD8A", "CD8B"),
                NK = c("GNLY", "NKG7", "PRF1"), B = c("MS4A1", "CD79A", "CD79B"),
                Mono = c("CD14", "LYZ", "S100A8"), Epi = "EPCAM", Endo = "PECAM1",
                Fib = c("COL1A2", "DCN"), Immune = "PTPRC")
mat_mb <- (object.size(x@x) + object.size(x@i) + object.size(x@p)) / 2^20
cat(sprintf("data: %d genes x %d cells, %.1f M non-zeros (%.1f%%), dgCMatrix %.0f MB\n",
            nrow(x), ncol(x), length(x@x) / 1e6, 100 * length(x@x) / prod(dim(x)), mat_mb))

# warm-up, then best of 5
invisible(dotplot_data(x, markers, g, n_threads = threads))
rss0 <- rss_kb("VmRSS")
try(writeLines("5", "/proc/self/clear_refs"), silent = TRUE)  # reset the peak-RSS counter
d <- NULL
t <- sapply(1:5, function(i) system.time(d <<- dotplot_data(x, markers, g, standard_scale = "var",
                                                          n_threads = threads))[["elapsed"]])
peak_extra_mb <- (rss_kb("VmHWM") - rss0) / 1024
t_scannot <- min(t)
cat(sprintf("scannot dotplot_data (20 genes x 8 groups, %d threads): %.4f s (best of 5); extra peak RSS %.1f MB (matrix %.0f MB: no copy)\n",
            threads, t_scannot, max(peak_extra_mb, 0), mat_mb))

if (file.exists(py)) {
  dir <- tempfile("scannot-bench-"); dir.create(dir)
  writeBin(x@x, file.path(dir, "x.bin")); writeBin(x@i, file.path(dir, "i.bin"))
  writeBin(x@p, file.path(dir, "p.bin"))
  writeLines(rownames(x), file.path(dir, "genes.txt"))
  writeLines(as.character(g), file.path(dir, "groups.txt"))
  writeLines(levels(g), file.path(dir, "levels.txt"))
  jsonlite::write_json(markers, file.path(dir, "markers.json"))
  out <- system2(py, c("bench/peers/dotplot_scanpy.py", dir, nrow(x), ncol(x)), stdout = TRUE)
  cat(out, sep = "\n")
  t_peer <- as.numeric(sub(".*seconds=", "", grep("seconds=", out, value = TRUE)))
  gold <- utils::read.csv(file.path(dir, "scanpy_color.csv"), check.names = FALSE, row.names = 1)
  ours <- tapply(d$color, list(d$group, d$gene_pos), identity)
  cat(sprintf("max |scannot - scanpy| colour (var-scaled): %.2e\n", max(abs(ours - as.matrix(gold)))))
  cat(sprintf("RATIO dotplot: scanpy %.3f s / scannot %.4f s = %.0fx\n", t_peer, t_scannot,
              t_peer / t_scannot))
  unlink(dir, recursive = TRUE)
} else {
  cat("scanpy peer skipped: no Python with scanpy at ", py,
      " (run tools/fixtures/make_fixtures.sh or set SCANNOT_PEER_PYTHON)\n", sep = "")
}
