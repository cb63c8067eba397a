#!/usr/bin/env node
// Reference peer for nsbridge's benchmarks: Nightscout's APIv3 `/storage` Socket.IO
// channel, written the way Nightscout 15 writes it, but fed by a MongoDB change stream
// instead of Nightscout's in-process bus (so both sides see the same writes).
//
// What is Nightscout's own way here (see shared spec storage-channel.md):
//   - socket.io 4.5.4, allowEIO3, pingInterval 25000, pingTimeout 20000,
//     maxHttpBufferSize 1e6; `/storage` namespace; `subscribe` joins one room per
//     granted collection; events go out as `namespace.to(colName).emit(name, event)`
//     (socket.io encodes the packet once per broadcast, JSON.stringify over the driver's
//     objects: ObjectId -> hex, Date -> ISO string).
//   - access tokens: sha1 digests of API_SECRET and the subject's _id, subjects sorted by
//     name, one shiro-trie per role (stored roles, built-in roles, AUTH_DEFAULT_ROLES),
//     checked with `checkMultiple` as lib/authorization does.
// What Nightscout does not have, added per spec (kept minimal):
//   - one database-level change stream (fullDocument: updateLookup) mapped as relay mode
//     `apiv3` (spec §4); a bounded identifier cache for deletes.
//   - subjects and roles reloaded on a change stream of the auth collections.
//   - instrumentation: the time from a change event's arrival in the handler to the
//     return of `emit`, exposed with counts on GET /stats.
//
// Environment:
//   MONGODB_URI        required, with the database in its path
//   API_SECRET         required, at least 12 characters
//   PORT               listen port (0 or unset: any free port); HOST (default 127.0.0.1)
//   AUTH_DEFAULT_ROLES default "readable" (split on commas, spaces and colons)
//   MONGO_AUTHENTICATION_COLLECTIONS_PREFIX  default "auth_"
//   collection names as Nightscout reads them: ENTRIES_COLLECTION / MONGO_COLLECTION,
//     MONGO_TREATMENTS_COLLECTION, MONGO_DEVICESTATUS_COLLECTION, MONGO_PROFILE_COLLECTION,
//     MONGO_FOOD_COLLECTION, MONGO_SETTINGS_COLLECTION
//   REPLACE_WINDOW_SECS default 60; IDENTIFIER_CACHE_SIZE default 100000
//   STATS_MAX_SAMPLES   default 1000000 (latency samples kept; oldest overwritten)
//   LOG_CONNECTIONS=1   log every connect/disconnect (Nightscout does; off by default so
//                       that a benchmark's connection ramp does not measure logging)
//
// Output: one line {"type":"listening","port":N} on stdout once the change streams are
// open and the subjects and roles are loaded; everything else goes to stderr.
// HTTP: GET /stats -> {"events","skipped","fanout_ms":{"p50","p99","max","mean","count"},
//   "sockets","connections","subscriptions":{collection: sockets in its room}};
//   POST /stats/reset or GET /stats?reset=1 -> the same, then the samples are cleared.

'use strict';

const http = require('http');
const crypto = require('crypto');
const { MongoClient } = require('mongodb');
const { Server } = require('socket.io');
const shiroTrie = require('shiro-trie');

// Nothing but the ready line goes to stdout.
const writeOut = process.stdout.write.bind(process.stdout);
for (const k of ['log', 'info', 'debug']) {
  console[k] = (...a) => console.error(...a);
}
function log (...a) {
  process.stderr.write('[node-peer] ' + a.join(' ') + '\n');
}

// ---------------------------------------------------------------- settings

function envFirst (...names) {
  for (const name of names) {
    const v = process.env[name];
    if (v !== undefined && v.trim() !== '') return v.trim();
  }
  return undefined;
}

function fail (message) {
  process.stderr.write('node-peer: ' + message + '\n');
  process.exit(2);
}

const MONGODB_URI = envFirst('MONGODB_URI') || fail('MONGODB_URI is required');
const API_SECRET = process.env.API_SECRET || fail('API_SECRET is required');
if (API_SECRET.length < 12) fail('API_SECRET must have at least 12 characters');
const HOST = envFirst('HOST') || '127.0.0.1';
const PORT = Number(envFirst('PORT') || 0);
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) fail('PORT is not a port number');
const AUTH_DEFAULT_ROLES = (process.env.AUTH_DEFAULT_ROLES === undefined
  ? 'readable' : process.env.AUTH_DEFAULT_ROLES).split(/[, :]/);
const AUTH_PREFIX = envFirst('MONGO_AUTHENTICATION_COLLECTIONS_PREFIX') || 'auth_';
const REPLACE_WINDOW_MS = Number(envFirst('REPLACE_WINDOW_SECS') || 60) * 1000;
const IDENTIFIER_CACHE_SIZE = Number(envFirst('IDENTIFIER_CACHE_SIZE') || 100000);
const STATS_MAX_SAMPLES = Number(envFirst('STATS_MAX_SAMPLES') || 1000000);
const LOG_CONNECTIONS = envFirst('LOG_CONNECTIONS') === '1';

// Logical collection names, in the order a subscribe without `collections` asks for them.
const ENABLED_COLLECTIONS = ['devicestatus', 'entries', 'food', 'profile', 'settings', 'treatments'];
const MONGO_NAMES = {
  devicestatus: envFirst('MONGO_DEVICESTATUS_COLLECTION') || 'devicestatus',
  entries: envFirst('ENTRIES_COLLECTION', 'MONGO_COLLECTION') || 'entries',
  food: envFirst('MONGO_FOOD_COLLECTION') || 'food',
  profile: envFirst('MONGO_PROFILE_COLLECTION') || 'profile',
  settings: envFirst('MONGO_SETTINGS_COLLECTION') || 'settings',
  treatments: envFirst('MONGO_TREATMENTS_COLLECTION') || 'treatments'
};
const LOGICAL_BY_MONGO = new Map(ENABLED_COLLECTIONS.map((c) => [MONGO_NAMES[c], c]));

const MSG_BAD_TOKEN = 'Missing or bad accessToken';
const MSG_UNAUTHORIZED = 'Unauthorized to receive any collection';

// ---------------------------------------------------------------- authorization

function sha1 (message) {
  return crypto.createHash('sha1').update(message).digest('hex');
}

const API_SECRET_SHA1 = sha1(API_SECRET);

const BUILT_IN_ROLES = [
  { name: 'admin', permissions: ['*'] },
  { name: 'denied', permissions: [] },
  { name: 'status-only', permissions: ['api:status:read'] },
  { name: 'readable', permissions: ['*:*:read'] },
  { name: 'careportal', permissions: ['api:treatments:create'] },
  { name: 'devicestatus-upload', permissions: ['api:devicestatus:create'] },
  { name: 'activity', permissions: ['api:activity:create'] }
];

const authStore = { roles: [], subjects: [] };

async function reloadAuth (db) {
  const roles = await db.collection(AUTH_PREFIX + 'roles').find({}).sort({ name: 1 }).toArray();
  for (const role of BUILT_IN_ROLES) {
    if (!roles.some((r) => r.name === role.name)) roles.push(role);
  }
  roles.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

  const subjects = await db.collection(AUTH_PREFIX + 'subjects').find({}).sort({ name: 1 }).toArray();
  for (const subject of subjects) {
    subject.digest = sha1(API_SECRET_SHA1 + subject._id.toString());
    const abbrev = String(subject.name || '').toLowerCase().replace(/\W/g, '').substring(0, 10);
    subject.accessToken = abbrev + '-' + subject.digest.substring(0, 16);
    subject.accessTokenDigest = sha1(subject.accessToken);
  }

  authStore.roles = roles;
  authStore.subjects = subjects;
  log(`auth loaded: ${subjects.length} subjects, ${roles.length} roles`);
}

function roleToShiro (roleName) {
  const role = authStore.roles.find((r) => r.name === roleName);
  if (!role) return null;
  const shiro = shiroTrie.new();
  shiro.add(Array.isArray(role.permissions) ? role.permissions : []);
  return shiro;
}

function rolesToShiros (roleNames) {
  return (Array.isArray(roleNames) ? roleNames : []).map(roleToShiro).filter(Boolean);
}

function findSubject (accessToken) {
  const prefix = accessToken.split('-').pop();
  if (prefix.length < 16) return null;
  return authStore.subjects.find((subject) =>
    subject.accessTokenDigest.indexOf(accessToken) === 0 || subject.digest.indexOf(prefix) === 0
  ) || null;
}

// As lib/authorization's resolveAccessToken: the subject's role shiros plus the default ones.
function resolveAccessToken (accessToken) {
  const subject = findSubject(accessToken);
  if (!subject) return null;
  return { subject, shiros: rolesToShiros(subject.roles).concat(rolesToShiros(AUTH_DEFAULT_ROLES)) };
}

function checkMultiple (permission, shiros) {
  return shiros.some((shiro) => shiro.check(permission));
}

// ---------------------------------------------------------------- Socket.IO

const stats = {
  events: 0,
  skipped: 0,
  samples: new Float64Array(STATS_MAX_SAMPLES),
  recorded: 0, // samples since the last reset (the ring keeps the newest STATS_MAX_SAMPLES)
  reset () {
    this.recorded = 0;
  }
};

const httpServer = http.createServer(handleHttp);
const io = new Server(httpServer, {
  allowEIO3: true,
  pingInterval: 25000,
  pingTimeout: 20000,
  maxHttpBufferSize: 1e6
});
const storage = io.of('/storage');

storage.on('connection', (socket) => {
  if (LOG_CONNECTIONS) log('connection from client ID:', socket.client.id);
  socket.on('disconnect', (reason) => {
    if (LOG_CONNECTIONS) log('disconnected client ID:', socket.client.id, reason);
  });
  socket.on('subscribe', (message, returnCallback) => subscribe(socket, message, returnCallback));
});

function subscribe (socket, message, returnCallback) {
  const callBack = typeof returnCallback === 'function' ? returnCallback : () => {};
  const accessToken = message !== null && typeof message === 'object' ? message.accessToken : undefined;
  const auth = typeof accessToken === 'string' && accessToken !== '' ? resolveAccessToken(accessToken) : null;
  if (!auth) {
    log('subscribe: missing or bad accessToken');
    return callBack({ success: false, message: MSG_BAD_TOKEN });
  }

  const cols = Array.isArray(message.collections) ? message.collections : ENABLED_COLLECTIONS;
  const subscribed = [];
  for (const col of cols) {
    if (ENABLED_COLLECTIONS.includes(col)) {
      const permission = col === 'settings' ? `api:${col}:admin` : `api:${col}:read`;
      if (checkMultiple(permission, auth.shiros)) {
        socket.join(col);
        subscribed.push(col);
      }
    }
  }
  callBack(subscribed.length > 0
    ? { success: true, collections: subscribed }
    : { success: false, message: MSG_UNAUTHORIZED });
}

// ---------------------------------------------------------------- change events (spec §4, apiv3)

// _id (as a string) -> identifier, per collection; bounded, oldest entry evicted first.
const identifiers = new Map();

function idString (value) {
  if (typeof value === 'string') return value;
  if (value && typeof value.toHexString === 'function') return value.toHexString();
  return String(value);
}

function identifierOf (doc, id) {
  return doc.identifier ? idString(doc.identifier) : id;
}

function remember (key, doc, id) {
  identifiers.delete(key);
  identifiers.set(key, identifierOf(doc, id));
  if (identifiers.size > IDENTIFIER_CACHE_SIZE) {
    identifiers.delete(identifiers.keys().next().value);
  }
}

function isNumber (value) {
  return (typeof value === 'number' && Number.isFinite(value)) ||
    (value !== null && typeof value === 'object' && value._bsontype === 'Long');
}

function wallTimeMs (change) {
  if (change.wallTime instanceof Date) return change.wallTime.getTime();
  if (change.clusterTime && typeof change.clusterTime.getHighBitsUnsigned === 'function') {
    return change.clusterTime.getHighBitsUnsigned() * 1000;
  }
  return undefined;
}

// One change event -> [eventName, payload] or null (not relayed).
function mapChange (change) {
  const colName = change.ns && LOGICAL_BY_MONGO.get(change.ns.coll);
  if (!colName || !change.documentKey) return null;
  const id = idString(change.documentKey._id);
  const key = colName + '\u0000' + id;
  const doc = change.fullDocument;

  switch (change.operationType) {
    case 'insert':
      if (!doc) return null;
      remember(key, doc, id);
      if (!(isNumber(doc.srvModified) && isNumber(doc.srvCreated))) return null;
      delete doc._id;
      return ['create', { colName, doc }];

    case 'update': {
      const updated = change.updateDescription && change.updateDescription.updatedFields;
      if (!updated) return null;
      if (doc) remember(key, doc, id);
      if (!Object.prototype.hasOwnProperty.call(updated, 'srvModified')) return null;
      if (updated.isValid === false) {
        const identifier = doc ? identifierOf(doc, id) : (identifiers.get(key) || id);
        return ['delete', { colName, identifier }];
      }
      if (!doc) return null; // the document is already gone
      delete doc._id;
      return ['update', { colName, doc }];
    }

    case 'replace': {
      if (!doc) return null;
      remember(key, doc, id);
      const wall = wallTimeMs(change);
      if (!isNumber(doc.srvModified) || wall === undefined ||
          Math.abs(Number(doc.srvModified) - wall) > REPLACE_WINDOW_MS) {
        return null;
      }
      delete doc._id;
      return ['update', { colName, doc }];
    }

    case 'delete': {
      const identifier = identifiers.get(key) || id;
      identifiers.delete(key);
      return ['delete', { colName, identifier }];
    }

    default: // drop, rename: no client event
      return null;
  }
}

function onChange (change) {
  const arrived = process.hrtime.bigint();
  const mapped = mapChange(change);
  if (mapped === null) {
    stats.skipped++;
    return;
  }
  storage.to(mapped[1].colName).emit(mapped[0], mapped[1]);
  const ms = Number(process.hrtime.bigint() - arrived) / 1e6;
  stats.samples[stats.recorded % STATS_MAX_SAMPLES] = ms;
  stats.recorded++;
  stats.events++;
}

// ---------------------------------------------------------------- change streams

const NON_RESUMABLE_TOKEN_ERRORS = new Set([260, 280, 286]);
let shuttingDown = false;
const streams = new Set();

// Opens db.watch(pipeline) and resolves once its cursor is established. On a
// non-resumable error or an invalidate it reopens (after the last token when usable);
// resumable errors are retried inside the driver.
function openStream (db, label, pipeline, options, handler) {
  return new Promise((resolve, reject) => {
    let opened = false;
    let resumeToken = options.resumeAfter;
    const start = (watchOptions) => {
      if (shuttingDown) return;
      const stream = db.watch(pipeline, watchOptions);
      streams.add(stream);
      stream.cursor.once('init', () => {
        if (!opened) {
          opened = true;
          resolve();
        }
      });
      stream.on('change', (change) => {
        resumeToken = change._id;
        handler(change);
      });
      let reopening = false;
      const reopen = (err) => {
        if (reopening) return;
        reopening = true;
        streams.delete(stream);
        stream.close().catch(() => {});
        if (shuttingDown) return;
        if (!opened) return reject(err || new Error(`${label} change stream closed`));
        const fresh = err && NON_RESUMABLE_TOKEN_ERRORS.has(err.code);
        log(`${label} change stream ${err ? 'error: ' + err.message : 'closed'}; reopening` +
          (fresh ? ' from now (events may be missed)' : ''));
        if (fresh) resumeToken = undefined;
        const { resumeAfter, ...rest } = watchOptions;
        setTimeout(() => start(resumeToken ? { ...rest, startAfter: resumeToken } : rest), err ? 500 : 0);
      };
      stream.on('error', reopen);
      stream.on('close', () => reopen(null));
    };
    start(options);
  });
}

// ---------------------------------------------------------------- HTTP /stats

function percentile (sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
}

function statsSnapshot () {
  const n = Math.min(stats.recorded, STATS_MAX_SAMPLES);
  const sorted = stats.samples.slice(0, n).sort();
  let sum = 0;
  for (let i = 0; i < n; i++) sum += sorted[i];
  const subscriptions = {};
  for (const col of ENABLED_COLLECTIONS) {
    const room = storage.adapter.rooms.get(col);
    subscriptions[col] = room ? room.size : 0;
  }
  return {
    events: stats.events,
    skipped: stats.skipped,
    fanout_ms: {
      p50: percentile(sorted, 0.5),
      p99: percentile(sorted, 0.99),
      max: n > 0 ? sorted[n - 1] : null,
      mean: n > 0 ? sum / n : null,
      count: stats.recorded
    },
    sockets: storage.sockets.size,
    connections: io.engine.clientsCount,
    subscriptions
  };
}

function handleHttp (req, res) {
  const url = new URL(req.url, 'http://peer');
  const send = (status, body) => {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  };
  if (url.pathname === '/stats' && (req.method === 'GET' || req.method === 'HEAD')) {
    const body = statsSnapshot();
    if (url.searchParams.get('reset') === '1') stats.reset();
    return send(200, body);
  }
  if (url.pathname === '/stats/reset' && req.method === 'POST') {
    const body = statsSnapshot();
    stats.reset();
    return send(200, body);
  }
  send(404, { error: 'not found' });
}

// ---------------------------------------------------------------- start and stop

let client;

// The database named in the URI's path (mongodb://user:pass@h1,h2/DB?opts).
function databaseOf (uri) {
  const m = /^mongodb(?:\+srv)?:\/\/[^/?]*\/([^?]*)/.exec(uri);
  return m && m[1] ? decodeURIComponent(m[1]) : null;
}

async function main () {
  const dbName = databaseOf(MONGODB_URI) || fail('MONGODB_URI must name the database in its path');
  client = new MongoClient(MONGODB_URI);
  await client.connect();
  const db = client.db(dbName);

  // Subjects and roles: follow changes from the moment the stream is open, then load.
  let reloading = null;
  let again = false;
  const scheduleReload = () => {
    if (reloading) {
      again = true;
      return;
    }
    reloading = reloadAuth(db)
      .catch((e) => log('auth reload failed:', e.message))
      .finally(() => {
        reloading = null;
        if (again) {
          again = false;
          scheduleReload();
        }
      });
  };
  await openStream(db, 'auth',
    [{ $match: { 'ns.coll': { $in: [AUTH_PREFIX + 'subjects', AUTH_PREFIX + 'roles'] } } }],
    {}, scheduleReload);
  await reloadAuth(db);

  await openStream(db, 'data',
    [{
      $match: {
        'ns.coll': { $in: ENABLED_COLLECTIONS.map((c) => MONGO_NAMES[c]) },
        operationType: { $in: ['insert', 'update', 'replace', 'delete', 'drop', 'rename'] }
      }
    }],
    { fullDocument: 'updateLookup' }, onChange);

  await new Promise((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(PORT, HOST, resolve);
  });
  log(`serving /storage on ${HOST}:${httpServer.address().port} (database ${db.databaseName})`);
  writeOut(JSON.stringify({ type: 'listening', port: httpServer.address().port }) + '\n');
}

async function shutdown (signal) {
  if (shuttingDown) return;
  shuttingDown = true;
  log(`${signal}: shutting down`);
  setTimeout(() => process.exit(0), 3000).unref();
  await Promise.allSettled([...streams].map((s) => s.close()));
  await new Promise((resolve) => io.close(() => resolve()));
  if (client) await client.close().catch(() => {});
  process.exit(0);
}

process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

main().catch((e) => {
  process.stderr.write('node-peer: ' + (e && e.stack || e) + '\n');
  process.exit(1);
});
