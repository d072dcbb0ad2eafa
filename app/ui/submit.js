// New job: a model, then a preset or a recipe, datasets and target; a dry run shows the plan, a submission opens
// the job. A 422 names its field first ("recipe.steps.0.dtype: ..."): the message goes next to that field.

import {ApiError, api, listAll} from "./api.js";
import {clear, field, h, showFieldError} from "./dom.js";

const DEFAULT_RECIPE = {steps: [{op: "quantize", method: "dynamic", dtype: "int8"}]};
const DATASET_ROLES = ["calibration", "train", "eval"];

/** "a.b: why; c: why" -> [["a.b", "why"], ["c", "why"]]; a part with no field name gets null. */
export function fieldMessages(message) {
  const found = [];
  for (const part of String(message).split("; ")) {
    const match = /^([A-Za-z_][A-Za-z0-9_.\-]*): ([\s\S]*)$/.exec(part);
    if (match) found.push([match[1], match[2]]);
    else if (found.length) found[found.length - 1][1] += `; ${part}`;
    else found.push([null, part]);
  }
  return found;
}

function option(value, text, selected) {
  return h("option", {value, selected: Boolean(selected)}, text);
}

export async function renderNewJob(main, {signal}) {
  main.append(h("h1", {tabIndex: -1}, "New job"));
  const loading = h("p", {}, "Loading...");
  main.append(loading);
  const [models, datasets, presetsBody] = await Promise.all([
    listAll("/v1/models", {signal}), listAll("/v1/datasets", {signal}), api("GET", "/v1/presets", undefined, {signal}),
  ]);
  loading.remove();
  const presets = presetsBody.data;
  const ready = models.filter((m) => m.status === "ready");

  const modelSelect = h("select", {required: true},
    ready.length ? null : option("", "No ready model: upload one first"),
    ready.map((m) => option(m.id, `${m.name} (${m.format})`)));
  const nameInput = h("input", {type: "text", maxLength: 200, autocomplete: "off"});

  const modeName = "recipe-mode";
  const presetRadio = h("input", {type: "radio", name: modeName, value: "preset", checked: true, id: "mode-preset"});
  const recipeRadio = h("input", {type: "radio", name: modeName, value: "recipe", id: "mode-recipe"});
  const mode = h("fieldset", {class: "mode"}, h("legend", {}, "Recipe from"),
    h("label", {htmlFor: "mode-preset", class: "inline"}, presetRadio, " a preset"),
    h("label", {htmlFor: "mode-recipe", class: "inline"}, recipeRadio, " a recipe (JSON)"));

  const presetSelect = h("select", {}, presets.map((p, i) => option(p.name, p.name, i === 0)));
  const presetAbout = h("div", {class: "preset-about", "aria-live": "polite"});
  const presetField = field("Preset", presetSelect);
  const presetBox = h("div", {}, presetField, presetAbout);

  const recipeText = h("textarea", {rows: 10, spellcheck: false, class: "code"});
  recipeText.value = JSON.stringify(DEFAULT_RECIPE, null, 2);
  let recipeEdited = false;
  recipeText.addEventListener("input", () => {
    recipeEdited = true;
  });
  const recipeField = field("Recipe (JSON)", recipeText, "An object with \"steps\"; see docs/api.md for each op.");
  recipeField.hidden = true;

  const datasetFields = Object.fromEntries(DATASET_ROLES.map((role) => [role,
    field(`${role[0].toUpperCase()}${role.slice(1)} dataset`,
      h("select", {}, option("", "(none)"), datasets.map((d) => option(d.id, `${d.name} (${d.format})`))))]));
  const deviceSelect = h("select", {}, option("cpu", "CPU", true), option("cuda", "CUDA GPU"));
  const runtimeSelect = h("select", {}, option("onnxruntime", "ONNX Runtime", true), option("pytorch", "PyTorch"));
  const extraText = h("textarea", {rows: 4, spellcheck: false, class: "code",
    placeholder: "{\"tune\": {...}, \"min_fidelity\": 0.99}"});

  const fields = {
    model_id: field("Model", modelSelect),
    name: field("Job name (optional)", nameInput),
    preset: presetField,
    recipe: recipeField,
    device: field("Device", deviceSelect),
    runtime: field("Runtime", runtimeSelect),
    extra: field("Other job fields (JSON object, optional)", extraText,
      "Merged into the request: tune, input_specs, min_fidelity, accept_degraded, webhook_url."),
  };
  const formError = h("p", {class: "error", role: "alert", hidden: true});
  const planBox = h("section", {class: "plan", "aria-labelledby": "plan-title", hidden: true});
  const dryRunButton = h("button", {type: "button", class: "secondary"}, "Dry run");
  const submitButton = h("button", {type: "submit"}, "Submit job");

  function showPreset() {
    const preset = presets.find((p) => p.name === presetSelect.value);
    clear(presetAbout);
    if (!preset) return;
    presetAbout.append(h("p", {}, preset.description),
      h("p", {class: "needs"}, preset.needs.length ? `Needs: ${preset.needs.map((n) => `${n} dataset`).join(", ")}`
        : "Needs no dataset."));
    for (const role of DATASET_ROLES) {
      datasetFields[role].classList.toggle("needed", preset.needs.includes(role));
    }
  }

  function showMode() {
    const usePreset = presetRadio.checked;
    presetBox.hidden = !usePreset;
    recipeField.hidden = usePreset;
    if (!usePreset && !recipeEdited) {
      const preset = presets.find((p) => p.name === presetSelect.value);
      if (preset) recipeText.value = JSON.stringify(preset.recipe, null, 2);
    }
    if (usePreset) showPreset();
    else for (const role of DATASET_ROLES) datasetFields[role].classList.remove("needed");
  }

  presetSelect.addEventListener("change", showPreset);
  presetRadio.addEventListener("change", showMode);
  recipeRadio.addEventListener("change", showMode);

  function clearErrors() {
    for (const wrapper of [...Object.values(fields), ...Object.values(datasetFields)]) showFieldError(wrapper, null);
    formError.hidden = true;
    formError.textContent = "";
  }

  function parseJson(wrapper, text, what) {
    try {
      const value = JSON.parse(text);
      if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw new Error(`${what} is not an object`);
      }
      return value;
    } catch (error) {
      showFieldError(wrapper, `Not a JSON object: ${error.message}`);
      wrapper.control.focus();
      return null;
    }
  }

  /** The request body from the form, or null when a JSON box does not parse (its error is shown). */
  function body() {
    let extra = {};
    if (extraText.value.trim()) {
      extra = parseJson(fields.extra, extraText.value, "the other fields");
      if (extra === null) return null;
    }
    const request = {...extra, model_id: modelSelect.value};
    if (nameInput.value.trim()) request.name = nameInput.value.trim();
    if (presetRadio.checked) request.preset = presetSelect.value;
    else {
      const recipe = parseJson(fields.recipe, recipeText.value, "the recipe");
      if (recipe === null) return null;
      request.recipe = recipe;
    }
    const chosen = Object.fromEntries(DATASET_ROLES.map((role) => [role, datasetFields[role].control.value])
      .filter(([, id]) => id));
    if (Object.keys(chosen).length) request.datasets = chosen;
    request.target = {device: deviceSelect.value, runtime: runtimeSelect.value};
    return request;
  }

  function wrapperFor(path) {
    const [head, second] = path.split(".");
    if (head === "datasets") return datasetFields[second] || null;
    if (head === "target") return second === "runtime" ? fields.runtime : fields.device;
    if (["model_id", "name", "preset", "recipe"].includes(head)) return fields[head];
    return fields.extra;
  }

  function showError(error) {
    if (!(error instanceof ApiError)) {
      formError.textContent = String(error);
      formError.hidden = false;
      return;
    }
    const leftOver = [];
    let first = null;
    for (const [path, message] of error.status === 422 ? fieldMessages(error.message) : [[null, error.message]]) {
      const wrapper = path ? wrapperFor(path) : null;
      if (wrapper && !wrapper.hidden && !wrapper.closest("[hidden]")) {
        const before = wrapper.error.hidden ? "" : `${wrapper.error.textContent}; `;
        showFieldError(wrapper, `${before}${path}: ${message}`);
        first = first || wrapper;
      } else {
        leftOver.push(path ? `${path}: ${message}` : message);
      }
    }
    if (leftOver.length) {
      formError.textContent = leftOver.join("; ");
      formError.hidden = false;
    }
    if (first) first.control.focus();
  }

  /** The plan's main facts as a list (each present only when the plan has it), its warnings, then all of it. */
  function showPlan(plan) {
    const warnings = Array.isArray(plan.warnings) ? plan.warnings : [];
    const steps = Array.isArray(plan.recipe?.steps) ? plan.recipe.steps.map((st) => String(st?.op ?? "?")) : [];
    const facts = [
      ["Model", plan.model && `${plan.model.name} (${plan.model.format}, ${plan.model.status})`],
      ["Preset", plan.preset],
      ["Recipe", steps.length ? steps.join(" → ") : null],
      ["Tuning", plan.tune && `${plan.tune.metric}, max loss ${plan.tune.max_loss}, by ${plan.tune.objective}, ` +
        `up to ${plan.tune.max_trials} trials`],
      ["Target", plan.target && `${plan.target.runtime} on ${plan.target.device}`],
      ["Fidelity floor", typeof plan.min_fidelity === "number" ? `${plan.min_fidelity} (${plan.min_fidelity_source})`
        : null],
      ["Measured on", plan.evaluation],
      ["Datasets", Array.isArray(plan.datasets) && plan.datasets.length
        ? plan.datasets.map((d) => `${d.role}: ${d.name}`).join("; ") : null],
      ["Queue", plan.queue && `${plan.queue.name} (workers: ${plan.queue.workers})`],
    ].filter(([, value]) => value !== null && value !== undefined && value !== "");
    clear(planBox).append(h("h2", {id: "plan-title"}, "Plan (nothing was created)"),
      h("dl", {class: "summary"}, facts.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, String(value))])),
      warnings.length ? h("ul", {class: "warnings", "aria-label": "Warnings"}, warnings.map((w) => h("li", {},
        typeof w === "string" ? w : JSON.stringify(w)))) : h("p", {}, "No warnings."),
      h("details", {}, h("summary", {}, "The whole plan (JSON)"),
        h("pre", {class: "code", tabIndex: 0, "aria-label": "The plan as JSON"}, JSON.stringify(plan, null, 2))));
    planBox.hidden = false;
    planBox.scrollIntoView({block: "nearest"});
  }

  async function send(dryRun) {
    clearErrors();
    const request = body();
    if (request === null) return;
    if (dryRun) request.dry_run = true;
    dryRunButton.disabled = submitButton.disabled = true;
    try {
      const answer = await api("POST", "/v1/jobs", request, {signal});
      if (dryRun) showPlan(answer);
      else location.hash = `#/jobs/${encodeURIComponent(answer.id)}`;
    } catch (error) {
      if (error.name === "AbortError") return;
      planBox.hidden = true;
      showError(error);
    } finally {
      dryRunButton.disabled = submitButton.disabled = false;
    }
  }

  dryRunButton.addEventListener("click", () => send(true));
  const form = h("form", {class: "card", noValidate: true},
    fields.model_id, fields.name, mode, presetBox, recipeField,
    h("fieldset", {}, h("legend", {}, "Datasets"), DATASET_ROLES.map((role) => datasetFields[role])),
    h("fieldset", {}, h("legend", {}, "Target"), fields.device, fields.runtime),
    fields.extra, formError,
    h("div", {class: "actions"}, dryRunButton, submitButton));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send(false);
  });
  main.append(form, planBox);
  showMode();
}
