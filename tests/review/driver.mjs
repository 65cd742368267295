// Drives the review page (node/review) in Debian's Chromium through playwright-core (the
// OHIF harness's copy in tests/ohif/node_modules) and prints, as the last line of stdout,
// one JSON report of what the page showed (tests/test_review.py reads it).
//
//   node driver.mjs '{"url": ..., "token": ..., "wrongToken": ..., "studyUid": ...,
//                     "question": ..., "probePoints": [[col, row], ...],
//                     "screenshotDir": ..., "chromium": "/usr/bin/chromium", "timeoutMs": ...}'
//
// Steps: open /review; enter the wrong token and read what the page shows (the error, any
// study rows); enter the right one; wait for the study's row and open it; wait for the image
// and its anchors; read the SVG overlay (anchor groups, shapes, labels, distances), the
// banner, the narrative and the thread; probe the drawn pixels at `probePoints` (source
// image pixels, mapped through the SVG's screen transform, read from a screenshot); ask
// `question` in the box and wait until its answer is in the thread; read everything again.
// A screenshot after each step. Console errors and page errors fail the report.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', 'ohif', 'package.json'));
const { chromium } = require('playwright-core');

const request = JSON.parse(process.argv[2]);
const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const report = {
  ok: false,
  errors: [],
  console: [],
  wrongToken: null,
  studies: [],
  before: null,
  after: null,
  probe: [],
  screenshots: [],
  timings: {},
};
const started = Date.now();
const mark = (name) => {
  report.timings[name] = (Date.now() - started) / 1000;
};

async function screenshot(page, name) {
  const file = path.join(request.screenshotDir, `${name}.png`);
  const buffer = await page.screenshot({ path: file, fullPage: true });
  report.screenshots.push(file);
  return buffer;
}

// What the page shows: banner, study title, overlay, anchors list, narrative, thread.
function pageState() {
  const text = (sel) => document.querySelector(sel)?.textContent ?? null;
  const svg = document.getElementById('overlay');
  const image = svg.querySelector('image');
  return {
    banner: text('#banner'),
    title: text('#study-title'),
    studyNotice: text('#study-notice'),
    caption: text('#image-caption'),
    error: document.getElementById('error').hidden ? null : text('#error'),
    viewBox: svg.getAttribute('viewBox'),
    image: image ? { href: image.getAttribute('href'), width: image.getAttribute('width'),
      height: image.getAttribute('height') } : null,
    anchors: [...svg.querySelectorAll('g.anchor')].map((g) => ({
      id: g.dataset.anchorId,
      version: g.dataset.version,
      shape: g.dataset.shape,
      kind: g.classList.contains('finding') ? 'finding' : g.classList.contains('landmark') ? 'landmark' : 'region',
      element: g.firstElementChild.tagName,
      geometry: Object.fromEntries(
        ['cx', 'cy', 'rx', 'ry', 'x', 'y', 'width', 'height'].filter((a) => g.firstElementChild.hasAttribute(a))
          .map((a) => [a, Number(g.firstElementChild.getAttribute(a))]),
      ),
      stroke: g.firstElementChild.getAttribute('stroke'),
      label: g.querySelector('text')?.textContent ?? null,
    })),
    distances: [...svg.querySelectorAll('g.distance')].map((g) => ({
      from: g.dataset.from,
      to: g.dataset.to,
      line: ['x1', 'y1', 'x2', 'y2'].map((a) => Number(g.querySelector('line').getAttribute(a))),
      label: g.querySelector('text')?.textContent ?? null,
    })),
    anchorList: [...document.querySelectorAll('#anchors li')].map((li) => li.textContent),
    distanceList: [...document.querySelectorAll('#distances li')].map((li) => li.textContent),
    narrative: text('#narrative'),
    thread: [...document.querySelectorAll('#thread li.turn')].map((li) => ({
      question: li.querySelector('.question')?.textContent ?? null,
      answers: [...li.querySelectorAll('.answer')].map((a) => ({ status: a.dataset.status, text: a.textContent })),
    })),
    askState: text('#ask-state'),
  };
}

// CSS pixel positions (page coordinates) of source-image points [col, row].
function screenPoints(points) {
  const svg = document.getElementById('overlay');
  const matrix = svg.getScreenCTM();
  return points.map(([col, row]) => {
    const p = new DOMPoint(col, row).matrixTransform(matrix);
    return [p.x + window.scrollX, p.y + window.scrollY];
  });
}

// RGBA at page positions of a PNG screenshot (base64), decoded by the browser.
async function pixelsOf([base64, positions]) {
  const image = new Image();
  image.src = `data:image/png;base64,${base64}`;
  await image.decode();
  const canvas = document.createElement('canvas');
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  return positions.map(([x, y]) => [...context.getImageData(Math.floor(x), Math.floor(y), 1, 1).data]);
}

let browser;
try {
  fs.mkdirSync(request.screenshotDir, { recursive: true });
  browser = await chromium.launch({
    executablePath: request.chromium,
    headless: true,
    args: CHROMIUM_FLAGS,
    timeout: 60000,
  });
  mark('browser');
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.setDefaultTimeout(request.timeoutMs);
  let expectRefusal = false; // the wrong token's 401 is logged by Chromium as a failed load
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !(expectRefusal && msg.text().includes('401'))) {
      report.errors.push(`console error: ${msg.text()}`);
    }
    if (report.console.length < 200) report.console.push(`${msg.type()}: ${msg.text()}`);
  });
  page.on('pageerror', (err) => report.errors.push(`page error: ${err.message}`));

  await page.goto(`${request.url}/review`, { waitUntil: 'load' });
  mark('page');

  // a wrong token: refused, no study listed
  expectRefusal = true;
  await page.fill('#token', request.wrongToken);
  await page.click('#token-form button[type=submit]');
  await page.locator('#error').waitFor({ state: 'visible' });
  report.wrongToken = {
    ...(await page.evaluate(pageState)),
    rows: await page.locator('#studies tbody tr').count(),
    listVisible: await page.locator('#list').isVisible(),
    stored: await page.evaluate(() => sessionStorage.getItem('medgemma-review-token')),
  };
  await screenshot(page, '1-wrong-token');
  expectRefusal = false;

  // the right token: the study list, then the study
  await page.fill('#token', request.token);
  await page.click('#token-form button[type=submit]');
  const row = page.locator(`#studies tbody tr[data-study-uid="${request.studyUid}"]`);
  await row.waitFor();
  report.studies = await page.$$eval('#studies tbody tr', (rows) =>
    rows.map((r) => ({ uid: r.dataset.studyUid, cells: [...r.cells].map((c) => c.textContent) })));
  await screenshot(page, '2-studies');
  mark('studies');
  await row.click();
  await page.waitForFunction(() => {
    const image = document.querySelector('#overlay image');
    return image && document.querySelectorAll('#overlay g.anchor').length > 0 &&
      document.querySelectorAll('#thread li').length > 0;
  });
  // the PNG is drawn once the <image> has decoded it
  await page.evaluate(async () => {
    const href = document.querySelector('#overlay image').getAttribute('href');
    const probe = new Image();
    probe.src = href;
    await probe.decode();
  });
  await page.waitForTimeout(300);
  report.before = await page.evaluate(pageState);
  const positions = await page.evaluate(screenPoints, request.probePoints ?? []);
  const shot = await screenshot(page, '3-study');
  const rgba = await page.evaluate(pixelsOf, [shot.toString('base64'), positions]);
  report.probe = positions.map((p, i) => ({ point: request.probePoints[i], page: p, rgba: rgba[i] }));
  mark('study');

  // a question through the box: its answer appears in the thread
  const before = report.before.thread.length;
  await page.fill('#question', request.question);
  await page.selectOption('#language', 'en');
  await page.click('#ask');
  await page.waitForFunction(
    ([n, question]) => {
      const turns = [...document.querySelectorAll('#thread li.turn')];
      return turns.length > n && turns.some((t) =>
        t.querySelector('.question').textContent.includes(question) && t.querySelector('.answer'));
    },
    [before, request.question],
  );
  await page.waitForTimeout(300);
  report.after = await page.evaluate(pageState);
  await screenshot(page, '4-answered');
  mark('answered');
  report.ok = report.errors.length === 0;
} catch (e) {
  report.errors.push(`driver: ${e.message}`);
  try {
    const pages = browser?.contexts()[0]?.pages() ?? [];
    if (pages[0]) await screenshot(pages[0], 'failure');
  } catch {
    // the page is gone: no screenshot
  }
} finally {
  mark('total');
  await browser?.close().catch(() => {});
}
process.stdout.write(`${JSON.stringify(report)}\n`);
