// Chats kept in the browser (localStorage), exported and imported as JSON. An imported file is someone else's
// word: it is checked field by field and copied into fresh objects; its text is only ever shown as text or
// through the sanitizing Markdown renderer.

const KEY = "vlcache.chats.v1";
const FORMAT = "vlcache-chats";
const STATE_ID = /^[0-9a-f]{64}$/;
const MEDIA_URL = /^data:(image|video)\/[\w.+-]+;base64,[A-Za-z0-9+/=]*$/;

export function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
}

export function loadChats() {
  try {
    return checkChats(JSON.parse(localStorage.getItem(KEY) || "[]"));
  } catch (_) {
    return [];  // unreadable storage: start empty rather than not at all
  }
}

/**
 * Save all chats; when the browser's storage is full, drop the images and videos of all but `keep` (they
 * are marked, and those chats can no longer be continued). Returns an error message, or null.
 */
export function saveChats(chats, keep) {
  try {
    localStorage.setItem(KEY, JSON.stringify(chats));
    return null;
  } catch (_) {
    for (const chat of chats) {
      if (chat === keep) continue;
      for (const message of chat.messages) {
        for (const part of message.attachments || []) {
          if (part.dataUrl) {
            delete part.dataUrl;
            part.dropped = true;
          }
        }
      }
    }
    try {
      localStorage.setItem(KEY, JSON.stringify(chats));
      return "browser storage is full: older chats were kept without their images and videos";
    } catch (_) {
      return "browser storage is full: this chat is not saved (export it, or delete older chats)";
    }
  }
}

export function exportChats(chats) {
  const body = JSON.stringify({ format: FORMAT, version: 1, chats }, null, 1);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([body], { type: "application/json" }));
  link.download = `vlcache-chats-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

/** Chats from an exported file's text; throws an Error whose message says what is wrong. */
export function parseExport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (_) {
    throw new Error("the file is not JSON");
  }
  if (!data || data.format !== FORMAT || data.version !== 1 || !Array.isArray(data.chats)) {
    throw new Error(`the file is not a vlcache chat export (format "${FORMAT}", version 1)`);
  }
  return checkChats(data.chats);
}

function checkChats(chats) {
  if (!Array.isArray(chats)) throw new Error("chats must be a list");
  return chats.map((chat, i) => {
    const where = `chats[${i}]`;
    if (!chat || typeof chat !== "object" || !Array.isArray(chat.messages)) throw new Error(`${where} has no messages`);
    if (chat.state != null && !(typeof chat.state === "string" && STATE_ID.test(chat.state))) {
      throw new Error(`${where}.state is not a state id`);
    }
    return {
      id: typeof chat.id === "string" ? chat.id.slice(0, 64) : newId(),
      title: typeof chat.title === "string" ? chat.title.slice(0, 200) : "chat",
      updated: Number.isFinite(chat.updated) ? chat.updated : Date.now(),
      state: chat.state || null,
      stateLabel: typeof chat.stateLabel === "string" ? chat.stateLabel.slice(0, 200) : "",
      messages: chat.messages.map((m, j) => checkMessage(m, `${where}.messages[${j}]`)),
    };
  });
}

function checkMessage(m, where) {
  if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.text !== "string") {
    throw new Error(`${where} needs a role of user or assistant and a text`);
  }
  const out = { role: m.role, text: m.text };
  if (m.role === "user") {
    out.attachments = (Array.isArray(m.attachments) ? m.attachments : []).map((a, k) => {
      if (!a || (a.kind !== "image" && a.kind !== "video")) throw new Error(`${where}.attachments[${k}] is not an image or a video`);
      const part = { kind: a.kind, name: typeof a.name === "string" ? a.name.slice(0, 200) : a.kind };
      if (typeof a.dataUrl === "string" && MEDIA_URL.test(a.dataUrl)) part.dataUrl = a.dataUrl;
      else part.dropped = true;
      return part;
    });
  } else {
    if (typeof m.error === "string") out.error = m.error.slice(0, 500);
    if (m.stopped === true) out.stopped = true;
    if (typeof m.finish === "string") out.finish = m.finish.slice(0, 20);
    if (m.stats && typeof m.stats === "object") {
      out.stats = {};
      for (const name of ["prompt", "cached", "completion", "ttft_s", "tokens_per_s", "total_s"]) {
        if (Number.isFinite(m.stats[name])) out.stats[name] = m.stats[name];
      }
    }
  }
  return out;
}
