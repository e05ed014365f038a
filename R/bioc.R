#' Scale-out (BiocParallel) and out-of-core (HDF5 / DelayedArray) processing
#'
#' @description
#' The heavy functions ([find_markers()], [dotplot_data()], [annotate_celltypist()],
#' [scvi_latent()], [knn_transfer()]) take a `BPPARAM` argument and accept matrices
#' that live on disk. Both give the same numbers as the default in-memory,
#' single-process path (`BPPARAM = NULL`, rayon threads set by `n_threads`).
#'
#' **BiocParallel.** With a `BiocParallel::BiocParallelParam` (e.g.
#' `MulticoreParam(4)`, `SnowParam(4)`, `BatchtoolsParam()` for a cluster), the work is
#' cut into blocks and each block runs scannot's Rust core in a worker process:
#' * Wilcoxon ([find_markers()]) and [dotplot_data()]: **gene blocks** (a rank test needs
#'   every cell of a gene, so the cells are never split); the Benjamini-Hochberg
#'   adjustment is done once over all genes of each group after the blocks are
#'   combined, with the Rust core's arithmetic, so `padj` is the single-process value;
#'   `standard_scale` of the dotplot is likewise applied after combining.
#' * [annotate_celltypist()] prediction, [scvi_latent()] and the kNN queries of
#'   [knn_transfer()]: **cell blocks** (each cell's result depends on that cell only).
#'   Majority voting runs after combining.
#'
#' Workers load the installed scannot (they inherit `R_LIBS`); each block's core runs
#' with `n_threads` threads, so give a worker process as many threads as its share of
#' the cores (e.g. `SnowParam(4)` and `n_threads = 1` on 4 cores). An scVI model is
#' reloaded in each worker from its folder (`model$path`, which must be readable there).
#'
#' **Out-of-core input.** A `DelayedArray::DelayedMatrix` (e.g. an
#' `HDF5Array::HDF5Matrix` from `writeHDF5Array()`, an `HDF5Array::TENxMatrix`, an
#' `HDF5Array::H5ADMatrix`, or a SingleCellExperiment whose assay is one) or an h5ad
#' file opened with [open_h5ad_matrix()] (X stays on disk) is read in blocks and never
#' realised as a whole:
#' * cell blocks of at most `getOption("scannot.block_size")` bytes (default
#'   `DelayedArray::getAutoBlockSize()`, 100 MB) of sparse data (12 bytes a non-zero) or
#'   dense data (8 bytes a value);
#' * the Wilcoxon test of a cell-major store reads it in several **passes over gene
#'   ranges**: one counting pass gives the non-zeros of every gene, genes are cut into
#'   ranges whose non-zeros (12 bytes each) fit `getOption("scannot.memory")` (default
#'   4 GB) less the temporaries of reading one block (~5 blocks), the Rust core's
#'   scratch (10 bytes x 32 x cells per thread) and R itself (~0.3 GB),
#'   and each range is tested exactly and discarded. In one process the store is read
#'   once more and each range's non-zeros are spilled to their own temporary file
#'   (12 bytes a non-zero in `getOption("scannot.spill_dir", tempdir())`, removed at the
#'   end), then read back range by range; with `options(scannot.spill = FALSE)` each
#'   range instead re-reads the whole store (no disk, one read per range). Peak memory is
#'   about the budget plus the result, whatever the number of cells. With `BPPARAM`, the
#'   ranges run in the workers, each reading the store itself (give each worker the
#'   budget).
#'
#' @section Running on a cluster (SLURM with BatchtoolsParam):
#' ```r
#' library(BiocParallel)
#' # a batchtools SLURM template, e.g. saved as ~/slurm.tmpl:
#' #   #!/bin/bash
#' #   #SBATCH --job-name=<%= job.name %>
#' #   #SBATCH --output=<%= log.file %>
#' #   #SBATCH --error=<%= log.file %>
#' #   #SBATCH --time=<%= resources$walltime %>
#' #   #SBATCH --ntasks=1
#' #   #SBATCH --cpus-per-task=<%= resources$ncpus %>
#' #   #SBATCH --mem-per-cpu=<%= resources$memory %>
#' #   module load R   # if your site uses modules
#' #   export R_LIBS=<your library with scannot>
#' #   Rscript -e 'batchtools::doJobCollection("<%= uri %>")'
#' param <- BatchtoolsParam(workers = 20, cluster = "slurm", template = "~/slurm.tmpl",
#'                          resources = list(walltime = "01:00:00", ncpus = 4,
#'                                           memory = "2G"))
#' options(scannot.memory = 6e9)          # per worker, bytes
#' x <- open_h5ad_matrix("/shared/atlas.h5ad")   # file on a shared file system
#' markers <- find_markers(x, "cell_type", BPPARAM = param, n_threads = 4)
#' pred <- annotate_celltypist(x, "Immune_All_Low.pkl", BPPARAM = param, n_threads = 4)
#' ```
#' The file (and for scVI the model folder) must be on a file system the nodes see;
#' workers need scannot, BiocParallel and rhdf5/HDF5Array installed in the library named
#' by `R_LIBS`, the submitting session also batchtools. Each worker holds one gene range
#' (Wilcoxon) or one cell block (prediction) at a time, so `--mem-per-cpu` x `ncpus`
#' must cover `scannot.memory`; a Wilcoxon worker reads the whole (cell-major) file once
#' for its gene range. `MulticoreParam()` (forked workers, Linux/macOS) and `SnowParam()`
#' (sockets, any OS) work the same way on one machine.
#'
#' @section Options:
#' * `scannot.block_size`: bytes of matrix data read at once (cell blocks).
#' * `scannot.memory`: memory budget in bytes of one Wilcoxon pass (gene range), for the
#'   whole R process (or worker).
#' * `scannot.spill` (default `TRUE`), `scannot.spill_dir` (default `tempdir()`): spill
#'   the gene ranges of an out-of-core Wilcoxon test to disk (see above).
#' @name scannot_scale_out
#' @aliases scannot_scale_out
NULL

# ---------------------------------------------------------------------------------------
# optional packages, parameters

bioc_need <- function(pkg, what, call = rlang::caller_env()) {
  if (!requireNamespace(pkg, quietly = TRUE)) {
    abort_scannot(sprintf("%s needs the Bioconductor package '%s'. Install it (BiocManager::install(\"%s\"), or on Debian/Ubuntu apt-get install r-bioc-%s).",
                          what, pkg, pkg, tolower(pkg)), "bioc", call = call)
  }
  invisible(TRUE)
}

check_bpparam <- function(BPPARAM, call = rlang::caller_env()) {
  if (is.null(BPPARAM)) return(NULL)
  bioc_need("BiocParallel", "`BPPARAM`", call)
  if (!methods::is(BPPARAM, "BiocParallelParam")) {
    abort_scannot("`BPPARAM` must be NULL or a BiocParallel parameter object, e.g. BiocParallel::SnowParam(2).",
                  "input", call = call)
  }
  BPPARAM
}

bioc_workers <- function(BPPARAM) {
  max(1L, as.integer(BiocParallel::bpnworkers(BPPARAM)))
}

bioc_lapply <- function(X, FUN, ..., BPPARAM, call = rlang::caller_env()) {
  res <- tryCatch(BiocParallel::bplapply(X, FUN, ..., BPPARAM = BPPARAM),
                  error = function(e) e)
  if (inherits(res, "error")) {
    # a classed scannot error raised in a worker comes back wrapped: keep its message
    msg <- conditionMessage(res)
    rr <- attr(res, "result") %||% list()
    inner <- Filter(function(x) inherits(x, "condition"), rr)
    if (length(inner)) msg <- conditionMessage(inner[[1]])
    abort_scannot(sprintf("A BiocParallel worker failed: %s", msg), "bioc", call = call)
  }
  res
}

# Bytes of matrix data read at once.
bioc_block_size <- function() {
  bs <- getOption("scannot.block_size")
  if (is.null(bs)) {
    bs <- if (requireNamespace("DelayedArray", quietly = TRUE)) {
      DelayedArray::getAutoBlockSize()
    } else {
      1e8
    }
  }
  if (!is.numeric(bs) || length(bs) != 1L || is.na(bs) || bs < 1e4) {
    abort_scannot("option `scannot.block_size` must be a number of bytes >= 1e4.", "input")
  }
  as.numeric(bs)
}

# Memory budget (bytes) of one Wilcoxon pass over a gene range.
bioc_memory <- function() {
  m <- getOption("scannot.memory", 4e9)
  if (!is.numeric(m) || length(m) != 1L || is.na(m) || m < 1e5) {
    abort_scannot("option `scannot.memory` must be a number of bytes >= 1e5.", "input")
  }
  as.numeric(m)
}

# Non-zeros of one Wilcoxon gene range: the budget less the temporaries of reading one
# block (about 5x the block: indices, values, filter, index vectors), the core's scratch
# (10 bytes x max(2^21, 32 x cells) per thread) and R itself (~0.3 GB), at 12 bytes a
# value, at least 1/8 of the budget.
wilcoxon_range_cap <- function(n_cells, n_threads) {
  mem <- bioc_memory()
  rest <- 5 * bioc_block_size() + 10 * max(2^21, 32 * n_cells) * max(1, n_threads) + 3e8
  min(max(mem - rest, mem / 8) / 12, .Machine$integer.max)
}

# Contiguous pieces of 1..n with about equal weight, at most `k` pieces.
split_balanced <- function(w, k) {
  n <- length(w)
  k <- max(1L, min(as.integer(k), n))
  if (n == 0L) return(list())
  cw <- cumsum(as.numeric(w) + 1e-9)
  cut <- findInterval(cw / cw[n] * k, seq_len(k - 1L) + 1e-12) + 1L
  unname(split(seq_len(n), cut))
}

# Contiguous pieces of 1..n whose weights stay under `cap` (a single item may exceed it).
split_capped <- function(w, cap) {
  n <- length(w)
  if (n == 0L) return(list())
  out <- list()
  start <- 1L
  acc <- 0
  for (j in seq_len(n)) {
    if (j > start && acc + w[j] > cap) {
      out[[length(out) + 1L]] <- start:(j - 1L)
      start <- j
      acc <- 0
    }
    acc <- acc + w[j]
  }
  out[[length(out) + 1L]] <- start:n
  out
}

# ---------------------------------------------------------------------------------------
# out-of-core matrices: DelayedMatrix and h5ad X opened without loading it

is_block_matrix <- function(m) {
  inherits(m, "scannot_h5ad_matrix") || methods::is(m, "DelayedArray")
}

#' Open the expression matrix of an h5ad file without loading it
#'
#' Returns a handle on `X` (or a layer) of an AnnData file; the values stay on disk and
#' are read in blocks of cells by the functions that support out-of-core input (see
#' [scannot_scale_out]). Cell metadata (`obs`) and feature metadata (`var`) are read,
#' so `group_by` can name an `obs` column. The matrix is read with rhdf5 (installed
#' with HDF5Array); CSR (AnnData's default) and dense matrices are supported.
#'
#' @param path Path of the `.h5ad` file.
#' @param layer `NULL` for `X`, or the name of an element of `layers`.
#' @return An object of class `scannot_h5ad_matrix` (genes x cells): use `dim()`,
#'   `dimnames()`, [get_expression()] (`delayed = FALSE` loads it), or pass it to
#'   [find_markers()], [annotate_celltypist()], [dotplot_data()], [scvi_latent()].
#' @export
#' @examples
#' \dontrun{
#' x <- open_h5ad_matrix("atlas.h5ad")
#' m <- find_markers(x, "cell_type")
#' }
open_h5ad_matrix <- function(path, layer = NULL) {
  call <- rlang::current_env()
  path <- check_h5ad_path(path, call = call)
  bioc_need("rhdf5", "open_h5ad_matrix()", call)
  elem <- if (is.null(layer)) "X" else paste0("layers/", check_string(layer))
  info <- tryCatch(rhdf5::h5ls(path, recursive = TRUE), error = function(e) NULL)
  if (is.null(info)) abort_scannot(sprintf("'%s' is not a readable HDF5 file.", path), "format", call = call)
  full <- sub("^/+", "/", paste0(info$group, "/", info$name))
  full <- sub("^//", "/", full)
  if (!paste0("/", elem) %in% full) {
    abort_scannot(sprintf("'%s' has no element '%s'.", path, elem), "format", call = call)
  }
  row <- info[full == paste0("/", elem), , drop = FALSE][1, ]
  var <- read_h5ad_var(path)
  obs <- read_h5ad_obs(path)
  genes <- rownames(var)
  cells <- rownames(obs)
  if (row$otype == "H5I_GROUP") {
    at <- rhdf5::h5readAttributes(path, elem)
    enc <- at[["encoding-type"]] %||% at[["h5sparse_format"]] %||% ""
    if (!enc %in% c("csr_matrix", "csr")) {
      abort_scannot(sprintf("'%s' in '%s' is stored as '%s': out-of-core reading needs a CSR (cell-major) or dense matrix. Rewrite it as CSR (AnnData's default) or load it with read_h5ad().",
                            elem, path, enc), "format", call = call)
    }
    indptr <- as.double(rhdf5::h5read(path, paste0(elem, "/indptr"), bit64conversion = "double"))
    kind <- "csr"
  } else {
    indptr <- NULL
    kind <- "dense"
  }
  if (length(cells) == 0L || (!is.null(indptr) && length(indptr) != length(cells) + 1L)) {
    abort_scannot(sprintf("'%s' in '%s' does not match the file's %d obs names: the file is corrupt.",
                          elem, path, length(cells)), "format", call = call)
  }
  structure(list(path = path, elem = elem, kind = kind, indptr = indptr,
                 dim = c(length(genes), length(cells)), dimnames = list(genes, cells),
                 obs = obs, var = var),
            class = "scannot_h5ad_matrix")
}

#' @export
dim.scannot_h5ad_matrix <- function(x) as.integer(unclass(x)$dim)

#' @export
dimnames.scannot_h5ad_matrix <- function(x) unclass(x)$dimnames

#' @method print scannot_h5ad_matrix
#' @export
print.scannot_h5ad_matrix <- function(x, ...) {
  x <- unclass(x)
  cat(sprintf("<scannot_h5ad_matrix: %d genes x %d cells, %s '%s' of %s%s>\n",
              x$dim[1], x$dim[2], x$kind, x$elem, x$path,
              if (!is.null(x$indptr)) sprintf(", %.0f non-zeros", x$indptr[length(x$indptr)]) else ""))
  invisible(x)
}

# Non-zeros per cell (or NULL when unknown without reading values).
block_col_weights <- function(m) {
  if (inherits(m, "scannot_h5ad_matrix") && !is.null(unclass(m)$indptr)) {
    return(diff(unclass(m)$indptr))
  }
  NULL
}

bytes_per_cell <- function(m) {
  if (inherits(m, "scannot_h5ad_matrix") && !is.null(unclass(m)$indptr)) {
    ip <- unclass(m)$indptr
    return(12 * ip[length(ip)] / max(1, length(ip) - 1L))
  }
  # a DelayedMatrix block is realised dense before it becomes sparse
  8 * nrow(m)
}

# Cell blocks of about `bytes` bytes each (all cells in order).
cell_blocks <- function(m, bytes = bioc_block_size(), min_blocks = 1L) {
  n <- ncol(m)
  w <- block_col_weights(m)
  if (is.null(w)) w <- rep(bytes_per_cell(m) / 12, n)
  cap <- bytes / 12
  b <- split_capped(w, cap)
  if (length(b) < min_blocks) b <- split_balanced(w, min_blocks)
  b
}

# Read cells `cols` (contiguous, increasing) of a block matrix as a dgCMatrix (sparse
# stores) or a double matrix (dense stores), genes x cells, with dimnames.
read_cells <- function(m, cols) {
  if (inherits(m, "scannot_h5ad_matrix")) {
    h <- unclass(m)
    c1 <- cols[1]
    c2 <- cols[length(cols)]
    if (h$kind == "dense") {
      x <- rhdf5::h5read(h$path, h$elem, index = list(NULL, c1:c2))
      storage.mode(x) <- "double"
      dimnames(x) <- list(h$dimnames[[1]], h$dimnames[[2]][c1:c2])
      return(x)
    }
    a <- h$indptr[c1]
    nnz <- h$indptr[c2 + 1L] - a
    if (nnz > 0) {
      i <- rhdf5::h5read(h$path, paste0(h$elem, "/indices"), start = a + 1, count = nnz,
                         bit64conversion = "double")
      x <- rhdf5::h5read(h$path, paste0(h$elem, "/data"), start = a + 1, count = nnz)
    } else {
      i <- integer()
      x <- double()
    }
    out <- methods::new("dgCMatrix")
    out@Dim <- c(h$dim[1], length(c1:c2))
    methods::slot(out, "i", check = FALSE) <- as.integer(i)
    methods::slot(out, "p", check = FALSE) <- as.integer(h$indptr[c1:(c2 + 1L)] - a)
    methods::slot(out, "x", check = FALSE) <- as.double(x)
    out@Dimnames <- list(h$dimnames[[1]], h$dimnames[[2]][c1:c2])
    return(out)
  }
  # DelayedMatrix: DelayedArray realises the block (sparse stores stay sparse)
  blk <- m[, cols, drop = FALSE]
  if (isTRUE(DelayedArray::is_sparse(blk))) {
    out <- methods::as(blk, "dgCMatrix")
  } else {
    out <- as.matrix(blk)
  }
  as_expr_matrix(out)
}

# Realise a whole block matrix in memory (only for callers without block support).
realize_block_matrix <- function(m) {
  if (methods::is(m, "DelayedArray")) {
    return(if (isTRUE(DelayedArray::is_sparse(m))) methods::as(m, "dgCMatrix") else as.matrix(m))
  }
  blocks <- lapply(cell_blocks(m), function(cols) read_cells(m, cols))
  if (length(blocks) == 1L) return(blocks[[1]])
  do.call(cbind, blocks)
}

# Rows `rows` (sorted) of a dgCMatrix / dense block, cheaply.
take_rows <- function(x, rows) {
  if (is.matrix(x)) return(x[rows, , drop = FALSE])
  if (length(rows) == nrow(x) && identical(rows, seq_len(nrow(x)))) return(x)
  n <- length(rows)
  if (n > 0L && rows[n] - rows[1] + 1L == n && !anyNA(rows) && !is.unsorted(rows)) {
    # a contiguous range of a dgCMatrix: one vectorised filter over the non-zeros
    lo <- as.integer(rows[1] - 1L)
    keep <- x@i >= lo & x@i < lo + n
    kept <- c(0L, cumsum(keep))
    out <- methods::new("dgCMatrix")
    out@Dim <- c(n, ncol(x))
    methods::slot(out, "i", check = FALSE) <- x@i[keep] - lo
    methods::slot(out, "x", check = FALSE) <- x@x[keep]
    methods::slot(out, "p", check = FALSE) <- kept[x@p + 1L]
    out@Dimnames <- list(rownames(x)[rows], colnames(x))
    return(out)
  }
  x[rows, , drop = FALSE]
}

# Non-zeros (or values) per gene over the whole block matrix: one counting pass.
gene_weights <- function(m, BPPARAM = NULL) {
  blocks <- cell_blocks(m)
  parts <- if (is.null(BPPARAM)) lapply(blocks, count_block, m = m) else
    bioc_lapply(blocks, count_block, m = m, BPPARAM = BPPARAM)
  Reduce(`+`, parts)
}

count_block <- function(cols, m) {
  if (inherits(m, "scannot_h5ad_matrix") && unclass(m)$kind == "csr") {
    # only the gene indices are needed
    h <- unclass(m)
    a <- h$indptr[cols[1]]
    nnz <- h$indptr[cols[length(cols)] + 1L] - a
    if (nnz == 0) return(double(h$dim[1]))
    i <- rhdf5::h5read(h$path, paste0(h$elem, "/indices"), start = a + 1, count = nnz,
                       bit64conversion = "double")
    return(as.double(tabulate(as.integer(i) + 1L, h$dim[1])))
  }
  b <- read_cells(m, cols)
  if (is.matrix(b)) return(rep(as.double(ncol(b)), nrow(b)))
  as.double(tabulate(b@i + 1L, nrow(b)))
}

# One gene range of a block matrix, all cells, in memory: reads every cell block and keeps
# only the range's values. With `nnz` (the range's non-zeros, from gene_weights()) the
# result's slots are allocated once and filled block by block, so the peak is the range
# plus one block.
read_gene_range <- function(m, rows, nnz = NULL) {
  blocks <- cell_blocks(m)
  if (is.null(nnz) || (inherits(m, "scannot_h5ad_matrix") && unclass(m)$kind == "dense") ||
      (methods::is(m, "DelayedArray") && !isTRUE(DelayedArray::is_sparse(m)))) {
    parts <- lapply(blocks, function(cols) take_rows(read_cells(m, cols), rows))
    if (length(parts) == 1L) return(parts[[1]])
    return(do.call(cbind, parts))
  }
  i <- integer(nnz)
  x <- double(nnz)
  p <- integer(ncol(m) + 1L)
  at <- 0L
  col <- 0L
  for (cols in blocks) {
    b <- read_cells(m, cols)
    if (is.matrix(b)) b <- methods::as(methods::as(b, "CsparseMatrix"), "generalMatrix")
    b <- take_rows(b, rows)
    nb <- length(b@x)
    if (at + nb > nnz) {
      abort_scannot("The matrix changed while it was read (more values than counted).", "input")
    }
    if (nb) {
      idx <- at + seq_len(nb)
      i[idx] <- b@i
      x[idx] <- b@x
      rm(idx)
    }
    p[col + seq_len(ncol(b)) + 1L] <- b@p[-1L] + at
    at <- at + nb
    col <- col + ncol(b)
    rm(b)
  }
  if (at != nnz) {
    i <- i[seq_len(at)]
    x <- x[seq_len(at)]
  }
  out <- methods::new("dgCMatrix")
  out@Dim <- c(length(rows), ncol(m))
  methods::slot(out, "i", check = FALSE) <- i
  methods::slot(out, "p", check = FALSE) <- p
  methods::slot(out, "x", check = FALSE) <- x
  out@Dimnames <- list(rownames(m)[rows], colnames(m))
  out
}

# ---------------------------------------------------------------------------------------
# Wilcoxon by gene blocks

# The Rust call on one gene block; `src` is an in-memory block or
# list(m = block matrix, rows = gene range) to read in the worker.
wilcoxon_block <- function(src, codes, n_groups, tested, ref_code, tie_correct, flavor,
                           log_base, n_threads) {
  m <- if (inherits(src, "scannot_spill")) {
    read_spill(src)
  } else if (is.list(src) && !is.null(src$rows)) {
    read_gene_range(src$m, src$rows, src$nnz)
  } else {
    src
  }
  a <- matrix_args(m)
  rs_call(rs_wilcoxon(a$p, a$i, a$x, a$nrow, a$ncol, a$dense, codes, n_groups, tested,
                      ref_code, tie_correct, flavor, log_base, n_threads))
}

# Split the non-zeros of a cell-major block matrix into one pair of files per gene range
# (row indices within the range as int32, values as double, in cell order: a CSC range
# matrix) in a single read; returns one "scannot_spill" source per range.
spill_ranges <- function(m, ranges, dir) {
  nb <- length(ranges)
  lo <- vapply(ranges, function(r) as.integer(r[1] - 1L), integer(1))
  cuts <- lo[-1L]
  files <- file.path(dir, sprintf("range%04d", seq_len(nb)))
  ci <- lapply(paste0(files, ".i"), file, open = "wb")
  cx <- lapply(paste0(files, ".x"), file, open = "wb")
  on.exit({
    lapply(ci, close)
    lapply(cx, close)
  })
  counts <- matrix(0L, ncol(m), nb)
  nnz <- numeric(nb)
  for (cols in cell_blocks(m)) {
    b <- read_cells(m, cols)
    if (is.matrix(b)) b <- methods::as(methods::as(b, "CsparseMatrix"), "generalMatrix")
    bucket <- findInterval(b@i, cuts) + 1L
    cell <- rep.int(seq_along(cols), diff(b@p))
    counts[cols, ] <- tabulate((bucket - 1L) * length(cols) + cell, nb * length(cols))
    rm(cell)
    for (k in seq_len(nb)) {
      sel <- which(bucket == k)
      if (length(sel)) {
        writeBin(b@i[sel] - lo[k], ci[[k]])
        writeBin(b@x[sel], cx[[k]])
        nnz[k] <- nnz[k] + length(sel)
      }
    }
    rm(b, bucket)
  }
  lapply(seq_len(nb), function(k) {
    structure(list(file = files[k], nnz = nnz[k], counts = counts[, k],
                   dimnames = list(rownames(m)[ranges[[k]]], colnames(m))),
              class = "scannot_spill")
  })
}

read_spill <- function(src) {
  out <- methods::new("dgCMatrix")
  out@Dim <- c(length(src$dimnames[[1]]), length(src$counts))
  methods::slot(out, "i", check = FALSE) <- readBin(paste0(src$file, ".i"), "integer",
                                                     n = src$nnz)
  methods::slot(out, "x", check = FALSE) <- readBin(paste0(src$file, ".x"), "double",
                                                     n = src$nnz)
  methods::slot(out, "p", check = FALSE) <- c(0L, cumsum(src$counts))
  out@Dimnames <- src$dimnames
  unlink(paste0(src$file, c(".i", ".x")))
  out
}

# Benjamini-Hochberg with exactly the arithmetic of the Rust core (wilcoxon.rs `bh`):
# statsmodels p_(i) / (i / n) or R's n / i * p_(i), running minimum from the largest p
# down (NaN never lowers it), clipped at 1.
bh_adjust <- function(p, r_style) {
  n <- length(p)
  if (n == 0L) return(double())
  o <- order(p, method = "radix")
  rank <- as.double(seq_len(n))
  ps <- p[o]
  q <- if (r_style) n / rank * ps else ps / (rank / n)
  q[is.nan(q)] <- Inf
  run <- rev(cummin(rev(q)))
  out <- double(n)
  out[o] <- pmin(run, 1)
  out
}

# Combine per-block Rust results (group-major within each block) into the layout of one
# call over all genes, and redo the BH adjustment over all genes of each group.
wilcoxon_combine <- function(parts, offsets, flavor) {
  r1 <- parts[[1]]
  k <- length(r1$tested)
  nb <- vapply(parts, function(r) length(r$gene) / max(k, 1L), numeric(1))
  cols <- c("score", "logfc", "pval", "pts", "pts_rest", "auc", "u", "mean_in", "mean_out")
  out <- list(tested = r1$tested, n_in = r1$n_in, n_out = r1$n_out)
  sel <- function(b, s) (s - 1) * nb[b] + seq_len(nb[b])
  for (cn in c("group", "gene", cols)) {
    out[[cn]] <- unlist(lapply(seq_len(k), function(s) {
      unlist(lapply(seq_along(parts), function(b) {
        v <- parts[[b]][[cn]][sel(b, s)]
        if (cn == "gene") v + offsets[b] else v
      }), use.names = FALSE)
    }), use.names = FALSE)
  }
  n_genes <- sum(nb)
  out$padj <- unlist(lapply(seq_len(k), function(s) {
    bh_adjust(out$pval[(s - 1) * n_genes + seq_len(n_genes)], flavor == "presto")
  }), use.names = FALSE)
  out
}

# The Wilcoxon statistics of all genes, in process or by gene blocks.
wilcoxon_run <- function(m, codes, n_groups, tested, ref_code, tie_correct, flavor, log_base,
                         n_threads, BPPARAM, call) {
  block <- is_block_matrix(m)
  if (is.null(BPPARAM) && !block) {
    a <- matrix_args(m)
    return(rs_call(rs_wilcoxon(a$p, a$i, a$x, a$nrow, a$ncol, a$dense, codes, n_groups,
                               tested, ref_code, tie_correct, flavor, log_base, n_threads),
                   call = call))
  }
  if (block) {
    w <- gene_weights(m, BPPARAM)
    ranges <- split_capped(w, wilcoxon_range_cap(ncol(m), n_threads))
    if (!is.null(BPPARAM)) {
      nw <- bioc_workers(BPPARAM)
      if (length(ranges) < nw) ranges <- split_balanced(w, nw)
    }
    srcs <- lapply(ranges, function(rows) list(m = m, rows = rows, nnz = as.integer(sum(w[rows]))))
    if (is.null(BPPARAM) && length(ranges) > 1L && !isFALSE(getOption("scannot.spill"))) {
      # one read of the store, each range's values spilled to its own file, then read back
      # range by range (instead of one full read per range)
      dir <- tempfile("scannot-spill-", tmpdir = getOption("scannot.spill_dir", tempdir()))
      dir.create(dir, recursive = TRUE)
      on.exit(unlink(dir, recursive = TRUE), add = TRUE)
      srcs <- spill_ranges(m, ranges, dir)
    }
  } else {
    w <- if (methods::is(m, "dgCMatrix")) tabulate(m@i + 1L, nrow(m)) else rep(1, nrow(m))
    ranges <- split_balanced(w, bioc_workers(BPPARAM))
    srcs <- lapply(ranges, function(rows) take_rows(m, rows))
  }
  args <- list(codes = codes, n_groups = n_groups, tested = tested, ref_code = ref_code,
               tie_correct = tie_correct, flavor = flavor, log_base = log_base,
               n_threads = n_threads)
  parts <- if (is.null(BPPARAM)) {
    lapply(seq_along(srcs), function(b) {
      r <- rs_call(do.call(wilcoxon_block, c(list(srcs[[b]]), args)), call = call)
      # hand a big range's memory back before the next pass reads its own
      if (block && sum(w[ranges[[b]]]) > 2e7) gc(verbose = FALSE)
      r
    })
  } else {
    do.call(bioc_lapply, c(list(srcs, wilcoxon_block), args, list(BPPARAM = BPPARAM, call = call)))
  }
  offsets <- vapply(ranges, function(r) r[1] - 1L, integer(1))
  wilcoxon_combine(parts, offsets, flavor)
}

# ---------------------------------------------------------------------------------------
# dotplot by gene blocks

dotplot_block <- function(m, rows, codes, n_groups, cutoff, mean_only_expressed, log,
                          n_threads) {
  a <- matrix_args(m)
  rs_call(rs_dotplot(a$p, a$i, a$x, a$nrow, a$ncol, a$dense, rows - 1L, codes, n_groups,
                     cutoff, mean_only_expressed, "none", log, n_threads, FALSE))
}

dotplot_piece <- function(idx, m, row, codes, n_groups, cutoff, mean_only_expressed, log,
                          n_threads) {
  u <- sort(unique(row[idx]))
  dotplot_block(take_rows(m, u), match(row[idx], u), codes, n_groups, cutoff,
                mean_only_expressed, log, n_threads)
}

# scanpy's standard_scale with the Rust core's arithmetic (dotplot.rs `standard_scale`),
# on a group-fastest vector (ng groups x nk genes).
standard_scale_r <- function(v, ng, nk, how) {
  if (how == "none") return(v)
  sc <- function(idx) {
    idx <- idx[!is.nan(v[idx])]
    if (!length(idx)) return(invisible())
    y <- v[idx] - min(v[idx])
    y <- y / max(y)
    y[is.nan(y)] <- 0
    v[idx] <<- y
  }
  if (how == "var") {
    for (k in seq_len(nk)) sc((k - 1L) * ng + seq_len(ng))
  } else {
    for (g in seq_len(ng)) sc((seq_len(nk) - 1L) * ng + g)
  }
  v
}

# Dotplot statistics of marker rows `row` (1-based, may repeat), in process or in blocks.
dotplot_run <- function(m, row, codes, n_groups, cutoff, mean_only_expressed, standard_scale,
                        log, n_threads, BPPARAM, call) {
  if (is.null(BPPARAM) && !is_block_matrix(m)) {
    a <- matrix_args(m)
    return(rs_call(rs_dotplot(a$p, a$i, a$x, a$nrow, a$ncol, a$dense, row - 1L, codes,
                              n_groups, cutoff, mean_only_expressed, standard_scale, log,
                              n_threads, FALSE), call = call))
  }
  if (is_block_matrix(m)) {
    # only the marker genes are needed: read them once, block by block over the cells
    u <- sort(unique(row))
    m <- read_gene_range(m, u)
    row <- match(row, u)
  }
  pieces <- if (is.null(BPPARAM)) list(seq_along(row)) else
    split_balanced(rep(1, length(row)), bioc_workers(BPPARAM))
  run1 <- dotplot_piece
  args <- list(m = m, row = row, codes = codes, n_groups = n_groups, cutoff = cutoff,
               mean_only_expressed = mean_only_expressed, log = log, n_threads = n_threads)
  parts <- if (is.null(BPPARAM)) {
    lapply(pieces, function(p) rs_call(do.call(run1, c(list(p), args)), call = call))
  } else {
    do.call(bioc_lapply, c(list(pieces, run1), args, list(BPPARAM = BPPARAM, call = call)))
  }
  mean <- unlist(lapply(parts, `[[`, "mean"), use.names = FALSE)
  list(mean = mean,
       fraction = unlist(lapply(parts, `[[`, "fraction"), use.names = FALSE),
       color = standard_scale_r(mean, n_groups, length(row), standard_scale),
       n_cells = parts[[1]]$n_cells)
}

# ---------------------------------------------------------------------------------------
# cell blocks (CellTypist prediction, scVI latent)

# Cell blocks for `m`: in memory and BPPARAM -> one block per worker; block matrix -> blocks
# of the block size (at least one per worker).
cell_pieces <- function(m, BPPARAM) {
  nw <- if (is.null(BPPARAM)) 1L else bioc_workers(BPPARAM)
  if (is_block_matrix(m)) return(cell_blocks(m, min_blocks = nw))
  split_balanced(rep(1, ncol(m)), nw)
}

# Apply FUN(block, ...) to cell blocks of `m` (in memory: column subsets; block matrix:
# read in the worker) and return the list of results in cell order.
cell_block_apply <- function(m, FUN, ..., BPPARAM, call) {
  pieces <- cell_pieces(m, BPPARAM)
  block <- is_block_matrix(m)
  one <- cell_block_one
  if (is.null(BPPARAM)) {
    lapply(pieces, function(cols) rs_call(one(cols, m, FUN, block, ...), call = call))
  } else if (block) {
    bioc_lapply(pieces, one, m = m, fn = FUN, block = TRUE, ..., BPPARAM = BPPARAM,
                call = call)
  } else {
    # ship each worker its own columns only
    blocks <- lapply(pieces, function(cols) m[, cols, drop = FALSE])
    bioc_lapply(blocks, FUN, ..., BPPARAM = BPPARAM, call = call)
  }
}

cell_block_one <- function(cols, m, fn, block, ...) {
  b <- if (block) read_cells(m, cols) else if (length(cols) == ncol(m)) m else
    m[, cols, drop = FALSE]
  fn(b, ...)
}

# Row-bind cells x k matrices stored column-major as vectors.
rbind_vectors <- function(parts, name, k) {
  mats <- lapply(parts, function(r) matrix(r[[name]], ncol = k))
  do.call(rbind, mats)
}

# ---------------------------------------------------------------------------------------
# kNN transfer by query blocks

knn_transfer_block <- function(q, r, k, codes, n_levels, n_threads) {
  rs_call(rs_knn_transfer(r, nrow(r), ncol(r), q, nrow(q), ncol(q), k, codes, n_levels,
                          n_threads))
}

# Same result list as one rs_knn_transfer() call: per label column, query cells in order.
knn_transfer_blocks <- function(r, q, k, codes, n_levels, n_threads, BPPARAM, call) {
  pieces <- split_balanced(rep(1, nrow(q)), bioc_workers(BPPARAM))
  qs <- lapply(pieces, function(rows) q[rows, , drop = FALSE])
  parts <- bioc_lapply(qs, knn_transfer_block, r = r, k = k, codes = codes,
                       n_levels = n_levels, n_threads = n_threads, BPPARAM = BPPARAM,
                       call = call)
  nc <- length(n_levels)
  per_col <- function(name) {
    unlist(lapply(seq_len(nc), function(j) {
      unlist(lapply(seq_along(parts), function(b) {
        nb <- length(pieces[[b]])
        parts[[b]][[name]][(j - 1L) * nb + seq_len(nb)]
      }), use.names = FALSE)
    }), use.names = FALSE)
  }
  list(index = unlist(lapply(parts, `[[`, "index"), use.names = FALSE),
       distance = unlist(lapply(parts, `[[`, "distance"), use.names = FALSE),
       label = per_col("label"), prob = per_col("prob"),
       uncertainty = per_col("uncertainty"))
}

# ---------------------------------------------------------------------------------------
# scVI latent by cell blocks

#' @export
dim.scannot_scvi_lazy <- function(x) c(length(unclass(x)$ref), ncol(unclass(x)$m))

#' @export
dimnames.scannot_scvi_lazy <- function(x) list(unclass(x)$ref, colnames(unclass(x)$m))

# One cell block: `src` is an in-memory aligned block, or list(lazy, cols) to read and
# align in the worker.
scvi_latent_block <- function(src, model, batch, cats, cont, batch_size, n_threads) {
  if (is.list(src) && !is.null(src$lazy)) {
    lz <- unclass(src$lazy)
    x <- scvi_align_matrix(read_cells(lz$m, src$cols), lz$ref, lz$pos, lz$found)
  } else {
    x <- src
  }
  model <- check_scvi_model(model, rlang::current_env())
  a <- matrix_args(x)
  rs_call(rs_scvi_latent(model$handle$ptr, a$p, a$i, a$x, a$nrow, a$ncol, a$dense,
                         batch, cats, cont, batch_size, n_threads))
}

scvi_latent_blocks <- function(q, model, batch, cats, batch_size, n_threads, BPPARAM, call) {
  lazy <- inherits(q$x, "scannot_scvi_lazy")
  src_m <- if (lazy) unclass(q$x)$m else q$x
  pieces <- cell_pieces(src_m, BPPARAM)
  sub <- function(v, cols) if (length(v)) v[cols] else v
  jobs <- lapply(pieces, function(cols) {
    list(src = if (lazy) list(lazy = q$x, cols = cols) else q$x[, cols, drop = FALSE],
         batch = sub(batch, cols), cats = lapply(cats, sub, cols = cols),
         cont = lapply(unname(q$continuous), sub, cols = cols))
  })
  parts <- if (is.null(BPPARAM)) {
    lapply(jobs, function(j) rs_call(scvi_latent_job(j, model, batch_size, n_threads), call = call))
  } else {
    bioc_lapply(jobs, scvi_latent_job, model = model, batch_size = batch_size,
                n_threads = n_threads, BPPARAM = BPPARAM, call = call)
  }
  k <- parts[[1]]$n_latent
  list(mean = as.vector(rbind_vectors(parts, "mean", k)),
       var = as.vector(rbind_vectors(parts, "var", k)),
       n_cells = sum(vapply(parts, function(p) as.double(p$n_cells), numeric(1))),
       n_latent = k,
       non_integer = any(vapply(parts, function(p) isTRUE(p$non_integer), logical(1))))
}

scvi_latent_job <- function(job, model, batch_size, n_threads) {
  scvi_latent_block(job$src, model, job$batch, job$cats, job$cont, batch_size, n_threads)
}
