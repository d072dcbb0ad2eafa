// Models and datasets: what the tenant has uploaded, and uploads by file picker or drag and drop.

import {ApiError, listAll, upload} from "./api.js";
import {badge, clear, field, formatBytes, formatCount, formatTime, h, newId, table} from "./dom.js";

function inputsText(info) {
  const inputs = info && Array.isArray(info.inputs) ? info.inputs : [];
  if (!inputs.length) return "-";
  return inputs.map((input) => {
    const shape = Array.isArray(input.shape) ? `[${input.shape.join(", ")}]` : "";
    return `${input.name ?? "?"} ${shape} ${input.dtype ?? ""}`.trim();
  }).join("; ");
}

function modelRow(model) {
  const info = model.info || {};
  return [
    h("span", {class: "name"}, model.name),
    h("span", {}, badge(model.status), model.error ? h("span", {class: "cell-note"}, model.error) : null),
    model.format,
    formatBytes(model.size_bytes),
    formatCount(info.params),
    inputsText(info),
    formatTime(model.created_at),
    h("code", {class: "id"}, model.id),
  ];
}

function datasetRow(dataset) {
  return [
    h("span", {class: "name"}, dataset.name),
    dataset.format,
    formatBytes(dataset.size_bytes),
    formatCount(dataset.num_samples),
    dataset.has_labels ? "yes" : "no",
    formatTime(dataset.created_at),
    h("code", {class: "id"}, dataset.id),
  ];
}

const MODEL_COLUMNS = ["Name", "Status", "Format", "Size", "Params", "Inputs", "Uploaded", "ID"];
const DATASET_COLUMNS = ["Name", "Format", "Size", "Samples", "Labels", "Uploaded", "ID"];

/** A file picker and drop zone that uploads to `path` with a progress bar, then calls `onDone(resource)`. */
function uploader({what, path, accept, hint, onDone}) {
  const fileInput = h("input", {type: "file", accept, class: "file-input"});
  const fileField = field(`${what} file`, fileInput, hint);
  const nameInput = h("input", {type: "text", maxLength: 200, autocomplete: "off"});
  const nameField = field("Name (optional)", nameInput);
  const progress = h("progress", {max: 1, value: 0, hidden: true});
  const progressLabel = h("span", {class: "progress-text"});
  const statusId = newId("upload-status");
  progress.setAttribute("aria-labelledby", statusId);
  const status = h("p", {class: "upload-status", id: statusId, role: "status"});
  const zone = h("div", {class: "drop-zone"},
    h("p", {}, `Drop a ${what.toLowerCase()} file here, or choose one:`), fileField, nameField,
    h("div", {class: "progress-row"}, progress, progressLabel), status);

  async function send(file) {
    zone.classList.add("busy");
    status.className = "upload-status";
    status.textContent = `Uploading ${file.name}...`;
    progress.hidden = false;
    progress.value = 0;
    progressLabel.textContent = "0%";
    try {
      const created = await upload(path, file, {name: nameInput.value.trim()}, (fraction) => {
        progress.value = fraction;
        progressLabel.textContent = `${Math.round(fraction * 100)}%`;
      });
      progress.value = 1;
      progressLabel.textContent = "100%";
      status.textContent = `Uploaded ${created.name}.`;
      nameInput.value = "";
      fileInput.value = "";
      onDone(created);
    } catch (error) {
      status.className = "upload-status error";
      status.textContent = `Refused: ${error instanceof ApiError ? error.message : String(error)}`;
      progress.hidden = true;
      progressLabel.textContent = "";
    } finally {
      zone.classList.remove("busy");
    }
  }

  fileInput.addEventListener("change", () => {
    if (fileInput.files.length) send(fileInput.files[0]);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) send(file);
  });
  return zone;
}

export async function renderModels(main, {signal}) {
  const modelsList = h("div", {class: "list", "aria-live": "polite"}, h("p", {}, "Loading..."));
  const datasetsList = h("div", {class: "list"}, h("p", {}, "Loading..."));
  let pollTimer = null;
  signal.addEventListener("abort", () => clearTimeout(pollTimer));

  async function loadModels() {
    const models = await listAll("/v1/models", {signal});
    clear(modelsList).append(models.length ? table("Models", MODEL_COLUMNS, models.map(modelRow))
      : h("p", {class: "empty"}, "No models yet: upload one above."));
    clearTimeout(pollTimer);
    // A new upload is `uploaded` until a worker has inspected it: look again until none is.
    if (models.some((m) => m.status === "uploaded") && !signal.aborted) {
      pollTimer = setTimeout(() => loadModels().catch(() => {}), 1500);
    }
  }

  async function loadDatasets() {
    const datasets = await listAll("/v1/datasets", {signal});
    clear(datasetsList).append(datasets.length ? table("Datasets", DATASET_COLUMNS, datasets.map(datasetRow))
      : h("p", {class: "empty"}, "No datasets yet."));
  }

  main.append(
    h("h1", {tabIndex: -1}, "Models and datasets"),
    h("section", {"aria-labelledby": "models-title"},
      h("h2", {id: "models-title"}, "Models"),
      uploader({what: "Model", path: "/v1/models", accept: ".onnx,.pt2,.zip,.gz,.tgz",
        hint: "ONNX (.onnx), torch.export (.pt2), or a Hugging Face folder as .zip / .tar.gz.",
        onDone: () => loadModels()}),
      modelsList),
    h("section", {"aria-labelledby": "datasets-title"},
      h("h2", {id: "datasets-title"}, "Datasets"),
      uploader({what: "Dataset", path: "/v1/datasets", accept: ".npz,.safetensors,.jsonl",
        hint: ".npz or .safetensors of named input arrays (optional labels), or .jsonl of {\"text\", \"label\"}.",
        onDone: () => loadDatasets()}),
      datasetsList));
  await Promise.all([loadModels(), loadDatasets()]);
}
