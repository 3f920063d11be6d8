// The dashboard's shell: log-in state, the hash router (#/jobs, #/jobs/ID, #/new, #/files, #/files/ID,
// #/models, #/usage) and the page lifecycle (a page's stream stops when the user leaves it).

import {session, whenUnauthorized} from "./api.js";
import {errorBox, replace} from "./dom.js";
import {loginPage, whoami} from "./pages/login.js";
import {jobsPage} from "./pages/jobs.js";
import {jobPage} from "./pages/job.js";
import {createJobPage} from "./pages/create.js";
import {filesPage, filePage} from "./pages/files.js";
import {modelsPage} from "./pages/models.js";
import {usagePage} from "./pages/usage.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const logout = document.getElementById("logout");
const who = document.getElementById("whoami");

const ROUTES = [
  [/^jobs$/, () => jobsPage],
  [/^jobs\/([^/]+)$/, () => jobPage],
  [/^new$/, () => createJobPage],
  [/^files$/, () => filesPage],
  [/^files\/([^/]+)$/, () => filePage],
  [/^models$/, () => modelsPage],
  [/^usage$/, () => usagePage],
];

let current = null; // the AbortController of the page on screen

function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const hash = location.hash.replace(/^#\/?/, "");
  const loggedIn = Boolean(session.key());
  nav.hidden = logout.hidden = !loggedIn;
  if (!loggedIn) {
    who.textContent = "";
    loginPage(view, {signal, done: () => { location.hash = "#/jobs"; route(); }});
    return;
  }
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", hash.startsWith(a.dataset.page));
  for (const [pattern, page] of ROUTES) {
    const match = hash.match(pattern);
    if (match) {
      const ids = match.slice(1).map(decodeURIComponent);
      // Each page renders into its own element: a page left while it still awaits writes into a detached one.
      const root = document.createElement("div");
      replace(view, root);
      page()(root, {signal, ids}).catch((error) => {
        if (!signal.aborted) replace(root, errorBox(error));
      });
      return;
    }
  }
  location.replace("#/jobs");
}

logout.addEventListener("click", () => {
  session.clear();
  location.hash = "#/";
  route();
});
whenUnauthorized(() => {
  session.clear();
  route();
});
window.addEventListener("hashchange", route);
if (session.key()) whoami(who).catch(() => {});
route();
