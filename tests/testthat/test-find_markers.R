test_that("scanpy flavour agrees with stats::wilcox.test (U, p with and without ties)", {
  s <- sim_small(n_cells = 300, n_genes = 120, seed = 7)
  x <- normalize_counts(s$counts)
  g <- s$cells$cell_type
  m0 <- find_markers(x, g, n_threads = 1)
  m1 <- find_markers(x, g, tie_correct = TRUE, n_threads = 2)
  for (k in c("CD3D", "MS4A1", "EPCAM", "GENE00100")) for (grp in c("CD4 T", "B", "Fibroblast")) {
    a <- x[k, g == grp]; b <- x[k, g != grp]
    w <- suppressWarnings(wilcox.test(a, b, exact = FALSE, correct = FALSE))
    r1 <- m1[m1$gene == k & m1$group == grp, ]
    expect_equal(r1$u, unname(w$statistic))
    expect_equal(r1$pval, w$p.value, tolerance = 1e-10)
    r0 <- m0[m0$gene == k & m0$group == grp, ]
    n1 <- length(a); n2 <- length(b)
    z <- (r0$u - n1 * n2 / 2) / sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
    expect_equal(r0$score, z, tolerance = 1e-12)
    expect_equal(r0$pct_in, mean(a != 0))
    expect_equal(r0$pct_out, mean(b != 0))
    expect_equal(r0$logfc, log2((expm1(mean(a)) + 1e-9) / (expm1(mean(b)) + 1e-9)), tolerance = 1e-12)
    expect_equal(r0$auc, r0$u / (n1 * n2))
  }
  # sorted by decreasing score within each group, groups in level order
  expect_equal(levels(m0$group), levels(g))
  expect_true(all(tapply(m0$score, m0$group, function(v) !is.unsorted(rev(v)))))
  # BH within group
  one <- m0[m0$group == "B", ]
  expect_equal(one$padj, p.adjust(one$pval, "BH"), tolerance = 1e-12)
})

test_that("reference mode compares with the reference group only", {
  s <- sim_small(n_cells = 300, n_genes = 80, seed = 8)
  x <- normalize_counts(s$counts)
  g <- s$cells$cell_type
  m <- find_markers(x, g, reference = "B", groups = c("CD4 T", "NK"), tie_correct = TRUE)
  expect_setequal(as.character(unique(m$group)), c("CD4 T", "NK"))
  r <- m[m$gene == "GNLY" & m$group == "NK", ]
  w <- wilcox.test(x["GNLY", g == "NK"], x["GNLY", g == "B"], exact = FALSE, correct = FALSE)
  expect_equal(r$pval, w$p.value, tolerance = 1e-10)
  expect_equal(r$pct_out, mean(x["GNLY", g == "B"] != 0))
})

test_that("presto flavour has presto's columns, percentages and continuity correction", {
  s <- sim_small(n_cells = 200, n_genes = 60, seed = 9)
  x <- normalize_counts(s$counts)
  g <- s$cells$cell_type
  m <- find_markers(x, g, flavor = "presto")
  expect_named(m, c("feature", "group", "avgExpr", "logFC", "statistic", "auc", "pval", "padj",
                    "pct_in", "pct_out"))
  expect_equal(m$feature[1:3], rownames(x)[1:3])
  r <- m[m$feature == "CD3D" & m$group == "CD4 T", ]
  a <- x["CD3D", g == "CD4 T"]; b <- x["CD3D", g != "CD4 T"]
  expect_equal(r$pct_in, 100 * mean(a != 0))
  expect_equal(r$logFC, mean(a) - mean(b), tolerance = 1e-12)
  expect_equal(r$avgExpr, mean(a), tolerance = 1e-12)
  w <- wilcox.test(a, b, exact = FALSE, correct = TRUE)
  expect_equal(r$statistic, unname(w$statistic))
  # presto's tie list misses the top block, so only close to the exact tie correction
  expect_equal(r$pval, w$p.value, tolerance = 1e-3)
  expect_error(find_markers(x, g, flavor = "presto", reference = "B"), class = "scannot_error_input")
})

test_that("sparse and dense inputs, Seurat and SCE give the same table", {
  skip_if_not(has_seurat() && has_sce())
  sce <- simulate_counts(n_cells = 200, n_genes = 80, n_threads = 1)
  so <- simulate_counts(n_cells = 200, n_genes = 80, as = "Seurat", n_threads = 1)
  a <- find_markers(sce, "cell_type")
  b <- find_markers(so, "cell_type")
  d <- find_markers(as.matrix(SummarizedExperiment::assay(sce, "logcounts")), sce$cell_type)
  expect_equal(as.data.frame(a), as.data.frame(b), ignore_attr = TRUE)
  expect_equal(as.data.frame(a), as.data.frame(d), ignore_attr = TRUE, tolerance = 1e-12)
  so2 <- find_markers(so, "cell_type", store = TRUE)
  expect_equal(get_markers(so2), b)
  expect_null(get_markers(so))
  sce2 <- find_markers(sce, "cell_type", store = TRUE)
  expect_equal(get_markers(sce2), a)
})

test_that("edge cases: tiny groups, NA labels, unknown groups, constant genes", {
  s <- sim_small(n_cells = 200, n_genes = 60, seed = 10)
  x <- normalize_counts(s$counts)
  g <- as.character(s$cells$cell_type)
  g1 <- g; g1[1] <- "lonely"
  expect_error(find_markers(x, g1), "lonely", class = "scannot_error_groups")
  expect_silent(find_markers(x, g1, groups = c("B", "NK"), reference = "CD4 T"))
  gna <- g; gna[1:5] <- NA
  expect_message(m <- find_markers(x, gna), "rest")
  expect_message(find_markers(x, gna, flavor = "presto"), "left out")
  expect_error(find_markers(x, g, groups = "nope"), class = "scannot_error_groups")
  expect_error(find_markers(x, g, reference = "nope"), class = "scannot_error_groups")
  z <- x; z["GENE00060", ] <- 0; z <- Matrix::drop0(z)
  mz <- find_markers(z, g)
  expect_true(all(mz$score[mz$gene == "GENE00060"] == 0))
  expect_true(all(mz$pval[mz$gene == "GENE00060"] == 1))
  bad <- x; bad@x[1] <- NaN
  expect_error(find_markers(bad, g), class = "scannot_error_value")
})

test_that("filter_markers applies scanpy's strict rule and leaves no NA names", {
  s <- sim_small(n_cells = 300, n_genes = 100, seed = 11)
  x <- normalize_counts(s$counts)
  m <- find_markers(x, s$cells$cell_type)
  f <- filter_markers(m)
  keep <- m$pct_in > 0.25 & m$pct_out < 0.5 & m$logfc > 1
  expect_equal(nrow(f), sum(keep))
  expect_false(anyNA(f$gene))
  expect_true(all(f$pct_in > 0.25 & f$pct_out < 0.5 & f$logfc > 1))
  t2 <- top_markers(f, 2)
  expect_true(all(table(t2$group) <= 2))
  expect_s3_class(plot_marker_dotplot(x, m, n = 2, group_by = s$cells$cell_type), "ggplot")
  fp <- filter_markers(find_markers(x, s$cells$cell_type, flavor = "presto"))
  expect_true(all(fp$pct_in > 25 & fp$pct_out < 50 & fp$logFC / log(2) > 1))
  expect_error(filter_markers(data.frame(a = 1)), class = "scannot_error_markers")
})
