// Dispatch's Node worker bootstrap (no npm dependencies; embedded in the dispatch binary).
//
// Usage: node bootstrap.js FUNCTION_DIR MODULE_FILE [EXPORT]    (one worker)
//        node bootstrap.js --generic DIR                         (a spare: see below)
//
// Speaks the worker protocol on fd 0, a Unix socket (DESIGN.md section 5): frames of a 4-byte
// big-endian length followed by JSON. The first frame says whether the handler loaded:
// {"ready": true} or {"ready": false, "error": {...}}. Then each request {"id", "context",
// "payload"} is answered with {"id", "context": {"logs": {"stdout", "stderr"}, "error"},
// "payload"}; what the handler writes to stdout/stderr during the call is captured.
//
// A generic worker (--generic) is started before any function needs it: it says
// {"ready": true, "generic": true}, waits for one {"load": {"dir", "module", "export", "env"}}
// frame, takes that environment and directory, loads the function and then says hello as above.
//
// Errors: a TypeError (as Dispatch's nodejs function server maps it, and as Python's
// ValueError/TypeError are), an error whose name is "InputError" or that has
// `inputError: true` is the caller's fault -> InputError; anything else thrown ->
// FunctionError.
'use strict';

const net = require('net');
const path = require('path');

const generic = process.argv[2] === '--generic';
let [functionDir, moduleFile, exportName] = generic ? [] : process.argv.slice(2);
// fd $DISPATCH_PROTOCOL_FD in a container, whose runtime pipes stdio.
const protocolFd = Number(process.env.DISPATCH_PROTOCOL_FD || 0);
delete process.env.DISPATCH_PROTOCOL_FD;
const sock = new net.Socket({ fd: protocolFd, readable: true, writable: true });

// Die with the server: a server killed with SIGKILL cannot kill its workers, and a run it
// accepted is retried after a restart, so a worker that outlived it would run that call twice
// at once. When this process is re-parented, it kills its own process group.
const parentPid = process.ppid;
setInterval(() => {
  if (process.ppid !== parentPid) {
    try { process.kill(-process.pid, 'SIGKILL'); } catch (_) { process.exit(1); }
  }
}, 100).unref();

function send(obj) {
  const body = Buffer.from(JSON.stringify(obj), 'utf8');
  const head = Buffer.alloc(4);
  head.writeUInt32BE(body.length, 0);
  sock.write(Buffer.concat([head, body]));
}

function errorObject(type, err) {
  const isErr = err instanceof Error;
  const message = isErr ? err.message || err.name : String(err);
  const stack = isErr && err.stack ? String(err.stack).split('\n') : [];
  return { type, message, stacktrace: stack };
}

function loadHandler() {
  const mod = require(path.resolve(functionDir, moduleFile));
  if (exportName) {
    if (typeof mod[exportName] === 'function') return mod[exportName];
    // `module.exports = async function handle(...)` with handler `file.handle`.
    if (typeof mod === 'function' && mod.name === exportName) return mod;
    throw new TypeError(`${moduleFile} does not export a function named ${exportName}`);
  }
  if (typeof mod === 'function') return mod;
  if (mod && typeof mod.handle === 'function') return mod.handle;
  throw new TypeError(`${moduleFile} does not export a function (module.exports = async (context, payload) => ...)`);
}

// Per-call capture of stdout/stderr: calls are serialized per worker, so one target at a time.
const realStdout = process.stdout.write.bind(process.stdout);
const realStderr = process.stderr.write.bind(process.stderr);
let capture = null;
function capturer(key, real) {
  return (chunk, encoding, cb) => {
    if (!capture) return real(chunk, encoding, cb);
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    capture[key] += text;
    if (capture.live) {
      // A live call: each line goes out as it is completed (the answer's logs keep them all).
      const part = capture.parts[key] + text;
      const lines = part.split('\n');
      capture.parts[key] = lines.pop();
      for (const line of lines) send({ id: capture.id, log: line, stream: key });
    }
    if (typeof encoding === 'function') encoding();
    else if (typeof cb === 'function') cb();
    return true;
  };
}
process.stdout.write = capturer('stdout', realStdout);
process.stderr.write = capturer('stderr', realStderr);

function lines(text) {
  if (!text) return [];
  const out = text.split('\n');
  if (out[out.length - 1] === '') out.pop();
  return out;
}

// One chunk a streaming handler yielded, as a raw chunk frame (no JSON): the length, a kind
// byte (0 text, 1 bytes), the request id as 8 bytes, the data; anything but text and bytes
// goes as its JSON text.
function chunkFrame(id, item) {
  let kind = 0;
  let data;
  if (typeof item === 'string') data = Buffer.from(item, 'utf8');
  else if (item instanceof Uint8Array) {
    kind = 1;
    data = Buffer.from(item.buffer, item.byteOffset, item.byteLength);
  } else data = Buffer.from(JSON.stringify(item), 'utf8');
  const head = Buffer.alloc(13);
  head.writeUInt32BE(9 + data.length, 0);
  head.writeUInt8(kind, 4);
  head.writeBigUInt64BE(BigInt(id), 5);
  return [head, data];
}

// Whether a handler's result streams: an async iterator (an async generator, a ReadableStream,
// a Node stream) or a generator object — not an array or a string.
function streams(result) {
  if (result === null || typeof result !== 'object') return false;
  if (typeof result[Symbol.asyncIterator] === 'function') return true;
  return Object.prototype.toString.call(result) === '[object Generator]';
}

// Sends a frame, waiting while the socket's buffer is full: a host that reads slowly (its
// caller does) holds the handler at its next chunk.
function sendWaiting([head, data]) {
  sock.cork();
  sock.write(head);
  const room = sock.write(data);
  sock.uncork();
  if (room) return null;
  return new Promise((resolve) => sock.once('drain', resolve));
}

// A WebSocket session's messages (text as strings, binary as Buffers), as an async iterator
// that ends when the connection closes; fed by the frame reader below.
let session = null;
function sessionMessages(id) {
  const queue = [];
  let waiting = null;
  let ended = false;
  session = {
    id,
    push(frame) {
      if (frame.end) ended = true;
      else queue.push(frame.binary ? Buffer.from(frame.message, 'base64') : frame.message);
      if (waiting) { const w = waiting; waiting = null; w(); }
    },
  };
  return {
    [Symbol.asyncIterator]() { return this; },
    async next() {
      while (!queue.length && !ended) await new Promise((resolve) => { waiting = resolve; });
      if (queue.length) return { value: queue.shift(), done: false };
      return { value: undefined, done: true };
    },
  };
}

async function handle(fn, req) {
  capture = { stdout: '', stderr: '', live: !!req.live, id: req.id, parts: { stdout: '', stderr: '' } };
  let error = null;
  let payload = null;
  const context = req.context || {};
  // context.stream.write(item) sends a chunk now (await it: it waits while the reader is behind).
  Object.defineProperty(context, 'stream', {
    value: { write: (item) => sendWaiting(chunkFrame(req.id, item)) || Promise.resolve() },
    enumerable: false,
  });
  const input = req.messages || (req.payload === undefined ? null : req.payload);
  try {
    const result = await fn(context, input);
    if (streams(result)) {
      for await (const item of result) {
        const wait = sendWaiting(chunkFrame(req.id, item));
        if (wait) await wait;
      }
    } else {
      payload = result === undefined ? null : result;
    }
  } catch (err) {
    const input =
      err && (err instanceof TypeError || err.name === 'InputError' || err.inputError === true);
    error = errorObject(input ? 'InputError' : 'FunctionError', err);
  }
  const logs = { stdout: lines(capture.stdout), stderr: lines(capture.stderr) };
  // As Dispatch's function servers do: whoever reads the logs sees the stack trace too.
  if (error) logs.stderr.push(...error.stacktrace);
  capture = null;
  session = null;
  const resp = { id: req.id, context: { logs, error }, payload };
  try {
    send(resp);
  } catch (err) {
    // The error without its frames (they are the bootstrap's, not the handler's), in the
    // logs too, as for any other error.
    const trace = [`${err.name}: ${err.message}`];
    resp.payload = null;
    resp.context.error = {
      type: 'FunctionError',
      message: `handler returned a value that is not JSON: ${err.message}`,
      stacktrace: trace,
    };
    resp.context.logs.stderr.push(...trace);
    send(resp);
  }
}

let fn = null;

// Loads the handler and says hello; false (after saying why) when it does not load.
function start() {
  const started = process.hrtime.bigint();
  try {
    process.chdir(functionDir);
    fn = loadHandler();
  } catch (err) {
    const e = errorObject('FunctionError', err);
    e.message = `cannot load handler ${moduleFile}${exportName ? ' ' + exportName : ''}: ${e.message}`;
    send({ ready: false, error: e });
    sock.end();
    process.exitCode = 1;
    return false;
  }
  send({ ready: true, importMs: Number(process.hrtime.bigint() - started) / 1e6 });
  return true;
}

// A generic worker becomes the function of its first frame.
function specialize(load) {
  if (!load || typeof load.dir !== 'string' || typeof load.module !== 'string') {
    process.exit(2);
  }
  functionDir = load.dir;
  moduleFile = load.module;
  exportName = load.export || undefined;
  for (const k of Object.keys(process.env)) delete process.env[k];
  Object.assign(process.env, load.env || {});
  process.argv = [process.argv[0], process.argv[1], functionDir, moduleFile].concat(exportName ? [exportName] : []);
  return start();
}

let alive = generic ? (send({ ready: true, generic: true }), true) : start();

// Frame reader: requests are handled one at a time, in order.
let buf = Buffer.alloc(0);
let chain = Promise.resolve();
sock.on('data', (chunk) => {
  buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
  while (alive && buf.length >= 4) {
    const len = buf.readUInt32BE(0);
    if (buf.length < 4 + len) break;
    const body = buf.subarray(4, 4 + len);
    buf = buf.subarray(4 + len);
    const msg = JSON.parse(body.toString('utf8'));
    if (!fn) {
      alive = specialize(msg.load);
      continue;
    }
    if (!('context' in msg)) {
      // A session's message (or its end), for the handler reading them now.
      if (session && session.id === msg.id) session.push(msg);
      continue;
    }
    // Set up now: its messages follow in this very read.
    if (msg.session) msg.messages = sessionMessages(msg.id);
    chain = chain.then(() => handle(fn, msg));
  }
});
sock.on('end', () => process.exit(process.exitCode || 0));
sock.on('error', () => process.exit(process.exitCode || 0));
