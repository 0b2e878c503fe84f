/* Parley's web app, on static/parley.js (the reconnecting client) and the REST API (docs/protocol.md).
 *
 * Signing in (Jupyter's pattern): the token (from the start-up URL, which token.js takes out of the address bar, or
 * typed) is posted once to /api/v1/auth/cookie, which sets an HttpOnly, SameSite=Strict cookie; from then on every
 * request and WebSocket of this browser carries it, so every tab is signed in. The page never keeps the token.
 *
 * Model output reaches the DOM only through renderMarkdown(): marked turns it into HTML, DOMPurify sanitizes
 * that into a DOM fragment. Everything else a user or a model wrote is set as textContent.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "parley.token";      // the start-up URL's token, from token.js until it becomes the cookie
  const SIGNOUT_KEY = "parley.signout";  // set on Sign out: the other tabs of this browser sign out too
  const PIPELINE_KEY = "parley.pipeline";
  const PAGE = 30;              // history messages per page (scrolling up loads the next one)
  const RENDER_EVERY = 50;      // ms between re-renders of a streaming reply
  const PROTOCOL = Parley.protocol;  // reply statuses, close and error codes (static/protocol.js, generated)
  const STATUS_TEXT = {[PROTOCOL.STATUS.STOPPED]: "Stopped", [PROTOCOL.STATUS.FAILED]: "Failed",
    [PROTOCOL.STATUS.TIMEOUT]: "Timed out", [PROTOCOL.STATUS.INTERRUPTED]: "Interrupted"};
  const LIVE = new Set(PROTOCOL.LIVE);
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];  // what the server takes
  const MAX_PICKED = 20 * 1024 * 1024;  // bytes of a chosen file, before it is shrunk to fit
  const MAX_IMAGES = 4;                 // per message
  const MAX_SIDE = 2048;                // px: a shrunk photo's longest side at most
  const DATA_IMAGE = /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}$/;

  const $ = (id) => document.getElementById(id);
  const state = {
    user: null, isAdmin: false, pipelines: [], pipeline: null, sessions: [], session: null,
    client: null, msgs: new Map(), pending: new Map(), oldestSeq: null, moreHistory: false, loadingOlder: false,
    online: [], countdown: null, generation: 0, attachments: [], shownVersion: new Map(), connection: "connecting",
    limits: {max_message_size: 64 * 1024, max_body_size: 1024 * 1024, max_image_size: 512 * 1024},
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  }

  // --- Markdown: marked -> DOMPurify -> a DOM fragment. The only way model output reaches the page.

  function configureMarkdown() {
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
  }

  /* While a reply streams, its Markdown may stop mid-construct (`**How to try` before the bold closes, a code
   * fence not closed yet): close what is open, for display only, as chat apps do; an opener with nothing after it
   * yet is left out. The text itself is never changed. */
  function closeOpenMarkdown(text) {
    let fence = null;
    let tailStart = 0;
    let offset = 0;
    for (const line of text.split("\n")) {
      const m = /^ {0,3}(`{3,}|~{3,})/.exec(line);
      if (m && !fence) fence = m[1];
      else if (m && line.trim()[0] === fence[0] && /^(`+|~+)$/.test(line.trim()) && line.trim().length >= fence.length) {
        fence = null;
        tailStart = offset + line.length + 1;
      }
      if (!m && !fence && line.trim() === "") tailStart = offset + line.length + 1;
      offset += line.length + 1;
    }
    if (fence) return text + (text.endsWith("\n") ? "" : "\n") + fence;
    const open = [];  // markers still open in the last paragraph: {marker, at}
    const word = (ch) => ch !== undefined && /[\p{L}\p{N}]/u.test(ch);
    const space = (ch) => ch === undefined || /\s/.test(ch);
    for (let i = tailStart; i < text.length;) {
      const c = text[i];
      if (c === "\\") { i += 2; continue; }
      let n = 1;
      while (text[i + n] === c) n++;
      if (c === "`") {
        const close = text.indexOf(c.repeat(n), i + n);
        if (close < 0) { open.push({marker: c.repeat(n), at: i}); break; }  // inside inline code: nothing counts
        i = close + n;
        continue;
      }
      if (c !== "*" && c !== "_" && c !== "~") { i++; continue; }
      const before = text[i - 1], after = text[i + n];
      const bullet = c === "*" && n === 1 && (i === 0 || before === "\n") && after === " ";
      if (bullet || (c === "~" && n < 2) || (c === "_" && word(before) && word(after))) { i += n; continue; }
      const runs = c === "~" ? [c + c] : n >= 3 ? [c + c, c] : [c.repeat(n)];
      for (const marker of runs) {
        const k = open.findIndex((o) => o.marker === marker);
        if (k >= 0 && !space(before)) open.splice(k, 1);
        else if (k < 0 && !space(after)) open.push({marker, at: i});
      }
      i += n;
    }
    let end = text.length;
    while (open.length && !text.slice(open[open.length - 1].at + open[open.length - 1].marker.length, end).trim()) {
      end = open.pop().at;  // an opener with nothing after it yet: not shown
    }
    const dangling = /(^|\s)[*_~`]+\s*$/.exec(text.slice(0, end));  // markers that can only open: not yet
    if (dangling) end = dangling.index + dangling[1].length;
    return text.slice(0, end).trimEnd() + open.reverse().map((o) => o.marker).join("");
  }

  function renderMarkdown(text) {
    const html = window.marked.parse(text, {gfm: true, breaks: true, async: false});
    return window.DOMPurify.sanitize(html, {
      RETURN_DOM_FRAGMENT: true, FORBID_ATTR: ["style"],
      FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
    });
  }

  function addCopyButtons(body) {
    for (const pre of body.querySelectorAll("pre")) {
      const code = pre.querySelector("code") || pre;
      const button = el("button", {type: "button", class: "copy", "aria-label": "Copy code", text: "Copy"});
      button.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(code.textContent);
          button.textContent = "Copied";
        } catch (e) {
          const range = document.createRange();  // no clipboard access: select it for Ctrl+C
          range.selectNodeContents(code);
          getSelection().removeAllRanges();
          getSelection().addRange(range);
          button.textContent = "Press Ctrl+C";
        }
        setTimeout(() => { button.textContent = "Copy"; }, 1500);
      });
      pre.append(button);
    }
  }

  // --- REST

  /* A REST call with this browser's sign-in cookie (or, to sign in, `token` as a Bearer credential). A 401
   * while signed in means the sign-in ended (signed out elsewhere, a new token after a restart): back to sign-in. */
  async function api(path, options) {
    const o = options || {};
    const headers = {Accept: "application/json"};
    if (o.token) headers.Authorization = "Bearer " + o.token;
    const form = o.body instanceof FormData;  // an upload: the browser sets the multipart Content-Type
    if (o.body !== undefined && !form) headers["Content-Type"] = "application/json";
    const res = await fetch(path, {method: o.method || "GET", headers, cache: "no-store", credentials: "same-origin",
      body: o.body === undefined || form ? o.body : JSON.stringify(o.body)});
    if (res.status === 401 && state.user && !o.signingIn) leave("Your sign-in was not accepted any more: sign in again.");
    let payload = null;
    try { payload = await res.json(); } catch (e) { /* not JSON */ }
    if (!res.ok) {
      const err = new Error((payload && payload.message) || res.statusText || "request failed");
      err.status = res.status;
      err.code = payload && payload.code;
      throw err;
    }
    return payload && payload.data;
  }

  const P = () => "/api/v1/pipelines/" + encodeURIComponent(state.pipeline);
  const S = (id) => P() + "/sessions/" + encodeURIComponent(id || state.session.session_id);

  // --- notices (errors, broadcasts, pushes): text only, dismissable

  function notice(kind, text, key) {
    const box = $("notices");
    if (key) for (const n of box.querySelectorAll("[data-key]")) if (n.dataset.key === key) n.remove();
    const close = el("button", {type: "button", class: "link", "aria-label": "Dismiss", text: "Dismiss"});
    const node = el("div", {class: "notice " + kind, role: kind === "error" ? "alert" : "status"},
      el("span", {class: "kind", text: {error: "Error", broadcast: "Broadcast", push: "Message", info: "Note"}[kind] + ":"}),
      el("span", {class: "text", text}), close);
    if (key) node.dataset.key = key;
    close.addEventListener("click", () => node.remove());
    box.append(node);
    return node;
  }

  // --- sign in

  function showSignin(message) {
    $("app").hidden = true;
    $("signin").hidden = false;
    const err = $("signin-error");
    err.hidden = !message;
    err.textContent = message || "";
    $("signin-token").focus();
  }

  /* Trade a token (or JWT) for the sign-in cookie, then enter. */
  async function signIn(token) {
    await api("/api/v1/auth/cookie", {method: "POST", token, signingIn: true});
    await enter();
  }

  /* With the cookie: who we are, the pipelines, then the conversation in the address (or the newest). */
  async function enter() {
    const root = await api("/", {signingIn: true});
    state.user = root.user_id;
    state.pipelines = root.pipelines;
    if (root.limits) state.limits = root.limits;
    $("whoami").textContent = root.user_id;
    const select = $("pipeline");
    select.replaceChildren(...root.pipelines.map((p) => el("option", {value: p.id, text: p.name || p.id})));
    $("signin").hidden = true;
    $("app").hidden = false;
    const wanted = route().pipeline || localStorage.getItem(PIPELINE_KEY);
    const first = root.pipelines.find((p) => p.id === wanted) || root.pipelines[0];
    if (first) await openPipeline(first.id, route().session);
  }

  async function signOut() {
    try {
      await api("/api/v1/auth/cookie", {method: "DELETE", signingIn: true});
    } catch (e) { /* offline: the cookie stays until the server answers; this tab signs out all the same */ }
    try { localStorage.setItem(SIGNOUT_KEY, String(Date.now())); } catch (e) { /* other tabs learn at their next request */ }
    leave();
  }

  function leave(message) {
    closeClient();
    state.user = null;
    history.replaceState(null, "", "/");
    showSignin(message);
  }

  // --- routing: #/<pipeline>/<session id>, so a reload or a second tab opens the same conversation

  function route() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    return {pipeline: parts[0] || null, session: parts[1] || null};
  }

  function setRoute() {
    const hash = "#/" + encodeURIComponent(state.pipeline) +
      (state.session ? "/" + encodeURIComponent(state.session.session_id) : "");
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  // --- pipelines and sessions

  async function openPipeline(id, sessionId) {
    state.pipeline = id;
    $("pipeline").value = id;
    localStorage.setItem(PIPELINE_KEY, id);
    updateAttach();
    await refreshSessions();
    let target = state.sessions.find((s) => s.session_id === sessionId);
    if (!target && sessionId) {  // an older conversation than the list's first page
      try {
        return await openSession(sessionId);
      } catch (e) { /* gone, or not ours: open the newest */ }
    }
    target = target || state.sessions[0];
    if (!target) {
      target = await api(P() + "/sessions", {method: "POST", body: {session_type: "person"}});
      await refreshSessions();
    }
    await openSession(target.session_id);
  }

  async function refreshSessions() {
    const page = await api(P() + "/sessions?limit=50");
    state.sessions = page.sessions;
    state.sessionsCursor = page.next_cursor || null;
    renderSessions();
  }

  async function moreSessions() {
    if (!state.sessionsCursor) return;
    try {
      const page = await api(P() + "/sessions?limit=50&cursor=" + encodeURIComponent(state.sessionsCursor));
      const known = new Set(state.sessions.map((s) => s.session_id));
      state.sessions.push(...page.sessions.filter((s) => !known.has(s.session_id)));
      state.sessionsCursor = page.next_cursor || null;
      renderSessions();
    } catch (e) {
      notice("error", "Could not load more conversations: " + e.message, "sessions");
    }
  }

  function sessionLabel(s) {
    return s.title || (s.session_type === "group" ? "Group " : "Chat ") + s.created_at.slice(0, 16).replace("T", " ");
  }

  function renderSessions() {
    const current = state.session && state.session.session_id;
    $("sessions").replaceChildren(...state.sessions.map((s) => el("li", null, el("button", {
      type: "button", "aria-current": String(s.session_id === current), "data-session": s.session_id,
      onclick: () => { closeSidebar(); openSession(s.session_id); },
    }, el("span", {class: "title", text: sessionLabel(s)}),
    el("span", {class: "kind", text: s.session_type === "group" ? "group" : ""})))));
    if (state.sessionsCursor) {
      $("sessions").append(el("li", null, el("button", {type: "button", class: "link more", text: "More conversations",
        onclick: moreSessions})));
    }
  }

  async function openSession(id) {
    const generation = ++state.generation;  // a later click wins over a slow earlier one
    closeClient();
    const session = await api(S(id));
    if (generation !== state.generation) return;
    state.session = session;
    state.msgs.clear();
    state.pending.clear();
    state.online = [];
    $("messages").replaceChildren();
    $("history-top").textContent = "";
    renderHead();
    renderSessions();
    setRoute();
    const page = await loadPage(session.last_seq + 1);
    if (generation !== state.generation) return;
    page.messages.forEach(fromHistory);
    state.oldestSeq = page.messages.length ? page.messages[0].seq : null;
    state.moreHistory = page.more;
    renderHistoryTop();
    scrollToEnd();
    connect(session);
    updateComposer();
    $("input").focus();
  }

  function renderHead() {
    const s = state.session;
    $("session-title").textContent = sessionLabel(s);
    const group = s.session_type === "group";
    $("toggle-members").hidden = !group;
    if (!group) $("members").hidden = true;
    $("toggle-members").setAttribute("aria-expanded", String(!$("members").hidden));
    renderMembers();
  }

  /* The newest messages with seq < before (up to PAGE), over REST: after_seq windows, skipping gaps a reset left. */
  async function loadPage(before) {
    let hi = before - 1;
    for (let tries = 0; hi >= 1 && tries < 20; tries++) {
      const lo = Math.max(0, hi - PAGE);
      const data = await api(S() + "/messages?after_seq=" + lo + "&limit=" + (hi - lo));
      if (data.messages.length) return {messages: data.messages, more: lo > 0};
      hi = lo;
    }
    return {messages: [], more: false};
  }

  async function loadOlder() {
    if (state.loadingOlder || !state.moreHistory || state.oldestSeq == null) return;
    state.loadingOlder = true;
    const generation = state.generation;
    $("history-top").textContent = "Loading earlier messages…";
    try {
      const page = await loadPage(state.oldestSeq);
      if (generation !== state.generation) return;
      const log = $("log");
      const before = log.scrollHeight;
      page.messages.forEach(fromHistory);
      log.scrollTop += log.scrollHeight - before;  // keep what the reader looks at in place
      if (page.messages.length) state.oldestSeq = page.messages[0].seq;
      state.moreHistory = page.more;
    } catch (e) {
      notice("error", "Could not load earlier messages: " + e.message, "history");
    } finally {
      state.loadingOlder = false;
      renderHistoryTop();
    }
  }

  function renderHistoryTop() {
    $("history-top").textContent = state.moreHistory ? "Scroll up for earlier messages" :
      state.msgs.size ? "Start of the conversation" : "";
  }

  // --- the live connection

  function wsUrl() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + location.host + P() + "/ws/connect?session_type=" + state.session.session_type;
  }

  function closeClient() {
    const client = state.client;
    state.client = null;  // first: its last events are not this page's business any more
    if (client) client.close();
    setConnection({connection: "connecting"});
  }

  function connect(session) {
    // No token: the handshake carries the sign-in cookie (same origin only: the server checks Origin).
    const client = new window.Parley.Client({url: wsUrl(), sessionId: session.session_id});
    state.client = client;
    const mine = (fn) => (e) => { if (state.client === client) fn(e); };
    let last = null, refused = 0;  // attempts in a row whose socket never opened
    client.on("status", mine((e) => {
      if (e.connection === "closed" && e.code === PROTOCOL.CLOSE.UNAUTHORIZED) {  // the token or JWT is no longer accepted
        return leave("Your sign-in was not accepted any more: sign in again.");
      }
      if (e.connection === "open") {
        refused = 0;
        for (const n of $("notices").querySelectorAll("[data-key=refused]")) n.remove();
      } else if (e.connection === "reconnecting" && last === "connecting" && ++refused >= 2) {
        explainRefusal(client);
      }
      if (e.connection) last = e.connection;
      if (e.connection) setConnection(e);
      if (e.message_id) onReplyStatus(e);
    }));
    client.on("connected", mine(() => {
      if (state.session.session_type === "group") client.request({type: "presence"});
      catchUp(client);
    }));
    client.on("message", mine(onUserMessage));
    client.on("delta", mine(onDelta));
    client.on("rewind", mine((e) => {  // the reply's text as it now stands (shorter), and why
      const m = entry(e.message_id, "assistant", e.seq);
      if (e.reason === "instance_lost") m.note = "The server handling this reply went away; another one goes on with it.";
      onDelta(e);
    }));
    client.on("final", mine(onFinal));
    client.on("error", mine(onError));
    client.on("presence", mine((f) => {
      state.online = f.data.online || [];
      renderMembers();
      // someone online who is not on our list: the members changed while this page was not connected
      if (state.online.some((id) => !state.session.members.includes(id))) refreshMembers();
    }));
    client.on("broadcast", mine((f) => notice("broadcast", String(f.message))));
    client.on("push", mine((f) => {
      const m = f.data && f.data.message;
      notice("push", typeof m === "string" ? m : JSON.stringify(m));
    }));
    client.on("session.reset", mine((f) => {  // reset here or in another tab: its messages are gone
      if (state.session && f.data.session_id === state.session.session_id) clearConversation();
    }));
    client.on("session.members", mine((f) => {  // the owner changed them (here, in another tab, or elsewhere)
      const s = state.session;
      if (!s || f.data.session_id !== s.session_id) return;
      s.members = f.data.members;
      renderMembers();
    }));
    client.on("session.left", mine((f) => {
      if (f.data.reason !== "removed") return;
      notice("info", "You were removed from this group.");
      closeClient();
      openPipeline(state.pipeline);
    }));
    client.connect();
  }

  /* A browser is not told why a WebSocket handshake failed. When the server answers HTTP all the same, the
   * socket is being refused (a proxy that drops the Host header's port fails the same-origin check): say so
   * rather than count down for ever. */
  async function explainRefusal(client) {
    let up = false;
    try { up = (await fetch("/healthz", {cache: "no-store"})).ok; } catch (e) { /* down: the countdown says it */ }
    if (!up || state.client !== client || client.state === "open") return;
    notice("error", "The server answers, but refuses the live connection (its WebSocket handshake fails). If it " +
      "sits behind a proxy, the proxy must pass WebSocket upgrades and the Host header as the browser sent it " +
      "(nginx/README.md). Still retrying.", "refused");
  }

  /* Messages stored while this page was not connected (before its first connection, or during a drop): the
   * socket only carries what happens from now on, and resume covers replies, not other people's messages. */
  async function catchUp(client) {
    let after = 0;
    for (const m of state.msgs.values()) if (m.seq != null && m.seq > after) after = m.seq;
    try {
      for (let pages = 0; pages < 20; pages++) {
        const data = await api(S() + "/messages?after_seq=" + after + "&limit=" + PAGE);
        if (state.client !== client) return;
        for (const d of data.messages) if (!state.msgs.has(d.message_id)) fromHistory(d);
        if (!data.has_more || !data.messages.length) break;
        after = data.next_after_seq;
      }
      renderHistoryTop();
    } catch (e) {
      if (state.client === client) notice("error", "Could not load the latest messages: " + e.message, "catch-up");
    }
  }

  function setConnection(e) {
    const box = $("conn");
    clearInterval(state.countdown);
    $("conn-retry").hidden = true;
    let stateName = e.connection;
    if (stateName === "reconnecting" && navigator.onLine === false) stateName = "offline";
    box.dataset.state = stateName;
    const was = state.connection;
    state.connection = stateName;
    // a live reply's text stops while we are away: no blinking caret, no Stop, a line saying why
    if ((was === "open") !== (stateName === "open")) for (const m of liveReplies()) renderSoon(m, true);
    const text = $("conn-text");
    if (stateName === "open") text.textContent = "Connected";
    else if (stateName === "connecting") text.textContent = "Connecting…";
    else if (stateName === "offline") text.textContent = "Offline";
    else if (stateName === "closed") text.textContent = "Offline";
    else if (stateName === "reconnecting") {
      $("conn-retry").hidden = false;
      const tick = () => {
        const left = Math.max(0, Math.ceil(((e.retry_at || Date.now()) - Date.now()) / 1000));
        text.textContent = left > 0 ? "Reconnecting in " + left + " s…" : "Reconnecting…";
      };
      tick();
      state.countdown = setInterval(tick, 500);
    }
    updateComposer();
  }

  // --- messages

  function entry(id, role, seq) {
    let m = state.msgs.get(id);
    if (!m) {
      m = {id, role, seq: seq == null ? null : seq, content: "", thinking: "", status: null, error: null,
        reply_to: null, sender: null, el: null, timer: null, thinkingOpened: false, thinkingClosed: false};
      m.el = role === "user" ? userElement(m) : assistantElement(m);
      state.msgs.set(id, m);
      place(m);
    } else if (seq != null && m.seq == null) {
      m.seq = seq;
      place(m);
    }
    return m;
  }

  /* Keep the list in seq order; a message without a seq yet goes last. */
  function place(m) {
    const list = $("messages");
    const stick = nearEnd();
    if (m.seq != null) {
      m.el.dataset.seq = m.seq;
      for (const other of list.children) {
        if (other !== m.el && other.dataset.seq && Number(other.dataset.seq) > m.seq) {
          list.insertBefore(m.el, other);
          if (stick) scrollToEnd();
          return;
        }
      }
    }
    const firstPending = list.querySelector(".msg.pending");
    if (firstPending && firstPending !== m.el && !m.el.classList.contains("pending")) list.insertBefore(m.el, firstPending);
    else list.append(m.el);
    if (stick) scrollToEnd();
  }

  function userElement(m) {
    const node = el("article", {class: "msg user", "data-id": m.id},
      el("div", {class: "meta"}), el("div", {class: "body"}));
    return node;
  }

  function assistantElement(m) {
    const thinking = el("details", {class: "thinking", hidden: ""},
      el("summary", {text: "Thinking"}), el("div", {class: "thinking-text"}));
    const retry = el("button", {type: "button", class: "retry", text: "Retry",
      title: "A new reply to the same message (this one stays, as an earlier version)"});
    retry.addEventListener("click", () => retryReply(m));
    const status = el("div", {class: "final-status", hidden: ""},
      el("span", {class: "badge"}), el("span", {class: "reason"}), retry);
    const versions = el("span", {class: "versions", role: "group", "aria-label": "Versions of this reply", hidden: ""},
      el("button", {type: "button", class: "link prev", "aria-label": "Earlier version", text: "‹",
        onclick: () => showVersion(m, -1)}),
      el("span", {class: "count"}),
      el("button", {type: "button", class: "link next", "aria-label": "Later version", text: "›",
        onclick: () => showVersion(m, 1)}));
    return el("article", {class: "msg assistant", "data-id": m.id},
      el("div", {class: "meta"}, el("span", {text: "Assistant"}), versions), thinking, el("div", {class: "body"}),
      el("div", {class: "live-note", role: "status", hidden: ""}), status);
  }

  function renderUser(m) {
    const group = state.session && state.session.session_type === "group";
    m.el.querySelector(".meta").textContent = group && m.sender ? m.sender : "You";
    m.el.querySelector(".body").textContent = m.content;
    const images = chainImages(m.chain);
    const box = m.el.querySelector(".images");
    if (images.length) {
      if (box) box.replaceChildren(...images);
      else m.el.append(el("div", {class: "images"}, ...images));
    } else if (box) box.remove();
  }

  /* The images of a message chain: stored ones (`path`) fetched with the token, inline ones as <img> (only
   * data:image/png|jpeg|gif|webp, base64), linked ones as a link (the page's CSP loads images from this origin,
   * data: and blob: only). */
  function chainImages(chain) {
    const out = [];
    for (const c of Array.isArray(chain) ? chain : []) {
      if (!c || c.type !== "Image") continue;
      const src = typeof c.base64 === "string" ? imageSrc(c.base64) : null;
      if (typeof c.path === "string" && c.path) out.push(storedImage(c.path));
      else if (src) out.push(el("img", {src, alt: "Attached image", loading: "lazy"}));
      else if (typeof c.url === "string" && /^https?:\/\//i.test(c.url)) {
        out.push(el("a", {href: c.url, target: "_blank", rel: "noopener noreferrer nofollow", text: "Image: " + c.url}));
      }
    }
    return out;
  }

  const storedImages = new Map();  // key -> blob: URL (a file never changes)

  function storedImage(key) {
    const img = el("img", {alt: "Attached image"});
    const known = storedImages.get(key);
    if (known) { img.src = known; return img; }
    fetch("/api/v1/files/image/" + encodeURIComponent(key), {credentials: "same-origin"})  // the sign-in cookie
      .then((res) => res.ok ? res.blob() : null)
      .then((blob) => {
        if (!blob) return;
        if (!storedImages.has(key)) storedImages.set(key, URL.createObjectURL(blob));
        img.src = storedImages.get(key);
      }, () => {});
    return img;
  }

  function imageSrc(value) {
    if (DATA_IMAGE.test(value)) return value;
    const kind = value.startsWith("iVBOR") ? "png" : value.startsWith("/9j/") ? "jpeg" :
      value.startsWith("R0lG") ? "gif" : value.startsWith("UklG") ? "webp" : null;
    const src = kind && "data:image/" + kind + ";base64," + value;
    return src && DATA_IMAGE.test(src) ? src : null;
  }

  /* Re-render a reply at most every RENDER_EVERY ms while it streams; at once when it ends. */
  function renderSoon(m, now) {
    if (now) {
      clearTimeout(m.timer);
      m.timer = null;
      renderAssistant(m);
    } else if (!m.timer) {
      m.timer = setTimeout(() => { m.timer = null; renderAssistant(m); }, RENDER_EVERY);
    }
  }

  function renderAssistant(m) {
    const stick = nearEnd();
    const live = LIVE.has(m.status);
    const away = live && state.connection !== "open";
    m.el.classList.toggle("streaming", live && !away);
    m.el.classList.toggle("paused", away);
    const note = m.el.querySelector(".live-note");
    note.textContent = away ? "Connection lost — reconnecting; the reply goes on without you and catches up."
      : live && m.note ? m.note : "";
    note.hidden = !note.textContent;
    m.el.setAttribute("aria-busy", String(live));
    const details = m.el.querySelector(".thinking");
    details.hidden = !m.thinking;
    if (m.thinking) {
      m.el.querySelector(".thinking-text").textContent = m.thinking;
      if (!m.thinkingOpened && live && !m.content) { details.open = true; m.thinkingOpened = true; }
      if (!m.thinkingClosed && m.content) { details.open = false; m.thinkingClosed = true; }
    }
    const body = m.el.querySelector(".body");
    body.replaceChildren(renderMarkdown(live ? closeOpenMarkdown(m.content) : m.content));
    addCopyButtons(body);
    const status = m.el.querySelector(".final-status");
    const label = STATUS_TEXT[m.status];
    status.hidden = !label;
    m.el.dataset.status = m.status || "";
    if (label) {
      const badge = status.querySelector(".badge");
      badge.textContent = label;
      badge.className = "badge " + m.status;
      const reason = m.error && (m.error.message || m.error.code);
      status.querySelector(".reason").textContent = reason || "";
    }
    if (stick) scrollToEnd();
    updateComposer();
  }

  function fromHistory(d) {
    settlePending(d.client_msg_id);
    const existing = state.msgs.get(d.message_id);
    if (existing && existing.role === "assistant" && !LIVE.has(existing.status) && existing.status) return;
    const m = entry(d.message_id, d.role, d.seq);
    m.content = d.content || "";
    m.sender = d.sender || null;
    m.chain = d.message_chain || null;
    if (d.role === "user") return renderUser(m);
    m.thinking = d.thinking || "";
    m.status = d.status;
    m.error = d.error || null;
    setQuestion(m, d.reply_to);
    renderSoon(m, true);
  }

  function settlePending(clientMsgId) {
    if (clientMsgId && state.pending.has(clientMsgId)) {
      state.pending.get(clientMsgId).remove();
      state.pending.delete(clientMsgId);
    }
  }

  function onUserMessage(d) {
    settlePending(d.client_msg_id);
    const m = entry(d.message_id, "user", d.seq);
    m.content = d.content;
    m.sender = d.sender || null;
    m.chain = d.message_chain || null;
    renderUser(m);
  }

  function onReplyStatus(e) {
    const m = entry(e.message_id, "assistant", e.seq);
    setQuestion(m, e.reply_to);
    if (m.status && !LIVE.has(m.status)) return;
    m.status = e.status;
    renderSoon(m, true);
  }

  function onDelta(e) {
    const m = entry(e.message_id, "assistant", e.seq);
    if (m.status && !LIVE.has(m.status)) return;
    m.content = e.content;
    m.thinking = e.thinking_content;
    m.status = PROTOCOL.STATUS.STREAMING;
    setQuestion(m, e.reply_to);
    renderSoon(m, false);
  }

  function onFinal(e) {
    const m = entry(e.message_id, "assistant", e.seq);
    m.content = e.content;
    m.thinking = e.thinking || "";
    m.status = e.status;
    m.error = e.error;
    setQuestion(m, e.reply_to);
    renderSoon(m, true);
    if (state.session && !state.session.title) refreshTitle();  // the server names a chat after its first message
  }

  /* A reply's question: its replies are versions of one answer (a regenerated reply is a newer one). */
  function setQuestion(m, questionId) {
    if (!questionId || m.reply_to === questionId) return;
    m.reply_to = questionId;
    state.shownVersion.delete(questionId);  // a new version: show it
    renderVersions(questionId);
  }

  function versionsOf(questionId) {
    const order = (m) => (m.seq == null ? Infinity : m.seq);
    return [...state.msgs.values()].filter((x) => x.role === "assistant" && x.reply_to === questionId)
      .sort((a, b) => order(a) - order(b));
  }

  /* One version of a question's reply shows (the newest, unless the reader paged back), with "‹ 1 / 2 ›". */
  function renderVersions(questionId) {
    const all = versionsOf(questionId);
    const chosen = Math.min(state.shownVersion.get(questionId) ?? all.length - 1, all.length - 1);
    all.forEach((m, i) => {
      m.el.hidden = i !== chosen;
      const pager = m.el.querySelector(".versions");
      pager.hidden = all.length < 2;
      pager.querySelector(".count").textContent = (i + 1) + " / " + all.length;
      pager.querySelector(".prev").disabled = i === 0;
      pager.querySelector(".next").disabled = i === all.length - 1;
    });
  }

  function showVersion(m, step) {
    const all = versionsOf(m.reply_to);
    const i = all.indexOf(m) + step;
    if (i < 0 || i >= all.length) return;
    state.shownVersion.set(m.reply_to, i);
    renderVersions(m.reply_to);
    all[i].el.querySelector(step < 0 ? ".prev" : ".next").focus();
  }

  async function refreshTitle() {
    const id = state.session.session_id;
    try {
      const session = await api(S(id));
      if (!session.title || !state.session || state.session.session_id !== id) return;
      state.session = session;
      renderHead();
      await refreshSessions();
    } catch (e) { /* the date stays as its name */ }
  }

  function onError(frame) {
    if (frame.request_type === "message") return;  // the send's own promise reports it
    if (frame.request_type === "resume" && frame.code === PROTOCOL.ERROR.MESSAGE_NOT_FOUND) return;  // a reset removed it
    notice("error", frame.message || frame.code, frame.code);
  }

  function clearConversation() {
    for (const m of state.msgs.values()) clearTimeout(m.timer);
    state.msgs.clear();
    state.oldestSeq = null;
    state.moreHistory = false;
    $("messages").replaceChildren(...state.pending.values());
    renderHistoryTop();
    updateComposer();
  }

  function liveReplies() {
    return [...state.msgs.values()].filter((m) => m.role === "assistant" && LIVE.has(m.status));
  }

  // --- sending, stopping, retrying

  function newId() {
    return crypto.randomUUID ? crypto.randomUUID() : "c-" + Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  /* Send the text, with the attached images if any (or, for Retry, an earlier message's chain with images).
   * Returns false when there was nothing to send. */
  function send(text, images, chain) {
    images = images || [];
    if (!state.client || (!text.trim() && !images.length && !chain)) return false;
    const clientMsgId = newId();
    const session = state.session;
    const pending = el("article", {class: "msg user pending", "aria-label": "Sending"},
      el("div", {class: "meta", text: "Sending…"}), el("div", {class: "body", text}));
    const shown = chain ? chainImages(chain) :
      images.map((a) => el("img", {src: a.url, alt: "Attached image " + a.name}));
    if (shown.length) pending.append(el("div", {class: "images"}, ...shown));
    state.pending.set(clientMsgId, pending);
    $("messages").append(pending);
    scrollToEnd();
    const sent = chain ? postMessage(session, chain, clientMsgId) :
      images.length ? sendOverRest(session, text, images, clientMsgId) :
        state.client.send(text, {client_msg_id: clientMsgId});
    sent.then(() => {
      images.forEach((a) => URL.revokeObjectURL(a.url));
    }, (frame) => {
      pending.remove();
      state.pending.delete(clientMsgId);
      const retry = frame.retry_after ? " (try again in " + Math.ceil(frame.retry_after) + " s)" : "";
      notice("error", (frame.message || frame.code || "the message was not accepted") + retry, "send");
      if (!$("input").value) $("input").value = text;
      if (images.length && !state.attachments.length && state.session === session) {
        state.attachments = images;  // back in the composer, to send again
        renderAttachments();
      }
    });
    return true;
  }

  /* A message with images: each is uploaded (a WebSocket frame is too small for a photo, --max-message-size)
   * and the message names it by key. Its echo and its reply reach this page over the WebSocket like any other. */
  async function sendOverRest(session, text, images, clientMsgId) {
    const chain = text.trim() ? [{type: "Plain", text}] : [];
    for (const a of images) {
      const form = new FormData();
      form.append("file", a.blob, a.name || "image");
      try {
        chain.push({type: "Image", path: (await api("/api/v1/files/images", {method: "POST", body: form})).key});
      } catch (e) {
        throw {code: e.code, message: e.message};
      }
    }
    return postMessage(session, chain, clientMsgId);
  }

  async function postMessage(session, chain, clientMsgId) {
    try {
      return await api(S(session.session_id) + "/messages", {method: "POST",
        body: {message: chain, client_msg_id: clientMsgId}});
    } catch (e) {
      throw {code: e.code, message: e.message};
    }
  }

  // --- attaching images (pipelines whose `inputs` include "image")

  function acceptsImages() {
    const p = state.pipelines.find((x) => x.id === state.pipeline);
    return !!(p && Array.isArray(p.inputs) && p.inputs.includes("image"));
  }

  function updateAttach() {
    const accepts = acceptsImages();
    $("attach").hidden = !accepts;
    if (!accepts) clearAttachments();
  }

  function clearAttachments() {
    state.attachments.forEach((a) => URL.revokeObjectURL(a.url));
    state.attachments = [];
    renderAttachments();
  }

  /* Bytes one image may have: each is uploaded on its own (the upload body takes the image and a margin). */
  function imageBudget() {
    return state.limits.max_image_size;
  }

  function size(bytes) {
    return bytes >= 1024 * 1024 ? (bytes / 1024 / 1024).toFixed(1) + " MB" : Math.ceil(bytes / 1024) + " KB";
  }

  async function attach(files) {
    for (const file of files) {
      if (state.attachments.length >= MAX_IMAGES) {
        notice("error", "At most " + MAX_IMAGES + " images go with one message.", "attach");
        break;
      }
      try {
        const blob = await fitImage(file, imageBudget());
        state.attachments.push({name: file.name || "image", blob, url: URL.createObjectURL(blob)});
        renderAttachments();
      } catch (e) {
        notice("error", e.message, "attach");
      }
    }
    updateComposer();
  }

  /* The file as is when it fits, else shrunk in a canvas (JPEG, longest side at most MAX_SIDE px). */
  async function fitImage(file, limit) {
    const name = file.name || "The image";
    if (!IMAGE_TYPES.includes(file.type)) {
      throw new Error(name + ": only PNG, JPEG, GIF or WebP images can be attached.");
    }
    if (file.size > MAX_PICKED) throw new Error(name + " is " + size(file.size) + ": at most " + size(MAX_PICKED) + ".");
    if (limit < 4096) throw new Error("No room for another image in this message: send it first.");
    if (file.size <= limit) return file;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (e) {
      throw new Error(name + " could not be read as an image.");
    }
    try {
      let side = Math.min(MAX_SIDE, Math.max(bitmap.width, bitmap.height));
      for (let tries = 0; tries < 10 && side >= 64; tries++, side = Math.floor(side * 0.7)) {
        const scale = Math.min(1, side / Math.max(bitmap.width, bitmap.height));
        const canvas = el("canvas", {width: Math.max(1, Math.round(bitmap.width * scale)),
          height: Math.max(1, Math.round(bitmap.height * scale))});
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#fff";  // JPEG has no transparency
        ctx.fillRect(0, 0, canvas.width, canvas.height);
        ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
        const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
        if (blob && blob.size <= limit) return blob;
      }
    } finally {
      bitmap.close();
    }
    throw new Error(name + " is too large to send, even made smaller (at most " + size(limit) + ").");
  }

  function renderAttachments() {
    const box = $("attachments");
    box.hidden = !state.attachments.length;
    box.replaceChildren(...state.attachments.map((a, i) => el("div", {class: "attachment"},
      el("img", {src: a.url, alt: "Image to send: " + a.name}),
      el("span", {class: "name", text: a.name}),
      el("button", {type: "button", class: "remove", "aria-label": "Remove " + a.name, text: "×",
        onclick: () => {
          URL.revokeObjectURL(a.url);
          state.attachments.splice(i, 1);
          renderAttachments();
          updateComposer();
          $("input").focus();
        }}))));
  }

  function stop() {
    if (state.client && liveReplies().length) state.client.stop();
  }

  /* Retry is "regenerate": a new reply to the same message, in place of this one (kept as an earlier version). */
  function retryReply(m) {
    if (!state.client || !state.client.regenerate(m.id)) {
      notice("error", "Not connected: Retry once the connection is back.", "retry");
    }
  }

  function updateComposer() {
    const busy = liveReplies().length > 0 && state.connection === "open";
    $("stop").hidden = !busy;
    $("send").disabled = !$("input").value.trim() && !state.attachments.length;
  }

  // --- members (group sessions)

  function renderMembers() {
    const s = state.session;
    if (!s || s.session_type !== "group") return;
    const owner = s.owner === state.user;
    $("member-list").replaceChildren(...s.members.map((id) => {
      const online = state.online.includes(id);
      const item = el("li", {class: online ? "is-online" : "", "data-user": id},
        el("span", {class: "online", title: online ? "online" : "offline", "aria-hidden": "true"}),
        el("span", {class: "name", text: id + (id === s.owner ? " (owner)" : "")}),
        el("span", {class: "visually-hidden", text: online ? ", online" : ", offline"}));
      if (owner && id !== s.owner) {
        item.append(el("button", {type: "button", class: "link", "aria-label": "Remove " + id, text: "Remove",
          onclick: () => changeMembers({remove: [id]})}));
      }
      return item;
    }));
    $("add-member").hidden = !owner;
  }

  async function refreshMembers() {
    const id = state.session && state.session.session_id;
    try {
      const session = await api(S(id));
      if (state.session && state.session.session_id === id) {
        state.session = session;
        renderMembers();
      }
    } catch (e) { /* removed from it: session.left says so */ }
  }

  async function changeMembers(change) {
    try {
      state.session = await api(S() + "/members", {method: "POST", body: change});
      renderMembers();
    } catch (e) {
      notice("error", e.message, "members");
    }
  }

  // --- dialogs (new group, rename)

  /* The app's one dialog: a title and members to fill in, or (`text`) a question to confirm with `ok`. */
  function ask(title, {name = "", members = null, text = null, ok = "OK", danger = false} = {}) {
    const dialog = $("dialog");
    $("dialog-title").textContent = title;
    $("dialog-text").hidden = text === null;
    $("dialog-text").textContent = text || "";
    $("dialog-name-row").hidden = text !== null;
    $("dialog-name").value = name;
    $("dialog-members-row").hidden = members === null;
    $("dialog-members").value = members || "";
    $("dialog-ok").textContent = ok;
    $("dialog-ok").className = danger ? "danger" : "primary";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        if (dialog.returnValue !== "ok") return resolve(null);
        resolve({name: $("dialog-name").value.trim(),
          members: $("dialog-members").value.split(",").map((x) => x.trim()).filter(Boolean)});
      }, {once: true});
      dialog.returnValue = "";
      dialog.showModal();
      (text === null ? $("dialog-name") : $("dialog-cancel")).focus();
    });
  }

  async function newSession(type) {
    let body = {session_type: type};
    if (type === "group") {
      const answer = await ask("New group", {members: ""});
      if (!answer) return;
      body = {session_type: "group", title: answer.name, members: answer.members};
    }
    try {
      const s = await api(P() + "/sessions", {method: "POST", body});
      await refreshSessions();
      await openSession(s.session_id);
    } catch (e) {
      notice("error", e.message, "new");
    }
  }

  async function rename() {
    const answer = await ask("Rename conversation", {name: state.session.title});
    if (!answer) return;
    try {
      state.session = await api(S(), {method: "PATCH", body: {title: answer.name}});
      renderHead();
      await refreshSessions();
    } catch (e) {
      notice("error", e.message, "rename");
    }
  }

  async function reset() {
    const sure = await ask("Reset conversation", {text: "Delete every message of this conversation? This cannot be undone.",
      ok: "Delete messages", danger: true});
    if (!sure) return;
    try {
      await api(S() + "/reset", {method: "POST"});
      await openSession(state.session.session_id);
    } catch (e) {
      notice("error", e.message, "reset");
    }
  }

  // --- scrolling and layout

  function nearEnd() {
    const log = $("log");
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }

  /* Callers decide (nearEnd() before they add content: after it, the new content itself is the distance). */
  function scrollToEnd() {
    const log = $("log");
    log.scrollTop = log.scrollHeight;
  }

  function closeSidebar() {
    $("sidebar").classList.remove("open");
    $("toggle-sidebar").setAttribute("aria-expanded", "false");
  }

  function autosize() {
    const input = $("input");
    input.rows = Math.min(8, Math.max(1, input.value.split("\n").length));
  }

  // --- wiring

  function bindUi() {
    $("signin-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const token = $("signin-token").value.trim();
      try {
        await signIn(token);
        $("signin-token").value = "";
      } catch (e) {
        showSignin(e.status === 401 ? "That token was not accepted." : e.message);
      }
    });
    $("signout").addEventListener("click", signOut);
    window.addEventListener("storage", (event) => {  // another tab signed this browser out
      if (event.key === SIGNOUT_KEY && state.user) leave();
    });
    $("pipeline").addEventListener("change", (e) => openPipeline(e.target.value));
    $("new-chat").addEventListener("click", () => newSession("person"));
    $("new-group").addEventListener("click", () => newSession("group"));
    $("rename").addEventListener("click", rename);
    $("reset").addEventListener("click", reset);
    $("toggle-members").addEventListener("click", () => {
      $("members").hidden = !$("members").hidden;
      $("toggle-members").setAttribute("aria-expanded", String(!$("members").hidden));
      if (!$("members").hidden) refreshMembers();  // the owner may have changed them since
    });
    $("toggle-sidebar").addEventListener("click", () => {
      const open = $("sidebar").classList.toggle("open");
      $("toggle-sidebar").setAttribute("aria-expanded", String(open));
    });
    $("add-member").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = $("add-member-id").value.trim();
      if (id) changeMembers({add: [id]});
      $("add-member-id").value = "";
    });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("input");
      const images = state.attachments;
      if (!send(input.value, images)) return;
      state.attachments = [];
      renderAttachments();
      input.value = "";
      autosize();
      updateComposer();
    });
    $("attach").addEventListener("click", () => $("attach-file").click());
    $("attach-file").addEventListener("change", (event) => {
      const files = [...event.target.files];
      event.target.value = "";  // choosing the same file again fires "change" again
      attach(files);
    });
    $("input").addEventListener("paste", (event) => {
      const files = [...(event.clipboardData ? event.clipboardData.files : [])];
      if (!files.length || !acceptsImages()) return;
      event.preventDefault();
      attach(files);
    });
    $("input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("input").addEventListener("input", () => { autosize(); updateComposer(); });
    $("stop").addEventListener("click", stop);
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !$("dialog").open && liveReplies().length) {
        event.preventDefault();
        stop();
      }
    });
    $("conn-retry").addEventListener("click", () => state.client && state.client.retryNow());
    document.addEventListener("visibilitychange", () => {  // back to the tab: groups others added us to
      if (document.visibilityState === "visible" && state.user && state.pipeline) {
        refreshSessions().catch(() => { /* the connection state says why */ });
      }
    });
    $("log").addEventListener("scroll", () => { if ($("log").scrollTop < 80) loadOlder(); });
    window.addEventListener("offline", () => state.client && setConnection({connection: "reconnecting"}));
    window.addEventListener("online", () => {
      const client = state.client;
      if (!client) return;
      if (client.state === "open") setConnection({connection: "open"});  // the socket lived through it
      else client.retryNow();
    });
  }

  async function start() {
    configureMarkdown();
    bindUi();
    let token = null;
    try {
      token = sessionStorage.getItem(TOKEN_KEY);
      sessionStorage.removeItem(TOKEN_KEY);  // the cookie holds it from now on; this page does not
    } catch (e) { /* storage disabled: sign in by hand */ }
    try {
      if (token) await signIn(token);
      else await enter();
    } catch (e) {
      if (e.status === 401) showSignin(token ? "That token was not accepted: sign in again." : null);
      else showSignin(e.message);
    }
  }

  // for tests and embedding pages: the one renderer of model output, and what a streaming reply shows of it
  window.ParleyApp = {renderMarkdown, closeOpenMarkdown};
  start();
})();
