// Where the time and memory of one nfreezer command go: runs main() of nfreezer.ts under V8's
// sampling CPU profiler (node:inspector, in this process) and samples Deno.memoryUsage() every
// 50 ms, then prints self time by function and by kind, and the memory peaks.
//   deno run -A bench/profile.ts OUT.cpuprofile backup ~/data /tmp/repo -q
//   LIVE=3 deno run -A bench/profile.ts OUT.cpuprofile backup ...   (see LIVE below)
// OUT.cpuprofile opens in Chrome DevTools (Performance) or speedscope. (Deno 2.9 has no
// --cpu-prof.) "(idle)" is the JS thread waiting: on I/O, on ssh, or on WebCrypto, whose work
// runs on Deno's blocking thread pool and so is not in this profile; user/sys CPU seconds of the
// whole process (all threads) are printed from getrusage for that reason.
import { Session } from "node:inspector";
import process from "node:process";
import { main } from "../nfreezer.ts";

const [out, ...args] = Deno.args;
const session = new Session();
session.connect();
const post = (method: string, params = {}) =>
  // deno-lint-ignore no-explicit-any
  new Promise<any>((done, fail) =>
    session.post(method, params, (error, result) => error ? fail(error) : done(result))
  );
const peak = { rss: 0, heapUsed: 0, heapTotal: 0, external: 0 };
const sample = () => {
  const now = Deno.memoryUsage();
  for (const key of Object.keys(peak) as (keyof typeof peak)[]) {
    peak[key] = Math.max(peak[key], now[key]);
  }
};
const timer = setInterval(sample, 50);
// LIVE=N: every N seconds a full GC, then the heap still in use: the live set, as opposed to the
// garbage V8 has not yet collected (this run's times are then not representative).
let live = 0;
const liveTimer = Deno.env.get("LIVE") &&
  setInterval(async () => {
    await post("HeapProfiler.collectGarbage");
    live = Math.max(live, Deno.memoryUsage().heapUsed);
  }, 1000 * Number(Deno.env.get("LIVE")));
await post("Profiler.enable");
await post("Profiler.setSamplingInterval", { interval: 500 });
await post("Profiler.start");
const started = performance.now();
const code = await main(args);
const wall = (performance.now() - started) / 1000;
const { profile } = await post("Profiler.stop");
clearInterval(timer);
if (liveTimer) clearInterval(liveTimer);
sample();
await Deno.writeTextFile(out, JSON.stringify(profile));

// Self time per node: each sample is one node; timeDeltas[i] is the time before sample i.
type Node = { id: number; callFrame: { functionName: string; url: string; lineNumber: number } };
const nodes = new Map<number, Node>(profile.nodes.map((node: Node) => [node.id, node]));
const self = new Map<string, number>();
const kinds = new Map<string, number>();
let total = 0;
profile.samples.forEach((id: number, at: number) => {
  const { functionName, url, lineNumber } = nodes.get(id)!.callFrame;
  const micros = profile.timeDeltas[at + 1] ?? 0;
  const file = url.split("/").at(-1) || "";
  const name = `${functionName || "(anonymous)"} ${file}${file ? `:${lineNumber + 1}` : ""}`;
  const kind = functionName.startsWith("(")
    ? functionName
    : functionName.startsWith("op_")
    ? "Deno ops (calls into Rust, synchronous part)"
    : !url
    ? "V8 built-ins (WebCrypto's JS-side copies, Promise, ...)"
    : url.includes("nfreezer.ts")
    ? "nfreezer.ts"
    : url.includes("ssh2")
    ? "npm:ssh2"
    : url.startsWith("ext:") || url.startsWith("node:")
    ? "Deno runtime and node: modules"
    : "other";
  self.set(name, (self.get(name) ?? 0) + micros);
  kinds.set(kind, (kinds.get(kind) ?? 0) + micros);
  total += micros;
});
const usage = process.resourceUsage();
const seconds = (micros: number) => (micros / 1e6).toFixed(2).padStart(7);
const percent = (micros: number) => `${(100 * micros / total).toFixed(1).padStart(5)}%`;
console.error(
  `\nexit ${code}; wall ${wall.toFixed(2)} s; process CPU: user ${
    (usage.userCPUTime / 1e6).toFixed(2)
  } s, system ${(usage.systemCPUTime / 1e6).toFixed(2)} s (all threads, ssh not included)`,
);
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(0)} MiB`;
console.error(
  `peaks (50 ms samples): rss ${mib(peak.rss)}, V8 heap used ${mib(peak.heapUsed)} of ${
    mib(peak.heapTotal)
  }, external (ArrayBuffers) ${mib(peak.external)}${
    liveTimer ? `; live heap after a full GC: ${mib(live)} at most` : ""
  }`,
);
console.error("\nJS thread time by kind:");
for (const [kind, micros] of [...kinds].sort((a, b) => b[1] - a[1])) {
  console.error(`${seconds(micros)} s ${percent(micros)}  ${kind}`);
}
console.error("\nTop functions by self time:");
for (const [name, micros] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 25)) {
  console.error(`${seconds(micros)} s ${percent(micros)}  ${name}`);
}
Deno.exit(code);
