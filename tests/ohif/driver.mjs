// Drives the OHIF v3 viewer in Debian's Chromium through playwright-core and prints, as the
// last line of stdout, one JSON report of what the viewer showed (tests/ohif.py reads it).
//
//   node driver.mjs '{"url": ..., "studyUid": ..., "srSeriesUid": ..., "segSeriesUid": ...,
//                     "probePoints": [[col, row], ...], "screenshotDir": ...,
//                     "chromium": "/usr/bin/chromium", "timeoutMs": ...}'
//
// Steps: open /viewer?StudyInstanceUIDs=<uid>; skip the onboarding tour; wait until the image
// is drawn; double-click the SR's thumbnail and read (a) OHIF's parsed SR display set
// (measurements with TrackingIdentifier / TrackingUniqueIdentifier / labels), (b) the
// annotations cornerstone3D holds, (c) what is drawn in the viewport's SVG layer (outlines and
// text box lines), (d) the measurements panel; then double-click the SEG's thumbnail, answer
// "Yes" to opening it, and read the segmentation service (segments and their labels), the
// viewport's representations and the segmentation panel's rows. The canvas pixels at
// `probePoints` are read on the plain image, with the SR, and with the SEG on it; a
// screenshot after each step. Console errors and uncaught page errors fail the report
// (OHIF may fail to a black page and say so only in the console).
import fs from 'node:fs';
import path from 'node:path';
import { chromium, errors } from 'playwright-core';

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
  '--enable-unsafe-swiftshader', // WebGL through SwiftShader: the machine has no GPU
];
const MAX_CONSOLE = 200;

const report = {
  ok: false,
  errors: [],
  console: [],
  displaySets: [],
  sr: null,
  seg: null,
  screenshots: [],
  timings: {},
  probeImage: [],
};
const started = Date.now();
const mark = (name) => {
  report.timings[name] = (Date.now() - started) / 1000;
};

function note(line) {
  if (report.console.length < MAX_CONSOLE) report.console.push(line);
}

async function screenshot(page, name) {
  const file = path.join(request.screenshotDir, `${name}.png`);
  await page.screenshot({ path: file });
  report.screenshots.push(file);
}

// Summaries of OHIF's display sets (what the study browser lists).
function displaySetSummaries() {
  return window.services.displaySetService.getActiveDisplaySets().map((ds) => ({
    displaySetInstanceUID: ds.displaySetInstanceUID,
    SeriesInstanceUID: ds.SeriesInstanceUID,
    SeriesDescription: ds.SeriesDescription,
    SeriesNumber: ds.SeriesNumber,
    Modality: ds.Modality,
    SOPClassHandlerId: ds.SOPClassHandlerId,
    numImages: ds.numImageFrames ?? ds.images?.length ?? ds.instances?.length ?? 0,
    isLoaded: ds.isLoaded ?? null,
    unsupported: ds.unsupported ?? false,
  }));
}

// The SVG overlay of each viewport: the outlines and text boxes cornerstone3D drew.
function drawnOverlay() {
  return [...document.querySelectorAll('.svg-layer')].map((layer) => ({
    id: layer.id,
    ellipses: layer.querySelectorAll('ellipse').length,
    ellipseShapes: [...layer.querySelectorAll('ellipse')].map((e) =>
      ['cx', 'cy', 'rx', 'ry'].map((name) => Number(e.getAttribute(name))),
    ),
    polylines: layer.querySelectorAll('polyline').length,
    paths: layer.querySelectorAll('path').length,
    circles: layer.querySelectorAll('circle').length,
    rects: layer.querySelectorAll('rect').length,
    textBoxes: [...layer.querySelectorAll('text')].map((text) => {
      const spans = [...text.querySelectorAll('tspan')].map((s) => s.textContent);
      return spans.length ? spans : [text.textContent];
    }),
  }));
}

// True when a viewport's SVG layer holds one outline and one text box per SR measurement.
function srOverlayDrawn(uid) {
  const n = window.services.displaySetService.getDisplaySetByUID(uid).measurements.length;
  return [...document.querySelectorAll('.svg-layer')].some(
    (layer) =>
      layer.querySelectorAll('ellipse, polyline, circle').length >= n &&
      layer.querySelectorAll('text').length >= n,
  );
}

function renderViewports() {
  const { viewportGridService, cornerstoneViewportService } = window.services;
  for (const id of viewportGridService.getState().viewports.keys()) {
    cornerstoneViewportService.getCornerstoneViewport(id)?.render();
  }
}

// RGBA of the active viewport's canvas at image pixels [[col, row], ...] (continuous
// coordinates, (0, 0) the top left corner of the top left pixel): what is really drawn.
function probePixels(points) {
  const { viewportGridService, cornerstoneViewportService } = window.services;
  const { activeViewportId } = viewportGridService.getState();
  const viewport = cornerstoneViewportService.getCornerstoneViewport(activeViewportId);
  const imageId = viewport.getCurrentImageId();
  const context = viewport.canvas.getContext('2d', { willReadFrequently: true });
  const scale = viewport.canvas.width / viewport.canvas.clientWidth;
  return points.map((point) => {
    const world = window.cornerstone.utilities.imageToWorldCoords(imageId, point);
    const [x, y] = viewport.worldToCanvas(world);
    const rgba = context.getImageData(Math.round(x * scale), Math.round(y * scale), 1, 1).data;
    return { point, canvas: [x, y], rgba: [...rgba] };
  });
}

// True once a viewport has its image and its canvas shows something other than black.
function imageDrawn() {
  const { viewportGridService, cornerstoneViewportService } = window.services;
  return [...viewportGridService.getState().viewports.keys()].some((id) => {
    const viewport = cornerstoneViewportService.getCornerstoneViewport(id);
    if (!viewport?.getImageData?.()) return false;
    const { width, height } = viewport.canvas;
    const context = viewport.canvas.getContext('2d', { willReadFrequently: true });
    for (let i = 1; i < 8; i++) {
      for (let j = 1; j < 8; j++) {
        const [r, g, b] = context.getImageData((width * i) >> 3, (height * j) >> 3, 1, 1).data;
        if (r + g + b > 30) return true;
      }
    }
    return false;
  });
}

// Viewports and what each shows (display sets, whether an image is drawn).
function viewportState() {
  const { viewportGridService, cornerstoneViewportService } = window.services;
  const grid = viewportGridService.getState();
  const viewports = [...grid.viewports.values()].map((vp) => {
    const csViewport = cornerstoneViewportService.getCornerstoneViewport(vp.viewportId);
    let imageId = null;
    try {
      imageId = csViewport?.getCurrentImageId?.() ?? null;
    } catch (e) {
      imageId = null;
    }
    return {
      viewportId: vp.viewportId,
      displaySetInstanceUIDs: vp.displaySetInstanceUIDs,
      imageId,
      hasImage: Boolean(csViewport?.getImageData?.()),
    };
  });
  return { activeViewportId: grid.activeViewportId, viewports };
}

// Text of the right-hand side panel (measurements or segmentations), as shown.
function rightPanelText() {
  const header = document.querySelector('[data-cy="side-panel-header-right"]');
  return header?.parentElement?.parentElement?.innerText ?? null;
}

// Wait until fn(arg) is truthy in the page; give up at once when the page has logged an
// error (OHIF then usually shows a black page or a spinner forever).
async function waitFor(page, fn, arg, what, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (report.errors.length) throw new Error(`gave up waiting for ${what}: the page logged errors`);
    try {
      return await page.waitForFunction(fn, arg, { timeout: 1000, polling: 250 });
    } catch (e) {
      if (!(e instanceof errors.TimeoutError)) throw e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
  }
}

// The onboarding tour ("Skip all") comes up when the viewport element appears; a fresh
// profile always gets it. Found and clicked through the DOM: Playwright's locator calls
// (click, waitFor) would first run the locator handler set up below, which clicks it away.
const SKIP_ALL = () =>
  [...document.querySelectorAll('.shepherd-element button')].find((b) => b.innerText.trim() === 'Skip all');

async function dismissTour(page, timeout) {
  let button;
  try {
    button = await page.waitForFunction(SKIP_ALL, null, { timeout, polling: 100 });
  } catch {
    return; // not shown (yet): the locator handler takes it if it comes later
  }
  await button.evaluate((element) => element.click());
  await waitFor(page, () => !document.querySelector('.shepherd-element'), null, 'the tour to close', timeout);
  mark('tour skipped');
  report.tourSkipped = true;
}

async function openThumbnail(page, seriesUid, what) {
  const ds = (await page.evaluate(displaySetSummaries)).find((d) => d.SeriesInstanceUID === seriesUid);
  if (!ds) throw new Error(`no display set for the ${what} series ${seriesUid}`);
  await page.locator(`[id="thumbnail-${ds.displaySetInstanceUID}"]`).dblclick();
  return ds;
}

async function readSr(page, timeout) {
  const ds = await openThumbnail(page, request.srSeriesUid, 'SR');
  await waitFor(
    page,
    (uid) => {
      const d = window.services.displaySetService.getDisplaySetByUID(uid);
      return d?.isLoaded && (d.measurements ?? []).every((m) => m.loaded);
    },
    ds.displaySetInstanceUID,
    'the SR display set to load and place its measurements on the image',
    timeout,
  );
  // The overlay is drawn on the viewport's next render. Now and then OHIF adds the SR's
  // annotations before the SR viewport has its image and nothing renders again until the
  // user moves or clicks: after a second without it, ask the viewports to render (counted).
  const deadline = Date.now() + timeout;
  let renders = 0;
  while (!(await page.evaluate(srOverlayDrawn, ds.displaySetInstanceUID))) {
    if (report.errors.length) throw new Error('gave up waiting for the SR overlay: the page logged errors');
    if (Date.now() > deadline) {
      report.errors.push('timed out waiting for the SR overlay to be drawn');
      break;
    }
    await page.waitForTimeout(1000);
    if (!(await page.evaluate(srOverlayDrawn, ds.displaySetInstanceUID))) {
      await page.evaluate(renderViewports);
      renders += 1;
    }
  }
  await page.waitForTimeout(500);
  const sr = await page.evaluate((uid) => {
    const d = window.services.displaySetService.getDisplaySetByUID(uid);
    const annotations = window.cornerstoneTools.annotation.state.getAllAnnotations();
    return {
      displaySetInstanceUID: uid,
      isImagingMeasurementReport: d.isImagingMeasurementReport ?? null,
      isRehydratable: d.isRehydratable ?? null,
      referencedImages: d.referencedImages,
      measurements: (d.measurements ?? []).map((m) => ({
        TrackingIdentifier: m.TrackingIdentifier,
        TrackingUniqueIdentifier: m.TrackingUniqueIdentifier,
        labels: m.labels,
        graphicType: m.graphicType,
        loaded: m.loaded,
        ReferencedSOPInstanceUID: m.ReferencedSOPInstanceUID ?? null,
      })),
      annotations: annotations.map((a) => ({
        annotationUID: a.annotationUID,
        toolName: a.metadata?.toolName,
        label: a.data?.label ?? null,
        labels: a.data?.labels ?? null,
        referencedImageId: a.metadata?.referencedImageId ?? null,
      })),
      trackedMeasurements: window.services.measurementService.getMeasurements().map((m) => ({
        uid: m.uid,
        label: m.label,
        toolName: m.toolName,
        displayText: m.displayText,
      })),
    };
  }, ds.displaySetInstanceUID);
  sr.extraRenders = renders;
  sr.drawn = await page.evaluate(drawnOverlay);
  sr.probe = await page.evaluate(probePixels, request.probePoints ?? []);
  sr.viewports = await page.evaluate(viewportState);
  // the measurements panel: OHIF lists there only what it can track (hydrate)
  await page.locator('[data-cy="trackedMeasurements-btn"]').click();
  await page.waitForTimeout(1000);
  sr.panelText = await page.evaluate(rightPanelText);
  return sr;
}

async function readSeg(page, timeout) {
  const ds = await openThumbnail(page, request.segSeriesUid, 'SEG');
  await waitFor(
    page,
    () => window.services.segmentationService.getSegmentations().length > 0,
    null,
    'the segmentation service to hold the SEG',
    timeout,
  );
  await waitFor(
    page,
    () => {
      const { segmentationService, viewportGridService } = window.services;
      const vps = [...viewportGridService.getState().viewports.keys()];
      return vps.some((id) => segmentationService.getSegmentationRepresentations(id).length > 0);
    },
    null,
    'a viewport to show the segmentation',
    timeout,
  );
  // "Loading SEG..." disappears once the labelmap is on the viewport
  const segLoaded = () => !document.body.innerText.includes('Loading SEG');
  await waitFor(page, segLoaded, null, 'the SEG to finish loading', timeout);
  await page.waitForTimeout(500);
  const overlayProbe = await page.evaluate(probePixels, request.probePoints ?? []);
  await screenshot(page, '3-seg-overlay');
  // "Do you want to open this Segmentation?" -> Yes: the SEG goes onto the image's viewport
  // and into the segmentation panel
  await page.getByRole('button', { name: 'Yes', exact: true }).click();
  await waitFor(
    page,
    (uid) => {
      const { segmentationService, viewportGridService } = window.services;
      return [...viewportGridService.getState().viewports.values()].some(
        (vp) =>
          !vp.displaySetInstanceUIDs.includes(uid) &&
          segmentationService.getSegmentationRepresentations(vp.viewportId).length > 0,
      );
    },
    ds.displaySetInstanceUID,
    'the SEG to be opened on the image',
    timeout,
  );
  await page.locator('[data-cy="panelSegmentation-btn"]').click();
  await page.locator('[data-cy="data-row"]').first().waitFor({ timeout });
  await page.waitForTimeout(1000);
  const seg = await page.evaluate((uid) => {
    const { segmentationService, viewportGridService } = window.services;
    const d = window.services.displaySetService.getDisplaySetByUID(uid);
    const representations = {};
    for (const id of viewportGridService.getState().viewports.keys()) {
      representations[id] = segmentationService.getSegmentationRepresentations(id).map((r) => ({
        segmentationId: r.segmentationId,
        type: r.type,
        visible: r.visible,
      }));
    }
    return {
      displaySetInstanceUID: uid,
      isLoaded: d.isLoaded ?? null,
      isHydrated: d.isHydrated ?? null,
      loadError: d.loadError ?? null,
      segmentations: segmentationService.getSegmentations().map((s) => ({
        segmentationId: s.segmentationId,
        label: s.label,
        segments: Object.values(s.segments ?? {})
          .filter(Boolean)
          .map((seg) => ({ segmentIndex: seg.segmentIndex, label: seg.label })),
      })),
      representations,
    };
  }, ds.displaySetInstanceUID);
  seg.viewports = await page.evaluate(viewportState);
  seg.probeOverlay = overlayProbe;
  seg.probeOpened = await page.evaluate(probePixels, request.probePoints ?? []);
  seg.panelText = await page.evaluate(rightPanelText);
  seg.panelRows = await page.evaluate(() =>
    [...document.querySelectorAll('[data-cy="data-row"]')].map((row) =>
      row.innerText.replace(/\s+/g, ' ').trim(),
    ),
  );
  return seg;
}

let browser;
try {
  fs.mkdirSync(request.screenshotDir, { recursive: true });
  // launch() gives a fresh temporary profile (--user-data-dir) each run
  browser = await chromium.launch({
    executablePath: request.chromium,
    headless: true,
    args: CHROMIUM_FLAGS,
    timeout: 60000,
  });
  mark('browser');
  const context = await browser.newContext({ viewport: { width: 1600, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(request.timeoutMs);
  page.on('console', (msg) => {
    const type = msg.type();
    if (type === 'error') report.errors.push(`console error: ${msg.text()}`);
    if (type === 'error' || type === 'warning') note(`${type}: ${msg.text()}`);
  });
  page.on('pageerror', (err) => report.errors.push(`page error: ${err.message}`));
  page.on('requestfailed', (req) => note(`request failed: ${req.url()} ${req.failure()?.errorText}`));
  // the onboarding tour may pop up over anything the driver clicks
  await page.addLocatorHandler(page.getByRole('button', { name: 'Skip all' }), async (button) => {
    await button.click();
    report.tourSkipped = true;
  });

  const viewerUrl = `${request.url}/viewer?StudyInstanceUIDs=${encodeURIComponent(request.studyUid)}`;
  await page.goto(viewerUrl, { waitUntil: 'load' });
  mark('page');
  const expected = 1 + (request.srSeriesUid ? 1 : 0) + (request.segSeriesUid ? 1 : 0);
  await waitFor(
    page,
    (n) => window.services?.displaySetService?.getActiveDisplaySets?.().length >= n,
    expected,
    `OHIF to list ${expected} display sets`,
    request.timeoutMs,
  );
  report.displaySets = await page.evaluate(displaySetSummaries);
  await waitFor(page, imageDrawn, null, 'the image to be drawn in a viewport', request.timeoutMs);
  mark('image');
  await dismissTour(page, 10000);
  await page.waitForTimeout(500);
  report.probeImage = await page.evaluate(probePixels, request.probePoints ?? []);
  await screenshot(page, '1-study');

  if (request.srSeriesUid) {
    report.sr = await readSr(page, request.timeoutMs);
    mark('sr');
    await screenshot(page, '2-sr');
  }
  if (request.segSeriesUid) {
    report.seg = await readSeg(page, request.timeoutMs);
    mark('seg');
    await screenshot(page, '4-seg-panel');
  }
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
