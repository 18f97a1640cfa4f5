// Sparkla's JavaScript kernel. Started by sparkla-agent as `node -e <this script>`.
// The protocol with the agent is the one described in python.py: requests on fd 3,
// messages on fd 4, one JSON object per line.
'use strict';
const fs = require('fs');
const net = require('net');
const vm = require('vm');
const util = require('util');
const readline = require('readline');

let running = false;
let interruptAsync = null;

function send(msg) {
  const buf = Buffer.from(JSON.stringify(msg) + '\n', 'utf8');
  let offset = 0;
  while (offset < buf.length) {
    try {
      offset += fs.writeSync(4, buf, offset, buf.length - offset);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
    }
  }
}

function streamWriter(name) {
  return function write(chunk, encoding, callback) {
    const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
    if (text.length > 0) send({ t: 'out', s: name, x: text });
    const cb = typeof encoding === 'function' ? encoding : callback;
    if (typeof cb === 'function') process.nextTick(cb);
    return true;
  };
}
process.stdout.write = streamWriter('stdout');
process.stderr.write = streamWriter('stderr');

process.on('SIGINT', () => {
  if (running && interruptAsync) interruptAsync();
});

function toNode(value, depth = 0) {
  if (value === null || typeof value === 'boolean' || typeof value === 'string') return value;
  if (typeof value === 'number') return Number.isFinite(value) ? value : String(value);
  if (typeof value === 'bigint') return value.toString();
  if (depth > 100) return util.inspect(value);
  if (Array.isArray(value)) return value.map((v) => (v === undefined ? null : toNode(v, depth + 1)));
  if (typeof value === 'object') {
    const proto = Object.getPrototypeOf(value);
    if (proto === Object.prototype || proto === null) {
      const out = {};
      for (const [k, v] of Object.entries(value)) {
        if (v !== undefined && typeof v !== 'function') out[k] = toNode(v, depth + 1);
      }
      return out;
    }
    if (value instanceof Date) return value.toISOString();
  }
  return util.inspect(value);
}

function codeError(err, cell) {
  if (err instanceof Error || (err && typeof err === 'object' && 'stack' in err)) {
    let stack = String(err.stack || '');
    // Keep the frames of the cell; drop the kernel's own.
    const lines = stack.split('\n');
    const kept = lines.filter((l, i) => i === 0 || !/^\s+at /.test(l) || l.includes(cell));
    stack = kept.join('\n');
    return {
      type: 'CodeError',
      errorType: err.name || 'Error',
      errorMessage: String(err.message === undefined ? err : err.message),
      stackTrace: stack,
    };
  }
  return { type: 'CodeError', errorType: 'Error', errorMessage: util.inspect(err), stackTrace: '' };
}

async function execute(req) {
  const cell = `cell${req.cell || 0}`;
  const code = req.code || '';
  let value;
  try {
    const script = new vm.Script(code, { filename: cell });
    value = script.runInThisContext({ breakOnSigint: true, displayErrors: false });
    if (value && typeof value.then === 'function') {
      value = await new Promise((resolve, reject) => {
        interruptAsync = () => reject(Object.assign(new Error('Interrupted'), { name: 'Interrupted', cancelled: true }));
        value.then(resolve, reject);
      });
    }
  } catch (err) {
    const cancelled = !!(err && (err.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED' || err.cancelled));
    send({ t: 'err', e: codeError(err, cell), cancelled });
    return;
  } finally {
    interruptAsync = null;
  }
  if (req.mode === 'expression') {
    send({ t: 'val', v: value === undefined ? null : toNode(value) });
  } else if (value !== undefined) {
    send({ t: 'val', v: toNode(value) });
  }
}

// Requests are read through libuv's event loop (net.Socket), not a thread-pool read: a
// pending blocking read would keep process.exit() from ever finishing.
const requests = new net.Socket({ fd: 3, readable: true, writable: false });
const input = readline.createInterface({ input: requests, crlfDelay: Infinity });
let queue = Promise.resolve();
input.on('line', (line) => {
  let req;
  try {
    req = JSON.parse(line);
  } catch (e) {
    return;
  }
  queue = queue.then(async () => {
    running = true;
    try {
      await execute(req);
    } catch (e) {
      send({ t: 'err', e: codeError(e, 'kernel') });
    } finally {
      running = false;
      send({ t: 'done' });
    }
  });
});
input.on('close', () => process.exit(0));
send({ t: 'ready' });
