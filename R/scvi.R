# scvi-tools SCVI models: loading a saved model without Python, aligning query genes to
# it and computing the encoder latent exactly as get_latent_representation() (spec
# section 5).

#' Load a saved scvi-tools SCVI model
#'
#' Reads the folder written by scvi-tools' `model.save(dir)` (scvi-tools >= 0.15: a
#' `model.pt` torch archive) **without Python**: scannot's own reader decodes the
#' archive and never executes anything stored in it. The file's architecture
#' (`init_params_`), genes (`var_names`) and setup (`registry_`: batch key and
#' categories, extra covariates) are read, and the encoder is built once in Rust.
#'
#' Supported: SCVI (and the SCVI part of SCANVI) models with one-hot batch
#' representation and a normal latent, with batch and layer norm in any combination,
#' any number of layers, `encode_covariates` with categorical and continuous
#' covariates. Refused with a `scannot_error_format` / `scannot_error_input` error: the
#' legacy layout of scvi-tools < 0.15 (`model_params.pt` + `attr.pkl`; re-save it
#' with `scvi.model.SCVI.convert_legacy_save`), multi-modal (MuData) models, the
#' `"ln"` latent distribution, the `"embedding"` batch representation, and files that
#' are not torch archives.
#'
#' The returned object keeps the model's path and description as plain R values; the
#' weights live in Rust behind an external pointer. That pointer does not survive
#' `saveRDS()` / `readRDS()` (or a new R session): functions that need the weights then
#' re-load the model from `path` automatically.
#'
#' @param dir The folder given to `model.save()`, or the `model.pt` file itself.
#' @return An object of class `scannot_scvi_model`: a list with `path`, `genes` (the
#'   model's genes in input order), `n_genes`, `n_latent`, `n_hidden`, `n_layers`,
#'   `dropout_rate`, `gene_likelihood`, `dispersion`, `latent_distribution`,
#'   `use_batch_norm`, `use_layer_norm`, `encode_covariates`,
#'   `deeply_inject_covariates`, `use_observed_lib_size`, `log_variational`,
#'   `batch_key`, `batch_levels` (batch categories in code order), `n_batch`,
#'   `labels_key`, `labels_levels`, `layer`, `size_factor_key`,
#'   `categorical_covariates` (named list: levels per covariate), `continuous_covariates`,
#'   `encoder_uses_covariates`, `scvi_version`, `model_name`, and the environment
#'   `handle` holding the external pointer.
#' @seealso [scvi_latent()], [align_to_reference()]
#' @export
#' @examples
#' \dontrun{
#' model <- load_scvi_model("scvi_reference_model/")
#' model
#' }
load_scvi_model <- function(dir) {
  call <- rlang::current_env()
  dir <- check_string(dir, arg = "dir")
  if (!file.exists(dir)) {
    abort_scannot(sprintf("'%s' does not exist. Give the folder passed to scvi-tools' model.save() (it holds model.pt).",
                          dir), "input", call = call)
  }
  path <- normalizePath(dir, mustWork = TRUE)
  r <- rs_call(rs_scvi_load(path), call = call)
  d <- r$desc
  handle <- new.env(parent = emptyenv())
  handle$ptr <- r$ptr
  cats <- stats::setNames(lapply(d$cat_levels, as.character), d$cat_keys)
  structure(list(
    path = path,
    genes = d$var_names,
    n_genes = length(d$var_names),
    n_latent = d$n_latent,
    n_hidden = d$n_hidden,
    n_layers = d$n_layers,
    dropout_rate = d$dropout_rate,
    gene_likelihood = d$gene_likelihood,
    dispersion = d$dispersion,
    latent_distribution = d$latent_distribution,
    use_batch_norm = d$use_batch_norm,
    use_layer_norm = d$use_layer_norm,
    encode_covariates = d$encode_covariates,
    deeply_inject_covariates = d$deeply_inject_covariates,
    batch_representation = d$batch_representation,
    use_observed_lib_size = d$use_observed_lib_size,
    log_variational = d$log_variational,
    batch_key = d$batch_key,
    batch_levels = d$batch_mapping,
    n_batch = d$n_batch,
    labels_key = d$labels_key,
    labels_levels = d$labels_mapping,
    layer = d$layer,
    size_factor_key = d$size_factor_key,
    categorical_covariates = cats,
    continuous_covariates = d$cont_keys,
    encoder_uses_covariates = d$encoder_uses_covariates,
    scvi_version = d$scvi_version,
    model_name = d$model_name,
    handle = handle
  ), class = "scannot_scvi_model")
}

#' Print an scVI model
#' @param x A `scannot_scvi_model`.
#' @param ... Ignored.
#' @return `x`, invisibly.
#' @method print scannot_scvi_model
#' @export
print.scannot_scvi_model <- function(x, ...) {
  cat(sprintf("%s model (scvi-tools %s): %d genes, %d latent dimensions\n",
              x$model_name %||% "SCVI", x$scvi_version %||% "?", x$n_genes, x$n_latent))
  cat(sprintf("  encoder: %d layer(s) of %d hidden units, dropout %g, batch norm '%s', layer norm '%s'\n",
              x$n_layers, x$n_hidden, x$dropout_rate, x$use_batch_norm, x$use_layer_norm))
  cat(sprintf("  likelihood: %s, dispersion '%s', latent '%s'%s\n", x$gene_likelihood,
              x$dispersion, x$latent_distribution,
              if (isTRUE(x$use_observed_lib_size)) "" else ", learned library size"))
  show <- function(v) {
    if (length(v) > 8) v <- c(utils::head(v, 8), sprintf("... (%d)", length(v)))
    paste(v, collapse = ", ")
  }
  if (is.null(x$batch_key)) {
    cat("  batch: none\n")
  } else {
    cat(sprintf("  batch: '%s', %d categories: %s\n", x$batch_key, x$n_batch,
                show(x$batch_levels)))
  }
  for (k in names(x$categorical_covariates)) {
    cat(sprintf("  categorical covariate '%s': %s\n", k, show(x$categorical_covariates[[k]])))
  }
  if (length(x$continuous_covariates)) {
    cat(sprintf("  continuous covariates: %s\n", paste(x$continuous_covariates, collapse = ", ")))
  }
  cat(sprintf("  covariates in the encoder: %s (encode_covariates = %s, deeply_inject_covariates = %s)\n",
              if (isTRUE(x$encoder_uses_covariates)) "yes" else "no",
              x$encode_covariates, x$deeply_inject_covariates))
  cat(sprintf("  genes: %s\n", show(x$genes)))
  cat(sprintf("  path: %s\n", x$path))
  invisible(x)
}

# A model object (or a path to load) with a live weight pointer; re-loads by path when the
# pointer did not survive saveRDS().
check_scvi_model <- function(model, call) {
  if (is.character(model) && length(model) == 1L) {
    return(load_scvi_model(model))
  }
  if (!inherits(model, "scannot_scvi_model")) {
    abort_scannot("`model` must be a model from load_scvi_model() or the folder of a saved scvi-tools model.",
                  "input", call = call)
  }
  if (!is.environment(model$handle) || !rs_scvi_loaded(model$handle$ptr)) {
    if (!file.exists(model$path)) {
      abort_scannot(sprintf("The model's weights are not loaded (the object was saved and restored) and its folder '%s' no longer exists; load the model again with load_scvi_model().",
                            model$path), "input", call = call)
    }
    fresh <- load_scvi_model(model$path)
    if (!identical(fresh$genes, model$genes) || !identical(fresh$n_latent, model$n_latent)) {
      abort_scannot(sprintf("The model file at '%s' changed since this object was loaded; load it again with load_scvi_model().",
                            model$path), "input", call = call)
    }
    if (!is.environment(model$handle)) model$handle <- new.env(parent = emptyenv())
    # the environment is shared by copies of the object, so the re-load is kept
    model$handle$ptr <- fresh$handle$ptr
  }
  model
}

#' Align a query's genes to a reference model
#'
#' Puts the query's genes in the model's gene order, as scvi-tools'
#' `prepare_query_anndata()` does: model genes missing from the query are added as
#' all-zero rows, query genes the model does not know are dropped, and the rest are
#' reordered. Genes are matched by exact name (the first of duplicated names wins) or
#' by a feature-metadata column (e.g. Ensembl IDs when the model was trained on them).
#'
#' @param object A Seurat object, a SingleCellExperiment, or a genes x cells
#'   `dgCMatrix` / numeric matrix.
#' @param model A model from [load_scvi_model()] (or its folder), or a character vector
#'   of reference gene names.
#' @param by `"name"` (row names) or the name of a feature-metadata column (Seurat
#'   assay meta features, SingleCellExperiment `rowData`) whose values are matched to
#'   the model's genes. For a matrix, a character vector with one id per row also works.
#' @param min_fraction Minimum fraction of the model's genes that must be found;
#'   below it a `scannot_error_genes` error is raised (scvi-tools only warns below 0.8,
#'   but a query sharing few genes with the reference maps badly).
#' @param assay,layer Which matrix to align: Seurat `assay` and `layer` (default
#'   `"counts"`), SingleCellExperiment `assay` (default `"counts"`).
#' @param verbose Print how many genes were found, padded and dropped.
#' @return A genes x cells `dgCMatrix` (a dense matrix for dense input) with the model's
#'   genes as rows, in the model's order, and the query's cells as columns. Its
#'   attribute `"alignment"` is a list: `n_model`, `n_found`, `fraction`, `missing`
#'   (model genes padded with zeros), `dropped` (query genes not in the model),
#'   `reordered` (whether the order changed).
#' @seealso [scvi_latent()]
#' @export
#' @examples
#' m <- Matrix::rsparsematrix(4, 3, 0.5, rand.x = function(n) rpois(n, 3) + 1)
#' rownames(m) <- c("d", "a", "x", "b")
#' aligned <- align_to_reference(m, c("a", "b", "c", "d"), min_fraction = 0.5)
#' attr(aligned, "alignment")$missing
align_to_reference <- function(object, model, by = "name", min_fraction = 0.5,
                               assay = NULL, layer = NULL, verbose = TRUE) {
  call <- rlang::current_env()
  check_flag(verbose)
  ref <- if (is.character(model) && !(length(model) == 1L && dir.exists(model))) {
    model
  } else {
    check_scvi_model(model, call)$genes
  }
  a <- scvi_align(object, ref, by, min_fraction, assay, layer, call)
  if (verbose) scvi_alignment_message(attr(a$x, "alignment"))
  a$x
}

scvi_alignment_message <- function(al) {
  message(sprintf("Aligned to the model's %d genes: %d found (%.1f%%), %d padded with zeros, %d query genes dropped%s.",
                  al$n_model, al$n_found, 100 * al$fraction, length(al$missing),
                  length(al$dropped), if (al$reordered) ", order changed" else ""))
}

# Default matrices for scVI: raw counts.
scvi_expression <- function(object, assay, layer, call, delayed = FALSE) {
  if (is_seurat(object)) {
    get_expression(object, assay = assay, layer = layer %||% "counts", delayed = delayed)
  } else if (is_se(object)) {
    if (!is.null(layer)) {
      abort_scannot("`layer` applies to Seurat objects; for a SingleCellExperiment name the assay with `assay`.",
                    "layer", call = call)
    }
    get_expression(object, assay = assay %||% "counts", delayed = delayed)
  } else {
    get_expression(object, assay = assay, layer = layer, delayed = delayed)
  }
}

# Align the rows of `object`'s matrix to the reference genes `ref`.
# Returns list(x = aligned matrix with attribute "alignment", cells = cell metadata).
scvi_align <- function(object, ref, by, min_fraction, assay, layer, call, delayed = FALSE) {
  min_fraction <- check_number(min_fraction, call = call)
  if (min_fraction < 0 || min_fraction > 1) {
    abort_scannot("`min_fraction` is a fraction and must lie in 0..1.", "input", call = call)
  }
  e <- scvi_expression(object, assay, layer, call, delayed = delayed)
  m <- e$matrix
  ids <- scvi_gene_ids(m, e$features, by, call)
  pos <- match(ref, ids)
  found <- !is.na(pos)
  n_found <- sum(found)
  al <- list(n_model = length(ref), n_found = n_found,
             fraction = if (length(ref)) n_found / length(ref) else 0,
             missing = ref[!found], dropped = setdiff(ids, ref),
             reordered = FALSE)
  if (al$fraction < min_fraction) {
    abort_scannot(sprintf("Only %d of the model's %d genes (%.1f%%) are in the query (matched by %s); at least %.0f%% are needed. Check that the genes use the same naming (symbols vs Ensembl IDs; use `by` to match a feature-metadata column) or lower `min_fraction`.",
                          n_found, length(ref), 100 * al$fraction,
                          if (identical(by, "name")) "row name" else sprintf("'%s'", by),
                          100 * min_fraction), "genes", call = call)
  }
  al$reordered <- !identical(pos[found], sort(pos[found]))
  if (is_block_matrix(m)) {
    # out-of-core: aligned block by block (scvi_align_matrix) when the cells are read
    x <- structure(list(m = m, ref = ref, pos = pos, found = found),
                   class = "scannot_scvi_lazy")
  } else {
    x <- scvi_align_matrix(m, ref, pos, found)
  }
  attr(x, "alignment") <- al
  list(x = x, cells = e$cells)
}

# Rows of `m` in the model's gene order `ref`: pos = match(ref, ids), found = !is.na(pos).
scvi_align_matrix <- function(m, ref, pos, found) {
  cells <- colnames(m)
  n_found <- sum(found)
  if (n_found == length(ref) && nrow(m) == length(ref) && identical(pos, seq_along(ref))) {
    x <- m # already the model's genes in the model's order: no copy
    if (!identical(rownames(x), ref)) rownames(x) <- ref
  } else if (methods::is(m, "dgCMatrix")) {
    # selection then row permutation into the model's order, zero rows for missing genes
    sub <- m[pos[found], , drop = FALSE]
    perm <- Matrix::sparseMatrix(i = which(found), j = seq_len(n_found), x = 1,
                                 dims = c(length(ref), n_found))
    x <- perm %*% sub
    x <- methods::as(x, "dgCMatrix")
    dimnames(x) <- list(ref, cells)
  } else {
    x <- matrix(0, length(ref), ncol(m), dimnames = list(ref, cells))
    x[found, ] <- m[pos[found], , drop = FALSE]
  }
  x
}

scvi_gene_ids <- function(m, features, by, call) {
  if (is.character(by) && length(by) == nrow(m) && length(by) > 1L) {
    return(by)
  }
  if (!is.character(by) || length(by) != 1L || is.na(by)) {
    abort_scannot("`by` must be \"name\" or the name of a feature-metadata column.", "input",
                  call = call)
  }
  if (by == "name") {
    ids <- rownames(m)
    if (is.null(ids)) {
      abort_scannot("The query matrix has no row names (gene names); set them, or pass `by` = one id per row.",
                    "genes", call = call)
    }
    return(ids)
  }
  if (is.null(features) || !by %in% names(features)) {
    abort_scannot(sprintf("`by` = '%s' is not a feature-metadata column%s.", by,
                          if (is.null(features)) " (a matrix has none: pass one id per row instead)"
                          else sprintf("; available: %s", paste(utils::head(names(features), 20), collapse = ", "))),
                  "genes", call = call)
  }
  ids <- as.character(features[[by]])
  if (length(ids) != nrow(m)) {
    abort_scannot(sprintf("Feature-metadata column '%s' has %d values for %d genes.", by,
                          length(ids), nrow(m)), "genes", call = call)
  }
  ids
}

# Codes of a categorical covariate in the model's categories, new levels appended sorted
# (scvi-tools' CategoricalDataFrameField.transfer_field with extend_categories = True:
# np.unique(values) minus the mapping, sorted by code point, appended after it).
scvi_category_codes <- function(values, levels, what, call) {
  if (is.factor(values)) values <- as.character(values)
  if (!is.atomic(values)) {
    abort_scannot(sprintf("The %s values must be a vector or factor.", what), "batch", call = call)
  }
  if (anyNA(values)) {
    abort_scannot(sprintf("%d cells have no %s (NA); scvi-tools cannot register them. Label or remove them.",
                          sum(is.na(values)), what), "batch", call = call)
  }
  values <- as.character(values)
  new <- sort(setdiff(unique(values), levels), method = "radix")
  all <- c(levels, new)
  list(codes = match(values, all) - 1L, levels = all, new_levels = new)
}

# The cell metadata column or per-cell vector for `key` (a column name or values).
scvi_cell_values <- function(cells, key, n_cells, what, call) {
  if (is.character(key) && length(key) == 1L && n_cells != 1L) {
    if (is.null(cells) || !key %in% names(cells)) {
      abort_scannot(sprintf("The %s column '%s' is not in the cell metadata%s.", what, key,
                            if (is.null(cells)) " (a matrix has none: pass one value per cell)"
                            else sprintf("; available: %s", paste(utils::head(names(cells), 30), collapse = ", "))),
                    "batch", call = call)
    }
    return(cells[[key]])
  }
  if (length(key) != n_cells) {
    abort_scannot(sprintf("The %s must name a cell-metadata column or give one value per cell (%d cells); got %d values.",
                          what, n_cells, length(key)), "batch", call = call)
  }
  key
}

#' Prepare a query for an scVI model: aligned counts and covariate codes
#'
#' Shared by scvi_latent() and scvi_map_query() (query training). Keep the name and the
#' returned elements stable.
#'
#' @param object Seurat / SingleCellExperiment / genes x cells matrix of raw counts.
#' @param model A `scannot_scvi_model` (or its folder).
#' @param batch_key NULL (the model's batch_key column if the cell metadata has it; every
#'   cell in the model's first batch when the model has no batch covariate), a column name,
#'   or one batch label per cell.
#' @param assay,layer Which matrix (default raw counts: Seurat layer "counts", SCE assay
#'   "counts").
#' @param by Gene matching (see align_to_reference()).
#' @param covariates NULL, or a data frame (one row per cell) holding the model's extra
#'   categorical / continuous covariate columns; by default they are read from the cell
#'   metadata.
#' @param min_fraction See align_to_reference().
#' @param need_batch FALSE: a model with batches but no batch information in the query is
#'   no error (every cell gets code 0); scvi_latent() uses it for models whose encoder
#'   ignores the batch.
#' @param call Condition call.
#' @return list(
#'   x = the aligned genes x cells COUNTS (dgCMatrix, or a dense double matrix for dense
#'       input; rows = model genes in model order, missing ones zero),
#'   batch = integer 0-based codes, one per cell, in the model's batch categories with
#'       new levels appended sorted by code point (as load_query_data),
#'   new_levels = the appended batch levels (character, possibly empty),
#'   report = the alignment report (n_model, n_found, fraction, missing, dropped,
#'       reordered),
#'   batch_levels = all batch levels (model's, then new_levels),
#'   categorical = list per extra categorical covariate (model order) of
#'       list(codes, levels, new_levels), same rules as batch,
#'   continuous = list per extra continuous covariate (model order) of double vectors,
#'   cells = cell names)
#' @noRd
scvi_prepare_query <- function(object, model, batch_key = NULL, assay = NULL, layer = NULL,
                               by = "name", covariates = NULL, min_fraction = 0.5,
                               need_batch = TRUE, call = rlang::caller_env(),
                               delayed = FALSE) {
  model <- check_scvi_model(model, call)
  a <- scvi_align(object, model$genes, by, min_fraction, assay, layer, call, delayed = delayed)
  x <- a$x
  report <- attr(x, "alignment")
  attr(x, "alignment") <- NULL
  n <- ncol(x)
  cells <- a$cells
  if (!is.null(covariates)) {
    if (!is.data.frame(covariates) || nrow(covariates) != n) {
      abort_scannot(sprintf("`covariates` must be a data frame with one row per cell (%d).", n),
                    "input", call = call)
    }
    cells <- if (is.null(cells)) covariates else cbind(as.data.frame(cells), covariates)
  }
  # batch
  has_batch <- !is.null(model$batch_key)
  if (is.null(batch_key)) {
    if (has_batch && !is.null(cells) && model$batch_key %in% names(cells)) {
      batch_key <- model$batch_key
    } else if (has_batch && model$n_batch > 1L && need_batch) {
      abort_scannot(sprintf("The model was trained with batch_key '%s' (%d batches): name the query's batch column with `batch_key` (a cell-metadata column, or one label per cell).",
                            model$batch_key, model$n_batch), "batch", call = call)
    }
  }
  levels <- as.character(model$batch_levels)
  if (is.null(batch_key) || !has_batch) {
    # scvi-tools registers every query cell in the model's (single or default) batch
    b <- list(codes = integer(n), levels = levels, new_levels = character())
  } else {
    vals <- scvi_cell_values(cells, batch_key, n, "batch", call)
    b <- scvi_category_codes(vals, levels, "batch", call)
  }
  categorical <- list()
  for (k in names(model$categorical_covariates)) {
    vals <- scvi_cell_values(cells, k, n, sprintf("categorical covariate '%s'", k), call)
    categorical[[k]] <- scvi_category_codes(vals, model$categorical_covariates[[k]],
                                            sprintf("covariate '%s'", k), call)
  }
  continuous <- list()
  for (k in model$continuous_covariates) {
    vals <- scvi_cell_values(cells, k, n, sprintf("continuous covariate '%s'", k), call)
    if (!is.numeric(vals) || anyNA(vals) || any(!is.finite(vals))) {
      abort_scannot(sprintf("The continuous covariate '%s' must be finite numbers for every cell.", k),
                    "batch", call = call)
    }
    continuous[[k]] <- as.double(vals)
  }
  list(x = x, batch = as.integer(b$codes), new_levels = b$new_levels, report = report,
       batch_levels = b$levels, categorical = categorical, continuous = continuous,
       cells = colnames(x))
}

#' scVI latent representation of cells
#'
#' Computes the latent representation of query cells with a saved scvi-tools model,
#' exactly as `model.get_latent_representation()` does (eval mode): raw counts are
#' aligned to the model's genes ([align_to_reference()]), `log1p`-transformed and passed
#' through the encoder (batch norm with running statistics, layer norm, ReLU, no
#' dropout); the latent is the encoder mean `qz.loc`. It equals scvi-tools' to ~1e-6.
#' Cells are processed in parallel in Rust; sparse input is never densified (the first
#' layer reads only the non-zero counts).
#'
#' **Batches.** A default SCVI model's encoder ignores the batch, so its latent is
#' defined for any cell. Models trained with `encode_covariates = TRUE` (scArches
#' settings) feed the batch (and categorical covariates) to the encoder: their latent
#' exists only for the model's own batches. Query batches the model has never seen are an
#' error (`scannot_error_batch`) unless the model has no batch covariate; with
#' `allow_new_batches = TRUE` the latent of a model whose encoder ignores the batch is
#' computed anyway. Mapping new batches properly needs query training (scArches surgery,
#' `scvi_map_query()`).
#'
#' @param object A Seurat object, a SingleCellExperiment, or a genes x cells
#'   `dgCMatrix` / numeric matrix of **raw counts** with gene names as row names.
#' @param model A model from [load_scvi_model()], or the model's folder.
#' @param batch_key The query's batch: a cell-metadata column name or one label per
#'   cell. `NULL`: the model's own `batch_key` column if the metadata has one.
#' @param ... Passed to methods.
#' @param give_mean `TRUE`: the latent mean (default, as scvi-tools). `FALSE`: one sample
#'   from the posterior `N(mean, var)` drawn with R's random number generator (use
#'   `set.seed()`).
#' @param allow_new_batches Compute the latent for cells of batches the model does not
#'   know when its encoder ignores the batch (see Details).
#' @param by,min_fraction Gene matching, see [align_to_reference()].
#' @param covariates A data frame (one row per cell) with the model's extra covariate
#'   columns, if they are not in the cell metadata.
#' @param return_variance Also return the posterior variance (`exp(var_encoder) + 1e-4`).
#' @param name Name of the stored reduction: Seurat DimReduc (default `"scvi"`, key
#'   `"scVI_"`), SingleCellExperiment `reducedDim` (default `"X_scVI"`).
#' @param batch_size Cells per parallel work unit (the result does not depend on it).
#' @param n_threads Number of threads (see [scannot_threads()]).
#' @param BPPARAM `NULL` (default: in process) or a BiocParallel parameter object: cells
#'   are split into blocks encoded in worker processes (each reloads the model from
#'   `model$path`), with the same result. An out-of-core `object` (a `DelayedMatrix`,
#'   [open_h5ad_matrix()]) is read in cell blocks either way (see [scannot_scale_out]).
#' @param assay,layer Seurat: assay and layer (default `"counts"`);
#'   SingleCellExperiment: assay (default `"counts"`).
#' @param verbose Report the gene alignment.
#' @return For a matrix, a cells x latent matrix (columns `scVI_1`, ...; with
#'   `return_variance`, attribute `"variance"`). A Seurat object gets a DimReduc
#'   (`name`, key `scVI_`), a SingleCellExperiment a `reducedDim` (`name`); the variance,
#'   when asked, is stored as `misc`/`metadata()` entry `<name>_variance`.
#' @seealso [load_scvi_model()], [align_to_reference()], [knn_transfer()]
#' @export
#' @examples
#' \dontrun{
#' model <- load_scvi_model("scvi_reference_model/")
#' seu <- scvi_latent(seu, model, batch_key = "sample")
#' seu <- knn_transfer(seu, reference, "cell_type")
#' }
scvi_latent <- function(object, model, ...) UseMethod("scvi_latent")

#' @rdname scvi_latent
#' @export
scvi_latent.default <- function(object, model, batch_key = NULL, ..., give_mean = TRUE,
                                allow_new_batches = FALSE, by = "name", min_fraction = 0.5,
                                covariates = NULL, return_variance = FALSE,
                                batch_size = 128, n_threads = NULL, verbose = FALSE,
                                BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  r <- scvi_latent_run(object, model, batch_key, NULL, NULL, give_mean, allow_new_batches,
                       by, min_fraction, covariates, batch_size, n_threads, verbose, call,
                       BPPARAM)
  out <- r$latent
  if (isTRUE(return_variance)) attr(out, "variance") <- r$variance
  out
}

#' @rdname scvi_latent
#' @export
scvi_latent.Seurat <- function(object, model, batch_key = NULL, ..., assay = NULL,
                               layer = "counts", give_mean = TRUE,
                               allow_new_batches = FALSE, by = "name", min_fraction = 0.5,
                               covariates = NULL, return_variance = FALSE, name = "scvi",
                               batch_size = 128, n_threads = NULL, verbose = FALSE,
                               BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  name <- check_string(name)
  r <- scvi_latent_run(object, model, batch_key, assay, layer, give_mean, allow_new_batches,
                       by, min_fraction, covariates, batch_size, n_threads, verbose, call,
                       BPPARAM)
  assay <- assay %||% SeuratObject::DefaultAssay(object)
  object[[name]] <- SeuratObject::CreateDimReducObject(embeddings = r$latent, key = "scVI_",
                                                       assay = assay)
  if (isTRUE(return_variance)) {
    object <- store_in_object(object, paste0(name, "_variance"), r$variance)
  }
  object
}

#' @rdname scvi_latent
#' @export
scvi_latent.SummarizedExperiment <- function(object, model, batch_key = NULL, ...,
                                             assay = "counts", give_mean = TRUE,
                                             allow_new_batches = FALSE, by = "name",
                                             min_fraction = 0.5, covariates = NULL,
                                             return_variance = FALSE, name = "X_scVI",
                                             batch_size = 128, n_threads = NULL,
                                             verbose = FALSE, BPPARAM = NULL) {
  call <- rlang::current_env()
  rlang::check_dots_empty(call = call)
  name <- check_string(name)
  if (!methods::is(object, "SingleCellExperiment")) {
    abort_scannot("scvi_latent() stores the latent in reducedDims: convert the object to a SingleCellExperiment first.",
                  "input", call = call)
  }
  r <- scvi_latent_run(object, model, batch_key, assay, NULL, give_mean, allow_new_batches,
                       by, min_fraction, covariates, batch_size, n_threads, verbose, call,
                       BPPARAM)
  SingleCellExperiment::reducedDim(object, name) <- r$latent
  if (isTRUE(return_variance)) {
    object <- store_in_object(object, paste0(name, "_variance"), r$variance)
  }
  object
}

scvi_latent_run <- function(object, model, batch_key, assay, layer, give_mean,
                            allow_new_batches, by, min_fraction, covariates, batch_size,
                            n_threads, verbose, call, BPPARAM = NULL) {
  BPPARAM <- check_bpparam(BPPARAM, call)
  check_flag(give_mean, call = call)
  check_flag(allow_new_batches, call = call)
  check_flag(verbose, call = call)
  batch_size <- check_number(batch_size, call = call)
  if (batch_size < 1 || batch_size != round(batch_size) || batch_size > .Machine$integer.max) {
    abort_scannot("`batch_size` must be a whole number >= 1.", "input", call = call)
  }
  n_threads <- scannot_threads(n_threads)
  model <- check_scvi_model(model, call)
  # the encoder needs the batch only with encode_covariates; otherwise a missing batch column
  # is no error for the latent
  enc_batch <- isTRUE(model$encode_covariates) && model$n_batch > 1L
  q <- scvi_prepare_query(object, model, batch_key, assay, layer, by, covariates,
                          min_fraction, need_batch = enc_batch, call = call, delayed = TRUE)
  if (verbose) scvi_alignment_message(q$report)
  if (length(q$new_levels)) {
    shown <- paste(utils::head(q$new_levels, 5), collapse = ", ")
    if (isTRUE(model$encoder_uses_covariates) && enc_batch) {
      abort_scannot(sprintf("The query has %d batch(es) the model was not trained on (%s). This model feeds the batch to its encoder (encode_covariates = TRUE), so their latent is undefined until the model is extended to them by query training (scArches surgery): use scvi_map_query().",
                            length(q$new_levels), shown), "batch", call = call)
    }
    if (!allow_new_batches) {
      abort_scannot(sprintf("The query has %d batch(es) the model was not trained on (%s). This model's encoder ignores the batch, so `allow_new_batches = TRUE` gives the exact latent anyway; to model the new batches (decoder, scArches surgery) use scvi_map_query().",
                            length(q$new_levels), shown), "batch", call = call)
    }
  }
  for (k in names(q$categorical)) {
    nl <- q$categorical[[k]]$new_levels
    if (length(nl) && isTRUE(model$encoder_uses_covariates)) {
      abort_scannot(sprintf("Covariate '%s' has level(s) the model was not trained on (%s); the encoder needs known levels. Map the query with scvi_map_query() first.",
                            k, paste(utils::head(nl, 5), collapse = ", ")), "batch", call = call)
    }
  }
  cats <- lapply(q$categorical, function(c) as.integer(c$codes))
  if (is.null(BPPARAM) && !inherits(q$x, "scannot_scvi_lazy")) {
    a <- matrix_args(q$x)
    r <- rs_call(rs_scvi_latent(model$handle$ptr, a$p, a$i, a$x, a$nrow, a$ncol, a$dense,
                                if (enc_batch) q$batch else integer(), unname(cats),
                                unname(q$continuous), as.integer(batch_size), n_threads),
                 call = call)
  } else {
    r <- scvi_latent_blocks(q, model, if (enc_batch) q$batch else integer(), unname(cats),
                            as.integer(batch_size), n_threads, BPPARAM, call)
  }
  if (isTRUE(r$non_integer)) warn_not_counts()
  dn <- list(q$cells, paste0("scVI_", seq_len(r$n_latent)))
  mean <- matrix(r$mean, r$n_cells, r$n_latent, dimnames = dn)
  var <- matrix(r$var, r$n_cells, r$n_latent, dimnames = dn)
  latent <- if (give_mean) mean else mean + sqrt(var) * stats::rnorm(length(mean))
  list(latent = latent, variance = var)
}

# scVI models take raw counts: warn when the data are not whole numbers.
warn_not_counts <- function() {
  rlang::warn("The data are not whole numbers: scVI models take raw counts (Seurat layer \"counts\", SingleCellExperiment assay \"counts\"); normalised data give a wrong latent.",
              class = "scannot_warning_counts")
}

check_counts <- function(x, call) {
  v <- if (methods::is(x, "dgCMatrix")) x@x else x
  if (length(v) && any(v != round(v), na.rm = TRUE)) warn_not_counts()
  invisible(x)
}
