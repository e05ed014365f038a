# Benchmark: seed-scale dotplot, 20 marker genes x 8 groups, scannot vs scanpy in one run.
#   Rscript bench/dotplot.R
source(file.path("bench", "common.R"))
d0 <- seed_scale_data()
x <- d0$x; g <- d0$g
markers <- list(T = c("CD3D", "CD3E", "IL7R", "CCR7"), CD8 = c("CD8A", "CD8B"),
                NK = c("GNLY", "NKG7", "PRF1"), B = c("MS4A1", "CD79A", "CD79B"),
                Mono = c("CD14", "LYZ", "S100A8"), Epi = "EPCAM", Endo = "PECAM1",
                Fib = c("COL1A2", "DCN"), Immune = "PTPRC")
invisible(dotplot_data(x, markers, g, n_threads = bench_threads))  # warm-up
rss0 <- rss_kb("VmRSS"); reset_peak()
d <- NULL
t <- sapply(1:5, function(i) system.time(
  d <<- dotplot_data(x, markers, g, standard_scale = "var", n_threads = bench_threads))[["elapsed"]])
extra <- max(rss_kb("VmHWM") - rss0, 0) / 1024
t_ours <- min(t)
cat(sprintf("scannot dotplot_data (20 genes x 8 groups, %d threads): %.4f s (best of 5); extra peak RSS %.1f MB (matrix %.0f MB: not copied)\n",
            bench_threads, t_ours, extra, d0$mb))
if (file.exists(peer_python)) {
  dir <- export_for_peers(x, g)
  jsonlite::write_json(markers, file.path(dir, "markers.json"))
  t_peer <- run_peer(peer_python, c("bench/peers/dotplot_scanpy.py", dir, nrow(x), ncol(x)))
  gold <- utils::read.csv(file.path(dir, "scanpy_color.csv"), check.names = FALSE, row.names = 1)
  ours <- tapply(d$color, list(d$group, d$gene_pos), identity)
  cat(sprintf("  max |scannot - scanpy| colour (var-scaled): %.2e\n", max(abs(ours - as.matrix(gold)))))
  ratio_line("dotplot", "scanpy", t_peer, t_ours)
  unlink(dir, recursive = TRUE)
} else {
  cat("scanpy peer skipped: no Python with scanpy at ", peer_python,
      " (run tools/fixtures/make_fixtures.sh or set SCANNOT_PEER_PYTHON)\n", sep = "")
}
