# Collects the RATIO lines (and the "skipped" notes) of a bench/run log into one table:
#   Rscript bench/collect.R LOG "machine description" bench/results.md
# RATIO lines come in two shapes:
#   RATIO <task>: <peer> <t_peer> s / scannot <t_ours> s = <r>x      (per-benchmark scripts)
#   RATIO <task> vs <peer>: <t_peer> s / <t_ours> s = <r>x          (bench/common.R)
#   RATIO <task> vs <peer>: peer not run
args <- commandArgs(trailingOnly = TRUE)
lines <- readLines(args[1], warn = FALSE)
machine <- if (length(args) >= 2) args[2] else ""
out <- if (length(args) >= 3) args[3] else "bench/results.md"
bench <- NA_character_
rows <- list()
notes <- character()
num <- "([0-9.eE+-]+)"
for (l in lines) {
  if (grepl("^== bench/", l)) bench <- sub("^== bench/(.*)\\.R$", "\\1", l)
  if (grepl("skipped|failed$", l) && !grepl("^RATIO", l)) notes <- c(notes, sprintf("%s: %s", bench, trimws(l)))
  if (!grepl("^RATIO ", l)) next
  body <- sub("^RATIO ", "", l)
  head <- sub(":.*$", "", body)
  rest <- trimws(sub("^[^:]*:", "", body))
  task <- head; peer <- ""
  if (grepl(" vs ", head)) {
    task <- sub(" vs .*$", "", head); peer <- sub("^.* vs ", "", head)
  }
  if (grepl("peer not run", rest)) {
    rows[[length(rows) + 1]] <- data.frame(benchmark = bench, task = task, peer = peer,
      scannot_s = NA, peer_s = NA, ratio = NA, note = "peer not run")
    next
  }
  m <- regmatches(rest, regexec(paste0("^(.*?)\\s*", num, " s / (scannot )?", num, " s = ", num, "x"), rest, perl = TRUE))[[1]]
  if (length(m)) {
    if (!nzchar(peer)) peer <- trimws(m[2])
    rows[[length(rows) + 1]] <- data.frame(benchmark = bench, task = task, peer = peer,
      scannot_s = as.numeric(m[5]), peer_s = as.numeric(m[3]), ratio = as.numeric(m[6]), note = "")
  } else {
    r <- if (grepl(paste0("^", num, "x$"), rest)) as.numeric(sub("x$", "", rest)) else NA
    rows[[length(rows) + 1]] <- data.frame(benchmark = bench, task = task, peer = peer,
      scannot_s = NA, peer_s = NA, ratio = r, note = if (is.na(r)) rest else "")
  }
}
tab <- if (length(rows)) do.call(rbind, rows) else
  data.frame(benchmark = character(), task = character(), peer = character(),
             scannot_s = numeric(), peer_s = numeric(), ratio = numeric(), note = character())
fmt <- function(x, d) ifelse(is.na(x), "", sub("\\.$", "", formatC(x, digits = d, format = "fg", flag = "#")))
md <- c(sprintf("# scannot benchmarks (%s)", format(Sys.time(), "%Y-%m-%d %H:%M %Z")), "",
        sprintf("Machine: %s; threads: %s. Ratio = peer time / scannot time (> 1: scannot faster).",
                machine, Sys.getenv("SCANNOT_BENCH_THREADS", "2")), "",
        "| benchmark | task | peer | scannot (s) | peer (s) | ratio | note |",
        "|---|---|---|---|---|---|---|",
        sprintf("| %s | %s | %s | %s | %s | %s | %s |", tab$benchmark, tab$task, tab$peer,
                fmt(tab$scannot_s, 3), fmt(tab$peer_s, 3),
                ifelse(is.na(tab$ratio), "", paste0(fmt(tab$ratio, 3), "x")), tab$note))
if (length(notes)) md <- c(md, "", "Skipped or failed:", "", paste0("- ", unique(notes)))
writeLines(md, out)
cat("\n", paste(md, collapse = "\n"), "\n", sep = "")
