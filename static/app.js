/* Parley's web app, on static/parley.js (the reconnecting client) and the REST API (docs/protocol.md).
 *
 * Model output reaches the DOM only through renderMarkdown(): marked turns it into HTML, DOMPurify sanitizes
 * that into a DOM fragment. Everything else a user or a model wrote is set as textContent.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "parley.token";
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
    token: null, user: null, isAdmin: false, pipelines: [], pipeline: null, sessions: [], session: null,
    client: null, msgs: new Map(), pending: new Map(), oldestSeq: null, moreHistory: false, loadingOlder: false,
    online: [], countdown: null, generation: 0, attachments: [],
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

  async function api(path, options) {
    const o = options || {};
    const headers = {Authorization: "Bearer " + state.token, Accept: "application/json"};
    const form = o.body instanceof FormData;  // an upload: the browser sets the multipart Content-Type
    if (o.body !== undefined && !form) headers["Content-Type"] = "application/json";
    const res = await fetch(path, {method: o.method || "GET", headers, cache: "no-store",
      body: o.body === undefined || form ? o.body : JSON.stringify(o.body)});
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

  async function signIn(token) {
    state.token = token;
    const root = await api("/");
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* kept in memory only */ }
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

  function signOut() {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing kept */ }
    closeClient();
    state.token = null;
    history.replaceState(null, "", "/");
    showSignin();
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
    scrollToEnd(true);
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
    const client = new window.Parley.Client({url: wsUrl(), token: state.token, sessionId: session.session_id});
    state.client = client;
    const mine = (fn) => (e) => { if (state.client === client) fn(e); };
    let last = null, refused = 0;  // attempts in a row whose socket never opened
    client.on("status", mine((e) => {
      if (e.connection === "closed" && e.code === PROTOCOL.CLOSE.UNAUTHORIZED) {  // the token or JWT is no longer accepted
        try { sessionStorage.removeItem(TOKEN_KEY); } catch (x) { /* nothing kept */ }
        closeClient();
        return showSignin("Your sign-in was not accepted any more: sign in again.");
      }
      if (e.connection === "open") {
        refused = 0;
        for (const n of $("notices").querySelectorAll("[data-key=refused]")) n.remove();
      } else if (e.connection === "reconnecting" && last === "connecting" && ++refused >= 2) {
        explainRefusal(client);
      }
      if (e.connection) last = e.connection;
      if (e.connection) setConnection(e);
      if (e.message_id) onReplyStatus(e.message_id, e.status);
    }));
    client.on("connected", mine(() => {
      if (state.session.session_type === "group") client.request({type: "presence"});
      catchUp(client);
    }));
    client.on("message", mine(onUserMessage));
    client.on("delta", mine(onDelta));
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
    const retry = el("button", {type: "button", class: "retry", text: "Retry"});
    retry.addEventListener("click", () => retryReply(m));
    const status = el("div", {class: "final-status", hidden: ""},
      el("span", {class: "badge"}), el("span", {class: "reason"}), retry);
    return el("article", {class: "msg assistant", "data-id": m.id},
      el("div", {class: "meta", text: "Assistant"}), thinking, el("div", {class: "body"}), status);
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
    fetch("/api/v1/files/image/" + encodeURIComponent(key), {headers: {Authorization: "Bearer " + state.token}})
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
    m.el.classList.toggle("streaming", live);
    m.el.setAttribute("aria-busy", String(live));
    const details = m.el.querySelector(".thinking");
    details.hidden = !m.thinking;
    if (m.thinking) {
      m.el.querySelector(".thinking-text").textContent = m.thinking;
      if (!m.thinkingOpened && live && !m.content) { details.open = true; m.thinkingOpened = true; }
      if (!m.thinkingClosed && m.content) { details.open = false; m.thinkingClosed = true; }
    }
    const body = m.el.querySelector(".body");
    body.replaceChildren(renderMarkdown(m.content));
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
    m.reply_to = d.reply_to || null;
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

  function onReplyStatus(id, status) {
    const m = entry(id, "assistant", null);
    if (m.status && !LIVE.has(m.status)) return;
    m.status = status;
    renderSoon(m, true);
  }

  function onDelta(e) {
    const m = entry(e.message_id, "assistant", e.seq);
    if (m.status && !LIVE.has(m.status)) return;
    m.content = e.content;
    m.thinking = e.thinking_content;
    m.status = PROTOCOL.STATUS.STREAMING;
    if (e.reply_to) m.reply_to = e.reply_to;
    renderSoon(m, false);
  }

  function onFinal(e) {
    const m = entry(e.message_id, "assistant", e.seq);
    m.content = e.content;
    m.thinking = e.thinking || "";
    m.status = e.status;
    m.error = e.error;
    if (e.reply_to) m.reply_to = e.reply_to;
    renderSoon(m, true);
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
    const untitled = !session.title && state.msgs.size === 0 && state.pending.size === 0;
    const pending = el("article", {class: "msg user pending", "aria-label": "Sending"},
      el("div", {class: "meta", text: "Sending…"}), el("div", {class: "body", text}));
    const shown = chain ? chainImages(chain) :
      images.map((a) => el("img", {src: a.url, alt: "Attached image " + a.name}));
    if (shown.length) pending.append(el("div", {class: "images"}, ...shown));
    state.pending.set(clientMsgId, pending);
    $("messages").append(pending);
    scrollToEnd(true);
    const sent = chain ? postMessage(session, chain, clientMsgId) :
      images.length ? sendOverRest(session, text, images, clientMsgId) :
        state.client.send(text, {client_msg_id: clientMsgId});
    sent.then(() => {
      images.forEach((a) => URL.revokeObjectURL(a.url));
      if (untitled) nameAfter(session, text.trim() || "Image");
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

  /* A new conversation takes its first message as its title, until renamed. */
  async function nameAfter(session, text) {
    const title = text.trim().split("\n")[0].slice(0, 60);
    try {
      const renamed = await api(S(session.session_id), {method: "PATCH", body: {title}});
      if (state.session && state.session.session_id === renamed.session_id) {
        state.session = renamed;
        renderHead();
      }
      await refreshSessions();
    } catch (e) { /* the date stays as its name */ }
  }

  function stop() {
    if (state.client && liveReplies().length) state.client.stop();
  }

  function retryReply(m) {
    let question = m.reply_to && state.msgs.get(m.reply_to);
    if (!question) {  // the message just before the reply
      const users = [...state.msgs.values()].filter((x) => x.role === "user" && x.seq != null && x.seq < m.seq);
      question = users.sort((a, b) => b.seq - a.seq)[0];
    }
    const withImages = question && Array.isArray(question.chain) && question.chain.some((c) => c && c.type === "Image");
    if (withImages) send(question.content, [], question.chain);
    else if (question) send(question.content);
    else notice("error", "The question this reply answered is not loaded; scroll up and try again.", "retry");
  }

  function updateComposer() {
    const busy = liveReplies().length > 0;
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

  function ask(title, {name = "", members = null} = {}) {
    const dialog = $("dialog");
    $("dialog-title").textContent = title;
    $("dialog-name").value = name;
    $("dialog-members-row").hidden = members === null;
    $("dialog-members").value = members || "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        if (dialog.returnValue !== "ok") return resolve(null);
        resolve({name: $("dialog-name").value.trim(),
          members: $("dialog-members").value.split(",").map((x) => x.trim()).filter(Boolean)});
      }, {once: true});
      dialog.returnValue = "";
      dialog.showModal();
      $("dialog-name").focus();
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
    if (!confirm("Delete every message of this conversation?")) return;
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

  function scrollToEnd(force) {
    const log = $("log");
    if (force || nearEnd()) log.scrollTop = log.scrollHeight;
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
      if (document.visibilityState === "visible" && state.token && state.pipeline) {
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
    try { token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { /* storage disabled */ }
    if (!token) return showSignin();
    try {
      await signIn(token);
    } catch (e) {
      if (e.status === 401) try { sessionStorage.removeItem(TOKEN_KEY); } catch (x) { /* nothing kept */ }
      showSignin(e.status === 401 ? "That token was not accepted: sign in again." : e.message);
    }
  }

  window.ParleyApp = {renderMarkdown};  // for tests and embedding pages: the one renderer of model output
  start();
})();
