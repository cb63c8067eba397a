#!/usr/bin/env node
// One-shot driver of nsbridge's live page (static/live.html) in headless Chromium.
//
//   node live_page.js --url http://127.0.0.1:PORT/ --token TOKEN \
//     --collections entries,treatments --screenshot PATH \
//     [--until sentinel] [--chart-points 0] [--timeout-ms 20000] [--viewport 1200x800]
//     [--chromium /usr/bin/chromium]
//
// Opens the page, types the token, sets exactly the given collection check-boxes, clicks
// Subscribe and waits for the page to show a successful ack. Then it waits for a table row
// whose identifier is --until (with --until "": for any row) and for the glucose chart to
// show at least --chart-points values, takes a full-page screenshot and exits.
//
// stdout carries JSON lines only, one object each:
//   {"type":"subscribed","ack":{...}}            the ack object the page shows
//   {"type":"row","seq":N,"event":..,"colName":..,"identifier":..}   each row, in arrival order
//   {"type":"console","text":..}                 a console error (or uncaught error) of the page
//   {"type":"overview","chartPoints":N,"rates":{"entries":{"total":N,"perMinute":N},..}}
//                                                 the chart and the rates panel, before done
//   {"type":"done"}                              then exit 0
//   {"type":"error","message":..[,"ack":{...}]}  then exit 1 (a screenshot is still attempted)
// --timeout-ms bounds the whole run after Chromium has started. The token never appears
// on stdout or stderr.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function parseArgs(argv) {
  const opts = {
    url: null, token: null, collections: null, screenshot: null,
    until: 'sentinel', chartPoints: '0', timeoutMs: 20000, viewport: '1200x800', chromium: '/usr/bin/chromium',
  };
  const names = {
    '--url': 'url', '--token': 'token', '--collections': 'collections', '--screenshot': 'screenshot',
    '--until': 'until', '--chart-points': 'chartPoints', '--timeout-ms': 'timeoutMs', '--viewport': 'viewport', '--chromium': 'chromium',
  };
  for (let i = 0; i < argv.length; i += 1) {
    let arg = argv[i];
    let value;
    const eq = arg.indexOf('=');
    if (arg.startsWith('--') && eq > 0) { value = arg.slice(eq + 1); arg = arg.slice(0, eq); }
    const key = names[arg];
    if (!key) { throw new Error(`unknown argument ${JSON.stringify(arg)}`); }
    if (value === undefined) {
      if (i + 1 >= argv.length) { throw new Error(`${arg} needs a value`); }
      i += 1;
      value = argv[i];
    }
    opts[key] = value;
  }
  for (const need of ['url', 'token', 'collections', 'screenshot']) {
    if (opts[need] === null) { throw new Error(`--${need} is required`); }
  }
  opts.timeoutMs = Number(opts.timeoutMs);
  if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) { throw new Error('--timeout-ms must be a positive number'); }
  opts.chartPoints = Number(opts.chartPoints);
  if (!Number.isInteger(opts.chartPoints) || opts.chartPoints < 0) { throw new Error('--chart-points must be a whole number'); }
  opts.collections = opts.collections.split(',').map((s) => s.trim()).filter(Boolean);
  const vp = /^(\d+)x(\d+)$/.exec(opts.viewport);
  if (!vp) { throw new Error('--viewport must look like 1200x800'); }
  opts.viewport = { width: Number(vp[1]), height: Number(vp[2]) };
  return opts;
}

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    emit({ type: 'error', message: `usage: ${err.message}` });
    return 1;
  }
  const secret = opts.token;
  const redact = (text) => {
    let s = String(text);
    if (secret) { s = s.split(secret).join('<token>'); }
    return s;
  };

  let chromium;
  try {
    ({ chromium } = require('playwright-core'));
  } catch (err) {
    emit({ type: 'error', message: `playwright-core is not installed; run tests/browser/setup.sh (${err.message})` });
    return 1;
  }
  if (!fs.existsSync(opts.chromium)) {
    emit({ type: 'error', message: `${opts.chromium} not found; run tests/browser/setup.sh` });
    return 1;
  }

  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nsbridge-chromium-'));
  let context = null;
  let page = null;
  let code = 1;
  // Hard stop, in case Chromium or the protocol hangs beyond every timeout below.
  const watchdog = setTimeout(() => {
    emit({ type: 'error', message: 'watchdog: the driver did not finish in time' });
    process.exit(1);
  }, opts.timeoutMs + 60000);

  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: opts.chromium,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: opts.viewport,
      timeout: 60000,
    });
    const deadline = Date.now() + opts.timeoutMs;
    const left = () => Math.max(1, deadline - Date.now());

    page = context.pages()[0] || await context.newPage();
    page.on('console', (msg) => {
      if (msg.type() === 'error') { emit({ type: 'console', text: redact(msg.text()) }); }
    });
    page.on('pageerror', (err) => emit({ type: 'console', text: redact(`uncaught: ${err.message}`) }));

    // Rows are reported from a MutationObserver in the page, in insertion (= arrival) order;
    // they are held back until the "subscribed" line is out.
    let subscribedOut = false;
    const held = [];
    let sawUntil;
    const untilSeen = new Promise((resolve) => { sawUntil = resolve; });
    await page.exposeFunction('__nsbridgeRow', (row) => {
      const line = { type: 'row', seq: row.seq, event: row.event, colName: row.colName, identifier: row.identifier };
      if (subscribedOut) { emit(line); } else { held.push(line); }
      if (opts.until === '' || row.identifier === opts.until) { sawUntil(); }
    });

    await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout: left() });
    await page.evaluate(() => {
      const body = document.getElementById('events');
      if (!body) { throw new Error('the page has no #events'); }
      const report = (tr) => window.__nsbridgeRow({
        seq: Number(tr.getAttribute('data-seq')),
        event: tr.getAttribute('data-event'),
        colName: tr.getAttribute('data-col'),
        identifier: tr.getAttribute('data-identifier'),
      });
      const added = [];
      new MutationObserver((records) => {
        for (const rec of records) {
          for (const n of rec.addedNodes) {
            if (n.nodeType === 1 && n.hasAttribute('data-event')) { added.push(n); }
          }
        }
        added.sort((a, b) => Number(a.getAttribute('data-seq')) - Number(b.getAttribute('data-seq')));
        while (added.length) { report(added.shift()); }
      }).observe(body, { childList: true });
      // Rows already there (none, normally), oldest first.
      Array.from(body.querySelectorAll('tr[data-event]')).reverse().forEach(report);
    });

    await page.locator('#token').fill(opts.token, { timeout: left() });
    const boxes = page.locator('input[name=collection]');
    const known = await boxes.evaluateAll((els) => els.map((e) => e.value));
    for (const name of opts.collections) {
      if (!known.includes(name)) { throw new Error(`the page has no check-box for collection ${JSON.stringify(name)}`); }
    }
    for (const name of known) {
      await page.locator(`input[name=collection][value="${name}"]`)
        .setChecked(opts.collections.includes(name), { timeout: left() });
    }
    await page.locator('#subscribe').click({ timeout: left() });

    const finalStates = ['subscribed', 'rejected', 'invalid'];
    let state;
    try {
      const handle = await page.waitForFunction((states) => {
        const s = document.getElementById('status');
        const st = s && s.getAttribute('data-state');
        return states.includes(st) ? st : false;
      }, finalStates, { timeout: left(), polling: 50 });
      state = await handle.jsonValue();
    } catch (err) {
      const shown = await page.locator('#status').innerText({ timeout: 1000 }).catch(() => '?');
      throw new Error(`no subscription ack within ${opts.timeoutMs} ms; status: ${shown.replace(/\s+/g, ' ').trim()}`);
    }
    const ackText = (await page.locator('#ack').textContent({ timeout: 1000 })) || '';
    let ack = null;
    try { ack = ackText ? JSON.parse(ackText) : null; } catch (err) { ack = ackText; }
    if (state !== 'subscribed') {
      const shown = await page.locator('#status-text').innerText({ timeout: 1000 }).catch(() => '?');
      const err = new Error(`subscription not granted (${state}): ${shown}`);
      err.ack = ack;
      throw err;
    }
    emit({ type: 'subscribed', ack });
    subscribedOut = true;
    while (held.length) { emit(held.shift()); }

    let timer;
    const timedOut = new Promise((resolve) => { timer = setTimeout(() => resolve('timeout'), left()); });
    const outcome = await Promise.race([untilSeen.then(() => 'seen'), timedOut]);
    clearTimeout(timer);
    if (outcome !== 'seen') {
      throw new Error(`no row with identifier ${JSON.stringify(opts.until)} within ${opts.timeoutMs} ms`);
    }
    try {
      await page.waitForFunction((n) => {
        const chart = document.getElementById('chart');
        return chart && Number(chart.getAttribute('data-points')) >= n;
      }, opts.chartPoints, { timeout: left(), polling: 100 });
    } catch (err) {
      throw new Error(`the chart did not show ${opts.chartPoints} values within ${opts.timeoutMs} ms`);
    }
    const overview = await page.evaluate(() => {
      const chart = document.getElementById('chart');
      const rates = {};
      for (const tr of document.querySelectorAll('#rates-body tr[data-col]')) {
        rates[tr.getAttribute('data-col')] = {
          total: Number(tr.getAttribute('data-total')),
          perMinute: Number(tr.getAttribute('data-per-minute')),
        };
      }
      return { chartPoints: Number(chart.getAttribute('data-points')), polyline: !!chart.querySelector('polyline'), rates };
    });
    emit({ type: 'overview', ...overview });

    await page.screenshot({ path: opts.screenshot, fullPage: true, animations: 'disabled', timeout: 15000 });
    emit({ type: 'done' });
    code = 0;
  } catch (err) {
    const line = { type: 'error', message: redact(err && err.message ? err.message : err) };
    if (err && err.ack !== undefined) { line.ack = err.ack; }
    emit(line);
    if (page) {
      await page.screenshot({ path: opts.screenshot, fullPage: true, animations: 'disabled', timeout: 10000 })
        .catch(() => {});
    }
    code = 1;
  } finally {
    if (context) { await context.close().catch(() => {}); }
    fs.rmSync(userDataDir, { recursive: true, force: true });
    clearTimeout(watchdog);
  }
  return code;
}

main().then((code) => {
  process.exitCode = code;
  // Let stdout drain, but do not wait for stray handles.
  setTimeout(() => process.exit(code), 3000).unref();
}, (err) => {
  emit({ type: 'error', message: `driver failure: ${err && err.message}` });
  process.exit(1);
});
