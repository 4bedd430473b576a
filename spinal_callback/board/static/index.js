// The SPINAL tab: a run's state at a glance, drawn from /data/plugin/spinal/run.
// No dependency and no network beyond TensorBoard's own server. Every value is drawn as logged:
// no smoothing, no outlier clipping; hover a point, cell or mark for its exact value.

const REFRESH_MS = 5000;
const SVG = 'http://www.w3.org/2000/svg';
const PALETTE = [
  '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
  '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf',
];
const LEVEL_COLOURS = {info: '#8d8d8d', warning: '#f28e0b', critical: '#c62828'};
const STATE_ORDER = ['healthy', 'warning', 'critical', 'stopped'];
const MIN_SPAN = 0.1;
const MAX_COLUMNS = 300;

// A block's colour: the 10 of the palette up to 10 blocks, else evenly spaced hues at two
// lightnesses; the same index gives the same colour in every chart of the tab.
export function blockColour(index, count) {
  if (count <= PALETTE.length) return PALETTE[index];
  const hue = Math.round((index * 360) / count);
  return `hsl(${hue}, 70%, ${index % 2 ? 60 : 38}%)`;
}

// A number as a person reads it: 4 significant digits, exponent form when very large or small.
export function formatNumber(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return 'n/a';
  if (!Number.isFinite(value)) return value > 0 ? '+inf' : '-inf';
  const size = Math.abs(value);
  if (size !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

// Evenly spaced round tick values over [low, high], labelled so that no two labels repeat.
export function ticks(low, high, count = 4) {
  const span = high - low || Math.abs(high) || 1;
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) {
    values.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  const large = Math.max(Math.abs(low), Math.abs(high)) >= 1e5;
  let digits = large ? 2 : Math.max(0, -Math.floor(Math.log10(step)) + (step / power === 2.5 ? 1 : 0));
  const label = (v) => (large ? v.toExponential(Math.min(digits, 8)) : v.toFixed(Math.min(digits, 10)));
  let labels = values.map(label);
  while (new Set(labels).size < labels.length && digits < 10) {
    digits += 1;
    labels = values.map(label);
  }
  return values.map((value, i) => ({value, label: labels[i]}));
}

// The y range of a chart: the values' range, widened to at least MIN_SPAN of their size and to
// at least `floor`, so that a move of 1% (or of 0.0003 in a share) does not fill the chart.
export function valueRange(values, include = [], floor = 0) {
  const finite = [...values, ...include].filter((v) => v !== null && Number.isFinite(v));
  if (!finite.length) return [0, 1];
  let low = Math.min(...finite);
  let high = Math.max(...finite);
  const least = Math.max(MIN_SPAN * Math.max(Math.abs(low), Math.abs(high), 1e-12), floor);
  if (high - low < least) {
    const middle = (high + low) / 2;
    const positive = low >= 0;
    low = middle - least / 2;
    high = middle + least / 2;
    if (positive && low < 0) [low, high] = [0, high - low];
  }
  const pad = (high - low) * 0.06;
  return [low - pad, high + pad];
}

function element(tag, attributes = {}, children = []) {
  const node = tag.startsWith('svg:')
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function titled(node, text) {
  node.appendChild(element('svg:title', {text}));
  return node;
}

const STYLE = `
  body { font: 13px/1.35 Roboto, system-ui, sans-serif; color: #212121; margin: 0; padding: 8px 16px; }
  #top { display: flex; gap: 12px; align-items: center; margin-bottom: 6px; color: #555; }
  #status { padding: 8px 12px; border-left-width: 8px; border-left-style: solid; border-radius: 3px; margin-bottom: 6px; }
  #status .headline { font-size: 20px; font-weight: 600; }
  .state-healthy { background: #e8f5e9; border-color: #2e7d32; }
  .state-warning { background: #fff3e0; border-color: #f28e0b; }
  .state-critical, .state-stopped { background: #fdecea; border-color: #c62828; }
  .grid { display: grid; grid-template-columns: 1fr 1fr; gap: 4px 20px; }
  .panel h3 { font-size: 13px; font-weight: 600; margin: 4px 0 0; }
  #legend { display: flex; flex-wrap: wrap; gap: 4px 12px; margin: 2px 0; }
  .legend-item::before { content: ''; display: inline-block; width: 14px; height: 4px; margin-right: 4px;
    vertical-align: middle; background: currentColor; }
  .legend-item { font-weight: 600; }
  .legend-reference { color: #555; }
  .legend-reference::before { background: none; border-top: 2px dashed #555; height: 0; }
  #neutral-reason { color: #555; font-style: italic; margin: 4px 0; }
  svg text { font: 11px Roboto, system-ui, sans-serif; fill: #444; }
`;

function axes(svg, box, x, y, xTicks, yTicks) {
  for (const t of yTicks) {
    const py = y(t.value);
    svg.appendChild(element('svg:line', {x1: box.left, x2: box.right, y1: py, y2: py, stroke: '#eee'}));
    svg.appendChild(element('svg:text', {x: box.left - 4, y: py + 4, 'text-anchor': 'end', text: t.label}));
  }
  for (const t of xTicks) {
    svg.appendChild(element('svg:text', {x: x(t.value), y: box.bottom + 13, 'text-anchor': 'middle', text: t.label}));
  }
  svg.appendChild(element('svg:line', {x1: box.left, x2: box.right, y1: box.bottom, y2: box.bottom, stroke: '#999'}));
}

function stepScale(steps, box) {
  const first = Math.min(0, ...steps);
  const last = Math.max(first + 1, ...steps);
  return {x: (s) => box.left + ((s - first) / (last - first)) * (box.right - box.left), first, last};
}

function stepTicks(first, last) {
  return ticks(first, last, 6).filter((t) => Number.isInteger(t.value));
}

// A line chart: one line per series in its colour, its reference as a dashed line.
function lineChart({id, title, width, height, steps, series, include = [], floor = 0}) {
  const panel = element('div', {class: 'panel', id});
  panel.appendChild(element('h3', {text: title}));
  const svg = element('svg:svg', {width, height});
  const box = {left: 52, right: width - 16, top: 6, bottom: height - 18};
  const values = series.flatMap((s) => [...s.values, s.reference ?? null]);
  const [low, high] = valueRange(values, include, floor);
  const {x, first, last} = stepScale(steps, box);
  const y = (v) => box.bottom - ((v - low) / (high - low)) * (box.bottom - box.top);
  axes(svg, box, x, y, stepTicks(first, last), ticks(low, high, 4));
  for (const s of series) {
    if (s.reference !== null && s.reference !== undefined) {
      svg.appendChild(titled(element('svg:line', {
        x1: box.left, x2: box.right, y1: y(s.reference), y2: y(s.reference),
        stroke: s.colour, 'stroke-dasharray': '5 4', 'stroke-width': 1.2, 'data-series': s.name,
        class: 'reference-line',
      }), `${s.name} reference: ${formatNumber(s.reference)}`));
    }
    const points = steps.map((step, i) => [step, s.values[i]]).filter(([, v]) => v !== null);
    svg.appendChild(element('svg:polyline', {
      points: points.map(([step, v]) => `${x(step)},${y(v)}`).join(' '),
      fill: 'none', stroke: s.colour, 'stroke-width': 1.8, 'data-series': s.name, class: 'series-line',
    }));
    for (const [step, v] of points) {
      svg.appendChild(titled(element('svg:circle', {
        cx: x(step), cy: y(v), r: 2.6, fill: s.colour, 'data-value': v, class: 'point',
      }), `${s.name} at step ${step}: ${formatNumber(v)}`));
    }
  }
  panel.appendChild(svg);
  return panel;
}

// The alerts on a step axis: a lane per level, the stop as a line, recoveries as triangles.
function timeline(view, width) {
  const height = 64;
  const panel = element('div', {class: 'panel', id: 'timeline'});
  const count = view.alerts.length;
  panel.appendChild(element('h3', {text: `Alerts (${count ? count : 'none'})`}));
  const svg = element('svg:svg', {width, height});
  const box = {left: 52, right: width - 16, top: 4, bottom: height - 18};
  const steps = [...view.steps, ...view.alerts.map((a) => a.step)];
  if (view.status.step !== null) steps.push(view.status.step);
  const {x, first, last} = stepScale(steps, box);
  const lanes = {critical: box.top + 6, warning: box.top + 20, info: box.top + 34};
  axes(svg, box, x, null, stepTicks(first, last), []);
  for (const [level, ly] of Object.entries(lanes)) {
    svg.appendChild(element('svg:text', {x: box.left - 4, y: ly + 4, 'text-anchor': 'end', text: level}));
  }
  for (const alert of view.alerts) {
    svg.appendChild(titled(element('svg:circle', {
      cx: x(alert.step), cy: lanes[alert.level], r: 5, fill: LEVEL_COLOURS[alert.level],
      class: `alert-mark alert-${alert.level}`,
    }), `step ${alert.step} ${alert.level} ${alert.rule}: ${alert.message}`));
  }
  for (const recovery of view.recoveries) {
    const rx = x(recovery.step);
    svg.appendChild(titled(element('svg:path', {
      d: `M${rx - 5},${box.bottom - 2} L${rx + 5},${box.bottom - 2} L${rx},${box.bottom - 11} Z`,
      fill: '#2e7d32', class: 'recovery-mark',
    }), recovery.message));
  }
  if (view.status.state === 'stopped' && view.status.step !== null) {
    const sx = x(view.status.step);
    svg.appendChild(titled(element('svg:line', {
      x1: sx, x2: sx, y1: box.top, y2: box.bottom, stroke: '#212121', 'stroke-width': 2, class: 'stop-mark',
    }), view.status.headline));
  }
  panel.appendChild(svg);
  return panel;
}

// Viridis, sampled: low values dark blue, high values yellow.
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function rampColour(t) {
  const at = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(at), RAMP.length - 2);
  const f = at - i;
  const c = RAMP[i].map((v, k) => Math.round(v + f * (RAMP[i + 1][k] - v)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

// Blocks x probe steps, the reference as the first column, each cell titled with its value.
function heatmap({id, title, width, height, view, rows, reference}) {
  const panel = element('div', {class: 'panel heatmap', id});
  const blocks = view.blocks.map((name, i) => ({name, i})).filter(({i}) => rows[i] !== null);
  const every = Math.max(1, Math.ceil(view.steps.length / MAX_COLUMNS));
  const columns = view.steps.map((step, j) => ({step, j})).filter(({j}) => j % every === 0 || j === view.steps.length - 1);
  const refs = reference ? blocks.map(({i}) => reference[i]) : [];
  const all = [...blocks.flatMap(({i}) => columns.map(({j}) => rows[i][j])), ...refs]
    .filter((v) => v !== null && Number.isFinite(v));
  const low = all.length ? Math.min(...all) : 0;
  const high = all.length ? Math.max(...all) : 1;
  panel.appendChild(element('h3', {text: `${title}: ${formatNumber(low)} (dark) to ${formatNumber(high)} (bright)`}));
  const svg = element('svg:svg', {width, height, class: 'heatmap-svg'});
  const box = {left: 52, right: width - 16, top: 2, bottom: height - 18};
  const cells = columns.length + (reference ? 1 : 0);
  const cw = (box.right - box.left) / Math.max(cells, 1);
  const rh = (box.bottom - box.top) / Math.max(blocks.length, 1);
  const alertSteps = new Map();
  for (const a of view.alerts) {
    if (a.level !== 'info') alertSteps.set(a.step, a.level === 'critical' || alertSteps.get(a.step) === 'critical' ? 'critical' : 'warning');
  }
  blocks.forEach(({name, i}, r) => {
    const ry = box.top + (blocks.length - 1 - r) * rh;
    svg.appendChild(element('svg:text', {
      x: box.left - 4, y: ry + rh / 2 + 4, 'text-anchor': 'end', fill: blockColour(i, view.blocks.length),
      style: `fill: ${blockColour(i, view.blocks.length)}; font-weight: 600`, text: name,
    }));
    const cellsOfRow = reference ? [{label: 'reference', value: reference[i]}] : [];
    for (const {step, j} of columns) cellsOfRow.push({label: `step ${step}`, value: rows[i][j], step});
    cellsOfRow.forEach((cell, c) => {
      const t = high > low ? (cell.value - low) / (high - low) : 0.5;
      svg.appendChild(titled(element('svg:rect', {
        x: box.left + c * cw, y: ry, width: Math.max(cw - (cw > 4 ? 1 : 0), 0.5), height: Math.max(rh - 1, 0.5),
        fill: cell.value === null ? '#fff' : rampColour(t), class: 'cell', 'data-value': cell.value ?? 'n/a',
      }), `${name} ${cell.label}: ${formatNumber(cell.value)}`));
    });
  });
  const offset = reference ? 1 : 0;
  if (reference) {
    svg.appendChild(element('svg:text', {x: box.left + cw / 2, y: box.bottom + 13, 'text-anchor': 'middle', text: 'ref'}));
  }
  const labelEvery = Math.max(1, Math.ceil(columns.length / 8));
  columns.forEach(({step}, c) => {
    const cx = box.left + (c + offset + 0.5) * cw;
    if (c % labelEvery === 0) {
      svg.appendChild(element('svg:text', {x: cx, y: box.bottom + 13, 'text-anchor': 'middle', text: String(step)}));
    }
    const level = alertSteps.get(step);
    if (level) {
      svg.appendChild(titled(element('svg:rect', {
        x: box.left + (c + offset) * cw, y: box.bottom, width: Math.max(cw - 1, 2), height: 3,
        fill: LEVEL_COLOURS[level], class: `heatmap-alert alert-${level}`,
      }), `step ${step}: ${level}`));
    }
  });
  panel.appendChild(svg);
  return panel;
}

function legend(view) {
  const row = element('div', {id: 'legend'});
  view.blocks.forEach((name, i) => {
    row.appendChild(element('span', {
      class: 'legend-item', 'data-block': name, style: `color: ${blockColour(i, view.blocks.length)}`, text: name,
    }));
  });
  if (view.reference) row.appendChild(element('span', {class: 'legend-item legend-reference', text: 'reference (dashed)'}));
  return row;
}

function status(view) {
  const box = element('div', {id: 'status', class: `state-${view.status.state}`});
  box.appendChild(element('div', {class: 'headline', text: view.status.headline}));
  box.appendChild(element('div', {class: 'detail', text: view.status.detail}));
  return box;
}

function draw(root, view) {
  root.textContent = '';
  const width = Math.max(document.documentElement.clientWidth - 32, 600);
  const half = Math.floor((width - 20) / 2);
  root.appendChild(status(view));
  root.appendChild(timeline(view, width));
  if (!view.steps.length) {
    root.appendChild(element('p', {text: 'No probe yet: the first one is traced at step 0.'}));
    return;
  }
  root.appendChild(legend(view));
  const n = view.blocks.length;
  const series = (score) => view.blocks.map((name, i) => ({
    name, colour: blockColour(i, n), values: view[score][i] || [],
    reference: view.reference ? view.reference[score][i] : null,
  })).filter((s, i) => view[score][i] !== null);
  const grid = element('div', {class: 'grid'});
  grid.appendChild(lineChart({
    id: 'contraction', title: 'Contraction per late block (higher: fewer directions)',
    width: half, height: 170, steps: view.steps, series: series('contraction'),
  }));
  grid.appendChild(lineChart({
    id: 'transport', title: 'Transport to the next late block (lower: smoother)',
    width: half, height: 170, steps: view.steps, series: series('transport'), floor: 0.05,
  }));
  const reference = (score) => (view.reference ? view.reference[score] : null);
  grid.appendChild(heatmap({
    id: 'heatmap-contraction', title: 'Contraction heatmap', width: half, height: 150, view,
    rows: view.contraction, reference: reference('contraction'),
  }));
  grid.appendChild(heatmap({
    id: 'heatmap-transport', title: 'Transport heatmap', width: half, height: 150, view,
    rows: view.transport, reference: reference('transport'),
  }));
  root.appendChild(grid);
  const neutral = view.neutral;
  if (!neutral.shown) {
    root.appendChild(element('div', {id: 'neutral-reason', text: `Neutral-text health not shown: ${neutral.reason}.`}));
    return;
  }
  const health = element('div', {class: 'grid', id: 'neutral'});
  health.appendChild(lineChart({
    id: 'perplexity', title: 'Neutral-text perplexity, multiple of the reference (1 = unchanged)',
    width: half, height: 120, steps: neutral.steps, include: [1], floor: 0.1,
    series: [{name: 'perplexity ratio', colour: '#212121', values: neutral.perplexity_ratio, reference: 1}],
  }));
  health.appendChild(lineChart({
    id: 'departure', title: 'Neutral-text late-layer trace, relative change from the reference',
    width: half, height: 120, steps: neutral.steps, include: [0], floor: 0.05,
    series: [{name: 'departure', colour: '#212121', values: neutral.departure, reference: 0}],
  }));
  root.appendChild(health);
}

async function fetchJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

export async function render() {
  document.head.appendChild(element('style', {text: STYLE}));
  const top = element('div', {id: 'top'});
  const picker = element('select', {id: 'run'});
  const updated = element('span', {id: 'updated'});
  top.append(element('label', {for: 'run', text: 'Run'}), picker, updated);
  const root = element('div', {id: 'view'});
  document.body.append(top, root);
  let shown = null;
  let stamp = null;

  async function refreshRuns() {
    const {runs} = await fetchJson('./runs');
    const chosen = picker.value;
    picker.textContent = '';
    for (const run of runs) picker.appendChild(element('option', {value: run.run, text: `${run.run} (${run.state})`}));
    if (!runs.length) {
      root.textContent = 'No run with a trace history (spinal_traces.jsonl) under this log dir yet.';
      return;
    }
    const worst = [...runs].sort((a, b) => STATE_ORDER.indexOf(b.state) - STATE_ORDER.indexOf(a.state))[0];
    picker.value = runs.some((r) => r.run === chosen) ? chosen : worst.run;
  }

  async function refreshView(force) {
    if (!picker.value) return;
    const view = await fetchJson(`./run?${new URLSearchParams({run: picker.value})}`);
    if (!force && shown === picker.value && stamp === view.updated) return;
    shown = picker.value;
    stamp = view.updated;
    draw(root, view);
    updated.textContent = view.updated ? `files updated ${new Date(view.updated * 1000).toLocaleString()}` : '';
    document.body.dataset.rendered = String(Date.now());
  }

  picker.addEventListener('change', () => refreshView(true));
  window.addEventListener('resize', () => refreshView(true));
  try {
    await refreshRuns();
    await refreshView(true);
  } catch (error) {
    root.textContent = `The SPINAL tab could not read this log dir: ${error.message}`;
  }
  setInterval(async () => {
    try {
      await refreshRuns();
      await refreshView(false);
    } catch (error) {
      updated.textContent = `refresh failed: ${error.message}`;
    }
  }, REFRESH_MS);
}
