// Jobs: the tenant's jobs, filtered by status and model, kept live by the tenant's event stream (GET /v1/events).
// The stream opens before the list is read, so no change falls between the two.

import {follow, listAll} from "./api.js";
import {badge, clear, field, formatTime, h} from "./dom.js";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
// A status event read late (the list was read after it happened) must not take a job back to an earlier status.
const RANK = {queued: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2};
const COLUMNS = ["Job", "Model", "Status", "Progress", "Created", "Finished"];

function progressCell(job) {
  const fraction = job.status === "succeeded" ? 1 : Number(job.progress?.fraction) || 0;
  const text = `${Math.round(fraction * 100)}%`;
  return h("span", {class: "progress-cell"},
    h("progress", {max: 1, value: fraction, "aria-label": `Progress of ${job.name || job.id}`}), ` ${text}`);
}

export async function renderJobs(main, {signal}) {
  const statusSelect = h("select", {}, h("option", {value: ""}, "Any status"),
    STATUSES.map((status) => h("option", {value: status}, status)));
  const modelSelect = h("select", {}, h("option", {value: ""}, "Any model"));
  const liveState = h("p", {class: "live-state", role: "status"}, "Connecting to live updates...");
  const list = h("div", {class: "list"}, h("p", {}, "Loading..."));
  main.append(h("h1", {tabIndex: -1}, "Jobs"),
    h("div", {class: "filters"}, field("Status", statusSelect), field("Model", modelSelect),
      h("a", {href: "#/new", class: "button"}, "New job")),
    liveState, list);

  const modelNames = new Map();
  const rows = new Map(); // job id -> {job, row}
  const tbody = h("tbody");

  function matches(job) {
    return (!statusSelect.value || job.status === statusSelect.value)
      && (!modelSelect.value || job.model_id === modelSelect.value);
  }

  function rowFor(job) {
    const cells = [
      h("a", {href: `#/jobs/${encodeURIComponent(job.id)}`}, job.name || job.id),
      modelNames.get(job.model_id) ?? job.model_id,
      badge(job.status),
      progressCell(job),
      formatTime(job.created_at),
      formatTime(job.finished_at),
    ];
    const row = h("tr", {dataset: {jobId: job.id}}, cells.map((cell, i) => h("td", {dataset: {label: COLUMNS[i]}},
      cell)));
    return row;
  }

  function put(job) {
    const known = rows.get(job.id);
    if (known && RANK[job.status] < RANK[known.job.status]) return;
    if (!matches(job)) {
      if (known) {
        known.row.remove();
        rows.delete(job.id);
      }
      return;
    }
    const row = rowFor(job);
    if (known) known.row.replaceWith(row);
    else tbody.prepend(row); // a new job: the newest come first
    rows.set(job.id, {job, row});
    showEmpty();
  }

  function progress(jobId, data) {
    const known = rows.get(jobId);
    if (!known || known.job.status !== "running") return;
    known.job = {...known.job, progress: {...known.job.progress, fraction: data.fraction, message: data.message}};
    const row = rowFor(known.job);
    known.row.replaceWith(row);
    known.row = row;
  }

  const empty = h("p", {class: "empty"}, "No jobs match.");

  function showEmpty() {
    empty.hidden = rows.size > 0;
  }

  async function load() {
    const query = new URLSearchParams();
    if (statusSelect.value) query.set("status", statusSelect.value);
    if (modelSelect.value) query.set("model_id", modelSelect.value);
    const jobs = await listAll(`/v1/jobs${query.size ? `?${query}` : ""}`, {signal, max: 400});
    rows.clear();
    tbody.replaceChildren();
    for (const job of jobs) {
      const row = rowFor(job);
      rows.set(job.id, {job, row});
      tbody.append(row);
    }
    clear(list).append(h("table", {class: "data"}, h("caption", {}, "Jobs, newest first"),
      h("thead", {}, h("tr", {}, COLUMNS.map((c) => h("th", {scope: "col"}, c)))), tbody), empty);
    showEmpty();
  }

  // Opened first; events that come before the list is read are applied to it when it arrives.
  const early = [];
  let loaded = false;
  let streamOpen;
  const opened = new Promise((resolve) => {
    streamOpen = resolve;
  });
  follow("/v1/events", {
    signal,
    onState: (state) => {
      liveState.textContent = state === "live" ? "Live: statuses update as they change."
        : "Live updates interrupted; reconnecting...";
      streamOpen();
    },
    onEvent: (event, data) => {
      if (!loaded) {
        early.push([event, data]);
        return;
      }
      if (event === "status") put(data);
      else if (event === "progress") progress(data.job_id, data);
    },
  }).catch(() => {});
  // A stream that cannot open at once (all the tenant's streams in use) must not hold the list back.
  await Promise.race([opened, new Promise((resolve) => setTimeout(resolve, 3000))]);

  const models = await listAll("/v1/models", {signal});
  for (const model of models) {
    modelNames.set(model.id, model.name);
    modelSelect.append(h("option", {value: model.id}, model.name));
  }
  await load();
  loaded = true;
  for (const [event, data] of early.splice(0)) {
    if (event === "status") put(data);
    else if (event === "progress") progress(data.job_id, data);
  }
  statusSelect.addEventListener("change", () => load());
  modelSelect.addEventListener("change", () => load());
}
