// Building the page without parsing HTML strings: every string from the API becomes a text node, never markup.

/** h("td", {class: "num", on: {click: fn}}, "text", child) -> an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) el.addEventListener(event, handler);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "class") {
      el.className = value;
    } else if (name in el && typeof value !== "string") {
      el[name] = value; // properties: checked, disabled, value, selected
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace an element's content with `children`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A link inside the dashboard; ids are percent-encoded, so no id can change the route. */
export function link(route, ...parts) {
  return h("a", {href: "#/" + parts.map(encodeURIComponent).join("/")}, route);
}

export function table(headers, rows, {empty = "Nothing here yet.", className} = {}) {
  const head = h("tr", {}, headers.map((name) => h("th", {class: name.startsWith("#") ? "num" : null},
                                                  name.replace(/^#/, ""))));
  const body = rows.length ? rows : [h("tr", {}, h("td", {colspan: headers.length, class: "muted"}, empty))];
  return h("table", {class: className}, h("thead", {}, head), h("tbody", {}, body));
}

export function facts(pairs) {
  return h("dl", {class: "facts"}, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function statusBadge(status) {
  return h("span", {class: `status status-${String(status).replace(/[^a-z_]/g, "")}`}, status);
}

export function errorBox(error) {
  const param = error && error.param ? ` (${error.param})` : "";
  return h("div", {class: "error", role: "alert"}, `${error && error.message ? error.message : error}${param}`);
}

export function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function number(value, digits = 4) {
  if (value === null || value === undefined) return "";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? value.toLocaleString("en-US") : value.toPrecision(digits);
}

/** A USD amount ("$1.23", small amounts with more digits); "" when absent. */
export function money(usd) {
  if (typeof usd !== "number" || !Number.isFinite(usd)) return "";
  return usd >= 1 || usd === 0 ? `$${usd.toFixed(2)}` : `$${usd.toPrecision(2)}`;
}

export function json(value) {
  return h("pre", {class: "json"}, JSON.stringify(value, null, 2));
}
