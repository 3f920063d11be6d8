// One job: facts and cost, live loss / evaluation / throughput plots and the events log (both fed by the
// job's event stream), checkpoints, the evaluation report, lineage (when the registry answers), cancel.

import {api, optional, path} from "../api.js";
import {StepChart} from "../charts.js";
import {errorBox, facts, h, link, money, number, replace, statusBadge, table, when} from "../dom.js";
import {followEvents} from "../stream.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CANCELLABLE = new Set(["validating_files", "queued", "running", "paused"]);
const LOG_ROWS = 300;

/** The job's cost object (tuneforge.job_cost: estimate and use so far) when this server reports one. */
export function costOf(job) {
  return (job.tuneforge && job.tuneforge.cost) || null;
}

/** Device-hours used: the cost accounting's (heartbeat by heartbeat) when present, else the job row's. */
export function gpuHours(job) {
  const cost = costOf(job);
  return cost && typeof cost.gpu_hours === "number" ? cost.gpu_hours : (job.tuneforge.gpu_seconds || 0) / 3600;
}

/** What the list shows: the actual cost once there is one, else the estimate. */
export function costShown(job) {
  const cost = costOf(job);
  if (!cost) return "";
  return cost.cost_usd ? money(cost.cost_usd) : (money(cost.estimated_cost_usd) && `~${money(cost.estimated_cost_usd)}`);
}

function costFacts(job) {
  const cost = costOf(job);
  if (!cost) return [];
  const percent = (x) => (typeof x === "number" ? `${(x * 100).toFixed(1)}%` : "");
  return [
    ["Estimated cost", money(cost.estimated_cost_usd) &&
      `${money(cost.estimated_cost_usd)} (${number(cost.estimated_gpu_hours, 3)} GPU-hours on ${cost.device || "?"}` +
      `${cost.market ? ", " + cost.market.replace("_", "-") : ""})`],
    ["Cost", `${money(cost.cost_usd)}${cost.final ? "" : " so far"}`],
    ["Platform overhead", percent(cost.overhead_fraction)],
    ["Estimate error", percent(cost.estimate_error)],
  ];
}

function jobFacts(job, progress) {
  const ext = job.tuneforge || {};
  return facts([
    ["Status", statusBadge(job.status)],
    ["Base model", job.model],
    ["Method", job.method && job.method.type],
    ["Fine-tuned model", job.fine_tuned_model],
    ["Training file", job.training_file && link(job.training_file, "files", job.training_file)],
    ["Validation file", job.validation_file && link(job.validation_file, "files", job.validation_file)],
    ["Progress", progress.total ? `${progress.step} / ${progress.total} steps` : ""],
    ["Created", when(job.created_at)],
    ["Started", when(ext.started_at)],
    ["Finished", when(job.finished_at)],
    ["Estimated finish", when(job.estimated_finish)],
    ["Trained tokens", number(job.trained_tokens)],
    ["GPU-hours", number(gpuHours(job), 3)],
    ...costFacts(job),
    ["Attempt", ext.attempt],
    ["Restarts", ext.restarts || ""],
    ["Error", job.error && `${job.error.code}: ${job.error.message}`],
  ]);
}

class EventsLog {
  constructor() {
    this.body = h("tbody", {});
    this.element = h("div", {class: "log"}, h("table", {id: "events-log"},
      h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "Level"), h("th", {}, "Message"))), this.body));
  }

  add(event) { // newest first, bounded
    const row = h("tr", {}, h("td", {class: "mono"}, when(event.created_at)),
      h("td", {class: `level-${event.level}`}, event.level), h("td", {}, event.message));
    this.body.prepend(row);
    while (this.body.childElementCount > LOG_ROWS) this.body.lastElementChild.remove();
  }
}

/** The evaluation report: each evaluated model (base, fine-tuned) with its metrics, from `eval` events. */
class EvalReport {
  constructor() {
    this.models = new Map();
    this.element = h("div", {id: "eval-report"}, h("p", {class: "muted"}, "No evaluation yet."));
  }

  add(event) {
    const data = event.data || {};
    if (this.element.dataset.full || data.kind !== "eval" || !data.metrics || typeof data.metrics !== "object") return;
    this.models.set(String(data.model || "model"), data.metrics);
    const names = [...new Set([...this.models.values()].flatMap((m) => Object.keys(m)
      .filter((k) => typeof m[k] === "number")))];
    const rows = [...this.models].map(([model, metrics]) => h("tr", {}, h("td", {}, model),
      names.map((name) => h("td", {class: "num"}, number(metrics[name])))));
    replace(this.element, table(["Model", ...names.map((n) => "#" + n)], rows));
  }
}

function metricsChart(values) {
  const names = Object.keys(values).filter((k) => k.startsWith("valid_") && k !== "valid_loss" &&
                                                   typeof values[k] === "number");
  return names.length ? new StepChart("Evaluation", names) : null;
}

async function checkpointsTable(jobId, signal) {
  const checkpoints = (await api(path("fine_tuning/jobs", jobId, "checkpoints") + "?limit=100", {signal})).data;
  return table(["#Step", "Checkpoint", "Created", "#train loss", "#valid loss"], checkpoints.map((c) => h("tr", {},
    h("td", {class: "num"}, c.step_number), h("td", {class: "mono"}, c.fine_tuned_model_checkpoint),
    h("td", {}, when(c.created_at)), h("td", {class: "num"}, number(c.metrics.train_loss)),
    h("td", {class: "num"}, number(c.metrics.valid_loss)))), {empty: "No checkpoints yet."});
}

/** The registry version the job's model is, with its lineage chain; null without a registry or a version. */
async function lineage(job, signal) {
  if (!job.fine_tuned_model) return null;
  const names = await optional("/v1/registry/models", {signal});
  for (const name of (names && names.data) || []) {
    const versions = await optional(path("registry/models", name.id, "versions"), {signal});
    const version = versions && versions.data.find((v) => v.model === job.fine_tuned_model);
    if (version) {
      const found = await api(path("registry/models", name.id, "versions", version.version, "lineage"), {signal});
      return lineageTable(version, found.chain);
    }
  }
  return null;
}

function lineageTable(version, chain) {
  const datasets = (step) => (Array.isArray(step.datasets) ? step.datasets.map((d) => (typeof d === "object" && d
    ? `${d.role || "data"}: ${d.filename || ""} (${d.file_id || d.sha256 || "?"})` : String(d))).join(", ") : "");
  const base = (b) => (b && typeof b === "object" && b.ref ? `${b.ref} (${b.kind || "model"})` : "");
  return [h("p", {}, `${version.name} ${version.version} (${version.kind}), aliases: ${version.aliases.join(", ") || "none"}`),
    table(["Version", "Model", "Job", "Trained from", "Datasets", "Created"], chain.map((step) => h("tr", {},
      h("td", {}, step.name ? `${step.name} ${step.version}` : "base"), h("td", {class: "mono"}, step.model || ""),
      h("td", {class: "mono"}, step.job_id || ""), h("td", {class: "mono"}, base(step.base_model)),
      h("td", {class: "mono"}, datasets(step)), h("td", {}, when(step.created_at)))))];
}

/** The job's evaluation report (GET .../evaluation, written when it succeeds): base vs fine-tuned per metric. */
async function evaluationReport(job, signal) {
  if (job.status !== "succeeded") return null;
  const report = await optional(path("fine_tuning/jobs", job.id, "evaluation"), {signal});
  if (!report) return null;
  const estimate = (e) => (e && e.value !== null && e.value !== undefined
    ? `${number(e.value)}${e.low != null ? ` [${number(e.low, 3)}, ${number(e.high, 3)}]` : ""}` : "");
  const change = (row) => (row.base && row.fine_tuned && row.base.value != null && row.fine_tuned.value != null
    ? number(row.fine_tuned.value - row.base.value) : "");
  return [h("p", {class: "muted"}, `${report.dataset}: ${report.examples} examples, ` +
      `${Math.round((report.confidence || 0.95) * 100)}% intervals`),
    table(["Metric", "Kind", "Base", "Fine-tuned", "#Change"], report.rows.map((row) => h("tr", {},
      h("td", {}, `${row.metric} ${row.higher_is_better ? "↑" : "↓"}`), h("td", {}, row.kind),
      h("td", {}, estimate(row.base)), h("td", {}, estimate(row.fine_tuned)), h("td", {class: "num"}, change(row))))),
    (report.samples || []).length ? [h("h2", {}, "Samples"), table(["Prompt", "Reference", "Base", "Fine-tuned"],
      report.samples.slice(0, 5).map((s) => h("tr", {}, h("td", {}, s.prompt), h("td", {}, s.reference),
        h("td", {}, s.base || ""), h("td", {}, s.fine_tuned || ""))))] : []];
}

export async function jobPage(view, {signal, ids: [jobId]}) {
  let job = await api(path("fine_tuning/jobs", jobId), {signal});
  const progress = {step: 0, total: 0};
  const title = h("h1", {class: "grow"}, `Job ${job.id}`);
  const cancel = h("button", {type: "button", id: "cancel-job", class: "danger"}, "Cancel job");
  const notices = h("div", {});
  const factsPanel = h("div", {class: "panel", id: "job-facts"});
  const loss = new StepChart("Loss", ["train_loss", "valid_loss"]);
  const throughput = new StepChart("Throughput", ["tokens_per_second"], {yLabel: "tokens/s"});
  let evaluation = null;
  const charts = h("div", {class: "charts"}, loss.element, throughput.element);
  const log = new EventsLog();
  const report = new EvalReport();
  const checkpoints = h("div", {id: "checkpoints"});
  const lineagePanel = h("div", {id: "lineage"});

  const render = () => {
    replace(factsPanel, jobFacts(job, progress));
    cancel.hidden = !CANCELLABLE.has(job.status);
  };
  const refresh = async () => {
    job = await api(path("fine_tuning/jobs", jobId), {signal});
    render();
    replace(checkpoints, await checkpointsTable(jobId, signal));
    const full = await evaluationReport(job, signal).catch(() => null);
    if (full) { report.element.dataset.full = "1"; replace(report.element, full); }
    const tree = await lineage(job, signal).catch(() => null);
    replace(lineagePanel, tree ? [h("h2", {}, "Lineage"), tree] : []);
  };
  cancel.addEventListener("click", async () => {
    if (!window.confirm(`Cancel job ${job.id}?`)) return;
    cancel.disabled = true;
    try {
      job = await api(path("fine_tuning/jobs", jobId, "cancel"), {method: "POST", body: {}});
      render();
    } catch (error) {
      replace(notices, errorBox(error));
    } finally {
      cancel.disabled = false;
    }
  });

  replace(view, h("div", {class: "row"}, title, cancel), notices, factsPanel, charts,
    h("h2", {}, "Events"), log.element, h("h2", {}, "Checkpoints"), checkpoints,
    h("h2", {}, "Evaluation report"), report.element, lineagePanel);
  await refresh();

  const onEvent = (event) => {
    log.add(event);
    report.add(event);
    const data = event.data || {};
    if (event.type === "metrics" && Number.isInteger(data.step)) {
      if (Number.isInteger(data.total_steps)) Object.assign(progress, {step: data.step, total: data.total_steps});
      loss.add(data.step, data);
      throughput.add(data.step, data);
      if (!evaluation && (evaluation = metricsChart(data))) charts.append(evaluation.element);
      if (evaluation) evaluation.add(data.step, data);
      render();
    }
    if (data.kind === "status" || data.kind === "checkpoint") refresh().catch(() => {});
  };
  followEvents(jobId, {
    signal, onEvent,
    onDone: () => refresh().catch(() => {}),
    onError: (message) => replace(notices, h("div", {class: "notice"}, message)),
  });
  if (TERMINAL.has(job.status)) cancel.hidden = true;
}
