#' Marker dotplot data: mean expression and fraction of expressing cells
#'
#' For each group of cells and each marker gene, the fraction of cells whose
#' value exceeds `expression_cutoff` (dot size) and the mean value (dot colour),
#' exactly as scanpy's `sc.pl.dotplot` computes them: means are taken over all
#' cells of the group on the values as stored (log space), or over the expressing
#' cells only with `mean_only_expressed = TRUE` (0 when none express);
#' `standard_scale` rescales the colour values to 0..1 per gene (`"var"`) or per
#' group (`"group"`), with constant rows becoming 0. Groups come from a metadata
#' column; factor level order is kept and unused levels are dropped.
#'
#' The matrix is never copied: a dgCMatrix is read through its slots in one
#' parallel pass over the non-zeros.
#'
#' @param object A Seurat object, a SingleCellExperiment, or a features x cells
#'   `dgCMatrix` / numeric matrix.
#' @param markers A named list of marker sets (character vectors of feature
#'   names) or a character vector of feature names. Genes may repeat across sets.
#'   Genes not in the data are dropped with a warning (see [markers_in_data()]).
#' @param group_by Name of a cell-metadata column, or (for matrices) a vector of
#'   group labels, one per cell.
#' @param ... Passed to methods.
#' @param assay,layer Which values to use: for Seurat the assay (default: the
#'   default assay) and layer (default `"data"`); for a SingleCellExperiment the
#'   assay (default `"logcounts"`).
#' @param expression_cutoff A value counts as expressed when it is `>` this.
#' @param mean_only_expressed Average over expressing cells only.
#' @param standard_scale `"none"`, `"var"` (each gene scaled to 0..1 across
#'   groups) or `"group"` (each group scaled across genes); applies to `color`.
#' @param log Apply `log1p` to the values first (scanpy's `log = TRUE`).
#' @param na_rm Leave out cells whose group is `NA` (scanpy's behaviour). By
#'   default such cells are an error.
#' @param n_threads Threads (default: option `scannot.threads`, else all cores).
#' @param BPPARAM `NULL` (default: in process) or a BiocParallel parameter object: the
#'   marker genes are split into blocks computed in worker processes, with the same
#'   result (see [scannot_scale_out]).
#' @return A data frame with one row per group and marker: `group` (factor),
#'   `gene`, `marker_set` (factor, in the order of `markers`), `gene_pos`
#'   (position of the marker in the plot), `mean`, `fraction` (0..1),
#'   `color` (mean after `standard_scale`) and `n_cells`.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 300, n_genes = 200, as = "list")
#' x <- normalize_counts(sim$counts)
#' dotplot_data(x, list(T = c("CD3D", "CD3E"), B = "MS4A1"), sim$cells$cell_type)
dotplot_data <- function(object, markers, group_by, ...) {
  UseMethod("dotplot_data")
}

#' @rdname dotplot_data
#' @export
dotplot_data.default <- function(object, markers, group_by, ..., expression_cutoff = 0,
                                 mean_only_expressed = FALSE,
                                 standard_scale = c("none", "var", "group"), log = FALSE,
                                 na_rm = FALSE, n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, delayed = TRUE)
  dotplot_compute(e, markers, group_by, expression_cutoff, mean_only_expressed,
                  standard_scale, log, na_rm, n_threads, call, BPPARAM)
}

#' @rdname dotplot_data
#' @export
dotplot_data.Seurat <- function(object, markers, group_by, ..., assay = NULL, layer = "data",
                                expression_cutoff = 0, mean_only_expressed = FALSE,
                                standard_scale = c("none", "var", "group"), log = FALSE,
                                na_rm = FALSE, n_threads = NULL, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay, layer = layer, delayed = TRUE)
  dotplot_compute(e, markers, group_by, expression_cutoff, mean_only_expressed,
                  standard_scale, log, na_rm, n_threads, call, BPPARAM)
}

#' @rdname dotplot_data
#' @export
dotplot_data.SummarizedExperiment <- function(object, markers, group_by, ..., assay = "logcounts",
                                              expression_cutoff = 0, mean_only_expressed = FALSE,
                                              standard_scale = c("none", "var", "group"),
                                              log = FALSE, na_rm = FALSE, n_threads = NULL,
                                              BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  e <- get_expression(object, assay = assay, delayed = TRUE)
  dotplot_compute(e, markers, group_by, expression_cutoff, mean_only_expressed,
                  standard_scale, log, na_rm, n_threads, call, BPPARAM)
}

dotplot_compute <- function(e, markers, group_by, expression_cutoff, mean_only_expressed,
                            standard_scale, log, na_rm, n_threads, call, BPPARAM = NULL) {
  BPPARAM <- check_bpparam(BPPARAM, call)
  markers <- check_markers(markers, call = call)
  standard_scale <- rlang::arg_match(standard_scale, c("none", "var", "group"), error_call = call)
  expression_cutoff <- check_number(expression_cutoff)
  check_flag(mean_only_expressed)
  check_flag(log)
  check_flag(na_rm)
  n_threads <- scannot_threads(n_threads)
  m <- e$matrix
  genes <- rownames(m)
  if (is.null(genes)) {
    abort_scannot("The expression matrix has no row names (feature names); set them first.",
                  "input", call = call)
  }
  g <- cell_groups(e$cells, group_by, ncol(m), na_rm = na_rm, call = call)

  set <- rep(names(markers), lengths(markers))
  flat <- unlist(markers, use.names = FALSE)
  row <- match(flat, genes)
  if (anyNA(row)) {
    miss <- unique(flat[is.na(row)])
    if (all(is.na(row))) {
      abort_scannot(sprintf("None of the markers is in the data (e.g. %s). Check the gene names, or match another feature column with markers_in_data(gene_col = ).",
                            paste(utils::head(miss, 5), collapse = ", ")), "markers", call = call)
    }
    warning(sprintf("%d marker gene(s) not in the data were dropped: %s", length(miss),
                    paste(utils::head(miss, 20), collapse = ", ")), call. = FALSE)
    set <- set[!is.na(row)]
    flat <- flat[!is.na(row)]
    row <- row[!is.na(row)]
  }
  codes <- as.integer(g) - 1L
  r <- dotplot_run(m, row, codes, nlevels(g), expression_cutoff, mean_only_expressed,
                   standard_scale, log, n_threads, BPPARAM, call)
  ng <- nlevels(g)
  nk <- length(flat)
  set_levels <- unique(set)
  data.frame(
    group = factor(rep(levels(g), times = nk), levels = levels(g)),
    gene = rep(flat, each = ng),
    marker_set = if (isTRUE(attr(markers, "unnamed"))) factor(NA) else
      factor(rep(set, each = ng), levels = set_levels),
    gene_pos = rep(seq_len(nk), each = ng),
    mean = r$mean,
    fraction = r$fraction,
    color = r$color,
    n_cells = rep(as.integer(r$n_cells), times = nk),
    stringsAsFactors = FALSE
  )
}

#' Marker dotplot
#'
#' A ggplot2 dotplot in the style of scanpy's and Seurat's: one row per group, one
#' column per marker gene, dot size = fraction of expressing cells, colour = mean
#' expression (after `standard_scale`), with marker-set labels over the gene
#' blocks.
#'
#' @param x The data frame from [dotplot_data()], or an object accepted by
#'   [dotplot_data()] (then `markers` and `group_by` are needed).
#' @param ... Passed to [dotplot_data()] when `x` is an object.
#' @param dot_max Fraction mapped to the largest dot (default: the largest
#'   fraction rounded up to a tenth, as scanpy); larger fractions are clipped.
#' @param colours Low and high colour of the scale.
#' @param title Plot title.
#' @return A ggplot object.
#' @export
#' @examples
#' sim <- simulate_counts(n_cells = 300, n_genes = 200, as = "list")
#' d <- dotplot_data(normalize_counts(sim$counts), list(T = c("CD3D", "CD3E"), B = "MS4A1"),
#'                   sim$cells$cell_type)
#' plot_dotplot(d)
plot_dotplot <- function(x, ..., dot_max = NULL, colours = c("#FFF5F0", "#67000D"),
                         title = NULL) {
  call <- rlang::current_env()
  d <- if (is.data.frame(x) && all(c("group", "gene", "fraction", "color") %in% names(x))) {
    x
  } else {
    dotplot_data(x, ...)
  }
  if (is.null(dot_max)) dot_max <- ceiling(10 * max(d$fraction, na.rm = TRUE)) / 10
  dot_max <- max(check_number(dot_max), 1e-9)
  scaled <- any(d$color != d$mean, na.rm = TRUE)
  d$frac_clipped <- pmin(d$fraction, dot_max)
  d$group <- factor(d$group, levels = rev(levels(factor(d$group))))
  pos <- if ("gene_pos" %in% names(d)) d$gene_pos else match(d$gene, unique(d$gene))
  d$gene_x <- factor(pos, levels = sort(unique(pos)), labels = d$gene[match(sort(unique(pos)), pos)])
  p <- ggplot2::ggplot(d, ggplot2::aes(x = .data$gene_x, y = .data$group)) +
    ggplot2::geom_point(ggplot2::aes(size = .data$frac_clipped, fill = .data$color),
                        shape = 21, colour = "grey35", stroke = 0.2) +
    ggplot2::scale_size_area(max_size = 7, limits = c(0, dot_max),
                             labels = function(v) paste0(round(100 * v), "%"),
                             name = "Fraction of cells\nin group") +
    ggplot2::scale_fill_gradient(low = colours[1], high = colours[2],
                                   name = if (scaled) "Mean expression\n(scaled)" else "Mean expression\nin group") +
    ggplot2::guides(size = ggplot2::guide_legend(override.aes = list(fill = "grey45"))) +
    ggplot2::labs(x = NULL, y = NULL, title = title) +
    ggplot2::theme_bw() +
    ggplot2::theme(axis.text.x = ggplot2::element_text(angle = 90, hjust = 1, vjust = 0.5, face = "italic"),
                   panel.grid.major = ggplot2::element_line(colour = "grey92"),
                   strip.background = ggplot2::element_rect(fill = "grey95", colour = NA),
                   strip.text.x = ggplot2::element_text(angle = 0, face = "bold", size = 8),
                   strip.clip = "off",
                   panel.spacing.x = grid::unit(2, "pt"))
  if ("marker_set" %in% names(d) && !all(is.na(d$marker_set))) {
    p <- p + ggplot2::facet_grid(cols = ggplot2::vars(.data$marker_set), scales = "free_x",
                                 space = "free_x")
  }
  p
}
