fixture_dir <- test_path("fixtures", "dotplot")

read_fixture <- function(ds) {
  f <- function(x) file.path(fixture_dir, paste0(ds, x))
  m <- methods::as(Matrix::readMM(f("_matrix.mtx.gz")), "CsparseMatrix")
  genes <- readLines(f("_genes.txt"))
  obs <- utils::read.csv(f("_obs.csv"), colClasses = "character", check.names = FALSE)
  dimnames(m) <- list(genes, obs$cell)
  meta <- jsonlite::fromJSON(f("_markers.json"), simplifyVector = FALSE)
  markers <- lapply(meta$markers, unlist)
  levels <- readLines(f("_levels.txt"))
  gold <- utils::read.csv(f("_dotplot.csv.gz"), colClasses = c(group = "character"))
  list(m = m, groups = factor(obs[[meta$groupby]], levels = levels), markers = markers,
       gold = gold, var_names = unlist(meta$var_names), float32 = meta$input_dtype == "float32")
}

# Compare scannot to scanpy's frames for every setting of the grid.
check_against_scanpy <- function(fx, object = fx$m, group_by = fx$groups, ...) {
  grid <- unique(fx$gold[c("expression_cutoff", "mean_only_expressed", "standard_scale")])
  # float32 input: scanpy's pandas means are float32 (<= 4.3e-7 from the float64 mean)
  tol <- if (fx$float32) 1e-6 else 1e-12
  for (r in seq_len(nrow(grid))) {
    s <- grid[r, ]
    gold <- merge(fx$gold, s)
    d <- dotplot_data(object, fx$markers, group_by, ..., expression_cutoff = s$expression_cutoff,
                      mean_only_expressed = s$mean_only_expressed,
                      standard_scale = s$standard_scale, n_threads = 2)
    # the gene at each column position is scanpy's
    expect_equal(d$gene[match(seq_along(fx$var_names), d$gene_pos)], fx$var_names)
    key_d <- paste(d$group, d$gene_pos)
    key_g <- paste(gold$group, gold$gene_pos)
    expect_setequal(key_d, key_g)
    i <- match(key_g, key_d)
    expect_equal(d$gene[i], gold$gene)
    expect_equal(d$fraction[i], gold$fraction, tolerance = 1e-12)
    expect_equal(max(abs(d$mean[i] - gold$mean)), 0, tolerance = tol)
    expect_equal(max(abs(d$color[i] - gold$color)), 0, tolerance = tol)
  }
}

test_that("dotplot equals scanpy on pbmc68k_reduced (raw, log values, float32)", {
  check_against_scanpy(read_fixture("pbmc68k_raw"))
})

test_that("dotplot equals scanpy on pbmc68k_reduced X (scaled, negative values)", {
  fx <- read_fixture("pbmc68k_X")
  check_against_scanpy(fx)
  # dense input gives the same numbers
  check_against_scanpy(fx, object = as.matrix(fx$m))
})

test_that("dotplot equals scanpy on simulated data (explicit zeros, custom level order)", {
  fx <- read_fixture("sim")
  expect_gt(sum(fx$m@x == 0), 0)
  check_against_scanpy(fx)
})

test_that("dotplot equals scanpy on SeuratObject's pbmc_small, read as a Seurat object", {
  skip_if_not(has_seurat())
  fx <- read_fixture("pbmc_small")
  pbmc_small <- SeuratObject::pbmc_small
  pbmc_small <- suppressMessages(SeuratObject::UpdateSeuratObject(pbmc_small))
  check_against_scanpy(fx, object = pbmc_small, group_by = "RNA_snn_res.1")
  skip_if_not(has_sce())
  sce <- SingleCellExperiment::SingleCellExperiment(
    list(logcounts = SeuratObject::GetAssayData(pbmc_small, slot = "data")),
    colData = S4Vectors::DataFrame(pbmc_small[[]]))
  check_against_scanpy(fx, object = sce, group_by = "RNA_snn_res.1")
})

test_that("dotplot equals a plain R reference for every setting", {
  s <- sim_small(n_cells = 500)
  x <- normalize_counts(s$counts)
  genes <- c("CD3D", "MS4A1", "EPCAM", "GENE00300", "CD3D")
  for (cut in c(-0.1, 0, 1)) for (only in c(FALSE, TRUE)) for (sc in c("none", "var", "group")) {
    d <- dotplot_data(x, genes, s$cells$cell_type, expression_cutoff = cut,
                      mean_only_expressed = only, standard_scale = sc, n_threads = 1)
    ref <- naive_dotplot(x, genes, s$cells$cell_type, cut, only, sc)
    expect_equal(d$mean, ref$mean, tolerance = 1e-12)
    expect_equal(d$fraction, ref$fraction, tolerance = 1e-12)
    expect_equal(d$color, ref$color, tolerance = 1e-12)
  }
})

test_that("Seurat, SCE, dgCMatrix and dense inputs give identical tables", {
  skip_if_not(has_seurat() && has_sce())
  so <- simulate_counts(n_cells = 300, n_genes = 150, as = "Seurat", n_threads = 1)
  sce <- simulate_counts(n_cells = 300, n_genes = 150, n_threads = 1)
  mk <- list(T = c("CD3D", "CD3E"), B = "MS4A1", Epi = "EPCAM")
  a <- dotplot_data(so, mk, "cell_type")
  b <- dotplot_data(sce, mk, "cell_type")
  x <- SummarizedExperiment::assay(sce, "logcounts")
  c <- dotplot_data(x, mk, sce$cell_type)
  d <- dotplot_data(as.matrix(x), mk, sce$cell_type)
  expect_equal(a, b)
  expect_equal(b, c)
  expect_equal(c, d, tolerance = 1e-14)
  expect_equal(levels(a$group), levels(sce$cell_type))
  expect_equal(levels(a$marker_set), c("T", "B", "Epi"))
})

test_that("missing markers are dropped with a warning; NA groups dropped with na_rm", {
  s <- sim_small()
  x <- normalize_counts(s$counts)
  expect_warning(d <- dotplot_data(x, list(T = c("CD3D", "NOTAGENE")), s$cells$cell_type),
                 "NOTAGENE")
  expect_equal(unique(d$gene), "CD3D")
  g <- s$cells$cell_type
  g[g == "NK"] <- NA
  d2 <- dotplot_data(x, "CD3D", g, na_rm = TRUE)
  expect_false("NK" %in% d2$group)
  keep <- !is.na(g)
  d3 <- dotplot_data(x[, keep], "CD3D", droplevels(g[keep]))
  expect_equal(d2, d3)
})

test_that("plot_dotplot draws size = fraction and colour = mean with set labels", {
  s <- sim_small()
  x <- normalize_counts(s$counts)
  d <- dotplot_data(x, list(T = c("CD3D", "CD3E"), B = "MS4A1"), s$cells$cell_type,
                    standard_scale = "var")
  p <- plot_dotplot(d)
  expect_s3_class(p, "ggplot")
  b <- ggplot2::ggplot_build(p)
  expect_equal(nrow(b$data[[1]]), nrow(d))
  expect_equal(length(unique(b$layout$layout$PANEL)), 2L)
  p2 <- plot_dotplot(x, list(T = "CD3D"), s$cells$cell_type)
  expect_s3_class(p2, "ggplot")
})
