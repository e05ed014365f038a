test_that("n_threads defaults to the option, then all cores", {
  withr_opt <- options(scannot.threads = 3)
  on.exit(options(withr_opt))
  expect_equal(scannot_threads(), 3L)
  options(scannot.threads = NULL)
  expect_equal(scannot_threads(), parallel::detectCores())
})

test_that("dgCMatrix slots reach Rust without a copy", {
  s <- sim_small()
  e <- get_expression(s$counts)
  a <- scannot:::matrix_args(e$matrix)
  expect_identical(scannot:::rs_data_address(a$x), scannot:::rs_data_address(s$counts@x))
  skip_if_not(has_seurat())
  so <- simulate_counts(n_cells = 100, n_genes = 100, as = "Seurat", n_threads = 1)
  orig <- SeuratObject::GetAssayData(so, slot = "data")
  a2 <- scannot:::matrix_args(get_expression(so)$matrix)
  expect_identical(scannot:::rs_data_address(a2$x), scannot:::rs_data_address(orig@x))
})

test_that("dense double matrices reach Rust without a copy", {
  m <- matrix(runif(20), 4, 5)
  a <- scannot:::matrix_args(get_expression(m)$matrix)
  expect_identical(scannot:::rs_data_address(a$x), scannot:::rs_data_address(m))
})

test_that("the accessor reads Seurat, SCE, dgCMatrix and matrix alike", {
  skip_if_not(has_seurat() && has_sce())
  so <- simulate_counts(n_cells = 120, n_genes = 100, as = "Seurat", n_threads = 1)
  sce <- simulate_counts(n_cells = 120, n_genes = 100, n_threads = 1)
  es <- get_expression(so)
  ec <- get_expression(sce)
  expect_s4_class(es$matrix, "dgCMatrix")
  expect_equal(es$matrix, ec$matrix, ignore_attr = TRUE)
  expect_equal(as.character(es$cells$cell_type), as.character(ec$cells$cell_type))
  expect_equal(get_expression(so, layer = "counts")$matrix,
               get_expression(sce, assay = "counts")$matrix, ignore_attr = TRUE)
  expect_type(get_expression(as.matrix(ec$matrix))$matrix, "double")
  im <- matrix(1:6, 2)
  expect_type(get_expression(im)$matrix, "double")
  expect_s4_class(get_expression(methods::as(ec$matrix, "TsparseMatrix"))$matrix, "dgCMatrix")
})

test_that("factor level order is kept and unused levels are dropped", {
  g <- factor(c("b", "a", "b", "c"), levels = c("c", "b", "a", "unused"))
  out <- scannot:::cell_groups(NULL, g, 4L)
  expect_equal(levels(out), c("c", "b", "a"))
  ch <- scannot:::cell_groups(NULL, c("z", "y", "z"), 3L)
  expect_equal(levels(ch), c("y", "z"))
  na <- scannot:::cell_groups(NULL, c("z", NA, "z"), 3L, na_rm = TRUE)
  expect_equal(sum(is.na(na)), 1L)
})
