// A chat panel against a deployed model: OpenAI's /v1/chat/completions with the whole history, streamed
// (server-sent chunks read from fetch's body) or not. Disabled, with the reason, until the deployment is live.

import { describeError, request } from "../api";
import { clear, errorBox, h } from "../dom";

interface ChatMessage {
  role: "user" | "assistant" | "system";
  content: string;
}

export interface ChatPanel {
  el: HTMLElement;
  /** Enable the panel (null) or disable it, saying why. */
  setBlocked(reason: string | null): void;
  /** Abort a reply in flight (the page is left). */
  stop(): void;
}

/** One server-sent event's JSON (a chat.completion.chunk, or an error the gateway adds mid-stream). */
interface Chunk {
  choices?: { delta?: { content?: string | null }; finish_reason?: string | null }[];
  error?: { message?: string };
}

export function chatPanel(modelId: string, onAnswered: () => void): ChatPanel {
  const history: ChatMessage[] = [];
  let blocked: string | null = "Loading the deployment…";
  let busy = false;
  let controller: AbortController | null = null;

  const log = h("div", { class: "chat-log", "data-testid": "chat-log" });
  const reason = h("div", { class: "muted chat-reason", "data-testid": "chat-disabled-reason" });
  const errors = h("div", {});
  const input = h("textarea", {
    rows: 3,
    placeholder: "Ask the model something… (Enter sends, Shift+Enter is a new line)",
    "data-testid": "chat-input",
    onkeydown: (e: Event) => {
      const key = e as KeyboardEvent;
      if (key.key === "Enter" && !key.shiftKey) {
        e.preventDefault();
        void send();
      }
    },
  });
  const temperature = h("input", {
    type: "number",
    min: "0",
    max: "2",
    step: "0.1",
    value: "0.7",
    class: "small-num",
    "data-testid": "chat-temperature",
  });
  const maxTokens = h("input", {
    type: "number",
    min: "1",
    max: "4096",
    step: "1",
    value: "64",
    class: "small-num",
    "data-testid": "chat-max-tokens",
  });
  const stream = h("input", { type: "checkbox", checked: true, "data-testid": "chat-stream" });
  const sendButton = h("button", { class: "primary", "data-testid": "chat-send", onclick: () => void send() }, "Send");
  const clearButton = h(
    "button",
    {
      "data-testid": "chat-clear",
      onclick: () => {
        history.length = 0;
        clear(log);
        clear(errors);
      },
    },
    "Clear",
  );

  const el = h(
    "div",
    { class: "chat", "data-testid": "chat" },
    reason,
    log,
    errors,
    h(
      "div",
      { class: "chat-controls" },
      h("label", {}, "Temperature ", temperature),
      h("label", {}, "Max tokens ", maxTokens),
      h("label", {}, stream, " Stream"),
      h("span", { class: "spacer" }),
      clearButton,
      sendButton,
    ),
    input,
  );

  function sync(): void {
    const off = blocked !== null || busy;
    input.disabled = blocked !== null;
    sendButton.disabled = off;
    reason.textContent = blocked ?? "";
    reason.hidden = blocked === null;
    sendButton.textContent = busy ? "Answering…" : "Send";
  }

  function bubble(message: ChatMessage, testid?: string): HTMLElement {
    const text = h("div", { class: "chat-text", "data-testid": testid }, message.content);
    const item = h("div", { class: `chat-msg chat-${message.role}` }, h("div", { class: "chat-role" }, message.role), text);
    log.append(item);
    log.scrollTop = log.scrollHeight;
    return text;
  }

  function numberOf(field: HTMLInputElement, name: string): number {
    const n = Number(field.value);
    if (field.value.trim() === "" || !Number.isFinite(n)) throw new Error(`${name} must be a number`);
    return n;
  }

  async function send(): Promise<void> {
    const text = input.value.trim();
    if (!text || blocked !== null || busy) return;
    clear(errors);
    let body: Record<string, unknown>;
    try {
      body = {
        model: modelId,
        messages: [...history, { role: "user", content: text }],
        temperature: numberOf(temperature, "Temperature"),
        max_tokens: numberOf(maxTokens, "Max tokens"),
        stream: stream.checked,
      };
    } catch (err) {
      clear(errors, errorBox(describeError(err)));
      return;
    }
    history.push({ role: "user", content: text });
    bubble({ role: "user", content: text });
    input.value = "";
    busy = true;
    sync();
    const answer: ChatMessage = { role: "assistant", content: "" };
    const target = bubble(answer, "chat-answer");
    target.classList.add("pending");
    controller = new AbortController();
    try {
      const resp = await request("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (body.stream && resp.body) {
        await readStream(resp.body, (piece) => {
          answer.content += piece;
          target.textContent = answer.content;
          log.scrollTop = log.scrollHeight;
        });
      } else {
        const done = (await resp.json()) as { choices?: { message?: { content?: string | null } }[] };
        answer.content = done.choices?.[0]?.message?.content ?? "";
        target.textContent = answer.content;
      }
      target.dataset.chars = String(answer.content.length); // what the model said, before any placeholder
      if (!answer.content) target.textContent = "(an empty answer)";
      history.push(answer);
      onAnswered();
    } catch (err) {
      target.parentElement?.remove();
      history.pop(); // the question stays shown, but is not sent again as if answered
      log.lastElementChild?.classList.add("chat-failed");
      clear(errors, errorBox(describeError(err)));
    } finally {
      target.classList.remove("pending");
      controller = null;
      busy = false;
      sync();
    }
  }

  sync();
  return {
    el,
    setBlocked(why: string | null): void {
      blocked = why;
      sync();
    },
    stop(): void {
      controller?.abort();
    },
  };
}

/** Reads `data: {...}` events until `data: [DONE]`, handing each delta's text to onText. */
async function readStream(body: ReadableStream<Uint8Array>, onText: (text: string) => void): Promise<void> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    buffer += decoder.decode(value ?? new Uint8Array(), { stream: !done });
    let end: number;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data) as Chunk;
      if (chunk.error) throw new Error(`the model's worker failed mid-answer: ${chunk.error.message ?? data}`);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) onText(piece);
    }
    if (done) {
      if (buffer.trim()) throw new Error("the answer's stream ended mid-event");
      return;
    }
  }
}
