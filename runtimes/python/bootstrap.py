"""Dispatch's Python worker bootstrap (stdlib only; embedded in the dispatch binary).

Usage: python3 bootstrap.py FUNCTION_DIR MODULE.FUNCTION     (one worker)
       python3 bootstrap.py --zygote [PRELOAD_JSON | "auto"]    (forks workers; see zygote())

Speaks the worker protocol on fd 0, a Unix socket (DESIGN.md section 5): frames of a
4-byte big-endian length followed by JSON. The first frame it sends says whether the
handler loaded: {"ready": true} or {"ready": false, "error": {...}}. Then, for each request
{"id", "context", "payload"} it answers {"id", "context": {"logs": {"stdout", "stderr"},
"error"}, "payload"}, capturing what the handler prints during that call. A handler that
streams sends raw chunk frames before its answer: after the length, a kind byte (0 text,
1 bytes), the request id as 8 bytes, the data (JSON frames start with "{").

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
import time
import traceback
import types

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


RAW_TEXT, RAW_BYTES = 0, 1
# What a handler returns to stream (neither type can be subclassed).
_STREAMED = (types.GeneratorType, types.AsyncGeneratorType)
# What a handler returns as its answer, asked nothing more.
_PLAIN = (dict, list, str, int, float, bool, type(None))


def chunk_frame(item):
    """One chunk a streaming handler yielded, as (kind, data) for a raw chunk frame: text as
    its UTF-8, bytes as they are, anything else as its JSON (text)."""
    if isinstance(item, str):
        return RAW_TEXT, item.encode("utf-8")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return RAW_BYTES, item
    return RAW_TEXT, json.dumps(item, separators=(",", ":")).encode("utf-8")


def send_chunk(sock, rid, chunk):
    """A raw chunk frame: length, kind byte, the request id (8 bytes), the data, without
    JSON or a copy of the data (one sendmsg of both parts; the rest if it was cut short)."""
    kind, data = chunk
    data = memoryview(data).cast("B")
    head = struct.pack(">IBQ", 9 + len(data), kind, rid)
    sent = sock.sendmsg([head, data])
    if sent < len(head) + len(data):
        rest = (head + bytes(data))[sent:]
        sock.sendall(rest)


class Context(dict):
    """The call's context (a dict, as always), plus `context.stream`: write(item) sends a
    chunk now, as a yielded item would."""

    __slots__ = ("_emit",)

    @property
    def stream(self):
        return Stream(self._emit)


class Stream:
    __slots__ = ("_emit",)

    def __init__(self, emit):
        self._emit = emit

    def write(self, item):
        self._emit(chunk_frame(item))


class Messages:
    """A WebSocket session's messages as they come (text as str, binary as bytes): iterate
    it, or `async for` it. It ends when the connection closes."""

    def __init__(self, sock, rid):
        self._sock, self._rid, self._done = sock, rid, False

    def __iter__(self):
        return self

    def __next__(self):
        while not self._done:
            frame = recv_frame(self._sock)
            if frame is None or (frame.get("id") == self._rid and frame.get("end")):
                self._done = True
                break
            if frame.get("id") != self._rid or "message" not in frame:
                continue
            if frame.get("binary"):
                import base64

                return base64.b64decode(frame["message"])
            return frame["message"]
        raise StopIteration

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return self.__next__()
        except StopIteration:
            raise StopAsyncIteration from None


def stream(result, emit):
    """Sends each item of a generator (or async generator) as a chunk as it is yielded. The
    host reads them at its caller's pace: a slow reader blocks the send, and so the handler."""
    if inspect.isasyncgen(result):
        async def drain():
            async for item in result:
                emit(chunk_frame(item))
        asyncio.run(drain())
    else:
        for item in result:
            emit(chunk_frame(item))


class LiveOut(io.StringIO):
    """A captured stream that also sends each line as it is completed (`live` calls)."""

    def __init__(self, emit, name):
        super().__init__()
        self._emit, self._name, self._part = emit, name, ""

    def write(self, s):
        n = super().write(s)
        self._part += s
        if "\n" in self._part:
            *lines, self._part = self._part.split("\n")
            for line in lines:
                self._emit({"log": line, "stream": self._name})
        return n


def call(fn, context, payload, emit=None, live=False):
    """Runs one call with stdout/stderr captured; returns the response minus its id. A handler
    that returns a generator streams: `emit` sends each item as it comes; with `live`, each
    line printed is also sent as it is printed."""
    if live and emit is not None:
        out, err = LiveOut(emit, "stdout"), LiveOut(emit, "stderr")
    else:
        out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    error = None
    result = None
    if emit is not None:
        context = Context(context)
        context._emit = emit
    try:
        result = fn(context, payload)
        # Most answers are plain values: no further question (an ABC's isinstance is slow).
        if type(result) not in _PLAIN:
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result))
            if emit is not None and type(result) in _STREAMED:
                stream(result, emit)
                result = None
    except BaseException as exc:  # the handler's failure is the caller's answer, not ours
        kind = "InputError" if is_input_error(exc) else "FunctionError"
        error = error_object(kind, exc, skip_frames=1)
        result = None
    finally:
        sys.stdout, sys.stderr = saved
    logs = {"stdout": lines_of(out), "stderr": lines_of(err)}
    if error is not None:
        # As Dispatch's function servers do: whoever reads the logs sees the traceback too.
        logs["stderr"].extend(error["stacktrace"])
    return {"context": {"logs": logs, "error": error}, "payload": result}


async def _await(awaitable):
    return await awaitable


def watch_socket(sock):
    """Dies with the server: a server killed with SIGKILL cannot kill its workers, and a run
    it accepted is retried after a restart, so a worker that outlived it would run that call
    twice at once. The server holds the other end of the protocol socket; when it goes away
    (or drops this worker), the socket hangs up and this process kills its own process group,
    even in the middle of a call. The kernel tells by SIGIO (O_ASYNC on the socket), so no
    thread is needed: a thread would cost a forked worker its stack and a malloc arena."""
    import fcntl
    import select
    import signal

    fd = sock.fileno()
    gone = select.POLLHUP | select.POLLERR | select.POLLNVAL

    def on_io(signum, frame):
        # Signals nest: this handler can run again while it runs, so it keeps no state
        # (a shared poll object refuses concurrent use) and never raises into the call it
        # interrupted.
        try:
            probe = select.poll()
            probe.register(fd, 0)  # POLLHUP/POLLERR are always reported
            events = probe.poll(0)
        except Exception:
            return  # looked at again on the next signal
        for _, ev in events:
            if ev & gone:
                os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGIO, on_io)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    on_io(signal.SIGIO, None)  # it may have hung up already


def serve(sock, function_dir, handler):
    """Loads the handler and answers requests on `sock` until the host closes it."""
    watch_socket(sock)
    os.chdir(function_dir)
    sys.path.insert(0, function_dir)
    started = time.perf_counter()
    try:
        fn = load_handler(handler)
    except BaseException as exc:
        err = error_object("FunctionError", exc, skip_frames=0)
        err["message"] = "cannot load handler %s: %s: %s" % (handler, type(exc).__name__, exc)
        send_frame(sock, {"ready": False, "error": err})
        return 1
    send_frame(sock, {"ready": True, "importMs": (time.perf_counter() - started) * 1000.0})

    while True:
        req = recv_frame(sock)
        if req is None:
            return 0
        rid = req.get("id")
        if "context" not in req:
            continue  # a session's message its handler left unread

        def emit(frame, rid=rid):
            if type(frame) is tuple:  # a chunk
                send_chunk(sock, rid, frame)
            else:
                send_frame(sock, dict({"id": rid}, **frame))

        payload = Messages(sock, rid) if req.get("session") else req.get("payload")
        resp = call(fn, req.get("context") or {}, payload, emit, req.get("live", False))
        resp["id"] = rid
        try:
            send_frame(sock, resp)
        except (TypeError, ValueError) as exc:
            # The exception without its frames (they are the bootstrap's, not the handler's),
            # in the logs too, as for any other error.
            trace = [line.rstrip("\n") for line in traceback.format_exception_only(type(exc), exc)]
            resp["payload"] = None
            resp["context"]["error"] = {
                "type": "FunctionError",
                "message": "handler returned a value that is not JSON: %s" % exc,
                "stacktrace": trace,
            }
            resp["context"]["logs"]["stderr"].extend(trace)
            send_frame(sock, resp)


def take_protocol_socket():
    """The protocol socket arrives as fd 0 (fd $DISPATCH_PROTOCOL_FD in a container, whose
    runtime pipes stdio); keep it on a private fd and give the handler an empty stdin so that
    a stray input() cannot read protocol bytes."""
    fd = int(os.environ.pop("DISPATCH_PROTOCOL_FD", "0"))
    sock = socket.socket(fileno=os.dup(fd))
    if fd != 0:
        os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return sock


def preload_modules(names):
    """Imports what every worker forked from this zygote should find already loaded.
    `names` is a list of module names, or "auto": the top-level modules installed in this
    interpreter's virtual environment (an image's dependencies). Failures are reported,
    not fatal: the handler's own import will show the real error."""
    if names == "auto":
        names = []
        if sys.prefix != sys.base_prefix:  # a venv: its site-packages are the image's
            import site

            skip = {"pip", "setuptools", "pkg_resources", "wheel", "_distutils_hack"}
            for sp in site.getsitepackages():
                try:
                    entries = sorted(os.listdir(sp))
                except OSError:
                    continue
                for e in entries:
                    mod = e
                    if e.endswith(".py"):
                        mod = e[:-3]
                    elif ".cpython-" in e or e.endswith(".abi3.so"):
                        mod = e.split(".", 1)[0]
                    elif not os.path.isfile(os.path.join(sp, e, "__init__.py")):
                        continue
                    if mod.isidentifier() and not mod.startswith("_") and mod not in skip:
                        names.append(mod)
    loaded, failed = [], []
    for name in names:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except BaseException as exc:  # a module that does not import is skipped
            failed.append("%s: %s: %s" % (name, type(exc).__name__, exc))
    return loaded, failed


def warm_up():
    """Runs what every worker runs first (a call through the capture path, JSON both ways, an
    import from a new directory, the watchdog's modules) so that the objects and caches it
    creates live in the zygote, shared by every fork, instead of being made again in each."""
    import fcntl  # noqa: F401  (the watchdog's)
    import select  # noqa: F401
    import signal  # noqa: F401
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "dispatch_warm_up.py"), "w") as f:
            f.write("def handle(context, payload):\n    print(payload)\n    return payload\n")
        sys.path.insert(0, d)
        try:
            fn = load_handler("dispatch_warm_up.handle")
            resp = call(fn, {"function": "warm-up"}, {"name": "x", "n": [1, 2.5, None]})
            json.loads(json.dumps(resp, separators=(",", ":")))
        finally:
            sys.path.remove(d)
            sys.modules.pop("dispatch_warm_up", None)
            sys.path_importer_cache.pop(d, None)


def recv_request_with_fds(ctl):
    """One zygote request: a frame whose first bytes carry the worker's fds (SCM_RIGHTS)."""
    data, fds, _, _ = socket.recv_fds(ctl, 65536, 3)
    if not data:
        return None, fds
    while len(data) < 4:
        more = ctl.recv(4 - len(data))
        if not more:
            return None, fds
        data += more
    (length,) = struct.unpack(">I", data[:4])
    body = data[4:]
    if len(body) < length:
        rest = recv_exact(ctl, length - len(body))
        if rest is None:
            return None, fds
        body += rest
    return json.loads(body), fds


def set_environment(env):
    """Makes the environment exactly `env`, changing only what differs from the zygote's
    (most of it is the same base): every variable set or unset writes to pages this process
    shares with the zygote and every other fork (measured: ~250 KiB less private memory per
    worker than clearing and setting all)."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def zygote(preload):
    """A process that has imported the bootstrap (and the image's modules) and forks a new
    worker for each request. Request frames on fd 0 carry three fds: the worker's protocol
    socket, its stdout and its stderr; and {"dir", "handler", "env"}. The answer is {"pid"}.
    The child becomes its own process group, takes the declared environment instead of the
    zygote's, imports the handler and serves like a spawned worker."""
    import gc
    import signal

    ctl = take_protocol_socket()
    loaded, failed = preload_modules(preload)
    warm_up()
    # Children are reaped by the kernel; they are killed by the host through their group.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    # Objects that exist now are never collected: the collector does not write to (and so
    # does not un-share) the pages every forked worker shares with this process.
    gc.collect()
    gc.freeze()
    send_frame(ctl, {"ready": True, "preloaded": loaded, "failed": failed})
    while True:
        req, fds = recv_request_with_fds(ctl)
        if req is None:
            return 0
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            send_frame(ctl, {"error": "expected 3 fds, got %d" % len(fds)})
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                ctl.close()
                sock_fd, out_fd, err_fd = fds
                os.set_inheritable(sock_fd, False)  # not for the handler's subprocesses
                os.dup2(out_fd, 1)
                os.dup2(err_fd, 2)
                os.close(out_fd)
                os.close(err_fd)
                set_environment(req.get("env") or {})
                extra = os.environ.get("PYTHONPATH")
                if extra:
                    sys.path[1:1] = [p for p in extra.split(os.pathsep) if p]
                sys.argv = [sys.argv[0], req["dir"], req["handler"]]
                code = serve(socket.socket(fileno=sock_fd), req["dir"], req["handler"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        try:
            os.setpgid(pid, pid)  # also here: the host may kill the group before the child runs
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        send_frame(ctl, {"pid": pid})


def main():
    if sys.argv[1] == "--zygote":
        preload = json.loads(sys.argv[2]) if len(sys.argv) > 2 else "auto"
        return zygote(preload)
    function_dir, handler = sys.argv[1], sys.argv[2]
    return serve(take_protocol_socket(), function_dir, handler)


if __name__ == "__main__":
    sys.exit(main())
