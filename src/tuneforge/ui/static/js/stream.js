// The job's live event stream (GET /v1/fine_tuning/jobs/{id}/events/stream, Server-Sent Events).
// EventSource cannot send an Authorization header, so the stream is read with fetch() and a ReadableStream
// reader and parsed here; a dropped connection is resumed from the last event id (`after`), never by
// putting the key in a query string.

import {session} from "./api.js";

const RETRY_MS = 2000;

/** Parse SSE text blocks ("field: value" lines, blank line between events) into {id, event, data}. */
export function* parseBlocks(text) {
  for (const block of text.split(/\r?\n\r?\n/)) {
    const message = {id: null, event: "message", data: []};
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue; // keep-alive comments
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") message.id = value;
      else if (field === "event") message.event = value;
      else if (field === "data") message.data.push(value);
    }
    if (message.data.length) yield {...message, data: message.data.join("\n")};
  }
}

/**
 * Follow a job's events until it finishes or `signal` aborts: onEvent(event) for each job event (oldest
 * first), onDone(status) once. Returns a promise that settles when the stream ends.
 */
export async function followEvents(jobId, {onEvent, onDone, onError, signal}) {
  let after = null;
  while (!signal.aborted) {
    const url = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events/stream` +
      (after ? `?after=${encodeURIComponent(after)}` : "");
    try {
      const response = await fetch(url, {headers: {Authorization: `Bearer ${session.key()}`, Accept: "text/event-stream"},
                                         signal, credentials: "omit", cache: "no-store"});
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
        // 404 (not this tenant's job) and 401 will not heal by retrying; 429 (too many streams) may.
        if (response.status !== 429) { onError(message); return; }
        onError(message);
      } else {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffered = "";
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buffered += decoder.decode(value, {stream: true});
          const end = buffered.lastIndexOf("\n\n");
          if (end < 0) continue;
          const complete = buffered.slice(0, end);
          buffered = buffered.slice(end + 2);
          for (const message of parseBlocks(complete)) {
            if (message.event === "done") { onDone(JSON.parse(message.data).status); return; }
            if (message.id) after = message.id;
            onEvent(JSON.parse(message.data));
          }
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      onError(`event stream interrupted (${error.message}); reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}
