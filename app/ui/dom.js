// Building the page from data without ever parsing it as HTML: every string becomes a text node, so a model
// named "<img onerror=...>" is shown as those characters. Nothing here parses markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, props, children) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.setAttribute("class", value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && !(node instanceof SVGElement)) node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** h("a", {href: "#/jobs"}, "Jobs", ...): an HTML element; strings are text. */
export function h(tag, props, ...children) {
  return fill(document.createElement(tag), props, children);
}

/** An SVG element, attributes set as given. */
export function s(tag, props, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), props, children);
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

let uniqueId = 0;

/** An id for pairing a label with its control. */
export function newId(prefix) {
  uniqueId += 1;
  return `${prefix}-${uniqueId}`;
}

/** A labelled control: <div class="field"><label for>..</label>control<p class="field-error"></p></div>. */
export function field(labelText, control, hint) {
  control.id = control.id || newId("f");
  const error = h("p", {class: "field-error", id: `${control.id}-error`, hidden: true, role: "alert"});
  const described = [error.id];
  let hintNode = null;
  if (hint) {
    hintNode = h("p", {class: "hint", id: `${control.id}-hint`}, hint);
    described.unshift(hintNode.id);
  }
  control.setAttribute("aria-describedby", described.join(" "));
  const wrapper = h("div", {class: "field"}, h("label", {htmlFor: control.id}, labelText), control, hintNode, error);
  wrapper.control = control;
  wrapper.error = error;
  return wrapper;
}

export function showFieldError(wrapper, message) {
  wrapper.error.textContent = message || "";
  wrapper.error.hidden = !message;
  if (message) wrapper.control.setAttribute("aria-invalid", "true");
  else wrapper.control.removeAttribute("aria-invalid");
}

const UNITS = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];

export function formatBytes(size) {
  if (typeof size !== "number") return "-";
  for (const [unit, scale] of UNITS) if (size >= scale) return `${(size / scale).toPrecision(3)} ${unit}`;
  return `${size} B`;
}

export function formatNumber(value, digits = 4) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "-";
  return Number(value.toPrecision(digits)).toLocaleString("en-US");
}

export function formatCount(value) {
  return typeof value === "number" ? value.toLocaleString("en-US") : "-";
}

export function formatTime(text) {
  if (!text) return "-";
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? String(text) : date.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

/** A status as a badge whose class comes from a fixed list (the text is the API's, as text). */
const STATUS_CLASSES = new Set(["queued", "running", "succeeded", "failed", "cancelled", "uploaded", "ready",
  "invalid", "pending", "delivered", "active", "revoked"]);

export function badge(status) {
  const known = STATUS_CLASSES.has(status) ? status : "other";
  return h("span", {class: `badge badge-${known}`}, status ?? "-");
}

/** A table that reads as a list of cards on a narrow screen (each cell shows its column name before it). */
export function table(caption, columns, rows) {
  return h("table", {class: "data"},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {scope: "col"}, c)))),
    h("tbody", {}, rows.map((cells) => tableRow(columns, cells))));
}

export function tableRow(columns, cells) {
  return h("tr", {}, cells.map((cell, i) => h("td", {dataset: {label: columns[i]}}, cell)));
}
