#' Wilcoxon rank-sum marker genes
#'
#' One-vs-rest (or versus a reference group) Wilcoxon rank-sum tests for every
#' gene, with the statistics of scanpy's `rank_genes_groups(method = "wilcoxon")`
#' (`flavor = "scanpy"`) or of presto's `wilcoxauc()` (`flavor = "presto"`). The
#' Rust core sweeps each gene's non-zeros once (zeros share one mid-rank) and
#' computes the rank sums of all groups at once, in parallel over genes, without
#' densifying or copying the matrix.
#'
#' Semantics of the two flavours (see the package's reference specification):
#' * `"scanpy"`: z score without continuity correction, tie correction only with
#'   `tie_correct = TRUE`; log fold change `log2((expm1(mean_in) + 1e-9) /
#'   (expm1(mean_out) + 1e-9))` of the log values; fractions of cells with
#'   `x != 0`; cells with an `NA` group are kept in "rest" (as scanpy does, with a
#'   message); every tested group and the reference need at least 2 cells.
#' * `"presto"`: presto's columns and numbers exactly: continuity-corrected z with
#'   presto's tie list, values compared as float32, `logFC` = difference of means,
#'   percentages 0-100; `NA`-labelled cells are dropped (with a message); no
#'   reference mode.
#'
#' @inheritParams dotplot_data
#' @param groups Groups to test (`NULL`: all). With `reference = "rest"` the rest
#'   still holds every other cell (scanpy).
#' @param reference `"rest"` or the name of a group to compare against (scanpy
#'   flavour only).
#' @param tie_correct scanpy's tie correction of the z score (presto always
#'   corrects, its own way).
#' @param flavor `"scanpy"` or `"presto"`.
#' @param log_base Base of the log of the values when it is not `e` (scanpy's
#'   `uns["log1p"]["base"]`); affects the scanpy fold change only.
#' @param BPPARAM `NULL` (default: one process, `n_threads` threads) or a
#'   BiocParallel parameter object: genes are split into blocks tested in worker
#'   processes, with the same result (see [scannot_scale_out]).
#' @param store If `TRUE`, return the object with the table stored in it
#'   (Seurat `Misc(object, "scannot_markers")`, SCE `metadata(object)$scannot_markers`)
#'   instead of the table; get it back with [get_markers()].
#' @return For `flavor = "scanpy"`, a data frame of class `scannot_markers`, one
#'   row per group and gene, sorted per group by decreasing score: `group`,
#'   `gene`, `score` (z), `logfc` (log2), `pval`, `padj` (Benjamini-Hochberg within
#'   the group), `pct_in`, `pct_out` (fractions 0..1 in the group and in the rest
#'   or reference), `auc`, `u` (Mann-Whitney U), `mean_in`, `mean_out`. For
#'   `flavor = "presto"`, presto's data frame: `feature, group, avgExpr, logFC,
#'   statistic, auc, pval, padj, pct_in, pct_out` in presto's row order.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 400, n_genes = 200, as = "list")
#' x <- normalize_counts(sim$counts)
#' m <- find_markers(x, sim$cells$cell_type)
#' top_markers(m, n = 3)
find_markers <- function(object, group_by, ...) {
  UseMethod("find_markers")
}

#' @rdname find_markers
#' @export
find_markers.default <- function(object, group_by, ..., groups = NULL, reference = "rest",
                                 tie_correct = FALSE, flavor = c("scanpy", "presto"),
                                 log_base = NULL, n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  markers_compute(get_expression(object, delayed = TRUE), group_by, groups, reference,
                  tie_correct, flavor, log_base, n_threads, call, BPPARAM)
}

#' @rdname find_markers
#' @export
find_markers.Seurat <- function(object, group_by, ..., assay = NULL, layer = "data",
                                groups = NULL, reference = "rest", tie_correct = FALSE,
                                flavor = c("scanpy", "presto"), log_base = NULL,
                                store = FALSE, n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  res <- markers_compute(get_expression(object, assay = assay, layer = layer, delayed = TRUE),
                         group_by, groups, reference, tie_correct, flavor, log_base,
                         n_threads, call, BPPARAM)
  if (isTRUE(check_flag(store))) {
    return(store_in_object(object, "scannot_markers", res))
  }
  res
}

#' @rdname find_markers
#' @export
find_markers.SummarizedExperiment <- function(object, group_by, ..., assay = "logcounts",
                                              groups = NULL, reference = "rest",
                                              tie_correct = FALSE,
                                              flavor = c("scanpy", "presto"),
                                              log_base = NULL, store = FALSE,
                                              n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  res <- markers_compute(get_expression(object, assay = assay, delayed = TRUE), group_by,
                         groups, reference, tie_correct, flavor, log_base, n_threads, call,
                         BPPARAM)
  if (isTRUE(check_flag(store))) {
    return(store_in_object(object, "scannot_markers", res))
  }
  res
}

#' Get the marker table stored by `find_markers(store = TRUE)`
#' @param object A Seurat object or SingleCellExperiment.
#' @return The `scannot_markers` data frame, or `NULL`.
#' @export
get_markers <- function(object) {
  if (is_seurat(object)) return(object@misc$scannot_markers)
  if (is_se(object)) return(S4Vectors::metadata(object)$scannot_markers)
  abort_scannot("`object` must be a Seurat object or a SingleCellExperiment.", "input")
}

markers_compute <- function(e, group_by, groups, reference, tie_correct, flavor, log_base,
                            n_threads, call, BPPARAM = NULL) {
  BPPARAM <- check_bpparam(BPPARAM, call)
  flavor <- rlang::arg_match(flavor, c("scanpy", "presto"), error_call = call)
  check_flag(tie_correct)
  n_threads <- scannot_threads(n_threads)
  reference <- check_string(reference)
  log_base <- if (is.null(log_base)) NaN else check_number(log_base)
  m <- e$matrix
  genes <- rownames(m) %||% paste0("Feature", seq_len(nrow(m)))
  g <- cell_groups(e$cells, group_by, ncol(m), na_rm = TRUE, call = call)
  n_na <- sum(is.na(g))
  if (n_na > 0L) {
    message(sprintf(if (flavor == "scanpy")
      "%d cells with an NA group are counted in the rest (as scanpy does)." else
      "%d cells with an NA group are left out (as presto does).", n_na))
  }
  lv <- levels(g)
  if (flavor == "presto" && length(lv) < 2L) {
    abort_scannot("presto's test needs at least 2 groups.", "groups", call = call)
  }
  if (!is.null(groups)) {
    groups <- as.character(groups)
    bad <- setdiff(groups, lv)
    if (length(bad)) {
      abort_scannot(sprintf("`groups` not in '%s': %s. Groups with cells: %s.",
                            if (is.character(group_by) && length(group_by) == 1L) group_by else "group_by",
                            paste(bad, collapse = ", "), paste(lv, collapse = ", ")),
                    "groups", call = call)
    }
  }
  ref_code <- -1L
  if (reference != "rest") {
    if (flavor == "presto") {
      abort_scannot("presto has no reference mode: use reference = \"rest\" or flavor = \"scanpy\".",
                    "input", call = call)
    }
    if (!reference %in% lv) {
      abort_scannot(sprintf("`reference` '%s' is not a group with cells; groups: %s.", reference,
                            paste(lv, collapse = ", ")), "groups", call = call)
    }
    ref_code <- match(reference, lv) - 1L
  }
  tested <- groups %||% lv
  if (reference != "rest") tested <- setdiff(tested, reference)
  if (length(tested) == 0L) {
    abort_scannot("No group left to test (the reference was the only one).", "groups", call = call)
  }
  if (flavor == "scanpy") {
    sizes <- table(g)
    small <- names(sizes)[sizes < 2 & names(sizes) %in% c(tested, if (ref_code >= 0) reference)]
    if (length(small)) {
      abort_scannot(sprintf("Group(s) %s have fewer than 2 cells; the Wilcoxon test needs at least 2. Leave them out with `groups =` or merge them.",
                            paste0("'", small, "'", collapse = ", ")), "groups", call = call)
    }
  }
  # presto drops NA cells; scanpy keeps them in the rest (negative codes)
  codes <- as.integer(g) - 1L
  codes[is.na(codes)] <- -1L
  r <- wilcoxon_run(m, codes, length(lv),
                    if (is.null(groups)) integer() else match(tested, lv) - 1L,
                    ref_code, tie_correct, flavor, log_base, n_threads, BPPARAM, call)
  grp <- factor(lv[r$group + 1L], levels = lv[r$tested + 1L])
  gene <- genes[r$gene + 1L]
  if (flavor == "presto") {
    out <- data.frame(feature = gene, group = as.character(grp), avgExpr = r$mean_in,
                      logFC = r$logfc, statistic = r$u, auc = r$auc, pval = r$pval,
                      padj = r$padj, pct_in = r$pts, pct_out = r$pts_rest,
                      stringsAsFactors = FALSE)
  } else {
    # per group by decreasing score; ties in gene order (scanpy's tie order is arbitrary);
    # the columns are reordered as plain vectors (`[.data.frame` and data.frame()'s row
    # name checks cost more than the order itself)
    o <- order(as.integer(grp), -r$score, r$gene)
    cols <- list(group = grp, gene = gene, score = r$score, logfc = r$logfc,
                 pval = r$pval, padj = r$padj, pct_in = r$pts, pct_out = r$pts_rest,
                 auc = r$auc, u = r$u, mean_in = r$mean_in, mean_out = r$mean_out)
    out <- structure(lapply(cols, function(v) v[o]), class = "data.frame",
                     row.names = c(NA_integer_, -length(o)))
  }
  structure(out, class = c("scannot_markers", "data.frame"), flavor = flavor,
            reference = reference,
            group_by = if (is.character(group_by) && length(group_by) == 1L) group_by else NULL,
            n_cells = stats::setNames(r$n_in, lv[r$tested + 1L]))
}

#' @method print scannot_markers
#' @export
print.scannot_markers <- function(x, ...) {
  cat(sprintf("<scannot_markers: %s flavour, %d groups x %d genes, vs %s>\n",
              attr(x, "flavor"), length(unique(x$group)),
              length(unique(if (is.null(x$gene)) x$feature else x$gene)),
              attr(x, "reference") %||% "rest"))
  print(utils::head(as.data.frame(x), 10), ...)
  if (nrow(x) > 10) cat(sprintf("# ... %d more rows\n", nrow(x) - 10))
  invisible(x)
}

# Columns of either flavour under one set of names (fractions 0..1, log2 fold change).
markers_std <- function(markers, call = rlang::caller_env()) {
  if (!is.data.frame(markers)) {
    abort_scannot("`markers` must be the data frame returned by find_markers().", "markers", call = call)
  }
  fc_col <- grep("^avg_log[0-9.]*FC$", names(markers), value = TRUE)
  if (all(c("feature", "avgExpr", "pct_in") %in% names(markers))) {
    data.frame(group = markers$group, gene = markers$feature, score = markers$auc,
               logfc = markers$logFC / log(2), pct_in = markers$pct_in / 100,
               pct_out = markers$pct_out / 100, stringsAsFactors = FALSE)
  } else if (length(fc_col) == 1L &&
             all(c("p_val", "pct.1", "pct.2", "cluster", "gene") %in% names(markers))) {
    # Seurat's FindAllMarkers() table (or find_all_markers()'s): ranked by fold change,
    # as Seurat's vignettes pick top markers; log2 units for the fold-change filter
    b <- sub("^avg_log([0-9.]*)FC$", "\\1", fc_col)
    fc <- markers[[fc_col]] * if (b == "") 1 / log(2) else log2(as.numeric(b))
    data.frame(group = markers$cluster, gene = markers$gene, score = fc, logfc = fc,
               pct_in = markers$pct.1, pct_out = markers$pct.2, stringsAsFactors = FALSE)
  } else if (all(c("group", "gene", "score", "logfc", "pct_in", "pct_out") %in% names(markers))) {
    markers
  } else {
    abort_scannot("`markers` must be the data frame returned by find_markers().", "markers", call = call)
  }
}

#' Filter marker genes by in/out-group fraction and fold change
#'
#' scanpy's `filter_rank_genes_groups()` rule: keep a gene when its fraction of
#' expressing cells in the group is `> min_in_group_fraction`, outside is
#' `< max_out_group_fraction` and its log2 fold change is `> log2(min_fold_change)`
#' scanpy's threshold is in log2 units: `min_fold_change = 1` means a fold change
#' of 2. All comparisons are strict and `NA` fails. Unlike scanpy, failing genes
#' are removed (no `NaN` names are left behind). The fold change is the table's
#' own (for a reference-mode table, the one versus the reference; scanpy would
#' recompute one versus the rest). presto tables are read with fractions = pct / 100
#' and log2 fold change = logFC / log(2); Seurat tables ([find_all_markers()] or
#' Seurat's `FindAllMarkers()`) with fractions `pct.1` / `pct.2` and the log2 fold
#' change from `avg_log2FC`.
#'
#' @param markers The data frame from [find_markers()].
#' @param min_in_group_fraction,max_out_group_fraction Fractions (0..1).
#' @param min_fold_change Minimum log2 fold change (scanpy's default 1).
#' @param compare_abs Compare `|log fold change|` (keeps down-regulated genes too).
#' @return The rows of `markers` that pass, in their original order.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 400, n_genes = 200, as = "list")
#' m <- find_markers(normalize_counts(sim$counts), sim$cells$cell_type)
#' filter_markers(m)
filter_markers <- function(markers, min_in_group_fraction = 0.25, max_out_group_fraction = 0.5,
                           min_fold_change = 1, compare_abs = FALSE) {
  call <- rlang::current_env()
  s <- markers_std(markers, call)
  min_in <- check_number(min_in_group_fraction)
  max_out <- check_number(max_out_group_fraction)
  min_fc <- check_number(min_fold_change)
  fc <- if (isTRUE(check_flag(compare_abs))) abs(s$logfc) else s$logfc
  keep <- s$pct_in > min_in & s$pct_out < max_out & fc > min_fc
  keep[is.na(keep)] <- FALSE
  out <- markers[keep, , drop = FALSE]
  rownames(out) <- NULL
  out
}

#' Top marker genes per group
#'
#' @param markers The data frame from [find_markers()] (possibly filtered), or a
#'   Seurat table from [find_all_markers()] / Seurat's `FindAllMarkers()`.
#' @param n Number of genes per group.
#' @return The top `n` rows per group (scanpy flavour: by decreasing score;
#'   presto flavour: by decreasing AUC; Seurat tables: by decreasing fold change, as
#'   Seurat's vignettes choose them), groups in their order.
#' @export
top_markers <- function(markers, n = 5) {
  call <- rlang::current_env()
  s <- markers_std(markers, call)
  n <- check_number(n)
  if (n < 1) abort_scannot("`n` must be at least 1.", "input", call = call)
  grp <- if (is.factor(s$group)) s$group else factor(s$group, levels = unique(s$group))
  o <- order(as.integer(grp), -s$score, seq_len(nrow(s)))
  o <- o[stats::ave(seq_along(o), grp[o], FUN = seq_along) <= n]
  out <- markers[o, , drop = FALSE]
  rownames(out) <- NULL
  out
}

#' Dotplot of the top marker genes of each group
#'
#' The equivalent of scanpy's `rank_genes_groups_dotplot()`: the top `n` genes of
#' each group (from [find_markers()], optionally [filter_markers()]) shown as a
#' dotplot over the same groups, gene blocks labelled by group.
#'
#' @param object The object the markers were computed on.
#' @param markers The data frame from [find_markers()], or a Seurat table from
#'   [find_all_markers()] / Seurat's `FindAllMarkers()`.
#' @param n Genes per group.
#' @param group_by Groups for the dotplot (default: the `group_by` of
#'   `find_markers()` / `find_all_markers()` when it was a column name; for a Seurat
#'   object otherwise its `Idents()`).
#' @param ... Passed to [dotplot_data()] (e.g. `standard_scale`, `assay`, `layer`).
#' @return A ggplot object.
#' @export
plot_marker_dotplot <- function(object, markers, n = 5, group_by = attr(markers, "group_by"),
                                ...) {
  call <- rlang::current_env()
  if (is.null(group_by) && is_seurat(object)) group_by <- SeuratObject::Idents(object)
  if (is.null(group_by)) {
    abort_scannot("Give `group_by` (the markers were computed from a vector of labels).",
                  "group_by", call = call)
  }
  top <- markers_std(top_markers(markers, n), call)
  grp <- if (is.factor(top$group)) levels(droplevels(top$group)) else unique(top$group)
  sets <- lapply(grp, function(k) top$gene[top$group == k])
  names(sets) <- grp
  sets <- sets[lengths(sets) > 0L]
  plot_dotplot(dotplot_data(object, sets, group_by, ...))
}

#' Seurat's FindAllMarkers(), Wilcoxon test, from one sweep
#'
#' The table of Seurat's `FindAllMarkers(test.use = "wilcox")` (Seurat 4.3
#' semantics, with its defaults), computed by the Rust core in one pass over the
#' non-zeros instead of one R test per gene and cluster: each group against all other
#' cells, genes kept by Seurat's filters, `p_val` from the rank-sum test with
#' continuity and tie correction (the normal approximation of limma's
#' `rankSumTestWithCorrelation()` / `wilcox.test()`), `avg_log2FC`, `pct.1`, `pct.2`
#' (fractions of cells with `x > 0`, rounded to 3 digits) and `p_val_adj`
#' (Bonferroni over all genes of the matrix), rows ordered by `p_val` then decreasing
#' fold change within each cluster, clusters in level order, and only rows with
#' `p_val < return_thresh`. Labels are made groups as Seurat's `Idents<-` does: a
#' factor keeps its levels, other labels are ordered by first appearance, and cells
#' labelled `NA` belong to no group (they are only in the other groups' rest).
#'
#' Fold change (`mean_fxn`): Seurat takes `log2(mean(expm1(x)) + 1)` per group when
#' the assay was normalised by `NormalizeData(normalization.method = "LogNormalize")`
#' (recorded in the object's command log), else `log2(mean(x) + 1)`. `"auto"` does the
#' same for a Seurat object and uses `"mean"` for other inputs (what Seurat does for an
#' object without that record, e.g. one converted from a SingleCellExperiment).
#'
#' Differences from Seurat: `wilcox.test()`'s exact p-values (groups under 50 cells on
#' both sides and no ties) are not reproduced (the normal approximation is used, as
#' with limma); a gene whose compared values are all tied gets `p_val = 1` (limma's
#' answer; `wilcox.test()` gives `NaN`); groups with fewer than `min_cells_group` cells
#' are skipped with a warning, as Seurat does.
#'
#' @inheritParams find_markers
#' @param group_by Cell groups (a metadata column or one label per cell). For a Seurat
#'   object the default `NULL` uses `Idents(object)`.
#' @param logfc_threshold,min_pct,min_diff_pct,only_pos,return_thresh,min_cells_group
#'   Seurat's `logfc.threshold`, `min.pct`, `min.diff.pct`, `only.pos`,
#'   `return.thresh`, `min.cells.group` (at least 2 here).
#' @param mean_fxn `"auto"`, `"expm1"` (log-normalised data) or `"mean"` (see above).
#' @param pseudocount,base Seurat's `pseudocount.use` and `base` of the fold change.
#' @return A data frame like Seurat's: `p_val`, `avg_log2FC` (named `avg_log<base>FC`
#'   for another base), `pct.1`, `pct.2`, `p_val_adj`, `cluster` (factor), `gene`; row
#'   names `make.unique(gene)`.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 400, n_genes = 200, as = "list")
#' x <- normalize_counts(sim$counts)
#' head(find_all_markers(x, sim$cells$cell_type, mean_fxn = "expm1"))
find_all_markers <- function(object, group_by = NULL, ...) {
  UseMethod("find_all_markers")
}

#' @rdname find_all_markers
#' @export
find_all_markers.default <- function(object, group_by = NULL, ..., logfc_threshold = 0.25,
                                     min_pct = 0.1, min_diff_pct = -Inf, only_pos = FALSE,
                                     return_thresh = 0.01, min_cells_group = 3,
                                     mean_fxn = c("auto", "expm1", "mean"), pseudocount = 1,
                                     base = 2, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  mean_fxn <- seurat_mean_fxn(mean_fxn, object, call = call)
  seurat_markers(get_expression(object), group_by, NULL, logfc_threshold, min_pct,
                 min_diff_pct, only_pos, return_thresh, min_cells_group, mean_fxn,
                 pseudocount, base, n_threads, call)
}

#' @rdname find_all_markers
#' @export
find_all_markers.Seurat <- function(object, group_by = NULL, ..., assay = NULL,
                                    layer = "data", logfc_threshold = 0.25, min_pct = 0.1,
                                    min_diff_pct = -Inf, only_pos = FALSE,
                                    return_thresh = 0.01, min_cells_group = 3,
                                    mean_fxn = c("auto", "expm1", "mean"), pseudocount = 1,
                                    base = 2, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  assay <- assay %||% SeuratObject::DefaultAssay(object)
  mean_fxn <- seurat_mean_fxn(mean_fxn, object, assay, layer, call)
  idents <- NULL
  if (is.null(group_by)) {
    idents <- SeuratObject::Idents(object)
    group_by <- idents
  }
  seurat_markers(get_expression(object, assay = assay, layer = layer), group_by, idents,
                 logfc_threshold, min_pct, min_diff_pct, only_pos, return_thresh,
                 min_cells_group, mean_fxn, pseudocount, base, n_threads, call)
}

#' @rdname find_all_markers
#' @export
find_all_markers.SummarizedExperiment <- function(object, group_by = NULL, ...,
                                                  assay = "logcounts", logfc_threshold = 0.25,
                                                  min_pct = 0.1, min_diff_pct = -Inf,
                                                  only_pos = FALSE, return_thresh = 0.01,
                                                  min_cells_group = 3,
                                                  mean_fxn = c("auto", "expm1", "mean"),
                                                  pseudocount = 1, base = 2, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  mean_fxn <- seurat_mean_fxn(mean_fxn, object, call = call)
  seurat_markers(get_expression(object, assay = assay), group_by, NULL, logfc_threshold,
                 min_pct, min_diff_pct, only_pos, return_thresh, min_cells_group, mean_fxn,
                 pseudocount, base, n_threads, call)
}

# Seurat's test options, checked.
seurat_opts <- function(logfc_threshold, min_pct, min_diff_pct, only_pos, min_cells_group,
                        pseudocount, base, call) {
  o <- list(logfc_threshold = check_number(logfc_threshold), min_pct = check_number(min_pct),
            min_diff_pct = check_number(min_diff_pct), only_pos = check_flag(only_pos),
            min_cells_group = check_number(min_cells_group),
            pseudocount = check_number(pseudocount), base = check_number(base))
  if (o$min_cells_group < 2) {
    abort_scannot("`min_cells_group` must be at least 2 (a rank-sum test needs 2 cells a side).",
                  "input", call = call)
  }
  if (!(o$base > 0 && o$base != 1 && is.finite(o$base))) {
    abort_scannot("`base` must be a positive number other than 1.", "input", call = call)
  }
  o$fc_name <- if (isTRUE(all.equal(o$base, exp(1)))) "avg_logFC" else paste0("avg_log", o$base, "FC")
  o
}

# The matrix, its gene names and the cells' groups made as Seurat's Idents<- makes them.
seurat_input <- function(e, group_by, call) {
  if (is.null(group_by)) {
    abort_scannot("Give `group_by`: a metadata column or one group label per cell.",
                  "group_by", call = call)
  }
  m <- e$matrix
  list(m = m, genes = rownames(m) %||% paste0("Feature", seq_len(nrow(m))),
       g = cell_groups(e$cells, seurat_idents(e$cells, group_by, ncol(m)), ncol(m),
                       na_rm = TRUE, call = call))
}

# One comparison as Seurat's FindMarkers() makes it, from per-gene statistics (genes in
# matrix order): cells with x > 0 (`pos`) and sums of expm1(x) or x in cells.1 / cells.2
# (`n1`, `n2` cells), and the core's U and tie-corrected z of cells.1 against cells.2.
# Returns the kept genes (`sel`) in Seurat's order with their p, fold change, pct:
# FindMarkers() orders by p with ties in gene order (its second key is p again),
# FindAllMarkers() then by p and decreasing fold change (`by_fc`).
seurat_compare <- function(pos1, pos2, sum1, sum2, n1, n2, u, z, o, by_fc) {
  pct1 <- round(pos1 / n1, 3)
  pct2 <- round(pos2 / n2, 3)
  fc <- log(sum1 / n1 + o$pseudocount, base = o$base) -
    log(sum2 / n2 + o$pseudocount, base = o$base)
  alpha_min <- pmax(pct1, pct2)
  keep <- alpha_min >= o$min_pct & (alpha_min - pmin(pct1, pct2)) >= o$min_diff_pct &
    (if (o$only_pos) fc >= o$logfc_threshold else abs(fc) >= o$logfc_threshold)
  keep[is.na(keep)] <- FALSE
  if (o$only_pos) keep <- keep & fc > 0
  idx <- which(keep)
  # Seurat's p: two-sided normal approximation with continuity and tie correction; sigma
  # comes back from the tie-corrected z and U of the core (z = d / sigma)
  dd <- u[idx] - n1 * n2 / 2
  zz <- z[idx]
  p <- rep(1, length(idx))
  nz <- dd != 0 & zz != 0
  p[nz] <- pmin(1, 2 * stats::pnorm(-(abs(dd[nz]) - 0.5) / abs(dd[nz] / zz[nz])))
  ord <- if (by_fc) order(p, -fc[idx]) else order(p)
  sel <- idx[ord]
  list(sel = sel, p = p[ord], fc = fc[sel], pct1 = pct1[sel], pct2 = pct2[sel])
}

# Per group (rows; cells with code < 0 in a last group) and gene (columns): cells with
# x > 0 and sums of expm1(x) or x, from the dotplot core's means and fractions.
seurat_group_sums <- function(m, codes, n_groups, expm1, n_threads, call) {
  dcodes <- codes
  dcodes[dcodes < 0L] <- n_groups
  a <- matrix_args(m)
  d <- rs_call(rs_dotplot(a$p, a$i, a$x, a$nrow, a$ncol, a$dense, seq_len(nrow(m)) - 1L,
                          dcodes, n_groups + 1L, 0, FALSE, "none", FALSE, n_threads, expm1),
               call = call)
  mean <- matrix(d$mean, nrow = n_groups + 1L)
  frac <- matrix(d$fraction, nrow = n_groups + 1L)
  mean[is.nan(mean)] <- 0
  frac[is.nan(frac)] <- 0
  list(sum = mean * d$n_cells, pos = round(frac * d$n_cells))
}

seurat_markers <- function(e, group_by, idents, logfc_threshold, min_pct, min_diff_pct,
                           only_pos, return_thresh, min_cells_group, mean_fxn, pseudocount,
                           base, n_threads, call) {
  o <- seurat_opts(logfc_threshold, min_pct, min_diff_pct, only_pos, min_cells_group,
                   pseudocount, base, call)
  min_cells_group <- o$min_cells_group
  return_thresh <- check_number(return_thresh)
  n_threads <- scannot_threads(n_threads)
  s <- seurat_input(e, group_by, call)
  m <- s$m
  genes <- s$genes
  g <- s$g
  lv <- levels(g)
  n_cells <- ncol(m)
  n1 <- tabulate(as.integer(g), length(lv))
  n2 <- n_cells - n1
  ok <- n1 >= min_cells_group & n2 >= min_cells_group
  if (any(!ok)) {
    warning(sprintf("Not tested (fewer than %d cells in the group or in the rest): %s.",
                    min_cells_group, paste(lv[!ok], collapse = ", ")), call. = FALSE)
  }
  fc_name <- o$fc_name
  cluster_levels <- if (is.factor(idents)) levels(idents) else lv
  empty <- structure(list(numeric(), numeric(), numeric(), numeric(), numeric(),
                          factor(character(), levels = cluster_levels), character()),
                     names = c("p_val", fc_name, "pct.1", "pct.2", "p_val_adj", "cluster", "gene"),
                     class = "data.frame", row.names = integer())
  if (!any(ok)) {
    warning("No DE genes identified", call. = FALSE)
    return(empty)
  }
  codes <- as.integer(g) - 1L
  codes[is.na(codes)] <- -1L
  tested <- which(ok) - 1L
  # rank sums, U and the tie-corrected z of every gene and tested group (cells with an NA
  # label stay in the rest, as in Seurat's "all other cells")
  r <- wilcoxon_run(m, codes, length(lv), tested, -1L, TRUE, "scanpy", NaN, n_threads,
                    NULL, call)
  # per group and gene: sums of expm1(x) (or x) and cells with x > 0, over every label
  # (NA cells as one more group), so the rest is the total less the group
  gs <- seurat_group_sums(m, codes, length(lv), mean_fxn == "expm1", n_threads, call)
  tot_sum <- colSums(gs$sum)
  tot_pos <- colSums(gs$pos)
  n_genes <- nrow(m)
  out <- vector("list", length(tested))
  for (k in seq_along(tested)) {
    gi <- tested[k] + 1L
    rows <- which(r$group == tested[k])
    rows <- rows[order(r$gene[rows])]
    c1 <- seurat_compare(gs$pos[gi, ], tot_pos - gs$pos[gi, ], gs$sum[gi, ],
                         tot_sum - gs$sum[gi, ], n1[gi], n2[gi], r$u[rows],
                         r$score[rows], o, by_fc = TRUE)
    keep <- c1$p < return_thresh
    if (!any(keep)) next
    sel <- c1$sel[keep]
    tab <- list(c1$p[keep], c1$fc[keep], c1$pct1[keep], c1$pct2[keep],
                pmin(1, c1$p[keep] * n_genes),
                factor(rep(lv[gi], length(sel)), levels = cluster_levels), genes[sel])
    out[[k]] <- structure(tab, names = names(empty), class = "data.frame",
                          row.names = c(NA_integer_, -length(sel)))
  }
  out <- out[!vapply(out, is.null, logical(1))]
  if (!length(out)) {
    warning("No DE genes identified", call. = FALSE)
    return(empty)
  }
  res <- do.call(rbind, out)
  if (is.character(group_by) && length(group_by) == 1L) attr(res, "group_by") <- group_by
  # Seurat returns the only.pos table before giving it make.unique(gene) row names, so
  # it keeps rbind()'s own (make.unique without a separator)
  rownames(res) <- make.unique(res$gene, sep = if (o$only_pos) "" else ".")
  res
}

# Labels as Seurat's `Idents<-` makes them: a factor keeps its levels, other values become
# a factor with levels in order of appearance; NA stays NA (`Idents<-` turns NA into "NA"
# but leaves "NA" out of the levels), so those cells are only in the others' rest.
seurat_idents <- function(cells, group_by, n_cells) {
  v <- group_by
  if (is.character(group_by) && length(group_by) == 1L && n_cells != 1L) {
    if (is.null(cells) || !group_by %in% names(cells)) return(group_by)
    v <- cells[[group_by]]
  }
  if (is.null(v) || is.factor(v) || !is.atomic(v) || length(v) != n_cells) return(v)
  v <- as.character(v)
  factor(v, levels = unique(v[!is.na(v)]))
}

#' Seurat's FindMarkers(), Wilcoxon test: one group of cells against another
#'
#' The table of Seurat's `FindMarkers(ident.1, ident.2, test.use = "wilcox")` (Seurat
#' 4.3 semantics, as [find_all_markers()] for one comparison): `ident_1` (one or more
#' groups) against `ident_2` (one or more groups; `NULL`: all other cells), ranks over
#' those cells only, Seurat's filters, `p_val` with continuity and tie correction,
#' `avg_log2FC`, `pct.1`, `pct.2`, `p_val_adj` (Bonferroni over all genes), rows ordered
#' by `p_val` (ties in gene order, as Seurat's), no `p_val` cut. Useful to tell two similar
#' clusters apart while annotating (e.g. CD4 vs CD8 T cells).
#'
#' @inheritParams find_all_markers
#' @param ident_1,ident_2 Group names (levels of `group_by`, or of `Idents(object)`).
#' @param logfc_threshold,min_pct,min_diff_pct,only_pos,min_cells_group Seurat's
#'   `logfc.threshold`, `min.pct`, `min.diff.pct`, `only.pos`, `min.cells.group` (at
#'   least 2 here).
#' @return A data frame like Seurat's: `p_val`, `avg_log2FC` (named `avg_log<base>FC` for
#'   another base), `pct.1`, `pct.2`, `p_val_adj`; row names are the genes.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 400, n_genes = 200, as = "list")
#' x <- normalize_counts(sim$counts)
#' head(find_markers_between(x, "CD4 T", "CD8 T", group_by = sim$cells$cell_type,
#'                           mean_fxn = "expm1"))
find_markers_between <- function(object, ident_1, ident_2 = NULL, ...) {
  UseMethod("find_markers_between")
}

#' @rdname find_markers_between
#' @export
find_markers_between.default <- function(object, ident_1, ident_2 = NULL, ..., group_by,
                                         logfc_threshold = 0.25, min_pct = 0.1,
                                         min_diff_pct = -Inf, only_pos = FALSE,
                                         min_cells_group = 3,
                                         mean_fxn = c("auto", "expm1", "mean"),
                                         pseudocount = 1, base = 2, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  mean_fxn <- seurat_mean_fxn(mean_fxn, object, call = call)
  seurat_pair(get_expression(object), if (missing(group_by)) NULL else group_by, ident_1,
              ident_2, logfc_threshold, min_pct, min_diff_pct, only_pos, min_cells_group,
              mean_fxn, pseudocount, base, n_threads, call)
}

#' @rdname find_markers_between
#' @export
find_markers_between.Seurat <- function(object, ident_1, ident_2 = NULL, ..., group_by = NULL,
                                        assay = NULL, layer = "data", logfc_threshold = 0.25,
                                        min_pct = 0.1, min_diff_pct = -Inf, only_pos = FALSE,
                                        min_cells_group = 3,
                                        mean_fxn = c("auto", "expm1", "mean"),
                                        pseudocount = 1, base = 2, n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  assay <- assay %||% SeuratObject::DefaultAssay(object)
  mean_fxn <- seurat_mean_fxn(mean_fxn, object, assay, layer, call)
  seurat_pair(get_expression(object, assay = assay, layer = layer),
              group_by %||% SeuratObject::Idents(object), ident_1, ident_2, logfc_threshold,
              min_pct, min_diff_pct, only_pos, min_cells_group, mean_fxn, pseudocount, base,
              n_threads, call)
}

#' @rdname find_markers_between
#' @export
find_markers_between.SummarizedExperiment <- function(object, ident_1, ident_2 = NULL, ...,
                                                      group_by, assay = "logcounts",
                                                      logfc_threshold = 0.25, min_pct = 0.1,
                                                      min_diff_pct = -Inf, only_pos = FALSE,
                                                      min_cells_group = 3,
                                                      mean_fxn = c("auto", "expm1", "mean"),
                                                      pseudocount = 1, base = 2,
                                                      n_threads = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  mean_fxn <- seurat_mean_fxn(mean_fxn, object, call = call)
  seurat_pair(get_expression(object, assay = assay),
              if (missing(group_by)) NULL else group_by, ident_1, ident_2, logfc_threshold,
              min_pct, min_diff_pct, only_pos, min_cells_group, mean_fxn, pseudocount, base,
              n_threads, call)
}

# `mean_fxn` checked, "auto" resolved as Seurat resolves it: expm1 means for a Seurat
# object whose assay's data NormalizeData's LogNormalize made (its command log says so),
# plain means otherwise (and for objects that are not Seurat's).
seurat_mean_fxn <- function(mean_fxn, object, assay = NULL, layer = NULL, call) {
  choices <- c("auto", "expm1", "mean")
  if (identical(mean_fxn, choices)) mean_fxn <- "auto"
  if (!(is.character(mean_fxn) && length(mean_fxn) == 1L && mean_fxn %in% choices)) {
    abort_scannot(sprintf("`mean_fxn` must be one of \"auto\", \"expm1\" (log-normalised data) or \"mean\", not %s.",
                          paste(format(mean_fxn), collapse = ", ")), "input", call = call)
  }
  if (mean_fxn != "auto") return(mean_fxn)
  if (!is_seurat(object)) return("mean")
  cmd <- paste0("NormalizeData.", assay)
  norm <- if (cmd %in% SeuratObject::Command(object)) {
    SeuratObject::Command(object, command = cmd, value = "normalization.method")
  }
  if (identical(layer, "data") && identical(norm, "LogNormalize")) "expm1" else "mean"
}

seurat_pair <- function(e, group_by, ident_1, ident_2, logfc_threshold, min_pct, min_diff_pct,
                        only_pos, min_cells_group, mean_fxn, pseudocount, base, n_threads,
                        call) {
  o <- seurat_opts(logfc_threshold, min_pct, min_diff_pct, only_pos, min_cells_group,
                   pseudocount, base, call)
  n_threads <- scannot_threads(n_threads)
  s <- seurat_input(e, group_by, call)
  m <- s$m
  genes <- s$genes
  g <- s$g
  lv <- levels(g)
  check_idents <- function(id, what) {
    id <- as.character(id)
    bad <- setdiff(id, lv)
    if (!length(id) || length(bad)) {
      abort_scannot(sprintf("`%s` must name groups with cells; not found: %s. Groups: %s.",
                            what, paste(bad, collapse = ", "), paste(lv, collapse = ", ")),
                    "groups", call = call)
    }
    id
  }
  ident_1 <- check_idents(ident_1, "ident_1")
  in1 <- !is.na(g) & g %in% ident_1
  if (is.null(ident_2)) {
    in2 <- !in1
  } else {
    ident_2 <- check_idents(ident_2, "ident_2")
    if (length(intersect(ident_1, ident_2))) {
      abort_scannot("`ident_1` and `ident_2` share groups; give disjoint groups.", "groups",
                    call = call)
    }
    in2 <- !is.na(g) & g %in% ident_2
  }
  n1 <- sum(in1)
  n2 <- sum(in2)
  if (n1 < o$min_cells_group || n2 < o$min_cells_group) {
    abort_scannot(sprintf("Cell group %d has fewer than %d cells (%d and %d cells).",
                          if (n1 < o$min_cells_group) 1L else 2L, o$min_cells_group, n1, n2),
                  "groups", call = call)
  }
  # cells.1 = code 0 against the reference cells.2 = code 1; the other cells take no part
  codes <- ifelse(in1, 0L, ifelse(in2, 1L, -1L))
  r <- wilcoxon_run(m, codes, 2L, 0L, 1L, TRUE, "scanpy", NaN, n_threads, NULL, call)
  rows <- order(r$gene)
  gs <- seurat_group_sums(m, codes, 2L, mean_fxn == "expm1", n_threads, call)
  c1 <- seurat_compare(gs$pos[1, ], gs$pos[2, ], gs$sum[1, ], gs$sum[2, ], n1, n2,
                       r$u[rows], r$score[rows], o, by_fc = FALSE)
  out <- structure(list(c1$p, c1$fc, c1$pct1, c1$pct2, pmin(1, c1$p * nrow(m))),
                   names = c("p_val", o$fc_name, "pct.1", "pct.2", "p_val_adj"),
                   class = "data.frame", row.names = c(NA_integer_, -length(c1$sel)))
  rownames(out) <- genes[c1$sel]
  out
}
