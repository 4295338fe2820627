// The chat page: attachments, streamed answers, their numbers, chats kept in the browser, settings.
// Data flows one way: an action changes `chats` (and saves them), then the view is drawn from them; only the
// answer being streamed is updated in place.

import { ApiError, getJSON, streamAsk, streamChat } from "./api.js";
import { exportChats, loadChats, newId, parseExport, saveChats } from "./history.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_KEY = "vlcache.settings.v1";
const THEME_KEY = "vlcache.theme";
const NAMES_KEY = "vlcache.names.v1";  // sha256 of a file's bytes -> its name, for the stored states' list
const NAMES_KEPT = 500;
const MEDIA = /^(image|video)\//;
const EXTENSIONS = { image: /\.(png|jpe?g|gif|webp|bmp|tiff?|avif|heic)$/i, video: /\.(mp4|webm|mov|mkv|avi|m4v)$/i };

let chats = loadChats();
let current = null;  // the chat on screen (null: a new one, not saved until its first question)
let pending = [];  // attachments for the next question: {kind, name, dataUrl}
let reading = Promise.resolve();  // files being read: a question sent meanwhile waits for them
let running = null;  // {controller, chat} while an answer streams
let settings = loadSettings();

// -- settings and theme ----------------------------------------------------------------------------------------

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    return s && typeof s === "object" ? s : {};
  } catch (_) {
    return {};
  }
}

const FIELDS = { system: "set-system", json_schema: "set-json-schema", temperature: "set-temperature", top_p: "set-top-p",
                 max_tokens: "set-max-tokens", seed: "set-seed" };
const TEXT_FIELDS = ["system", "json_schema"];

function openSettings() {
  for (const [name, id] of Object.entries(FIELDS)) $(id).value = settings[name] ?? "";
  $("settings-error").hidden = true;
  $("settings").showModal();
}

let contextLength = null;  // the model's context in tokens, from /health: the most Max tokens can be

function saveSettings(event) {
  const schema = $("set-json-schema");
  schema.setCustomValidity(schemaProblem(schema.value));
  if (!schema.reportValidity()) {
    event.preventDefault();  // the dialog stays open on a schema that is not a JSON object
    return;
  }
  const out = {};
  for (const [name, id] of Object.entries(FIELDS)) {
    const value = $(id).value;
    if (value.trim() === "") continue;
    out[name] = TEXT_FIELDS.includes(name) ? value : Number(value);
  }
  const problem = settingsProblem(out);
  $("settings-error").hidden = !problem;
  $("settings-error").textContent = problem ? `error: ${problem}` : "";
  if (problem) {
    event.preventDefault();  // the dialog stays open with what was typed
    return;
  }
  settings = out;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

function settingsProblem(out) {
  if (!Number.isFinite(out.max_tokens)) return null;
  if (out.max_tokens < 1 || !Number.isInteger(out.max_tokens)) return "Max tokens is a whole number from 1";
  if (contextLength && out.max_tokens >= contextLength) {
    return `Max tokens must be under the model's context of ${number.format(contextLength)} tokens (with the question in it)`;
  }
  return null;
}

function schemaProblem(text) {
  if (text.trim() === "") return "";
  try {
    const value = JSON.parse(text);
    return value && typeof value === "object" && !Array.isArray(value) ? "" : "a JSON schema is a JSON object";
  } catch (_) {
    return "not JSON";
  }
}

// The sampling settings as the API takes them; empty ones are left to the model and the server. A JSON schema
// holds every answer to it (structured outputs, OpenAI's response_format).
function sampling(maxName) {
  const out = {};
  if (settings.json_schema) {
    out.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(settings.json_schema), strict: true } };
  }
  if (Number.isFinite(settings.temperature)) out.temperature = settings.temperature;
  if (Number.isFinite(settings.top_p)) out.top_p = settings.top_p;
  if (Number.isFinite(settings.max_tokens)) out[maxName] = Math.round(settings.max_tokens);
  if (Number.isFinite(settings.seed)) out.seed = Math.round(settings.seed);
  return out;
}

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  const theme = dark ? "light" : "dark";
  localStorage.setItem(THEME_KEY, theme);
  applyTheme(theme);
}

// -- attachments -----------------------------------------------------------------------------------------------

function kindOf(file) {
  const match = MEDIA.exec(file.type || "");
  if (match) return match[1];
  for (const [kind, pattern] of Object.entries(EXTENSIONS)) if (pattern.test(file.name)) return kind;
  return null;
}

function readDataUrl(file, kind) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      // Some files come without a type: name the kind, so the server is told what it gets.
      let url = reader.result;
      if (url.startsWith("data:;") || url.startsWith("data:application/octet-stream;")) {
        url = `data:${kind}/${kind === "image" ? "png" : "mp4"};` + url.slice(url.indexOf(";") + 1);
      }
      resolve(url);
    };
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function addFiles(files) {
  reading = reading.then(() => readFiles(files));
  return reading;
}

async function readFiles(files) {
  setComposerError(null);
  for (const file of files) {
    const kind = kindOf(file);
    if (!kind) {
      setComposerError(`${file.name} is not an image or a video`);
      continue;
    }
    try {
      pending.push({ kind, name: file.name, dataUrl: await readDataUrl(file, kind) });
      await rememberName(file);
    } catch (error) {
      setComposerError(error.message);
    }
  }
  drawAttachments();
}

// The server lists a state's parts by the sha256 of their bytes: a file this browser sent is shown by its name.
function knownNames() {
  try {
    const names = JSON.parse(localStorage.getItem(NAMES_KEY) || "{}");
    return names && typeof names === "object" ? names : {};
  } catch (_) {
    return {};
  }
}

async function rememberName(file) {
  if (!(window.crypto && crypto.subtle)) return;  // a page not on a secure origin (http on a LAN address): no names
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
  const hex = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
  const names = knownNames();
  delete names[hex];
  names[hex] = file.name;  // the newest last: the oldest leave first
  const keys = Object.keys(names);
  for (const key of keys.slice(0, Math.max(0, keys.length - NAMES_KEPT))) delete names[key];
  try {
    localStorage.setItem(NAMES_KEY, JSON.stringify(names));
  } catch (_) { /* storage full: the list shows kinds instead of names */ }
}

function thumbnail(part) {
  if (!part.dataUrl) {
    const gone = document.createElement("span");
    gone.className = "thumb gone";
    gone.textContent = `${part.kind} not kept`;
    return gone;
  }
  const media = document.createElement(part.kind === "video" ? "video" : "img");
  media.className = "thumb";
  media.src = part.dataUrl;
  media.title = part.name;
  if (part.kind === "video") {
    media.muted = true;
    media.preload = "metadata";
  } else {
    media.alt = part.name;
  }
  media.addEventListener("error", () => {  // a file the browser cannot show either: say so in its place
    const broken = document.createElement("span");
    broken.className = "thumb gone";
    broken.textContent = part.name;
    broken.title = `${part.name}: cannot be shown`;
    media.replaceWith(broken);
  }, { once: true });
  return media;
}

// A thumbnail with, for a video, a badge that says so and how long it is (once the browser read its header).
function mediaView(part) {
  const shown = thumbnail(part);
  if (part.kind !== "video") return shown;
  const box = document.createElement("span");
  box.className = "media video";
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = "▶ video";
  shown.addEventListener("loadedmetadata", () => {
    if (Number.isFinite(shown.duration)) badge.textContent = `▶ ${seconds(shown.duration)}`;
  }, { once: true });
  box.append(shown, badge);
  return box;
}

function drawAttachments() {
  const list = $("attachments");
  list.replaceChildren(...pending.map((part, i) => {
    const item = document.createElement("li");
    item.append(mediaView(part));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.title = `Remove ${part.name}`;
    remove.setAttribute("aria-label", `Remove ${part.name}`);
    remove.textContent = "×";
    remove.addEventListener("click", () => {
      pending.splice(i, 1);
      drawAttachments();
    });
    item.append(remove);
    return item;
  }));
  list.hidden = pending.length === 0;
}

function setComposerError(message) {
  let line = document.querySelector("#composer > .error");
  if (!message) {
    if (line) line.remove();
    return;
  }
  if (!line) {
    line = document.createElement("p");
    line.className = "error";
    $("composer").prepend(line);
  }
  line.textContent = `error: ${message}`;
}

// -- chats -------------------------------------------------------------------------------------------------------

function save() {
  const problem = saveChats(chats, current);
  $("history-error").hidden = !problem;
  $("history-error").textContent = problem ? `error: ${problem}` : "";
}

function startChat(state = null, stateLabel = "") {
  if (running) return;
  current = { id: newId(), title: "", updated: Date.now(), state, stateLabel, messages: [] };
  draw();
  $("input").focus();
}

function openChat(id) {
  if (running) return;
  current = chats.find((c) => c.id === id) || null;
  draw();
}

function deleteChat(id) {
  if (running) return;
  chats = chats.filter((c) => c.id !== id);
  if (current && current.id === id) current = null;
  save();
  draw();
}

// The conversation as the API takes it. An exchange that failed is left out (its file may be what failed);
// a stopped answer goes in as far as it got, as the user saw it.
function apiMessages(chat) {
  const out = [];
  if (!chat.state && settings.system) out.push({ role: "system", content: settings.system });
  const msgs = chat.messages;
  for (let i = 0; i < msgs.length; i++) {
    const m = msgs[i];
    if (m.role === "user") {
      const answer = msgs[i + 1];
      if (answer && answer.role === "assistant" && answer.error) {
        i++;
        continue;
      }
      if (chat.state) {
        out.push({ role: "user", content: m.text });
        continue;
      }
      const parts = m.attachments.map((a) => {
        if (!a.dataUrl) throw new ApiError(`${a.name} was not kept in this browser's history: start a new chat to send it again`);
        const type = a.kind === "video" ? "video_url" : "image_url";
        return { type, [type]: { url: a.dataUrl } };
      });
      if (m.text) parts.push({ type: "text", text: m.text });
      out.push({ role: "user", content: parts });
    } else if (!m.error) {
      out.push({ role: "assistant", content: m.text });
    }
  }
  return out;
}

// Ask for the answer to the chat's last user message, streaming it into a new assistant message.
async function answer(chat) {
  const reply = { role: "assistant", text: "" };
  chat.messages.push(reply);
  chat.updated = Date.now();
  if (!chats.includes(chat)) chats.unshift(chat);
  const controller = new AbortController();
  running = { controller, chat };
  draw();
  const body = document.querySelector("#messages > li:last-child .body");
  let frame = 0;
  const list = $("messages");
  const started = performance.now();
  let firstAt = null, pieces = 0;  // what a stopped answer can still say: when its text began, how much came
  const onText = (text) => {
    reply.text = text;
    pieces++;
    if (firstAt === null) firstAt = performance.now();
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      const following = list.scrollHeight - list.scrollTop - list.clientHeight < 40;  // the reader is at the end
      renderMarkdown(body, reply.text);
      if (following) list.scrollTop = list.scrollHeight;
    });
  };
  try {
    const messages = apiMessages({ ...chat, messages: chat.messages.slice(0, -1) });  // all but the reply being made
    const request = chat.state
      ? streamAsk({ state: chat.state, messages, ...sampling("max_new_tokens") }, controller.signal, onText)
      : streamChat({ model: "vlcache", messages, ...sampling("max_tokens") }, controller.signal, onText);
    const result = await request;
    reply.text = result.text;
    reply.finish = result.finish || undefined;
    if (result.stats) reply.stats = result.stats;
  } catch (error) {
    if (error.name === "AbortError") {
      reply.stopped = { pieces, total_s: (performance.now() - started) / 1000,
                        first_s: firstAt === null ? null : (firstAt - started) / 1000 };
    } else {
      reply.error = error instanceof ApiError ? error.message : `${error.name}: ${error.message}`;
      const asked = chat.messages[chat.messages.length - 2];
      if (error.status === 400 && asked && asked.attachments && asked.attachments.length && !chat.state) {
        reply.error = `${asked.attachments.map((a) => a.name).join(", ")}: ${reply.error}`;  // which files were refused
      }
    }
  } finally {
    cancelAnimationFrame(frame);
    running = null;
    save();
    draw();
    refreshStates();
    refreshHealth();  // the rows pill: this answer no longer runs
  }
}

async function send() {
  if (running) return;
  await reading;
  if (running) return;  // a second Enter while the files were read
  const input = $("input");
  const text = input.value.trim();
  if (!text && pending.length === 0) return;
  if (!current) startChat();
  if (current.state && pending.length) {
    setComposerError("a chat about a stored state takes questions only: start a new chat to send images or videos");
    return;
  }
  if (!current.title) current.title = (text || pending.map((p) => p.name).join(", ")).slice(0, 80);
  current.messages.push({ role: "user", text, attachments: pending });
  pending = [];
  input.value = "";
  fitInput();
  drawAttachments();
  setComposerError(null);
  answer(current);
}

function regenerate() {
  if (running || !current) return;
  const last = current.messages[current.messages.length - 1];
  if (last && last.role === "assistant") current.messages.pop();
  answer(current);
}

function resend(index, text) {
  if (running || !current) return;
  const message = current.messages[index];
  message.text = text.trim();
  if (current.messages.findIndex((m) => m.role === "user") === index) {  // the chat is named by its first question
    current.title = (message.text || message.attachments.map((p) => p.name).join(", ")).slice(0, 80);
  }
  current.messages.length = index + 1;  // what followed the edited question is answered again
  answer(current);
}

// -- drawing -----------------------------------------------------------------------------------------------------

function draw() {
  drawChats();
  const messages = current ? current.messages : [];
  $("messages").replaceChildren(...messages.map((m, i) => messageView(m, i, messages)));
  $("empty").hidden = messages.length > 0;
  const bound = $("bound");
  bound.hidden = !(current && current.state);
  if (current && current.state) bound.textContent = `Asking about stored state ${current.state.slice(0, 12)}… ${current.stateLabel}`;
  $("send").hidden = !!running;
  $("stop").hidden = !running;
  const last = $("messages").lastElementChild;
  if (last) last.scrollIntoView({ block: "end" });
}

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "link";
  b.textContent = label;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function messageView(m, index, messages) {
  const item = document.createElement("li");
  item.className = `message ${m.role}`;
  item.dataset.role = m.role;
  item.dataset.index = index;
  const idle = !running;
  if (m.role === "user") {
    if (m.attachments.length) {
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      thumbs.append(...m.attachments.map(mediaView));
      item.append(thumbs);
    }
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = m.text;  // the user's own words: text, never markup
    item.append(body);
    if (idle) {
      const actions = document.createElement("div");
      actions.className = "actions";
      actions.append(button("Edit", "Edit this question and ask it again", () => editView(item, index)));
      item.append(actions);
    }
    return item;
  }
  const body = document.createElement("div");
  body.className = "body markdown";
  renderMarkdown(body, m.text);
  item.append(body);
  if (m.error) {
    item.classList.add("failed");
    const line = document.createElement("p");
    line.className = "error";
    line.textContent = `error: ${m.error}`;
    item.append(line);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  if (m.stats) meta.append(statsView(m.stats));
  if (m.stopped) meta.append(stoppedView(m.stopped));
  if (m.finish === "length") meta.append(note("cut at max tokens"));
  if (idle && index === messages.length - 1) meta.append(button("Regenerate", "Ask this question again", regenerate));
  if (meta.childElementCount) item.append(meta);
  if (running && index === messages.length - 1) item.classList.add("streaming");
  return item;
}

// What was measured of a stopped answer: when it was stopped, when its text began, how many streamed pieces came
// (about one a token). Chats saved before these figures say "stopped" alone.
function stoppedView(stopped) {
  const span = note("stopped");
  if (typeof stopped !== "object") return span;
  const parts = [`stopped after ${seconds(stopped.total_s)}`];
  if (Number.isFinite(stopped.first_s)) parts.push(`first token ${seconds(stopped.first_s)}`);
  parts.push(`${number.format(stopped.pieces)} streamed piece${stopped.pieces === 1 ? "" : "s"}`);
  span.textContent = parts.join(" · ");
  return span;
}

function note(text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  return span;
}

const number = new Intl.NumberFormat();
const seconds = (s) => (s < 10 ? s.toFixed(2) : s.toFixed(1)) + " s";

function statsView(stats) {
  const span = document.createElement("span");
  span.className = "stats";
  for (const name of ["prompt", "cached", "completion"]) span.dataset[name] = stats[name];
  const parts = [`${number.format(stats.cached)} of ${number.format(stats.prompt)} prompt tokens cached`];
  if (Number.isFinite(stats.ttft_s)) parts.push(`first token ${seconds(stats.ttft_s)}`);
  if (Number.isFinite(stats.tokens_per_s) && stats.completion > 1) parts.push(`${stats.tokens_per_s.toFixed(1)} tokens/s`);
  if (Number.isFinite(stats.total_s)) parts.push(`${number.format(stats.completion)} tokens in ${seconds(stats.total_s)}`);
  span.textContent = parts.join(" · ");
  if (stats.cached > 0) span.classList.add("hit");
  return span;
}

function editView(item, index) {
  const message = current.messages[index];
  const body = item.querySelector(".body");
  const area = document.createElement("textarea");
  area.className = "edit";
  area.value = message.text;
  area.rows = Math.min(8, message.text.split("\n").length + 1);
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(
    button("Send", "Ask the edited question; the answers after it are replaced", () => resend(index, area.value)),
    button("Cancel", "Keep the question as it was", draw),
  );
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      resend(index, area.value);
    } else if (e.key === "Escape") draw();
  });
  body.replaceWith(area);
  item.querySelector(".actions").replaceWith(actions);
  area.focus();
}

function drawChats() {
  const list = $("chats");
  const sorted = [...chats].sort((a, b) => b.updated - a.updated);
  list.replaceChildren(...sorted.map((chat) => {
    const item = document.createElement("li");
    if (current && chat.id === current.id) item.classList.add("current");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "link grow";
    open.textContent = chat.title || "(untitled)";
    open.title = chat.title;
    open.addEventListener("click", () => { openChat(chat.id); closeSideOnPhone(); });
    const remove = button("×", "Delete this chat", () => deleteChat(chat.id));
    remove.setAttribute("aria-label", `Delete ${chat.title}`);
    item.append(open, remove);
    return item;
  }));
}

// -- the server: health and stored states -----------------------------------------------------------------------

async function refreshHealth() {
  try {
    const h = await getJSON("health");
    const name = h.model.startsWith("/") ? h.model.split("/").filter(Boolean).pop() : h.model;  // a local folder: its name
    $("model").textContent = `${name} · ${h.family} · ${h.dtype}`;
    $("model").title = `model ${h.model}, family ${h.family}, dtype ${h.dtype}`;
    $("model").classList.remove("error");
    $("rows").textContent = `${h.running} running · ${h.queued} queued`;
    if (Number.isFinite(h.context_length)) {
      contextLength = h.context_length;
      $("set-max-tokens").max = String(h.context_length - 1);
    }
    $("rows").hidden = false;
  } catch (error) {
    $("model").textContent = error instanceof ApiError ? error.message : "cannot reach the server";
    $("model").classList.add("error");
    $("rows").hidden = true;
  }
}

const bytes = (n) => {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
};

// When a state was made (the listing shows no one's last use: that would tell what other clients ask about).
function ago(created) {
  const unix = Date.parse(created) / 1000;
  if (!unix) return "made at an unknown time";
  const s = Math.max(0, Date.now() / 1000 - unix);
  if (s < 60) return "made just now";
  if (s < 3600) return `made ${Math.round(s / 60)} min ago`;
  if (s < 86400) return `made ${Math.round(s / 3600)} h ago`;
  return `made ${Math.round(s / 86400)} days ago`;
}

async function refreshStates() {
  const list = $("states");
  let states;
  try {
    states = (await getJSON("v1/vlcache/states")).data;
  } catch (error) {
    const line = document.createElement("li");
    line.className = "error";
    line.textContent = `error: ${error.message}`;
    list.replaceChildren(line);
    return;
  }
  if (!states.length) {
    const line = document.createElement("li");
    line.className = "muted small";
    line.textContent = "none yet";
    list.replaceChildren(line);
    return;
  }
  const names = knownNames();
  list.replaceChildren(...states.map((s) => stateView(s, names)));
}

function firstWords(text, count = 8) {
  const words = text.trim().split(/\s+/);
  return words.slice(0, count).join(" ") + (words.length > count ? "…" : "");
}

// One stored state: a thumbnail per image (a badge with the duration per video), the names this browser gave
// its files, its numbers and age, and the first words of its system prompt.
function stateView(s, names) {
  const item = document.createElement("li");
  item.className = "state";
  item.dataset.id = s.id;
  const pictures = document.createElement("div");
  pictures.className = "state-thumbs";
  pictures.append(...s.parts.slice(0, 3).map((p) => partView(p, names[p.sha256])));
  const label = `${s.kind}, ${s.parts.length} part${s.parts.length > 1 ? "s" : ""}, ${number.format(s.tokens)} tokens`;
  const given = s.parts.map((p) => names[p.sha256]).filter(Boolean);
  const text = document.createElement("div");
  text.className = "grow";
  const title = document.createElement("div");
  title.className = "state-title";
  title.textContent = given.length ? given.join(", ") : label;
  const detail = document.createElement("div");
  detail.className = "muted small";
  detail.textContent = [given.length ? label : null, bytes(s.bytes), ago(s.created), s.id.slice(0, 8)].filter(Boolean).join(" · ");
  text.append(title, detail);
  if (s.system_prompt) {
    const system = document.createElement("div");
    system.className = "muted small system";
    system.textContent = `“${firstWords(s.system_prompt)}”`;
    text.append(system);
  }
  const sizes = s.parts.map((p) => `${p.type} ${p.size.join("×")}${p.frames ? `, ${p.frames} frames` : ""}`).join("; ");
  text.title = `${sizes}${s.system_prompt ? `\nsystem prompt: ${s.system_prompt}` : ""}`;
  item.append(pictures, text, button("Ask", "Start a chat about this state", () => {
    startChat(s.id, `(${given.length ? given.join(", ") : label})`);
    closeSideOnPhone();
  }));
  return item;
}

function partView(part, name) {
  if (part.type === "video") {
    const badge = document.createElement("span");
    badge.className = "state-thumb badge";
    badge.textContent = `▶ ${Number.isFinite(part.duration) ? seconds(part.duration) : "video"}`;
    badge.title = name || "video";
    return badge;
  }
  const image = document.createElement("img");
  image.className = "state-thumb";
  image.alt = name || "image";
  image.src = `v1/vlcache/thumbs/${encodeURIComponent(part.sha256 || "none")}`;
  image.addEventListener("error", () => {  // none kept (made before thumbnails, or elsewhere): say what it is
    const gone = document.createElement("span");
    gone.className = "state-thumb badge";
    gone.textContent = "image";
    image.replaceWith(gone);
  }, { once: true });
  return image;
}

// -- wiring ------------------------------------------------------------------------------------------------------

function fitInput() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 200) + "px";
}

function closeSideOnPhone() {
  if (matchMedia("(max-width: 800px)").matches) document.body.classList.remove("side-open");
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("input").addEventListener("input", fitInput);
  $("stop").addEventListener("click", () => running && running.controller.abort());
  $("pick").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  $("new-chat").addEventListener("click", () => startChat());
  $("open-settings").addEventListener("click", openSettings);
  $("save-settings").addEventListener("click", saveSettings);
  $("cancel-settings").addEventListener("click", () => $("settings").close());  // what was typed is dropped
  $("theme").addEventListener("click", toggleTheme);
  $("toggle-side").addEventListener("click", () => {
    document.body.classList.toggle(matchMedia("(max-width: 800px)").matches ? "side-open" : "side-closed");
  });
  $("refresh-states").addEventListener("click", refreshStates);
  document.querySelector(".main").addEventListener("click", closeSideOnPhone);
  $("export").addEventListener("click", () => exportChats(chats));
  $("import-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try {
      const imported = parseExport(await file.text());
      const known = new Set(chats.map((c) => c.id));
      chats = [...imported.filter((c) => !known.has(c.id)), ...chats];
      save();
      draw();
    } catch (error) {
      $("history-error").hidden = false;
      $("history-error").textContent = `error: ${error.message}`;
    }
  });

  // Paste files anywhere; drop them anywhere on the page.
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (e) => { if (hasFiles(e)) { depth++; $("drop").hidden = false; } });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    addFiles([...e.dataTransfer.files]);
  });
}

applyTheme(localStorage.getItem(THEME_KEY));
wire();
drawAttachments();
draw();
refreshHealth();
refreshStates();
setInterval(() => document.hidden || refreshHealth(), 2000);  // not while the tab is in the background
document.documentElement.dataset.ready = "1";  // for tests: the page's modules ran
