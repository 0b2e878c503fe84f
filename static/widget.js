/* Parley's chat widget: one <script> tag on any page (docs/langbot.md, "The embed widget").
 *
 *   <script src="https://chat.example.com/api/v1/embed/<bot>/widget.js" async></script>
 *
 * A bubble that opens a panel in a shadow root (the page's styles and the widget's never meet). It speaks
 * LangBot's widget protocol to Parley: the visitor is a random id kept in this site's localStorage, replies
 * stream as LangBot's cumulative `response` frames (rendered as Markdown, safely), Stop stops them, and after a
 * reload the panel reopens with the conversation, a reply still being written included. It follows the page's
 * light or dark theme (data-theme / class "dark" / color-scheme on <html> or <body>, else the background's
 * lightness, else the system's); `data-theme="light|dark"` on the script tag fixes it. No dependencies.
 */
(function (CONFIG) {
  "use strict";
  var script = document.currentScript;
  if (!CONFIG || !script || !window.WebSocket) return;
  var BASE = new URL(script.src).origin;
  var PREFIX = "parley-widget:" + CONFIG.bot + ":";
  if (document.getElementById("parley-widget-" + CONFIG.bot)) return;  // the tag twice: one widget

  // --- storage (a blocked localStorage, as in some private modes: the visitor lasts as long as the page)
  var memory = {};
  function load(key, session) {
    try { return (session ? sessionStorage : localStorage).getItem(PREFIX + key); } catch (e) { return memory[key] || null; }
  }
  function save(key, value, session) {
    try { (session ? sessionStorage : localStorage).setItem(PREFIX + key, value); } catch (e) { memory[key] = value; }
  }
  function visitorKey() {
    var key = load("visitor");
    if (!key || !/^[A-Za-z0-9_-]{16,128}$/.test(key)) {
      var bytes = new Uint8Array(16);
      crypto.getRandomValues(bytes);
      key = Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
      save("visitor", key);
    }
    return key;
  }

  var state = {open: load("open", true) === "1", ws: null, connectionId: null, retries: 0, token: "",
               messages: {}, order: [], pending: [], streaming: {}, key: visitorKey(), retryTimer: null,
               sent: []};  // sent: this tab's messages shown at once, until their echo (with its id) or refusal

  // --- DOM
  var host = document.createElement("div");
  host.id = "parley-widget-" + CONFIG.bot;
  var root = host.attachShadow({mode: "open"});
  var CSS = [
    ":host{all:initial;--bg:#fff;--fg:#1f2328;--muted:#6a737d;--line:#d8dee4;--mine:#3b5bdb;--mine-fg:#fff;",
    "--theirs:#f1f3f5;--code:#eef1f4;--accent:#3b5bdb;--shadow:0 12px 40px rgba(0,0,0,.18)}",
    ":host([data-theme=dark]){--bg:#1e2126;--fg:#e6e8eb;--muted:#9aa4af;--line:#3a3f47;--mine:#4c6ef5;",
    "--theirs:#2b3038;--code:#14171b;--accent:#748ffc;--shadow:0 12px 40px rgba(0,0,0,.55)}",
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}",
    ".bubble{position:fixed;right:20px;bottom:20px;width:56px;height:56px;border-radius:50%;border:0;",
    "background:var(--accent);cursor:pointer;box-shadow:var(--shadow);z-index:2147483646;padding:12px}",
    ".bubble img{width:100%;height:100%;display:block}",
    ".panel{position:fixed;right:20px;bottom:88px;width:min(380px,calc(100vw - 40px));",
    "height:min(560px,calc(100vh - 120px));display:none;flex-direction:column;background:var(--bg);color:var(--fg);",
    "border:1px solid var(--line);border-radius:14px;box-shadow:var(--shadow);z-index:2147483646;overflow:hidden}",
    ".panel.open{display:flex}",
    "header{display:flex;align-items:center;gap:8px;padding:10px 12px;border-bottom:1px solid var(--line)}",
    "header img{width:24px;height:24px;border-radius:6px}",
    "header .title{flex:1;font-weight:600;font-size:15px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}",
    ".dot{width:8px;height:8px;border-radius:50%;background:#f08c00}.dot.on{background:#2f9e44}",
    "button.icon{border:0;background:transparent;color:var(--muted);cursor:pointer;font-size:13px;padding:4px 6px;",
    "border-radius:6px}button.icon:hover{color:var(--fg);background:var(--theirs)}",
    ".log{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:10px;font-size:14px;",
    "line-height:1.5}",
    ".empty{color:var(--muted);text-align:center;margin:auto}",
    ".msg{max-width:86%;padding:8px 12px;border-radius:12px;overflow-wrap:anywhere}",
    ".msg.user{align-self:flex-end;background:var(--mine);color:var(--mine-fg);white-space:pre-wrap}",
    ".msg.assistant{align-self:flex-start;background:var(--theirs)}",
    ".msg.notice{align-self:center;background:transparent;color:var(--muted);font-size:13px;text-align:center}",
    ".msg p{margin:0 0 6px}.msg p:last-child{margin:0}.msg ul,.msg ol{margin:4px 0;padding-left:20px}",
    ".msg pre{background:var(--code);padding:8px;border-radius:8px;overflow-x:auto;margin:6px 0}",
    ".msg code{background:var(--code);padding:1px 4px;border-radius:4px;font-family:ui-monospace,Menlo,monospace;",
    "font-size:13px}.msg pre code{padding:0;background:transparent}",
    ".msg a{color:var(--accent)}.msg.user a{color:inherit}.msg img{max-width:100%;border-radius:8px}",
    ".msg h1,.msg h2,.msg h3{font-size:15px;margin:6px 0}",
    ".rate{display:flex;gap:4px;margin-top:4px}.rate button{font-size:12px}.rate button[aria-pressed=true]",
    "{color:var(--accent)}",
    ".typing::after{content:'\u2026';animation:blink 1s infinite}@keyframes blink{50%{opacity:.2}}",
    "form{display:flex;gap:8px;padding:10px;border-top:1px solid var(--line)}",
    "textarea{flex:1;resize:none;border:1px solid var(--line);border-radius:10px;padding:8px 10px;font-size:14px;",
    "background:var(--bg);color:var(--fg);max-height:120px;min-height:38px}",
    "textarea:focus{outline:2px solid var(--accent);outline-offset:-1px}",
    ".send{border:0;border-radius:10px;background:var(--accent);color:#fff;padding:0 14px;cursor:pointer;",
    "font-size:14px}.send:disabled{opacity:.5;cursor:default}.send.stop{background:#e03131}"
  ].join("");
  if (root.adoptedStyleSheets !== undefined && window.CSSStyleSheet && CSSStyleSheet.prototype.replaceSync) {
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);  // not an inline <style>: pages whose CSP forbids those still get the widget styled
    root.adoptedStyleSheets = [sheet];
  } else {
    var style = document.createElement("style");
    style.textContent = CSS;
    root.appendChild(style);
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") node.textContent = attrs[k];
      else node.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { node.appendChild(c); });
    return node;
  }

  var logo = BASE + CONFIG.logo;
  var bubble = el("button", {class: "bubble", type: "button", "aria-label": "Open chat: " + CONFIG.title,
                             "aria-expanded": "false"}, [el("img", {src: logo, alt: ""})]);
  var dot = el("span", {class: "dot", role: "img", "aria-label": "Connecting"});
  var resetBtn = el("button", {class: "icon", type: "button", text: "New chat", title: "Start a new conversation"});
  var closeBtn = el("button", {class: "icon", type: "button", text: "\u2715", "aria-label": "Close chat"});
  var log = el("div", {class: "log", role: "log", "aria-live": "polite"});
  var input = el("textarea", {rows: "1", placeholder: "Write a message\u2026", "aria-label": "Message"});
  var sendBtn = el("button", {class: "send", type: "submit", text: "Send"});
  var form = el("form", {}, [input, sendBtn]);
  var panel = el("div", {class: "panel", role: "dialog", "aria-label": CONFIG.title}, [
    el("header", {}, [el("img", {src: logo, alt: ""}), el("span", {class: "title", text: CONFIG.title}), dot,
                      resetBtn, closeBtn]), log, form]);
  root.appendChild(bubble);
  root.appendChild(panel);

  // --- theme: the page's, as it changes
  function luminance(color) {
    var m = /rgba?\(([\d.]+),\s*([\d.]+),\s*([\d.]+)(?:,\s*([\d.]+))?/.exec(color || "");
    if (!m || (m[4] !== undefined && +m[4] === 0)) return null;  // transparent: says nothing
    return (0.2126 * m[1] + 0.7152 * m[2] + 0.0722 * m[3]) / 255;
  }
  function pageTheme() {
    var fixed = script.getAttribute("data-theme");
    if (fixed === "light" || fixed === "dark") return fixed;
    var nodes = [document.documentElement, document.body];
    for (var i = 0; i < nodes.length; i++) {
      var n = nodes[i];
      if (!n) continue;
      var named = (n.getAttribute("data-theme") || n.getAttribute("data-bs-theme") || "").toLowerCase();
      if (named === "dark" || named === "light") return named;
      if (n.classList.contains("dark")) return "dark";
      if (n.classList.contains("light")) return "light";
    }
    for (i = nodes.length - 1; i >= 0; i--) {
      if (!nodes[i]) continue;
      var scheme = getComputedStyle(nodes[i]).colorScheme || "";
      if (scheme === "dark") return "dark";
      var light = luminance(getComputedStyle(nodes[i]).backgroundColor);
      if (light !== null) return light < 0.5 ? "dark" : "light";
    }
    return window.matchMedia && matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }
  function applyTheme() { host.setAttribute("data-theme", pageTheme()); }
  var watch = {attributes: true, attributeFilter: ["class", "style", "data-theme", "data-bs-theme"]};
  new MutationObserver(applyTheme).observe(document.documentElement, watch);
  if (window.matchMedia) {
    var media = matchMedia("(prefers-color-scheme: dark)");
    if (media.addEventListener) media.addEventListener("change", applyTheme);
  }

  // --- Markdown: the text is escaped first; only what is rebuilt here becomes markup (http(s) links only)
  function esc(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function inline(s) {
    var codes = [];
    s = s.replace(/`([^`\n]+)`/g, function (m, c) { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
    s = esc(s)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, function (m, label, url) {
        return '<a href="' + url + '" target="_blank" rel="noopener noreferrer nofollow">' + label + "</a>";
      });
    return s.replace(/\u0000(\d+)\u0000/g, function (m, i) { return "<code>" + esc(codes[+i]) + "</code>"; });
  }
  function markdown(text) {
    var out = [], lines = text.replace(/\u0000/g, "").split("\n"), i = 0, list = null, para = [];
    function flush() {
      if (para.length) { out.push("<p>" + para.map(inline).join("<br>") + "</p>"); para = []; }
      if (list) { out.push("</" + list + ">"); list = null; }
    }
    while (i < lines.length) {
      var line = lines[i], m;
      if (/^```/.test(line)) {
        flush();
        var code = [];
        for (i++; i < lines.length && !/^```/.test(lines[i]); i++) code.push(lines[i]);
        out.push("<pre><code>" + esc(code.join("\n")) + "</code></pre>");
      } else if ((m = /^(#{1,3})\s+(.*)$/.exec(line))) {
        flush();
        out.push("<h" + m[1].length + ">" + inline(m[2]) + "</h" + m[1].length + ">");
      } else if ((m = /^\s*([-*]|\d+[.)])\s+(.*)$/.exec(line))) {
        if (para.length) flush();
        var kind = /\d/.test(m[1]) ? "ol" : "ul";
        if (list !== kind) { if (list) out.push("</" + list + ">"); out.push("<" + kind + ">"); list = kind; }
        out.push("<li>" + inline(m[2]) + "</li>");
      } else if (!line.trim()) {
        flush();
      } else {
        if (list) { out.push("</" + list + ">"); list = null; }
        para.push(line);
      }
      i++;
    }
    flush();
    return out.join("");
  }

  // --- messages: keyed by their id (a reply's frames and its history entry are one message)
  function render(msg) {
    var node = state.messages[msg.id] && state.messages[msg.id].node;
    var cls = "msg " + (msg.id < 0 ? "notice" : msg.role);
    if (!node) {
      node = el("div", {class: cls, "data-id": String(msg.id)});
      log.appendChild(node);
      state.order.push(msg.id);
    }
    node.className = cls;
    var text = msg.content || "";
    if (msg.role === "user" || msg.id < 0) node.textContent = text;
    else node.innerHTML = markdown(text);
    (msg.message_chain || []).forEach(function (c) {
      if (c.type === "Image" && c.url && /^https?:\/\//.test(c.url)) node.appendChild(el("img", {src: c.url, alt: "Image"}));
    });
    if (msg.role === "assistant" && msg.id >= 0) {
      if (!msg.is_final) node.appendChild(el("span", {class: "typing", "aria-label": "writing"}));
      else node.appendChild(rating(msg.id));
    }
    state.messages[msg.id] = {msg: msg, node: node};
    if (msg.role === "assistant" && msg.id >= 0) {
      if (msg.is_final) delete state.streaming[msg.id]; else state.streaming[msg.id] = true;
    }
    var empty = log.querySelector(".empty");
    if (empty) empty.remove();
    updateButtons();
    log.scrollTop = log.scrollHeight;
  }

  function rating(id) {
    var current = load("rating:" + id);
    function btn(value, label, text) {
      var b = el("button", {class: "icon", type: "button", "aria-label": label, text: text,
                            "aria-pressed": current === String(value) ? "true" : "false"});
      b.addEventListener("click", function () {
        var again = load("rating:" + id) === String(value);
        save("rating:" + id, again ? "" : String(value));
        b.parentNode.querySelectorAll("button").forEach(function (x) { x.setAttribute("aria-pressed", "false"); });
        if (!again) b.setAttribute("aria-pressed", "true");
        rest("POST", "/feedback", {message_id: id, feedback_type: again ? 3 : value});
      });
      return b;
    }
    return el("div", {class: "rate"}, [btn(1, "Good answer", "\uD83D\uDC4D"), btn(2, "Bad answer", "\uD83D\uDC4E")]);
  }

  function clear(message) {
    log.textContent = "";
    state.messages = {};
    state.order = [];
    state.streaming = {};
    log.appendChild(el("div", {class: "empty", text: message || "Ask us anything."}));
    updateButtons();
  }

  function updateButtons() {
    var busy = Object.keys(state.streaming).length > 0;
    sendBtn.textContent = busy ? "Stop" : "Send";
    sendBtn.className = "send" + (busy ? " stop" : "");
    sendBtn.setAttribute("aria-label", busy ? "Stop the answer" : "Send");
    sendBtn.disabled = !state.connectionId;
  }

  // --- server
  function rest(method, path, body) {
    var headers = {};
    if (body) headers["Content-Type"] = "application/json";
    if (state.token) headers.Authorization = "Bearer " + state.token;
    var sep = path.indexOf("?") < 0 ? "?" : "&";
    return fetch(BASE + "/api/v1/embed/" + encodeURIComponent(CONFIG.bot) + path + sep + "session_id=" + state.key,
                 {method: method, headers: headers, body: body ? JSON.stringify(body) : undefined, mode: "cors",
                  credentials: "omit"})
      .then(function (r) { return r.json(); });
  }

  function loadHistory() {
    return rest("GET", "/messages/person").then(function (answer) {
      if (!answer || answer.code !== 0) return;
      var known = {};
      answer.data.messages.forEach(function (m) { known[m.id] = true; render(m); });
      // what history no longer has (a reset elsewhere) goes; refusals and unsent lines stay
      state.order.slice().forEach(function (id) {
        if (id >= 0 && !known[id] && state.messages[id]) { state.messages[id].node.remove(); delete state.messages[id]; }
      });
      if (!log.querySelector(".msg")) clear();
    });
  }

  function humanCheck() {
    if (!CONFIG.turnstile_site_key || state.token) return Promise.resolve();
    return new Promise(function (resolve, reject) {
      function run() {
        var box = document.createElement("div");
        document.body.appendChild(box);
        window.turnstile.render(box, {sitekey: CONFIG.turnstile_site_key, size: "invisible", callback: function (t) {
          fetch(BASE + "/api/v1/embed/" + CONFIG.bot + "/turnstile/verify", {method: "POST", mode: "cors",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({token: t})})
            .then(function (r) { return r.json(); })
            .then(function (a) { if (a.code === 0) { state.token = a.data.token; resolve(); } else reject(a); }, reject);
        }, "error-callback": reject});
      }
      if (window.turnstile) return run();
      var s = document.createElement("script");
      s.src = "https://challenges.cloudflare.com/turnstile/v0/api.js?render=explicit";
      s.async = true;
      s.onload = run;
      s.onerror = reject;
      document.head.appendChild(s);
    });
  }

  function connect() {
    if (state.ws) return;
    var url = BASE.replace(/^http/, "ws") + "/api/v1/embed/" + encodeURIComponent(CONFIG.bot) +
              "/ws/connect?session_type=person&session_id=" + state.key;
    var ws = state.ws = new WebSocket(url);
    ws.onopen = function () { ws.send(JSON.stringify({type: "authenticate", token: state.token})); };
    ws.onmessage = function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame.type === "connected") {
        state.connectionId = frame.connection_id;
        state.retries = 0;
        dot.className = "dot on";
        dot.setAttribute("aria-label", "Connected");
        loadHistory().then(flushPending);
        updateButtons();
      } else if (frame.type === "response" && frame.data) {
        if (frame.data.id < 0 && state.sent.length) state.sent.shift().classList.add("refused");  // said why
        render(frame.data);
      } else if (frame.type === "user_message" && frame.data) {
        var mine = frame.data.connection_id === state.connectionId && state.sent.length;
        if (mine) { var local = state.sent.shift(); if (local) local.remove(); }
        render(frame.data);
      } else if (frame.type === "broadcast") {
        render({id: -Date.now(), role: "assistant", content: frame.message});
      }
    };
    ws.onclose = function () {
      state.ws = null;
      state.connectionId = null;
      dot.className = "dot";
      dot.setAttribute("aria-label", "Reconnecting");
      updateButtons();
      var delay = Math.min(15000, 500 * Math.pow(2, state.retries++));
      state.retryTimer = setTimeout(function () { if (state.open) connect(); }, delay);
    };
  }

  function flushPending() {
    var waiting = state.pending;
    state.pending = [];
    waiting.forEach(function (text) { send(text); });
  }

  function send(text) {
    if (!state.ws || !state.connectionId) { state.pending.push(text); return; }
    var local = el("div", {class: "msg user", text: text});
    log.appendChild(local);
    var empty = log.querySelector(".empty");
    if (empty) empty.remove();
    state.sent.push(local);
    log.scrollTop = log.scrollHeight;
    state.ws.send(JSON.stringify({type: "message", message: [{type: "Plain", text: text}], stream: true}));
  }

  function setOpen(open) {
    state.open = open;
    save("open", open ? "1" : "0", true);
    panel.classList.toggle("open", open);
    bubble.setAttribute("aria-expanded", String(open));
    if (open) {
      humanCheck().then(connect, function () { render({id: -1, role: "assistant", content: "The human check failed."}); });
      setTimeout(function () { input.focus(); }, 0);
    }
  }

  bubble.addEventListener("click", function () { setOpen(!state.open); });
  closeBtn.addEventListener("click", function () { setOpen(false); bubble.focus(); });
  panel.addEventListener("keydown", function (e) { if (e.key === "Escape") { setOpen(false); bubble.focus(); } });
  resetBtn.addEventListener("click", function () {
    rest("POST", "/reset/person").then(function () { clear("A new conversation."); });
  });
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    if (Object.keys(state.streaming).length) {  // Stop
      if (state.ws) state.ws.send(JSON.stringify({type: "stop"}));
      return;
    }
    var text = input.value.trim();
    if (!text) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (!Object.keys(state.streaming).length) form.requestSubmit();
    }
  });

  function start() {
    document.body.appendChild(host);
    applyTheme();
    new MutationObserver(applyTheme).observe(document.body, watch);
    clear();
    if (state.open) setOpen(true);  // it was open before this page (re)loaded: resume
  }
  if (document.body) start(); else document.addEventListener("DOMContentLoaded", start);
})(/*PARLEY_WIDGET_CONFIG*/null);
