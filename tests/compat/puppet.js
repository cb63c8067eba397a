#!/usr/bin/env node
// nsbridge compatibility puppet: real Node Socket.IO clients driven over stdin/stdout.
//
// Protocol: one JSON object per line. Commands come in on stdin, reports go out on
// stdout. Nothing but report lines is ever written to stdout; diagnostics go to stderr.
// On start the puppet prints {"type":"ready"}.
//
// Clients: "v2" = socket.io-client 2.2.0 (Engine.IO 3), "v4" = socket.io-client 4.x
// (Engine.IO 4). Both are installed side by side under npm aliases (see package.json).
//
// Commands (fields marked ? are optional):
//   {"op":"connect","id":"c1","client":"v2"|"v4","url":"http://127.0.0.1:PORT",
//    "namespaces":["/storage","/alarm"],"transports":["polling","websocket"],
//    "query"?:{...},"reconnection"?:false,"path"?:"/socket.io","auth"?:{...} (v4 only),
//    "reconnectionDelay"?:ms,"reconnectionDelayMax"?:ms,"randomizationFactor"?:0..1}
//      One Manager (= one Engine.IO connection) per id; one socket per namespace, created
//      in the order given. v2: `query` is the namespace socket's query (sent inside the
//      CONNECT packet, `40/storage?x=1,`); v4: `query` is the Manager's (handshake URL).
//      Reports, per namespace:
//        {"id","ns","type":"connect"}   v4 adds "recovered": socket.recovered (connection
//            state recovery) and "pid": whether the server gave a private session id.
//        {"id","ns","type":"connect_error","message",...}
//            v4: "data" = err.data when the server sent some.
//            v2: "raw" = the payload of the namespace `error` event (the server's
//                CONNECT_ERROR data: a string, or an object such as {"message":...}),
//                or of the manager's `connect_error` (transport failure).
//        {"id","ns","type":"disconnect","reason"}
//        {"id","ns","type":"event","name","args":[...]}   every incoming server event;
//            "ackRequested":true is added when the server asked for an ack (the ack
//            callback itself is not reported and never called).
//        {"id","ns","type":"error","message","raw"}  (v2 only: an `error` event on a
//            socket that is already connected)
//   {"op":"emit","id","ns","event","args":[...],"ack":true|false,"tag"}
//      ack:true → {"id","ns","type":"ack","tag","args":[...]}. Nothing is reported for
//      an emit without ack unless it fails ({"id","type":"error","tag","message"}).
//   {"op":"transport","id","tag"} → {"id","type":"transport","tag","name"}
//   {"op":"pause","id","tag"}     → {"id","type":"paused","tag"}: the websocket's TCP
//      socket stops being read (server writes back up). Error if not on websocket.
//      Writes still go out. On loopback the kernels absorb ~4 MB (server send queue)
//      plus ~128 kB (client receive queue) before the server itself has to buffer. A
//      pause longer than pingInterval + pingTimeout ends in a client-side
//      "ping timeout" disconnect (both clients), reported while still paused.
//   {"op":"resume","id","tag"}    → {"id","type":"resumed","tag"} (undoes pause).
//   {"op":"drop","id","tag"}      → {"id","type":"dropped","tag"}: the connection is cut
//      under the client, as a network loss: the websocket's TCP socket is destroyed
//      (a polling transport is closed). With "reconnection" the client reconnects.
//   {"op":"close","id","tag"}     → {"id","type":"closed","tag"}: disconnects every
//      namespace socket and closes the Engine.IO connection.
//   {"op":"exit"}                 → exits with status 0 (so does end of stdin).
//
// Binary: in command args, an object {"$binary":"<base64>"} (that one key only) becomes
// a Buffer; in reports, Buffers / ArrayBuffers / typed arrays become {"$binary":"..."}.
// Unknown ops, bad JSON or failing commands → {"type":"error","message",...}; the
// puppet never exits because of a bad command.

'use strict';

// ---------------------------------------------------------------- stdout discipline
// Only `report` writes to stdout. Anything a library might print goes to stderr.
const writeOut = process.stdout.write.bind(process.stdout);
for (const k of ['log', 'info', 'debug']) {
  console[k] = (...a) => console.error(...a);
}
// The `debug` package (used by both clients) honours DEBUG_FD; keep it off stdout.
delete process.env.DEBUG_FD;

function report(obj) {
  let line;
  try {
    line = JSON.stringify(obj);
  } catch (e) {
    line = JSON.stringify({ type: 'error', message: 'unserialisable report: ' + e.message });
  }
  writeOut(line + '\n');
}

function diag(...a) {
  process.stderr.write('[puppet] ' + a.join(' ') + '\n');
}

// ---------------------------------------------------------------- client libraries
// engine.io-client 3.x picks a global `WebSocket` over the `ws` package when there is
// one (Node >= 22 has it), which would leave no net.Socket to pause. Hide it while the
// v2 client loads.
function loadV2() {
  const had = Object.prototype.hasOwnProperty.call(globalThis, 'WebSocket');
  const saved = globalThis.WebSocket;
  if (had) {
    try {
      delete globalThis.WebSocket;
    } catch (_) {
      /* ignore */
    }
  }
  try {
    return require('socket.io-client-v2');
  } finally {
    if (had) globalThis.WebSocket = saved;
  }
}
const ioV2 = loadV2();
const ioV4 = require('socket.io-client-v4');

// ---------------------------------------------------------------- JSON <-> binary
function isBinary(v) {
  return (
    Buffer.isBuffer(v) ||
    v instanceof ArrayBuffer ||
    (typeof SharedArrayBuffer !== 'undefined' && v instanceof SharedArrayBuffer) ||
    ArrayBuffer.isView(v)
  );
}

function binToB64(v) {
  if (Buffer.isBuffer(v)) return v.toString('base64');
  if (ArrayBuffer.isView(v)) return Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('base64');
  return Buffer.from(v).toString('base64');
}

// Incoming (library → report): binary → {"$binary":...}, functions dropped.
function toJson(v, seen = new Set()) {
  if (v === null || typeof v !== 'object') {
    if (typeof v === 'function' || typeof v === 'symbol') return undefined;
    if (typeof v === 'bigint') return v.toString();
    return v;
  }
  if (isBinary(v)) return { $binary: binToB64(v) };
  if (seen.has(v)) return '[Circular]';
  seen.add(v);
  let out;
  if (Array.isArray(v)) {
    out = v.map((x) => {
      const j = toJson(x, seen);
      return j === undefined ? null : j;
    });
  } else if (typeof v.toJSON === 'function') {
    out = toJson(v.toJSON(), seen);
  } else {
    out = {};
    for (const k of Object.keys(v)) {
      const j = toJson(v[k], seen);
      if (j !== undefined) out[k] = j;
    }
  }
  seen.delete(v);
  return out;
}

// Outgoing (command → library): {"$binary":...} → Buffer.
function fromJson(v) {
  if (Array.isArray(v)) return v.map(fromJson);
  if (v !== null && typeof v === 'object') {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === '$binary' && typeof v.$binary === 'string') {
      return Buffer.from(v.$binary, 'base64');
    }
    const out = {};
    for (const k of keys) out[k] = fromJson(v[k]);
    return out;
  }
  return v;
}

// Event args as delivered; a trailing ack callback is removed and flagged.
function eventReport(id, ns, name, rawArgs) {
  const args = rawArgs.slice();
  let ackRequested = false;
  if (args.length && typeof args[args.length - 1] === 'function') {
    args.pop();
    ackRequested = true;
  }
  const r = { id, ns, type: 'event', name, args: toJson(args) };
  if (ackRequested) r.ackRequested = true;
  return r;
}

function errMessage(e) {
  if (e == null) return String(e);
  if (typeof e === 'string') return e;
  if (typeof e.message === 'string') return e.message;
  try {
    return JSON.stringify(e);
  } catch (_) {
    return String(e);
  }
}

// ---------------------------------------------------------------- clients
/** id → { kind, manager, sockets: Map<ns, socket>, paused: net.Socket|null } */
const clients = new Map();

// Reconnection timing, when given.
function reconnectionOptions(cmd, opts) {
  for (const k of ['reconnectionDelay', 'reconnectionDelayMax', 'randomizationFactor']) {
    if (cmd[k] !== undefined) opts[k] = cmd[k];
  }
  return opts;
}

function connectV2(cmd, client) {
  const opts = reconnectionOptions(cmd, {
    transports: cmd.transports || ['polling', 'websocket'],
    reconnection: cmd.reconnection === true,
    autoConnect: true,
    forceNode: true,
  });
  if (cmd.path) opts.path = cmd.path;
  const manager = new ioV2.Manager(cmd.url, opts);
  client.manager = manager;
  const { id } = cmd;
  for (const ns of cmd.namespaces) {
    const sopts = {};
    if (cmd.query != null) sopts.query = cmd.query;
    const socket = manager.socket(ns, sopts);
    client.sockets.set(ns, socket);
    socket.on('connect', () => report({ id, ns, type: 'connect' }));
    socket.on('disconnect', (reason) => report({ id, ns, type: 'disconnect', reason: toJson(reason) }));
    // A server CONNECT_ERROR reaches 2.x as an ERROR packet → `error` on the socket.
    socket.on('error', (data) => {
      const r = { id, ns, type: socket.connected ? 'error' : 'connect_error', message: errMessage(data) };
      if (data !== undefined) r.raw = toJson(data instanceof Error ? { message: data.message } : data);
      report(r);
    });
    // Transport failure while opening: emitted to every socket by the manager.
    socket.on('connect_error', (err) => {
      const r = { id, ns, type: 'connect_error', message: errMessage(err) };
      if (err && err.description !== undefined) r.raw = toJson({ description: errMessage(err.description) });
      report(r);
    });
    socket.on('connect_timeout', () => report({ id, ns, type: 'connect_error', message: 'connect_timeout' }));
    // 2.x has no onAny: every server event passes through onevent (EVENT and
    // BINARY_EVENT packets); the client's own events (connect, ping, ...) never do.
    const onevent = socket.onevent;
    socket.onevent = function (packet) {
      const data = packet.data || [];
      const rawArgs = data.slice(1);
      if (packet.id != null) rawArgs.push(() => {});
      report(eventReport(id, ns, String(data[0]), rawArgs));
      return onevent.call(this, packet);
    };
  }
}

function connectV4(cmd, client) {
  const opts = reconnectionOptions(cmd, {
    transports: cmd.transports || ['polling', 'websocket'],
    reconnection: cmd.reconnection === true,
    autoConnect: true,
  });
  if (cmd.path) opts.path = cmd.path;
  if (cmd.query != null) opts.query = cmd.query;
  const manager = new ioV4.Manager(cmd.url, opts);
  client.manager = manager;
  const { id } = cmd;
  for (const ns of cmd.namespaces) {
    const sopts = {};
    if (cmd.auth != null) sopts.auth = cmd.auth;
    const socket = manager.socket(ns, sopts);
    client.sockets.set(ns, socket);
    socket.on('connect', () =>
      report({ id, ns, type: 'connect', recovered: socket.recovered === true, pid: socket._pid !== undefined }),
    );
    socket.on('disconnect', (reason) => report({ id, ns, type: 'disconnect', reason: toJson(reason) }));
    socket.on('connect_error', (err) => {
      const r = { id, ns, type: 'connect_error', message: errMessage(err) };
      if (err && err.data !== undefined) r.data = toJson(err.data);
      report(r);
    });
    socket.onAny((name, ...rawArgs) => report(eventReport(id, ns, String(name), rawArgs)));
  }
}

function engineOf(client) {
  return client.manager && client.manager.engine;
}

function transportOf(client) {
  const engine = engineOf(client);
  return engine && engine.readyState !== 'closed' ? engine.transport : null;
}

// ---------------------------------------------------------------- commands
function need(cmd, ...fields) {
  for (const f of fields) {
    if (cmd[f] === undefined) throw new Error(`"${cmd.op}" needs "${f}"`);
  }
}

function getClient(cmd) {
  need(cmd, 'id');
  const c = clients.get(cmd.id);
  if (!c) throw new Error(`unknown client id ${JSON.stringify(cmd.id)}`);
  return c;
}

const ops = {
  connect(cmd) {
    need(cmd, 'id', 'client', 'url', 'namespaces');
    if (clients.has(cmd.id)) throw new Error(`client id ${JSON.stringify(cmd.id)} already exists`);
    if (!Array.isArray(cmd.namespaces) || cmd.namespaces.length === 0) {
      throw new Error('"namespaces" must be a non-empty array');
    }
    if (cmd.transports !== undefined && !Array.isArray(cmd.transports)) {
      throw new Error('"transports" must be an array');
    }
    const client = { kind: cmd.client, manager: null, sockets: new Map(), paused: null };
    if (cmd.client === 'v2') connectV2(cmd, client);
    else if (cmd.client === 'v4') connectV4(cmd, client);
    else throw new Error(`unknown client ${JSON.stringify(cmd.client)} (want "v2" or "v4")`);
    clients.set(cmd.id, client);
  },

  emit(cmd) {
    const client = getClient(cmd);
    need(cmd, 'ns', 'event');
    const socket = client.sockets.get(cmd.ns);
    if (!socket) throw new Error(`client ${cmd.id} has no namespace ${cmd.ns}`);
    const args = fromJson(Array.isArray(cmd.args) ? cmd.args : cmd.args === undefined ? [] : [cmd.args]);
    if (cmd.ack) {
      const { id, ns, tag } = cmd;
      args.push((...ackArgs) => report({ id, ns, type: 'ack', tag, args: toJson(ackArgs) }));
    }
    socket.emit(cmd.event, ...args);
  },

  transport(cmd) {
    const client = getClient(cmd);
    const t = transportOf(client);
    if (!t) throw new Error('no open Engine.IO connection');
    report({ id: cmd.id, type: 'transport', tag: cmd.tag, name: t.name });
  },

  pause(cmd) {
    const client = getClient(cmd);
    const t = transportOf(client);
    if (!t) throw new Error('no open Engine.IO connection');
    if (t.name !== 'websocket') throw new Error(`transport is ${t.name}, not websocket`);
    const ws = t.ws;
    const raw = ws && ws._socket; // net.Socket under the `ws` WebSocket (ws 6.x and 8.x)
    if (!raw || typeof raw.pause !== 'function') throw new Error('cannot find the TCP socket of the websocket');
    if (client.paused) {
      report({ id: cmd.id, type: 'paused', tag: cmd.tag });
      return;
    }
    if (typeof ws.pause === 'function') {
      // ws >= 8 (4.x client): pauses the net.Socket and keeps its receiver from
      // resuming it.
      ws.pause();
    } else {
      // ws 6 (2.x client): pause the net.Socket ourselves; ws would resume it when its
      // receiver drains (or on a close frame), so make resume() a no-op until `resume`.
      raw.pause();
      raw.resume = function () {
        return this;
      };
    }
    client.paused = { ws, raw };
    report({ id: cmd.id, type: 'paused', tag: cmd.tag });
  },

  resume(cmd) {
    const client = getClient(cmd);
    if (!client.paused) throw new Error('not paused');
    const { ws, raw } = client.paused;
    client.paused = null;
    if (typeof ws.pause === 'function') {
      ws.resume();
    } else {
      delete raw.resume; // back to net.Socket.prototype.resume
      raw.resume();
    }
    report({ id: cmd.id, type: 'resumed', tag: cmd.tag });
  },

  drop(cmd) {
    const client = getClient(cmd);
    const t = transportOf(client);
    if (!t) throw new Error('no open Engine.IO connection');
    const raw = t.ws && t.ws._socket;
    if (t.name === 'websocket' && raw && typeof raw.destroy === 'function') {
      raw.destroy();
    } else {
      t.close();
    }
    client.paused = null;
    report({ id: cmd.id, type: 'dropped', tag: cmd.tag });
  },

  close(cmd) {
    const client = getClient(cmd);
    clients.delete(cmd.id);
    for (const socket of client.sockets.values()) {
      try {
        socket.disconnect();
      } catch (e) {
        diag('socket.disconnect:', e && e.stack);
      }
    }
    const m = client.manager;
    try {
      if (typeof m.close === 'function') m.close(); // 2.x
      else if (typeof m._close === 'function') m._close(); // 4.x
    } catch (e) {
      diag('manager close:', e && e.stack);
    }
    // A paused TCP socket can never read the server's close handshake: drop it now.
    if (client.paused) {
      try {
        client.paused.raw.destroy();
      } catch (_) {
        /* ignore */
      }
    }
    report({ id: cmd.id, type: 'closed', tag: cmd.tag });
  },

  exit() {
    process.exit(0);
  },
};

function handleLine(line) {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    report({ type: 'error', message: 'bad JSON: ' + e.message });
    return;
  }
  if (cmd === null || typeof cmd !== 'object' || Array.isArray(cmd)) {
    report({ type: 'error', message: 'command must be a JSON object' });
    return;
  }
  const fn = Object.prototype.hasOwnProperty.call(ops, cmd.op) ? ops[cmd.op] : null;
  if (!fn) {
    report(withIds(cmd, { type: 'error', message: `unknown op ${JSON.stringify(cmd.op)}` }));
    return;
  }
  try {
    fn(cmd);
  } catch (e) {
    report(withIds(cmd, { type: 'error', message: errMessage(e) }));
  }
}

function withIds(cmd, r) {
  const out = {};
  if (cmd.id !== undefined) out.id = cmd.id;
  if (cmd.ns !== undefined) out.ns = cmd.ns;
  Object.assign(out, r);
  if (cmd.tag !== undefined) out.tag = cmd.tag;
  if (cmd.op !== undefined) out.op = cmd.op;
  return out;
}

// ---------------------------------------------------------------- main loop
process.on('uncaughtException', (e) => {
  diag('uncaught exception:', e && e.stack ? e.stack : String(e));
  report({ type: 'error', message: 'uncaught exception: ' + errMessage(e) });
});
process.on('unhandledRejection', (e) => {
  diag('unhandled rejection:', e && e.stack ? e.stack : String(e));
  report({ type: 'error', message: 'unhandled rejection: ' + errMessage(e) });
});
// The test harness going away must not leave the puppet behind.
process.stdout.on('error', () => process.exit(0));

let buf = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => {
  buf += chunk;
  let nl;
  while ((nl = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, nl);
    buf = buf.slice(nl + 1);
    handleLine(line);
  }
});
process.stdin.on('end', () => {
  if (buf.trim()) handleLine(buf);
  process.exit(0);
});

report({ type: 'ready' });
