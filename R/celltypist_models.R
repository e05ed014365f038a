# CellTypist's model registry: the index of published models, and cached downloads.

celltypist_index_url <- "https://celltypist.cog.sanger.ac.uk/models/models.json"

#' List the published CellTypist models
#'
#' Reads CellTypist's model index (the `models.json` that `celltypist.models.
#' models_description()` reads).
#'
#' @param url Address (or local path) of the index; the default can be changed with
#'   `options(scannot.celltypist_index = ...)`.
#' @return A data frame with one row per model: `name` (the file name, e.g.
#'   `"Immune_All_Low.pkl"`), `url`, `version`, `date`, `n_cell_types`, `details`,
#'   `source`, `default` and, when the index gives it, `md5`.
#' @seealso [download_celltypist_model()]
#' @export
#' @examples
#' \dontrun{
#' celltypist_models()
#' }
celltypist_models <- function(url = getOption("scannot.celltypist_index", celltypist_index_url)) {
  call <- rlang::current_env()
  url <- check_string(url, call = call)
  rlang::check_installed("jsonlite", "to read CellTypist's model index")
  txt <- tryCatch({
    if (file.exists(url)) readLines(url, warn = FALSE, encoding = "UTF-8") else {
      con <- url(url, encoding = "UTF-8")
      on.exit(close(con), add = TRUE)
      readLines(con, warn = FALSE)
    }
  }, error = function(e) {
    abort_scannot(sprintf("Cannot read the CellTypist model index at '%s': %s", url,
                          conditionMessage(e)), "download", call = call)
  })
  idx <- tryCatch(jsonlite::fromJSON(paste(txt, collapse = "\n"), simplifyVector = FALSE),
                  error = function(e) NULL)
  models <- if (is.list(idx)) idx$models
  if (!is.list(models) || !length(models)) {
    abort_scannot(sprintf("'%s' is not a CellTypist model index (a JSON object with a 'models' list).",
                          url), "download", call = call)
  }
  field <- function(m, k, default = NA) {
    v <- m[[k]]
    if (is.null(v) || length(v) != 1L) default else v
  }
  out <- data.frame(
    name = vapply(models, function(m) as.character(field(m, "filename")), character(1)),
    url = vapply(models, function(m) as.character(field(m, "url")), character(1)),
    version = vapply(models, function(m) as.character(field(m, "version")), character(1)),
    date = vapply(models, function(m) as.character(field(m, "date")), character(1)),
    n_cell_types = vapply(models, function(m) as.integer(field(m, "No_celltypes", NA_integer_)), integer(1)),
    details = vapply(models, function(m) as.character(field(m, "details")), character(1)),
    source = vapply(models, function(m) as.character(field(m, "source")), character(1)),
    default = vapply(models, function(m) isTRUE(field(m, "default", FALSE)), logical(1)),
    stringsAsFactors = FALSE
  )
  md5 <- vapply(models, function(m) as.character(field(m, "md5")), character(1))
  if (any(!is.na(md5))) out$md5 <- md5
  bad <- is.na(out$name) | is.na(out$url)
  if (any(bad)) {
    abort_scannot("The CellTypist model index has entries without 'filename' or 'url'.",
                  "download", call = call)
  }
  out
}

#' Download a CellTypist model
#'
#' Downloads a published CellTypist model into a cache folder (once) and returns its
#' path, ready for [load_celltypist_model()] or [annotate_celltypist()]. The download goes
#' to a temporary file that is checked (its md5 sum when the index gives one, and that it
#' reads as a CellTypist model) before it is renamed into place, so the cache never holds
#' a partial or corrupt file.
#'
#' @param name Model file name as in [celltypist_models()] (`"Immune_All_Low.pkl"`; the
#'   `.pkl` may be left out).
#' @param dir Cache folder (created when missing).
#' @param index The model index, from [celltypist_models()].
#' @param force Download again even when the file is cached.
#' @param quiet Hide the download progress.
#' @return The path of the model file.
#' @seealso [celltypist_models()], [load_celltypist_model()]
#' @export
#' @examples
#' \dontrun{
#' path <- download_celltypist_model("Immune_All_Low.pkl")
#' model <- load_celltypist_model(path)
#' }
download_celltypist_model <- function(name, dir = tools::R_user_dir("scannot", "cache"),
                                      index = celltypist_models(), force = FALSE,
                                      quiet = TRUE) {
  call <- rlang::current_env()
  name <- check_string(name, call = call)
  dir <- check_string(dir, call = call)
  force <- check_flag(force, call = call)
  if (!grepl("\\.pkl$", name)) name <- paste0(name, ".pkl")
  if (!is.data.frame(index) || !all(c("name", "url") %in% names(index))) {
    abort_scannot("`index` must be a data frame from celltypist_models().", "input", call = call)
  }
  row <- match(name, index$name)
  if (is.na(row)) {
    abort_scannot(sprintf("'%s' is not in the CellTypist model index; see celltypist_models()$name (e.g. %s).",
                          name, paste(utils::head(index$name, 3), collapse = ", ")),
                  "input", call = call)
  }
  dir.create(dir, recursive = TRUE, showWarnings = FALSE)
  if (!dir.exists(dir)) {
    abort_scannot(sprintf("Cannot create the cache folder '%s'.", dir), "download", call = call)
  }
  dest <- file.path(dir, basename(name))
  md5 <- if ("md5" %in% names(index)) index$md5[row] else NA_character_
  if (file.exists(dest) && !force) return(dest)
  tmp <- tempfile(paste0(".", basename(name), "-"), tmpdir = dir)
  on.exit(unlink(tmp), add = TRUE)
  status <- tryCatch(suppressWarnings(utils::download.file(index$url[row], tmp, mode = "wb",
                                                           quiet = isTRUE(quiet))),
                     error = function(e) conditionMessage(e))
  if (!identical(status, 0L) || !file.exists(tmp)) {
    abort_scannot(sprintf("Downloading '%s' from %s failed%s.", name, index$url[row],
                          if (is.character(status)) paste0(": ", status) else ""),
                  "download", call = call)
  }
  if (!is.na(md5) && nzchar(md5) && !identical(unname(tools::md5sum(tmp)), tolower(md5))) {
    abort_scannot(sprintf("The download of '%s' is corrupt (md5 %s, expected %s).", name,
                          unname(tools::md5sum(tmp)), md5), "download", call = call)
  }
  ok <- tryCatch({ load_celltypist_model(tmp); TRUE }, error = function(e) conditionMessage(e))
  if (!isTRUE(ok)) {
    abort_scannot(sprintf("The download of '%s' is not a readable CellTypist model: %s", name, ok),
                  "download", call = call)
  }
  if (!file.rename(tmp, dest)) {
    abort_scannot(sprintf("Cannot move the download into '%s'.", dest), "download", call = call)
  }
  dest
}
