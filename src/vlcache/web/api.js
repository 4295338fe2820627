// The server's HTTP API as the page uses it: the same endpoints, limits and errors any client gets. Paths are
// relative, so the page also works behind a proxy that serves it under a prefix.

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;  // the HTTP status of a refusal (0: no answer, or a failure mid-stream)
  }
}

const UNREACHABLE = "cannot reach the server";

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(UNREACHABLE);
  }
  if (!response.ok) throw new ApiError(await errorMessage(response), response.status);
  return response;
}

// OpenAI's error shape ({"error": {"message": ...}}), or whatever the status says.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
  } catch (_) { /* not JSON: a proxy's page, say */ }
  return `the server answered ${response.status} ${response.statusText}`.trim();
}

export async function getJSON(path) {
  const response = await call(path, { headers: { Accept: "application/json" } });
  return response.json();
}

// Server-sent events of a streamed answer, as parsed JSON objects ("[DONE]" ends them).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  while (true) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(UNREACHABLE);  // the connection dropped mid-answer
    }
    if (chunk.done) return;
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message || "the server failed this answer");
      yield event;
    }
  }
}

function post(path, body, signal) {
  return call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
    signal,
  });
}

/**
 * Stream an answer from /v1/chat/completions. `onText(textSoFar)` is called as it grows. Returns
 * {text, finish, stats}; stats: {prompt, cached, completion, ttft_s, tokens_per_s, total_s} from the server's
 * usage and timings.
 */
export async function streamChat(body, signal, onText) {
  const response = await post("v1/chat/completions", { ...body, stream: true, stream_options: { include_usage: true } }, signal);
  let text = "", finish = null, usage = null, timings = null;
  for await (const event of events(response)) {
    for (const choice of event.choices || []) {
      if (choice.delta && choice.delta.content) {
        text += choice.delta.content;
        onText(text);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (event.usage) usage = event.usage;
    if (event.timings) timings = event.timings;
  }
  const stats = usage && {
    prompt: usage.prompt_tokens,
    cached: (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0,
    completion: usage.completion_tokens,
    ttft_s: timings ? timings.prompt_ms / 1000 : null,
    tokens_per_s: timings ? timings.predicted_per_second : null,
    total_s: timings ? (timings.prompt_ms + timings.predicted_ms) / 1000 : null,
  };
  return { text, finish, stats };
}

/** Stream an answer about a stored state from vlcache's own /v1/vlcache/ask; the same result as streamChat. */
export async function streamAsk(body, signal, onText) {
  const response = await post("v1/vlcache/ask", { ...body, stream: true }, signal);
  let text = "", answer = null;
  for await (const event of events(response)) {
    if (event.text) {
      text += event.text;
      onText(text);
    }
    if (event.answer) answer = event.answer;
  }
  const stats = answer && {
    prompt: answer.prompt_tokens,
    cached: answer.cached_tokens,
    completion: answer.token_ids.length,
    ttft_s: answer.timings.ttft_s,
    tokens_per_s: answer.timings.tokens_per_s,
    total_s: answer.timings.total_s,
  };
  return { text, finish: answer && answer.finish_reason, stats };
}
