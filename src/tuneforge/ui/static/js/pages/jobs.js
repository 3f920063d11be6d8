// The jobs list: status, progress (from each active job's last metrics event), GPU-hours and cost.

import {api, path} from "../api.js";
import {h, link, number, replace, statusBadge, table, when} from "../dom.js";
import {costShown, gpuHours} from "./job.js";

const ACTIVE = new Set(["running", "paused"]);
const REFRESH_MS = 3000;

/** {step, total} of a job from its newest metrics event (events are listed newest first). */
export async function progressOf(job, signal) {
  if (job.status === "succeeded") return {step: 1, total: 1};
  if (!ACTIVE.has(job.status)) return null;
  const events = await api(path("fine_tuning/jobs", job.id, "events") + "?limit=50", {signal});
  const latest = events.data.find((e) => e.type === "metrics" && e.data && Number.isInteger(e.data.total_steps));
  return latest ? {step: latest.data.step, total: latest.data.total_steps} : null;
}

export function progressBar(progress) {
  if (!progress || !progress.total) return "";
  const share = Math.min(1, progress.step / progress.total);
  const bar = h("span", {class: "progress", title: `${progress.step} / ${progress.total} steps`}, h("span", {}));
  bar.firstChild.style.width = `${(share * 100).toFixed(1)}%`; // CSSOM, allowed by style-src 'self'
  return h("span", {}, bar, ` ${Math.round(share * 100)}%`);
}

async function rows(signal) {
  const jobs = (await api("/v1/fine_tuning/jobs?limit=100", {signal})).data;
  const progress = await Promise.all(jobs.map((job) => progressOf(job, signal).catch(() => null)));
  return jobs.map((job, i) => h("tr", {dataset: {job: job.id}},
    h("td", {}, link(job.id, "jobs", job.id)),
    h("td", {}, job.model),
    h("td", {}, job.method && job.method.type),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, progressBar(progress[i])),
    h("td", {}, when(job.created_at)),
    h("td", {class: "num"}, number(gpuHours(job), 3)),
    h("td", {class: "num"}, costShown(job)),
  ));
}

export async function jobsPage(view, {signal}) {
  const holder = h("div", {id: "jobs-table"});
  replace(view, h("div", {class: "row"}, h("h1", {class: "grow"}, "Fine-tuning jobs"), link("New job", "new")), holder);
  const headers = ["Job", "Base model", "Method", "Status", "Progress", "Created", "#GPU-hours", "#Cost"];
  // Refresh while the page is open: statuses and progress move without a reload.
  while (!signal.aborted) {
    replace(holder, table(headers, await rows(signal), {empty: "No jobs yet: create one from New job."}));
    await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
  }
}
