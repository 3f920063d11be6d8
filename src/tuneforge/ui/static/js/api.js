// The API client: the key lives in sessionStorage (this tab only, gone when it closes; never localStorage,
// never a URL) and goes out only as an Authorization header to the origin that served the page.

const KEY_SLOT = "tuneforge.api_key";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY_SLOT),
  save: (key) => sessionStorage.setItem(KEY_SLOT, key),
  clear: () => sessionStorage.removeItem(KEY_SLOT),
};

let onUnauthorized = () => {};
/** Called when the API refuses the saved key (revoked, expired): the app goes back to the login page. */
export function whenUnauthorized(callback) { onUnauthorized = callback; }

function headers(extra = {}, key = session.key()) {
  return {...extra, Authorization: `Bearer ${key}`};
}

async function answer(response, {savedKey = true} = {}) {
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    if (response.status === 401 && savedKey) onUnauthorized(); // a key being tried at login is not logged out
    throw new ApiError(response.status, body);
  }
  return body;
}

/** GET/POST JSON under /v1; `path` must start with "/v1/". */
export async function api(path, {method = "GET", body, signal, key} = {}) {
  const init = {method, signal, headers: headers(body === undefined ? {} : {"Content-Type": "application/json"}, key),
                credentials: "omit", cache: "no-store"};
  if (body !== undefined) init.body = JSON.stringify(body);
  return answer(await fetch(path, init), {savedKey: key === undefined});
}

/** Like api(), but a 404 means "this server has no such endpoint or object": null instead of an error. */
export async function optional(path, options) {
  try {
    return await api(path, options);
  } catch (error) {
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) return null;
    throw error;
  }
}

/** Upload a dataset as multipart form data (the browser sets the boundary). */
export async function upload(file, purpose) {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  return answer(await fetch("/v1/files", {method: "POST", body: form, headers: headers(), credentials: "omit"}));
}

export function path(...parts) {
  return "/v1/" + parts.map((p, i) => (i === 0 ? p : encodeURIComponent(p))).join("/");
}
