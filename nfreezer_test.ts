// Tests for nfreezer.ts: the real CLI on real files, against a local repository and against a
// real OpenSSH sshd started here on 127.0.0.1 with throwaway keys. Run: deno task test
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { dirname, join } from "node:path";
import { gzipSync } from "node:zlib";
import { chunkId, openRepo, putJson, seal } from "./nfreezer.ts";

Deno.test("nfreezer.ts stays under its 800-line ceiling (goal: 600), lines of at most 100", () => {
  const lines = Deno.readTextFileSync(new URL("./nfreezer.ts", import.meta.url)).split("\n");
  const count = lines.length - 1; // as wc -l counts
  assert.ok(count < 800, `nfreezer.ts has ${count} lines: the ceiling is 800`);
  assert.deepEqual(lines.filter((line) => line.length > 100), []);
});

const TOOL = new URL("./nfreezer.ts", import.meta.url).pathname;
const MiB = 2 ** 20;
// deno-lint-ignore no-explicit-any
type Untyped = any; // JSON documents edited by the tamper tests

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

/** Parses "X MiB read, Y MiB sent in N new chunks" from a backup summary. */
function stored(stdout: string): { chunks: number; mib: number; readMib: number } {
  const match = /; ([\d.]+) MiB read, ([\d.]+) MiB sent in (\d+) new chunks/.exec(stdout);
  assert.ok(match, `no backup summary in: ${stdout}`);
  return { readMib: Number(match[1]), mib: Number(match[2]), chunks: Number(match[3]) };
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
  Deno.writeTextFileSync(
    join(root, "n".repeat(240)),
    "a long name: the restore's temporary is not longer\n",
  );
  Deno.writeFileSync(join(root, "empty file"), new Uint8Array());
  Deno.writeTextFileSync(join(root, "run.sh"), "#!/bin/sh\necho hi\n");
  Deno.chmodSync(join(root, "run.sh"), 0o755);
  Deno.chmodSync(join(root, "empty folder"), 0o700);
  Deno.symlinkSync("naïve dir/sub/résumé 2024.txt", join(root, "link to résumé"));
  Deno.writeFileSync(join(root, "random.bin"), randomBytes(5 * MiB + 123));
  Deno.writeTextFileSync(join(root, "compressible.txt"), "SECRET-CONTENT-MARKER ".repeat(200_000));
  Deno.utimeSync(join(root, "naïve dir"), new Date(1_600_000_000_123), new Date(1_600_000_000_123));
  Deno.chmodSync(root, 0o750); // the root's own mode and time are restored too
}

/** path -> type, mode, mtime (ms) and content hash or link target, for exact comparisons; the
 * root itself is ".". */
function treeState(root: string, prefix = ""): Record<string, string> {
  const info = Deno.lstatSync(root);
  const state: Record<string, string> = prefix
    ? {}
    : { ".": `dir ${info.mode! & 0o7777} ${info.mtime!.getTime()}` };
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
      "--snapshot picks an older snapshot, by a unique prefix of its id",
      async () => {
        const ids = JSON.parse(await ok(["snapshots", ...repoArgs, "--json"])).map((
          s: { id: string },
        ) => s.id.slice(0, 6));
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

Deno.test("the backup summary counts new, changed, unchanged and removed files", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-summary-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    for (const name of ["keep.txt", "change.txt", "remove.txt"]) {
      Deno.writeTextFileSync(join(source, name), `${name}\n`);
    }
    assert.match(await ok(["backup", source, repo]), /: 3 new, 0 changed, 0 unchanged, 0 removed/);
    Deno.removeSync(join(source, "remove.txt"));
    Deno.writeTextFileSync(join(source, "change.txt"), "changed, and longer\n");
    Deno.writeTextFileSync(join(source, "new.txt"), "new\n");
    const summary = await ok(["backup", source, repo]);
    assert.match(summary, /: 1 new, 1 changed, 1 unchanged, 1 removed files; [\d.]+ MiB read/);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

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
    assertOneLineError(run, 1, /1 problem \(see the warnings above\)/);
    assert.match(run.stderr, /busy\.log: it kept changing while being read/);
    await ok(["restore", join(work, "repo"), join(work, "out")]);
    assert.deepEqual(Object.keys(treeState(join(work, "out"))), [".", "calm.txt"]);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

// ---- Hostile repositories and restore targets -------------------------------------------------

/** Writes a snapshot with the given manifest entries into a local repository, as only a holder of
 * the keys could (a second machine sharing the repository). `content` is stored as one chunk. */
async function forgeSnapshot(
  repoDir: string,
  entries: (id: string) => unknown[],
  name: string,
  forged: { host?: string; source?: string; json?: Uint8Array } = {},
) {
  Deno.env.set("NFREEZER_PASSWORD", CHILD_ENV.NFREEZER_PASSWORD);
  const repo = await openRepo(repoDir, {}, true);
  try {
    const put = async (bytes: Uint8Array<ArrayBuffer>) => {
      const id = await chunkId(repo.keys, bytes);
      await repo.store.write(`data/${id}`, await seal(repo.keys, `data/${id}`, bytes));
      return id;
    };
    const id = await put(new TextEncoder().encode("pwned\n"));
    const json = forged.json ?? new TextEncoder().encode(JSON.stringify(entries(id)));
    const manifest = new Uint8Array(gzipSync(json, { level: 1 }));
    const time = new Date().toISOString();
    const [host, source] = [forged.host ?? "forged", forged.source ?? "/"];
    const snapshot = { time, host, source, files: 1, bytes: 6 };
    const chunks = [await put(manifest)];
    await putJson(repo, `snapshots/${name}`, {
      ...snapshot,
      manifest: { size: manifest.length, chunks },
    });
  } finally {
    repo.store.close();
    Deno.env.delete("NFREEZER_PASSWORD");
  }
}

Deno.test("forged manifests are refused whole: escapes, duplicates, entries under a non-folder, bad fields", async (t) => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-forged-" });
  const [repo, victim] = [join(work, "repo"), join(work, "victim")];
  try {
    Deno.mkdirSync(repo);
    Deno.mkdirSync(victim);
    Deno.writeTextFileSync(join(victim, "file"), "precious\n");
    Deno.chmodSync(join(victim, "file"), 0o600);
    const root = { path: "", type: "dir", mode: 0o755, mtime: 0 };
    const file = (path: string, id: string, extra = {}) => ({
      path,
      type: "file",
      mode: 0o644,
      mtime: 0,
      size: 6,
      chunks: [id],
      ...extra,
    });
    const link = (path: string, target: string) => ({
      path,
      type: "symlink",
      mode: 0o777,
      mtime: 0,
      target,
    });
    const cases: Record<string, (id: string) => unknown[]> = {
      "a path escaping with ..": (id) => [root, file("../escaped", id)],
      "a path escaping deeper": (
        id,
      ) => [root, { ...root, path: "inner" }, file("inner/../../escaped", id)],
      "an absolute path": (id) => [root, file("/tmp/escaped", id)],
      "a repeated path (mode 07777, then a link to the victim)": (
        id,
      ) => [root, file("l", id, { mode: 0o7777 }), link("l", join(victim, "file"))],
      "an entry under a file": (id) => [root, file("f", id), file("f/x", id)],
      "an entry under a link": (id) => [root, link("l", victim), file("l/file", id)],
      "a file without chunks": (id) => [root, file("f", id, { chunks: undefined })],
      "chunks that do not fit the size": (id) => [root, file("f", id, { size: 5 * MiB })],
      "a mode out of range": (id) => [root, file("f", id, { mode: 0o10000 })],
      "an mtime that is not a number": (id) => [root, file("f", id, { mtime: "soon" })],
      "an mtime that is null": (id) => [root, file("f", id, { mtime: null })],
      "terminal control codes in a path": (id) => [root, file("\x1b]0;pwned\x07/../x", id)],
      "a chunk id that is a path": (_id) => [root, file("f", "../config")],
      "no root entry": (id) => [file("f", id)],
      "not an array": (_id) => ({ path: "f" }) as unknown as unknown[],
    };
    for (const [name, entries] of Object.entries(cases)) {
      await t.step(name, async () => {
        Deno.removeSync(repo, { recursive: true }); // a new repository for each case
        await forgeSnapshot(repo, entries, "00000000000000ff");
        const target = join(work, "target", "inside");
        const run = await nfreezer(["restore", repo, target]);
        assertOneLineError(run, 3, /The manifest of snapshot 00000000000000ff .*is corrupted/);
        assert.ok(
          !run.stderr.includes("\x1b") && !run.stderr.includes("\x07"),
          "control codes shown",
        );
        assert.throws(() => Deno.statSync(join(work, "target", "escaped")));
        assert.throws(() => Deno.statSync(join(work, "escaped")));
        assert.equal(Deno.readTextFileSync(join(victim, "file")), "precious\n");
        assert.equal(Deno.statSync(join(victim, "file")).mode! & 0o7777, 0o600);
        assert.throws(() => Deno.statSync(target), "the target was made: the refusal came late");
      });
    }
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a local repository whose tmp/ is a link deletes nothing it leads to (exit 3)", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-tmplink-" });
  const [source, repo, victim] = ["source", "repo", "victim"].map((name) => join(work, name));
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    await ok(["backup", source, repo]);
    Deno.writeTextFileSync(join(repo, "tmp", "not-ours.txt"), "a name we never write\n");
    await ok(["backup", source, repo]);
    assert.ok(
      Deno.statSync(join(repo, "tmp", "not-ours.txt")).isFile,
      "a foreign name was deleted",
    );
    Deno.mkdirSync(victim);
    for (const name of ["precious.txt", "0123456789abcdef"]) {
      Deno.writeTextFileSync(join(victim, name), "x");
    }
    Deno.removeSync(join(repo, "tmp"), { recursive: true });
    Deno.symlinkSync(victim, join(repo, "tmp"));
    assertOneLineError(await nfreezer(["backup", source, repo]), 3, /tmp is not a folder/);
    assert.deepEqual([...Deno.readDirSync(victim)].map((item) => item.name).sort(), [
      "0123456789abcdef",
      "precious.txt",
    ]);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("restore replaces links in the target, never writing, chmodding or timing through them", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-links-" });
  const [source, repo, target, outside] = ["source", "repo", "target", "outside"].map((name) =>
    join(work, name)
  );
  try {
    Deno.mkdirSync(outside, { mode: 0o755 });
    Deno.writeTextFileSync(join(outside, "victim.txt"), "victim\n");
    const before = treeState(outside);
    Deno.mkdirSync(source);
    Deno.symlinkSync(outside, join(source, "d"));
    await ok(["backup", source, repo]); // S1: d -> outside
    Deno.removeSync(join(source, "d"));
    Deno.mkdirSync(join(source, "d"), { mode: 0o700 });
    Deno.writeTextFileSync(join(source, "d", "authorized_keys"), "ssh-ed25519 attacker\n");
    Deno.writeTextFileSync(join(source, "f"), "f\n");
    Deno.chmodSync(join(source, "f"), 0o4755);
    await ok(["backup", source, repo]); // S2: d/ is a folder, f a file
    const [first] = JSON.parse(await ok(["snapshots", repo, "--json"])).map((s: { id: string }) =>
      s.id
    );
    await ok(["restore", repo, target, "--snapshot", first]);
    assert.ok(Deno.lstatSync(join(target, "d")).isSymlink);
    Deno.symlinkSync(join(outside, "victim.txt"), join(target, "f"));
    await ok(["restore", repo, target]);
    assert.deepEqual(treeState(outside), before, "something outside the target changed");
    assert.deepEqual(treeState(target), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a gzip bomb for a manifest is refused (exit 3) without inflating it whole", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-bomb-" });
  try {
    const json = new Uint8Array(300 * MiB + 2).fill(32); // 300 MiB of JSON spaces around "[]"
    json.set(new TextEncoder().encode("[]"), json.length - 2);
    await forgeSnapshot(join(work, "repo"), () => [], "00000000000000bb", { json });
    const run = await nfreezer(["restore", join(work, "repo"), join(work, "target")]);
    assertOneLineError(run, 3, /The manifest of snapshot 00000000000000bb is corrupted/);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a forged parent cannot pass a folder entry off as an unchanged file", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-parent-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "f.txt"), "the real content\n");
    await ok(["backup", source, repo]);
    const { mtime, size } = Deno.statSync(join(source, "f.txt"));
    const root = { path: "", type: "dir", mode: 0o755, mtime: 0 };
    const fake = { path: "f.txt", type: "dir", mode: 0o755, mtime: mtime!.getTime(), size };
    const entries = () => [root, { ...fake, chunks: ["0".repeat(64)] }];
    await forgeSnapshot(repo, entries, "ffffffffffffffff", { host: Deno.hostname(), source });
    Deno.utimeSync(join(repo, "snapshots", "ffffffffffffffff"), new Date(), new Date());
    assert.match(await ok(["backup", source, repo]), /: 1 new, 0 changed, 0 unchanged/);
    Deno.removeSync(join(repo, "snapshots", "ffffffffffffffff"));
    await ok(["restore", repo, join(work, "out")]);
    assert.deepEqual(treeState(join(work, "out")), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a parent whose manifest is lost: backup names it, reads everything, exits 3", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-orphan-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    await ok(["backup", source, repo]);
    const before = new Set(repoFiles(repo, "data"));
    Deno.writeTextFileSync(join(source, "b.txt"), "b\n");
    await ok(["backup", source, repo]);
    for (const file of repoFiles(repo, "data").filter((file) => !before.has(file))) {
      Deno.removeSync(file); // b.txt's chunk and the new manifest
    }
    const orphan = await nfreezer(["backup", source, repo]);
    assert.equal(orphan.code, 3, orphan.stderr);
    assert.match(orphan.stderr, /no parent: Cannot read data\/\w+: it is missing/);
    assert.match(orphan.stdout, /: 2 new, 0 changed, 0 unchanged/);
    assert.match(await ok(["backup", source, repo]), /: 0 new, 0 changed, 2 unchanged/);
    await ok(["restore", repo, join(work, "out")]);
    assert.deepEqual(treeState(join(work, "out")), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("restore replaces a hard link with the right bytes but another mode, and leaves its twin alone", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-hardlink-" });
  const [source, repo, target, outside] = ["source", "repo", "target", "outside"].map((name) =>
    join(work, name)
  );
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "pub"), "same bytes\n");
    Deno.chmodSync(join(source, "pub"), 0o755);
    await ok(["backup", source, repo]);
    Deno.mkdirSync(target);
    Deno.mkdirSync(outside);
    Deno.writeTextFileSync(join(outside, "victim"), "same bytes\n");
    Deno.chmodSync(join(outside, "victim"), 0o600);
    Deno.linkSync(join(outside, "victim"), join(target, "pub"));
    const before = treeState(outside);
    await ok(["restore", repo, target]);
    assert.deepEqual(treeState(outside), before);
    assert.deepEqual(treeState(target), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("restore: a target that is a file is one error; a killed restore's leftovers go", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-target-" });
  const [source, repo, target] = ["source", "repo", "target"].map((name) => join(work, name));
  try {
    Deno.mkdirSync(join(source, "sub"), { recursive: true });
    for (let i = 0; i < 50; i++) Deno.writeTextFileSync(join(source, "sub", `f${i}`), `${i}\n`);
    await ok(["backup", source, repo]);
    Deno.writeTextFileSync(join(work, "a-file"), "x\n");
    const run = await nfreezer(["restore", repo, join(work, "a-file")]);
    assertOneLineError(run, 1, /a-file/);
    assert.ok(!run.stderr.includes("warning"), run.stderr);
    await ok(["restore", repo, target]);
    Deno.writeTextFileSync(join(target, ".f1.nfreezer-0badcafe"), ""); // as a SIGKILL leaves them
    Deno.writeTextFileSync(join(target, "sub", ".f2.nfreezer-12345678"), "partial");
    await ok(["restore", repo, target]);
    assert.deepEqual(treeState(target), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("hostile repository objects exit 3 in one line, and memory stays bounded", async (t) => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-hostile-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeFileSync(join(source, "a.bin"), randomBytes(100_000));
    await ok(["backup", source, repo]);
    const config = Deno.readTextFileSync(join(repo, "config"));
    const edits: Record<string, (config: Untyped) => void> = {
      "a config without kdf": (config) => delete config.kdf,
      "a config with a numeric salt": (config) => (config.kdf.salt = 12345),
      "a config with log2N 21, r 1": (config) => Object.assign(config.kdf, { log2N: 21, r: 1 }),
      "a config with 1 GiB of scrypt memory": (config) => Object.assign(config.kdf, { log2N: 20 }),
    };
    for (const [name, edit] of Object.entries(edits)) {
      await t.step(name, async () => {
        const value = JSON.parse(config);
        edit(value);
        Deno.writeTextFileSync(join(repo, "config"), JSON.stringify(value));
        assertOneLineError(await nfreezer(["snapshots", repo]), 3, /config/);
      });
    }
    Deno.writeTextFileSync(join(repo, "config"), config);
    await t.step("a folder in place of a chunk", async () => {
      const [chunk] = repoFiles(repo, "data").filter((file) => Deno.statSync(file).size > 90_000);
      const bytes = Deno.readFileSync(chunk);
      Deno.removeSync(chunk);
      Deno.mkdirSync(chunk);
      const run = await nfreezer(["restore", repo, join(work, "out1")]);
      assert.equal(run.code, 3, run.stderr);
      assert.match(run.stderr, /cannot restore a\.bin: Cannot read data\/\w+: /);
      Deno.removeSync(chunk);
      Deno.writeFileSync(chunk, bytes);
    });
    await t.step("a FIFO in place of a snapshot does not hang", async () => {
      const fifo = join(repo, "snapshots", "fifofifofifofifo".replace(/[^a-f]/g, "0"));
      await run("mkfifo", [fifo]);
      const listed = await nfreezer(["snapshots", repo]);
      assert.equal(listed.code, 3, listed.stderr);
      assert.match(listed.stderr, /snapshots\/f0f0f0f0f0f0f0f0 is corrupted/);
      Deno.removeSync(fifo);
    });
    await t.step("1,000 links to a 4 MiB junk file in snapshots/: refused unread", async () => {
      const junk = join(work, "junk");
      Deno.writeFileSync(junk, randomBytes(4 * MiB));
      for (let i = 0; i < 1000; i++) {
        Deno.linkSync(
          junk,
          join(repo, "snapshots", (0xa000000000000000n + BigInt(i)).toString(16)),
        );
      }
      const backed = await nfreezer(["backup", source, repo]);
      assert.equal(backed.code, 3, backed.stderr);
      assert.match(backed.stderr, /Cannot read snapshots\/a000000000000000: it is too large/);
      assert.match(backed.stdout, /Snapshot \w+: 0 new, 0 changed, 1 unchanged/); // the parent opened
    });
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("one damaged old snapshot: backup, snapshots and restore go on, name it, exit 3", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-damaged-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    await ok(["backup", source, repo]);
    const [old] = repoFiles(repo, "snapshots");
    await ok(["backup", source, repo]);
    const bytes = Deno.readFileSync(old);
    bytes[bytes.length - 1] ^= 1;
    Deno.writeFileSync(old, bytes);
    const name = old.split("/").at(-1)!;
    const backed = await nfreezer(["backup", source, repo]);
    assert.equal(backed.code, 3, backed.stderr);
    assert.match(backed.stderr, new RegExp(`skipped: snapshots/${name} is corrupted`));
    assert.match(backed.stdout, /1 unchanged/);
    const listed = await nfreezer(["snapshots", repo]);
    assert.equal(listed.code, 3);
    assert.equal(listed.stdout.trim().split("\n").length, 2);
    const restored = await nfreezer(["restore", repo, join(work, "out")]);
    assert.equal(restored.code, 3);
    assert.deepEqual(treeState(join(work, "out")), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("locks: a live lock keeps tmp/ as it is; a stale lock of this host goes, and tmp/ with it", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-locks-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    await ok(["backup", source, repo]);
    const lock = async (pid: number) => {
      Deno.env.set("NFREEZER_PASSWORD", CHILD_ENV.NFREEZER_PASSWORD);
      const opened = await openRepo(repo, {}, false);
      await putJson(opened, "locks/00000000000000aa", { host: Deno.hostname(), pid });
      opened.store.close();
      Deno.env.delete("NFREEZER_PASSWORD");
    };
    const leftover = join(repo, "tmp", "0123456789abcdef"); // as a killed backup leaves it
    Deno.writeTextFileSync(leftover, "partial");
    await lock(Deno.pid); // a backup that runs: this test process
    await ok(["backup", source, repo]);
    assert.ok(Deno.statSync(leftover).isFile, "a running backup's temporary file was deleted");
    const dead = new Deno.Command("true").spawn();
    await dead.status;
    await lock(dead.pid); // a backup whose process is gone
    await ok(["backup", source, repo]);
    assert.deepEqual(repoFiles(repo, "locks"), []);
    assert.deepEqual(repoFiles(repo, "tmp"), []);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

/** Runs the tool on a pseudo-terminal (util-linux `script`), answering each prompt once it shows. */
async function onTerminal(args: string[], answers: (string | Uint8Array)[] = []): Promise<Run> {
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
    const bytes = typeof answer === "string" ? new TextEncoder().encode(answer) : answer;
    await writer.write(Uint8Array.from([...bytes, 13]));
  }
  for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) {
    screen += new TextDecoder().decode(chunk.value);
  }
  await writer.close().catch(() => {});
  const { code } = await child.status;
  await child.stderr.cancel();
  return { code, stdout: screen, stderr: "" };
}

Deno.test("the passphrase prompt: no echo, asked twice when new, strict UTF-8, backspace by character", async () => {
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
    const bytes = (text: string) => [...new TextEncoder().encode(text)];
    const edited = new Uint8Array([...bytes("hunté"), 127, ...bytes("er2")]); // é is 2 bytes
    const erased = await onTerminal(["snapshots", join(work, "repo")], [edited]);
    assert.equal(erased.code, 0, erased.stdout);
    const invalid = await onTerminal(["snapshots", join(work, "repo")], [
      new Uint8Array([0x68, 0xff, 0x32]),
    ]);
    assert.equal(invalid.code, 1);
    assert.match(invalid.stdout, /not valid UTF-8/);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("the command line: usage, --version, and errors that say what to do", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-cli-" });
  try {
    assertOneLineError(await nfreezer(["frobnicate"]), 2, /Unknown command/);
    assertOneLineError(await nfreezer(["backup", "/tmp"]), 2, /backup takes <source-dir> <repo>/);
    assertOneLineError(await nfreezer(["snapshots", "/x", "--exclude", "a"]), 2, /does not take/);
    const misspelt = await nfreezer(["snapshots", "/x", "--pasword-file", "f"]);
    assertOneLineError(misspelt, 2, /Unknown option '--pasword-file'$/m);
    assert.equal(misspelt.stderr.trim().split("\n").length, 2, misspelt.stderr); // error and hint
    assert.match(misspelt.stderr, /hint: see deno run -A nfreezer\.ts --help/);
    const none = await nfreezer(["snapshots", join(work, "nothing")]);
    assertOneLineError(none, 1, /No repository at/);
    assert.match(none.stderr, /hint: create one with: deno run -A nfreezer\.ts init /);
    assert.match((await nfreezer(["--help"])).stdout, /Exit codes/);
    assert.match((await nfreezer(["restore", "--help"])).stdout, /restore +<repo> <target-dir>/);
    assert.match(
      (await nfreezer(["--version"])).stdout,
      /^nfreezer \d+\.\d+\.\d+, repository format \d+\n$/,
    );
    const PATH = `${dirname(Deno.execPath())}:${Deno.env.get("PATH")}`; // run as ./nfreezer.ts:
    const direct = await new Deno.Command(TOOL, {
      args: ["--version"],
      env: { ...CHILD_ENV, PATH },
    })
      .output(); // its first line's V8 flags must be ones this Deno accepts
    assert.equal(direct.code, 0, new TextDecoder().decode(direct.stderr));
    assert.match(new TextDecoder().decode(direct.stdout), /^nfreezer \d+\.\d+\.\d+, repository/);
    const missing = await nfreezer(["backup", join(work, "no-such-source"), join(work, "repo")]);
    assertOneLineError(missing, 1, /No such file or directory.*no-such-source/);
    Deno.writeTextFileSync(join(work, "file"), "x");
    assertOneLineError(await nfreezer(["init", join(work, "file")]), 1, /file is not a folder/);
    const noTerminal = await nfreezer(["init", join(work, "repo")], { NFREEZER_PASSWORD: "" });
    assertOneLineError(noTerminal, 1, /passphrase is needed/);
    assert.match(noTerminal.stderr, /--password-file .*\$NFREEZER_PASSWORD/);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

// ---- SFTP: real OpenSSH sshd (internal-sftp, then gesftpserver) and rclone serve sftp -----------

type Sshd = {
  port: number;
  dir: string;
  user: string;
  userKey: string;
  knownHosts: string;
  stop(): Promise<void>;
};

async function run(command: string, args: string[]): Promise<void> {
  const { code, stderr } = await new Deno.Command(command, { args, stderr: "piped" }).output();
  if (code !== 0) throw new Error(`${command} failed: ${new TextDecoder().decode(stderr)}`);
}

function requireTool(path: string, apt: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    if (Deno.env.get("CI")) throw new Error(`CI needs ${path} (apt-get install ${apt})`);
    console.warn(`SKIPPED: this test needs ${path} (apt-get install ${apt})`);
    return false;
  }
}

async function waitForPort(port: number): Promise<void> {
  for (let tries = 0;; tries++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return;
    } catch (error) {
      if (tries > 200) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  listener.close();
  return listener.addr.port;
}

const USER = Deno.env.get("USER") ?? new TextDecoder().decode(
  new Deno.Command("id", { args: ["-un"] }).outputSync().stdout,
).trim();

/** Starts an SFTP server with throwaway host and user keys on a free port: OpenSSH's sshd with the
 * given sftp subsystem, or rclone serve sftp; null if it is not installed (outside CI). */
async function startServer(kind: "sshd" | "gesftpserver" | "rclone"): Promise<Sshd | null> {
  const binary = {
    sshd: "/usr/sbin/sshd",
    gesftpserver: "/usr/libexec/gesftpserver",
    rclone: "/usr/bin/rclone",
  }[kind];
  if (
    !requireTool(
      binary,
      { sshd: "openssh-server", gesftpserver: "gesftpserver", rclone: "rclone" }[kind],
    )
  ) return null;
  const dir = Deno.makeTempDirSync({ prefix: `nfreezer-${kind}-` });
  for (const key of ["host_key", "user_key", "other_key"]) {
    await run("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(dir, key)]);
  }
  Deno.copyFileSync(join(dir, "user_key.pub"), join(dir, "authorized_keys"));
  const port = freePort();
  const subsystem = kind === "gesftpserver" ? "/usr/libexec/gesftpserver" : "internal-sftp";
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
      `Subsystem sftp ${subsystem}`,
      "LogLevel ERROR",
    ].join("\n") + "\n",
  );
  const args = kind === "rclone"
    ? [
      "serve",
      "sftp",
      join(dir, "served"),
      "--addr",
      `127.0.0.1:${port}`,
      "--key",
      join(dir, "host_key"),
      "--authorized-keys",
      join(dir, "authorized_keys"),
      "--config",
      "/dev/null",
      "-q",
    ]
    : ["-D", "-e", "-f", join(dir, "sshd_config")];
  if (kind === "rclone") Deno.mkdirSync(join(dir, "served"));
  const process = new Deno.Command(kind === "rclone" ? binary : "/usr/sbin/sshd", {
    args,
    stdout: "null",
    stderr: "null",
  }).spawn();
  await waitForPort(port);
  const hostKey = Deno.readTextFileSync(join(dir, "host_key.pub")).split(" ").slice(0, 2).join(" ");
  const knownHosts = join(dir, "known_hosts");
  Deno.writeTextFileSync(knownHosts, `[127.0.0.1]:${port} ${hostKey}\n`);
  const stop = async () => {
    process.kill();
    await process.status;
    Deno.removeSync(dir, { recursive: true });
  };
  return { port, dir, user: USER, userKey: join(dir, "user_key"), knownHosts, stop };
}

Deno.test("SFTP repository through OpenSSH against a real sshd", async (t) => {
  const server = await startServer("sshd");
  if (!server) return;
  const url = (dir: string) => `sftp://${USER}@127.0.0.1:${server.port}${dir}`;
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
      "host keys: unknown refused, accepted on request (hashed), changed refused",
      async () => {
        const knownHosts = join(server.dir, "fresh_known_hosts");
        const args = probe(knownHosts);
        const unknown = await nfreezer(args);
        assertOneLineError(unknown, 1, /SSH connection to .* ended/);
        assert.match(unknown.stderr, /Host key verification failed/);
        assertOneLineError(await nfreezer([...args, "--accept-new-host"]), 1, /No repository/);
        assert.match(
          Deno.readTextFileSync(knownHosts),
          /^(\|1\|\S+|\[127\.0\.0\.1\]:\d+) ssh-ed25519 AAAA/,
        );
        assertOneLineError(await nfreezer(args), 1, /No repository/); // now known
        const other = Deno.readTextFileSync(join(server.dir, "other_key.pub")).split(" ").slice(
          0,
          2,
        );
        Deno.writeTextFileSync(knownHosts, `[127.0.0.1]:${server.port} ${other.join(" ")}\n`);
        const changed = await nfreezer([...args, "--accept-new-host"]);
        assertOneLineError(changed, 1, /SSH connection to .* ended/);
        assert.match(changed.stderr, /REMOTE HOST IDENTIFICATION HAS CHANGED/);
      },
    );
    await t.step("a user's ssh_config cannot turn host-key checking off", async () => {
      const config = join(server.dir, "lax_config");
      Deno.writeTextFileSync(config, "Host *\n  StrictHostKeyChecking no\n");
      const run = await nfreezer(probe(join(server.dir, "empty_known_hosts")), {
        NFREEZER_SSH: `ssh -F ${config}`,
      });
      assert.match(run.stderr, /Host key verification failed/);
    });
    await t.step("hashed known_hosts entries are understood", async () => {
      const knownHosts = join(server.dir, "hashed_known_hosts");
      Deno.copyFileSync(server.knownHosts, knownHosts);
      await run("ssh-keygen", ["-H", "-f", knownHosts]);
      assert.match(Deno.readTextFileSync(knownHosts), /^\|1\|/);
      assertOneLineError(await nfreezer(probe(knownHosts)), 1, /No repository/);
    });
    await t.step(
      "an ssh config alias (HostName, Port, User, IdentityFile) and ProxyJump",
      async () => {
        const config = join(server.dir, "ssh_config");
        const host = (name: string) =>
          `Host ${name}\n  HostName 127.0.0.1\n  Port ${server.port}\n  User ${USER}\n  IdentityFile ${server.userKey}\n  UserKnownHostsFile ${server.knownHosts}\n`;
        Deno.writeTextFileSync(
          config,
          `${host("nfz-alias")}${host("nfz-jump")}  ProxyJump nfz-alias\n`,
        );
        const env = { NFREEZER_SSH: `ssh -F ${config}` };
        for (const alias of ["nfz-alias", "nfz-jump"]) {
          const work = Deno.makeTempDirSync({ prefix: "nfreezer-alias-" });
          try {
            Deno.mkdirSync(join(work, "source"));
            Deno.writeTextFileSync(join(work, "source", "a.txt"), `through ${alias}\n`);
            const repo = `${alias}:${join(work, "repo")}`;
            assert.equal((await nfreezer(["backup", join(work, "source"), repo], env)).code, 0);
            assert.equal((await nfreezer(["restore", repo, join(work, "out")], env)).code, 0);
            assert.deepEqual(treeState(join(work, "out")), treeState(join(work, "source")));
          } finally {
            Deno.removeSync(work, { recursive: true });
          }
        }
      },
    );
    await t.step("ssh killed mid-backup: one line, exit 1; a re-run resumes", async () => {
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
        await new Deno.Command("pkill", { args: ["-KILL", "-P", String(child.pid), "-x", "ssh"] })
          .output();
        const { code, stderr } = await child.output();
        const dropped = { code, stdout: "", stderr: new TextDecoder().decode(stderr) };
        assertOneLineError(dropped, 1, /The SSH connection to .* ended|No response from server/);
        await new Promise((r) => setTimeout(r, 500)); // the server may finish requests already sent
        const arrived = count();
        const rerun = stored(await ok(args));
        assert.ok(arrived < count(), "the kill came too late to test anything");
        assert.equal(rerun.chunks, count() - arrived, "chunks that had arrived were sent again");
        assert.deepEqual(repoFiles(repo, "tmp"), []);
        await ok(["restore", ...sftp.repo(repo), restored]);
        assert.deepEqual(treeState(restored), treeState(source));
      } finally {
        Deno.removeSync(work, { recursive: true });
      }
    });
    await t.step(
      "refused authentication, an unreachable host, a folder that cannot be made",
      async () => {
        const wrongKey = join(server.dir, "other_key");
        const args = ["snapshots", url("/tmp"), "-i", wrongKey, "--known-hosts", server.knownHosts];
        const refused = await nfreezer(args);
        assertOneLineError(refused, 1, /SSH connection to .* ended/);
        assert.match(refused.stderr, /Permission denied/);
        const closed = [
          "snapshots",
          "sftp://nobody@127.0.0.1:1/x",
          "--known-hosts",
          server.knownHosts,
        ];
        const unreachable = await nfreezer(closed);
        assertOneLineError(unreachable, 1, /SSH connection to nobody@127\.0\.0\.1 ended/);
        assert.match(unreachable.stderr, /Connection refused/);
        Deno.writeTextFileSync(join(server.dir, "a-file"), "x");
        const under = await nfreezer(["init", ...sftp.repo(join(server.dir, "a-file", "repo"))]);
        assertOneLineError(under, 1, /Cannot mkdir .*a-file\/repo: /);
      },
    );
  } finally {
    await server.stop();
  }
});

/** First and incremental backup, then both snapshots restored exactly: the minimum any SFTP
 * server must carry, with objects larger than one SFTP write. */
async function otherServerScenario(server: Sshd, base: string) {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-server-" });
  const source = join(work, "source");
  const repo = [
    `sftp://${server.user}@127.0.0.1:${server.port}${base}`,
    "-i",
    server.userKey,
    "--known-hosts",
    server.knownHosts,
  ];
  try {
    Deno.mkdirSync(join(source, "sub"), { recursive: true });
    Deno.writeFileSync(join(source, "big.bin"), randomBytes(5 * MiB + 7));
    Deno.writeTextFileSync(join(source, "sub", "small.txt"), "small\n");
    Deno.symlinkSync("sub/small.txt", join(source, "link"));
    Deno.mkdirSync(join(source, "many"));
    for (let i = 0; i < 400; i++) Deno.writeTextFileSync(join(source, "many", `${i}`), `${i}\n`);
    await ok(["backup", source, ...repo]); // many objects in flight: within the server's handles
    const first = treeState(source);
    Deno.writeTextFileSync(join(source, "sub", "small.txt"), "changed\n");
    Deno.writeFileSync(join(source, "more.bin"), randomBytes(300_000));
    assert.ok(stored(await ok(["backup", source, ...repo])).mib < 1);
    const ids = JSON.parse(await ok(["snapshots", ...repo, "--json"])).map((s: { id: string }) =>
      s.id
    );
    await ok(["restore", ...repo, join(work, "first"), "--snapshot", ids[0]]);
    await ok(["restore", ...repo, join(work, "second"), "--snapshot", ids[1]]);
    assert.deepEqual(treeState(join(work, "first")), first);
    assert.deepEqual(treeState(join(work, "second")), treeState(source));
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
}

Deno.test("SFTP servers that are not OpenSSH's: gesftpserver and rclone serve sftp", async (t) => {
  for (const kind of ["gesftpserver", "rclone"] as const) {
    const server = await startServer(kind);
    if (!server) continue;
    try {
      const base = kind === "rclone" ? "/repo" : join(server.dir, "repo");
      await t.step(kind, () => otherServerScenario(server, base));
    } finally {
      await server.stop();
    }
  }
});
