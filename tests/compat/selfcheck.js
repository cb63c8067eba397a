#!/usr/bin/env node
// Self-check of puppet.js against a real socket.io 4.5.4 server (allowEIO3, like
// Nightscout). Run after ./setup.sh:  node tests/compat/selfcheck.js  [-v]
// Exits 0 when every check passed; prints one line per check and "N passed, N failed".
'use strict';

const http = require('http');
const path = require('path');
const assert = require('assert/strict');
const { spawn } = require('child_process');
const { Server } = require('socket.io');

const VERBOSE = process.argv.includes('-v');
const log = (...a) => VERBOSE && console.error('  ·', ...a);

// ------------------------------------------------------------------ server
const state = {
  wire: [], // Engine.IO packets seen by the server: {dir, sid, eio, type, data}
  handshakes: [], // /storage connections: {id, eio, query, auth}
  received: [], // events the server got: {ns, name, args}
  disconnects: [], // {ns, reason}
  floods: [], // backlog measurements while flooding
};
const httpServer = http.createServer();
const io = new Server(httpServer, {
  allowEIO3: true,
  pingInterval: 25000,
  pingTimeout: 20000,
  maxHttpBufferSize: 1e6,
});
io.engine.on('connection', (conn) => {
  const sid = conn.id;
  const eio = conn.protocol;
  conn.on('packet', (p) => state.wire.push({ dir: 'in', sid, eio, type: p.type, data: p.data }));
  conn.on('packetCreate', (p) => state.wire.push({ dir: 'out', sid, eio, type: p.type, data: p.data }));
});
io.of('/').on('connection', (socket) => {
  socket.on('disconnect', (reason) => state.disconnects.push({ ns: '/', reason }));
});

const storage = io.of('/storage');
storage.use((socket, next) => {
  const q = socket.handshake.query || {};
  const a = socket.handshake.auth || {};
  if (q.deny || a.deny) {
    const err = new Error('denied by middleware');
    if (a.deny === 'with-data' || q.deny === 'with-data') err.data = { code: 42, why: 'test' };
    return next(err);
  }
  next();
});
storage.on('connection', (socket) => {
  state.handshakes.push({
    id: socket.id,
    eio: socket.conn.protocol,
    query: { ...socket.handshake.query },
    auth: { ...socket.handshake.auth },
  });
  socket.on('subscribe', (payload, ack) => {
    state.received.push({ ns: '/storage', name: 'subscribe', args: [payload] });
    const cols = payload && Array.isArray(payload.collections) ? payload.collections : ['entries'];
    for (const c of cols) socket.join(c);
    if (typeof ack === 'function') ack({ success: true, collections: cols });
    setImmediate(() =>
      storage.to(cols[0]).emit('create', {
        colName: cols[0],
        doc: { identifier: 'abc', date: 1700000000000, srvModified: 1700000001000, nested: { a: [1, 'x', null] } },
      }),
    );
  });
  socket.on('echo', (...args) => {
    const ack = typeof args[args.length - 1] === 'function' ? args.pop() : null;
    state.received.push({ ns: '/storage', name: 'echo', args });
    if (ack) ack(...args);
  });
  socket.on('ask-ack', () => socket.emit('needs-ack', 7, () => {}));
  socket.on('kick', () => socket.disconnect(true));
  socket.on('drop-transport', () => socket.conn.close());
  socket.on('flood', ({ n, size }) => {
    const blob = 'x'.repeat(size);
    // Half now, half on a later tick: the later half then waits in the Engine.IO
    // socket's own writeBuffer while the transport is stuck on a full TCP window.
    const half = Math.floor(n / 2);
    for (let i = 0; i < half; i++) socket.emit('flood', i, blob);
    setTimeout(() => {
      for (let i = half; i < n; i++) socket.emit('flood', i, blob);
    }, 200);
    const measure = (label) => {
      const ws = socket.conn.transport && socket.conn.transport.socket;
      state.floods.push({
        label,
        transport: socket.conn.transport.name,
        transportWritable: socket.conn.transport.writable,
        engineWriteBuffer: socket.conn.writeBuffer.length,
        wsBufferedAmount: ws && typeof ws.bufferedAmount === 'number' ? ws.bufferedAmount : null,
        tcpWritableLength: ws && ws._socket ? ws._socket.writableLength : null,
      });
    };
    measure('right after emitting');
    setTimeout(() => measure('after 1 s'), 1000);
  });
  socket.on('disconnect', (reason) => state.disconnects.push({ ns: '/storage', reason }));
});

// ------------------------------------------------------------------ puppet harness
class Puppet {
  constructor() {
    this.proc = spawn(process.execPath, [path.join(__dirname, 'puppet.js')], {
      stdio: ['pipe', 'pipe', VERBOSE ? 'inherit' : 'ignore'],
    });
    this.reports = [];
    this.waiters = [];
    this.badLines = [];
    this.exited = new Promise((res) => this.proc.on('exit', (code, signal) => res({ code, signal })));
    let buf = '';
    this.proc.stdout.setEncoding('utf8');
    this.proc.stdout.on('data', (chunk) => {
      buf += chunk;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let obj;
        try {
          obj = JSON.parse(line);
        } catch (_) {
          this.badLines.push(line);
          continue;
        }
        if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
          this.badLines.push(line);
          continue;
        }
        log('<-', line.length > 300 ? line.slice(0, 300) + '…' : line);
        this.reports.push(obj);
        this.poke();
      }
    });
  }
  send(cmd) {
    const line = typeof cmd === 'string' ? cmd : JSON.stringify(cmd);
    log('->', line);
    this.proc.stdin.write(line + '\n');
  }
  poke() {
    for (const w of this.waiters.slice()) {
      const i = this.reports.findIndex(w.pred);
      if (i >= 0) {
        const [r] = this.reports.splice(i, 1);
        this.waiters.splice(this.waiters.indexOf(w), 1);
        clearTimeout(w.timer);
        w.resolve(r);
      }
    }
  }
  // Resolves with (and consumes) the first report matching `pred`.
  waitFor(pred, what, ms = 5000) {
    if (typeof pred === 'object') {
      const want = pred;
      pred = (r) => Object.entries(want).every(([k, v]) => r[k] === v);
      what = what || JSON.stringify(want);
    }
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`timed out waiting for ${what}; unconsumed: ${JSON.stringify(this.reports).slice(0, 800)}`));
      }, ms);
      this.waiters.push(w);
      this.poke();
    });
  }
  // Consumes and returns every report currently matching `pred`.
  take(pred) {
    const out = [];
    for (let i = 0; i < this.reports.length; ) {
      if (pred(this.reports[i])) out.push(...this.reports.splice(i, 1));
      else i++;
    }
    return out;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(fn, what, ms = 5000, step = 50) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out: ' + what);
    await sleep(step);
  }
}

// ------------------------------------------------------------------ checks
let passed = 0;
let failed = 0;
async function check(name, fn) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n     ${(e && e.stack) || e}`.replace(/\n/g, '\n     '));
  }
}

async function scenario(p, url, client, transports) {
  const id = `${client}-${transports.join('+')}`;
  const label = `${client} ${transports.join('+')}`;
  const hsBefore = state.handshakes.length;
  const wireBefore = state.wire.length;

  await check(`${label}: multiplexed /storage connects, /alarm gets connect_error`, async () => {
    p.send({ op: 'connect', id, client, url, namespaces: ['/storage', '/alarm'], transports, query: { x: '1' } });
    await p.waitFor({ id, ns: '/storage', type: 'connect' });
    const ce = await p.waitFor({ id, ns: '/alarm', type: 'connect_error' });
    assert.equal(ce.message, 'Invalid namespace');
    if (client === 'v2') assert.deepEqual(ce.raw, { message: 'Invalid namespace' });
    // Both namespaces over ONE Engine.IO connection.
    const sids = new Set(
      state.wire
        .slice(wireBefore)
        .filter((w) => w.dir === 'in' && w.type === 'message' && /^0\/(storage|alarm)/.test(w.data))
        .map((w) => w.sid),
    );
    assert.equal(sids.size, 1, 'one Engine.IO session for both namespaces');
  });

  await check(`${label}: query reaches the server`, async () => {
    await until(() => state.handshakes.length > hsBefore, 'handshake');
    const hs = state.handshakes[state.handshakes.length - 1];
    const connects = state.wire.slice(wireBefore).filter((w) => w.dir === 'in' && w.type === 'message' && w.data.startsWith('0'));
    log('handshake', JSON.stringify(hs), 'CONNECT packets', JSON.stringify(connects.map((w) => '4' + w.data)));
    if (client === 'v2') {
      assert.equal(hs.eio, 3);
      assert.deepEqual(connects.map((w) => '4' + w.data), ['40/storage?x=1,', '40/alarm?x=1,']);
      assert.equal(hs.auth.x, '1', 'socket.io 4 hands the EIO3 CONNECT query over as handshake.auth');
      assert.equal(hs.query.x, undefined, 'and not as handshake.query');
    } else {
      assert.equal(hs.eio, 4);
      assert.deepEqual(connects.map((w) => '4' + w.data), ['40/storage,', '40/alarm,']);
      assert.equal(hs.query.x, '1');
      assert.equal(hs.query.EIO, '4');
    }
  });

  await check(`${label}: subscribe ack and create event`, async () => {
    p.send({ op: 'emit', id, ns: '/storage', event: 'subscribe', args: [{ accessToken: 't', collections: ['entries'] }], ack: true, tag: 's1' });
    const ack = await p.waitFor({ id, ns: '/storage', type: 'ack', tag: 's1' });
    assert.deepEqual(ack.args, [{ success: true, collections: ['entries'] }]);
    const ev = await p.waitFor({ id, ns: '/storage', type: 'event', name: 'create' });
    assert.deepEqual(ev.args, [
      { colName: 'entries', doc: { identifier: 'abc', date: 1700000000000, srvModified: 1700000001000, nested: { a: [1, 'x', null] } } },
    ]);
    assert.equal(ev.ackRequested, undefined);
  });

  await check(`${label}: transport reaches websocket`, async () => {
    let name;
    await until(
      async () => {
        p.send({ op: 'transport', id, tag: 'tr' });
        name = (await p.waitFor({ id, type: 'transport', tag: 'tr' })).name;
        return name === 'websocket';
      },
      `upgrade (last ${name})`,
    );
  });

  await check(`${label}: binary args and multi-arg ack round-trip`, async () => {
    const before = state.received.length;
    const args = ['a', { $binary: 'AAEC/w==' }, { nested: { $binary: 'aGk=' }, n: 1.5 }, null, [true]];
    p.send({ op: 'emit', id, ns: '/storage', event: 'echo', args, ack: true, tag: 'e1' });
    const ack = await p.waitFor({ id, ns: '/storage', type: 'ack', tag: 'e1' });
    assert.deepEqual(ack.args, args);
    const got = state.received.slice(before).find((r) => r.name === 'echo');
    assert.ok(Buffer.isBuffer(got.args[1]) && got.args[1].equals(Buffer.from([0, 1, 2, 255])), 'server got a Buffer');
    assert.ok(Buffer.isBuffer(got.args[2].nested));
  });

  await check(`${label}: emit without ack, event with server ack request`, async () => {
    p.send({ op: 'emit', id, ns: '/storage', event: 'ask-ack', args: [], ack: false, tag: 'a1' });
    const ev = await p.waitFor({ id, ns: '/storage', type: 'event', name: 'needs-ack' });
    assert.deepEqual(ev.args, [7]);
    assert.equal(ev.ackRequested, true);
  });

  await check(`${label}: pause backs the server up, resume delivers everything`, async () => {
    p.send({ op: 'pause', id, tag: 'p1' });
    await p.waitFor({ id, type: 'paused', tag: 'p1' });
    const n = 200;
    const f0 = state.floods.length;
    p.send({ op: 'emit', id, ns: '/storage', event: 'flood', args: [{ n, size: 50000 }] });
    await until(() => state.floods.length >= f0 + 2, 'flood measurements', 5000);
    const [m0, m1] = state.floods.slice(f0);
    log('flood backlog', JSON.stringify(m0), JSON.stringify(m1));
    const backlog = (m) => m.engineWriteBuffer + (m.wsBufferedAmount || 0) + (m.tcpWritableLength || 0);
    // 200 x 50 kB = 10 MB; the kernels absorb ~4 MB (server send queue) + ~128 kB
    // (client receive queue), the rest must still be waiting in the server.
    assert.equal(m1.transportWritable, false, `server transport stuck after 1 s: ${JSON.stringify(m1)}`);
    assert.ok(m1.engineWriteBuffer > 0, `later emits queue in the Engine.IO writeBuffer: ${JSON.stringify(m1)}`);
    assert.ok(backlog(m1) > 0);
    const early = p.take((r) => r.id === id && r.name === 'flood');
    assert.equal(early.length, 0, 'no flood event reaches the paused client');
    p.send({ op: 'pause', id, tag: 'p2' }); // pausing twice is harmless
    await p.waitFor({ id, type: 'paused', tag: 'p2' });
    p.send({ op: 'resume', id, tag: 'r1' });
    await p.waitFor({ id, type: 'resumed', tag: 'r1' });
    for (let i = 0; i < n; i++) {
      const ev = await p.waitFor((r) => r.id === id && r.type === 'event' && r.name === 'flood', `flood ${i}`, 10000);
      assert.equal(ev.args[0], i, 'flood events in order');
      assert.equal(ev.args[1].length, 50000);
    }
  });

  await check(`${label}: close`, async () => {
    const d0 = state.disconnects.length;
    p.send({ op: 'close', id, tag: 'c1' });
    const storageDisc = await p.waitFor({ id, ns: '/storage', type: 'disconnect' });
    assert.equal(storageDisc.reason, 'io client disconnect');
    await p.waitFor({ id, type: 'closed', tag: 'c1' });
    await until(() => state.disconnects.slice(d0).some((d) => d.ns === '/storage'), 'server-side disconnect');
    log('server disconnects', JSON.stringify(state.disconnects.slice(d0)));
    p.send({ op: 'transport', id, tag: 'gone' });
    const err = await p.waitFor({ id, type: 'error', tag: 'gone' });
    assert.match(err.message, /unknown client id/);
  });
}

async function main() {
  await new Promise((res) => httpServer.listen(0, '127.0.0.1', res));
  const url = `http://127.0.0.1:${httpServer.address().port}`;
  const p = new Puppet();

  await check('puppet prints ready', async () => {
    await p.waitFor({ type: 'ready' });
  });

  for (const client of ['v2', 'v4']) {
    for (const transports of [['polling', 'websocket'], ['websocket']]) {
      await scenario(p, url, client, transports);
    }
  }

  for (const client of ['v2', 'v4']) {
    await check(`${client}: polling only; pause is refused on polling`, async () => {
      const id = `${client}-poll`;
      p.send({ op: 'connect', id, client, url, namespaces: ['/storage'], transports: ['polling'] });
      await p.waitFor({ id, ns: '/storage', type: 'connect' });
      p.send({ op: 'transport', id, tag: 't' });
      assert.equal((await p.waitFor({ id, type: 'transport', tag: 't' })).name, 'polling');
      p.send({ op: 'pause', id, tag: 'p' });
      const err = await p.waitFor({ id, type: 'error', tag: 'p' });
      assert.match(err.message, /not websocket/);
      p.send({ op: 'emit', id, ns: '/storage', event: 'subscribe', args: [{ collections: ['treatments'] }], ack: true, tag: 's' });
      await p.waitFor({ id, type: 'ack', tag: 's' });
      await p.waitFor({ id, type: 'event', name: 'create' });
      // Binary over long-polling (EIO3 polling from Node asks for b64=1).
      const args = [{ $binary: 'AAEC/w==' }, 'z'];
      p.send({ op: 'emit', id, ns: '/storage', event: 'echo', args, ack: true, tag: 'b' });
      assert.deepEqual((await p.waitFor({ id, type: 'ack', tag: 'b' })).args, args);
      p.send({ op: 'close', id, tag: 'c' });
      await p.waitFor({ id, type: 'closed', tag: 'c' });
    });

    await check(`${client}: middleware refusal is a connect_error`, async () => {
      const id = `${client}-deny`;
      const cmd = { op: 'connect', id, client, url, namespaces: ['/storage'], transports: ['websocket'] };
      if (client === 'v2') cmd.query = { deny: 'with-data' };
      else cmd.auth = { deny: 'with-data' };
      p.send(cmd);
      const ce = await p.waitFor({ id, ns: '/storage', type: 'connect_error' });
      log('middleware connect_error', JSON.stringify(ce));
      if (client === 'v2') {
        // socket.io 4 sends EIO3 clients `err.data || err.message` only.
        assert.deepEqual(ce.raw, { code: 42, why: 'test' });
      } else {
        assert.equal(ce.message, 'denied by middleware');
        assert.deepEqual(ce.data, { code: 42, why: 'test' });
      }
      p.send({ op: 'close', id, tag: 'c' });
      await p.waitFor({ id, type: 'closed', tag: 'c' });
    });

    await check(`${client}: server-side disconnect is reported`, async () => {
      const id = `${client}-kick`;
      p.send({ op: 'connect', id, client, url, namespaces: ['/storage'], transports: ['websocket'] });
      await p.waitFor({ id, ns: '/storage', type: 'connect' });
      p.send({ op: 'emit', id, ns: '/storage', event: 'kick', args: [] });
      const d = await p.waitFor({ id, ns: '/storage', type: 'disconnect' });
      assert.equal(d.reason, 'io server disconnect');
      p.send({ op: 'close', id, tag: 'c' });
      await p.waitFor({ id, type: 'closed', tag: 'c' });
    });

    await check(`${client}: reconnection:true reconnects after a transport drop`, async () => {
      const id = `${client}-reconnect`;
      p.send({ op: 'connect', id, client, url, namespaces: ['/storage'], transports: ['websocket'], reconnection: true });
      await p.waitFor({ id, ns: '/storage', type: 'connect' });
      p.send({ op: 'emit', id, ns: '/storage', event: 'drop-transport', args: [] });
      const d = await p.waitFor({ id, ns: '/storage', type: 'disconnect' });
      assert.equal(d.reason, 'transport close');
      await p.waitFor({ id, ns: '/storage', type: 'connect' }, 'reconnect', 8000);
      p.send({ op: 'close', id, tag: 'c' });
      await p.waitFor({ id, type: 'closed', tag: 'c' });
    });

    await check(`${client}: reconnection off: a transport drop stays down`, async () => {
      const id = `${client}-noreconnect`;
      p.send({ op: 'connect', id, client, url, namespaces: ['/storage', '/'], transports: ['websocket'] });
      await p.waitFor({ id, ns: '/storage', type: 'connect' });
      await p.waitFor({ id, ns: '/', type: 'connect' });
      p.send({ op: 'emit', id, ns: '/storage', event: 'drop-transport', args: [] });
      assert.equal((await p.waitFor({ id, ns: '/storage', type: 'disconnect' })).reason, 'transport close');
      assert.equal((await p.waitFor({ id, ns: '/', type: 'disconnect' })).reason, 'transport close');
      await sleep(2500);
      assert.equal(p.take((r) => r.id === id && r.type === 'connect').length, 0);
      p.send({ op: 'close', id, tag: 'c' });
      await p.waitFor({ id, type: 'closed', tag: 'c' });
    });

    await check(`${client}: refused TCP connection is a connect_error`, async () => {
      const id = `${client}-refused`;
      const dead = http.createServer();
      await new Promise((res) => dead.listen(0, '127.0.0.1', res));
      const port = dead.address().port;
      await new Promise((res) => dead.close(res));
      p.send({ op: 'connect', id, client, url: `http://127.0.0.1:${port}`, namespaces: ['/storage'], transports: ['websocket'] });
      const ce = await p.waitFor({ id, ns: '/storage', type: 'connect_error' });
      log('refused', JSON.stringify(ce));
      p.send({ op: 'close', id, tag: 'c' });
      await p.waitFor({ id, type: 'closed', tag: 'c' });
    });
  }

  await check('bad input is reported, never fatal', async () => {
    p.send('this is not json');
    assert.match((await p.waitFor({ type: 'error' })).message, /bad JSON/);
    p.send('[1,2]');
    await p.waitFor({ type: 'error' });
    p.send({ op: 'frobnicate', tag: 'x' });
    assert.match((await p.waitFor({ type: 'error', tag: 'x' })).message, /unknown op/);
    p.send({ op: 'emit', id: 'nobody', ns: '/storage', event: 'x', tag: 'y' });
    assert.match((await p.waitFor({ type: 'error', tag: 'y' })).message, /unknown client id/);
    p.send({ op: 'connect', id: 'bad', client: 'v3', url, namespaces: ['/storage'], tag: 'z' });
    assert.match((await p.waitFor({ type: 'error', tag: 'z' })).message, /unknown client/);
    p.send({ op: 'connect', id: 'v4r', client: 'v4', url, namespaces: ['/storage'], transports: ['websocket'] });
    await p.waitFor({ id: 'v4r', ns: '/storage', type: 'connect' });
    p.send({ op: 'connect', id: 'v4r', client: 'v4', url, namespaces: ['/storage'], tag: 'dup' });
    assert.match((await p.waitFor({ type: 'error', tag: 'dup' })).message, /already exists/);
    p.send({ op: 'emit', id: 'v4r', ns: '/nope', event: 'x', tag: 'ns' });
    assert.match((await p.waitFor({ type: 'error', tag: 'ns' })).message, /no namespace/);
    p.send({ op: 'emit', id: 'v4r', ns: '/storage', event: 'connect', tag: 'res' });
    assert.match((await p.waitFor({ type: 'error', tag: 'res' })).message, /reserved/);
    p.send({ op: 'close', id: 'v4r', tag: 'c' });
    await p.waitFor({ id: 'v4r', type: 'closed', tag: 'c' });
  });

  await check('stdout carried only JSON objects; nothing unconsumed', async () => {
    await sleep(200);
    assert.deepEqual(p.badLines, []);
    log('left over', JSON.stringify(p.reports));
    const left = p.reports.filter((r) => r.type !== 'disconnect' && r.type !== 'connect_error');
    assert.deepEqual(left, []);
  });

  await check('exit op exits 0', async () => {
    p.send({ op: 'exit' });
    const { code } = await p.exited;
    assert.equal(code, 0);
  });

  if (VERBOSE) {
    console.error('wire sample (EIO3 CONNECT / ERROR):');
    for (const w of state.wire.filter((w) => w.eio === 3 && w.type === 'message' && /^[04]/.test(w.data)).slice(0, 6)) {
      console.error(`  ${w.dir} 4${w.data}`);
    }
  }
  io.close();
  httpServer.close();
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
