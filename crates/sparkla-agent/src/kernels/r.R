# Sparkla's R kernel. Started by sparkla-agent as `Rscript --vanilla -e <this script>`.
# Requests on fd 3, one per line: "<mode> <cell> <code as hex>" (base R cannot read JSON);
# messages on fd 4, one JSON object per line, as for the other kernels (see python.py).
# Printed output goes to stdout and stderr, which the agent captures.
local({
  requests <- file("/dev/fd/3", open = "r", raw = TRUE)
  messages <- file("/dev/fd/4", open = "w", raw = TRUE)
  send <- function(json) {
    cat(json, "\n", file = messages, sep = "")
    flush(messages)
  }
  esc <- function(s) {
    s <- enc2utf8(as.character(s))
    s <- gsub("\\", "\\\\", s, fixed = TRUE)
    s <- gsub("\"", "\\\"", s, fixed = TRUE)
    s <- gsub("\n", "\\n", s, fixed = TRUE)
    s <- gsub("\r", "\\r", s, fixed = TRUE)
    s <- gsub("\t", "\\t", s, fixed = TRUE)
    s <- gsub("[[:cntrl:]]", "", s)
    paste0("\"", s, "\"")
  }
  scalar <- function(x) {
    if (is.na(x)) return("null")
    if (is.logical(x)) return(if (x) "true" else "false")
    if (is.numeric(x)) {
      if (!is.finite(x)) return(esc(as.character(x)))
      return(as.character(x))
    }
    esc(as.character(x))
  }
  to_json <- function(x, depth = 0) {
    if (is.null(x)) return("null")
    if (depth > 50) return(esc(paste(capture.output(print(x)), collapse = "\n")))
    if (is.data.frame(x)) {
      cols <- vapply(names(x), function(n) {
        values <- vapply(as.list(x[[n]]), function(v) scalar(if (is.factor(v)) as.character(v) else v), "")
        paste0("{\"type\":\"DatatableColumn\",\"name\":", esc(n), ",\"values\":[", paste(values, collapse = ","), "]}")
      }, "")
      return(paste0("{\"type\":\"Datatable\",\"columns\":[", paste(cols, collapse = ","), "]}"))
    }
    if (is.atomic(x) && !is.factor(x) && is.null(attributes(x))) {
      if (length(x) == 1) return(scalar(x))
      return(paste0("[", paste(vapply(as.list(x), scalar, ""), collapse = ","), "]"))
    }
    if (is.list(x) && is.null(attr(x, "class"))) {
      items <- vapply(x, to_json, "", depth = depth + 1)
      n <- names(x)
      if (!is.null(n) && all(n != "")) {
        return(paste0("{", paste(esc(n), items, sep = ":", collapse = ","), "}"))
      }
      return(paste0("[", paste(items, collapse = ","), "]"))
    }
    esc(paste(capture.output(print(x)), collapse = "\n"))
  }
  unhex <- function(h) {
    if (nchar(h) == 0) return("")
    bytes <- as.raw(strtoi(substring(h, seq(1, nchar(h), 2), seq(2, nchar(h), 2)), 16L))
    s <- rawToChar(bytes)
    Encoding(s) <- "UTF-8"
    s
  }
  code_error <- function(type, message, trace = "", cancelled = FALSE) {
    send(paste0("{\"t\":\"err\",\"cancelled\":", if (cancelled) "true" else "false",
                ",\"e\":{\"type\":\"CodeError\",\"errorType\":", esc(type),
                ",\"errorMessage\":", esc(message), ",\"stackTrace\":", esc(trace), "}}"))
  }
  run <- function(mode, code) {
    exprs <- tryCatch(parse(text = code, keep.source = FALSE), error = function(e) e)
    if (inherits(exprs, "error")) {
      code_error("SyntaxError", conditionMessage(exprs))
      return(invisible())
    }
    for (e in exprs) {
      result <- withCallingHandlers(
        tryCatch(withVisible(eval(e, envir = globalenv())),
                 error = function(err) err,
                 interrupt = function(i) structure(list(), class = "sparkla_interrupt")),
        warning = function(w) {
          message("Warning: ", conditionMessage(w))
          invokeRestart("muffleWarning")
        })
      if (inherits(result, "sparkla_interrupt")) {
        code_error("Interrupt", "interrupted", cancelled = TRUE)
        return(invisible())
      }
      if (inherits(result, "error")) {
        call <- conditionCall(result)
        at_top <- is.null(call) || identical(call[[1]], quote(eval))
        trace <- paste0("Error", if (at_top) "" else paste0(" in ", paste(deparse(call), collapse = "\n")),
                        ": ", conditionMessage(result))
        code_error(class(result)[1], conditionMessage(result), trace)
        return(invisible())
      }
      if (mode == "expression" || result$visible) {
        send(paste0("{\"t\":\"val\",\"v\":", to_json(result$value), "}"))
      }
    }
  }
  send("{\"t\":\"ready\"}")
  repeat {
    line <- tryCatch(readLines(requests, n = 1, warn = FALSE), interrupt = function(i) NA)
    if (length(line) == 0) break
    if (is.na(line[1])) next
    parts <- strsplit(line, " ", fixed = TRUE)[[1]]
    code <- if (length(parts) >= 3) unhex(parts[3]) else ""
    tryCatch(run(parts[1], code), interrupt = function(i) code_error("Interrupt", "interrupted", cancelled = TRUE))
    tryCatch(send("{\"t\":\"done\"}"), interrupt = function(i) send("{\"t\":\"done\"}"))
  }
})
