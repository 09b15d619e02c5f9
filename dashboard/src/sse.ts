// Server-Sent Events read with fetch and a stream reader: EventSource can't send the Authorization header.
// Reconnects after a dropped stream, resuming after the last event id (Last-Event-ID), until stopped.

import { ApiError, describeError, request } from "./api";

export interface SseMessage {
  id: string;
  event: string;
  data: string;
}

/** Splits a text/event-stream into messages; feed it chunks as they come. */
export class SseParser {
  private buffer = "";
  private id = "";
  private event = "";
  private data: string[] = [];

  feed(chunk: string, emit: (m: SseMessage) => void): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + (this.buffer.startsWith("\r\n", nl) ? 2 : 1));
      this.line(line, emit);
    }
  }

  private line(line: string, emit: (m: SseMessage) => void): void {
    if (line === "") {
      if (this.data.length) emit({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment: the server's keepalive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id") this.id = value;
  }
}

export interface StreamHandlers {
  message(m: SseMessage): void;
  /** The stream's state for the page: "live", "reconnecting: why", or an error that ends it. */
  status(text: string, kind: "live" | "retry" | "error" | "ended"): void;
  /** Asked when the stream ends by itself: true to reconnect (the job is still going). */
  shouldReconnect(): boolean;
}

export function streamEvents(path: string, handlers: StreamHandlers): () => void {
  const abort = new AbortController();
  let lastId = "";
  let stopped = false;

  const run = async () => {
    let delay = 1000;
    while (!stopped) {
      try {
        const resp = await request(path, {
          signal: abort.signal,
          headers: { Accept: "text/event-stream", ...(lastId ? { "Last-Event-ID": lastId } : {}) },
        });
        if (!resp.body) throw new Error("the response has no body to stream");
        handlers.status("live", "live");
        delay = 1000;
        const parser = new SseParser();
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.feed(value, (m) => {
            if (m.id) lastId = m.id;
            handlers.message(m);
          });
        }
        if (!handlers.shouldReconnect()) {
          handlers.status("stream ended: the job is over", "ended");
          return;
        }
        handlers.status("stream ended; reconnecting", "retry");
      } catch (err) {
        if (stopped) return;
        // A refusal (bad key, no such job, no access) won't change on a retry: show it and stop.
        if (err instanceof ApiError && err.status >= 400 && err.status < 500) {
          handlers.status(describeError(err), "error");
          return;
        }
        handlers.status(`stream lost (${describeError(err)}); reconnecting`, "retry");
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 15000);
    }
  };
  void run();
  return () => {
    stopped = true;
    abort.abort();
  };
}
