#!/usr/bin/env node
// One-shot check of a page in headless Chromium: open it, wait until each given element's
// text matches, take a screenshot.
//
//   node page_text.js --url URL --screenshot PATH --expect '#id=regex' [--expect ...]
//     [--timeout-ms 20000] [--chromium /usr/bin/chromium]
//
// stdout carries one JSON line: {"type":"done","texts":{"#id":"..."}} (exit 0), or
// {"type":"error","message":..,"texts":{...}} (exit 1, a screenshot still attempted).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');

const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

function parseArgs (argv) {
  const opts = { url: null, screenshot: null, expect: [], timeoutMs: 20000, chromium: '/usr/bin/chromium' };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--url') opts.url = value;
    else if (flag === '--screenshot') opts.screenshot = value;
    else if (flag === '--timeout-ms') opts.timeoutMs = Number(value);
    else if (flag === '--chromium') opts.chromium = value;
    else if (flag === '--expect') {
      const eq = value.indexOf('=');
      if (eq < 1) throw new Error('--expect wants SELECTOR=REGEX');
      opts.expect.push({ selector: value.slice(0, eq), pattern: value.slice(eq + 1) });
    } else throw new Error(`unknown argument ${JSON.stringify(flag)}`);
  }
  if (!opts.url || !opts.screenshot || opts.expect.length === 0) {
    throw new Error('--url, --screenshot and at least one --expect are required');
  }
  return opts;
}

async function main () {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stdout.write(JSON.stringify({ type: 'error', message: `usage: ${err.message}` }) + '\n');
    return 1;
  }
  const { chromium } = require('playwright-core');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nsbridge-chromium-'));
  const watchdog = setTimeout(() => process.exit(1), opts.timeoutMs + 60000);
  let context = null;
  let page = null;
  const texts = {};
  let code = 1;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: opts.chromium, headless: true, args: CHROMIUM_ARGS, timeout: 60000,
    });
    page = context.pages()[0] || await context.newPage();
    await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout: opts.timeoutMs });
    const deadline = Date.now() + opts.timeoutMs;
    for (const { selector, pattern } of opts.expect) {
      const re = new RegExp(pattern);
      for (;;) {
        const text = await page.locator(selector).textContent({ timeout: 1000 }).catch(() => null);
        texts[selector] = text;
        if (text !== null && re.test(text)) break;
        if (Date.now() > deadline) throw new Error(`${selector} never matched /${pattern}/`);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: 15000 });
    process.stdout.write(JSON.stringify({ type: 'done', texts }) + '\n');
    code = 0;
  } catch (err) {
    process.stdout.write(JSON.stringify({ type: 'error', message: String(err && err.message), texts }) + '\n');
    if (page) await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: 10000 }).catch(() => {});
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
    clearTimeout(watchdog);
  }
  return code;
}

main().then((code) => {
  process.exitCode = code;
  setTimeout(() => process.exit(code), 3000).unref();
});
