# The model registry against a local HTTP server on 127.0.0.1 (python3 -m http.server,
# launched with processx); skipped when processx, python3 or jsonlite is missing.
ping <- function(u) {
  con <- url(u)
  on.exit(close(con))
  readLines(con, warn = FALSE)
  TRUE
}

# Start python3's HTTP server on a free port serving `dir`; list(url, process) or NULL.
start_model_server <- function(dir) {
  py <- Sys.which("python3")
  if (!nzchar(py)) return(NULL)
  writeLines("{}", file.path(dir, "ping.json"))
  for (attempt in 1:5) {
    port <- sample(20000:40000, 1)
    p <- processx::process$new(py, c("-m", "http.server", port, "--bind", "127.0.0.1",
                                     "--directory", dir), stdout = NULL, stderr = NULL)
    url <- sprintf("http://127.0.0.1:%d", port)
    for (i in 1:50) {
      ok <- tryCatch(ping(paste0(url, "/ping.json")), error = function(e) FALSE,
                     warning = function(w) FALSE)
      if (ok || !p$is_alive()) break
      Sys.sleep(0.1)
    }
    if (ok) return(list(url = url, process = p))
    p$kill()
  }
  NULL
}

test_that("celltypist_models reads the index and downloads are verified and cached", {
  srv <- tempfile("scannot-models-srv-")
  dir.create(srv)
  on.exit(unlink(srv, recursive = TRUE), add = TRUE)
  lr <- test_path("fixtures", "celltypist", "lr.pkl")
  file.copy(lr, file.path(srv, "Good.pkl"))
  file.copy(lr, file.path(srv, "BadMd5.pkl"))
  writeBin(as.raw(1:100), file.path(srv, "Junk.pkl"))
  md5 <- unname(tools::md5sum(lr))
  json <- sprintf('{"models": [
    {"filename": "Good.pkl", "url": "URL/Good.pkl", "version": "v1", "date": "2026-01-01",
     "details": "a good model", "No_celltypes": 5, "source": "s", "default": true, "md5": "%s"},
    {"filename": "BadMd5.pkl", "url": "URL/BadMd5.pkl", "version": "v1", "date": "2026-01-01",
     "details": "wrong checksum", "No_celltypes": 5, "source": "s", "md5": "00000000000000000000000000000000"},
    {"filename": "Junk.pkl", "url": "URL/Junk.pkl", "details": "not a model", "No_celltypes": 2},
    {"filename": "Missing.pkl", "url": "URL/Missing.pkl", "No_celltypes": 2}
  ]}', md5)
  skip_if_not_installed("processx")
  skip_if_not_installed("jsonlite")
  server <- start_model_server(srv)
  skip_if(is.null(server), "no local HTTP server (python3 -m http.server) could be started")
  on.exit(server$process$kill(), add = TRUE)
  url <- server$url
  writeLines(gsub("URL", url, json), file.path(srv, "models.json"))
  old <- options(scannot.celltypist_index = paste0(url, "/models.json"))
  on.exit(options(old), add = TRUE)
  idx <- celltypist_models()
  expect_identical(idx$name, c("Good.pkl", "BadMd5.pkl", "Junk.pkl", "Missing.pkl"))
  expect_identical(idx$n_cell_types, c(5L, 5L, 2L, 2L))
  expect_identical(idx$default, c(TRUE, FALSE, FALSE, FALSE))
  expect_identical(idx$md5[1], md5)

  cache <- tempfile("scannot-models-cache-")
  on.exit(unlink(cache, recursive = TRUE), add = TRUE)
  f <- download_celltypist_model("Good", dir = cache, index = idx)
  expect_identical(f, file.path(cache, "Good.pkl"))
  expect_identical(unname(tools::md5sum(f)), md5)
  expect_identical(load_celltypist_model(f)$coef, load_celltypist_model(lr)$coef)
  # cached: no second download (the server copy can go away)
  unlink(file.path(srv, "Good.pkl"))
  expect_identical(download_celltypist_model("Good.pkl", dir = cache, index = idx), f)
  expect_error(download_celltypist_model("Good.pkl", dir = cache, index = idx, force = TRUE),
               class = "scannot_error_download")
  expect_true(file.exists(f))
  # verification failures leave nothing in the cache
  expect_error(download_celltypist_model("BadMd5.pkl", dir = cache, index = idx),
               class = "scannot_error_download")
  expect_error(download_celltypist_model("Junk.pkl", dir = cache, index = idx),
               class = "scannot_error_download")
  expect_error(download_celltypist_model("Missing.pkl", dir = cache, index = idx),
               class = "scannot_error_download")
  expect_error(download_celltypist_model("Nope.pkl", dir = cache, index = idx),
               class = "scannot_error_input")
  expect_identical(list.files(cache, all.files = TRUE, no.. = TRUE), "Good.pkl")
  # a malformed index
  writeLines('{"no": 1}', file.path(srv, "bad.json"))
  expect_error(celltypist_models(paste0(url, "/bad.json")), class = "scannot_error_download")
})
