# One accessor for every input type: returns the expression matrix (features x cells,
# a dgCMatrix or a dense double matrix, never copied when it already is one), the cell
# metadata and the feature metadata.

is_seurat <- function(x) inherits(x, "Seurat")
is_se <- function(x) methods::is(x, "SummarizedExperiment")

#' Get the expression matrix and metadata of an object
#'
#' The accessor every scannot function uses. For a Seurat object it reads the
#' assay's `counts`/`data`/`scale.data` (SeuratObject 4 `GetAssayData`, or
#' `LayerData` on SeuratObject >= 5), for a SingleCellExperiment (or any
#' SummarizedExperiment) the named assay, and it takes a `dgCMatrix` or a numeric
#' matrix (features x cells) as it is.
#'
#' @param object A Seurat object, a SingleCellExperiment, a `dgCMatrix` or a
#'   numeric matrix (features in rows, cells in columns).
#' @param assay Seurat: assay name (default: the default assay). SingleCellExperiment:
#'   assay name (default `"logcounts"`).
#' @param layer Seurat only: `"data"` (default), `"counts"` or `"scale.data"`.
#' @param delayed What to do with an out-of-core matrix (a `DelayedMatrix` such as an
#'   `HDF5Array::HDF5Matrix`, or an h5ad X from [open_h5ad_matrix()]): `FALSE`
#'   (default) realises it in memory; `TRUE` returns it as it is, for the functions
#'   that process it block by block (see [scannot_scale_out]).
#' @return A list with `matrix` (a `dgCMatrix` or a double matrix; with `delayed =
#'   TRUE` possibly the out-of-core matrix), `cells`
#'   (data frame of cell metadata, `NULL` for matrices) and `features` (data frame
#'   of feature metadata or `NULL`).
#' @export
#' @examples
#' m <- Matrix::rsparsematrix(5, 4, 0.5)
#' str(get_expression(m))
get_expression <- function(object, assay = NULL, layer = NULL, delayed = FALSE) {
  call <- rlang::caller_env()
  check_flag(delayed, call = call)
  if (inherits(object, "scannot_h5ad_matrix")) {
    if (!is.null(assay) || !is.null(layer)) {
      abort_scannot("`assay` and `layer` do not apply to an h5ad matrix; choose the layer in open_h5ad_matrix().",
                    "input", call = call)
    }
    h <- unclass(object)
    return(list(matrix = if (delayed) object else realize_block_matrix(object),
                cells = h$obs, features = h$var))
  }
  if (is_seurat(object)) {
    out <- seurat_expression(object, assay, layer, call)
  } else if (is_se(object)) {
    if (!is.null(layer)) {
      abort_scannot("`layer` applies to Seurat objects; for a SingleCellExperiment name the assay with `assay`.",
                    "layer", call = call)
    }
    out <- se_expression(object, assay, call)
  } else {
    if (!is.null(assay) || !is.null(layer)) {
      abort_scannot("`assay` and `layer` apply to Seurat/SingleCellExperiment objects, not to a matrix.",
                    "input", call = call)
    }
    out <- list(matrix = object, cells = NULL, features = NULL)
  }
  if (!(delayed && is_block_matrix(out$matrix))) {
    out$matrix <- as_expr_matrix(out$matrix, call = call)
  }
  out
}

seurat_expression <- function(object, assay, layer, call) {
  rlang::check_installed("SeuratObject", "to read Seurat objects")
  assays <- SeuratObject::Assays(object)
  assay <- assay %||% SeuratObject::DefaultAssay(object)
  if (!is.character(assay) || length(assay) != 1L || !assay %in% assays) {
    abort_scannot(sprintf("Assay '%s' is not in this Seurat object; it has: %s.",
                          paste(assay, collapse = ", "), paste(assays, collapse = ", ")),
                  "layer", call = call)
  }
  layer <- layer %||% "data"
  if (utils::packageVersion("SeuratObject") >= "5.0.0") {
    layers <- getExportedValue("SeuratObject", "Layers")(object[[assay]])
    if (!layer %in% layers) {
      abort_scannot(sprintf("Layer '%s' is not in assay '%s'; it has: %s. Split layers must be joined first (SeuratObject::JoinLayers).",
                            layer, assay, paste(layers, collapse = ", ")), "layer", call = call)
    }
    get_layer <- getExportedValue("SeuratObject", "LayerData")
    m <- get_layer(object, assay = assay, layer = layer)
  } else {
    if (!layer %in% c("counts", "data", "scale.data")) {
      abort_scannot(sprintf("Layer '%s' does not exist: use \"counts\", \"data\" or \"scale.data\".", layer),
                    "layer", call = call)
    }
    m <- SeuratObject::GetAssayData(object, assay = assay, slot = layer)
  }
  if (length(m) == 0L || nrow(m) == 0L) {
    abort_scannot(sprintf("Layer '%s' of assay '%s' is empty; compute it first (e.g. NormalizeData / ScaleData) or choose another layer.",
                          layer, assay), "layer", call = call)
  }
  feats <- tryCatch(as.data.frame(object[[assay]][[]]), error = function(e) NULL)
  list(matrix = m, cells = object[[]], features = feats)
}

se_expression <- function(object, assay, call) {
  rlang::check_installed("SummarizedExperiment", "to read SingleCellExperiment objects")
  have <- SummarizedExperiment::assayNames(object)
  assay <- assay %||% "logcounts"
  if (!is.character(assay) || length(assay) != 1L || !assay %in% have) {
    abort_scannot(sprintf("Assay '%s' is not in this object; it has: %s. Name one with `assay =` (or compute logcounts, e.g. with normalize_counts()).",
                          paste(assay, collapse = ", "),
                          if (length(have)) paste(have, collapse = ", ") else "no named assays"),
                  "layer", call = call)
  }
  m <- SummarizedExperiment::assay(object, assay, withDimnames = TRUE)
  list(matrix = m,
       cells = as.data.frame(SummarizedExperiment::colData(object)),
       features = as.data.frame(SummarizedExperiment::rowData(object)))
}

# A dgCMatrix stays as it is (no copy); other sparse formats become one; numeric dense
# matrices become double matrices (integer ones are converted).
as_expr_matrix <- function(m, call = rlang::caller_env()) {
  if (methods::is(m, "dgCMatrix")) return(m)
  if (methods::is(m, "sparseMatrix")) {
    return(methods::as(methods::as(methods::as(m, "CsparseMatrix"), "generalMatrix"), "dMatrix"))
  }
  if (methods::is(m, "Matrix")) m <- as.matrix(m)
  if (methods::is(m, "DelayedArray") || inherits(m, "scannot_h5ad_matrix")) {
    return(as_expr_matrix(realize_block_matrix(m), call = call))
  }
  if (is.matrix(m) && (is.double(m) || is.integer(m))) {
    if (is.integer(m)) storage.mode(m) <- "double"
    return(m)
  }
  abort_scannot(sprintf("Expected a features x cells numeric matrix or dgCMatrix, got an object of class '%s'.",
                        paste(class(m), collapse = "/")), "input", call = call)
}

# Slots for the Rust glue: borrowed as they are (no copy).
matrix_args <- function(m) {
  if (methods::is(m, "dgCMatrix")) {
    list(p = m@p, i = m@i, x = m@x, nrow = nrow(m), ncol = ncol(m), dense = FALSE)
  } else {
    list(p = integer(), i = integer(), x = m, nrow = nrow(m), ncol = ncol(m), dense = TRUE)
  }
}

# Group labels for each cell: `group_by` names a metadata column, or is a vector of
# labels (one per cell). Factors keep their level order; other vectors become factors
# with sorted levels (as pandas' astype('category')). Unused levels are dropped.
cell_groups <- function(cells, group_by, n_cells, na_rm = FALSE, call = rlang::caller_env()) {
  if (is.character(group_by) && length(group_by) == 1L && n_cells != 1L) {
    if (is.null(cells)) {
      abort_scannot("For a matrix, `group_by` must be a vector of group labels, one per cell (column).",
                    "group_by", call = call)
    }
    if (!group_by %in% names(cells)) {
      abort_scannot(sprintf("`group_by` column '%s' is not in the cell metadata. Available columns: %s.",
                            group_by, paste(utils::head(names(cells), 30), collapse = ", ")),
                    "group_by", call = call)
    }
    g <- cells[[group_by]]
  } else {
    g <- group_by
  }
  if (is.null(g) || !(is.atomic(g) || is.factor(g)) || length(g) != n_cells) {
    abort_scannot(sprintf("`group_by` must name a metadata column or give one label per cell (%d cells); got length %d.",
                          n_cells, length(g)), "group_by", call = call)
  }
  if (!is.factor(g)) g <- factor(g, levels = sort(unique(g[!is.na(g)])))
  if (anyNA(g)) {
    if (!isTRUE(na_rm)) {
      abort_scannot(sprintf("%d cells have an NA group label. Label them, or set `na_rm = TRUE` to leave them out (as scanpy does).",
                            sum(is.na(g))), "group_by", call = call)
    }
  }
  g <- droplevels(g)
  if (nlevels(g) == 0L) {
    abort_scannot("No cell has a group label.", "group_by", call = call)
  }
  g
}

`%||%` <- function(a, b) if (is.null(a)) b else a
