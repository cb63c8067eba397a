#!/usr/bin/env node
// A stand-in for Nightscout behind nsbridge's front door, for the front-door tests:
// socket.io 4.5.4 with allowEIO3 and Nightscout's handshake values, shaped like
// Nightscout where the bridge relays it:
//   `/`        an `authorize` event answered through its ack, then a `dataUpdate`;
//   `/alarm`   a `subscribe` answered through its ack, then an `alarm`;
//   `/private` refuses every CONNECT ("not allowed"); `/auth` wants auth {token:"letmein"};
//   `/storage` its own, which the bridge must never let a client reach;
//   every namespace: `echo` answers its arguments through the ack, after `delay` ms when
//   the first argument is an object with one.
// HTTP:
//   GET /                      an HTML page that loads /socket.io/socket.io.js, connects
//                              to `/`, authorizes and shows the `dataUpdate` in #data;
//   ANY /api/echo[...]         JSON: method, url, headers, body length and sha256;
//   GET /api/status/<code>     that status, body "status <code>";
//   GET /api/gzip              a gzip-encoded text (Content-Encoding: gzip);
//   GET /__test/handshakes     the Socket.IO handshakes seen: headers, query, namespaces;
//   POST /__test/emit          {ns, event, args}: emitted to every socket of ns;
//   (socket.io's own /socket.io/socket.io.js and .map).
// Environment: PORT (0: any). Prints {"type":"listening","port":N} on stdout.

'use strict';

const http = require('http');
const crypto = require('crypto');
const zlib = require('zlib');
const { Server } = require('socket.io');

const PAGE = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Nightscout stand-in</title></head>
<body><h1>Nightscout stand-in</h1><div id="state">loading</div><div id="data"></div>
<script src="/socket.io/socket.io.js"></script>
<script>
  const socket = io();
  socket.on('connect', () => {
    document.getElementById('state').textContent = 'connected';
    socket.emit('authorize', { client: 'web', secret: null }, (auth) => {
      document.getElementById('state').textContent = 'authorized ' + JSON.stringify(auth);
    });
  });
  socket.on('dataUpdate', (update) => {
    document.getElementById('data').textContent = 'sgv ' + update.sgvs[0].mgdl;
  });
</script></body></html>`;

const handshakes = [];

function readBody (req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function json (res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://upstream');
  try {
    if (url.pathname === '/' && (req.method === 'GET' || req.method === 'HEAD')) {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'X-Upstream': 'stand-in' });
      res.end(req.method === 'HEAD' ? undefined : PAGE);
    } else if (url.pathname.startsWith('/api/echo')) {
      const body = await readBody(req);
      json(res, 200, {
        method: req.method,
        url: req.url,
        headers: req.headers,
        bodyLength: body.length,
        bodySha256: crypto.createHash('sha256').update(body).digest('hex'),
      });
    } else if (url.pathname.startsWith('/api/status/')) {
      const code = Number(url.pathname.split('/')[3]);
      res.writeHead(code, { 'Content-Type': 'text/plain', 'X-Upstream': 'stand-in' });
      res.end('status ' + code);
    } else if (url.pathname === '/api/gzip') {
      const body = zlib.gzipSync(Buffer.from('compressed by Nightscout '.repeat(100)));
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Encoding': 'gzip', 'Content-Length': body.length });
      res.end(body);
    } else if (url.pathname === '/__test/handshakes') {
      json(res, 200, handshakes);
    } else if (url.pathname === '/__test/emit' && req.method === 'POST') {
      const { ns, event, args } = JSON.parse((await readBody(req)).toString());
      io.of(ns).emit(event, ...(args || []));
      json(res, 200, { sockets: io.of(ns).sockets.size });
    } else {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      res.end('not found');
    }
  } catch (e) {
    res.writeHead(500, { 'Content-Type': 'text/plain' });
    res.end(String(e));
  }
});

const io = new Server(server, {
  allowEIO3: true,
  pingInterval: 25000,
  pingTimeout: 20000,
  maxHttpBufferSize: 1e6,
  cors: { origin: true },
});

function echo (socket) {
  socket.on('echo', (...args) => {
    const ack = typeof args[args.length - 1] === 'function' ? args.pop() : null;
    const delay = args[0] && typeof args[0] === 'object' && Number(args[0].delay) > 0 ? Number(args[0].delay) : 0;
    if (ack) setTimeout(() => ack(...args), delay);
  });
}

function record (socket) {
  handshakes.push({
    ns: socket.nsp.name,
    headers: socket.handshake.headers,
    query: socket.handshake.query,
    auth: socket.handshake.auth,
    address: socket.handshake.address,
  });
}

io.of('/').on('connection', (socket) => {
  record(socket);
  echo(socket);
  socket.on('authorize', (message, ack) => {
    if (typeof ack === 'function') ack({ read: true, write: false, client: message && message.client });
    socket.emit('dataUpdate', { sgvs: [{ mgdl: 123, mills: Date.now() }], delta: false });
  });
});

io.of('/alarm').on('connection', (socket) => {
  record(socket);
  echo(socket);
  socket.on('subscribe', (message, ack) => {
    if (typeof ack === 'function') ack({ success: true, read: true });
    socket.emit('alarm', { level: 1, title: 'Warning HIGH', message: 'BG Now: 250' });
  });
});

io.of('/private').use((socket, next) => next(new Error('not allowed')));
io.of('/private').on('connection', (socket) => record(socket));

io.of('/auth').use((socket, next) => {
  if (socket.handshake.auth && socket.handshake.auth.token === 'letmein') next();
  else next(new Error('bad token'));
});
io.of('/auth').on('connection', (socket) => {
  record(socket);
  echo(socket);
});

io.of('/storage').on('connection', (socket) => {
  record(socket);
  process.stderr.write('[upstream] /storage was reached\n');
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ type: 'listening', port: server.address().port }) + '\n');
});
