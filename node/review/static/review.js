// The review page (node/review): plain JavaScript, no build step. The token is entered once,
// kept in sessionStorage (this tab only) and sent as a Bearer header by every fetch; the
// data come from /review/api (studies, a study's result, the windowed PNG) and the thread
// from the FHIR API (/fhir/Communication); questions go through $ask like a RIS's.
'use strict';

const TOKEN_KEY = 'medgemma-review-token';
const SVG = 'http://www.w3.org/2000/svg';
const COLOURS = { finding: '#ffd400', landmark: '#00c8ff', region: '#ff4fd8' };
const DISTANCE_COLOUR = '#ff6a3d';
const $ = (id) => document.getElementById(id);

let current = null; // the study view shown (from /review/api/studies/{uid})
let imageUrl = null; // object URL of its PNG

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

// fetch with the token; an OperationOutcome's diagnostics become the error message
async function api(path, options = {}) {
  const headers = { Accept: 'application/fhir+json, application/json, image/png', ...options.headers };
  headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...options, headers, cache: 'no-store' });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      const issue = (body.issue || [])[0];
      if (issue && issue.diagnostics) message = `${response.status}: ${issue.diagnostics}`;
    } catch (e) {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

function showError(message) {
  const error = $('error');
  error.textContent = message;
  error.hidden = !message;
}

function element(tag, attributes = {}, text = null) {
  const node = tag.startsWith('svg:')
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------ studies

async function loadStudies() {
  showError('');
  let body;
  try {
    body = await (await api('/review/api/studies')).json();
  } catch (e) {
    $('list').hidden = true;
    $('study').hidden = true;
    if (e.status === 401 || e.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      showError(`The token was refused (${e.message}). Enter a token of this node's API.`);
    } else {
      showError(`The studies could not be listed: ${e.message}`);
    }
    return;
  }
  const rows = $('studies').querySelector('tbody');
  rows.replaceChildren();
  for (const study of body.studies) {
    const row = element('tr', { 'data-study-uid': study.study_uid, tabindex: 0 });
    for (const value of [
      study.accession_number || '(none)',
      study.study_description,
      study.state + (study.reason ? `: ${study.reason}` : ''),
      study.findings,
      study.updated_at.replace('T', ' ').replace('Z', ''),
    ]) {
      row.append(element('td', {}, String(value)));
    }
    row.addEventListener('click', () => openStudy(study.study_uid));
    rows.append(row);
  }
  $('who').textContent = `${body.studies.length} studies`;
  $('list').hidden = false;
}

// ------------------------------------------------------------------ one study

async function openStudy(uid) {
  showError('');
  for (const row of document.querySelectorAll('#studies tbody tr')) {
    row.classList.toggle('selected', row.dataset.studyUid === uid);
  }
  let view;
  try {
    view = await (await api(`/review/api/studies/${encodeURIComponent(uid)}`)).json();
  } catch (e) {
    showError(`The study could not be opened: ${e.message}`);
    return;
  }
  const changedImage = !current || current.study_uid !== uid;
  current = view;
  $('study').hidden = false;
  $('study-title').textContent =
    `Accession ${view.accession_number || '(none)'}: ${view.study_description || 'study'} ` +
    `(version ${view.version}, ${view.state}` +
    (view.revision ? `, amended revision ${view.revision})` : ')');
  $('study-notice').textContent = view.notice;
  $('narrative').textContent = view.narrative || view.reason || 'No pre-read yet.';
  $('model').textContent = view.model
    ? `Model ${view.model.model_id} (${view.model.model_revision}), engine ${view.model.engine}, ` +
      `prompt ${view.model.prompt_version}`
    : '';
  listAnchors(view);
  if (changedImage || !imageUrl) await loadImage(view);
  drawOverlay(view);
  await loadThread(view);
}

async function loadImage(view) {
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = null;
  if (!view.image) return;
  const url = `/review/api/studies/${encodeURIComponent(view.study_uid)}/image.png?size=1024`;
  try {
    imageUrl = URL.createObjectURL(await (await api(url)).blob());
  } catch (e) {
    showError(`The image could not be loaded: ${e.message}`);
  }
}

function listAnchors(view) {
  const anchors = $('anchors');
  anchors.replaceChildren();
  for (const a of view.anchors) {
    const text = `${a.tracking_identifier} (${a.kind}, version ${a.version})` +
      (a.size_text ? `: ${a.size_text}` : '');
    anchors.append(element('li', { 'data-anchor-id': a.anchor_id }, text));
  }
  const distances = $('distances');
  distances.replaceChildren();
  for (const d of view.distances) {
    distances.append(element('li', {}, `${d.tracking_identifier}: ${d.text}`));
  }
  if (!view.distances.length) distances.append(element('li', {}, 'none measured'));
}

// The image and its anchors in one SVG whose user space is the source image's pixels
// (continuous, (0, 0) the top left corner of the top left pixel, as in DICOM SCOORD).
function drawOverlay(view) {
  const svg = $('overlay');
  svg.replaceChildren();
  const caption = $('image-caption');
  if (!view.image) {
    svg.setAttribute('viewBox', '0 0 400 100');
    svg.append(element('svg:text', { x: 10, y: 50, fill: '#ddd' }, 'no image'));
    caption.textContent = '';
    return;
  }
  const { rows, cols, sop_instance_uid: sop } = view.image;
  svg.setAttribute('viewBox', `0 0 ${cols} ${rows}`);
  svg.dataset.rows = rows;
  svg.dataset.cols = cols;
  if (imageUrl) {
    svg.append(element('svg:image', {
      id: 'radiograph', href: imageUrl, x: 0, y: 0, width: cols, height: rows,
      preserveAspectRatio: 'none',
    }));
  }
  // sizes in CSS pixels, whatever the image's size: strokes do not scale, text is scaled
  const unit = cols / (svg.getBoundingClientRect().width || 760);
  const fontSize = 13 * unit;
  for (const a of view.anchors.filter((x) => x.sop_instance_uid === sop)) {
    const colour = COLOURS[a.kind] || COLOURS.region;
    const group = element('svg:g', {
      class: `anchor ${a.kind}`, 'data-anchor-id': a.anchor_id, 'data-version': a.version,
      'data-shape': a.shape,
    });
    const { row0, col0, row1, col1 } = a.box;
    const stroke = {
      fill: 'none', stroke: colour, 'stroke-width': 3, 'vector-effect': 'non-scaling-stroke',
    };
    if (a.kind === 'landmark') stroke['stroke-dasharray'] = '6 4';
    if (a.shape === 'ellipse') {
      group.append(element('svg:ellipse', {
        ...stroke, cx: (col0 + col1) / 2, cy: (row0 + row1) / 2, rx: (col1 - col0) / 2,
        ry: (row1 - row0) / 2,
      }));
    } else if (a.shape === 'rectangle') {
      group.append(element('svg:rect', {
        ...stroke, x: col0, y: row0, width: col1 - col0, height: row1 - row0,
      }));
    } else {
      group.append(element('svg:circle', {
        ...stroke, cx: (col0 + col1) / 2, cy: (row0 + row1) / 2, r: 5 * unit,
      }));
    }
    group.append(element('svg:text', {
      class: 'label', x: col1 + 4 * unit, y: Math.max(row0, fontSize), fill: colour,
      'font-size': fontSize, 'stroke-width': 3 * unit,
    }, `${a.tracking_identifier} (v${a.version})`));
    svg.append(group);
  }
  for (const d of view.distances.filter((x) => x.sop_instance_uid === sop)) {
    const [[r0, c0], [r1, c1]] = d.line;
    const group = element('svg:g', {
      class: 'distance', 'data-from': d.from_anchor, 'data-to': d.to_anchor,
    });
    group.append(element('svg:line', {
      x1: c0, y1: r0, x2: c1, y2: r1, stroke: DISTANCE_COLOUR, 'stroke-width': 2,
      'vector-effect': 'non-scaling-stroke',
    }));
    group.append(element('svg:text', {
      class: 'label', x: (c0 + c1) / 2 + 4 * unit, y: (r0 + r1) / 2 - 4 * unit,
      fill: DISTANCE_COLOUR, 'font-size': fontSize, 'stroke-width': 3 * unit,
    }, `${d.tracking_identifier}: ${d.text}`));
    svg.append(group);
  }
  caption.textContent = `${view.notice}. Image ${sop}, ${cols} x ${rows} px` +
    (view.image.pixel_spacing_mm ? `, spacing ${view.image.pixel_spacing_mm.join(' x ')} mm` : '');
}

// ------------------------------------------------------------------ the thread

function textOf(communication) {
  return (communication.payload || []).map((p) => p.contentString || '').join('\n');
}

async function loadThread(view) {
  const thread = $('thread');
  let bundle;
  try {
    const query = new URLSearchParams({
      about: `DiagnosticReport/${view.report_id}`, _count: '200', _sort: '_lastUpdated',
    });
    bundle = await (await api(`/fhir/Communication?${query}`)).json();
  } catch (e) {
    thread.replaceChildren(element('li', {}, `The thread could not be read: ${e.message}`));
    return;
  }
  const all = (bundle.entry || []).map((e) => e.resource);
  const isAnswer = (c) => (c.inResponseTo || []).length > 0;
  const questions = all.filter((c) => !isAnswer(c));
  questions.sort((a, b) => (a.sent || '').localeCompare(b.sent || ''));
  thread.replaceChildren();
  for (const q of questions) {
    const item = element('li', { class: 'turn', 'data-question-id': q.id });
    item.append(element('div', { class: 'question' }, `Q (${q.language || 'en'}): ${textOf(q)}`));
    const answers = all.filter((c) =>
      (c.inResponseTo || []).some((r) => r.reference === `Communication/${q.id}`));
    if (!answers.length) {
      item.append(element('div', { class: 'status' }, `waiting for the answer (${q.status})`));
    }
    for (const a of answers) {
      const reason = a.statusReason ? ` (${a.statusReason.text || ''})` : '';
      item.append(element('div', { class: 'answer', 'data-status': a.status }, textOf(a)));
      item.append(element('div', { class: 'status' }, `answer ${a.status}${reason}, sent ${a.sent}`));
    }
    thread.append(item);
  }
  if (!questions.length) thread.append(element('li', { class: 'empty' }, 'No questions yet.'));
}

async function ask(event) {
  event.preventDefault();
  if (!current) return;
  const question = $('question').value.trim();
  if (!question) return;
  const state = $('ask-state');
  $('ask').disabled = true;
  state.textContent = 'asking... (the answer comes when the model has read the image)';
  const body = {
    resourceType: 'Parameters',
    parameter: [
      { name: 'question', valueString: question },
      { name: 'language', valueCode: $('language').value },
    ],
  };
  try {
    await api(`/fhir/DiagnosticReport/${current.report_id}/$ask`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/fhir+json', Prefer: 'respond-sync' },
      body: JSON.stringify(body),
    });
    $('question').value = '';
    state.textContent = 'answered';
  } catch (e) {
    state.textContent = `not asked: ${e.message}`;
  } finally {
    $('ask').disabled = false;
  }
  await openStudy(current.study_uid); // an answer may amend anchors or add a distance
}

// ------------------------------------------------------------------ start

function start() {
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('token').value.trim());
    $('token').value = '';
    loadStudies();
  });
  $('forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    current = null;
    $('list').hidden = true;
    $('study').hidden = true;
    $('who').textContent = '';
  });
  $('ask-form').addEventListener('submit', ask);
  window.addEventListener('resize', () => current && drawOverlay(current));
  if (token()) loadStudies();
}

start();
