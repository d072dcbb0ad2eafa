// One job: its progress and step timeline, live from its event stream (GET /v1/jobs/{id}/events, replayed from
// the start, so the timeline is whole even when the page opens late), the report as charts, the provenance,
// the artifacts to download, cancel, and deleting its files.

import {ApiError, api, download, follow} from "./api.js";
import {reportCharts} from "./charts.js";
import {badge, clear, formatBytes, formatNumber, formatTime, h, table} from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const RANK = {queued: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2};

function recipeLine(job) {
  const steps = job.recipe?.steps;
  if (job.tune) return "tuned (see the trials below)";
  if (!Array.isArray(steps) || !steps.length) return "-";
  return steps.map((step) => String(step?.op ?? "?")).join(" → ");
}

function times(ratio, better, worse) {
  if (typeof ratio !== "number" || !(ratio > 0)) return "-";
  return ratio >= 1 ? `${formatNumber(ratio, 3)}x ${better}` : `${formatNumber(1 / ratio, 3)}x ${worse}`;
}

function resultsTable(metrics) {
  const before = metrics.baseline || {};
  const after = metrics.compressed || {};
  const fidelity = metrics.fidelity || {};
  const rows = [
    ["Size", formatBytes(before.size_bytes), formatBytes(after.size_bytes),
      times(metrics.compression_ratio, "smaller", "larger")],
    ["Latency p50", `${formatNumber(before.latency_ms?.p50, 3)} ms`, `${formatNumber(after.latency_ms?.p50, 3)} ms`,
      times(metrics.speedup, "faster", "slower")],
    ["Latency p95", `${formatNumber(before.latency_ms?.p95, 3)} ms`, `${formatNumber(after.latency_ms?.p95, 3)} ms`,
      ""],
    ["Output cosine (mean)", "1", formatNumber(fidelity.cosine_mean, 5), ""],
    ["Output cosine (worst)", "1", formatNumber(fidelity.cosine_min, 5), ""],
  ];
  if (typeof fidelity.top1_agreement === "number") {
    rows.push(["Top-1 agreement", "1", formatNumber(fidelity.top1_agreement, 4), ""]);
  }
  if (before.accuracy != null || after.accuracy != null) {
    rows.push(["Accuracy", formatNumber(before.accuracy), formatNumber(after.accuracy), ""]);
  }
  return table("Before and after", ["Measure", "Original", "Compressed", "Change"], rows);
}

/** Nested JSON as nested definition lists (all text). */
function describe(value) {
  if (value === null || value === undefined) return h("span", {class: "muted"}, "-");
  if (Array.isArray(value)) {
    if (value.every((v) => v === null || typeof v !== "object")) return value.map(String).join(", ") || "-";
    return h("ol", {}, value.map((v) => h("li", {}, describe(v))));
  }
  if (typeof value === "object") {
    return h("dl", {class: "tree"}, Object.entries(value).flatMap(([key, v]) => [h("dt", {}, key),
      h("dd", {}, describe(v))]));
  }
  return String(value);
}

export async function renderJob(main, {signal, params: [jobId]}) {
  const heading = h("h1", {tabIndex: -1}, "Job");
  main.append(heading);
  let job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`, undefined, {signal});

  const statusBadge = h("span", {class: "job-status", "aria-live": "polite"});
  const liveState = h("p", {class: "live-state", role: "status"});
  const progressBar = h("progress", {max: 1, value: 0, id: "job-progress"});
  const progressText = h("span", {class: "progress-text"});
  const progressMessage = h("p", {class: "progress-message"});
  const errorBox = h("div", {class: "error-box", role: "alert", hidden: true});
  const actionMessage = h("p", {class: "action-message", role: "status"});
  const cancelButton = h("button", {type: "button", class: "danger"}, "Cancel job");
  const deleteButton = h("button", {type: "button", class: "danger"}, "Delete files");
  const summary = h("dl", {class: "summary"});
  const timeline = h("ol", {class: "timeline", "aria-label": "Event timeline"});
  const stepList = h("ol", {class: "timeline steps", "aria-label": "Step timeline"});
  let reachedStep = -1; // the furthest recipe step a progress event has named
  const report = h("section", {"aria-labelledby": "report-title"});
  const provenance = h("section", {"aria-labelledby": "provenance-title"});
  const artifacts = h("section", {"aria-labelledby": "artifacts-title"});
  main.append(
    h("div", {class: "job-head"}, statusBadge, h("div", {class: "actions"}, cancelButton, deleteButton)),
    actionMessage, liveState,
    h("div", {class: "progress-row"}, h("label", {htmlFor: "job-progress"}, "Progress"), progressBar, progressText),
    progressMessage, errorBox, summary,
    h("section", {"aria-labelledby": "timeline-title", class: "timelines"}, h("h2", {id: "timeline-title"}, "Timeline"),
      h("div", {}, h("h3", {}, "Recipe steps"), stepList), h("div", {}, h("h3", {}, "Events"), timeline)),
    report, provenance, artifacts);

  // The timeline: one entry per stage (load, measure, each recipe step, tune trials, package, upload).
  const entries = new Map();

  function entry(key, label) {
    if (!entries.has(key)) {
      const item = {label, message: "", node: h("li", {class: "current"})};
      for (const other of entries.values()) other.node.className = "done";
      entries.set(key, item);
      timeline.append(item.node);
    }
    return entries.get(key);
  }

  function drawEntry(item) {
    item.node.replaceChildren(h("span", {class: "stage"}, item.label),
      ...(item.message ? [" ", h("span", {class: "stage-message"}, item.message)] : []));
  }

  function onStatus(data) {
    const label = data.status === "running" ? `running (attempt ${data.attempts})` : data.status;
    const item = entry(`status:${data.status}:${data.attempts}`, label);
    item.message = data.status === "queued" ? `on the ${data.target?.device === "cuda" ? "gpu" : "cpu"} queue`
      : formatTime(data.finished_at || data.started_at || data.created_at);
    drawEntry(item);
    if (TERMINAL.has(data.status)) {
      item.node.className = `done final final-${data.status}`;
      for (const other of entries.values()) if (other !== item) other.node.className = "done";
    }
  }

  function onProgress(data) {
    const step = Number.isInteger(data.step_index) ? `step ${data.step_index + 1}: ` : "";
    const trial = Number.isInteger(data.trial) ? `trial ${data.trial}` : null;
    const key = trial ?? `${data.stage}:${data.step_index}`;
    const item = entry(key, trial ? `tune: ${trial}` : `${step}${data.stage ?? "working"}`);
    if (Number.isInteger(data.step_index)) reachedStep = Math.max(reachedStep, data.step_index);
    item.message = `${data.message ?? ""}${Number.isInteger(data.epoch) ? ` (epoch ${data.epoch})` : ""}`;
    drawEntry(item);
    setProgress(data.fraction, data.message);
    drawSteps();
  }

  function setProgress(fraction, message) {
    const value = Math.max(0, Math.min(1, Number(fraction) || 0));
    progressBar.value = value;
    progressText.textContent = `${Math.round(value * 100)}%`;
    progressMessage.textContent = message || "";
  }

  /** The recipe's steps: done, current or to come; with their time and measurements once the job has them. */
  function drawSteps() {
    const planned = Array.isArray(job.recipe?.steps) ? job.recipe.steps : [];
    const measured = Array.isArray(job.metrics?.steps) ? job.metrics.steps : [];
    const count = Math.max(planned.length, measured.length);
    const items = [];
    for (let i = 0; i < count; i += 1) {
      const step = measured[i] || planned[i] || {};
      let state = i < reachedStep ? "done" : i === reachedStep && job.status === "running" ? "current" : "pending";
      if (job.status === "succeeded" || measured[i]) state = "done";
      const facts = [];
      if (typeof measured[i]?.seconds === "number") facts.push(`${formatNumber(measured[i].seconds, 3)} s`);
      if (typeof measured[i]?.size_bytes === "number") facts.push(formatBytes(measured[i].size_bytes));
      if (typeof measured[i]?.fidelity?.cosine_mean === "number") {
        facts.push(`cosine ${formatNumber(measured[i].fidelity.cosine_mean, 5)}`);
      }
      items.push(h("li", {class: state}, h("span", {class: "stage"}, `${i + 1}. ${String(step.op ?? "?")}`), " ",
        h("span", {class: "stage-message"}, [state === "pending" ? "to come" : state, ...facts].join(", "))));
    }
    if (!items.length) items.push(h("li", {}, job.tune ? "tuning: the trials are below when it ends" : "no steps"));
    stepList.replaceChildren(...items);
  }

  function drawSummary() {
    const items = [["ID", h("code", {}, job.id)], ["Model", h("code", {}, job.model_id)],
      ["Recipe", recipeLine(job)], ["Target", `${job.target?.runtime ?? "-"} on ${job.target?.device ?? "-"}`],
      ["Created", formatTime(job.created_at)], ["Started", formatTime(job.started_at)],
      ["Finished", formatTime(job.finished_at)], ["Attempts", String(job.attempts)]];
    if (job.deleted_at) items.push(["Files deleted", formatTime(job.deleted_at)]);
    summary.replaceChildren(...items.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
  }

  function drawReport() {
    const metrics = job.metrics;
    clear(report);
    clear(provenance);
    if (!metrics) return;
    report.append(h("h2", {id: "report-title"}, "Report"), resultsTable(metrics),
      reportCharts(metrics, job.tune?.metric));
    if (metrics.tuning?.message) report.append(h("p", {class: "tuning-message"}, metrics.tuning.message));
    if (Array.isArray(metrics.notes) && metrics.notes.length) {
      report.append(h("ul", {class: "notes"}, metrics.notes.map((note) => h("li", {},
        typeof note === "string" ? note : JSON.stringify(note)))));
    }
    if (metrics.provenance) {
      provenance.append(h("h2", {id: "provenance-title"}, "Provenance"),
        h("details", {}, h("summary", {}, "Inputs, recipe as it ran, seeds, software and machine"),
          describe(metrics.provenance)));
    }
  }

  function drawArtifacts() {
    clear(artifacts);
    const list = Array.isArray(job.artifacts) ? job.artifacts : [];
    if (!list.length) return;
    const status = h("p", {class: "download-status", role: "status"});
    const rows = list.map((artifact) => {
      const button = h("button", {type: "button", class: "secondary", dataset: {artifactId: artifact.id},
        "aria-label": `Download ${artifact.filename}`}, "Download");
      button.addEventListener("click", async () => {
        button.disabled = true;
        status.className = "download-status";
        status.textContent = `Downloading ${artifact.filename}...`;
        try {
          const saved = await download(`/v1/artifacts/${encodeURIComponent(artifact.id)}/download`, artifact.filename);
          status.textContent = `Saved ${saved.name} (${formatBytes(saved.size)}).`;
        } catch (error) {
          status.className = "download-status error";
          status.textContent = error instanceof ApiError ? error.message : String(error);
        } finally {
          button.disabled = false;
        }
      });
      return [artifact.kind + (artifact.provisional ? " (provisional)" : ""), artifact.format,
        h("span", {class: "name"}, artifact.filename), formatBytes(artifact.size_bytes), button];
    });
    artifacts.append(h("h2", {id: "artifacts-title"}, "Artifacts"),
      table("Files of this job", ["Kind", "Format", "File", "Size", ""], rows), status);
  }

  function draw() {
    heading.textContent = `Job ${job.name || job.id}`;
    document.title = `Job ${job.name || job.id} - modelpress`;
    statusBadge.replaceChildren(badge(job.status));
    cancelButton.hidden = TERMINAL.has(job.status);
    cancelButton.disabled = Boolean(job.cancel_requested);
    deleteButton.hidden = !TERMINAL.has(job.status) || Boolean(job.deleted_at) || !job.artifacts?.length;
    if (job.status === "succeeded") setProgress(1, job.progress?.message);
    else if (job.progress) setProgress(job.progress.fraction, job.progress.message);
    errorBox.hidden = !job.error;
    if (job.error) errorBox.replaceChildren(h("strong", {}, job.error.code), ": ", job.error.message);
    drawSummary();
    drawSteps();
    drawReport();
    drawArtifacts();
  }

  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    try {
      await api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/cancel`, undefined, {signal});
      actionMessage.textContent = "Cancel requested: a running job stops at its next check.";
    } catch (error) {
      if (error.name === "AbortError") return;
      actionMessage.textContent = error.message;
      cancelButton.disabled = false;
    }
  });

  // Deleting the job's files (the job and its report stay) takes two clicks: the first arms the button.
  deleteButton.addEventListener("click", async () => {
    if (deleteButton.dataset.armed !== "yes") {
      deleteButton.dataset.armed = "yes";
      deleteButton.textContent = "Confirm: delete this job's files";
      return;
    }
    deleteButton.disabled = true;
    try {
      await api("DELETE", `/v1/jobs/${encodeURIComponent(job.id)}`, undefined, {signal});
      job = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}`, undefined, {signal});
      actionMessage.textContent = "The job's files are deleted; its report stays.";
      draw();
    } catch (error) {
      if (error.name === "AbortError") return;
      actionMessage.textContent = error.message;
    } finally {
      deleteButton.disabled = false;
      deleteButton.dataset.armed = "no";
      deleteButton.textContent = "Delete files";
    }
  });

  // A running tune job offers its best trial so far as a provisional artifact: look again as trials go by.
  let refreshing = null;
  function refreshProvisional() {
    if (refreshing) return;
    refreshing = api("GET", `/v1/jobs/${encodeURIComponent(job.id)}/artifacts`, undefined, {signal})
      .then((list) => {
        if (job.status !== "running") return;
        job = {...job, artifacts: list.data};
        drawArtifacts();
      })
      .catch(() => {})
      .finally(() => setTimeout(() => {
        refreshing = null;
      }, 2000));
  }

  draw();
  liveState.textContent = TERMINAL.has(job.status) ? "Finished." : "Connecting to live updates...";
  await follow(`/v1/jobs/${encodeURIComponent(job.id)}/events`, {
    signal,
    onState: (state) => {
      liveState.textContent = state === "live" ? (TERMINAL.has(job.status) ? "Finished." : "Live.")
        : "Live updates interrupted; reconnecting...";
    },
    onEvent: (event, data) => {
      if (event === "progress") {
        onProgress(data);
        if (Number.isInteger(data.trial) && job.status === "running") refreshProvisional();
        return;
      }
      onStatus(data);
      // The replayed history carries the job as it was then: keep the newest state seen.
      if (event === "end" || RANK[data.status] >= RANK[job.status]) job = data;
      draw();
      if (event === "end") liveState.textContent = "Finished.";
    },
  });
}
