seurat_dir <- test_path("fixtures", "seurat")

read_seurat_gold <- function(name) {
  f <- file.path(seurat_dir, paste0(name, ".csv.gz"))
  cls <- if (grepl("_pair", name)) c(row = "character") else
    c(row = "character", cluster = "character", gene = "character")
  utils::read.csv(f, colClasses = cls, check.names = FALSE)
}

# Our table against Seurat's (FindAllMarkers(), or FindMarkers() with `all = FALSE`):
# same rows in the same order, same names, numbers to 1e-9.
expect_same_as_seurat <- function(ours, gold, all = TRUE) {
  cols <- c("p_val", "avg_log2FC", "pct.1", "pct.2", "p_val_adj")
  expect_identical(names(ours), if (all) c(cols, "cluster", "gene") else cols)
  expect_identical(nrow(ours), nrow(gold))
  expect_identical(rownames(ours), gold$row)
  if (all) {
    expect_identical(ours$gene, gold$gene)
    expect_identical(as.character(ours$cluster), gold$cluster)
    expect_true(is.factor(ours$cluster))
  }
  rel <- function(a, b) if (length(a)) max(abs(a - b) / pmax(abs(b), 1e-300)) else 0
  expect_lt(rel(ours$p_val, gold$p_val), 1e-9)
  expect_lt(rel(ours$p_val_adj, gold$p_val_adj), 1e-9)
  expect_lt(max(abs(ours$avg_log2FC - gold$avg_log2FC), 0), 1e-9)
  expect_identical(ours$pct.1, gold$pct.1)
  expect_identical(ours$pct.2, gold$pct.2)
}

test_that("find_all_markers() equals Seurat's FindAllMarkers() on pbmc_small (LogNormalize data)", {
  skip_if_not(has_seurat())
  pbmc <- SeuratObject::pbmc_small
  expect_same_as_seurat(find_all_markers(pbmc, n_threads = 2),
                        read_seurat_gold("pbmc_small_default"))
  expect_same_as_seurat(find_all_markers(pbmc, only_pos = TRUE, logfc_threshold = 0.1,
                                         min_pct = 0.2, return_thresh = 0.05, n_threads = 1),
                        read_seurat_gold("pbmc_small_options"))
  # a metadata column instead of the idents; every gene over min.pct, p up to 1
  gold <- read_seurat_gold("pbmc_small_groups")
  expect_gt(max(gold$p_val), 0.9)
  expect_same_as_seurat(find_all_markers(pbmc, "groups", logfc_threshold = 0,
                                         return_thresh = 1, n_threads = 2), gold)
  # the same numbers from the matrix, with Seurat's fold change named explicitly
  x <- SeuratObject::GetAssayData(pbmc, slot = "data")
  m <- find_all_markers(x, SeuratObject::Idents(pbmc), mean_fxn = "expm1")
  expect_same_as_seurat(m, read_seurat_gold("pbmc_small_default"))
})

test_that("find_all_markers() equals Seurat without a LogNormalize record (mean fold change)", {
  fx <- read_wx("pbmc68k")
  gold <- read_seurat_gold("pbmc68k_default")
  # a dgCMatrix: "auto" is Seurat's answer for data it does not know the normalisation of
  expect_same_as_seurat(find_all_markers(fx$m, fx$g, n_threads = 2), gold)
  skip_if_not(has_seurat())
  obj <- SeuratObject::CreateSeuratObject(counts = fx$m)
  obj <- SeuratObject::SetAssayData(obj, slot = "data", new.data = fx$m)
  SeuratObject::Idents(obj) <- fx$g
  expect_same_as_seurat(find_all_markers(obj), gold)
  skip_if_not(has_sce())
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = fx$m),
                                                    colData = data.frame(label = fx$g))
  expect_same_as_seurat(find_all_markers(sce, "label"), gold)
})

test_that("find_all_markers() skips small groups as Seurat does, and checks its input", {
  sim <- sim_small(n_cells = 300, n_genes = 120)
  x <- normalize_counts(sim$counts, n_threads = 1)
  g <- as.character(sim$cells$cell_type)
  g[1:2] <- "tiny"
  expect_warning(m <- find_all_markers(x, g, mean_fxn = "expm1", n_threads = 1),
                 "fewer than 3 cells.*tiny")
  expect_false("tiny" %in% m$cluster)
  expect_true("tiny" %in% levels(m$cluster))
  # the tiny group's cells stay in every other group's rest (relabelled, the tests change)
  first <- as.character(sim$cells$cell_type[3])
  other <- setdiff(unique(g), c("tiny", first))[1]
  ref <- find_all_markers(x, ifelse(g == "tiny", first, g), mean_fxn = "expm1",
                          n_threads = 1)
  expect_identical(m$gene[m$cluster == other], ref$gene[ref$cluster == other])
  expect_false(identical(m$gene[m$cluster == first], ref$gene[ref$cluster == first]) &&
                 identical(m$p_val[m$cluster == first], ref$p_val[ref$cluster == first]))
  # no gene passes: Seurat's empty result and warning, columns kept
  e <- suppressWarnings(find_all_markers(x, g, min_pct = 2, n_threads = 1))
  expect_warning(find_all_markers(x[, g != "tiny"], g[g != "tiny"], min_pct = 2, n_threads = 1),
                 "No DE genes")
  expect_identical(nrow(e), 0L)
  expect_identical(names(e), names(m))
  expect_error(find_all_markers(x), class = "scannot_error_group_by")
  expect_error(find_all_markers(x, g, min_cells_group = 1), class = "scannot_error_input")
  expect_error(find_all_markers(x, g, base = 1), class = "scannot_error_input")
  expect_error(find_all_markers(x, g, mean_fxn = "median"), class = "scannot_error_input")
  expect_error(find_markers_between(x, "tiny", group_by = g, mean_fxn = NA),
               class = "scannot_error_input")
  expect_error(find_all_markers(x, g, bogus = 1))
  # another base renames the fold-change column
  expect_true("avg_log10FC" %in% names(suppressWarnings(find_all_markers(x, g, base = 10))))
})

test_that("Seurat tables work with filter_markers(), top_markers() and plot_marker_dotplot()", {
  skip_if_not(has_seurat())
  pbmc <- SeuratObject::pbmc_small
  fam <- find_all_markers(pbmc, only_pos = TRUE)
  top <- top_markers(fam, n = 2)
  # per cluster, the two largest fold changes, clusters in level order
  expect_identical(as.character(top$cluster), rep(levels(fam$cluster), each = 2))
  for (k in levels(fam$cluster)) {
    fc <- fam$avg_log2FC[fam$cluster == k]
    expect_identical(top$avg_log2FC[top$cluster == k], sort(fc, decreasing = TRUE)[1:2])
  }
  f <- filter_markers(fam, min_in_group_fraction = 0.5, max_out_group_fraction = 0.2,
                      min_fold_change = 2)
  expect_true(all(f$pct.1 > 0.5 & f$pct.2 < 0.2 & f$avg_log2FC > 2))
  expect_identical(nrow(f), sum(fam$pct.1 > 0.5 & fam$pct.2 < 0.2 & fam$avg_log2FC > 2))
  # the dotplot groups default to the idents (or the column the table was made from)
  p <- plot_marker_dotplot(pbmc, fam, n = 2)
  expect_s3_class(p, "ggplot")
  expect_setequal(as.character(unique(p$data$group)), levels(SeuratObject::Idents(pbmc)))
  fg <- find_all_markers(pbmc, "groups", logfc_threshold = 0, return_thresh = 1)
  expect_identical(attr(fg, "group_by"), "groups")
  expect_setequal(as.character(unique(plot_marker_dotplot(pbmc, fg, n = 2)$data$group)),
                  c("g1", "g2"))
  # another base: the fold change is read in log2 units
  f10 <- find_all_markers(pbmc, only_pos = TRUE, base = 10)
  expect_equal(scannot:::markers_std(f10)$logfc, f10$avg_log10FC * log2(10))
})

test_that("find_all_markers() orders and drops labels as Seurat's Idents<- does", {
  sim <- sim_small(n_cells = 300, n_genes = 100)
  x <- normalize_counts(sim$counts, n_threads = 1)
  g <- as.character(sim$cells$cell_type)
  g[1:10] <- NA
  m <- find_all_markers(x, g, mean_fxn = "expm1", n_threads = 1)
  # levels in order of first appearance, no NA group
  expect_identical(levels(m$cluster), unique(g[!is.na(g)]))
  # the NA cells are in every group's rest: the same tables as with the NA cells in a
  # group of their own, less that group's rows
  g2 <- g
  g2[is.na(g2)] <- "zz"
  m2 <- find_all_markers(x, g2, mean_fxn = "expm1", n_threads = 1)
  m2 <- m2[m2$cluster != "zz", ]
  expect_equal(m$p_val, m2$p_val, tolerance = 1e-12)
  expect_identical(m$gene, m2$gene)
  # dense input: the same table
  expect_equal(find_all_markers(as.matrix(x), g, mean_fxn = "expm1", n_threads = 1), m)
})

expect_same_as_findmarkers <- function(ours, gold) expect_same_as_seurat(ours, gold, all = FALSE)

test_that("find_markers_between() equals Seurat's FindMarkers()", {
  skip_if_not(has_seurat())
  pbmc <- SeuratObject::pbmc_small
  expect_same_as_findmarkers(find_markers_between(pbmc, "0", "1", n_threads = 2),
                             read_seurat_gold("pbmc_small_pair"))
  gold <- read_seurat_gold("pbmc_small_pair_rest")
  expect_same_as_findmarkers(find_markers_between(pbmc, c("0", "2"), only_pos = TRUE), gold)
  fx <- read_wx("pbmc68k")
  gold <- read_seurat_gold("pbmc68k_pair")
  expect_same_as_findmarkers(find_markers_between(fx$m, "CD14+ Monocyte", "Dendritic",
                                                  group_by = fx$g, logfc_threshold = 0.1),
                             gold)
  skip_if_not(has_sce())
  sce <- SingleCellExperiment::SingleCellExperiment(list(logcounts = fx$m),
                                                    colData = data.frame(label = fx$g))
  expect_same_as_findmarkers(find_markers_between(sce, "CD14+ Monocyte", "Dendritic",
                                                  group_by = "label", logfc_threshold = 0.1),
                             gold)
  # against every other cell = that group's rows of find_all_markers() (no p cut; ties
  # in p ordered by gene here, by fold change there)
  all <- find_all_markers(pbmc, return_thresh = 1)
  all <- all[all$cluster == "1", ]
  one <- find_markers_between(pbmc, "1")
  expect_setequal(rownames(one), all$gene)
  expect_equal(one[all$gene, "p_val"], all$p_val, tolerance = 1e-12)
  expect_identical(order(one$p_val), seq_len(nrow(one)))
  # bad groups
  expect_error(find_markers_between(pbmc, "9"), class = "scannot_error_groups")
  expect_error(find_markers_between(pbmc, "0", c("0", "1")), class = "scannot_error_groups")
  expect_error(find_markers_between(pbmc, "0", "1", min_cells_group = 40),
               class = "scannot_error_groups")
  expect_error(find_markers_between(fx$m, "CD14+ Monocyte"), class = "scannot_error_group_by")
})
