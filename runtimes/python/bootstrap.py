"""Dispatch's Python worker bootstrap (stdlib only; embedded in the dispatch binary).

Usage: python3 bootstrap.py FUNCTION_DIR MODULE.FUNCTION

Speaks the worker protocol on fd 0, a Unix socket (DESIGN.md section 5): frames of a
4-byte big-endian length followed by JSON. The first frame it sends says whether the
handler loaded: {"ready": true} or {"ready": false, "error": {...}}. Then, for each request
{"id", "context", "payload"} it answers {"id", "context": {"logs": {"stdout", "stderr"},
"error"}, "payload"}, capturing what the handler prints during that call.

Error mapping follows Dispatch's Python function server: ValueError and TypeError (and an
exception class named InputError) are the caller's fault -> InputError; anything else the
handler raises -> FunctionError.
"""

import asyncio
import importlib
import inspect
import io
import json
import os
import socket
import struct
import sys
import traceback

MAX_FRAME = 64 * 1024 * 1024


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock):
    head = recv_exact(sock, 4)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head)
    if length > MAX_FRAME:
        raise ValueError("frame of %d bytes is larger than %d" % (length, MAX_FRAME))
    body = recv_exact(sock, length)
    if body is None:
        return None
    return json.loads(body)


def send_frame(sock, obj):
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    sock.sendall(struct.pack(">I", len(body)) + body)


def is_input_error(exc):
    return isinstance(exc, (ValueError, TypeError)) or type(exc).__name__ == "InputError"


def error_object(kind, exc, skip_frames=1):
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    stack = [line.rstrip("\n") for chunk in lines for line in chunk.splitlines()]
    message = str(exc) or type(exc).__name__
    return {"type": kind, "message": message, "stacktrace": stack}


def load_handler(handler):
    module_name, _, func_name = handler.rpartition(".")
    if not module_name or not func_name:
        raise ValueError("handler %r must look like module.function" % handler)
    module = importlib.import_module(module_name)
    fn = getattr(module, func_name, None)
    if fn is None:
        raise AttributeError("module %r has no attribute %r" % (module_name, func_name))
    if not callable(fn):
        raise TypeError("%s is not callable" % handler)
    return fn


def lines_of(buf):
    text = buf.getvalue()
    return text.splitlines() if text else []


def call(fn, context, payload):
    """Runs one call with stdout/stderr captured; returns the response minus its id."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    error = None
    result = None
    try:
        result = fn(context, payload)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except BaseException as exc:  # the handler's failure is the caller's answer, not ours
        kind = "InputError" if is_input_error(exc) else "FunctionError"
        error = error_object(kind, exc, skip_frames=1)
        result = None
    finally:
        sys.stdout, sys.stderr = saved
    logs = {"stdout": lines_of(out), "stderr": lines_of(err)}
    return {"context": {"logs": logs, "error": error}, "payload": result}


async def _await(awaitable):
    return await awaitable


def watch_parent():
    """Dies with the server: a server killed with SIGKILL cannot kill its workers, and a run
    it accepted is retried after a restart, so a worker that outlived it would run that call
    twice at once. When this process is re-parented, it kills its own process group."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def loop():
        while True:
            time.sleep(0.1)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=loop, name="dispatch-watch-parent", daemon=True).start()


def main():
    function_dir, handler = sys.argv[1], sys.argv[2]
    watch_parent()
    # The protocol socket arrives as fd 0; keep it on a private fd and give the handler an
    # empty stdin so that a stray input() cannot read protocol bytes.
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    os.chdir(function_dir)
    sys.path.insert(0, function_dir)
    try:
        fn = load_handler(handler)
    except BaseException as exc:
        err = error_object("FunctionError", exc, skip_frames=0)
        err["message"] = "cannot load handler %s: %s: %s" % (handler, type(exc).__name__, exc)
        send_frame(sock, {"ready": False, "error": err})
        return 1
    send_frame(sock, {"ready": True})

    while True:
        req = recv_frame(sock)
        if req is None:
            return 0
        resp = call(fn, req.get("context") or {}, req.get("payload"))
        resp["id"] = req.get("id")
        try:
            send_frame(sock, resp)
        except (TypeError, ValueError) as exc:
            resp["payload"] = None
            resp["context"]["error"] = {
                "type": "FunctionError",
                "message": "handler returned a value that is not JSON: %s" % exc,
                "stacktrace": [],
            }
            send_frame(sock, resp)


if __name__ == "__main__":
    sys.exit(main())
