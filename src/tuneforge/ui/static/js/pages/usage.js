// Usage and cost: the caller's tenant's GPU-hours by job status and quotas (/v1/tuneforge/usage), its cost
// by UTC day and month with its monthly budget (/v1/tuneforge/usage/costs), and for an admin key every
// tenant's (/v1/tuneforge/admin/costs). Cost endpoints are feature-detected: a 404 hides their sections.

import {ApiError, api, optional, session} from "../api.js";
import {bytes, errorBox, facts, h, money, number, replace, table} from "../dom.js";

function periodTable(rows, {tenants = false} = {}) {
  const headers = [...(tenants ? ["Tenant"] : []), "Period", "#Jobs", "#GPU-hours", "#Cost"];
  return table(headers, rows.map((r) => h("tr", {}, tenants ? h("td", {}, r.tenant) : null, h("td", {}, r.period),
    h("td", {class: "num"}, number(r.jobs)), h("td", {class: "num"}, number(r.gpu_hours, 4)),
    h("td", {class: "num"}, money(r.cost_usd)))), {empty: "No usage in this period."});
}

/** Download the CSV export: fetched with the key in its header, handed to the browser as a blob. */
async function downloadCsv(period, message) {
  const response = await fetch(`/v1/tuneforge/usage/costs?period=${period}&format=csv`,
                               {headers: {Authorization: `Bearer ${session.key()}`}, credentials: "omit"});
  if (!response.ok) { replace(message, errorBox(`CSV export failed: HTTP ${response.status}`)); return; }
  const url = URL.createObjectURL(await response.blob());
  const anchor = h("a", {href: url, download: `tuneforge-usage-${period}.csv`});
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function budgetFacts(budget) {
  if (!budget) return [];
  const of = (used, max, format) => (max == null ? `${format(used)} (no budget)` : `${format(used)} of ${format(max)}`);
  return [[`Cost in ${budget.month}`, of(budget.cost_usd, budget.monthly_cost_usd, money)],
          [`GPU-hours in ${budget.month}`, of(budget.gpu_hours, budget.monthly_gpu_hours, (x) => number(x, 4))]];
}

async function adminCosts(period, signal) {
  try {
    return await optional(`/v1/tuneforge/admin/costs?period=${period}`, {signal});
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) return null; // not an admin key
    throw error;
  }
}

export async function usagePage(view, {signal}) {
  const [usage, daily, monthly, everyone] = await Promise.all([
    api("/v1/tuneforge/usage", {signal}),
    optional("/v1/tuneforge/usage/costs?period=day", {signal}),
    optional("/v1/tuneforge/usage/costs?period=month", {signal}),
    adminCosts("month", signal)]);
  const limit = (used, max, format = (x) => x) => (max == null ? `${format(used)}` : `${format(used)} of ${format(max)}`);
  const message = h("div", {});
  const parts = [
    h("h1", {}, `Usage of tenant ${usage.tenant}`),
    h("div", {class: "panel", id: "usage-facts"}, facts([
      // The cost accounting's device-hours (priced heartbeat by heartbeat) when the server has it.
      ["GPU-hours", number(monthly ? monthly.gpu_hours : usage.gpu_hours, 4)],
      ["Cost", monthly ? money(monthly.cost_usd) : "not priced on this server"],
      ...budgetFacts(monthly && monthly.budget),
      ["Active jobs", limit(usage.active_jobs, usage.max_active_jobs)],
      ["Stored", limit(usage.stored_bytes, usage.max_storage_bytes, bytes)],
    ])),
    h("h2", {}, "By job status"),
    table(["Status", "#Jobs", "#GPU-hours"], Object.entries(usage.by_status || {}).map(([status, v]) =>
      h("tr", {}, h("td", {}, status), h("td", {class: "num"}, number(v.jobs)),
        h("td", {class: "num"}, number(v.gpu_hours, 4)))), {empty: "No jobs yet."}),
  ];
  if (daily) {
    parts.push(h("h2", {}, "Cost by day"), h("div", {id: "usage-by-day"}, periodTable(daily.data)));
  }
  if (monthly) {
    parts.push(h("h2", {}, "Cost by month"), h("div", {id: "usage-by-month"}, periodTable(monthly.data)),
      h("div", {class: "actions"},
        h("button", {type: "button", class: "secondary", on: {click: () => downloadCsv("day", message)}}, "CSV by day"),
        h("button", {type: "button", class: "secondary", on: {click: () => downloadCsv("month", message)}}, "CSV by month")),
      message);
  }
  if (everyone) {
    parts.push(h("h2", {}, "All tenants by month (admin)"), periodTable(everyone.data, {tenants: true}));
  }
  replace(view, ...parts);
}
