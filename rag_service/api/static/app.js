// The RAG service's web page: collections, uploads with job progress, streamed
// answers with clickable citations.  Plain browser JavaScript, no framework.
// Every text that comes from the server goes into the page as text
// (textContent / text nodes), never as markup.

const KEY_STORAGE = "rag.apiKey";
const COLLECTION_STORAGE = "rag.collection";
const COLLECTION_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const RESERVED_NAMES = new Set(["blobs", "tmp", "catalog.sqlite3"]);
const JOB_POLL_MS = 400;
const DOCUMENTS_PAGE = 100;

const $ = (id) => document.getElementById(id);

// -- small helpers -----------------------------------------------------------

/** An element with attributes and children; strings become text nodes. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function showError(node, message) {
  node.textContent = message;
  node.hidden = !message;
}

function storageGet(key) {
  try {
    return window.localStorage.getItem(key) || "";
  } catch {
    return ""; // storage disabled: the page still works, it just forgets
  }
}

function storageSet(key, value) {
  try {
    if (value) window.localStorage.setItem(key, value);
    else window.localStorage.removeItem(key);
  } catch {
    /* storage disabled */
  }
}

// -- the API -----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** Request headers, with the API key when one is set. */
function headers(extra = {}) {
  const key = storageGet(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** The ``{"error": {"code", "message"}}`` of a failed response as an ``ApiError``. */
async function errorOf(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      code = String(body.error.code || code);
      message = body.error.message;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, code, message);
}

/** What to tell the user about a failed request. */
function describe(error) {
  if (error instanceof ApiError && error.status === 401) {
    return `${error.message} (set the API key at the top of the page)`;
  }
  if (error instanceof ApiError) return error.message;
  if (error instanceof TypeError) return `Cannot reach the service: ${error.message}`;
  return error && error.message ? error.message : String(error);
}

async function api(path, { method = "GET", json, body, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

const collectionPath = (name) => `/v1/collections/${encodeURIComponent(name)}`;

// -- Server-Sent Events over fetch (EventSource cannot POST) -----------------

/** Parses an event stream as it arrives: ``push(text)`` returns the events it completed. */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  push(text, final = false) {
    this.buffer += text;
    const events = [];
    const breaks = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = breaks.exec(this.buffer)) !== null) {
      // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
      if (!final && match[0] === "\r" && breaks.lastIndex === this.buffer.length) break;
      this.line(this.buffer.slice(start, match.index), events);
      start = breaks.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events; // at the end, an event without its closing blank line is dropped
  }

  line(line, events) {
    if (line === "") {
      if (this.data.length) events.push({ event: this.event || "message", data: this.data.join("\n") });
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment: keep-alive pings
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
  }
}

async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  let ended = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        ended = true;
        yield* parser.push(decoder.decode(), true);
        return;
      }
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
  } finally {
    // Left early (an error, a bad event): hang up, which stops the generation.
    if (!ended) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

// -- API key -----------------------------------------------------------------

function setupApiKey() {
  const input = $("api-key");
  const status = $("api-key-status");
  const describeKey = () => {
    status.textContent = storageGet(KEY_STORAGE) ? "Key set: sent with every request." : "";
  };
  input.value = storageGet(KEY_STORAGE);
  describeKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    storageSet(KEY_STORAGE, input.value.trim());
    describeKey();
    loadCollections();
  });
  $("api-key-forget").addEventListener("click", () => {
    input.value = "";
    storageSet(KEY_STORAGE, "");
    status.textContent = "Key forgotten.";
    loadCollections();
  });
}

// -- collections -------------------------------------------------------------

/** Names typed in but not uploaded to yet: they exist only on this page. */
const pendingCollections = new Set();
const select = $("collection");

function currentCollection() {
  return select.value || "";
}

async function loadCollections() {
  const wanted = currentCollection() || storageGet(COLLECTION_STORAGE);
  showError($("collection-error"), "");
  let collections;
  try {
    collections = (await api("/v1/collections")).collections;
  } catch (error) {
    showError($("collection-error"), `Could not list collections: ${describe(error)}`);
    return;
  }
  for (const c of collections) pendingCollections.delete(c.name);
  select.replaceChildren();
  for (const c of collections) {
    const label = `${c.name} (${plural(c.document_count, "document")}, ${plural(c.chunk_count, "chunk")})`;
    select.append(el("option", { value: c.name }, label));
  }
  for (const name of pendingCollections) {
    select.append(el("option", { value: name }, `${name} (new: upload a file to create it)`));
  }
  if (!select.options.length) {
    select.append(el("option", { value: "", disabled: true, selected: true }, "No collections yet"));
    $("collection-summary").textContent = "Type a name under New collection and upload a file.";
  } else {
    const names = [...select.options].map((o) => o.value);
    select.value = names.includes(wanted) ? wanted : names[0];
    $("collection-summary").textContent = "";
  }
  collectionChanged();
}

function collectionChanged() {
  const name = currentCollection();
  storageSet(COLLECTION_STORAGE, name);
  loadDocuments();
}

function createCollection(event) {
  event.preventDefault();
  const input = $("new-collection");
  const name = input.value.trim();
  if (!COLLECTION_NAME.test(name) || RESERVED_NAMES.has(name.toLowerCase()) || name.includes("..")) {
    showError(
      $("collection-error"),
      "Use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit " +
        "(not 'blobs' or 'tmp').",
    );
    input.focus();
    return;
  }
  showError($("collection-error"), "");
  if (![...select.options].some((o) => o.value === name)) {
    pendingCollections.add(name);
    select.querySelector("option[disabled]")?.remove();
    select.append(el("option", { value: name }, `${name} (new: upload a file to create it)`));
  }
  select.value = name;
  input.value = "";
  $("collection-summary").textContent = "";
  collectionChanged();
  $("files").focus();
}

// -- documents ---------------------------------------------------------------

let documentsRequest = 0;

async function loadDocuments() {
  const name = currentCollection();
  const tbody = $("documents").tBodies[0];
  const summary = $("documents-summary");
  const request = ++documentsRequest;
  if (!name) {
    tbody.replaceChildren();
    summary.textContent = "";
    return;
  }
  if (pendingCollections.has(name)) {
    tbody.replaceChildren();
    summary.textContent = "No documents yet: upload the first file.";
    return;
  }
  let page;
  try {
    page = await api(`${collectionPath(name)}/documents?limit=${DOCUMENTS_PAGE}`);
  } catch (error) {
    if (request !== documentsRequest) return;
    tbody.replaceChildren();
    summary.textContent = `Could not list documents: ${describe(error)}`;
    return;
  }
  if (request !== documentsRequest) return; // the user picked another collection meanwhile
  tbody.replaceChildren(
    ...page.documents.map((d) =>
      el(
        "tr",
        { dataset: { status: d.status } },
        el("td", {}, d.source),
        el(
          "td",
          {},
          el("span", { className: `status status-${d.status}` }, d.status),
          d.error ? el("div", { className: "error-text" }, d.error) : null,
        ),
        el("td", { className: "num" }, d.pages === null ? "–" : String(d.pages)),
        el("td", { className: "num" }, String(d.chunk_count)),
      ),
    ),
  );
  summary.textContent =
    page.total === 0
      ? "No documents yet."
      : page.total > page.documents.length
        ? `Showing the first ${page.documents.length} of ${page.total} documents.`
        : plural(page.total, "document");
}

// -- uploads and jobs --------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const name = currentCollection();
  const input = $("files");
  const button = $("upload");
  showError($("upload-error"), "");
  if (!name) {
    showError($("upload-error"), "Pick a collection or create one first.");
    return;
  }
  if (!input.files.length) {
    showError($("upload-error"), "Choose one or more files to upload.");
    input.focus();
    return;
  }
  const form = new FormData();
  const names = [];
  for (const file of input.files) {
    form.append("files", file, file.name);
    names.push(file.name);
  }
  button.disabled = true;
  button.textContent = "Uploading…";
  try {
    const receipt = await api(`${collectionPath(name)}/documents`, { method: "POST", body: form });
    input.value = "";
    if (pendingCollections.delete(name)) loadCollections();
    else loadDocuments();
    watchJob(receipt.job_id, name, names);
  } catch (error) {
    showError($("upload-error"), `Upload failed: ${describe(error)}`);
  } finally {
    button.disabled = false;
    button.textContent = "Upload";
  }
}

/** Share of the job done, 0..1: finished documents plus the current one's chunks. */
function jobFraction(job) {
  if (job.status === "succeeded" || job.status === "failed") return 1;
  const p = job.progress;
  if (!p.documents_total) return 0;
  const finished = p.documents_done + p.documents_failed;
  const current = p.chunks_total ? p.chunks_done / p.chunks_total : 0;
  return Math.min(1, (finished + Math.min(current, 0.99)) / p.documents_total);
}

function watchJob(jobId, collection, names) {
  const bar = el("progress", { max: 100, value: 0, "aria-label": `Progress of ${names.join(", ")}` });
  const status = el("span", { className: "job-status" }, "queued");
  const detail = el("span", { className: "muted" });
  const error = el("p", { className: "error-text", hidden: true });
  const item = el(
    "li",
    { className: "job", dataset: { job: jobId, status: "queued" } },
    el("div", { className: "row spread" }, el("strong", { className: "job-files" }, names.join(", ")), status),
    bar,
    detail,
    error,
  );
  $("jobs").prepend(item);
  let best = 0;
  let failures = 0;

  const poll = async () => {
    let job;
    try {
      job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
      failures = 0;
    } catch (err) {
      failures += 1;
      detail.textContent = `Could not check the job: ${describe(err)}`;
      if (!(err instanceof ApiError && err.status === 404) && failures < 30) {
        setTimeout(poll, JOB_POLL_MS * Math.min(failures + 1, 10));
      }
      return;
    }
    best = Math.max(best, jobFraction(job));
    bar.value = Math.round(best * 100);
    item.dataset.status = job.status;
    status.textContent = job.status === "running" && job.stage ? `running: ${job.stage}` : job.status;
    status.className = `job-status status-${job.status}`;
    const p = job.progress;
    const parts = [`${p.documents_done + p.documents_failed} of ${plural(p.documents_total, "document")}`];
    if (p.documents_failed) parts.push(`${p.documents_failed} failed`);
    if (p.chunks_total) parts.push(`${p.chunks_done} of ${plural(p.chunks_total, "chunk")}`);
    detail.textContent = parts.join(" · ");
    if (job.error) {
      error.textContent = job.error;
      error.hidden = false;
    }
    if (job.status === "queued" || job.status === "running") {
      setTimeout(poll, JOB_POLL_MS);
      return;
    }
    // Progress ticks are not read out (too chatty); the end of the job is.
    $("job-announcer").textContent = `Upload of ${names.join(", ")}: ${job.status}.`;
    if (collection === currentCollection()) loadCollections(); // new counts and documents
  };
  poll();
}

// -- questions and answers ---------------------------------------------------

let running = null; // the AbortController of the question being answered
let sources = new Map(); // n -> source of the current answer
let lastCitation = null;

function setRunning(controller) {
  running = controller;
  $("ask").disabled = Boolean(controller);
  $("stop").disabled = !controller;
  $("ask-form").setAttribute("aria-busy", controller ? "true" : "false");
}

function resetResult() {
  sources = new Map();
  showError($("ask-error"), "");
  $("result").hidden = true;
  $("result").classList.remove("unanswerable");
  $("verdict").hidden = true;
  $("degraded").hidden = true;
  $("answer").replaceChildren();
  $("answer").className = "answer";
  $("cost").textContent = "";
  $("reasoning-box").hidden = true;
  $("reasoning-box").open = false;
  $("sources").replaceChildren();
  closeSource();
}

function pageLabel(source) {
  return source.page === null || source.page === undefined ? "" : `page ${source.page}`;
}

function citationButton(n) {
  const source = sources.get(n);
  const where = [source.source, pageLabel(source)].filter(Boolean).join(", ");
  return el(
    "button",
    { type: "button", className: "citation", dataset: { n }, "aria-label": `Source ${n}: ${where}` },
    `[${n}]`,
  );
}

function renderSources(list, cited = []) {
  sources = new Map(list.map((s) => [s.n, s]));
  $("sources").replaceChildren(
    ...list.map((s) =>
      el(
        "li",
        { className: cited.includes(s.n) ? "cited" : null, value: s.n },
        citationButton(s.n),
        " ",
        el("span", { className: "source-name" }, s.source),
        pageLabel(s) ? el("span", { className: "muted" }, ` · ${pageLabel(s)}`) : null,
        el("span", { className: "muted" }, ` · score ${Number(s.score).toFixed(3)}`),
      ),
    ),
  );
  $("result").hidden = false;
}

/** The answer's text with each ``[n]`` (or ``[n, m]``) of a known source as a button. */
function answerNodes(text) {
  const nodes = [];
  const marks = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
  let last = 0;
  let match;
  while ((match = marks.exec(text)) !== null) {
    const numbers = match[1].split(",").map((s) => Number(s.trim()));
    if (!numbers.every((n) => sources.has(n))) continue;
    nodes.push(document.createTextNode(text.slice(last, match.index)));
    numbers.forEach((n) => nodes.push(citationButton(n)));
    last = marks.lastIndex;
  }
  nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

const ABSTAIN_REASONS = {
  no_sources: "nothing in the collection matched the question",
  low_retrieval_score: "nothing in the collection is close enough to the question",
  model_declined: "the model found no answer in the sources",
};

function renderDone(done) {
  renderSources(done.sources || [], done.citations || []);
  const answer = $("answer");
  answer.classList.remove("streaming");
  answer.setAttribute("aria-busy", "false");
  answer.replaceChildren(...answerNodes(done.answer || ""));
  answer.classList.add("done");

  const verdict = $("verdict");
  if (done.answerable === false) {
    $("result").classList.add("unanswerable");
    const why = ABSTAIN_REASONS[done.abstain_reason] || done.abstain_reason;
    verdict.textContent = why ? `Not answerable: ${why}.` : "Not answerable from these documents.";
    verdict.hidden = false;
  }
  if (done.degraded) {
    $("degraded").textContent =
      "The model could not answer" +
      (done.degraded_reason ? ` (${done.degraded_reason})` : "") +
      "; showing the retrieved sources instead.";
    $("degraded").hidden = false;
  }
  const reasoning = [done.reasoning || ""];
  if (done.unsupported && done.unsupported.length) {
    reasoning.push(`Removed as unsupported by the sources:\n- ${done.unsupported.join("\n- ")}`);
  }
  const reasoningText = reasoning.filter(Boolean).join("\n\n");
  $("reasoning").textContent = reasoningText;
  $("reasoning-box").hidden = !reasoningText;

  const cost = done.cost || {};
  const parts = [
    `${done.strategy || "direct"}`,
    plural(cost.calls ?? 0, "model call"),
    `${cost.prompt_tokens ?? 0} prompt + ${cost.completion_tokens ?? 0} completion tokens`,
    `${Math.round(cost.ms ?? 0)} ms in the model`,
  ];
  if (done.timings && typeof done.timings.total_ms === "number") {
    parts.push(`${Math.round(done.timings.total_ms)} ms in all`);
  }
  if (typeof done.agreement === "number") parts.push(`${Math.round(done.agreement * 100)}% agreement`);
  $("cost").textContent = parts.join(" · ");
}

async function ask(event) {
  event.preventDefault();
  if (running) return;
  const collection = currentCollection();
  const question = $("question").value.trim();
  resetResult();
  if (!collection) {
    showError($("ask-error"), "Pick a collection or create one first.");
    return;
  }
  if (!question) {
    showError($("ask-error"), "Type a question first.");
    $("question").focus();
    return;
  }
  const controller = new AbortController();
  setRunning(controller);
  const status = $("ask-status");
  const answer = $("answer");
  status.textContent = "Searching…";
  const started = performance.now();
  let finished = false;
  try {
    const response = await fetch("/v1/query", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({
        collection,
        question,
        stream: true,
        strategy: $("strategy").value,
        mode: $("mode").value,
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    if (!(response.headers.get("content-type") || "").includes("text/event-stream")) {
      renderDone(await response.json()); // a server that does not stream answers whole
      finished = true;
    } else {
      for await (const message of readEvents(response.body)) {
        const data = JSON.parse(message.data);
        if (message.event === "sources") {
          renderSources(data.sources || []);
          answer.classList.add("streaming");
          answer.setAttribute("aria-busy", "true");
          status.textContent = "Writing…";
        } else if (message.event === "token") {
          answer.append(data.text);
        } else if (message.event === "done") {
          renderDone(data);
          finished = true;
        } else if (message.event === "error") {
          throw new ApiError(0, data.error?.code || "error", data.error?.message || message.data);
        }
      }
    }
    if (!finished) throw new Error("The answer stream ended before the answer was complete.");
    status.textContent = `Answered in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
  } catch (error) {
    answer.classList.remove("streaming");
    answer.setAttribute("aria-busy", "false");
    if (error.name === "AbortError") {
      answer.classList.add("stopped");
      status.textContent = "Stopped.";
    } else {
      status.textContent = "";
      showError($("ask-error"), describe(error));
    }
  } finally {
    controller.abort(); // no-op after a complete answer; else closes the connection
    setRunning(null);
  }
}

// -- the source panel --------------------------------------------------------

function showSource(n, opener) {
  const source = sources.get(n);
  if (!source) return;
  lastCitation = opener;
  $("source-title").textContent = `[${n}] ${source.source}`;
  const meta = [
    pageLabel(source) ? pageLabel(source).replace(/^p/, "P") : "No page",
    source.headings && source.headings.length ? source.headings.join(" › ") : "",
    `score ${Number(source.score).toFixed(3)}`,
  ];
  $("source-meta").textContent = meta.filter(Boolean).join(" · ");
  $("source-text").textContent = source.text;
  const panel = $("source-panel");
  panel.dataset.n = String(n);
  panel.hidden = false;
  panel.focus({ preventScroll: true });
  panel.scrollIntoView({ block: "nearest", behavior: "smooth" });
}

function closeSource() {
  const panel = $("source-panel");
  if (panel.hidden) return;
  panel.hidden = true;
  if (lastCitation && document.contains(lastCitation)) lastCitation.focus();
  lastCitation = null;
}

// -- wiring ------------------------------------------------------------------

function start() {
  setupApiKey();
  select.addEventListener("change", collectionChanged);
  $("refresh").addEventListener("click", loadCollections);
  $("new-collection-form").addEventListener("submit", createCollection);
  $("upload-form").addEventListener("submit", upload);
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("ask-form").requestSubmit();
  });
  $("stop").addEventListener("click", () => running?.abort());
  // One listener for every citation, in the answer and in the sources list.
  $("result").addEventListener("click", (event) => {
    const button = event.target.closest("button.citation");
    if (button) showSource(Number(button.dataset.n), button);
  });
  $("source-close").addEventListener("click", closeSource);
  $("source-panel").addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeSource();
  });
  loadCollections();
}

start();
