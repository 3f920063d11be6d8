// Create a job: pick an uploaded dataset, a base model, a method and a few hyperparameters; the memory
// plan and cost estimate (POST /v1/fine_tuning/jobs/plan) are shown before Submit is enabled.

import {api} from "../api.js";
import {bytes, errorBox, facts, h, money, number, replace, table} from "../dom.js";

// Methods that need nothing beyond a dataset (reinforcement needs a grader, ppo a reward model).
const METHODS = [["supervised", "Supervised (SFT)"], ["dpo", "DPO (preference data)"], ["reward", "Reward model"]];

function field(label, control) {
  return [h("label", {for: control.id}, label), control];
}

function optionalNumber(input, parse) {
  const text = input.value.trim();
  if (!text || text === "auto") return text ? "auto" : undefined;
  const value = parse(text);
  if (!Number.isFinite(value)) throw new Error(`${input.name}: expected a number or "auto", got "${text}"`);
  return value;
}

/** The JobCreateRequest the form describes; throws an Error naming the field for unreadable input. */
function requestOf(form) {
  const value = (name) => form.elements[name].value.trim();
  const method = value("method");
  const hyperparameters = Object.fromEntries(Object.entries({
    n_epochs: optionalNumber(form.elements.n_epochs, (t) => Number.parseInt(t, 10)),
    batch_size: optionalNumber(form.elements.batch_size, (t) => Number.parseInt(t, 10)),
    learning_rate_multiplier: optionalNumber(form.elements.learning_rate_multiplier, Number.parseFloat),
  }).filter(([, v]) => v !== undefined));
  let tuneforge = {};
  if (value("tuneforge")) {
    try { tuneforge = JSON.parse(value("tuneforge")); } catch (error) {
      throw new Error(`tuneforge settings: not valid JSON (${error.message})`);
    }
    if (typeof tuneforge !== "object" || Array.isArray(tuneforge) || tuneforge === null) {
      throw new Error("tuneforge settings: expected a JSON object such as {\"training\": {\"max_steps\": 100}}");
    }
  }
  const maxSteps = optionalNumber(form.elements.max_steps, (t) => Number.parseInt(t, 10));
  if (typeof maxSteps === "number") tuneforge = {...tuneforge, training: {...(tuneforge.training || {}), max_steps: maxSteps}};
  const request = {
    model: value("model"), training_file: value("training_file"),
    method: {type: method, [method]: {hyperparameters}},
  };
  if (value("validation_file")) request.validation_file = value("validation_file");
  if (value("suffix")) request.suffix = value("suffix");
  if (Object.keys(tuneforge).length) request.tuneforge = tuneforge;
  return request;
}

function memoryRows(memory) {
  const parts = memory.memory_bytes || {};
  const names = ["weights", "gradients", "optimizer", "activations", "logits", "buffers", "optimizer_step", "overhead"];
  return names.filter((n) => typeof parts[n] === "number")
    .map((n) => h("tr", {}, h("td", {}, n.replace("_", " ")), h("td", {class: "num"}, bytes(parts[n]))));
}

/** The plan as the user should read it: fits or not and why, memory per device, throughput, cost. */
export function planView(plan) {
  const memory = plan.memory || {};
  const parts = memory.memory_bytes || {};
  const speed = memory.throughput || {};
  const cost = plan.cost || null; // planner.cost.CostEstimate, when the server prices jobs
  return h("div", {class: "panel", id: "plan"},
    h("h2", {}, "Plan"),
    h("p", {class: plan.fits ? "fits-yes" : "fits-no"}, plan.fits ? "Fits: the workers can run this job."
      : `Does not fit: ${plan.reason || "no worker can hold it"}`),
    facts([
      ["GPUs", `${plan.gpus} x ${plan.gpu_type}`],
      ["Model parameters", memory.model && number(memory.model.parameters)],
      ["Memory per device", typeof parts.total === "number" ? `${bytes(parts.total)} of ${bytes(memory.capacity_bytes)}` : ""],
      ["Peak allocated", bytes(parts.peak_allocated)],
      ["Trainable parameters", number(parts.trainable_params)],
      ["Throughput", speed.tokens_per_second ? `${number(speed.tokens_per_second, 3)} tokens/s` : ""],
      ["MFU", typeof speed.mfu === "number" ? `${(speed.mfu * 100).toFixed(1)}%` : ""],
      ["Estimated cost", cost ? `${money(cost.cost_usd) || "unknown"} (${(cost.market || "").replace("_", "-")} at ` +
        `${money(cost.price_per_gpu_hour)} per ${cost.device || "device"}-hour)` : "not available on this server"],
      ["Estimated GPU-hours", cost ? number(cost.gpu_hours, 3) : ""],
      ["Estimated wall time", cost && typeof cost.wall_seconds === "number" ? `${number(cost.wall_seconds / 60, 3)} min` : ""],
      ["Spot / on-demand", cost && cost.spot_usd != null ? `${money(cost.spot_usd)} / ${money(cost.on_demand_usd)}` : ""],
    ]),
    memoryRows(memory).length ? [h("h2", {}, "Memory per device"), table(["Part", "#Bytes"], memoryRows(memory))] : [],
    (memory.recommendations || []).length ? [h("h2", {}, "To make it fit"),
      h("ul", {}, memory.recommendations.map((r) => h("li", {}, r)))] : []);
}

export async function createJobPage(view, {signal}) {
  const [files, models] = await Promise.all([
    api("/v1/files?purpose=fine-tune&limit=1000", {signal}), api("/v1/models", {signal})]);
  const ready = files.data.filter((f) => f.status === "processed");
  const fileOptions = (blank) => [blank && h("option", {value: ""}, blank),
    ready.map((f) => h("option", {value: f.id}, `${f.filename} (${f.id})`))];
  const input = (name, attrs = {}) => h("input", {id: `job-${name}`, name, ...attrs});
  const select = (name, options) => h("select", {id: `job-${name}`, name}, options);
  const form = h("form", {class: "stack panel", id: "create-job"},
    field("Training file", select("training_file", fileOptions(null))),
    field("Validation file", select("validation_file", fileOptions("(none)"))),
    field("Base model", select("model", models.data.map((m) => h("option", {value: m.id}, m.id)))),
    field("Method", select("method", METHODS.map(([v, label]) => h("option", {value: v}, label)))),
    field("Epochs", input("n_epochs", {placeholder: "auto"})),
    field("Batch size", input("batch_size", {placeholder: "auto"})),
    field("Learning-rate multiplier", input("learning_rate_multiplier", {placeholder: "auto"})),
    field("Max steps", input("max_steps", {placeholder: "from the epochs"})),
    field("Suffix", input("suffix", {maxlength: "64"})),
    field("tuneforge settings (JSON)", h("textarea", {id: "job-tuneforge", name: "tuneforge",
      placeholder: "{\"training\": {\"per_device_batch_size\": 2}}"})),
    h("div", {class: "full actions"},
      h("button", {type: "button", id: "plan-job", class: "secondary"}, "Plan"),
      h("button", {type: "submit", id: "submit-job", disabled: true}, "Submit job")));
  const result = h("div", {});
  let planned = null; // the request the shown plan belongs to: Submit sends exactly that
  const submit = form.querySelector("#submit-job");
  form.addEventListener("input", () => { planned = null; submit.disabled = true; });
  form.querySelector("#plan-job").addEventListener("click", async () => {
    let request;
    try { request = requestOf(form); } catch (error) { replace(result, errorBox(error)); return; }
    try {
      const plan = await api("/v1/fine_tuning/jobs/plan", {method: "POST", body: request, signal});
      replace(result, planView(plan));
      planned = plan.fits ? request : null;
      submit.disabled = !planned;
    } catch (error) {
      replace(result, errorBox(error));
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!planned) return;
    submit.disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", {method: "POST", body: planned});
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      replace(result, errorBox(error));
      submit.disabled = false;
    }
  });
  const hint = ready.length ? null : h("div", {class: "notice"}, "No validated dataset yet: upload one under Datasets.");
  replace(view, h("h1", {}, "New fine-tuning job"), hint, form, result);
}
