# Benchmark (issue 3 acceptance): find_markers on 1 M cells x 20 k genes must finish in
# < 60 s with a peak memory < 1.5x the input dgCMatrix. The data come from the sparse
# generator (simulate_counts(genes_per_cell = ...)), about 600 detected genes per cell,
# i.e. ~6e8 non-zeros (~7 GB dgCMatrix). Needs ~12 GB of free memory.
#   Rscript bench/wilcoxon_1m.R [n_cells] [genes_per_cell]
source(file.path("bench", "common.R"))
args <- commandArgs(trailingOnly = TRUE)
loadavg <- function() paste(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3], collapse = " ")
mem_avail_gb <- as.numeric(sub("[^0-9]*([0-9]+).*", "\\1",
                               grep("^MemAvailable:", readLines("/proc/meminfo"), value = TRUE))) / 2^20
cat(sprintf("start: load average %s, %.1f GB available, %d threads\n", loadavg(), mem_avail_gb,
            bench_threads))
n_cells <- if (length(args) >= 1) as.numeric(args[1]) else 1e6
gpc <- if (length(args) >= 2) as.numeric(args[2]) else 600
n_genes <- 20000
n_types <- 10
t_sim <- system.time(
  sim <- simulate_counts(n_cells = n_cells, n_genes = n_genes, n_types = n_types, seed = 2026,
                         genes_per_cell = gpc, as = "list", n_threads = bench_threads)
)[["elapsed"]]
x <- sim$counts
g <- sim$cells$cell_type
rm(sim)
invisible(gc())
size_gb <- as.numeric(object.size(x)) / 2^30
cat(sprintf("data: %d genes x %d cells, %.1f M non-zeros (%.0f per cell), dgCMatrix object.size %.2f GB; simulated in %.1f s on %d threads\n",
            nrow(x), ncol(x), length(x@x) / 1e6, length(x@x) / ncol(x), size_gb, t_sim,
            bench_threads))
rss0 <- rss_kb("VmRSS") / 2^20
reset_peak()
st <- system.time(res <- find_markers(x, g, n_threads = bench_threads))
peak <- rss_kb("VmHWM") / 2^20
t <- st[["elapsed"]]
cpu <- st[["user.self"]] + st[["sys.self"]]
cat(sprintf("find_markers (scanpy flavour, %d groups, all genes, %d threads): %.1f s wall, %.1f s CPU (load average %s)\n",
            nlevels(g), bench_threads, t, cpu, loadavg()))
cat(sprintf("RSS: %.2f GB before, peak %.2f GB during find_markers = %.2fx the dgCMatrix (extra %.2f GB = %.2fx)\n",
            rss0, peak, peak / size_gb, peak - rss0, (peak - rss0) / size_gb))
cat(sprintf("result: %d rows; top marker per group: %s\n", nrow(res),
            paste(tapply(res$gene, res$group, `[`, 1), collapse = ", ")))
cat(sprintf("ACCEPT time < 60 s: %s; peak memory < 1.5x the dgCMatrix: %s\n",
            if (t < 60) "yes" else "NO", if (peak / size_gb < 1.5) "yes" else "NO"))
