// Keys and webhooks: the tenant's API keys (create: shown once; revoke), the webhook signing secret and the
// recent webhook deliveries.

import {ApiError, api, keyPrefix, listAll} from "./api.js";
import {badge, clear, field, formatTime, h, showFieldError, table} from "./dom.js";

const KEY_COLUMNS = ["Name", "Prefix", "Status", "Created", "Last used", "Expires", ""];
const DELIVERY_COLUMNS = ["Event", "Job", "URL", "Status", "Attempts", "Last answer", "Created", "Delivered"];

function deliveryRow(delivery) {
  const answer = delivery.last_status_code ? `HTTP ${delivery.last_status_code}` : "";
  return [
    delivery.type,
    h("a", {href: `#/jobs/${encodeURIComponent(delivery.job_id)}`}, delivery.job_id),
    h("span", {class: "name"}, delivery.url),
    badge(delivery.status),
    String(delivery.attempt_count),
    [answer, delivery.last_error].filter(Boolean).join(": ") || "-",
    formatTime(delivery.created_at),
    formatTime(delivery.delivered_at),
  ];
}

export async function renderKeys(main, {signal}) {
  const keysList = h("div", {class: "list"}, h("p", {}, "Loading..."));
  const created = h("div", {class: "created-key", "aria-live": "polite"});
  const nameInput = h("input", {type: "text", maxLength: 200, autocomplete: "off"});
  const nameField = field("Name of the new key (optional)", nameInput);
  const createButton = h("button", {type: "submit"}, "Create key");
  const keysMessage = h("p", {class: "error", role: "alert", hidden: true});
  const secretInput = h("input", {type: "password", readOnly: true, autocomplete: "off", class: "code"});
  const secretField = field("Webhook signing secret", secretInput,
    "Verify each delivery's webhook-signature header with it (Standard Webhooks).");
  const showSecret = h("button", {type: "button", class: "secondary", "aria-pressed": "false"}, "Show");
  const rotateSecret = h("button", {type: "button", class: "secondary"}, "Rotate secret");
  const secretNote = h("p", {class: "hint", role: "status"});
  const deliveriesList = h("div", {class: "list"}, h("p", {}, "Loading..."));

  function fail(error) {
    keysMessage.textContent = error instanceof ApiError ? error.message : String(error);
    keysMessage.hidden = false;
  }

  async function loadKeys() {
    const keys = await listAll("/v1/keys", {signal});
    const mine = keyPrefix();
    const rows = keys.map((key) => {
      const revoke = h("button", {type: "button", class: "danger", disabled: !key.active,
        "aria-label": `Revoke key ${key.prefix}`}, "Revoke");
      revoke.addEventListener("click", async () => {
        revoke.disabled = true;
        try {
          await api("POST", `/v1/keys/${encodeURIComponent(key.id)}/revoke`, undefined, {signal});
          // Revoking the key in use signs out on the next call (401); the list shows the others meanwhile.
          await loadKeys();
        } catch (error) {
          if (error.name !== "AbortError") fail(error);
        }
      });
      return [
        h("span", {class: "name"}, key.name || "-", key.prefix === mine ? h("span", {class: "cell-note"},
          "this session's key") : null),
        h("code", {}, key.prefix),
        badge(key.active ? "active" : "revoked"),
        formatTime(key.created_at),
        formatTime(key.last_used_at),
        formatTime(key.expires_at),
        revoke,
      ];
    });
    clear(keysList).append(table("API keys", KEY_COLUMNS, rows));
  }

  async function loadSecret() {
    const secret = await api("GET", "/v1/webhooks/secret", undefined, {signal});
    secretInput.value = secret.secret;
    secretNote.textContent = secret.previous_expires_at
      ? `The previous secret also signs until ${formatTime(secret.previous_expires_at)}.` : "";
  }

  async function loadDeliveries() {
    const deliveries = await listAll("/v1/webhooks/deliveries", {signal, max: 100});
    clear(deliveriesList).append(deliveries.length
      ? table("Recent webhook deliveries, newest first", DELIVERY_COLUMNS, deliveries.map(deliveryRow))
      : h("p", {class: "empty"}, "No webhook deliveries yet (a job with webhook_url sends one when it ends)."));
  }

  const form = h("form", {class: "inline-form"}, nameField, createButton);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    keysMessage.hidden = true;
    showFieldError(nameField, null);
    createButton.disabled = true;
    try {
      const body = nameInput.value.trim() ? {name: nameInput.value.trim()} : undefined;
      const key = await api("POST", "/v1/keys", body, {signal});
      const keyOutput = h("input", {type: "text", readOnly: true, value: key.key, class: "code",
        id: "new-key-value"});
      clear(created).append(h("div", {class: "notice"},
        h("label", {htmlFor: "new-key-value"}, "New API key: copy it now, it is shown only this once"),
        keyOutput));
      keyOutput.select();
      nameInput.value = "";
      await loadKeys();
    } catch (error) {
      if (error.name === "AbortError") return;
      if (error instanceof ApiError && error.status === 422) showFieldError(nameField, error.message);
      else fail(error);
    } finally {
      createButton.disabled = false;
    }
  });

  showSecret.addEventListener("click", () => {
    const shown = secretInput.type === "text";
    secretInput.type = shown ? "password" : "text";
    showSecret.textContent = shown ? "Show" : "Hide";
    showSecret.setAttribute("aria-pressed", String(!shown));
  });
  rotateSecret.addEventListener("click", async () => {
    rotateSecret.disabled = true;
    try {
      const secret = await api("POST", "/v1/webhooks/secret/rotate", undefined, {signal});
      secretInput.value = secret.secret;
      secretNote.textContent = `Rotated. The previous secret also signs until ${formatTime(
        secret.previous_expires_at)}.`;
    } catch (error) {
      if (error.name !== "AbortError") secretNote.textContent = error.message;
    } finally {
      rotateSecret.disabled = false;
    }
  });

  main.append(
    h("h1", {tabIndex: -1}, "Keys and webhooks"),
    h("section", {"aria-labelledby": "keys-title"}, h("h2", {id: "keys-title"}, "API keys"), form, keysMessage,
      created, keysList),
    h("section", {"aria-labelledby": "webhooks-title"}, h("h2", {id: "webhooks-title"}, "Webhooks"),
      h("div", {class: "secret-row"}, secretField, showSecret, rotateSecret), secretNote,
      h("h3", {}, "Deliveries"), deliveriesList));
  await Promise.all([loadKeys(), loadSecret(), loadDeliveries()]);
}
