#!/usr/bin/env node
// Smoke test of the reference peer (server.js) against the compatibility store.
//
//   bash bench/node-peer/setup.sh && node bench/node-peer/smoke.js
//
// Needs the store's venv (target/test-store/venv, installed by scripts/test) and the
// compatibility clients (tests/compat/setup.sh). Starts nx_launcher on a free port in a
// temporary directory, runs server.js against it, drives socket.io-client 4.x and 2.2.0
// through subscribe acks (spec §2), APIv3-shaped writes (spec §4) and auth changes
// (spec §6), checks /stats and a clean SIGTERM exit, then stops everything it started.
'use strict';
const path = require('path');
const os = require('os');
const fs = require('fs');
const crypto = require('crypto');
const { spawn } = require('child_process');
const assert = require('assert');
const ROOT = path.resolve(__dirname, '..', '..');
const { MongoClient, ObjectId } = require(path.join(__dirname, 'node_modules/mongodb'));
const io4 = require(path.join(ROOT, 'tests/compat/node_modules/socket.io-client-v4'));
const io2 = require(path.join(ROOT, 'tests/compat/node_modules/socket.io-client-v2'));
const SECRET = 'this is my long pass phrase';
const TOKEN = 'testsubjec-cee53db93200a08f'; // spec §6 test vector
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let passed = 0, failed = 0;
function ok (name, fn) {
  try { fn(); passed++; console.log('ok  ', name); } catch (e) { failed++; console.log('FAIL', name, e.message); }
}

const children = [];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'node-peer-smoke-'));
async function stopAll () {
  await Promise.all(children.map((c) => new Promise((resolve) => {
    if (c.exitCode !== null || c.signalCode !== null) return resolve();
    c.once('exit', resolve);
    c.kill('SIGTERM');
  })));
  fs.rmSync(tmp, { recursive: true, force: true });
}
process.on('exit', () => children.forEach((c) => c.exitCode === null && c.signalCode === null && c.kill('SIGKILL')));

function startStore () {
  const py = path.join(ROOT, 'target/test-store/venv/bin/python');
  const nx = spawn(py, [path.join(ROOT, 'tests/support/store/nx_launcher.py'), '--data-dir', tmp,
    '--host', '127.0.0.1', '-p', '0', '--pid-file', path.join(tmp, 'pid')], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.push(nx);
  return new Promise((resolve, reject) => {
    let out = '';
    nx.stdout.on('data', (d) => {
      out += d;
      const m = /ready on [^:\s]+:(\d+)/.exec(out);
      if (m) resolve(m[1]);
    });
    nx.on('exit', (c) => reject(new Error('nx_launcher exited ' + c)));
    setTimeout(() => reject(new Error('nx_launcher not ready')), 20000).unref();
  });
}

(async () => {
  const URI = `mongodb://127.0.0.1:${await startStore()}/peerchk?directConnection=true`;
  const mc = new MongoClient(URI); await mc.connect();
  const db = mc.db('peerchk');
  await db.dropDatabase().catch(() => {});
  await db.collection('auth_subjects').insertOne({ _id: new ObjectId('5f1e4b2a9c8d7e6f5a4b3c2d'), name: 'Test Subject_AAPS!', roles: ['readable'] });
  await db.collection('auth_roles').insertOne({ name: 'settingsadmin', permissions: ['api:settings:admin'] });
  await db.collection('treatments').insertOne({ warm: 1 }); // make collection exist

  const srv = spawn(process.execPath, [path.join(__dirname, 'server.js')], {
    env: { ...process.env, MONGODB_URI: URI, API_SECRET: SECRET, PORT: '0' }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(srv);
  srv.stderr.on('data', (d) => process.stderr.write('  [srv] ' + d));
  let stdout = '';
  const port = await new Promise((resolve, reject) => {
    srv.stdout.on('data', (d) => { stdout += d; const m = /^(\{.*\})\n/.exec(stdout); if (m) resolve(JSON.parse(m[1]).port); });
    srv.on('exit', (c) => reject(new Error('server exited ' + c)));
    setTimeout(() => reject(new Error('no listening line')), 15000);
  });
  ok('listening line', () => assert.strictEqual(stdout, JSON.stringify({ type: 'listening', port }) + '\n'));
  const base = `http://127.0.0.1:${port}`;

  const c4 = io4(base + '/storage', { transports: ['websocket'], reconnection: false });
  const got4 = [];
  ['create', 'update', 'delete'].forEach((n) => c4.on(n, (p) => got4.push([n, JSON.stringify(p)])));
  await new Promise((r, j) => { c4.on('connect', r); c4.on('connect_error', j); });
  const sub = (sock, msg) => new Promise((r) => sock.emit('subscribe', msg, r));
  const eio = c4.io.engine;
  const frames = [];
  eio.on('packet', (p) => { if (p.type === 'message') frames.push(p.data); });

  const a1 = await sub(c4, { accessToken: 'testsubjec-0000000000000000', collections: ['entries'] });
  ok('ack bad token', () => assert.deepStrictEqual(a1, { success: false, message: 'Missing or bad accessToken' }));
  const a1b = await sub(c4, { accessToken: 'testsubjec-cee53db93200a08', collections: ['entries'] });
  ok('ack short token (15 chars)', () => assert.deepStrictEqual(a1b, { success: false, message: 'Missing or bad accessToken' }));
  const a1c = await sub(c4, 'nope');
  ok('ack non-object', () => assert.deepStrictEqual(a1c, { success: false, message: 'Missing or bad accessToken' }));
  const a2 = await sub(c4, { accessToken: TOKEN, collections: ['settings'] });
  ok('ack settings unauthorized', () => assert.deepStrictEqual(a2, { success: false, message: 'Unauthorized to receive any collection' }));
  const a3 = await sub(c4, { accessToken: 'whatever-cee53db93200a08f2a6b', collections: ['treatments', 'foods', 'treatments'] });
  ok('ack dup kept, unknown dropped, name part unchecked', () => assert.deepStrictEqual(a3, { success: true, collections: ['treatments', 'treatments'] }));
  const tokDigest = crypto.createHash('sha1').update(TOKEN).digest('hex');
  const c4b = io4(base + '/storage', { transports: ['polling'], reconnection: false });
  await new Promise((r) => c4b.on('connect', r));
  const a4 = await sub(c4b, { accessToken: tokDigest.slice(0, 20) });
  ok('ack token-digest prefix, default collections', () => assert.deepStrictEqual(a4, { success: true, collections: ['devicestatus', 'entries', 'food', 'profile', 'treatments'] }));

  const c2 = io2(base + '/storage', { reconnection: false });
  const got2 = [];
  ['create', 'update', 'delete'].forEach((n) => c2.on(n, (p) => got2.push([n, JSON.stringify(p)])));
  await new Promise((r) => c2.on('connect', r));
  const a5 = await sub(c2, { accessToken: TOKEN, collections: ['treatments', 'entries'] });
  ok('v2 ack', () => assert.deepStrictEqual(a5, { success: true, collections: ['treatments', 'entries'] }));

  const st0 = await (await fetch(base + '/stats')).json();
  ok('stats subscriptions', () => assert.deepStrictEqual(st0.subscriptions, { devicestatus: 1, entries: 2, food: 1, profile: 1, settings: 0, treatments: 3 }));
  ok('stats sockets', () => assert.strictEqual(st0.sockets, 3));

  const T = db.collection('treatments');
  const res = await T.insertOne({ identifier: 'abc', date: 1700000000000, utcOffset: 0, app: 'AAPS', eventType: 'Note', created_at: '2023-11-14T22:13:20.000Z', srvModified: 1700000001000, srvCreated: 1700000001000, subject: 'apiAll' });
  await sleep(300);
  const expected = '{"colName":"treatments","doc":{"identifier":"abc","date":1700000000000,"utcOffset":0,"app":"AAPS","eventType":"Note","created_at":"2023-11-14T22:13:20.000Z","srvModified":1700000001000,"srvCreated":1700000001000,"subject":"apiAll"}}';
  ok('v4 create payload', () => assert.deepStrictEqual(got4, [['create', expected]]));
  ok('v4 raw frame (EIO4)', () => assert.strictEqual(frames.filter((f) => f.includes('"create"'))[0], '2/storage,["create",' + expected + ']'));
  ok('v2 create payload', () => assert.deepStrictEqual(got2, [['create', expected]]));
  got4.length = 0; got2.length = 0;

  await T.insertOne({ identifier: 'v1', date: 1, created_at: 'x' }); // APIv1-shaped: not relayed
  await db.collection('entries').insertOne({ identifier: 'e1', sgv: 100, when: new Date(Date.UTC(2023, 10, 14, 22, 13, 20)), ref: new ObjectId('5f1e4b2a9c8d7e6f5a4b3c2d'), f: 1.5, srvModified: 5, srvCreated: 5 });
  await sleep(300);
  ok('APIv1 insert skipped; entries create with date/ObjectId form', () => assert.deepStrictEqual(got2, [['create', '{"colName":"entries","doc":{"identifier":"e1","sgv":100,"when":"2023-11-14T22:13:20.000Z","ref":"5f1e4b2a9c8d7e6f5a4b3c2d","f":1.5,"srvModified":5,"srvCreated":5}}']]));
  ok('c4 not subscribed to entries', () => assert.deepStrictEqual(got4, []));
  got4.length = 0; got2.length = 0;

  const now = Date.now();
  await T.updateOne({ identifier: 'abc' }, { $set: { notes: 'patched', srvModified: now, modifiedBy: 'x' } });
  await sleep(300);
  ok('patch -> update with post-image', () => { assert.strictEqual(got4.length, 1); assert.strictEqual(got4[0][0], 'update'); const p = JSON.parse(got4[0][1]); assert.strictEqual(p.doc.notes, 'patched'); assert.strictEqual(p.doc.identifier, 'abc'); assert.ok(!('_id' in p.doc)); });
  got4.length = 0;
  await T.updateOne({ identifier: 'abc' }, { $set: { notes: 'v1 patch' } });
  await sleep(300);
  ok('update without srvModified skipped', () => assert.deepStrictEqual(got4, []));

  await T.replaceOne({ identifier: 'abc' }, { identifier: 'abc', eventType: 'Note', srvModified: Date.now(), srvCreated: 1700000001000 });
  await sleep(300);
  ok('fresh replace -> update', () => { assert.strictEqual(got4.length, 1); assert.strictEqual(got4[0][0], 'update'); });
  got4.length = 0;
  await T.replaceOne({ identifier: 'abc' }, { identifier: 'abc', eventType: 'Note', srvModified: 1700000001000, srvCreated: 1700000001000 });
  await sleep(300);
  ok('stale replace skipped', () => assert.deepStrictEqual(got4, []));

  await T.updateOne({ identifier: 'abc' }, { $set: { isValid: false, srvModified: Date.now() } });
  await sleep(300);
  ok('soft delete -> delete', () => assert.deepStrictEqual(got4, [['delete', '{"colName":"treatments","identifier":"abc"}']]));
  got4.length = 0;
  await T.deleteOne({ _id: res.insertedId });
  await sleep(300);
  ok('permanent delete -> delete with cached identifier', () => assert.deepStrictEqual(got4, [['delete', '{"colName":"treatments","identifier":"abc"}']]));
  got4.length = 0;
  const r2 = await T.insertOne({ x: 1 });
  await T.deleteOne({ _id: r2.insertedId });
  await sleep(300);
  ok('delete of never-identified doc -> _id', () => assert.deepStrictEqual(got4, [['delete', `{"colName":"treatments","identifier":"${r2.insertedId.toHexString()}"}`]]));
  got4.length = 0;

  // auth follows changes
  const sid = new ObjectId();
  await db.collection('auth_subjects').insertOne({ _id: sid, name: 'Boss', roles: ['settingsadmin'] });
  await sleep(500);
  const d = crypto.createHash('sha1').update(crypto.createHash('sha1').update(SECRET).digest('hex') + sid.toHexString()).digest('hex');
  const a6 = await sub(c4, { accessToken: 'boss-' + d.slice(0, 16), collections: ['settings', 'entries'] });
  ok('new subject with stored role (settings admin) after reload', () => assert.deepStrictEqual(a6, { success: true, collections: ['settings', 'entries'] }));
  await db.collection('auth_roles').updateOne({ name: 'settingsadmin' }, { $set: { permissions: ['api:profile:read'] } });
  await sleep(500);
  const a7 = await sub(c4, { accessToken: 'boss-' + d.slice(0, 16), collections: ['settings'] });
  ok('role change followed', () => assert.deepStrictEqual(a7, { success: false, message: 'Unauthorized to receive any collection' }));

  const st = await (await fetch(base + '/stats?reset=1')).json();
  console.log('  stats:', JSON.stringify(st));
  ok('stats events', () => { assert.strictEqual(st.events, 7); assert.strictEqual(st.fanout_ms.count, 7); assert.ok(st.fanout_ms.p50 > 0 && st.fanout_ms.p99 >= st.fanout_ms.p50); });
  const st2 = await (await fetch(base + '/stats/reset', { method: 'POST' })).json();
  ok('reset cleared samples', () => { assert.strictEqual(st2.fanout_ms.count, 0); assert.strictEqual(st2.fanout_ms.p50, null); assert.strictEqual(st2.events, 7); });
  const nf = await fetch(base + '/nothing');
  ok('404 elsewhere', () => assert.strictEqual(nf.status, 404));

  c4.close(); c4b.close(); c2.close();
  const code = await new Promise((r) => { srv.on('exit', (c, s) => r([c, s])); srv.kill('SIGTERM'); });
  ok('SIGTERM exit 0', () => assert.deepStrictEqual(code, [0, null]));
  await db.dropDatabase(); await mc.close();
  await stopAll();
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})().catch(async (e) => {
  console.error(e);
  await stopAll();
  console.log(`${passed} passed, ${failed + 1} failed`);
  process.exit(1);
});
