// parley.js against a real Parley server: send, lose the connection twice mid-reply, let the client reconnect
// and resume on its own, then stop the reply. Prints one JSON line for tests/test_parley_js.py to check against MongoDB.
"use strict";
const path = require("node:path");
const Parley = require(path.join(__dirname, "..", "..", "static", "parley.js"));

const [url, cutsArg, stopAt, token] = process.argv.slice(2);
const cuts = new Set(cutsArg.split(",").map(Number));
const chat = new Parley.Client({url, token, WebSocket, minDelay: 20, maxDelay: 60});
let deltas = 0;
let streamed = "";
let thinking = "";
let connects = 0;
const finals = [];
chat.on("status", (e) => { if (e.connection === "open") connects++; });
chat.on("delta", (e) => {
  streamed += e.text;
  thinking += e.thinking;
  if (cuts.has(++deltas)) chat.ws.close();  // the client never sees what was in flight on that socket
  if (deltas === Number(stopAt)) chat.stop(e.message_id);
});
chat.on("final", (e) => {
  finals.push(e);
  setTimeout(() => {  // anything late would show up as a second final or a delta
    chat.close();
    console.log(JSON.stringify({message_id: e.message_id, status: e.status, final: e.content,
      final_thinking: e.thinking, streamed, thinking, finals: finals.length, connects, deltas}));
  }, 200);
});
chat.on("error", (e) => { console.error("error frame", JSON.stringify(e)); process.exitCode = 2; });
chat.connect();
chat.send("through two drops", {client_msg_id: "e2e-1"});
setTimeout(() => { console.error("timed out"); process.exit(3); }, 15000).unref();
