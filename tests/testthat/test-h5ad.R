fx <- function(f) test_path("fixtures", "h5ad", f)
golden <- function(name) jsonlite::fromJSON(fx(paste0(name, ".json")), simplifyVector = FALSE)
num <- function(v) vapply(v, function(x) if (is.null(x)) NA_real_ else as.numeric(x), numeric(1))
chr <- function(v) vapply(v, function(x) if (is.null(x)) NA_character_ else as.character(x), character(1))

# golden CSR (cells x genes) -> dense genes x cells
golden_matrix <- function(g) {
  sh <- unlist(g$shape)
  if (g$type == "dense") return(t(matrix(num(g$data), sh[1], sh[2], byrow = TRUE)))
  m <- Matrix::sparseMatrix(j = rep(seq_len(sh[1]), diff(unlist(g$indptr))), i = unlist(g$indices) + 1L,
                            x = num(g$data), dims = rev(sh))
  as.matrix(m)
}

expect_frame_equal_golden <- function(df, g) {
  expect_equal(rownames(df), chr(g$index))
  expect_equal(names(df), chr(g$order))
  for (nm in names(g$columns)) {
    col <- g$columns[[nm]]
    v <- df[[nm]]
    if (col$type == "categorical") {
      expect_true(is.factor(v), info = nm)
      expect_equal(levels(v), chr(col$categories), info = nm)
      expect_equal(is.ordered(v), isTRUE(col$ordered), info = nm)
      expect_equal(as.character(v), chr(col$values), info = nm)
    } else if (col$type %in% c("object", "string") || (col$type == "nullable" && col$dtype == "string")) {
      expect_equal(v, chr(col$values), info = nm)
    } else if (col$type == "bool" || (col$type == "nullable" && col$dtype == "boolean")) {
      expect_equal(v, vapply(col$values, function(x) if (is.null(x)) NA else isTRUE(x), logical(1)), info = nm)
    } else {
      got <- as.numeric(v); got[is.nan(got)] <- NA
      expect_equal(got, num(col$values), tolerance = 0, info = nm)
    }
  }
}

test_that("read_h5ad reads every element of anndata 0.12's seed-shaped file as anndata does", {
  g <- golden("seedlike")
  a <- read_h5ad(fx("seedlike.h5ad"), as = "list")
  expect_equal(dim(a$X), rev(unlist(g$shape)))
  expect_s4_class(a$X, "dgCMatrix")
  expect_equal(unname(as.matrix(a$X)), golden_matrix(g$X), tolerance = 0)
  expect_equal(unname(as.matrix(a$layers$counts)), golden_matrix(g$layers$counts), tolerance = 0)
  expect_frame_equal_golden(a$obs, g$obs)
  expect_frame_equal_golden(a$var, g$var)
  expect_equal(unname(a$obsm$X_pca), t(golden_matrix(g$obsm$X_pca)), tolerance = 0)
  expect_equal(rownames(a$obsm$X_umap), rownames(a$obs))
  expect_equal(unname(as.matrix(a$obsp$connectivities)), t(golden_matrix(g$obsp$connectivities)))
  expect_equal(unname(a$varm$PCs), t(golden_matrix(g$varm$PCs)))
  # uns: nested dicts, scalars, string arrays, record arrays -> data frames
  u <- g$uns$items
  expect_equal(a$uns$leiden$params$resolution, u$leiden$items$params$items$resolution$value)
  expect_equal(a$uns$leiden_colors, chr(u$leiden_colors$data))
  expect_equal(a$uns$n_pcs, u$n_pcs$value)
  expect_identical(a$uns$flag, TRUE)
  rgg <- u$rank_genes_groups$items
  for (what in c("names", "scores", "pvals")) {
    df <- a$uns$rank_genes_groups[[what]]
    expect_s3_class(df, "data.frame")
    expect_equal(names(df), chr(rgg[[what]]$fields))
    for (f in names(df)) {
      want <- rgg[[what]]$columns[[f]]
      if (what == "names") expect_equal(df[[f]], chr(want)) else expect_equal(df[[f]], num(want), tolerance = 0)
    }
  }
  expect_equal(unname(as.matrix(a$raw$X)), golden_matrix(g$raw$X), tolerance = 0)
  expect_frame_equal_golden(a$raw$var, g$raw$var)
})

test_that("dense, CSC, integer, gzip and lzf files read as anndata reads them", {
  for (name in c("dense", "gzip", "lzf")) {
    g <- golden(name)
    a <- read_h5ad(fx(paste0(name, ".h5ad")), as = "list")
    expect_true(is.matrix(a$X))
    expect_equal(unname(a$X), golden_matrix(g$X), tolerance = 0)
    for (k in names(g$layers)) {
      expect_equal(unname(as.matrix(a$layers[[k]])), golden_matrix(g$layers[[k]]), tolerance = 0, info = k)
    }
    expect_equal(a$uns$string_scalar, "hello")
    expect_equal(a$uns$int_array, matrix(0:5, 2, 3, byrow = TRUE))
    expect_equal(ncol(a$obs), 0L)
  }
})

test_that("the dgCMatrix wraps the vectors Rust allocated (no copy after the read)", {
  r <- rs_h5ad_read_matrix(normalizePath(fx("seedlike.h5ad")), "X")
  addr <- rs_data_address(r$x)
  m <- h5ad_build_matrix(r, NULL, NULL, transpose = TRUE)
  expect_identical(rs_data_address(m@x), addr)
})

test_that("large matrices live outside R's heap: same values, no copy, released by the GC", {
  f <- normalizePath(fx("seedlike.h5ad"))
  plain <- read_h5ad(f, as = "list")$X
  Sys.setenv(SCANNOT_H5AD_MAPPED_MIN_BYTES = "1")
  on.exit(Sys.unsetenv("SCANNOT_H5AD_MAPPED_MIN_BYTES"), add = TRUE)
  invisible(gc())
  before <- rs_h5ad_mapped_bytes()
  r <- rs_h5ad_read_matrix(f, "X")
  huge <- function(b) ceiling(b / 2^21) * 2^21  # mappings are whole 2 MiB pages
  expect_equal(rs_h5ad_mapped_bytes() - before, huge(8 * length(r$x)) + huge(4 * length(r$x)))
  addr <- rs_data_address(r$x)
  m <- h5ad_build_matrix(r, rownames(plain), colnames(plain), transpose = TRUE)
  expect_identical(rs_data_address(m@x), addr)  # the dgCMatrix wraps the mapped vector
  expect_identical(m, plain)
  expect_true(methods::validObject(m))
  expect_equal(Matrix::colSums(m), Matrix::colSums(plain))
  # R semantics: saveRDS / readRDS give an ordinary copy, modifying a copy leaves it alone
  tf <- tempfile(fileext = ".rds")
  saveRDS(m, tf)
  expect_identical(readRDS(tf), plain)
  m2 <- m
  m2@x[1] <- -1
  expect_identical(m@x[1], plain@x[1])
  expect_identical(m2@x[-1], plain@x[-1])
  a <- read_h5ad(f, as = "list")
  expect_identical(a$X, plain)
  rm(r, m, m2, a)
  invisible(gc())
  expect_equal(rs_h5ad_mapped_bytes(), before)
})

test_that("read_h5ad starts the zero fill of X's memory during the file's first check; same results", {
  src <- normalizePath(fx("seedlike.h5ad"))
  plain <- read_h5ad(src, as = "list")
  f <- tempfile(fileext = ".h5ad")
  file.copy(src, f)
  f <- normalizePath(f)  # a file version not checked yet: the checking child runs
  Sys.setenv(SCANNOT_H5AD_MAPPED_MIN_BYTES = "1")
  on.exit(Sys.unsetenv("SCANNOT_H5AD_MAPPED_MIN_BYTES"), add = TRUE)
  expect_true(rs_h5ad_prefault(f, "X"))
  expect_false(rs_h5ad_prefault(f, "layers/none"))
  expect_false(rs_h5ad_prefault(tempfile(), "X"))  # errors are left to the read
  expect_identical(read_h5ad(f, as = "list"), plain)
  g <- tempfile(fileext = ".h5ad")
  file.copy(src, g)
  expect_identical(read_h5ad(normalizePath(g), as = "list"), plain)  # prefault inside
  bad <- tempfile(fileext = ".h5ad")
  writeBin(readBin(src, "raw", 3000), bad)
  expect_false(rs_h5ad_prefault(normalizePath(bad), "X"))
  expect_error(read_h5ad(bad, as = "list"), class = "scannot_error")
  invisible(gc())  # finalize the mapped vectors now, not inside a later test
})

test_that("a released mapping is reused by the next large read (no second zero fill)", {
  skip_if(Sys.getenv("SCANNOT_MAP_RETAIN") == "0")
  f <- normalizePath(fx("dense.h5ad"))
  plain <- rs_h5ad_read_matrix(f, "X")$x
  Sys.setenv(SCANNOT_H5AD_MAPPED_MIN_BYTES = "1")
  on.exit(Sys.unsetenv("SCANNOT_H5AD_MAPPED_MIN_BYTES"), add = TRUE)
  r <- rs_h5ad_read_matrix(f, "X")
  addr <- rs_data_address(r$x)
  rm(r)
  invisible(gc())
  r <- rs_h5ad_read_matrix(f, "X")  # the kept mapping, refilled completely
  expect_identical(rs_data_address(r$x), addr)
  expect_identical(r$x[seq_along(plain)], plain)
  expect_identical(length(r$x), length(plain))
})

test_that("write_h5ad -> read_h5ad round-trips a SingleCellExperiment and a Seurat object", {
  sce <- read_h5ad(fx("seedlike.h5ad"))
  f <- tempfile(fileext = ".h5ad")
  write_h5ad(sce, f)
  back <- read_h5ad(f)
  expect_equal(SummarizedExperiment::assay(back, "X"), SummarizedExperiment::assay(sce, "X"))
  expect_equal(SummarizedExperiment::assay(back, "counts"), SummarizedExperiment::assay(sce, "counts"))
  expect_equal(as.data.frame(SummarizedExperiment::colData(back)),
               as.data.frame(SummarizedExperiment::colData(sce)))
  expect_equal(SingleCellExperiment::reducedDims(back), SingleCellExperiment::reducedDims(sce))
  expect_equal(SingleCellExperiment::colPair(back, "connectivities", asSparse = TRUE),
               SingleCellExperiment::colPair(sce, "connectivities", asSparse = TRUE))
  expect_equal(S4Vectors::metadata(back)$leiden, S4Vectors::metadata(sce)$leiden)
  expect_equal(dim(SingleCellExperiment::altExp(back, "raw")), dim(SingleCellExperiment::altExp(sce, "raw")))
  expect_equal(read_h5ad_obsm(f, "X_pca"), SingleCellExperiment::reducedDim(sce, "X_pca"))
  so <- simulate_counts(n_cells = 40, n_genes = 60, as = "Seurat")
  f2 <- tempfile(fileext = ".h5ad")
  write_h5ad(so, f2)
  a <- read_h5ad(f2, as = "list")
  expect_equal(a$X, SeuratObject::GetAssayData(so, slot = "data"))
  expect_equal(a$layers$counts, SeuratObject::GetAssayData(so, slot = "counts"))
  expect_equal(a$obs$cell_type, so$cell_type, ignore_attr = TRUE)
})

test_that("the SingleCellExperiment and Seurat objects hold the file's matrices; obs/var may be absent", {
  a <- read_h5ad(fx("seedlike.h5ad"), as = "list")
  sce <- read_h5ad(fx("seedlike.h5ad"))
  # built without assays, which went in last: same matrices, names and validity
  expect_true(methods::validObject(sce))
  expect_identical(SummarizedExperiment::assay(sce, "X", withDimnames = FALSE), a$X)
  expect_identical(SummarizedExperiment::assay(sce, "counts", withDimnames = FALSE), a$layers$counts)
  expect_identical(dimnames(sce), dimnames(a$X))
  raw <- SingleCellExperiment::altExp(sce, "raw")
  expect_identical(SummarizedExperiment::assay(raw, "X", withDimnames = FALSE), a$raw$X)
  expect_identical(colnames(raw), colnames(sce))
  # no obs / var in the list: names and sizes come from X
  b <- a; b$obs <- NULL; b$var <- NULL; b$raw <- NULL; b$obsm <- list(); b$obsp <- list()
  s2 <- scannot:::h5ad_to_sce(b, "X")
  expect_identical(dim(s2), dim(a$X))
  expect_identical(dimnames(s2), dimnames(a$X))
  expect_equal(ncol(SummarizedExperiment::colData(s2)), 0L)
  # Seurat: data is X (no counts layer: counts too), or counts + data when both exist
  so <- read_h5ad(fx("seedlike.h5ad"), as = "Seurat")
  expect_identical(unname(as.matrix(SeuratObject::GetAssayData(so, slot = "data"))), unname(as.matrix(a$X)))
  expect_identical(unname(as.matrix(SeuratObject::GetAssayData(so, slot = "counts"))),
                   unname(as.matrix(a$layers$counts)))
  c2 <- a; c2$layers <- list()
  so2 <- scannot:::h5ad_to_seurat(c2)
  expect_identical(SeuratObject::GetAssayData(so2, slot = "data"), SeuratObject::GetAssayData(so2, slot = "counts"))
  expect_equal(unname(as.matrix(SeuratObject::GetAssayData(so2, slot = "data"))), unname(as.matrix(a$X)))
})

test_that("strings are never written as NaN; NA strings become missing categorical codes", {
  m <- Matrix::rsparsematrix(4, 3, 0.5)
  dimnames(m) <- list(paste0("g", 1:4), paste0("c", 1:3))
  sce <- SingleCellExperiment::SingleCellExperiment(list(X = m),
    colData = S4Vectors::DataFrame(lab = c("a", NA, "b"), n = c(1L, NA, 3L), ok = c(TRUE, NA, FALSE)))
  S4Vectors::metadata(sce)$names <- c("x", NA)
  f <- tempfile(fileext = ".h5ad")
  write_h5ad(sce, f)
  obs <- read_h5ad_obs(f)
  expect_equal(as.character(obs$lab), c("a", NA, "b"))
  expect_equal(obs$n, c(1L, NA, 3L))
  expect_equal(obs$ok, c(TRUE, NA, FALSE))
  expect_equal(read_h5ad(f, as = "list")$uns$names, c("x", NA))
})

test_that("write is atomic and bad files give scannot errors", {
  dir <- file.path(tempdir(), paste0("h5w", Sys.getpid())); dir.create(dir)
  f <- file.path(dir, "a.h5ad")
  expect_error(write_h5ad(list(1), f), class = "scannot_error")
  expect_false(file.exists(f))
  expect_length(list.files(dir, all.files = TRUE, no.. = TRUE), 0L)
  expect_error(read_h5ad(file.path(dir, "missing.h5ad")), class = "scannot_error_file")
  bad <- file.path(dir, "bad.h5ad")
  writeLines("not hdf5", bad)
  expect_error(read_h5ad(bad), class = "scannot_error_format")
  src <- readBin(fx("seedlike.h5ad"), "raw", file.size(fx("seedlike.h5ad")))
  for (cut in c(100L, 4000L, 60000L, length(src) - 10L)) {
    writeBin(src[seq_len(cut)], bad)
    expect_error(read_h5ad(bad, as = "list"), class = "scannot_error_format")
  }
  expect_error(read_h5ad_obsm(fx("seedlike.h5ad"), "X_nope"), class = "scannot_error_input")
})

test_that("legacy anndata 0.7 (__categories, h5sparse attributes) and 0.8 files read as anndata does", {
  for (name in c("legacy_0_7_8", "legacy_0_8_0")) {
    g <- golden(name)
    a <- read_h5ad(fx(paste0(name, ".h5ad")), as = "list")
    expect_equal(unname(as.matrix(a$X)), golden_matrix(g$X), tolerance = 0, info = name)
    expect_frame_equal_golden(a$obs, g$obs)
    expect_equal(unname(a$obsm$X_pca), t(golden_matrix(g$obsm$X_pca)), tolerance = 0)
    expect_equal(a$uns$clusters$resolution, 0.5)
  }
})

# Corpus test: truncated and corrupted copies of every fixture, random files and HDF5
# files that are not (valid) AnnData. Each read gives a result or a scannot_error, never
# another error or a crash; truncated, random and non-AnnData files always give an error.
# SCANNOT_FUZZ_ITERS raises the number of corrupted copies per fixture (default 12).
read_outcome <- function(path) {
  tryCatch({ read_h5ad(path, as = "list"); "ok" },
           scannot_error = function(e) "scannot_error",
           error = function(e) paste("other error:", conditionMessage(e)))
}

test_that("truncated, corrupt, random and non-AnnData files give scannot errors (corpus)", {
  iters <- as.integer(Sys.getenv("SCANNOT_FUZZ_ITERS", "12"))
  bad <- tempfile(fileext = ".h5ad")
  on.exit(unlink(bad))
  set.seed(11)
  for (name in list.files(test_path("fixtures", "h5ad"), pattern = "[.]h5ad$")) {
    src <- readBin(fx(name), "raw", file.size(fx(name)))
    n <- length(src)
    for (cut in unique(c(0L, 1L, 8L, 512L, 2048L, round(seq(0.05, 0.95, by = 0.1) * n), n - 1L))) {
      writeBin(src[seq_len(cut)], bad)
      expect_identical(read_outcome(bad), "scannot_error", info = paste(name, "cut at", cut))
    }
    for (k in seq_len(iters)) {
      b <- src
      at <- sample.int(n, 1L)
      len <- min(sample.int(64L, 1L), n - at + 1L)
      b[at:(at + len - 1L)] <- if (k %% 2L) as.raw(sample(0:255, len, TRUE)) else as.raw(0L)
      writeBin(b, bad)
      expect_true(read_outcome(bad) %in% c("ok", "scannot_error"),
                  info = paste(name, "corrupted at", at))
    }
  }
  for (k in 1:6) {
    b <- as.raw(sample(0:255, c(0, 7, 100, 1000, 5000, 70000)[k], TRUE))
    if (k >= 3) b[1:8] <- as.raw(c(0x89, 0x48, 0x44, 0x46, 0x0d, 0x0a, 0x1a, 0x0a))
    writeBin(b, bad)
    expect_identical(read_outcome(bad), "scannot_error", info = paste("random file", k))
  }
  bad_dir <- test_path("fixtures", "h5ad-bad")
  files <- list.files(bad_dir, pattern = "[.]h5$", full.names = TRUE)
  expect_gte(length(files), 10L)
  for (f in files) {
    expect_identical(read_outcome(f), "scannot_error", info = basename(f))
  }
})
