/* parley.js: a small dependency-free client for Parley's WebSocket protocol (docs/protocol.md).
 *
 *   const chat = new Parley.Client({url: "wss://host/api/v1/pipelines/default/ws/connect", token});
 *   chat.on("delta", e => render(e.message_id, e.content));
 *   chat.on("final", e => done(e.message_id, e.content, e.status));
 *   chat.connect();
 *   await chat.send("hello");          // resolves with the ack: {message_id, reply_message_id, ...}
 *
 * It reconnects on its own (exponential backoff with full jitter, 0.5 s to 20 s), resends unacknowledged messages
 * with the same client_msg_id (the server makes that idempotent), resumes every unfinished reply from the
 * offsets it holds, and drops anything it has already seen. Offsets count Unicode code points, as Python's
 * len() does; JS strings are UTF-16, so all offset arithmetic here iterates code points.
 *
 * Events: "message" (user_message), "delta", "rewind" (text streamed past the reply's last stored point was
 * lost with its server: `content` is what remains, the next deltas continue it), "final", "status" (connection
 * and reply states), "error",
 * "connected" (the connected frame), and every other server frame under its own type ("presence", "push",
 * "broadcast", "session.left", "stop_ack", ...) with the whole frame. A "status" event of a connection that is
 * reconnecting carries `retry_at` (epoch ms of the next attempt), for a countdown; a "closed" one carries the
 * close `code` (4401: the credentials were refused, 1000: close() was called).
 *
 * Reply statuses, close and error codes come from static/protocol.js (generated from the server's tables): load
 * it first (a <script> before this one; Node: it is require()d). `Parley.protocol` is that table.
 */
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory(require("./protocol.js"));
  else root.Parley = factory(root.ParleyProtocol);
})(typeof self !== "undefined" ? self : this, function (P) {
  "use strict";

  function cpLength(s) {
    let n = 0;
    for (const _ of s) n++; // eslint-disable-line no-unused-vars
    return n;
  }

  function cpSlice(s, start) {
    return start <= 0 ? s : Array.from(s).slice(start).join("");
  }

  /* Full jitter: uniform in [min, min(max, min * 2^(attempt+1))]. */
  function backoff(attempt, opts) {
    const o = Object.assign({min: 500, max: 20000, random: Math.random}, opts);
    const ceiling = Math.min(o.max, o.min * Math.pow(2, attempt + 1));
    return o.min + o.random() * (ceiling - o.min);
  }

  function newId() {
    const c = typeof crypto !== "undefined" ? crypto : null;
    if (c && c.randomUUID) return c.randomUUID();
    return "c-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
  }

  /* What the client holds of one reply. Appends only what lies beyond what it has: never twice, never a gap. */
  class Reply {
    constructor(id) {
      this.id = id;
      this.text = "";
      this.thinking = "";
      this.length = 0;          // code points of text
      this.thinkingLength = 0;
      this.status = P.STATUS.QUEUED;
      this.final = false;
      this.epoch = null;        // whose text it holds: the owner that generated it (status, rewind, resumed)
    }

    /* Returns the new part {text, thinking}, or null if it was all seen; throws "gap" if text is missing. */
    apply(data) {
      const out = {text: "", thinking: ""};
      if (typeof data.delta === "string") out.text = this._take("text", "length", data.offset, data.delta);
      if (typeof data.thinking_delta === "string") {
        out.thinking = this._take("thinking", "thinkingLength", data.thinking_offset, data.thinking_delta);
      }
      return out.text || out.thinking ? out : null;
    }

    _take(field, lengthField, offset, piece) {
      if (offset > this[lengthField]) throw new Error("gap");
      const fresh = cpSlice(piece, this[lengthField] - offset);
      this[field] += fresh;
      this[lengthField] += cpLength(fresh);
      return fresh;
    }

    offsets() {
      const o = {offset: this.length, thinking_offset: this.thinkingLength};
      if (this.epoch !== null) o.epoch = this.epoch;
      return o;
    }

    /* Text past (offset, thinkingOffset) was never stored (its server died): drop it. True if anything went. */
    rewind(offset, thinkingOffset) {
      let cut = false;
      if (offset < this.length) {
        this.text = Array.from(this.text).slice(0, offset).join("");
        this.length = offset;
        cut = true;
      }
      if (thinkingOffset < this.thinkingLength) {
        this.thinking = Array.from(this.thinking).slice(0, thinkingOffset).join("");
        this.thinkingLength = thinkingOffset;
        cut = true;
      }
      return cut;
    }
  }

  class Client {
    constructor(options) {
      this.o = Object.assign({
        token: null,
        pingInterval: 15000,     // app-level ping while idle
        stallTimeout: 40000,     // no frame (or pong) for this long: the connection is dead, reconnect
        minDelay: 500,
        maxDelay: 20000,
        WebSocket: typeof WebSocket !== "undefined" ? WebSocket : null,
        setTimeout: (f, ms) => setTimeout(f, ms),
        clearTimeout: (t) => clearTimeout(t),
        now: () => Date.now(),
        random: Math.random,
        document: typeof document !== "undefined" ? document : null,
      }, options);
      this.url = this.o.url + (this.o.url.includes("?") ? "&" : "?") + "stream_mode=delta";
      this.handlers = {};
      this.replies = new Map();  // message_id -> Reply
      this.pending = new Map();  // client_msg_id -> {frame, resolve, reject}
      this.ws = null;
      this.state = "idle";       // idle | connecting | open | closed
      this.attempt = 0;
      this.sessionId = options.sessionId || null;
      this.lastFrame = 0;
      this.timers = {};
      this.stopped = false;
      if (this.o.document) {
        this.o.document.addEventListener("visibilitychange", () => this._onVisible());
      }
    }

    on(event, fn) {
      (this.handlers[event] = this.handlers[event] || []).push(fn);
      return this;
    }

    _emit(event, payload) {
      for (const fn of this.handlers[event] || []) fn(payload);
    }

    connect() {
      this.stopped = false;
      this._open();
    }

    close() {
      this.stopped = true;
      this._clearTimers();
      if (this.ws) this.ws.close(P.CLOSE.NORMAL, "client closed");
      this._setState("closed");
    }

    /* Send a message; resolves with its ack (also across reconnects: it is resent with the same client_msg_id). */
    send(text, extra) {
      const clientMsgId = (extra && extra.client_msg_id) || newId();
      const frame = Object.assign({type: "message", message: [{type: "Plain", text}]}, extra,
        {client_msg_id: clientMsgId});
      return new Promise((resolve, reject) => {
        this.pending.set(clientMsgId, {frame, resolve, reject});
        if (this.state === "open") this._write(frame);
      });
    }

    stop(messageId) {
      this._write(messageId ? {type: "stop", message_id: messageId} : {type: "stop"});
    }

    reply(messageId) {
      return this.replies.get(messageId);
    }

    /* Send any other frame (presence, session.join...); false if the socket is not open (it is not queued). */
    request(frame) {
      if (this.state !== "open") return false;
      this._write(frame);
      return true;
    }

    /* Reconnect now instead of waiting out the backoff (a "retry now" button). */
    retryNow() {
      if (this.state !== "reconnecting" || this.stopped) return;
      this.o.clearTimeout(this.timers.retry);
      this._open();
    }

    // connection lifecycle

    _open() {
      this._clearTimers();
      this._setState("connecting");
      const url = this.sessionId ? this.url + "&session_id=" + encodeURIComponent(this.sessionId) : this.url;
      const ws = this.ws = new this.o.WebSocket(url, "parley.v1");  // opt in to Parley's frames (docs/langbot.md)
      ws.onopen = () => {
        if (ws !== this.ws) return;
        if (this.o.token) ws.send(JSON.stringify({type: "authenticate", token: this.o.token}));
        this.lastFrame = this.o.now();
        this._watch();
      };
      ws.onmessage = (event) => {
        if (ws === this.ws) this._receive(event.data);
      };
      ws.onclose = (event) => {
        if (ws === this.ws) this._lost(event && event.code);
      };
      ws.onerror = () => {};  // onclose follows
    }

    _lost(code) {
      this._clearTimers();
      this.ws = null;
      if (this.stopped || P.NO_RETRY.includes(code)) {
        this.closeCode = this.stopped ? P.CLOSE.NORMAL : code;
        this._setState("closed");  // fatal: credentials or parameters will not get better by retrying
        return;
      }
      const delay = backoff(this.attempt++, {min: this.o.minDelay, max: this.o.maxDelay, random: this.o.random});
      this.retryAt = this.o.now() + delay;
      this._setState("reconnecting", true);
      this.timers.retry = this.o.setTimeout(() => this._open(), delay);
    }

    _drop() {
      /* Give up on a socket that looks dead; its late events are ignored. */
      const ws = this.ws;
      if (!ws) return;
      this.ws = null;
      try { ws.close(4000, "stalled"); } catch (e) { /* already closing */ }
      this._lost(4000);
    }

    _watch() {
      this.timers.ping = this.o.setTimeout(() => {
        if (this.o.now() - this.lastFrame >= this.o.stallTimeout) {
          this._drop();
          return;
        }
        this._write({type: "ping"});
        this._watch();
      }, Math.min(this.o.pingInterval, this.o.stallTimeout));
    }

    _onVisible() {
      if (this.o.document.visibilityState !== "visible" || this.stopped) return;
      if (this.state === "reconnecting") {  // do not wait out the backoff when the user is looking
        this.o.clearTimeout(this.timers.retry);
        this._open();
      } else if (this.state === "open") {
        this._write({type: "ping"});  // a tab woken from sleep may hold a dead socket: the stall timer decides
      }
    }

    _clearTimers() {
      for (const t of Object.values(this.timers)) this.o.clearTimeout(t);
      this.timers = {};
    }

    _setState(state, always) {
      if (this.state === state && !always) return;
      this.state = state;
      const event = {connection: state};
      if (state === "reconnecting") event.retry_at = this.retryAt;
      if (state === "closed") event.code = this.closeCode;  // 4401: sign in again
      this._emit("status", event);
    }

    _write(frame) {
      if (this.ws && this.state === "open") this.ws.send(JSON.stringify(frame));
    }

    // frames

    _receive(raw) {
      this.lastFrame = this.o.now();
      let frame;
      try { frame = JSON.parse(raw); } catch (e) { return; }
      const data = frame.data || {};
      switch (frame.type) {
        case "connected": return this._connected(frame);
        case "ack": return this._ack(data);
        case "user_message": return this._emit("message", data);
        case "response": return data.is_final ? this._final(data) : this._delta(data);
        case "status":
          this._epoch(data);
          return this._status(data.message_id, data.status, data);
        case "rewind": return this._rewind(data);
        case "resumed":
          for (const r of data.replies) {
            this._cut(r, r.offset, r.thinking_offset, "resumed");  // where this connection continues
            this._status(r.message_id, r.status);
          }
          return;
        case "reconnect": return this._drop();
        case "error": return this._error(frame);
        case "pong": return;
        default: return this._emit(frame.type, frame);  // presence, push, broadcast, ...: for the app
      }
    }

    _connected(frame) {
      this.sessionId = frame.session_id;
      this.attempt = 0;
      this._setState("open");
      this._emit("connected", frame);
      // One resume for the whole session: every reply we hold unfinished (it may have ended meanwhile), plus
      // any live reply we do not know yet (another tab's).
      this._resumeAll();
      for (const p of this.pending.values()) this._write(p.frame);
    }

    _resumeAll() {
      const offsets = {};
      for (const r of this.replies.values()) if (!r.final) offsets[r.id] = r.offsets();
      this._write({type: "resume", session_id: this.sessionId, offsets});
    }

    _ack(data) {
      const p = this.pending.get(data.client_msg_id);
      if (data.reply_message_id && !this.replies.has(data.reply_message_id)) {
        const r = new Reply(data.reply_message_id);
        this.replies.set(r.id, r);
        // A resent message the server already had: its reply may have ended while we were away (no final
        // will come by itself), so ask for it; a live one's repeat is trimmed by its offsets.
        if (data.duplicate) this._write(Object.assign({type: "resume", message_id: r.id}, r.offsets()));
      }
      if (p) {
        this.pending.delete(data.client_msg_id);
        p.resolve(data);
      }
    }

    _reply(id) {
      let r = this.replies.get(id);
      if (!r) this.replies.set(id, r = new Reply(id));
      return r;
    }

    _delta(data) {
      const r = this._reply(data.message_id);
      if (r.final) return;
      let fresh;
      try {
        fresh = r.apply(data);
      } catch (e) {  // a gap: ask for everything after what we hold
        this._write(Object.assign({type: "resume", message_id: r.id}, r.offsets()));
        return;
      }
      if (!fresh) return;
      r.status = P.STATUS.STREAMING;
      this._emit("delta", {message_id: r.id, session_id: data.session_id, seq: data.seq, reply_to: data.reply_to,
        text: fresh.text,
        thinking: fresh.thinking, content: r.text, thinking_content: r.thinking, offset: r.length});
    }

    /* The epoch of a reply we hold no text of yet: the text that comes is that owner's. */
    _epoch(data) {
      const r = this._reply(data.message_id);
      if (!r.length && !r.thinkingLength) r.epoch = data.epoch;
    }

    _rewind(data) {
      const r = this._reply(data.message_id);
      if (r.epoch !== null && data.epoch < r.epoch) return;  // an instance behind us: we hold a newer owner's
      this._cut(data, data.offset, data.thinking_offset, data.reason);
    }

    /* Text past (offset, thinkingOffset) is void: drop it, take the epoch, tell the app if anything went. */
    _cut(data, offset, thinkingOffset, reason) {
      const r = this._reply(data.message_id);
      if (r.final) return;
      if (data.epoch !== undefined) r.epoch = data.epoch;
      if (!r.rewind(offset, thinkingOffset)) return;
      this._emit("rewind", {message_id: r.id, session_id: data.session_id, seq: data.seq, reply_to: data.reply_to,
        reason, content: r.text, thinking_content: r.thinking, offset: r.length});
    }

    _final(data) {
      const r = this._reply(data.message_id);
      if (r.final) return;  // the one terminal frame, even if a resume repeats it
      r.final = true;
      r.status = data.status;
      r.text = data.content;  // authoritative (after a crash it may be shorter than what streamed)
      r.length = cpLength(r.text);
      r.thinking = data.thinking || r.thinking;
      r.thinkingLength = cpLength(r.thinking);
      this._emit("final", {message_id: r.id, session_id: data.session_id, seq: data.seq, reply_to: data.reply_to,
        status: data.status,
        content: r.text, thinking: r.thinking, error: data.error || null});
    }

    _status(id, status, data) {
      const r = this._reply(id);
      if (r.final) return;
      r.status = status;
      const d = data || {};
      this._emit("status", {message_id: id, status, seq: d.seq, reply_to: d.reply_to});
    }

    /* A new reply to the question reply `messageId` answered, replacing it (the session's latest reply; the
     * server refuses any other: an "error" event with request_type "regenerate"). False if not connected. */
    regenerate(messageId) {
      return this.request({type: "regenerate", message_id: messageId});
    }

    _error(frame) {
      if (frame.request_type === "message" && frame.client_msg_id) {
        const p = this.pending.get(frame.client_msg_id);
        if (p) {  // a definite answer: the caller decides whether to try again (e.g. session_busy)
          this.pending.delete(frame.client_msg_id);
          p.reject(frame);
        }
      } else if (frame.request_type === "resume" && frame.code === P.ERROR.MESSAGE_NOT_FOUND &&
                 this.replies.delete(frame.message_id)) {
        this._resumeAll();  // that reply is gone (session reset): resume the rest without it
      }
      this._emit("error", frame);
    }
  }

  return {Client, Reply, backoff, cpLength, cpSlice, protocol: P};
});
