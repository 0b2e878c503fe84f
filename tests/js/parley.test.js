// Logic of static/parley.js with Node's built-in runner (node --test tests/js/): no npm packages, no browser.
// A fake WebSocket and a manual clock stand in for the browser; the server side is played frame by frame.
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const Parley = require(path.join(__dirname, "..", "..", "static", "parley.js"));

class FakeSocket {
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    FakeSocket.all.push(this);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code) { this.closed = code; }
  // the server's side
  open() { this.onopen(); }
  frame(obj) { this.onmessage({data: JSON.stringify(obj)}); }
  drop(code = 1006) { this.onclose({code}); }
}
FakeSocket.all = [];

function clock() {
  const c = {now: 0, timers: new Map(), next: 1};
  c.setTimeout = (fn, ms) => { const id = c.next++; c.timers.set(id, {fn, at: c.now + ms}); return id; };
  c.clearTimeout = (id) => c.timers.delete(id);
  c.advance = (ms) => {  // run every timer due, in order, as time moves on
    const end = c.now + ms;
    for (;;) {
      const due = [...c.timers.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      c.timers.delete(due[0]);
      c.now = due[1].at;
      due[1].fn();
    }
    c.now = end;
  };
  c.pending = () => [...c.timers.values()].map((t) => t.at - c.now);
  return c;
}

function client(extra = {}) {
  FakeSocket.all = [];
  const c = clock();
  const events = [];
  const chat = new Parley.Client(Object.assign({
    url: "ws://127.0.0.1:1/api/v1/pipelines/default/ws/connect", WebSocket: FakeSocket,
    setTimeout: c.setTimeout, clearTimeout: c.clearTimeout, now: () => c.now, random: () => 0.5,
  }, extra));
  for (const e of ["message", "delta", "final", "status", "error"]) chat.on(e, (p) => events.push([e, p]));
  return {chat, clock: c, events, socket: () => FakeSocket.all[FakeSocket.all.length - 1]};
}

const reply = (id, extra) => ({type: "response", data: Object.assign({message_id: id, session_id: "s1", seq: 2,
  is_final: false}, extra)});

test("offsets count code points, not UTF-16 units", () => {
  assert.equal(Parley.cpLength("a🙂b"), 3);
  assert.equal("a🙂b".length, 4);
  assert.equal(Parley.cpSlice("déjà🙂vu", 5), "vu");
  const r = new Parley.Reply("m");
  assert.deepEqual(r.apply({offset: 0, delta: "🙂🙂"}), {text: "🙂🙂", thinking: ""});
  assert.equal(r.length, 2);
  // a replay overlapping what we hold: only the unseen part is taken
  assert.deepEqual(r.apply({offset: 1, delta: "🙂é"}), {text: "é", thinking: ""});
  assert.equal(r.apply({offset: 0, delta: "🙂🙂é"}), null);  // all seen
  assert.equal(r.text, "🙂🙂é");
  assert.throws(() => r.apply({offset: 5, delta: "x"}), /gap/);
  assert.deepEqual(r.apply({offset: 3, delta: "!", thinking_offset: 0, thinking_delta: "hm"}),
    {text: "!", thinking: "hm"});
  assert.deepEqual(r.offsets(), {offset: 4, thinking_offset: 2});
});

test("backoff is exponential with full jitter between 0.5 s and 20 s", () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const ceiling = Math.min(20000, 500 * 2 ** (attempt + 1));
    assert.equal(Parley.backoff(attempt, {random: () => 0}), 500);
    assert.ok(Math.abs(Parley.backoff(attempt, {random: () => 0.999999}) - ceiling) < 1);
  }
  assert.equal(Parley.backoff(30, {random: () => 1}), 20000);
  const seen = new Set(Array.from({length: 50}, () => Math.round(Parley.backoff(3))));
  assert.ok(seen.size > 10, "jittered");
});

test("connects with a token, sends with client_msg_id, streams and finishes once", async () => {
  const {chat, socket, events} = client({token: "t0k"});
  chat.connect();
  const ws = socket();
  assert.match(ws.url, /stream_mode=delta/);
  ws.open();
  assert.deepEqual(ws.sent[0], {type: "authenticate", token: "t0k"});
  ws.frame({type: "connected", session_id: "s1", connection_id: "c1"});
  assert.deepEqual(ws.sent[1], {type: "resume", session_id: "s1", offsets: {}});
  const acked = chat.send("hi");
  const msg = ws.sent[2];
  assert.equal(msg.type, "message");
  assert.ok(msg.client_msg_id);
  ws.frame({type: "ack", data: {client_msg_id: msg.client_msg_id, message_id: "u1", reply_message_id: "r1"}});
  assert.equal((await acked).reply_message_id, "r1");
  ws.frame(reply("r1", {offset: 0, delta: "Hel"}));
  ws.frame(reply("r1", {offset: 3, delta: "lo"}));
  ws.frame(reply("r1", {is_final: true, status: "completed", content: "Hello"}));
  ws.frame(reply("r1", {is_final: true, status: "completed", content: "Hello"}));  // a repeat is dropped
  const deltas = events.filter(([e]) => e === "delta").map(([, p]) => p.content);
  assert.deepEqual(deltas, ["Hel", "Hello"]);
  const finals = events.filter(([e]) => e === "final");
  assert.equal(finals.length, 1);
  assert.equal(finals[0][1].status, "completed");
});

test("reconnects with backoff, resends unacked sends, resumes from its offsets and drops what it has", () => {
  const {chat, socket, clock, events} = client();
  chat.connect();
  let ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  chat.send("first", {client_msg_id: "k1"});
  ws.frame({type: "ack", data: {client_msg_id: "k1", reply_message_id: "r1"}});
  ws.frame(reply("r1", {offset: 0, delta: "abc", thinking_offset: 0, thinking_delta: "t"}));
  chat.send("second", {client_msg_id: "k2"});  // its ack never arrives
  ws.drop();
  assert.equal(chat.state, "reconnecting");
  assert.deepEqual(clock.pending(), [750]);  // attempt 0, random 0.5: 500 + 0.5 * (1000 - 500)
  clock.advance(749);
  assert.equal(FakeSocket.all.length, 1);
  clock.advance(1);
  ws = socket();
  assert.equal(FakeSocket.all.length, 2);
  assert.match(ws.url, /session_id=s1/);
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  assert.deepEqual(ws.sent[0], {type: "resume", session_id: "s1", offsets: {r1: {offset: 3, thinking_offset: 1}}});
  assert.equal(ws.sent[1].client_msg_id, "k2");  // resent with the same id: the server answers a duplicate ack
  // the server resumes at our offsets; an overlapping repeat is trimmed, not doubled
  ws.frame(reply("r1", {offset: 2, delta: "cde"}));
  ws.frame(reply("r1", {is_final: true, status: "completed", content: "abcde"}));
  assert.equal(chat.reply("r1").text, "abcde");
  const last = events.filter(([e]) => e === "delta").pop()[1];
  assert.equal(last.text, "de");
});

test("a resent message acked as a duplicate resumes its reply, which may have ended while we were away", () => {
  const {chat, socket, events} = client();
  chat.connect();
  let ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  chat.send("hello", {client_msg_id: "k1"});  // stored by the server, but its ack is lost with the connection
  ws.drop();
  chat.retryNow();
  ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  assert.equal(ws.sent[1].client_msg_id, "k1");
  ws.frame({type: "ack", data: {client_msg_id: "k1", reply_message_id: "r9", duplicate: true}});
  assert.deepEqual(ws.sent[2], {type: "resume", message_id: "r9", offset: 0, thinking_offset: 0});
  ws.frame(reply("r9", {seq: 4, is_final: true, status: "completed", content: "done"}));
  assert.equal(chat.reply("r9").text, "done");
  assert.equal(events.filter(([e, p]) => e === "final" && p.message_id === "r9").length, 1);
});

test("backoff grows while the server stays away and resets once connected", () => {
  const {chat, socket, clock} = client({random: () => 1});
  chat.connect();
  const delays = [];
  for (let i = 0; i < 8; i++) {
    socket().drop();
    delays.push(clock.pending()[0]);
    clock.advance(clock.pending()[0]);
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000]);
  socket().open();
  socket().frame({type: "connected", session_id: "s1"});
  socket().drop();
  assert.deepEqual(clock.pending(), [1000]);
});

test("a stalled connection (no frame, no pong) is dropped and replaced", () => {
  const {chat, socket, clock} = client({pingInterval: 1000, stallTimeout: 3000});
  chat.connect();
  const ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  clock.advance(1000);
  assert.deepEqual(ws.sent.pop(), {type: "ping"});
  ws.frame({type: "pong"});  // alive
  clock.advance(2500);
  assert.equal(ws.closed, null);
  clock.advance(500);  // the check at 4 s: 3 s of silence since the pong
  assert.equal(ws.closed, 4000);
  assert.equal(chat.state, "reconnecting");
  ws.frame({type: "connected", session_id: "late"});  // a dead socket's late frames are ignored
  assert.equal(chat.sessionId, "s1");
  clock.advance(750);
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(chat.state, "connecting");
});

test("a hidden tab that becomes visible reconnects at once", () => {
  const listeners = {};
  const doc = {visibilityState: "hidden", addEventListener: (e, fn) => { listeners[e] = fn; }};
  const {chat, socket, clock} = client({document: doc, random: () => 1});
  chat.connect();
  socket().drop();
  socket();
  assert.equal(FakeSocket.all.length, 1);
  listeners.visibilitychange();  // still hidden: nothing
  assert.equal(FakeSocket.all.length, 1);
  doc.visibilityState = "visible";
  listeners.visibilitychange();
  assert.equal(FakeSocket.all.length, 2);
  assert.deepEqual(clock.pending(), []);  // the backoff timer was cancelled
});

test("fatal close codes do not reconnect; close() stops for good", () => {
  const {chat, socket, clock} = client();
  chat.connect();
  socket().drop(4401);
  assert.equal(chat.state, "closed");
  assert.deepEqual(clock.pending(), []);
  chat.connect();
  socket().open();
  socket().frame({type: "connected", session_id: "s1"});
  chat.close();
  assert.deepEqual(clock.pending(), []);
  assert.equal(FakeSocket.all.length, 2);
});

test("a gap asks the server for the rest; an error settles the send; an unknown reply leaves the resume", async () => {
  const {chat, socket} = client();
  chat.connect();
  const ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  ws.frame(reply("r9", {offset: 0, delta: "ab"}));
  ws.frame(reply("r9", {offset: 5, delta: "zz"}));
  assert.deepEqual(ws.sent.pop(), {type: "resume", message_id: "r9", offset: 2, thinking_offset: 0});
  assert.equal(chat.reply("r9").text, "ab");
  const sent = chat.send("x", {client_msg_id: "busy"});
  ws.frame({type: "error", code: "session_busy", request_type: "message", client_msg_id: "busy", retryable: true});
  await assert.rejects(sent, (e) => e.code === "session_busy");
  ws.frame({type: "error", code: "message_not_found", request_type: "resume", message_id: "r9"});
  assert.deepEqual(ws.sent.pop(), {type: "resume", session_id: "s1", offsets: {}});
});

test("the app's hooks: connected, other frames by type, request(), a countdown target and retryNow()", () => {
  const {chat, socket, clock} = client({random: () => 1});
  const got = {};
  for (const e of ["connected", "presence", "push", "broadcast", "session.left", "status"]) {
    chat.on(e, (p) => (got[e] = got[e] || []).push(p));
  }
  assert.equal(chat.request({type: "presence"}), false);  // not open: not sent, not queued
  chat.connect();
  const ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1", user_id: "ann"});
  assert.equal(got.connected[0].user_id, "ann");
  assert.equal(chat.request({type: "presence"}), true);
  assert.deepEqual(ws.sent.pop(), {type: "presence"});
  ws.frame({type: "presence", data: {session_id: "s1", event: "join", online: ["ann", "bo"]}});
  ws.frame({type: "push", data: {message: "hi"}});
  ws.frame({type: "broadcast", message: "maintenance"});
  ws.frame({type: "session.left", data: {session_id: "s1", reason: "removed"}});
  ws.frame({type: "pong"});
  assert.deepEqual(got.presence[0].data.online, ["ann", "bo"]);
  assert.equal(got.push[0].data.message, "hi");
  assert.equal(got.broadcast[0].message, "maintenance");
  assert.equal(got["session.left"][0].data.reason, "removed");
  // each reconnect attempt announces when the next try happens
  clock.now = 5000;
  ws.drop();
  let last = got.status.pop();
  assert.deepEqual(last, {connection: "reconnecting", retry_at: 6000});
  clock.advance(1000);
  socket().drop();
  last = got.status.pop();
  assert.equal(last.connection, "reconnecting");
  assert.equal(last.retry_at, clock.now + 2000);
  chat.retryNow();  // the user does not wait out the backoff
  assert.equal(FakeSocket.all.length, 3);
  assert.deepEqual(clock.pending(), []);
  chat.retryNow();  // only while reconnecting
  assert.equal(FakeSocket.all.length, 3);
  socket().drop(4401);  // refused credentials: closed for good, and the app is told why
  assert.deepEqual(got.status.pop(), {connection: "closed", code: 4401});
});

test("a rewind drops text never stored; resumed offsets are where the connection continues; resume says the epoch", () => {
  const {chat, socket, events} = client();
  chat.on("rewind", (p) => events.push(["rewind", p]));
  chat.connect();
  let ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  ws.frame({type: "status", data: {message_id: "r1", session_id: "s1", seq: 2, status: "streaming", epoch: 1}});
  ws.frame(reply("r1", {offset: 0, delta: "Hello, wor"}));
  // its instance died after storing "Hello, ": another continues it from there (epoch 2)
  ws.frame({type: "rewind", data: {message_id: "r1", session_id: "s1", seq: 2, epoch: 2, offset: 7,
    thinking_offset: 0, reason: "instance_lost"}});
  const rewinds = events.filter(([e]) => e === "rewind").map(([, p]) => [p.content, p.offset, p.reason]);
  assert.deepEqual(rewinds, [["Hello, ", 7, "instance_lost"]]);
  ws.frame(reply("r1", {offset: 7, delta: "there"}));
  assert.equal(chat.replies.get("r1").text, "Hello, there");
  // a late rewind of an instance still on the older owner is not ours to apply
  ws.frame({type: "rewind", data: {message_id: "r1", session_id: "s1", seq: 2, epoch: 1, offset: 3,
    thinking_offset: 0, reason: "fenced"}});
  assert.equal(chat.replies.get("r1").text, "Hello, there");
  // reconnect: the resume names the epoch of the text held; resumed's offsets win over what is held
  ws.drop();
  chat.retryNow && chat.retryNow();
  ws = socket();
  ws.open();
  ws.frame({type: "connected", session_id: "s1"});
  const resume = ws.sent.find((f) => f.type === "resume");
  assert.deepEqual(resume.offsets.r1, {offset: 12, thinking_offset: 0, epoch: 2});
  ws.frame({type: "resumed", data: {session_id: "s1", replies: [{message_id: "r1", seq: 2, status: "streaming",
    epoch: 3, offset: 9, thinking_offset: 0, length: 9, thinking_length: 0}]}});
  assert.equal(chat.replies.get("r1").text, "Hello, th");
  assert.equal(chat.replies.get("r1").epoch, 3);
  ws.frame(reply("r1", {is_final: true, status: "completed", content: "Hello, that is all"}));
  assert.equal(events.filter(([e]) => e === "final").length, 1);
});
