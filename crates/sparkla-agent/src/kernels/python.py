# Sparkla's Python kernel. Started by sparkla-agent as `python3 -c <this script>`.
#
# Protocol with the agent:
#   fd 3 (in):  one request per line: "<mode> <cell> <code as hex>", mode chunk | expression
#   fd 4 (out): one JSON object per line: {"t":"ready"} once, then per request any number of
#               {"t":"out","s":"stdout"|"stderr","x":text}   (print, sys.stdout/err writes)
#               {"t":"val","v":node}                        (values, figures)
#               {"t":"err","e":CodeError}
#               and finally {"t":"done"}.
# Output written to file descriptors 1 and 2 directly (subprocesses, C code) reaches the
# agent through the process's stdout/stderr pipes instead.
#
# Start-up cost matters (a cold session waits for it), so the kernel imports only builtin C
# modules (_ast, _json, _signal, math) beyond what the interpreter has loaded anyway; json,
# traceback and linecache (which pull in re, enum, tokenize, ...) are imported on demand.
import _ast
import io
import math
import os
import sys
from _json import encode_basestring as _quote
import _signal

_out_fd = 4
os.set_inheritable(3, False)
os.set_inheritable(4, False)
_ctrl = os.fdopen(3, "rb")
_running = False
_in_send = False
_pending_interrupt = False
G = {"__name__": "__main__", "__builtins__": __builtins__}


def _dumps(o):
    """JSON for what _to_node returns (and the kernel's own messages)."""
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, str):
        return _quote(o)
    if isinstance(o, int):
        return int.__repr__(o)
    if isinstance(o, float):
        return float.__repr__(o) if math.isfinite(o) else "null"
    if isinstance(o, (list, tuple)):
        return "[" + ",".join(map(_dumps, o)) + "]"
    if isinstance(o, dict):
        return "{" + ",".join(_quote(str(k)) + ":" + _dumps(v) for k, v in o.items()) + "}"
    return _quote(repr(o))


def _send(msg):
    global _in_send, _pending_interrupt
    data = (_dumps(msg) + "\n").encode("utf-8", "replace")
    _in_send = True
    try:
        view = memoryview(data)
        while view:
            n = os.write(_out_fd, view)
            view = view[n:]
    finally:
        _in_send = False
    if _pending_interrupt and _running:
        _pending_interrupt = False
        raise KeyboardInterrupt


def _on_sigint(signum, frame):
    global _pending_interrupt
    if not _running or _in_send:
        _pending_interrupt = _running
        return
    raise KeyboardInterrupt


_signal.signal(_signal.SIGINT, _on_sigint)


class _Bytes(io.RawIOBase):
    def __init__(self, stream):
        self._stream = stream

    def writable(self):
        return True

    def write(self, b):
        self._stream.write(bytes(b).decode("utf-8", "replace"))
        return len(b)


class _Stream(io.TextIOBase):
    def __init__(self, name):
        self._name = name
        self.buffer = _Bytes(self)

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "replace"

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return 1 if self._name == "stdout" else 2

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if s:
            _send({"t": "out", "s": self._name, "x": s})
        return len(s)

    def flush(self):
        pass


sys.stdout = _Stream("stdout")
sys.stderr = _Stream("stderr")
sys.stdin = open(os.devnull)


def _finite(x):
    return x if math.isfinite(x) else None


def _to_node(v, depth=0):
    """A JSON-able node for a value: JSON where it can be, a Stencila node for figures and
    tables, otherwise the value's repr."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if depth > 100:
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_to_node(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_node(x, depth + 1) for k, x in v.items()}
    module = type(v).__module__ or ""
    if module.startswith("numpy"):
        if hasattr(v, "tolist"):
            return _to_node(v.tolist(), depth + 1)
    if module.startswith("pandas"):
        pd = sys.modules.get("pandas")
        if pd is not None and isinstance(v, pd.DataFrame):
            return _datatable(v)
        if pd is not None and isinstance(v, pd.Series):
            return _to_node(v.tolist(), depth + 1)
    if module.startswith("matplotlib"):
        figure = sys.modules.get("matplotlib.figure")
        if figure is not None and isinstance(v, figure.Figure):
            return _figure(v)
    return repr(v)


def _cell_value(x):
    if isinstance(x, float):
        return _finite(x)
    node = _to_node(x)
    return node


def _datatable(df):
    columns = []
    for name in df.columns:
        values = [_cell_value(x) for x in df[name].tolist()]
        columns.append({"type": "DatatableColumn", "name": str(name), "values": values})
    return {"type": "Datatable", "columns": columns}


def _figure(fig):
    import base64

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "ImageObject", "contentUrl": url, "format": "image/png"}


def _emit_figures():
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for num in pyplot.get_fignums():
        _send({"t": "val", "v": _figure(pyplot.figure(num))})


def _is_artist(v):
    # Values such as the Line2D list returned by plt.plot() are shown by their figure; their
    # repr holds a memory address, which would make outputs differ from run to run.
    items = v if isinstance(v, list) and v else [v]
    return all((type(x).__module__ or "").startswith("matplotlib") for x in items) and not (
        "matplotlib.figure" in sys.modules
        and isinstance(v, sys.modules["matplotlib.figure"].Figure)
    )


_sources = {}


def _error(exc, filename):
    import linecache
    import traceback

    for name, code in _sources.items():
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        tb = None
    trace = "".join(traceback.format_exception(type(exc), exc, tb))
    message = str(exc)
    if isinstance(exc, SyntaxError):
        message = "%s (line %s)" % (exc.msg, exc.lineno)
    return {
        "type": "CodeError",
        "errorType": type(exc).__name__,
        "errorMessage": message,
        "stackTrace": trace,
    }


_FLAGS = getattr(_ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
_CO_COROUTINE = 0x0080


def _run(code_obj):
    result = eval(code_obj, G)
    if code_obj.co_flags & _CO_COROUTINE:
        import asyncio

        result = asyncio.run(result)
    return result


def _execute(mode, cell, code):
    filename = "<cell %s>" % cell
    _sources[filename] = code
    if len(_sources) > 1000:
        _sources.pop(next(iter(_sources)))
    try:
        if mode == "expression":
            value = _run(compile(code.strip(), filename, "eval", flags=_FLAGS))
            _send({"t": "val", "v": _to_node(value)})
            return
        tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST | _FLAGS)
        for stmt in tree.body:
            if isinstance(stmt, _ast.Expr):
                expr = _ast.Expression(stmt.value)
                value = _run(compile(expr, filename, "eval", flags=_FLAGS))
                if value is not None and not _is_artist(value):
                    _send({"t": "val", "v": _to_node(value)})
            else:
                module = _ast.Module([stmt], type_ignores=[])
                _run(compile(module, filename, "exec", flags=_FLAGS))
        _emit_figures()
    except KeyboardInterrupt as exc:
        _send({"t": "err", "e": _error(exc, filename), "cancelled": True})
    except BaseException as exc:  # noqa: B036 - SystemExit too: a chunk must not end the kernel
        _send({"t": "err", "e": _error(exc, filename)})


def _main():
    global _running, _pending_interrupt
    _send({"t": "ready"})
    while True:
        try:
            line = _ctrl.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            break
        try:
            mode, cell, hexcode = line.split(b" ", 2)
            code = bytes.fromhex(hexcode.strip().decode("ascii")).decode("utf-8", "replace")
            mode, cell = mode.decode("ascii"), int(cell)
        except ValueError:
            continue
        _pending_interrupt = False
        _running = True
        try:
            _execute(mode, cell, code)
        except KeyboardInterrupt:
            pass
        finally:
            _running = False
        try:
            _send({"t": "done"})
        except KeyboardInterrupt:
            _send({"t": "done"})


_main()
