# Marker sets: which are present in the data, and the manual cluster -> label step.

# Validate a marker specification: a named list of character vectors, or a character
# vector (one unnamed set).
check_markers <- function(markers, call = rlang::caller_env()) {
  if (is.character(markers) && !is.list(markers)) {
    markers <- list(markers = markers)
    attr(markers, "unnamed") <- TRUE
  }
  if (!is.list(markers) || length(markers) == 0L) {
    abort_scannot("`markers` must be a named list of character vectors (marker set -> genes), or a character vector of genes.",
                  "markers", call = call)
  }
  nm <- names(markers)
  if (is.null(nm) || any(is.na(nm) | !nzchar(nm)) || anyDuplicated(nm)) {
    abort_scannot("Every marker set in `markers` needs a unique, non-empty name, e.g. list(T = c(\"CD3D\", \"CD3E\"), B = \"MS4A1\").",
                  "markers", call = call)
  }
  ok <- vapply(markers, function(s) is.character(s) && !anyNA(s), logical(1))
  if (!all(ok)) {
    abort_scannot(sprintf("Marker set(s) %s must be character vectors of gene names without NA.",
                          paste0("'", nm[!ok], "'", collapse = ", ")), "markers", call = call)
  }
  markers
}

feature_table <- function(object, call) {
  if (is.character(object) && is.null(dim(object))) {
    return(list(names = object, meta = NULL))
  }
  if (is_seurat(object) || is_se(object)) {
    e <- get_expression_shallow(object)
    return(list(names = e$names, meta = e$features))
  }
  if (!is.null(dim(object)) && !is.null(rownames(object))) {
    return(list(names = rownames(object), meta = NULL))
  }
  abort_scannot("`object` must be a Seurat object, a SingleCellExperiment, a matrix with row names, or a character vector of feature names.",
                "input", call = call)
}

# Feature names and metadata without touching the expression matrix.
get_expression_shallow <- function(object) {
  if (is_seurat(object)) {
    assay <- SeuratObject::DefaultAssay(object)
    list(names = rownames(object[[assay]]),
         features = tryCatch(as.data.frame(object[[assay]][[]]), error = function(e) NULL))
  } else {
    list(names = rownames(object),
         features = as.data.frame(SummarizedExperiment::rowData(object)))
  }
}

#' Keep the marker genes that are present in the data
#'
#' Matches each marker set against the object's feature names, or against a
#' column of its feature metadata (for example Ensembl IDs or symbols in
#' `rowData`), and reports the markers that are missing.
#'
#' @param markers A named list of character vectors (marker set -> genes), or a
#'   character vector.
#' @param object A Seurat object, SingleCellExperiment, matrix with row names, or a
#'   character vector of feature names.
#' @param gene_col `NULL` to match feature names, or the name of a feature-metadata
#'   column whose values the markers are matched against; matches are returned as
#'   the corresponding feature names.
#' @param quiet If `FALSE` (default), a message lists the missing markers.
#' @return The marker list restricted to present features (as feature names), in
#'   the original order; sets with no present gene are dropped. The attribute
#'   `"missing"` holds a named list of the missing markers per set.
#' @export
#' @examples
#' m <- Matrix::rsparsematrix(3, 2, 1, dimnames = list(c("CD3D", "MS4A1", "LYZ"), NULL))
#' markers_in_data(list(T = c("CD3D", "CD3E"), B = "MS4A1"), m)
markers_in_data <- function(markers, object, gene_col = NULL, quiet = FALSE) {
  call <- rlang::current_env()
  markers <- check_markers(markers, call = call)
  ft <- feature_table(object, call)
  if (is.null(gene_col)) {
    keys <- ft$names
  } else {
    gene_col <- check_string(gene_col)
    if (is.null(ft$meta) || !gene_col %in% names(ft$meta)) {
      abort_scannot(sprintf("`gene_col` '%s' is not a column of the feature metadata%s.", gene_col,
                            if (is.null(ft$meta)) "" else paste0(" (columns: ", paste(names(ft$meta), collapse = ", "), ")")),
                    "markers", call = call)
    }
    keys <- as.character(ft$meta[[gene_col]])
  }
  found <- lapply(markers, function(s) ft$names[match(s[s %in% keys], keys)])
  missing <- lapply(markers, function(s) s[!s %in% keys])
  n_missing <- sum(lengths(missing))
  if (!quiet && n_missing > 0L) {
    lines <- vapply(names(missing)[lengths(missing) > 0L], function(n)
      sprintf("  %s: %s", n, paste(missing[[n]], collapse = ", ")), character(1))
    message(sprintf("%d of %d markers are not in the data:\n%s", n_missing,
                    sum(lengths(markers)), paste(lines, collapse = "\n")))
  }
  empty <- lengths(found) == 0L
  if (!quiet && any(empty)) {
    message("Dropped marker set(s) with no gene in the data: ", paste(names(found)[empty], collapse = ", "))
  }
  out <- found[!empty]
  attr(out, "missing") <- missing[lengths(missing) > 0L]
  out
}

#' Map clusters to cell-type labels
#'
#' The manual annotation step: give each cluster a label, producing a new cell
#' metadata column. Every cluster id in `mapping` must exist in the data
#' (a typo would silently leave cells unlabelled otherwise); clusters without a
#' label are reported and get `NA`.
#'
#' @param object A Seurat object, SingleCellExperiment or data frame of cell
#'   metadata. It is not modified; a new object is returned.
#' @param cluster_col Name of the metadata column holding cluster ids.
#' @param mapping A named character vector or named list (`c("0" = "T cell",
#'   "1" = "B cell")`), or a data frame whose first two columns are cluster and
#'   label. Several clusters may share a label.
#' @param new_col Name of the new column (default `"cell_type"`).
#' @return The object with the new factor column (levels in order of first
#'   appearance in `mapping`).
#' @export
#' @examples
#' meta <- data.frame(cluster = factor(c(0, 1, 1, 2)))
#' label_clusters(meta, "cluster", c("0" = "T", "1" = "B", "2" = "T"))
label_clusters <- function(object, cluster_col, mapping, new_col = "cell_type") {
  call <- rlang::current_env()
  cluster_col <- check_string(cluster_col)
  new_col <- check_string(new_col)
  cells <- cell_metadata(object, call)
  if (!cluster_col %in% names(cells)) {
    abort_scannot(sprintf("Column '%s' is not in the cell metadata. Available columns: %s.",
                          cluster_col, paste(utils::head(names(cells), 30), collapse = ", ")),
                  "group_by", call = call)
  }
  if (is.data.frame(mapping)) {
    if (ncol(mapping) < 2L) {
      abort_scannot("A data frame `mapping` needs two columns: cluster id and label.", "mapping", call = call)
    }
    mapping <- stats::setNames(as.character(mapping[[2]]), as.character(mapping[[1]]))
  }
  if (is.list(mapping)) {
    if (!all(lengths(mapping) == 1L)) {
      abort_scannot("Each cluster in `mapping` must map to exactly one label.", "mapping", call = call)
    }
    mapping <- unlist(mapping)
  }
  if (!(is.character(mapping) || is.factor(mapping)) || is.null(names(mapping)) ||
      any(!nzchar(names(mapping)))) {
    abort_scannot("`mapping` must be a named character vector or list: names are cluster ids, values are labels.",
                  "mapping", call = call)
  }
  mapping <- stats::setNames(as.character(mapping), names(mapping))
  if (anyDuplicated(names(mapping))) {
    abort_scannot(sprintf("Cluster(s) %s appear more than once in `mapping`.",
                          paste(unique(names(mapping)[duplicated(names(mapping))]), collapse = ", ")),
                  "mapping", call = call)
  }
  clusters <- as.character(cells[[cluster_col]])
  present <- unique(clusters[!is.na(clusters)])
  unknown <- setdiff(names(mapping), present)
  if (length(unknown)) {
    abort_scannot(sprintf("`mapping` names cluster(s) not in column '%s': %s. Present clusters: %s.",
                          cluster_col, paste(unknown, collapse = ", "),
                          paste(sort(present), collapse = ", ")), "mapping", call = call)
  }
  unmapped <- setdiff(present, names(mapping))
  if (length(unmapped)) {
    message(sprintf("%d cluster(s) have no label and get NA: %s", length(unmapped),
                    paste(sort(unmapped), collapse = ", ")))
  }
  labels <- factor(unname(mapping[clusters]), levels = unique(unname(mapping)))
  add_cell_columns(object, stats::setNames(list(labels), new_col))
}

# Cell metadata of any supported object.
cell_metadata <- function(object, call = rlang::caller_env()) {
  if (is_seurat(object)) return(object[[]])
  if (is_se(object)) return(as.data.frame(SummarizedExperiment::colData(object)))
  if (is.data.frame(object)) return(object)
  abort_scannot("`object` must be a Seurat object, a SingleCellExperiment or a data frame of cell metadata.",
                "input", call = call)
}

# Store a result object-wide in a copy of the object: Seurat `@misc[[name]]`,
# SummarizedExperiment `metadata(object)[[name]]`.
store_in_object <- function(object, name, value) {
  if (is_seurat(object)) {
    object@misc[[name]] <- value
  } else {
    md <- S4Vectors::metadata(object)
    md[[name]] <- value
    S4Vectors::metadata(object) <- md
  }
  object
}

# Add columns (a named list or data frame, one value per cell) to a copy of the object.
add_cell_columns <- function(object, cols) {
  if (is_seurat(object)) {
    md <- object@meta.data
    for (n in names(cols)) md[[n]] <- cols[[n]]
    object@meta.data <- md
  } else if (is_se(object)) {
    cd <- SummarizedExperiment::colData(object)
    for (n in names(cols)) cd[[n]] <- cols[[n]]
    SummarizedExperiment::colData(object) <- cd
  } else {
    for (n in names(cols)) object[[n]] <- cols[[n]]
  }
  object
}
