// Streams a 16-bit WAV through Deepgram's Node SDK (@deepgram/sdk) to the gateway's
// /v1/listen as a user's code does, and prints what the SDK handed the application as one
// JSON object: {"messages": [...], "errors": [...], "close": code, "webvtt": ...}.
// Run by tests/e2e/test_deepgram.py:  node stream.mjs AUDIO ws://HOST:PORT [k=v ...]
import { readFileSync } from "node:fs";
import { DeepgramClient } from "@deepgram/sdk";
import { webvtt, DeepgramConverter } from "@deepgram/captions";

const CHUNK_S = 0.25;

function readWav(path) {
  const b = readFileSync(path);
  const rate = b.readUInt32LE(24);
  let at = 12;
  while (b.toString("ascii", at, at + 4) !== "data") at += 8 + b.readUInt32LE(at + 4);
  return { pcm: b.subarray(at + 8, at + 8 + b.readUInt32LE(at + 4)), rate };
}

const [audio, url, ...pairs] = process.argv.slice(2);
const { pcm, rate } = readWav(audio);
const params = { model: "nova-3", encoding: "linear16", sample_rate: String(rate) };
for (const p of pairs) {
  const i = p.indexOf("=");
  params[p.slice(0, i)] = p.slice(i + 1);
}
const http = url.replace(/^ws/, "http");
const client = new DeepgramClient({
  apiKey: "unused",
  environment: { base: http, production: url, agent: url, agentRest: http },
});
const messages = [];
const errors = [];
const conn = await client.listen.v1.connect({ ...params, reconnectAttempts: 0 });
const closed = new Promise((resolve) => conn.on("close", (e) => resolve(e?.code ?? null)));
conn.on("message", (m) => messages.push(m));
conn.on("error", (e) => errors.push(String(e?.message ?? e)));
conn.connect();
await conn.waitForOpen();
const step = Math.round(rate * 2 * CHUNK_S);
for (let i = 0; i < pcm.length; i += step) conn.sendMedia(pcm.subarray(i, i + step));
conn.sendCloseStream({ type: "CloseStream" });
const close = await closed;
const finals = messages.filter((m) => m.type === "Results" && m.is_final && m.channel.alternatives[0].words.length);
let vtt = "";
if (finals.length) {
  const response = {
    metadata: messages.find((m) => m.type === "Metadata") ?? {},
    results: {
      channels: [{ alternatives: [finals[0].channel.alternatives[0]] }],
      utterances: finals.map((f) => ({ ...f.channel.alternatives[0], start: f.start, end: f.start + f.duration })),
    },
  };
  vtt = webvtt(new DeepgramConverter(response));
}
// exit only once the whole report is written: a pipe takes it in pieces
process.stdout.write(JSON.stringify({ messages, errors, close, webvtt: vtt }), () => process.exit(0));
