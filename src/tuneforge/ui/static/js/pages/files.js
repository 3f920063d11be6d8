// Datasets: upload, the list of files, and one file's validation report (format, statistics, problems).

import {api, path, upload} from "../api.js";
import {bytes, errorBox, facts, h, json, link, number, replace, statusBadge, table, when} from "../dom.js";

const POLL_MS = 1000;

function statsView(stats) {
  const entries = Object.entries(stats || {});
  if (!entries.length) return h("p", {class: "muted"}, "No statistics.");
  const flat = entries.filter(([, v]) => typeof v !== "object" || v === null);
  const nested = entries.filter(([, v]) => typeof v === "object" && v !== null);
  return [
    table(["Statistic", "#Value"], flat.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {class: "num"}, number(v))))),
    nested.map(([k, v]) => [h("h2", {}, k), isFlatObject(v) ? table(["", "#Value"], Object.entries(v).map(([name, x]) =>
      h("tr", {}, h("td", {}, name), h("td", {class: "num"}, number(x))))) : json(v)]),
  ];
}

function isFlatObject(value) {
  return !Array.isArray(value) && Object.values(value).every((v) => typeof v !== "object" || v === null);
}

export function reportView(report) {
  const problems = report.problems || [];
  return h("div", {id: "validation-report"},
    h("div", {class: "panel"}, facts([
      ["Status", statusBadge(report.status || "")],
      ["Valid", report.valid ? "yes" : "no"],
      ["Format", report.format],
      ["Examples", number(report.examples)],
      ["Summary", report.summary],
    ])),
    h("h2", {}, "Statistics"), statsView(report.stats),
    h("h2", {}, `Problems (${report.problems_total || problems.length})`),
    table(["#Line", "Kind", "Field", "Expected", "Found"], problems.map((p) => h("tr", {},
      h("td", {class: "num"}, p.line), h("td", {}, p.kind), h("td", {class: "mono"}, p.field), h("td", {}, p.expected),
      h("td", {class: "mono"}, p.found))), {empty: "No problems."}));
}

function uploadForm(onUploaded) {
  const file = h("input", {type: "file", id: "upload-file", name: "file", accept: ".jsonl,.json,.txt", required: true});
  const purpose = h("select", {id: "upload-purpose", name: "purpose"},
    h("option", {value: "fine-tune"}, "fine-tune"), h("option", {value: "evals"}, "evals"));
  const message = h("div", {});
  const form = h("form", {class: "panel", id: "upload-form"}, h("h2", {}, "Upload a dataset"),
    h("div", {class: "row"}, file, purpose, h("button", {type: "submit", id: "upload"}, "Upload")), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file.files.length) return;
    replace(message, h("div", {class: "notice"}, `Uploading ${file.files[0].name}...`));
    try {
      const created = await upload(file.files[0], purpose.value);
      replace(message, h("div", {class: "notice"}, `Uploaded ${created.filename} as ${created.id}; validating.`));
      form.reset();
      onUploaded(created);
    } catch (error) {
      replace(message, errorBox(error));
    }
  });
  return form;
}

export async function filesPage(view, {signal}) {
  const holder = h("div", {id: "files-table"});
  const refresh = async () => {
    const files = (await api("/v1/files?limit=1000", {signal})).data;
    replace(holder, table(["File", "Name", "Purpose", "Status", "#Size", "Created", "Details"], files.map((f) =>
      h("tr", {dataset: {file: f.id, status: f.status}}, h("td", {}, link(f.id, "files", f.id)), h("td", {}, f.filename),
        h("td", {}, f.purpose), h("td", {}, statusBadge(f.status)), h("td", {class: "num"}, bytes(f.bytes)),
        h("td", {}, when(f.created_at)), h("td", {}, f.status_details || "")))));
    return files;
  };
  replace(view, h("h1", {}, "Datasets"), uploadForm(() => refresh().catch(() => {})), holder);
  // Files wait for the scheduler's validation: keep the list fresh while any is still "uploaded".
  while (!signal.aborted) {
    const files = await refresh();
    if (!files.some((f) => f.status === "uploaded")) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS * 5));
    } else {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }
}

export async function filePage(view, {signal, ids: [fileId]}) {
  const file = await api(path("files", fileId), {signal});
  const holder = h("div", {});
  replace(view, h("h1", {}, `Dataset ${file.filename}`), h("p", {class: "muted"}, `${file.id} · ${bytes(file.bytes)}`),
    holder);
  for (;;) {
    const report = await api(path("files", fileId, "validation"), {signal});
    replace(holder, reportView(report));
    if (report.status !== "uploaded" || signal.aborted) return;
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

