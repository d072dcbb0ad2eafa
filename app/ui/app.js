// The dashboard's shell: sign in and out, the pages by URL fragment (#/models, #/jobs/<id>, ...), and the
// clean-up of a page's streams and timers when another one opens.

import {ApiError, checkKey, forgetKey, getKey, setKey, whenUnauthorized} from "./api.js";
import {clear, field, h, showFieldError} from "./dom.js";
import {renderJob} from "./job.js";
import {renderJobs} from "./jobs.js";
import {renderKeys} from "./keys.js";
import {renderModels} from "./models.js";
import {renderNewJob} from "./submit.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");

const PAGES = [
  [/^#\/models$/, "Models and datasets", renderModels],
  [/^#\/new$/, "New job", renderNewJob],
  [/^#\/jobs$/, "Jobs", renderJobs],
  [/^#\/jobs\/([A-Za-z0-9_-]{1,100})$/, "Job", renderJob],
  [/^#\/keys$/, "Keys and webhooks", renderKeys],
];

// The open page's AbortController: aborting it closes the page's event streams, polls and pending calls.
let pageLife = null;

function renderSignIn(notice) {
  nav.hidden = true;
  signOutButton.hidden = true;
  document.title = "Sign in - modelpress";
  const input = h("input", {type: "password", name: "api-key", autocomplete: "off", required: true,
    spellcheck: false});
  const keyField = field("API key", input, "Kept in this tab only (sessionStorage); sent as a Bearer token.");
  const button = h("button", {type: "submit"}, "Sign in");
  const form = h("form", {class: "card narrow", "aria-labelledby": "sign-in-title", noValidate: true},
    h("h1", {id: "sign-in-title", tabIndex: -1}, "Sign in"),
    notice ? h("p", {class: "notice", role: "status"}, notice) : null,
    keyField, button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      showFieldError(keyField, "Enter an API key (modelpress keys create --tenant NAME prints one).");
      return;
    }
    button.disabled = true;
    const refused = await checkKey(key);
    button.disabled = false;
    if (refused) {
      showFieldError(keyField, refused.message);
      input.focus();
      return;
    }
    setKey(key);
    if (!location.hash.startsWith("#/")) history.replaceState(null, "", "#/jobs");
    route();
  });
  clear(main).append(form);
  input.focus();
}

function signOut(notice) {
  forgetKey();
  if (pageLife) pageLife.abort();
  pageLife = null;
  renderSignIn(notice);
}

whenUnauthorized((error) => {
  if (getKey()) signOut(`Signed out: ${error.message}`);
});

signOutButton.addEventListener("click", () => signOut("Signed out."));

document.getElementById("skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

function markCurrentLink(hash) {
  for (const link of nav.querySelectorAll("a")) {
    const here = hash === link.getAttribute("href") || hash.startsWith(link.getAttribute("href") + "/");
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function route() {
  if (!getKey()) {
    renderSignIn();
    return;
  }
  nav.hidden = false;
  signOutButton.hidden = false;
  if (pageLife) pageLife.abort();
  pageLife = new AbortController();
  const hash = location.hash || "#/jobs";
  const found = PAGES.map(([pattern, title, render]) => [pattern.exec(hash), title, render])
    .find(([match]) => match);
  markCurrentLink(hash);
  clear(main);
  if (!found) {
    document.title = "Not found - modelpress";
    main.append(h("h1", {tabIndex: -1}, "Not found"), h("p", {}, "No such page. ",
      h("a", {href: "#/jobs"}, "See the jobs.")));
    main.querySelector("h1").focus();
    return;
  }
  const [match, title, render] = found;
  document.title = `${title} - modelpress`;
  const signal = pageLife.signal;
  Promise.resolve(render(main, {signal, params: match.slice(1)})).catch((error) => {
    if (signal.aborted || error.name === "AbortError") return;
    main.append(h("p", {class: "error", role: "alert"}, error instanceof ApiError ? error.message : String(error)));
  });
  const heading = main.querySelector("h1");
  if (heading) heading.focus({preventScroll: true});
}

window.addEventListener("hashchange", () => {
  if (location.hash.startsWith("#/") || location.hash === "") route();
});
route();
