# Benchmark: seed-scale Wilcoxon one-vs-rest, all genes, 8 groups: scannot vs illico,
# presto and scanpy in one run (peers that are not installed are skipped).
#   Rscript bench/wilcoxon.R [--no-scanpy]
source(file.path("bench", "common.R"))
args <- commandArgs(trailingOnly = TRUE)
d0 <- seed_scale_data()
x <- d0$x; g <- d0$g
invisible(find_markers(x[1:200, ], g, n_threads = bench_threads))  # warm-up
time_ours <- function(threads, flavor = "scanpy") {
  rss0 <- rss_kb("VmRSS"); reset_peak()
  t <- min(sapply(1:3, function(i) system.time(
    find_markers(x, g, flavor = flavor, n_threads = threads))[["elapsed"]]))
  list(t = t, extra = max(rss_kb("VmHWM") - rss0, 0) / 1024)
}
o2 <- time_ours(bench_threads)
o1 <- time_ours(1L)
op <- time_ours(1L, "presto")
cat(sprintf("scannot find_markers (all %d genes, 8 groups): %.3f s on %d threads, %.3f s on 1 thread (presto flavour, 1 thread: %.3f s); extra peak RSS %.0f MB (matrix %.0f MB)\n",
            nrow(x), o2$t, bench_threads, o1$t, op$t, o2$extra, d0$mb))
dir <- export_for_peers(x, g)
illico_py <- Sys.getenv("SCANNOT_ILLICO_PYTHON", "/tmp/scannot-illico-venv/bin/python")
if (file.exists(illico_py)) {
  ratio_line(sprintf("wilcoxon (%d threads)", bench_threads), "illico",
             run_peer(illico_py, c("bench/peers/wilcoxon_illico.py", dir, nrow(x), ncol(x),
                                   bench_threads, 3)), o2$t)
} else cat("illico skipped: no venv at", illico_py, "\n")
presto_lib <- Sys.getenv("PRESTO_LIB", "/tmp/presto-lib")
if (dir.exists(file.path(presto_lib, "presto"))) {
  t_presto <- run_peer("Rscript", c("bench/peers/wilcoxon_presto.R", dir, nrow(x), ncol(x)),
                       env = paste0("PRESTO_LIB=", presto_lib))
  ratio_line(sprintf("wilcoxon (%d threads)", bench_threads), "presto (1 thread)", t_presto, o2$t)
  ratio_line("wilcoxon presto flavour (1 thread)", "presto (1 thread)", t_presto, op$t)
} else cat("presto skipped: not installed in", presto_lib, "(see tools/fixtures/README.md)\n")
if (file.exists(peer_python) && !"--no-scanpy" %in% args) {
  ratio_line(sprintf("wilcoxon (%d threads)", bench_threads), "scanpy",
             run_peer(peer_python, c("bench/peers/wilcoxon_scanpy.py", dir, nrow(x), ncol(x),
                                     bench_threads)), o2$t)
} else cat("scanpy skipped\n")
unlink(dir, recursive = TRUE)
