test_that("simulation is seeded, thread-invariant and realistic", {
  a <- simulate_counts(n_cells = 500, n_genes = 400, seed = 3, as = "list", n_threads = 1)
  b <- simulate_counts(n_cells = 500, n_genes = 400, seed = 3, as = "list", n_threads = 2)
  expect_identical(a, b)
  c <- simulate_counts(n_cells = 500, n_genes = 400, seed = 4, as = "list", n_threads = 1)
  expect_false(identical(a$counts, c$counts))
  expect_true(all(c("PTPRC", "EPCAM", "PECAM1", "COL1A2", "CD3D") %in% rownames(a$counts)))
  expect_equal(levels(a$cells$cell_type)[1:3], c("CD4 T", "CD8 T", "NK"))
  expect_setequal(levels(a$cells$batch), c("batch1", "batch2"))
  dens <- length(a$counts@x) / prod(dim(a$counts))
  expect_gt(dens, 0.05)
  expect_true(all(a$counts@x == round(a$counts@x)) && all(a$counts@x > 0))
  # markers are up in their own type
  x <- normalize_counts(a$counts)
  m <- tapply(x["EPCAM", ], a$cells$cell_type, mean)
  expect_equal(names(which.max(m)), "Epithelial")
})

test_that("the sparse generator is seeded, thread-invariant, valid and sized as asked", {
  a <- simulate_counts(n_cells = 3000, n_genes = 4000, seed = 5, genes_per_cell = 150,
                       as = "list", n_threads = 1)
  b <- simulate_counts(n_cells = 3000, n_genes = 4000, seed = 5, genes_per_cell = 150,
                       as = "list", n_threads = 2)
  expect_identical(a, b)
  expect_true(methods::validObject(a$counts))
  expect_true(all(a$counts@x == round(a$counts@x)) && all(a$counts@x >= 1))
  per_cell <- mean(diff(a$counts@p))
  expect_gt(per_cell, 120)
  expect_lt(per_cell, 180)
  # same cells as the default generator for the same seed
  d <- simulate_counts(n_cells = 3000, n_genes = 4000, seed = 5, as = "list", n_threads = 1)
  expect_identical(a$cells, d$cells)
  x <- normalize_counts(a$counts)
  m <- tapply(x["CD79A", ], a$cells$cell_type, mean)
  expect_equal(names(which.max(m)), "B")
  expect_error(simulate_counts(n_cells = 10, n_genes = 100, genes_per_cell = 99, as = "list"),
               class = "scannot_error_input")
})
