// Log in with an API key: checked against the API once, then kept in sessionStorage for this tab.

import {api, session} from "../api.js";
import {errorBox, h, replace} from "../dom.js";

/** Show the key's tenant in the top bar; throws when the key is refused. */
export async function whoami(element, key) {
  const usage = await api("/v1/tuneforge/usage", {key});
  element.textContent = `tenant ${usage.tenant}`;
  return usage.tenant;
}

export async function loginPage(view, {done}) {
  const input = h("input", {id: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
                            placeholder: "tf-...", required: true});
  const message = h("div", {});
  const form = h("form", {class: "panel login", id: "login-form"},
    h("h1", {}, "Log in"),
    h("p", {class: "muted"}, "Paste an API key (`tuneforge keys create --tenant NAME`). It stays in this browser " +
      "tab's session storage and is sent only as an Authorization header."),
    input, message,
    h("div", {class: "actions"}, h("button", {type: "submit", id: "login"}, "Log in")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    try {
      await whoami(document.getElementById("whoami"), key);
    } catch (error) {
      replace(message, errorBox(error.status === 401 ? "That API key was not accepted." : error));
      return;
    }
    session.save(key);
    input.value = "";
    done();
  });
  replace(view, form);
  input.focus();
}
