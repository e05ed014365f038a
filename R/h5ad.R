# Native AnnData (.h5ad) reading and writing through scannot's Rust core (HDF5 via
# hdf5-metno and the system libhdf5). No Python needed.

check_h5ad_path <- function(path, call = rlang::caller_env()) {
  check_string(path, call = call)
  if (!file.exists(path)) {
    abort_scannot(sprintf("File '%s' does not exist.", path), "file", call = call)
  }
  normalizePath(path)
}

# A matrix element as R wants it: AnnData stores cells x genes; R gets genes x cells.
# CSR cells x genes is exactly CSC genes x cells, and a row-major dense cells x genes
# array is exactly a column-major genes x cells matrix: Rust allocates x / i / p once
# and HDF5 reads straight into them; nothing is copied afterwards.
h5ad_matrix <- function(path, elem, features = NULL, cells = NULL, transpose = TRUE,
                        call = rlang::caller_env()) {
  r <- rs_call(rs_h5ad_read_matrix(path, elem), call = call)
  # AnnData shape: obs x var (obsp: obs x obs, varp: var x var)
  want <- c(length(cells), length(features))
  got <- as.integer(r$shape)
  if ((!is.null(cells) && got[1] != want[1]) || (!is.null(features) && got[2] != want[2])) {
    abort_scannot(sprintf("'%s' in '%s' is %d x %d but the file has %d obs and %d var names: the file is corrupt.",
                          elem, path, got[1], got[2], length(cells), length(features)),
                  "format", call = call)
  }
  h5ad_build_matrix(r, features, cells, transpose)
}

h5ad_build_matrix <- function(r, features, cells, transpose) {
  shape <- as.integer(r$shape)
  if (r$kind == "dense") {
    m <- r$x
    dim(m) <- rev(shape)
    if (!transpose) m <- t(m)
  } else {
    m <- methods::new("dgCMatrix")
    m@Dim <- if (r$kind == "csr") rev(shape) else shape
    methods::slot(m, "i", check = FALSE) <- r$i
    methods::slot(m, "p", check = FALSE) <- r$p
    methods::slot(m, "x", check = FALSE) <- r$x
    # csr read as CSC is the transpose; csc read as CSC is the stored orientation
    if ((r$kind == "csc") == transpose) m <- Matrix::t(m)
  }
  if (!is.null(features) || !is.null(cells)) {
    dimnames(m) <- if (transpose) list(features, cells) else list(cells, features)
  }
  m
}

# Finish classed lists from the glue into R objects (data frames, sparse matrices).
h5ad_finish <- function(x) {
  if (inherits(x, "scannot_h5ad_frame")) return(h5ad_frame(x))
  if (inherits(x, "scannot_h5ad_record")) {
    return(as.data.frame(unclass(x), stringsAsFactors = FALSE, check.names = FALSE))
  }
  if (inherits(x, "scannot_h5ad_sparse")) {
    r <- list(kind = if (x$csr) "csr" else "csc", shape = x$shape, x = x$x, i = x$i, p = x$p)
    return(h5ad_build_matrix(r, NULL, NULL, transpose = FALSE))
  }
  if (is.list(x) && !is.data.frame(x)) {
    skipped <- attr(x, "skipped")
    x[] <- lapply(x, h5ad_finish)
    attr(x, "skipped") <- skipped
  }
  if (isTRUE(attr(x, "h5ad_rowmajor"))) {
    x <- aperm(x)
    attr(x, "h5ad_rowmajor") <- NULL
  }
  x
}

h5ad_frame <- function(x) {
  idx <- x$index
  if (anyDuplicated(idx)) {
    rlang::warn(sprintf("%d duplicated row names in the file were made unique (make.unique).",
                        sum(duplicated(idx))), class = "scannot_warning_h5ad")
    idx <- make.unique(idx)
  }
  cols <- lapply(x$columns, h5ad_finish)
  df <- structure(cols, class = "data.frame", row.names = idx, names = names(x$columns))
  if (!length(cols)) df <- data.frame(row.names = idx)
  df
}

h5ad_warn_skipped <- function(x, call = rlang::caller_env()) {
  sk <- unique(unlist(lapply(list(x), function(e) attr(e, "skipped"))))
  if (length(sk)) {
    rlang::warn(paste0("Some elements were not read:\n", paste0("* ", sk, collapse = "\n")),
                class = "scannot_warning_h5ad", call = call)
  }
  invisible(x)
}

h5ad_elem <- function(path, elem, call = rlang::caller_env()) {
  r <- rs_call(rs_h5ad_read_elem(path, elem), call = call)
  h5ad_warn_skipped(r, call = call)
  h5ad_finish(r)
}

#' Read an AnnData (.h5ad) file
#'
#' Reads `.h5ad` files written by Python anndata (0.7 to 0.12 layouts) natively,
#' without Python: `X` and `layers` (CSR, CSC or dense; float or integer), `obs` and
#' `var` (strings, numbers, booleans, categoricals incl. ordered ones and missing
#' codes, nullable integers/booleans/strings), `obsm`/`varm`, `obsp`/`varp`, `uns`
#' (nested lists; record arrays such as `rank_genes_groups$names` become data frames)
#' and `raw`.
#'
#' AnnData stores cells x genes; R gets genes x cells. A CSR `X` (the usual case) is
#' read straight into the `dgCMatrix` slots: each of `x`, `i` and `p` is allocated
#' once and filled by HDF5 (float32 values converted to double while reading), and the
#' dgCMatrix is built around those vectors without a copy. A dense `X` is read the
#' same way into the matrix. CSC matrices need one transpose.
#'
#' Memory: the large `x`/`i` vectors live in memory mapped outside R's heap (ordinary R
#' vectors through ALTREP; freed by the garbage collector). Released mappings are kept
#' for about 10 s (at most 1/8 of RAM, 4 GiB) and reused by the next read, so reading
#' files one after another skips the kernel's zero fill of fresh memory (the one cost
#' only the first read of a session pays; it starts on a background thread while the
#' file is checked and `obs` / `var` are read, on Linux 5.14 or later). Uncompressed matrix arrays are read by
#' several threads straight from the file, at chunk addresses read once per file
#' version from its chunk index (the version 1 B-tree that h5py and anndata write by
#' default; other chunk indexes are looked up through libhdf5). Before a file is first read
#' in a session, a short-lived child process checks its metadata, so that a corrupt or
#' truncated file is an error rather than a crash of R. Environment variables:
#' `SCANNOT_MAP_RETAIN=0` returns released mappings at once. The background zero fill
#' asks for transparent huge pages and times them: on virtual machines that hand free
#' memory back to their host a huge page can be 25 times slower to touch than 512 small
#' ones, so at the first slow one it goes on with small pages; `SCANNOT_MAP_HUGE=0` never
#' asks for them, `SCANNOT_MAP_HUGE=1` asks for them behind every large mapping without
#' timing them.
#'
#' @param path Path to the `.h5ad` file.
#' @param as `"SingleCellExperiment"` (assays `X` + layers, `colData` = obs,
#'   `rowData` = var, `reducedDims` = obsm, `colPairs` = obsp, `metadata` = uns plus
#'   `varm`, `altExp(, "raw")` = raw), `"Seurat"` (RNA assay: `counts` from layer
#'   `counts` if present, else `X`; `data` = `X`; obsm -> reductions, obsp -> graphs,
#'   uns -> `misc`), or `"list"` (every element as plain R objects).
#' @param layers Read `layers`.
#' @param raw Read `raw` (SingleCellExperiment and list only).
#' @param uns Read `uns`.
#' @param x_name Assay name for `X` in a SingleCellExperiment.
#' @return The object.
#' @seealso [write_h5ad()], [read_h5ad_obs()], [read_h5ad_obsm()]
#' @export
#' @examples
#' sce <- simulate_counts(n_cells = 50, n_genes = 60)
#' f <- tempfile(fileext = ".h5ad")
#' write_h5ad(sce, f)
#' back <- read_h5ad(f, as = "list")
#' dim(back$X)
read_h5ad <- function(path, as = c("SingleCellExperiment", "Seurat", "list"), layers = TRUE,
                      raw = TRUE, uns = TRUE, x_name = "X") {
  call <- rlang::current_env()
  as <- rlang::arg_match(as)
  path <- check_h5ad_path(path)
  check_flag(layers); check_flag(raw); check_flag(uns)
  # the kernel's zero fill of X's large vectors starts on another core while the file is
  # checked and obs and var are read (errors are left to the reads below)
  rs_h5ad_prefault(path, "X")
  keys <- rs_call(rs_h5ad_keys(path, "/"), call = call)
  obs <- if ("obs" %in% keys) h5ad_elem(path, "obs", call) else NULL
  var <- if ("var" %in% keys) h5ad_elem(path, "var", call) else NULL
  cells <- if (!is.null(obs)) rownames(obs) else NULL
  genes <- if (!is.null(var)) rownames(var) else NULL
  out <- list(X = NULL, layers = list(), obs = obs, var = var, obsm = list(), varm = list(),
              obsp = list(), varp = list(), uns = list(), raw = NULL)
  if ("X" %in% keys) out$X <- h5ad_matrix(path, "X", genes, cells, call = call)
  if (layers) {
    for (k in rs_call(rs_h5ad_keys(path, "layers"), call = call)) {
      out$layers[[k]] <- h5ad_matrix(path, paste0("layers/", k), genes, cells, call = call)
    }
  }
  for (g in c("obsp", "varp")) {
    nm <- if (g == "obsp") cells else genes
    for (k in rs_call(rs_h5ad_keys(path, g), call = call)) {
      out[[g]][[k]] <- h5ad_matrix(path, paste0(g, "/", k), nm, nm, transpose = FALSE, call = call)
    }
  }
  for (g in c("obsm", "varm")) {
    if (g %in% keys) {
      el <- h5ad_elem(path, g, call)
      nm <- if (g == "obsm") cells else genes
      out[[g]] <- lapply(el, function(m) {
        if (is.matrix(m) || methods::is(m, "Matrix")) rownames(m) <- nm
        if (is.data.frame(m)) rownames(m) <- nm
        m
      })
    }
  }
  if (uns && "uns" %in% keys) out$uns <- h5ad_elem(path, "uns", call)
  if (raw && "raw" %in% keys) {
    rkeys <- rs_call(rs_h5ad_keys(path, "raw"), call = call)
    rvar <- if ("var" %in% rkeys) h5ad_elem(path, "raw/var", call) else NULL
    out$raw <- list(
      X = if ("X" %in% rkeys) h5ad_matrix(path, "raw/X", rownames(rvar), cells, call = call),
      var = rvar,
      varm = if ("varm" %in% rkeys) h5ad_elem(path, "raw/varm", call) else list())
  }
  switch(as,
    list = out,
    SingleCellExperiment = h5ad_to_sce(out, x_name),
    Seurat = h5ad_to_seurat(out))
}

h5ad_to_sce <- function(a, x_name) {
  rlang::check_installed("SingleCellExperiment", "to return a SingleCellExperiment")
  assays <- c(if (!is.null(a$X)) stats::setNames(list(a$X), x_name), a$layers)
  # the object is built without its assays, which go in last: SingleCellExperiment's
  # constructor and setters call updateObject(), which validates every assay (a scan of
  # a large dgCMatrix each time: 0.3 s of 0.45 at seed scale)
  first <- if (length(assays)) assays[[1]] else NULL
  sce <- sce_shell(a$obs, a$var, first, c(a$uns, if (length(a$varm)) list(varm = a$varm)))
  dense_obsm <- Filter(function(m) is.matrix(m) || methods::is(m, "Matrix"), a$obsm)
  if (length(dense_obsm)) SingleCellExperiment::reducedDims(sce) <- dense_obsm
  for (k in names(a$obsp)) SingleCellExperiment::colPair(sce, k) <- strip_dimnames(a$obsp[[k]])
  for (k in names(a$varp)) SingleCellExperiment::rowPair(sce, k) <- strip_dimnames(a$varp[[k]])
  if (!is.null(a$raw) && !is.null(a$raw$X)) {
    raw <- sce_shell(NULL, a$raw$var, a$raw$X,
                     if (length(a$raw$varm)) list(varm = a$raw$varm) else list())
    SummarizedExperiment::assays(raw, withDimnames = FALSE) <- stats::setNames(list(a$raw$X), x_name)
    SingleCellExperiment::altExp(sce, "raw", withDimnames = FALSE) <- raw
  }
  if (length(assays)) SummarizedExperiment::assays(sce, withDimnames = FALSE) <- assays
  sce
}

# A SingleCellExperiment without assays: column / row data from obs / var, or (where
# absent) empty ones sized and named after the genes x cells matrix `m`.
sce_shell <- function(obs, var, m, metadata) {
  frame <- function(d, k) {
    if (!is.null(d)) return(S4Vectors::DataFrame(d, check.names = FALSE))
    f <- S4Vectors::make_zero_col_DFrame(if (is.null(m)) 0L else dim(m)[k])
    rownames(f) <- if (!is.null(m)) dimnames(m)[[k]]
    f
  }
  SingleCellExperiment::SingleCellExperiment(colData = frame(obs, 2L), rowData = frame(var, 1L),
                                             metadata = metadata)
}

strip_dimnames <- function(m) {
  m@Dimnames <- list(NULL, NULL)
  m
}

h5ad_to_seurat <- function(a) {
  rlang::check_installed("SeuratObject", "to return a Seurat object")
  if (is.null(a$X)) abort_scannot("The file has no X to build a Seurat object from.", "input")
  counts <- a$layers$counts %||% a$X
  so <- SeuratObject::CreateSeuratObject(counts = counts, meta.data = a$obs)
  # SeuratObject 4 starts `data` as `counts`: without a counts layer that is X already,
  # and SetAssayData() would reorder a full copy of it (0.9 s at seed scale)
  if (!identical(SeuratObject::GetAssayData(so, slot = "data"), a$X)) {
    so <- SeuratObject::SetAssayData(so, slot = "data", new.data = a$X)
  }
  for (k in names(a$obsm)) {
    m <- a$obsm[[k]]
    if (!is.matrix(m)) next
    nm <- sub("^X_", "", k)
    key <- paste0(gsub("[^A-Za-z0-9]", "", nm), "_")
    colnames(m) <- paste0(key, seq_len(ncol(m)))
    so[[nm]] <- SeuratObject::CreateDimReducObject(embeddings = m, key = key, assay = "RNA")
  }
  for (k in names(a$obsp)) {
    g <- SeuratObject::as.Graph(a$obsp[[k]])
    SeuratObject::DefaultAssay(g) <- "RNA"
    so[[k]] <- g
  }
  SeuratObject::Misc(so, "h5ad_uns") <- a$uns
  so
}

#' Read only the cell metadata (obs) or an embedding (obsm) of an h5ad file
#'
#' Partial reads: nothing else in the file is touched, so reading a large reference's
#' embedding for kNN label transfer is fast.
#'
#' @inheritParams read_h5ad
#' @param key Name of the `obsm` element (e.g. `"X_pca"`, `"X_scvi"`).
#' @return `read_h5ad_obs()`: a data frame (cells in rows). `read_h5ad_var()`: a data
#'   frame (genes in rows). `read_h5ad_obsm()`: a cells x dimensions matrix with cell
#'   names.
#' @export
#' @examples
#' sce <- simulate_counts(n_cells = 50, n_genes = 60)
#' SingleCellExperiment::reducedDim(sce, "PCA") <- matrix(rnorm(100), 50, 2)
#' f <- tempfile(fileext = ".h5ad")
#' write_h5ad(sce, f)
#' head(read_h5ad_obs(f))
#' dim(read_h5ad_obsm(f, "PCA"))
read_h5ad_obs <- function(path) {
  call <- rlang::current_env()
  h5ad_elem(check_h5ad_path(path), "obs", call)
}

#' @rdname read_h5ad_obs
#' @export
read_h5ad_var <- function(path) {
  call <- rlang::current_env()
  h5ad_elem(check_h5ad_path(path), "var", call)
}

#' @rdname read_h5ad_obs
#' @export
read_h5ad_obsm <- function(path, key) {
  call <- rlang::current_env()
  path <- check_h5ad_path(path)
  check_string(key)
  have <- rs_call(rs_h5ad_keys(path, "obsm"), call = call)
  if (!key %in% have) {
    abort_scannot(sprintf("obsm has no '%s'; it has: %s.", key,
                          if (length(have)) paste(have, collapse = ", ") else "nothing"),
                  "input", call = call)
  }
  m <- h5ad_elem(path, paste0("obsm/", key), call)
  idx <- if (rs_call(rs_h5ad_exists(path, "obs/_index"), call = call)) {
    rs_call(rs_h5ad_read_elem(path, "obs/_index"), call = call)
  }
  if ((is.matrix(m) || methods::is(m, "Matrix")) && length(idx) == nrow(m)) rownames(m) <- idx
  m
}

# ---------------------------------------------------------------------------- write

h5ad_frame_spec <- function(df, what, call) {
  df <- as.data.frame(df, optional = TRUE, stringsAsFactors = FALSE)
  cols <- list()
  for (nm in names(df)) {
    v <- df[[nm]]
    if (inherits(v, c("Date", "POSIXt"))) v <- as.character(v)
    if (is.character(v) && anyNA(v)) {
      # as anndata does: strings with missing values become a categorical (NA = code -1)
      v <- factor(v, levels = sort(unique(v[!is.na(v)])))
    }
    if (!(is.atomic(v) || is.factor(v)) || !is.null(dim(v))) {
      rlang::warn(sprintf("%s column '%s' (%s) cannot be stored in an h5ad data frame and was left out.",
                          what, nm, class(v)[1]), class = "scannot_warning_h5ad")
      next
    }
    if (is.factor(v) && anyNA(levels(v))) {
      abort_scannot(sprintf("%s column '%s' has NA as a factor level; use NA values instead.", what, nm),
                    "value", call = call)
    }
    cols[[nm]] <- v
  }
  rn <- rownames(df)
  if (is.null(rn) || anyNA(rn)) {
    abort_scannot(sprintf("%s needs row names without NA.", what), "value", call = call)
  }
  structure(list(index = as.character(rn), columns = cols), class = "scannot_h5ad_frame")
}

h5ad_uns_spec <- function(x, where = "uns") {
  if (is.data.frame(x)) return(h5ad_frame_spec(x, where, rlang::caller_env()))
  if (methods::is(x, "DataFrame")) return(h5ad_frame_spec(as.data.frame(x), where, rlang::caller_env()))
  if (is.list(x)) {
    if (length(x) && (is.null(names(x)) || any(!nzchar(names(x))))) {
      names(x) <- ifelse(nzchar(names(x) %||% rep("", length(x))), names(x), seq_along(x) - 1L)
    }
    keep <- !vapply(x, is.null, logical(1))
    out <- Map(function(v, k) h5ad_uns_spec(v, paste0(where, "/", k)), x[keep], names(x)[keep])
    return(Filter(Negate(is.null), out))
  }
  if (is.atomic(x) || is.factor(x)) {
    if (is.array(x) && length(dim(x)) > 2) {
      rlang::warn(sprintf("'%s': arrays of > 2 dimensions are not written.", where),
                  class = "scannot_warning_h5ad")
      return(NULL)
    }
    if (!is.matrix(x)) x <- as.vector(x, mode = if (is.factor(x)) "any" else typeof(x))
    return(x)
  }
  rlang::warn(sprintf("'%s' (class %s) cannot be stored in h5ad and was left out.", where,
                      class(x)[1]), class = "scannot_warning_h5ad")
  NULL
}

h5ad_matrix_spec <- function(m, f32, call) {
  m <- as_expr_matrix(m, call = call)
  if (methods::is(m, "dgCMatrix")) {
    # genes x cells CSC == cells x genes CSR: the slots are written as they are
    structure(list(type = "sparse", csr = TRUE, shape = rev(dim(m)), x = m@x, i = m@i, p = m@p, f32 = f32), class = "scannot_h5ad_matrix")
  } else {
    structure(list(type = "dense", shape = rev(dim(m)), x = as.double(m), f32 = f32), class = "scannot_h5ad_matrix")
  }
}

h5ad_pair_spec <- function(m, call) {
  m <- as_expr_matrix(m, call = call)
  if (methods::is(m, "dgCMatrix")) {
    structure(list(type = "sparse", csr = FALSE, shape = dim(m), x = m@x, i = m@i, p = m@p, f32 = FALSE), class = "scannot_h5ad_matrix")
  } else {
    m
  }
}

#' Write an AnnData (.h5ad) file
#'
#' Writes a SingleCellExperiment, a Seurat object or a genes x cells matrix with
#' anndata's encodings (anndata >= 0.8), readable by Python `anndata.read_h5ad()`.
#' The file is written to a temporary file in the same directory and renamed into
#' place, so an interrupted write never leaves a half-written file under `path`.
#'
#' Strings are never written as NaN: a character column with missing values is stored
#' as a categorical with missing code -1 (what anndata itself does), missing strings in
#' `uns` as a nullable string array. Factors become categoricals (ordered factors stay
#' ordered); integer / logical columns with NA become nullable integer / boolean.
#'
#' @param object A SingleCellExperiment, a Seurat object, or a genes x cells
#'   `dgCMatrix` / numeric matrix.
#' @param path Destination `.h5ad` file.
#' @param x_name SingleCellExperiment: the assay written as `X` (default: `"X"` if
#'   present, else `"logcounts"`, else the first); the other assays become `layers`.
#'   Seurat: the layer written as `X` (default `"data"`; `counts` becomes a layer).
#' @param float32 Store matrix values as float32 (halves the file; anndata's usual
#'   type for X).
#' @param overwrite Replace an existing file.
#' @param ... Unused.
#' @return `path`, invisibly.
#' @export
#' @examples
#' sce <- simulate_counts(n_cells = 50, n_genes = 60)
#' f <- tempfile(fileext = ".h5ad")
#' write_h5ad(sce, f)
#' read_h5ad_obs(f)[1:3, ]
write_h5ad <- function(object, path, x_name = NULL, float32 = FALSE, overwrite = TRUE, ...) {
  call <- rlang::current_env()
  check_string(path)
  check_flag(float32); check_flag(overwrite)
  if (file.exists(path) && !overwrite) {
    abort_scannot(sprintf("'%s' exists; set `overwrite = TRUE` to replace it.", path), "file", call = call)
  }
  dir <- dirname(path)
  if (!dir.exists(dir)) abort_scannot(sprintf("Directory '%s' does not exist.", dir), "file", call = call)
  items <- if (is_seurat(object)) h5ad_items_seurat(object, x_name, float32, call)
           else if (is_se(object)) h5ad_items_sce(object, x_name, float32, call)
           else h5ad_items_matrix(object, float32, call)
  tmp <- tempfile(pattern = paste0(".", basename(path), "-"), tmpdir = dir, fileext = ".tmp")
  on.exit(unlink(tmp), add = TRUE)
  rs_call(rs_h5ad_write(tmp, items), call = call)
  if (!file.rename(tmp, path)) {
    abort_scannot(sprintf("Could not move the written file into place at '%s'.", path), "file", call = call)
  }
  invisible(path)
}

h5ad_base_items <- function(X, layers, obs, var, obsm, varm, obsp, uns, float32, call) {
  items <- list()
  items[["X"]] <- h5ad_matrix_spec(X, float32, call)
  items[["layers"]] <- list()
  for (k in names(layers)) items[[paste0("layers/", k)]] <- h5ad_matrix_spec(layers[[k]], float32, call)
  items[["obs"]] <- h5ad_frame_spec(obs, "obs", call)
  items[["var"]] <- h5ad_frame_spec(var, "var", call)
  items[["obsm"]] <- list()
  for (k in names(obsm)) items[[paste0("obsm/", k)]] <- unname_matrix(obsm[[k]])
  items[["varm"]] <- list()
  for (k in names(varm)) items[[paste0("varm/", k)]] <- unname_matrix(varm[[k]])
  items[["obsp"]] <- list()
  for (k in names(obsp)) items[[paste0("obsp/", k)]] <- h5ad_pair_spec(obsp[[k]], call)
  items[["varp"]] <- list()
  items[["uns"]] <- h5ad_uns_spec(uns %||% list())
  items
}

unname_matrix <- function(m) {
  if (methods::is(m, "sparseMatrix")) return(h5ad_pair_spec(m, rlang::caller_env()))
  m <- as.matrix(m)
  dimnames(m) <- NULL
  if (is.integer(m) || is.logical(m)) m else `storage.mode<-`(m, "double")
}

h5ad_items_matrix <- function(m, float32, call) {
  m <- as_expr_matrix(m, call = call)
  cells <- colnames(m) %||% as.character(seq_len(ncol(m)) - 1L)
  genes <- rownames(m) %||% as.character(seq_len(nrow(m)) - 1L)
  h5ad_base_items(m, list(), data.frame(row.names = cells), data.frame(row.names = genes),
                  list(), list(), list(), list(), float32, call)
}

h5ad_items_sce <- function(sce, x_name, float32, call) {
  rlang::check_installed("SingleCellExperiment", "to write a SingleCellExperiment")
  an <- SummarizedExperiment::assayNames(sce)
  if (!length(an)) abort_scannot("The object has no assays to write as X.", "layer", call = call)
  x_name <- x_name %||% (if ("X" %in% an) "X" else if ("logcounts" %in% an) "logcounts" else an[1])
  if (!x_name %in% an) {
    abort_scannot(sprintf("Assay '%s' is not in this object; it has: %s.", x_name, paste(an, collapse = ", ")),
                  "layer", call = call)
  }
  get <- function(k) SummarizedExperiment::assay(sce, k, withDimnames = TRUE)
  cells <- colnames(sce) %||% as.character(seq_len(ncol(sce)) - 1L)
  genes <- rownames(sce) %||% as.character(seq_len(nrow(sce)) - 1L)
  obs <- as.data.frame(SummarizedExperiment::colData(sce), optional = TRUE)
  rownames(obs) <- cells
  var <- as.data.frame(SummarizedExperiment::rowData(sce), optional = TRUE)
  rownames(var) <- genes
  md <- S4Vectors::metadata(sce)
  varm <- md$varm; md$varm <- NULL
  # SingleCellExperiment's accessors below call updateObject(), which validates every
  # assay (0.1 s a call for a seed-scale dgCMatrix): they run on a copy without assays
  shell <- sce
  SummarizedExperiment::assays(shell, withDimnames = FALSE) <- list()
  obsp <- list()
  for (k in SingleCellExperiment::colPairNames(shell)) {
    obsp[[k]] <- SingleCellExperiment::colPair(shell, k, asSparse = TRUE)
  }
  items <- h5ad_base_items(get(x_name), stats::setNames(lapply(setdiff(an, x_name), get), setdiff(an, x_name)),
                           obs, var, as.list(SingleCellExperiment::reducedDims(shell)), varm, obsp, md,
                           float32, call)
  if ("raw" %in% SingleCellExperiment::altExpNames(shell)) {
    raw <- SingleCellExperiment::altExp(shell, "raw")
    ran <- SummarizedExperiment::assayNames(raw)
    rk <- if (x_name %in% ran) x_name else ran[1]
    rvar <- as.data.frame(SummarizedExperiment::rowData(raw), optional = TRUE)
    rownames(rvar) <- rownames(raw)
    items[["raw/X"]] <- h5ad_matrix_spec(SummarizedExperiment::assay(raw, rk), float32, call)
    items[["raw/var"]] <- h5ad_frame_spec(rvar, "raw var", call)
  }
  items
}

h5ad_items_seurat <- function(so, x_name, float32, call) {
  rlang::check_installed("SeuratObject", "to write a Seurat object")
  x_name <- x_name %||% "data"
  X <- get_expression(so, layer = x_name)$matrix
  layers <- list()
  if (x_name != "counts") {
    cnt <- tryCatch(get_expression(so, layer = "counts")$matrix, error = function(e) NULL)
    if (!is.null(cnt) && identical(dim(cnt), dim(X))) layers$counts <- cnt
  }
  obs <- so[[]]
  assay <- SeuratObject::DefaultAssay(so)
  var <- tryCatch(as.data.frame(so[[assay]][[]]), error = function(e) NULL)
  if (is.null(var) || nrow(var) != nrow(X)) var <- data.frame(row.names = rownames(X))
  rownames(var) <- rownames(X)
  obsm <- list()
  for (r in SeuratObject::Reductions(so)) {
    obsm[[paste0("X_", r)]] <- SeuratObject::Embeddings(so, r)[colnames(X), , drop = FALSE]
  }
  obsp <- list()
  for (g in SeuratObject::Graphs(so)) obsp[[g]] <- methods::as(so[[g]], "dgCMatrix")
  uns <- SeuratObject::Misc(so)
  if (!is.null(uns$h5ad_uns)) uns <- c(uns[names(uns) != "h5ad_uns"], uns$h5ad_uns)
  h5ad_base_items(X, layers, obs, var, obsm, list(), obsp, uns, float32, call)
}
