test_that("log1p(CP10k) matches the formula, keeps structure, and all inputs agree", {
  s <- sim_small()
  x <- normalize_counts(s$counts, n_threads = 2)
  tot <- Matrix::colSums(s$counts)
  ref <- log1p(Matrix::t(Matrix::t(s$counts) / (tot / 1e4)))
  expect_equal(as.matrix(x), as.matrix(ref), tolerance = 1e-12)
  expect_identical(x@i, s$counts@i)
  expect_identical(x@p, s$counts@p)
  expect_identical(dimnames(x), dimnames(s$counts))
  d <- normalize_counts(as.matrix(s$counts))
  expect_equal(d, as.matrix(x), tolerance = 1e-14)
  # empty cells stay zero
  z <- s$counts[, 1:3]; z[, 2] <- 0; z <- Matrix::drop0(z)
  expect_equal(sum(normalize_counts(z)[, 2]), 0)
  # the input is untouched
  expect_identical(s$counts@x, sim_small()$counts@x)
})

test_that("Seurat and SCE methods fill data / logcounts", {
  skip_if_not(has_seurat() && has_sce())
  s <- sim_small(n_cells = 100, n_genes = 100)
  sce <- SingleCellExperiment::SingleCellExperiment(list(counts = s$counts))
  sce <- normalize_counts(sce)
  expect_equal(SummarizedExperiment::assay(sce, "logcounts"), normalize_counts(s$counts))
  so <- SeuratObject::CreateSeuratObject(s$counts)
  so <- normalize_counts(so)
  expect_equal(SeuratObject::GetAssayData(so, slot = "data"), normalize_counts(s$counts),
               ignore_attr = TRUE)
})
