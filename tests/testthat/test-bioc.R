# BiocParallel scale-out and out-of-core (HDF5 / DelayedArray / h5ad) input: every path
# must give exactly the in-memory, single-process result.

has_bp <- function() requireNamespace("BiocParallel", quietly = TRUE)
has_h5 <- function() requireNamespace("HDF5Array", quietly = TRUE)
has_da <- function() requireNamespace("DelayedArray", quietly = TRUE)

bioc_data <- local({
  d <- NULL
  function() {
    if (is.null(d)) {
      sim <- simulate_counts(n_cells = 600, n_genes = 400, seed = 3, as = "list", n_threads = 1)
      x <- normalize_counts(sim$counts, n_threads = 1)
      # an all-zero gene and a gene expressed in one cell (ties, NaN/Inf corner cases)
      x[5, ] <- 0
      x[7, ] <- 0
      x[7, 3] <- 1.5
      x <- Matrix::drop0(x)
      d <<- list(sim = sim, x = x, groups = sim$cells$cell_type)
    }
    d
  }
})

# One SnowParam for the file: real worker processes that load the installed scannot
# (stopped by the last test).
snow_env <- new.env()
snow <- function() {
  if (is.null(snow_env$p)) {
    snow_env$p <- BiocParallel::SnowParam(2, progressbar = FALSE)
    BiocParallel::bpstart(snow_env$p)
  }
  snow_env$p
}

test_that("bh_adjust() is the Rust core's BH, NaN and ties included", {
  d <- bioc_data()
  for (flavor in c("scanpy", "presto")) {
    r <- find_markers(d$x, d$groups, flavor = flavor, n_threads = 1)
    g <- if (flavor == "presto") split(r, r$group) else split(r, r$group)
    for (k in names(g)) {
      expect_identical(scannot:::bh_adjust(g[[k]]$pval, flavor == "presto"), g[[k]]$padj)
    }
  }
  p <- c(0.5, 0.01, 0.01, 1, 0, 0.2, 0.03, 0.5)
  expect_identical(scannot:::bh_adjust(p, TRUE), stats::p.adjust(p, "BH"))
  pn <- c(p, NaN)
  expect_identical(scannot:::bh_adjust(pn, FALSE)[9], 1)
})

test_that("gene blocks in process give the single-call Wilcoxon exactly", {
  skip_if_not(has_da())
  d <- bioc_data()
  old <- options(scannot.memory = 3e6) # forces several gene ranges
  on.exit(options(old))
  da <- DelayedArray::DelayedArray(d$x)
  n_ranges <- length(scannot:::split_capped(scannot:::gene_weights(da),
                                            scannot:::wilcoxon_range_cap(ncol(da), 1)))
  expect_gt(n_ranges, 2)
  for (flavor in c("scanpy", "presto")) {
    ref <- find_markers(d$x, d$groups, flavor = flavor, n_threads = 1)
    got <- find_markers(da, d$groups, flavor = flavor, n_threads = 1)
    expect_identical(got, ref)
    # ranges spilled to disk (default) or each range re-reading the store
    withr_spill <- options(scannot.spill = FALSE)
    got2 <- find_markers(da, d$groups, flavor = flavor, n_threads = 1)
    options(withr_spill)
    expect_identical(got2, ref)
  }
  # the spill files are removed
  expect_length(list.files(tempdir(), pattern = "^scannot-spill-"), 0L)
  ref <- find_markers(d$x, d$groups, reference = "B", tie_correct = TRUE, n_threads = 1)
  expect_identical(find_markers(da, d$groups, reference = "B", tie_correct = TRUE,
                                n_threads = 1), ref)
})

test_that("find_markers / dotplot_data with SnowParam(2) equal the in-process result", {
  skip_if_not(has_bp())
  d <- bioc_data()
  p <- snow()
  for (flavor in c("scanpy", "presto")) {
    ref <- find_markers(d$x, d$groups, flavor = flavor, n_threads = 1)
    expect_identical(find_markers(d$x, d$groups, flavor = flavor, n_threads = 1, BPPARAM = p),
                     ref)
  }
  genes <- rownames(d$x)[c(1:12, 5, 7, 3)]
  mk <- list(a = genes[1:6], b = genes[7:15])
  for (ss in c("none", "var", "group")) {
    ref <- dotplot_data(d$x, mk, d$groups, standard_scale = ss, n_threads = 1)
    expect_identical(dotplot_data(d$x, mk, d$groups, standard_scale = ss, n_threads = 1,
                                  BPPARAM = p), ref)
  }
  # dense input too
  dx <- as.matrix(d$x[1:60, ])
  expect_identical(find_markers(dx, d$groups, n_threads = 1, BPPARAM = p),
                   find_markers(dx, d$groups, n_threads = 1))
})

test_that("HDF5Array input (writeHDF5Array) equals the in-memory result", {
  skip_if_not(has_h5())
  d <- bioc_data()
  f <- tempfile(fileext = ".h5")
  h <- HDF5Array::writeHDF5Array(d$x, f, "x", with.dimnames = TRUE)
  expect_true(methods::is(h, "DelayedMatrix"))
  old <- options(scannot.memory = 3e6, scannot.block_size = 5e5)
  on.exit(options(old))
  expect_identical(find_markers(h, d$groups, n_threads = 1),
                   find_markers(d$x, d$groups, n_threads = 1))
  mk <- list(a = rownames(d$x)[1:5], b = rownames(d$x)[20:24])
  expect_identical(dotplot_data(h, mk, d$groups, standard_scale = "var", n_threads = 1),
                   dotplot_data(d$x, mk, d$groups, standard_scale = "var", n_threads = 1))
  # an SCE whose assay is on disk
  skip_if_not(has_sce())
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = h),
                                                    colData = d$sim$cells)
  sce_mem <- SingleCellExperiment::SingleCellExperiment(list(logcounts = d$x),
                                                        colData = d$sim$cells)
  expect_identical(find_markers(sce, "cell_type", n_threads = 1),
                   find_markers(sce_mem, "cell_type", n_threads = 1))
})

test_that("an h5ad opened without loading X equals read_h5ad(), also with SnowParam", {
  skip_if_not(has_h5())
  skip_if_not(has_sce())
  d <- bioc_data()
  f <- tempfile(fileext = ".h5ad")
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = d$x),
                                                    colData = d$sim$cells)
  write_h5ad(sce, f, float32 = TRUE)
  mem <- read_h5ad(f, as = "list")$X
  h <- open_h5ad_matrix(f)
  expect_s3_class(h, "scannot_h5ad_matrix")
  expect_identical(dim(h), dim(d$x))
  expect_identical(get_expression(h)$matrix, mem)
  old <- options(scannot.memory = 3e6, scannot.block_size = 1e5)
  on.exit(options(old))
  expect_gt(length(scannot:::cell_blocks(h)), 3)
  expect_gt(length(scannot:::split_capped(scannot:::gene_weights(h),
                                          scannot:::wilcoxon_range_cap(ncol(h), 1))), 2)
  for (flavor in c("scanpy", "presto")) {
    ref <- find_markers(mem, d$groups, flavor = flavor, n_threads = 1)
    got <- find_markers(h, "cell_type", flavor = flavor, n_threads = 1)
    attr(got, "group_by") <- NULL
    expect_identical(got, ref)
  }
  model <- load_celltypist_model(system.file("extdata", "celltypist_default.pkl",
                                             package = "scannot"))
  ref <- annotate_celltypist(mem, model, return_probabilities = TRUE, n_threads = 1)
  expect_identical(annotate_celltypist(h, model, return_probabilities = TRUE, n_threads = 1),
                   ref)
  skip_if_not(has_bp())
  p <- snow()
  expect_identical(find_markers(h, "cell_type", n_threads = 1, BPPARAM = p),
                   find_markers(h, "cell_type", n_threads = 1))
  expect_identical(annotate_celltypist(h, model, return_probabilities = TRUE, n_threads = 1,
                                       BPPARAM = p), ref)
})

test_that("TENxMatrix / H5ADMatrix input equals the in-memory result when HDF5Array can open them", {
  skip_if_not(has_h5())
  d <- bioc_data()
  f <- tempfile(fileext = ".h5")
  tx <- tryCatch({
    suppressWarnings(HDF5Array::writeTENxMatrix(d$x, f, group = "m"))
  }, error = function(e) NULL)
  # HDF5Array 1.26 with rhdf5 2.42 (Debian 12) cannot reopen sparse HDF5 groups
  skip_if(is.null(tx), "HDF5Array cannot open sparse HDF5 groups with this rhdf5")
  expect_identical(find_markers(tx, d$groups, n_threads = 1),
                   find_markers(d$x, d$groups, n_threads = 1))
  skip_if_not(has_sce())
  f2 <- tempfile(fileext = ".h5ad")
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = d$x),
                                                    colData = d$sim$cells)
  write_h5ad(sce, f2)
  hx <- HDF5Array::H5ADMatrix(f2)
  expect_identical(find_markers(hx, d$groups, n_threads = 1),
                   find_markers(read_h5ad(f2, as = "list")$X, d$groups, n_threads = 1))
})

test_that("CellTypist prediction by cell blocks (SnowParam, DelayedArray) is identical", {
  skip_if_not(has_bp())
  skip_if_not(has_da())
  d <- bioc_data()
  model <- load_celltypist_model(system.file("extdata", "celltypist_default.pkl",
                                             package = "scannot"))
  p <- snow()
  oc <- rep(letters[1:6], length.out = ncol(d$x))
  for (mode in c("best match", "prob match")) {
    ref <- annotate_celltypist(d$x, model, mode = mode, majority_voting = TRUE,
                               over_clustering = oc, return_probabilities = TRUE,
                               n_threads = 1)
    got <- annotate_celltypist(d$x, model, mode = mode, majority_voting = TRUE,
                               over_clustering = oc, return_probabilities = TRUE,
                               n_threads = 1, BPPARAM = p)
    expect_identical(got, ref)
  }
  # normalize = TRUE on raw counts, per block
  ref <- annotate_celltypist(d$sim$counts, model, normalize = TRUE, n_threads = 1)
  expect_identical(annotate_celltypist(d$sim$counts, model, normalize = TRUE, n_threads = 1,
                                       BPPARAM = p), ref)
  old <- options(scannot.block_size = 5e4)
  on.exit(options(old))
  da <- DelayedArray::DelayedArray(d$x)
  expect_identical(annotate_celltypist(da, model, n_threads = 1),
                   annotate_celltypist(d$x, model, n_threads = 1))
  expect_error(annotate_celltypist(da, model, majority_voting = TRUE, n_threads = 1),
               class = "scannot_error_over_clustering")
})

test_that("scvi_latent and knn_transfer by cell blocks are identical", {
  skip_if_not(has_bp())
  d <- bioc_data()
  model <- load_scvi_model(system.file("extdata", "scvi_reference", package = "scannot"))
  b <- rep(c("batch1", "batch2"), length.out = ncol(d$sim$counts))
  ref <- scvi_latent(d$sim$counts, model, batch_key = b, return_variance = TRUE,
                     min_fraction = 0, n_threads = 1)
  p <- snow()
  expect_identical(scvi_latent(d$sim$counts, model, batch_key = b, return_variance = TRUE,
                               min_fraction = 0, n_threads = 1, BPPARAM = p), ref)
  if (has_h5()) {
    old <- options(scannot.block_size = 5e4)
    on.exit(options(old))
    h <- HDF5Array::writeHDF5Array(d$sim$counts, tempfile(fileext = ".h5"), "x",
                                   with.dimnames = TRUE)
    expect_identical(scvi_latent(h, model, batch_key = b, return_variance = TRUE,
                                 min_fraction = 0, n_threads = 1), ref)
  }
  set.seed(2)
  centres <- matrix(rnorm(4 * 6, sd = 3), 4)
  type <- sample(4, 300, replace = TRUE)
  rf <- centres[type, ] + matrix(rnorm(300 * 6), 300)
  qr <- centres[sample(4, 101, replace = TRUE), ] + matrix(rnorm(101 * 6), 101)
  labs <- data.frame(a = c("B", "NK", "T", "Mono")[type], b = factor(type))
  ref <- knn_transfer(qr, rf, c("a", "b"), k = 7, reference_labels = labs, threshold = 0.6,
                      n_threads = 1)
  expect_identical(knn_transfer(qr, rf, c("a", "b"), k = 7, reference_labels = labs,
                                threshold = 0.6, n_threads = 1, BPPARAM = p), ref)
})

test_that("bad BPPARAM and missing packages give classed errors", {
  d <- bioc_data()
  expect_error(find_markers(d$x, d$groups, BPPARAM = "two"), class = "scannot_error_input")
  expect_error(open_h5ad_matrix(tempfile()), class = "scannot_error_file")
  skip_if_not(has_da())
  old <- options(scannot.memory = "a lot")
  on.exit(options(old))
  expect_error(find_markers(DelayedArray::DelayedArray(d$x), d$groups),
               class = "scannot_error_input")
})

test_that("worker processes are stopped", {
  skip_if(is.null(snow_env$p))
  BiocParallel::bpstop(snow_env$p)
  expect_false(BiocParallel::bpisup(snow_env$p))
})
