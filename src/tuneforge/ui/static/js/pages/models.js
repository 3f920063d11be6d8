// Models: the built-in base models and the tenant's fine-tuned ones, and the model registry's names with
// their versions, aliases and tags when the server has a registry (feature-detected: a 404 hides it).

import {api, optional, path} from "../api.js";
import {h, replace, table, when} from "../dom.js";

/** Each registered name with its versions, or null when the server has no registry. */
async function registry(signal) {
  const names = await optional("/v1/registry/models", {signal});
  if (!names) return null;
  return Promise.all(names.data.map(async (name) => ({
    name, versions: (await api(path("registry/models", name.id, "versions"), {signal})).data})));
}

function versionsTable({name, versions}) {
  const aliases = Object.entries(name.aliases || {}).map(([alias, v]) => `${alias} → ${v}`).join(", ");
  return [h("h2", {}, `${name.id} (latest ${name.latest_version}${aliases ? `; ${aliases}` : ""})`),
    table(["Version", "Model", "Kind", "Job", "Aliases", "Tags", "Created"], versions.slice().reverse().map((v) =>
      h("tr", {dataset: {version: v.id}}, h("td", {}, v.version), h("td", {class: "mono"}, v.model), h("td", {}, v.kind),
        h("td", {class: "mono"}, (v.lineage && v.lineage.job_id) || ""), h("td", {}, v.aliases.join(", ")),
        h("td", {}, Object.entries(v.tags || {}).map(([k, x]) => `${k}=${x}`).join(", ")),
        h("td", {}, when(v.created_at)))))];
}

export async function modelsPage(view, {signal}) {
  const [models, registered] = await Promise.all([api("/v1/models", {signal}), registry(signal)]);
  const rows = models.data.map((m) => h("tr", {dataset: {model: m.id}}, h("td", {class: "mono"}, m.id),
    h("td", {}, m.owned_by), h("td", {}, when(m.created))));
  const parts = [h("h1", {}, "Models"), table(["Model", "Owner", "Created"], rows, {empty: "No models."})];
  if (registered) {
    parts.push(h("h1", {}, "Registry"), registered.length ? registered.map(versionsTable)
      : h("p", {class: "muted"}, "No registered versions yet: a succeeded job registers its model here."));
  }
  replace(view, ...parts);
}
