// The dashboard's only way to the service: the public /v1 API with `Authorization: Bearer <key>`. The key lives
// in sessionStorage (gone when the tab closes) and never in a URL.

const KEY_NAME = "modelpress.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
}

/** The prefix of the key in use (`mp_<prefix>_<secret>`), to mark it in the list of keys. */
export function keyPrefix() {
  return (getKey() || "").split("_")[1] || null;
}

/** An answer of the API that is not a success: its status, code and the API's own message. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// The app registers what to do when the key stops working (sign out, say why).
let onUnauthorized = () => {};

export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

function authHeaders(extra) {
  return {Authorization: `Bearer ${getKey()}`, ...extra};
}

async function errorFrom(response) {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code);
      message = String(body.error.message);
    }
  } catch {
    // not JSON: the status line says it
  }
  return new ApiError(response.status, code, message, Number(response.headers.get("Retry-After")) || null);
}

/** A JSON call: the parsed body, or an ApiError. A 401 also signs out. */
export async function api(method, path, body, {signal} = {}) {
  const init = {method, headers: authHeaders(), signal, cache: "no-store"};
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", "the service cannot be reached; check the connection and try again");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

/** Whether `key` signs in: null when it does, else the ApiError (the API's message). Stores nothing. */
export async function checkKey(key) {
  try {
    const response = await fetch("/v1/presets", {headers: {Authorization: `Bearer ${key}`}, cache: "no-store"});
    return response.ok ? null : await errorFrom(response);
  } catch {
    return new ApiError(0, "network", "the service cannot be reached; check the connection and try again");
  }
}

/** Every page of a list endpoint (`data`, `next_cursor`), up to `max` items. */
export async function listAll(path, {signal, max = 1000} = {}) {
  const items = [];
  let cursor = null;
  do {
    const separator = path.includes("?") ? "&" : "?";
    const next = cursor ? `&cursor=${encodeURIComponent(cursor)}` : "";
    const page = await api("GET", `${path}${separator}limit=200${next}`, undefined, {signal});
    items.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

/**
 * A multipart upload with progress: XMLHttpRequest reports the bytes sent, fetch does not.
 * Resolves with the created resource; rejects with an ApiError carrying the API's message.
 */
export function upload(path, file, fields, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file, file.name);
    for (const [name, value] of Object.entries(fields)) if (value) form.append(name, value);
    const request = new XMLHttpRequest();
    request.open("POST", path);
    request.setRequestHeader("Authorization", `Bearer ${getKey()}`);
    request.responseType = "json";
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => {
      const body = request.response;
      if (request.status >= 200 && request.status < 300) {
        resolve(body);
        return;
      }
      const error = new ApiError(request.status, body?.error?.code ?? `http_${request.status}`,
        body?.error?.message ?? `${request.status} ${request.statusText}`);
      if (request.status === 401) onUnauthorized(error);
      reject(error);
    });
    request.addEventListener("error", () => reject(new ApiError(0, "network", "the upload was interrupted")));
    request.send(form);
  });
}

/** The file name from Content-Disposition (RFC 6266 `filename*` first), else `fallback`. */
function dispositionName(header, fallback) {
  const extended = /filename\*=UTF-8''([^;]+)/i.exec(header || "");
  if (extended) {
    try {
      return decodeURIComponent(extended[1]);
    } catch {
      // fall through to the plain name
    }
  }
  const plain = /filename="([^"]+)"/i.exec(header || "");
  return plain ? plain[1] : fallback;
}

/** Downloads a file with the key in the header (a link cannot carry it): fetch, then save the blob. */
export async function download(path, fallbackName) {
  const response = await fetch(path, {headers: authHeaders(), cache: "no-store"});
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  const blob = await response.blob();
  const name = dispositionName(response.headers.get("Content-Disposition"), fallbackName);
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return {name, size: blob.size};
}

/** Splits a Server-Sent Events byte stream into events ({id, event, data}); comments (`: ping`) are skipped. */
async function* readEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), {once: true});
  let buffer = "";
  let current = {data: []};
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
      if (line === "") {
        if (current.data.length) {
          yield {id: current.id ?? null, event: current.event || "message", data: current.data.join("\n")};
        }
        current = {data: []};
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (name === "data") current.data.push(text);
      else if (name === "event") current.event = text;
      else if (name === "id") current.id = text;
    }
  }
}

/**
 * Follows an event stream (EventSource cannot send an Authorization header, so this is fetch with a streamed
 * body). Reconnects after a drop with Last-Event-ID, after Retry-After when the tenant's streams are all in use.
 * `onEvent(event, data, id)` gets each event; `onState("live" | "reconnecting")` the connection's state.
 * Stops when `signal` aborts, or after an `end` event. Returns when it has stopped.
 */
export async function follow(path, {signal, onEvent, onState = () => {}, lastEventId = null}) {
  let delay = 1000;
  while (!signal.aborted) {
    const headers = authHeaders({Accept: "text/event-stream"});
    if (lastEventId !== null) headers["Last-Event-ID"] = String(lastEventId);
    let wait = delay;
    try {
      const response = await fetch(path, {headers, signal, cache: "no-store"});
      if (!response.ok) {
        const error = await errorFrom(response);
        if (response.status === 401) {
          onUnauthorized(error);
          return;
        }
        if (response.status === 404) throw error;
        wait = error.retryAfter ? error.retryAfter * 1000 : delay;
      } else {
        onState("live");
        delay = 1000;
        for await (const message of readEvents(response.body, signal)) {
          if (message.id !== null) lastEventId = message.id;
          let data = null;
          try {
            data = JSON.parse(message.data);
          } catch {
            continue;
          }
          onEvent(message.event, data, lastEventId);
          if (message.event === "end") return;
        }
      }
    } catch (error) {
      if (signal.aborted || error.name === "AbortError") return;
      if (error instanceof ApiError && error.status === 404) throw error;
    }
    if (signal.aborted) return;
    onState("reconnecting");
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, wait);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        resolve();
      }, {once: true});
    });
    delay = Math.min(delay * 2, 15_000);
  }
}
