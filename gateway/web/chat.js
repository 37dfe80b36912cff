// The mmserve chat page: plain browser APIs only, so it works offline and behind any proxy.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "mmserve.apiKey";
const AUDIO_FORMATS = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav",
                        "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac",
                        "audio/ogg": "ogg", "audio/webm": "webm" };

const conversation = [];  // OpenAI messages sent so far
let pending = [];     // content parts attached to the next message
let controller = null;  // aborts the running request; the gateway then cancels generation
// Media already sent are resent as the `mm://sha256:` handles the gateway returned for them
// (X-Media-Handles), not as bytes; each handle part maps back to the part it stands for, in
// case the encoder has evicted it.
const originals = new Map();

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

function setStatus(text) { $("status").textContent = text; }

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const { data } = await response.json();
    select.replaceChildren(...data.map((model) => new Option(model.id, model.id)));
    setStatus("");
  } catch (error) {
    setStatus(`Could not list models: ${error.message}`);
  }
}

function addMessage(role, parts) {
  const box = document.createElement("div");
  box.className = `msg ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  box.append(label);
  for (const part of parts.filter((p) => p.type !== "text")) {
    if (part.type === "image_url") {
      const img = document.createElement("img");
      img.src = part.image_url.url;
      img.alt = "attached image";
      box.append(img);
    } else {
      const note = document.createElement("div");
      note.textContent = `[audio: ${part.input_audio.format}]`;
      box.append(note);
    }
  }
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = parts.filter((p) => p.type === "text").map((p) => p.text).join("\n");
  box.append(content);
  $("history").append(box);
  box.scrollIntoView({ block: "end" });
  return { box, content };
}

function addNote(box, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  box.append(note);
}

// A tool call as the page shows it: the function's name and its arguments (JSON text).
function showToolCall(box, call) {
  const block = document.createElement("div");
  block.className = "tool-call";
  const name = document.createElement("div");
  name.className = "tool-name";
  name.textContent = `tool call: ${call.function.name}`;
  const args = document.createElement("pre");
  args.className = "tool-args";
  args.textContent = call.function.arguments;
  block.append(name, args);
  box.append(block);
  return args;
}

// Adds a streamed tool-call delta to the calls so far (OpenAI's chunk format: the first delta
// of a call carries its id and name, the later ones argument fragments).
function addToolCallDelta(calls, shown, box, delta) {
  let call = calls[delta.index];
  if (!call) {
    call = { id: delta.id || "", type: "function",
             function: { name: (delta.function && delta.function.name) || "", arguments: "" } };
    calls[delta.index] = call;
    shown[delta.index] = showToolCall(box, call);
  }
  call.function.arguments += (delta.function && delta.function.arguments) || "";
  shown[delta.index].textContent = call.function.arguments;
}

function mediaParts() {
  return conversation.filter((m) => Array.isArray(m.content))
    .flatMap((m) => m.content.filter((p) => p.type !== "text"));
}

function useHandles(handles) {
  if (handles.length !== mediaParts().length) return;
  let next = 0;
  for (const message of conversation.filter((m) => Array.isArray(m.content))) {
    message.content = message.content.map((part) => {
      if (part.type === "text") return part;
      const url = handles[next++];
      if (originals.has(part)) return part;  // already a handle
      const handle = part.type === "image_url"
        ? { type: "image_url", image_url: { url } }
        : { type: "audio_url", audio_url: { url } };
      originals.set(handle, part);
      return handle;
    });
  }
}

function dropHandles() {
  for (const message of conversation.filter((m) => Array.isArray(m.content))) {
    message.content = message.content.map((part) => originals.get(part) || part);
  }
  originals.clear();
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function renderAttachments() {
  $("attachments").replaceChildren(...pending.map((part, index) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    if (part.type === "image_url") {
      const img = document.createElement("img");
      img.src = part.image_url.url;
      img.alt = "image to send";
      chip.append(img);
    } else {
      chip.append(`audio (${part.input_audio.format})`);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove";
    remove.onclick = () => { pending.splice(index, 1); renderAttachments(); };
    chip.append(remove);
    return chip;
  }));
}

async function attachImage(file) {
  pending.push({ type: "image_url", image_url: { url: await readAsDataURL(file) } });
  renderAttachments();
}

async function attachAudio(file) {
  const extension = file.name.split(".").pop().toLowerCase();
  const format = AUDIO_FORMATS[file.type] || extension || "wav";
  const url = await readAsDataURL(file);
  pending.push({ type: "input_audio",
                 input_audio: { data: url.slice(url.indexOf(",") + 1), format } });
  renderAttachments();
}

// Yields the JSON payload of each `data:` event of an SSE body until `[DONE]`.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send() {
  const text = $("message").value.trim();
  if (!text && pending.length === 0) return;
  const parts = [...pending];
  if (text) parts.push({ type: "text", text });
  const message = { role: "user", content: parts };
  conversation.push(message);
  addMessage("user", parts);
  $("message").value = "";
  pending = [];
  renderAttachments();

  const reply = addMessage("assistant", []);
  controller = new AbortController();
  setBusy(true);
  setStatus("Generating…");
  let answer = "";
  const toolCalls = [];
  const shownCalls = [];
  const request = { model: $("model").value || undefined, messages: conversation,
                    stream: true, max_tokens: Number($("max-tokens").value) || 256 };
  if ($("json-mode").checked) request.response_format = { type: "json_object" };
  const post = () => fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal: controller.signal,
    body: JSON.stringify(request),
  });
  try {
    let response = await post();
    if (response.status === 404 && originals.size) {  // a handle was evicted: send the bytes
      dropHandles();
      response = await post();
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    const handles = response.headers.get("X-Media-Handles");
    if (handles) useHandles(handles.split(", "));
    for await (const event of sseEvents(response.body)) {
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices || []) {
        answer += (choice.delta && choice.delta.content) || "";
        for (const delta of (choice.delta && choice.delta.tool_calls) || []) {
          addToolCallDelta(toolCalls, shownCalls, reply.box, delta);
        }
        if (choice.finish_reason === "length") addNote(reply.box, "(stopped at max tokens)");
      }
      reply.content.textContent = answer;
    }
    setStatus("");
  } catch (error) {
    if (error.name === "AbortError") {
      addNote(reply.box, "(stopped)");
      setStatus("Stopped.");
    } else {
      reply.box.classList.add("error");
      addNote(reply.box, error.message);
      setStatus("");
      conversation.pop();  // the failed turn is not resent with the next message
    }
  } finally {
    if (toolCalls.length) {
      conversation.push({ role: "assistant", content: answer || null, tool_calls: toolCalls });
    } else if (answer) {
      conversation.push({ role: "assistant", content: answer });
    }
    controller = null;
    setBusy(false);
  }
}

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !$("send").disabled) {
      event.preventDefault();
      send();
    }
  });
  $("message").addEventListener("paste", (event) => {
    for (const item of event.clipboardData.items) {
      if (item.kind === "file" && item.type.startsWith("image/")) attachImage(item.getAsFile());
    }
  });
  $("image-input").addEventListener("change", async (event) => {
    for (const file of event.target.files) await attachImage(file);
    event.target.value = "";
  });
  $("audio-input").addEventListener("change", async (event) => {
    for (const file of event.target.files) await attachAudio(file);
    event.target.value = "";
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation.length = 0;
    $("history").replaceChildren();
  });
  loadModels();
}

init();
