# presto side of bench/wilcoxon.R: presto::wilcoxauc (one-vs-rest, 1 thread), timed.
#
#   PRESTO_LIB=/tmp/presto-lib Rscript bench/peers/wilcoxon_presto.R <dir> <n_genes> <n_cells> [reps]
#
# presto 1.0.0 is not on CRAN; it is installed from its source snapshot into a throw-away
# library (see tools/fixtures/README.md). <dir> holds the genes x cells dgCMatrix slots
# written by R (as bench/dotplot.R does): x.bin (double), i.bin, p.bin (int32), genes.txt,
# groups.txt, levels.txt. Times wilcoxauc(X, y) with X the dgCMatrix and y the factor
# (levels from levels.txt); loading excluded, best of `reps` (default 1) after a warm-up
# on 50 genes. Reports the extra peak RSS of the timed calls (VmHWM, reset through
# /proc/self/clear_refs where allowed). Writes <dir>/wilcoxon_presto.csv (presto's frame).
# Prints: ... seconds=<best>
args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 3L) stop("usage: Rscript wilcoxon_presto.R <dir> <n_genes> <n_cells> [reps]")
d <- args[[1]]
nr <- as.integer(args[[2]])
nc <- as.integer(args[[3]])
reps <- if (length(args) > 3L) as.integer(args[[4]]) else 1L
presto_lib <- Sys.getenv("PRESTO_LIB", "/tmp/presto-lib")
suppressPackageStartupMessages({
  library(Matrix)
  library(presto, lib.loc = presto_lib)
})

rd <- function(f, what, size) {
  con <- file(file.path(d, f), "rb")
  on.exit(close(con))
  readBin(con, what, n = file.size(file.path(d, f)) / size, size = size, endian = "little")
}
x <- rd("x.bin", "double", 8L)
i <- rd("i.bin", "integer", 4L)
p <- rd("p.bin", "integer", 4L)
genes <- readLines(file.path(d, "genes.txt"))[seq_len(nr)]
groups <- readLines(file.path(d, "groups.txt"))[seq_len(nc)]
levs <- readLines(file.path(d, "levels.txt"))
levs <- levs[nzchar(levs)]
X <- new("dgCMatrix", x = x, i = i, p = p, Dim = c(nr, nc),
         Dimnames = list(genes, paste0("c", seq_len(nc))))
rm(x, i, p)
y <- factor(groups, levels = levs)
stopifnot(!anyNA(y))

rss_kb <- function(field) {
  s <- readLines("/proc/self/status")
  as.numeric(sub("[^0-9]*([0-9]+).*", "\\1", grep(paste0("^", field, ":"), s, value = TRUE)))
}

invisible(wilcoxauc(X[1:50, ], y))
invisible(gc())
rss0 <- rss_kb("VmRSS")
try(writeLines("5", "/proc/self/clear_refs"), silent = TRUE)
res <- NULL
t <- vapply(seq_len(reps), function(k) {
  system.time(res <<- wilcoxauc(X, y))[["elapsed"]]
}, numeric(1))
peak_extra_mb <- (rss_kb("VmHWM") - rss0) / 1024
data.table::fwrite(res, file.path(d, "wilcoxon_presto.csv"))
cat(sprintf(paste0("presto %s wilcoxauc, %d cells x %d genes, %d groups, one-vs-rest, ",
                   "1 thread (best of %d); extra peak RSS %.0f MB: seconds=%.4f\n"),
            as.character(packageVersion("presto", lib.loc = presto_lib)), nc, nr, nlevels(y),
            reps, max(peak_extra_mb, 0), min(t)))
