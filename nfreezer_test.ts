// Tests for nfreezer.ts: the real CLI on real files, against a local repository and against a
// real OpenSSH sshd started here on 127.0.0.1 with throwaway keys. Run: deno task test
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { chunkId, openRepo, putJson, seal } from "./nfreezer.ts";

const TOOL = new URL("./nfreezer.ts", import.meta.url).pathname;
const MiB = 2 ** 20;

type Run = { code: number; stdout: string; stderr: string };
type Target = { name: string; repo: (dir: string) => string[] };

/** Runs the tool as a user would, with a throwaway HOME so no personal SSH setup leaks in. */
async function nfreezer(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const command = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", TOOL, ...args],
    env: { ...CHILD_ENV, ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
  const { code, stdout, stderr } = await command.output();
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return { code, stdout: decode(stdout), stderr: decode(stderr) };
}
const HOME = Deno.makeTempDirSync({ prefix: "nfreezer-home-" });
const DENO_DIR = Deno.env.get("DENO_DIR") ??
  join(Deno.env.get("HOME") ?? "/root", ".cache", "deno");
/** What every child gets: the test passphrase, the throwaway HOME, no agent, the same Deno cache. */
const CHILD_ENV = { NFREEZER_PASSWORD: "correct horse", HOME, SSH_AUTH_SOCK: "", DENO_DIR };

async function ok(args: string[]): Promise<string> {
  const run = await nfreezer(args);
  assert.equal(run.code, 0, `nfreezer ${args.join(" ")} failed:\n${run.stderr}`);
  return run.stdout;
}

/** Parses "N new chunks (X MiB)" and "Y MiB read" from a backup summary. */
function stored(stdout: string): { chunks: number; mib: number; readMib: number } {
  const match = /, ([\d.]+) MiB read, (\d+) new chunks \(([\d.]+) MiB\)/.exec(stdout);
  assert.ok(match, `no backup summary in: ${stdout}`);
  return { readMib: Number(match[1]), chunks: Number(match[2]), mib: Number(match[3]) };
}

function assertOneLineError(run: Run, code: number, pattern: RegExp) {
  assert.equal(run.code, code, run.stderr);
  assert.match(run.stderr, pattern);
  assert.ok(!/^\s+at /m.test(run.stderr), `stack trace in: ${run.stderr}`);
  assert.ok(
    run.stderr.split("\n").filter((line) => line.startsWith("nfreezer: error")).length === 1,
  );
}

/** A tree with the awkward cases: unicode and spaces, dotfiles, a leading dash, empty file and
 * folder, an executable, a symlink, random and compressible data. */
function makeTree(root: string): void {
  Deno.mkdirSync(join(root, "naïve dir/sub"), { recursive: true });
  Deno.mkdirSync(join(root, "empty folder"));
  Deno.writeTextFileSync(join(root, "naïve dir/sub/résumé 2024.txt"), "unicode and spaces\n");
  Deno.writeTextFileSync(join(root, ".hidden-dotfile"), "dotfile\n");
  Deno.writeTextFileSync(join(root, "-leading-dash"), "dash\n");
  Deno.writeFileSync(join(root, "empty file"), new Uint8Array());
  Deno.writeTextFileSync(join(root, "run.sh"), "#!/bin/sh\necho hi\n");
  Deno.chmodSync(join(root, "run.sh"), 0o755);
  Deno.chmodSync(join(root, "empty folder"), 0o700);
  Deno.symlinkSync("naïve dir/sub/résumé 2024.txt", join(root, "link to résumé"));
  Deno.writeFileSync(join(root, "random.bin"), randomBytes(5 * MiB + 123));
  Deno.writeTextFileSync(join(root, "compressible.txt"), "SECRET-CONTENT-MARKER ".repeat(200_000));
  Deno.utimeSync(join(root, "naïve dir"), new Date(1_600_000_000_123), new Date(1_600_000_000_123));
}

/** path -> type, mode, mtime (ms) and content hash or link target, for exact comparisons. */
function treeState(root: string, prefix = ""): Record<string, string> {
  const state: Record<string, string> = {};
  for (const item of Deno.readDirSync(join(root, prefix))) {
    const path = prefix ? `${prefix}/${item.name}` : item.name;
    const info = Deno.lstatSync(join(root, path));
    const base = `${info.mode! & 0o7777} ${info.mtime!.getTime()}`;
    if (info.isSymlink) state[path] = `link ${Deno.readLinkSync(join(root, path))} ${base}`;
    else if (info.isFile) {
      const hash = createHash("sha256").update(Deno.readFileSync(join(root, path))).digest("hex");
      state[path] = `file ${hash} ${base}`;
    } else {
      state[path] = `dir ${base}`;
      Object.assign(state, treeState(root, path));
    }
  }
  return state;
}

function repoFiles(repo: string, folder: string): string[] {
  return [...Deno.readDirSync(join(repo, folder))].map((item) => join(repo, folder, item.name));
}

/** The scenarios every repository kind must pass; `repo` gives the CLI words for a repo dir. */
async function coreScenarios(t: Deno.TestContext, target: Target) {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-test-" });
  const [source, repo, restored] = ["source", "repo", "restored"].map((name) => join(work, name));
  const repoArgs = target.repo(repo);
  try {
    Deno.mkdirSync(source);
    makeTree(source);

    await t.step(
      "round trip is exact: bytes, modes, mtimes, links, empty files and dirs",
      async () => {
        await ok(["backup", source, ...repoArgs]);
        await ok(["restore", ...repoArgs, restored]);
        assert.deepEqual(treeState(restored), treeState(source));
      },
    );

    await t.step("the repository holds no name or content in clear", () => {
      const secrets = ["naïve", "résumé", "hidden-dotfile", "leading-dash", "SECRET-CONTENT"];
      for (const folder of ["", "data", "snapshots", "locks", "tmp"]) {
        for (const file of repoFiles(repo, folder)) {
          if (Deno.statSync(file).isDirectory) continue;
          const text = new TextDecoder("latin1").decode(Deno.readFileSync(file));
          const utf8 = new TextDecoder().decode(Deno.readFileSync(file));
          for (const secret of secrets) assert.ok(!text.includes(secret) && !utf8.includes(secret));
        }
      }
    });

    await t.step("an unchanged tree uploads nothing and reads no file", async () => {
      const summary = stored(await ok(["backup", source, ...repoArgs]));
      assert.deepEqual(summary, { chunks: 0, mib: 0, readMib: 0 });
    });

    await t.step("moving, renaming or copying a 64 MiB file uploads almost nothing", async () => {
      Deno.writeFileSync(join(source, "big.bin"), randomBytes(64 * MiB));
      assert.ok(stored(await ok(["backup", source, ...repoArgs])).mib >= 64);
      Deno.mkdirSync(join(source, "moved"));
      Deno.renameSync(join(source, "big.bin"), join(source, "moved/renamed.bin"));
      const moved = stored(await ok(["backup", source, ...repoArgs]));
      assert.ok(moved.mib < 0.5 && moved.chunks <= 1, JSON.stringify(moved)); // the manifest
      Deno.copyFileSync(join(source, "moved/renamed.bin"), join(source, "copy.bin"));
      assert.ok(stored(await ok(["backup", source, ...repoArgs])).mib < 0.5);
    });

    await t.step("changing 1 byte in the middle of 64 MiB uploads one chunk", async () => {
      const file = await Deno.open(join(source, "copy.bin"), { write: true });
      await file.seek(32 * MiB + 7, Deno.SeekMode.Start);
      await file.write(new Uint8Array([42]));
      file.close();
      const changed = stored(await ok(["backup", source, ...repoArgs]));
      assert.ok(changed.mib <= 4.1 && changed.chunks <= 2, JSON.stringify(changed));
    });

    await t.step("restore into a tree with identical files does not rewrite them", async () => {
      Deno.removeSync(restored, { recursive: true });
      await ok(["restore", ...repoArgs, restored]);
      const inode = Deno.statSync(join(restored, "copy.bin")).ino;
      Deno.writeTextFileSync(join(restored, "run.sh"), "changed locally\n");
      await ok(["restore", ...repoArgs, restored]);
      assert.equal(Deno.statSync(join(restored, "copy.bin")).ino, inode);
      assert.deepEqual(treeState(restored), treeState(source));
    });

    await t.step("SIGKILL half-way, then a re-run finishes without re-sending", async () => {
      Deno.writeFileSync(join(source, "killed.bin"), randomBytes(96 * MiB));
      const before = repoFiles(repo, "data").length;
      const child = new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", TOOL, "backup", source, ...repoArgs],
        env: CHILD_ENV,
        stdout: "null",
        stderr: "null",
      }).spawn();
      while (repoFiles(repo, "data").length < before + 4) {
        await new Promise((r) => setTimeout(r, 10));
      }
      child.kill("SIGKILL");
      await child.status;
      await new Promise((r) => setTimeout(r, 1000)); // a server may finish requests already sent
      const arrived = repoFiles(repo, "data").length - before;
      const snapshots = repoFiles(repo, "snapshots").length;
      const rerun = stored(await ok(["backup", source, ...repoArgs]));
      const total = repoFiles(repo, "data").length - before;
      assert.equal(rerun.chunks, total - arrived, "chunks that had arrived were sent again");
      assert.ok(arrived < total, "the kill came too late to test anything");
      assert.equal(repoFiles(repo, "snapshots").length, snapshots + 1);
      assert.deepEqual(repoFiles(repo, "tmp"), [], "temporary files were left behind");
      assert.deepEqual(repoFiles(repo, "locks"), [], "a lock was left behind");
      Deno.removeSync(restored, { recursive: true });
      await ok(["restore", ...repoArgs, restored]);
      assert.deepEqual(treeState(restored), treeState(source));
    });

    await t.step(
      "--include restores only the named paths; --snapshot picks an older one",
      async () => {
        const ids = JSON.parse(await ok(["snapshots", ...repoArgs, "--json"])).map((
          s: { id: string },
        ) => s.id);
        const partial = join(work, "partial");
        await ok(["restore", ...repoArgs, partial, "--include", "naïve dir", "--snapshot", ids[0]]);
        assert.deepEqual(Object.keys(treeState(partial)).sort(), [
          "naïve dir",
          "naïve dir/sub",
          "naïve dir/sub/résumé 2024.txt",
        ]);
        const first = join(work, "first");
        await ok(["restore", ...repoArgs, first, "--snapshot", ids[0]]);
        assert.ok(!Deno.statSync(join(first, "random.bin")).isDirectory);
        assert.throws(() => Deno.statSync(join(first, "copy.bin")));
      },
    );

    await t.step("a wrong passphrase: one line, exit 1, nothing written", async () => {
      const target = join(work, "wrong");
      const run = await nfreezer(["restore", ...repoArgs, target], { NFREEZER_PASSWORD: "wrong" });
      assertOneLineError(run, 1, /Wrong passphrase/);
      assert.throws(() => Deno.statSync(target));
    });
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
}

/** Tampering with real repository files: every case exits 3 and names the affected paths, while
 * every other file is restored exactly and no wrong byte is left at an affected path. */
async function tamperScenarios(t: Deno.TestContext, target: Target) {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-tamper-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  const repoArgs = target.repo(repo);
  try {
    Deno.mkdirSync(source);
    Deno.writeFileSync(join(source, "big.bin"), randomBytes(6 * MiB));
    Deno.writeFileSync(join(source, "twin-a"), randomBytes(1000));
    Deno.writeFileSync(join(source, "twin-b"), randomBytes(1000));
    Deno.writeTextFileSync(join(source, "innocent.txt"), "must survive\n");
    await ok(["backup", source, ...repoArgs]);
    const bySize = () =>
      repoFiles(repo, "data").sort((a, b) => Deno.statSync(b).size - Deno.statSync(a).size);
    const largest = bySize()[0]; // the first 4 MiB chunk of big.bin
    const pristine = Deno.readFileSync(largest);

    const expectDamage = async (affected: string[]) => {
      const out = join(work, `out-${Math.random()}`);
      const run = await nfreezer(["restore", ...repoArgs, out]);
      assert.equal(run.code, 3, run.stderr);
      for (const path of affected) {
        assert.match(run.stderr, new RegExp(`cannot restore ${path}`));
        assert.throws(() => Deno.statSync(join(out, path)), `${path} was written`);
      }
      assert.equal(Deno.readTextFileSync(join(out, "innocent.txt")), "must survive\n");
      assert.deepEqual(
        [...Deno.readDirSync(out)].filter((item) => item.name.includes("nfreezer")),
        [],
      );
    };

    await t.step("a flipped byte in a chunk", async () => {
      const bytes = pristine.slice();
      bytes[bytes.length >> 1] ^= 1;
      Deno.writeFileSync(largest, bytes);
      await expectDamage(["big.bin"]);
    });
    await t.step("a truncated chunk", async () => {
      Deno.writeFileSync(largest, pristine.subarray(0, pristine.length - 100));
      await expectDamage(["big.bin"]);
    });
    await t.step("a deleted chunk", async () => {
      Deno.removeSync(largest);
      await expectDamage(["big.bin"]);
      Deno.writeFileSync(largest, pristine);
    });
    await t.step("two chunks of equal size swapped", async () => {
      const sizes = bySize().map((file) => Deno.statSync(file).size);
      const index = sizes.findIndex((size, i) => size === sizes[i + 1] && size < 4096);
      const [a, b] = [bySize()[index], bySize()[index + 1]];
      const [bytesA, bytesB] = [Deno.readFileSync(a), Deno.readFileSync(b)];
      Deno.writeFileSync(a, bytesB);
      Deno.writeFileSync(b, bytesA);
      await expectDamage(["twin-a", "twin-b"]);
      Deno.writeFileSync(a, bytesA);
      Deno.writeFileSync(b, bytesB);
    });
    await t.step("a damaged snapshot exits 3 and writes nothing", async () => {
      const [snapshot] = repoFiles(repo, "snapshots");
      const bytes = Deno.readFileSync(snapshot);
      bytes[bytes.length - 1] ^= 1;
      Deno.writeFileSync(snapshot, bytes);
      const out = join(work, "from-damaged");
      const run = await nfreezer(["restore", ...repoArgs, out]);
      assertOneLineError(run, 3, /corrupted or tampered/);
      assert.throws(() => Deno.statSync(out));
    });
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
}

const LOCAL: Target = { name: "local", repo: (dir) => [dir] };

Deno.test("local repository: core scenarios", (t) => coreScenarios(t, LOCAL));
Deno.test("local repository: tampering is detected", (t) => tamperScenarios(t, LOCAL));

Deno.test("backup() reports a file that changes while it is read, and stores no torn copy", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-busy-" });
  try {
    Deno.mkdirSync(join(work, "source"));
    Deno.writeFileSync(join(work, "source/busy.log"), randomBytes(48 * MiB));
    Deno.writeTextFileSync(join(work, "source/calm.txt"), "calm\n");
    const writer = new Deno.Command("sh", {
      args: [
        "-c",
        `for i in $(seq 1 3000); do echo x >> '${work}/source/busy.log'; sleep 0.002; done`,
      ],
    }).spawn();
    const run = await nfreezer(["backup", join(work, "source"), join(work, "repo")]);
    writer.kill();
    await writer.status;
    assertOneLineError(run, 1, /1 paths could not be backed up/);
    assert.match(run.stderr, /busy\.log: it kept changing while being read/);
    await ok(["restore", join(work, "repo"), join(work, "out")]);
    assert.deepEqual(Object.keys(treeState(join(work, "out"))), ["calm.txt"]);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("restore() refuses manifest paths that would escape the target", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-escape-" });
  try {
    Deno.env.set("NFREEZER_PASSWORD", "correct horse");
    const repo = await openRepo(join(work, "repo"), {}, true);
    const content = new TextEncoder().encode("pwned\n");
    const id = await chunkId(repo.keys, content);
    await repo.store.write(`data/${id}`, await seal(repo.keys, `data/${id}`, content));
    const file = { type: "file", mode: 0o644, mtime: 0, size: content.length, chunks: [id] };
    const paths = ["../escaped", "inner/../../escaped", "/tmp/escaped", "ok.txt"];
    const entries = paths.map((path) => ({ ...file, path }));
    const manifest = gzipSync(new TextEncoder().encode(JSON.stringify(entries)));
    const manifestId = await chunkId(repo.keys, new Uint8Array(manifest));
    await repo.store.write(
      `data/${manifestId}`,
      await seal(repo.keys, `data/${manifestId}`, manifest),
    );
    const snapshot = {
      time: new Date().toISOString(),
      host: "forged",
      source: "/",
      files: 4,
      bytes: 0,
    };
    await putJson(repo, "snapshots/00000000000000ff", { ...snapshot, manifest: [manifestId] });
    repo.store.close();
    const run = await nfreezer(["restore", join(work, "repo"), join(work, "target", "inside")]);
    assertOneLineError(run, 3, /unsafe path \.\.\/escaped/);
    assert.throws(() => Deno.statSync(join(work, "target", "escaped")));
    assert.throws(() => Deno.statSync(join(work, "escaped")));
  } finally {
    Deno.env.delete("NFREEZER_PASSWORD");
    Deno.removeSync(work, { recursive: true });
  }
});

/** Runs the tool on a pseudo-terminal (util-linux `script`), answering each prompt once it shows. */
async function onTerminal(args: string[], answers: string[]): Promise<Run> {
  const line = ["env", "-u", "NFREEZER_PASSWORD", Deno.execPath(), "run", "-A", TOOL, ...args];
  const child = new Deno.Command("script", {
    args: ["-qfec", line.map((word) => `'${word}'`).join(" "), "/dev/null"],
    env: CHILD_ENV, // env -u below removes the passphrase again
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const [writer, reader] = [child.stdin.getWriter(), child.stdout.getReader()];
  let screen = "";
  for (const answer of answers) {
    const prompts = screen.split(": ").length;
    while (screen.split(": ").length === prompts) {
      screen += new TextDecoder().decode((await reader.read()).value);
    }
    await writer.write(new TextEncoder().encode(`${answer}\r`));
  }
  for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
    screen += new TextDecoder().decode(chunk.value);
  }
  await writer.close().catch(() => {});
  const { code } = await child.status;
  await child.stderr.cancel();
  return { code, stdout: screen, stderr: "" };
}

Deno.test("the passphrase prompt does not echo and asks twice for a new repository", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-prompt-" });
  try {
    const created = await onTerminal(["init", join(work, "repo")], ["hunter2", "hunter2"]);
    assert.equal(created.code, 0, created.stdout);
    assert.match(created.stdout, /Repository passphrase: .*\s*Repeat it: /s);
    assert.ok(!created.stdout.includes("hunter2"), `the passphrase was echoed: ${created.stdout}`);
    const differ = await onTerminal(["init", join(work, "other")], ["hunter2", "hunter3"]);
    assert.equal(differ.code, 1);
    assert.match(differ.stdout, /The passphrases differ/);
    const opened = await onTerminal(["snapshots", join(work, "repo")], ["hunter2"]);
    assert.equal(opened.code, 0, opened.stdout);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("the command line: usage errors exit 2, unknown repositories exit 1", async () => {
  assertOneLineError(await nfreezer(["frobnicate"]), 2, /Unknown command/);
  assertOneLineError(await nfreezer(["backup", "/tmp"]), 2, /backup takes <source-dir> <repo>/);
  assertOneLineError(await nfreezer(["snapshots", "/x", "--include", "a"]), 2, /does not take/);
  assertOneLineError(await nfreezer(["snapshots", "/nonexistent/repo"]), 1, /No repository/);
  assert.match((await nfreezer(["--help"])).stdout, /Exit codes/);
  assert.match((await nfreezer(["restore", "--help"])).stdout, /restore +<repo> <target-dir>/);
});

// ---- SFTP: a real OpenSSH sshd on 127.0.0.1 ---------------------------------------------------

type Sshd = {
  port: number;
  dir: string;
  userKey: string;
  knownHosts: string;
  dropSessions(): Promise<void>; // kills every open connection; the listener stays up
  stop(): Promise<void>;
};

async function run(command: string, args: string[]): Promise<void> {
  const { code, stderr } = await new Deno.Command(command, { args, stderr: "piped" }).output();
  if (code !== 0) throw new Error(`${command} failed: ${new TextDecoder().decode(stderr)}`);
}

/** Starts sshd with throwaway host and user keys on a free port; null if there is no sshd. */
async function startSshd(): Promise<Sshd | null> {
  const sshd = "/usr/sbin/sshd";
  try {
    Deno.statSync(sshd);
  } catch {
    if (Deno.env.get("CI")) {
      throw new Error("CI needs /usr/sbin/sshd (apt-get install openssh-server)");
    }
    console.warn("SKIPPED: the SFTP tests need /usr/sbin/sshd (apt-get install openssh-server)");
    return null;
  }
  const dir = Deno.makeTempDirSync({ prefix: "nfreezer-sshd-" });
  for (const key of ["host_key", "user_key", "other_key"]) {
    await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(dir, key)]);
  }
  Deno.copyFileSync(join(dir, "user_key.pub"), join(dir, "authorized_keys"));
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  Deno.mkdirSync("/run/sshd", { recursive: true });
  Deno.writeTextFileSync(
    join(dir, "sshd_config"),
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${join(dir, "host_key")}`,
      `AuthorizedKeysFile ${join(dir, "authorized_keys")}`,
      "StrictModes no",
      "PidFile none",
      "UsePAM no",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "Subsystem sftp internal-sftp",
      "LogLevel ERROR",
    ].join("\n") + "\n",
  );
  const process = new Deno.Command(sshd, {
    args: ["-D", "-e", "-f", join(dir, "sshd_config")],
    stdout: "null",
    stderr: "null",
  }).spawn();
  for (let tries = 0;; tries++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      break;
    } catch (error) {
      if (tries > 100) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  const hostKey = Deno.readTextFileSync(join(dir, "host_key.pub")).split(" ").slice(0, 2).join(" ");
  const knownHosts = join(dir, "known_hosts");
  Deno.writeTextFileSync(knownHosts, `[127.0.0.1]:${port} ${hostKey}\n`);
  const stop = async () => {
    process.kill();
    await process.status;
    Deno.removeSync(dir, { recursive: true });
  };
  const dropSessions = async () => {
    await new Deno.Command("pkill", { args: ["-KILL", "-P", String(process.pid)] }).output();
  };
  return { port, dir, userKey: join(dir, "user_key"), knownHosts, dropSessions, stop };
}

Deno.test("SFTP repository against a real sshd", async (t) => {
  const server = await startSshd();
  if (!server) return;
  const user = Deno.env.get("USER") ?? new TextDecoder().decode(
    (await new Deno.Command("id", { args: ["-un"] }).output()).stdout,
  ).trim();
  const url = (dir: string) => `sftp://${user}@127.0.0.1:${server.port}${dir}`;
  const sftp: Target = {
    name: "sftp",
    repo: (dir) => [url(dir), "-i", server.userKey, "--known-hosts", server.knownHosts],
  };
  const probe = (knownHosts: string) => {
    const where = url(join(server.dir, "none"));
    return ["snapshots", where, "-i", server.userKey, "--known-hosts", knownHosts];
  };
  try {
    await t.step("core scenarios", (t) => coreScenarios(t, sftp));
    await t.step("tampering is detected", (t) => tamperScenarios(t, sftp));
    await t.step(
      "host keys: unknown refused, accepted on request, changed always refused",
      async () => {
        const knownHosts = join(server.dir, "fresh_known_hosts");
        const args = probe(knownHosts);
        assertOneLineError(
          await nfreezer(args),
          1,
          /Unknown host \[127\.0\.0\.1\]:\d+, key fingerprint SHA256:/,
        );
        assertOneLineError(await nfreezer([...args, "--accept-new-host"]), 1, /No repository/);
        assert.match(Deno.readTextFileSync(knownHosts), /^\[127\.0\.0\.1\]:\d+ ssh-ed25519 AAAA/);
        const other = Deno.readTextFileSync(join(server.dir, "other_key.pub")).split(" ").slice(
          0,
          2,
        );
        Deno.writeTextFileSync(knownHosts, `[127.0.0.1]:${server.port} ${other.join(" ")}\n`);
        assertOneLineError(
          await nfreezer([...args, "--accept-new-host"]),
          1,
          /HOST KEY .* HAS CHANGED/,
        );
      },
    );
    await t.step("~/.ssh/config Host aliases and default keys in ~/.ssh are used", async () => {
      const ssh = join(HOME, ".ssh");
      Deno.mkdirSync(ssh, { recursive: true });
      try {
        Deno.writeTextFileSync(
          join(ssh, "config"),
          `Host other\n  Port 1\nHost nfz-*\n  HostName 127.0.0.1\n  Port ${server.port}\n  User ${user}\n`,
        );
        Deno.copyFileSync(server.userKey, join(ssh, "id_ed25519"));
        const where = `nfz-alias:${join(server.dir, "none")}`;
        const run = await nfreezer(["snapshots", where, "--known-hosts", server.knownHosts]);
        assertOneLineError(run, 1, /No repository/); // connected and authenticated, no -i given
      } finally {
        Deno.removeSync(ssh, { recursive: true });
      }
    });
    await t.step("hashed known_hosts entries are understood", async () => {
      const knownHosts = join(server.dir, "hashed_known_hosts");
      Deno.copyFileSync(server.knownHosts, knownHosts);
      await run("ssh-keygen", ["-H", "-f", knownHosts]);
      assert.match(Deno.readTextFileSync(knownHosts), /^\|1\|/);
      const args = probe(knownHosts);
      assertOneLineError(await nfreezer(args), 1, /No repository/);
    });
    await t.step(
      "a connection dropped mid-backup: one line, exit 1; a re-run resumes",
      async () => {
        const work = Deno.makeTempDirSync({ prefix: "nfreezer-drop-" });
        const [source, repo, restored] = ["source", "repo", "restored"].map((name) =>
          join(work, name)
        );
        const count = () => {
          try {
            return repoFiles(repo, "data").length;
          } catch {
            return 0;
          }
        };
        try {
          Deno.mkdirSync(source);
          Deno.writeFileSync(join(source, "big.bin"), randomBytes(96 * MiB));
          const args = ["backup", source, ...sftp.repo(repo)];
          const child = new Deno.Command(Deno.execPath(), {
            args: ["run", "-A", TOOL, ...args],
            env: CHILD_ENV,
            stdout: "null",
            stderr: "piped",
          }).spawn();
          while (count() < 4) await new Promise((resolve) => setTimeout(resolve, 10));
          await server.dropSessions();
          const { code, stderr } = await child.output();
          const dropped = { code, stdout: "", stderr: new TextDecoder().decode(stderr) };
          assertOneLineError(dropped, 1, /nfreezer: error: /);
          const arrived = count();
          const rerun = stored(await ok(args));
          assert.ok(arrived < count(), "the drop came too late to test anything");
          assert.equal(rerun.chunks, count() - arrived, "chunks that had arrived were sent again");
          assert.deepEqual(repoFiles(repo, "tmp"), []);
          await ok(["restore", ...sftp.repo(repo), restored]);
          assert.deepEqual(treeState(restored), treeState(source));
        } finally {
          Deno.removeSync(work, { recursive: true });
        }
      },
    );
    await t.step("refused authentication and an unreachable host: one line, exit 1", async () => {
      const wrongKey = join(server.dir, "other_key");
      const args = ["snapshots", url("/tmp"), "-i", wrongKey, "--known-hosts", server.knownHosts];
      assertOneLineError(await nfreezer(args), 1, /SSH authentication as .* failed/);
      const closed = [
        "snapshots",
        "sftp://nobody@127.0.0.1:1/x",
        "--known-hosts",
        server.knownHosts,
      ];
      assertOneLineError(await nfreezer(closed), 1, /Cannot connect to \[127\.0\.0\.1\]:1/);
    });
  } finally {
    await server.stop();
  }
});
