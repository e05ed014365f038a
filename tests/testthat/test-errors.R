test_that("Rust core errors and panics become classed R conditions", {
  expect_error(scannot:::rs_call(scannot:::rs_test_error("dims")),
               class = "scannot_error_dims")
  e <- tryCatch(scannot:::rs_call(scannot:::rs_test_error("panic")), error = identity)
  expect_s3_class(e, "scannot_error_internal")
  expect_s3_class(e, "scannot_error")
  expect_match(conditionMessage(e), "deliberate panic")
  # R is still alive and working after a panic
  expect_equal(scannot_threads(2), 2L)
})

test_that("bad input gives scannot_error subclasses with useful messages", {
  s <- sim_small()
  x <- normalize_counts(s$counts, n_threads = 1)
  g <- s$cells$cell_type
  mk <- list(T = c("CD3D", "CD3E"))
  expect_error(dotplot_data(x, mk, "cell_type"), class = "scannot_error_group_by")
  expect_error(dotplot_data(x, mk, g[-1]), "one label per cell", class = "scannot_error_group_by")
  gna <- g; gna[3] <- NA
  expect_error(dotplot_data(x, mk, gna), "na_rm", class = "scannot_error_group_by")
  expect_error(dotplot_data(x, 42, g), class = "scannot_error_markers")
  expect_error(dotplot_data(x, list(c("CD3D")), g), "name", class = "scannot_error_markers")
  expect_error(dotplot_data(x, list(T = 1:3), g), class = "scannot_error_markers")
  expect_error(dotplot_data(x, list(T = "NOPE"), g), "None of the markers", class = "scannot_error_markers")
  expect_error(dotplot_data(x, mk, g, n_threads = -1), class = "scannot_error_input")
  expect_error(dotplot_data(x, mk, g, expression_cutoff = NA), class = "scannot_error_input")
  expect_error(dotplot_data(x, mk, g, standard_scale = "rows"), class = "rlang_error")
  expect_error(dotplot_data("not a matrix", mk, g), class = "scannot_error_input")
  bad <- x; bad@x[1] <- NaN
  expect_error(dotplot_data(bad[, ], list(G = rownames(x)[bad@i[1] + 1]), g),
               class = "scannot_error_value")
  expect_error(normalize_counts(-as.matrix(s$counts[1:5, 1:5])), class = "scannot_error_value")
  expect_error(simulate_counts(n_genes = 5, as = "list"), class = "scannot_error_input")
})

test_that("a malformed dgCMatrix is rejected by the core, not crashed on", {
  a <- list(p = c(0L, 2L, 1L), i = c(0L, 1L), x = c(1, 2))
  expect_error(scannot:::rs_call(scannot:::rs_dotplot(a$p, a$i, a$x, 2L, 2L, FALSE, 0L,
                                                       c(0L, 0L), 1L, 0, FALSE, "none",
                                                       FALSE, 1L, FALSE)),
               class = "scannot_error_dims")
  expect_error(scannot:::rs_call(scannot:::rs_dotplot(integer(), integer(), c(1, 2, 3), 2L, 2L,
                                                       TRUE, 0L, c(0L, 0L), 1L, 0, FALSE,
                                                       "none", FALSE, 1L, FALSE)),
               class = "scannot_error_dims")
})

test_that("unknown assays and layers are reported", {
  skip_if_not(has_sce())
  sce <- simulate_counts(n_cells = 100, n_genes = 100, n_threads = 1)
  expect_error(dotplot_data(sce, "CD3D", "cell_type", assay = "nope"), "logcounts",
               class = "scannot_error_layer")
  skip_if_not(has_seurat())
  so <- simulate_counts(n_cells = 100, n_genes = 100, as = "Seurat", n_threads = 1)
  expect_error(dotplot_data(so, "CD3D", "cell_type", assay = "ADT"), class = "scannot_error_layer")
  expect_error(dotplot_data(so, "CD3D", "cell_type", layer = "nope"), class = "scannot_error_layer")
  expect_error(dotplot_data(so, "CD3D", "cell_type", layer = "scale.data"), "empty",
               class = "scannot_error_layer")
})
