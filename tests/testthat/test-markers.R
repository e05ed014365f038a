test_that("markers_in_data matches names and feature-metadata columns", {
  m <- Matrix::Matrix(0, 3, 2, dimnames = list(c("CD3D", "MS4A1", "LYZ"), NULL), sparse = TRUE)
  expect_message(expect_message(
    r <- markers_in_data(list(T = c("CD3D", "CD3E"), B = "MS4A1", X = "NOPE"), m), "CD3E"),
    "Dropped marker set")
  expect_equal(unclass(r)[c("T", "B")], list(T = "CD3D", B = "MS4A1"))
  expect_false("X" %in% names(r))
  expect_equal(attr(r, "missing"), list(T = "CD3E", X = "NOPE"))
  expect_silent(markers_in_data("LYZ", rownames(m), quiet = TRUE))
  expect_error(markers_in_data(list(1), m), class = "scannot_error_markers")
  expect_error(markers_in_data("CD3D", 1:3), class = "scannot_error_input")
  skip_if_not(has_sce())
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = m))
  SummarizedExperiment::rowData(sce)$ensembl <- c("ENSG00000167286", "ENSG00000156738", "ENSG00000090382")
  r2 <- markers_in_data(list(T = "ENSG00000167286", M = "ENSG00000090382"), sce, gene_col = "ensembl")
  expect_equal(unclass(r2)[1:2], list(T = "CD3D", M = "LYZ"))
  expect_error(markers_in_data("x", sce, gene_col = "nope"), "ensembl", class = "scannot_error_markers")
})

test_that("label_clusters maps, reports unmapped clusters and rejects unknown ids", {
  meta <- data.frame(cluster = factor(c(0, 1, 1, 2, 3)))
  expect_message(out <- label_clusters(meta, "cluster", c("0" = "T", "1" = "B", "2" = "T")),
                 "3")
  expect_equal(as.character(out$cell_type), c("T", "B", "B", "T", NA))
  expect_equal(levels(out$cell_type), c("T", "B"))
  expect_error(label_clusters(meta, "cluster", c("0" = "T", "9" = "B")), "9",
               class = "scannot_error_mapping")
  expect_error(label_clusters(meta, "nope", c("0" = "T")), class = "scannot_error_group_by")
  expect_error(label_clusters(meta, "cluster", c("T", "B")), class = "scannot_error_mapping")
  df_map <- data.frame(cl = c(0, 1, 2, 3), lab = c("a", "b", "c", "d"))
  expect_equal(as.character(label_clusters(meta, "cluster", df_map, "lab")$lab),
               c("a", "b", "b", "c", "d"))
  expect_equal(as.character(label_clusters(meta, "cluster", list("0" = "a", "1" = "b", "2" = "c",
                                                                 "3" = "d"))$cell_type),
               c("a", "b", "b", "c", "d"))
})

test_that("label_clusters returns new Seurat / SCE objects and leaves the input alone", {
  skip_if_not(has_seurat() && has_sce())
  so <- simulate_counts(n_cells = 100, n_genes = 100, as = "Seurat", n_threads = 1)
  map <- c("CD4 T" = "T", "CD8 T" = "T", "NK" = "NK", "B" = "B", "CD14 Mono" = "Mono",
           "Epithelial" = "Epi", "Endothelial" = "Endo", "Fibroblast" = "Fib")
  so2 <- label_clusters(so, "cell_type", map, "label")
  expect_equal(as.character(so2$label), unname(map[as.character(so$cell_type)]))
  expect_false("label" %in% names(so[[]]))
  sce <- simulate_counts(n_cells = 100, n_genes = 100, n_threads = 1)
  sce2 <- label_clusters(sce, "cell_type", map, "label")
  expect_equal(as.character(sce2$label), unname(map[as.character(sce$cell_type)]))
  expect_null(sce$label)
})
