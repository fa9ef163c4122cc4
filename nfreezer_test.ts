// Tests for nfreezer.ts: the real CLI on real files, against a local repository and against a
// real OpenSSH sshd started here on 127.0.0.1 with throwaway keys. Run: deno task test
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { dirname, join } from "node:path";
import { gzipSync } from "node:zlib";
import {
  chunkId,
  importKeys,
  openRepo,
  padme,
  putJson,
  seal,
  unlockConfig,
  wrapMaster,
} from "./nfreezer.ts";

Deno.test("nfreezer.ts stays under its 900-line ceiling (goal: 600), lines of at most 100", () => {
  const lines = Deno.readTextFileSync(new URL("./nfreezer.ts", import.meta.url)).split("\n");
  const count = lines.length - 1; // as wc -l counts
  assert.ok(count < 900, `nfreezer.ts has ${count} lines: the ceiling is 900`);
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

/** The ids `snapshots` lists (one snapshot a line, id first), oldest first. */
async function snapshotIds(repoArgs: string[]): Promise<string[]> {
  const lines = (await ok(["snapshots", ...repoArgs])).split("\n").filter((line) => line !== "");
  return lines.map((line) => {
    const match = /^([0-9a-f]{16})\s/.exec(line);
    assert.ok(match, `not a snapshot line: ${line}`);
    return match[1];
  });
}

/** Parses "N already there" (files found identical, not written) from a restore summary. */
function alreadyThere(stdout: string): number {
  const match = /^Restored snapshot [0-9a-f]{16}: .*?(\d+) already there/m.exec(stdout);
  assert.ok(match, `no restore summary in: ${stdout}`);
  return Number(match[1]);
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

/** True if something (even a dangling link) is at path. */
function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
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
        await ok(["init", ...repoArgs]);
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
        const ids = (await snapshotIds(repoArgs)).map((id) => id.slice(0, 6));
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
    await ok(["init", ...repoArgs]);
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
    await t.step("bytes appended to a chunk", async () => {
      Deno.writeFileSync(largest, new Uint8Array([...pristine, 0]));
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

Deno.test("the backup summary counts new, changed and unchanged files of all, and bytes", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-summary-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    for (const name of ["keep.txt", "change.txt", "remove.txt"]) {
      Deno.writeTextFileSync(join(source, name), `${name}\n`);
    }
    await ok(["init", repo]);
    assert.match(
      await ok(["backup", source, repo]),
      /^Snapshot [0-9a-f]{16}: 3 new, 0 changed, 0 unchanged of 3 files; /m,
    );
    Deno.removeSync(join(source, "remove.txt"));
    Deno.writeTextFileSync(join(source, "change.txt"), "changed, and longer\n");
    Deno.writeTextFileSync(join(source, "new.txt"), "new\n");
    const summary = await ok(["backup", source, repo]);
    assert.match(
      summary,
      /: 1 new, 1 changed, 1 unchanged of 3 files; [\d.]+ MiB of [\d.]+ MiB; [\d.]+ MiB read, [\d.]+ MiB sent in \d+ new chunks; [\d.]+ s$/m,
    );
    const restored = await ok(["restore", repo, join(work, "out")]);
    assert.equal(alreadyThere(restored), 0);
    assert.equal(alreadyThere(await ok(["restore", repo, join(work, "out")])), 3);
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
    await ok(["init", join(work, "repo")]);
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

type Put = (bytes: Uint8Array<ArrayBuffer>) => Promise<string>;

/** Writes a snapshot with the given manifest entries into a local repository (made with `init` if
 * there is none), as only a holder of the keys could (a second machine sharing the repository).
 * `content` is stored as one chunk; `forged.manifest` may replace the snapshot's manifest field. */
async function forgeSnapshot(
  repoDir: string,
  entries: (id: string) => unknown[],
  name: string,
  forged: {
    host?: string;
    source?: string;
    json?: Uint8Array;
    manifest?: (put: Put) => Promise<unknown>;
  } = {},
) {
  if (!exists(join(repoDir, "config"))) await ok(["init", repoDir]);
  Deno.env.set("NFREEZER_PASSWORD", CHILD_ENV.NFREEZER_PASSWORD); // openRepo reads and deletes it
  const repo = await openRepo(repoDir, {});
  try {
    const put: Put = async (bytes) => {
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
    await putJson(repo, `snapshots/${name}`, {
      ...snapshot,
      manifest: forged.manifest
        ? await forged.manifest(put)
        : { size: manifest.length, chunks: [await put(manifest)] },
    });
  } finally {
    repo.store.connection.end();
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
      "lone surrogates: \\ud800/f and \\udc00/f, two paths that are one on disk": (id) => [
        root,
        { ...root, path: "\ud800" },
        file("\ud800/f", id),
        { ...root, path: "\udc00" },
        file("\udc00/f", id, { mode: 0o4777 }),
      ],
      "a lone surrogate in a file name": (id) => [root, file("f\udfff", id)],
    };
    for (const [name, entries] of Object.entries(cases)) {
      await t.step(name, async () => {
        const forged = join(repo, "snapshots", "00000000000000ff");
        if (exists(forged)) Deno.removeSync(forged); // the only snapshot in the repository
        await forgeSnapshot(repo, entries, "00000000000000ff");
        const target = join(work, "target", "inside");
        const run = await nfreezer(["restore", repo, target]);
        assertOneLineError(run, 3, /[Mm]anifest .*00000000000000ff.* is corrupted/);
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
    await ok(["init", repo]);
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
    const linked = await nfreezer(["backup", source, repo]);
    assertOneLineError(linked, 3, /\/tmp is corrupted or tampered with/);
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
    await ok(["init", repo]);
    await ok(["backup", source, repo]); // S1: d -> outside
    Deno.removeSync(join(source, "d"));
    Deno.mkdirSync(join(source, "d"), { mode: 0o700 });
    Deno.writeTextFileSync(join(source, "d", "authorized_keys"), "ssh-ed25519 attacker\n");
    Deno.writeTextFileSync(join(source, "f"), "f\n");
    Deno.chmodSync(join(source, "f"), 0o1755); // what a chmod through the link would show
    await ok(["backup", source, repo]); // S2: d/ is a folder, f a file
    const [first] = await snapshotIds([repo]);
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
    assertOneLineError(run, 3, /[Mm]anifest .*00000000000000bb is corrupted/);
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
    await ok(["init", repo]);
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
    await ok(["init", repo]);
    await ok(["backup", source, repo]);
    const before = new Set(repoFiles(repo, "data"));
    Deno.writeTextFileSync(join(source, "b.txt"), "b\n");
    await ok(["backup", source, repo]);
    for (const file of repoFiles(repo, "data").filter((file) => !before.has(file))) {
      Deno.removeSync(file); // b.txt's chunk and the new manifest
    }
    const orphan = await nfreezer(["backup", source, repo]);
    assert.equal(orphan.code, 3, orphan.stderr);
    assert.match(orphan.stderr, /the parent snapshot: Cannot read data\/\w+: it is missing/);
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
    await ok(["init", repo]);
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

Deno.test("restore: a target that is a file is one error; temporaries stay in one private folder; user files are kept", async (t) => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-target-" });
  const [source, repo, target] = ["source", "repo", "target"].map((name) => join(work, name));
  const scratchOf = (folder: string) =>
    [...Deno.readDirSync(folder)].filter((item) => item.name.startsWith(".nfreezer-restore-"));
  try {
    Deno.mkdirSync(join(source, "sub"), { recursive: true });
    for (let i = 0; i < 50; i++) Deno.writeTextFileSync(join(source, "sub", `f${i}`), `${i}\n`);
    Deno.writeFileSync(join(source, "big.bin"), randomBytes(64 * MiB));
    Deno.writeTextFileSync(join(source, ".notes.nfreezer-0badf00d"), "the user's own notes\n");
    await ok(["init", repo]);
    await ok(["backup", source, repo]);

    await t.step("a target that is a file: one line that names it", async () => {
      Deno.writeTextFileSync(join(work, "a-file"), "x\n");
      const run = await nfreezer(["restore", repo, join(work, "a-file")]);
      assertOneLineError(run, 1, /a-file is not a folder/);
      assert.ok(!/warning|File exists|mkdir/.test(run.stderr), run.stderr);
      assert.equal(Deno.readTextFileSync(join(work, "a-file")), "x\n");
    });

    await t.step(
      "temporaries: one private 0700 folder, never beside the files; a killed restore's goes",
      async () => {
        Deno.mkdirSync(target, { mode: 0o755 });
        const child = new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", TOOL, "restore", repo, target],
          env: CHILD_ENV,
          stdout: "null",
          stderr: "null",
        }).spawn();
        let finished = false;
        child.status.then(() => (finished = true));
        const beside = new Set<string>(); // names that are neither the snapshot's nor the folder
        let scratch = "";
        while (!finished) {
          try {
            for (const folder of [target, join(target, "sub")]) {
              for (const item of Deno.readDirSync(folder)) {
                const known = exists(join(source, folder === target ? "" : "sub", item.name));
                if (!known && !item.name.startsWith(".nfreezer-restore-")) beside.add(item.name);
              }
            }
            const [found] = scratchOf(target);
            if (found && [...Deno.readDirSync(join(target, found.name))].length > 0) {
              scratch = found.name;
              assert.equal(Deno.lstatSync(join(target, scratch)).mode! & 0o7777, 0o700);
              child.kill("SIGKILL");
              break;
            }
          } catch (error) {
            if (!(error instanceof Deno.errors.NotFound)) throw error; // renamed meanwhile
          }
          await new Promise((resolve) => setTimeout(resolve, 1));
        }
        await child.status;
        assert.ok(scratch !== "", "the restore ended before a private folder with a file was seen");
        assert.match(scratch, /^\.nfreezer-restore-[0-9a-f]{16}$/);
        assert.deepEqual([...beside], [], "temporary names beside the user's files");
        assert.ok(exists(join(target, scratch)), "the killed restore's folder is there");
        await ok(["restore", repo, target]);
        assert.deepEqual(scratchOf(target), [], "the killed restore's folder is still there");
        assert.deepEqual(treeState(target), treeState(source));
      },
    );

    await t.step("user files named like old temporaries are left alone", async () => {
      Deno.writeTextFileSync(join(target, ".f1.nfreezer-0badcafe"), ""); // as old versions left
      Deno.writeTextFileSync(join(target, "sub", ".f2.nfreezer-12345678"), "the user's\n");
      Deno.writeTextFileSync(join(target, "sub", "f3"), "changed, so restored again\n");
      const expected = treeState(source);
      const before = treeState(target);
      await ok(["restore", repo, target]);
      const after = treeState(target);
      for (const path of [".f1.nfreezer-0badcafe", "sub/.f2.nfreezer-12345678"]) {
        assert.equal(after[path], before[path], `${path} was touched`);
        delete after[path];
      }
      assert.deepEqual(after, expected);
      assert.equal(
        Deno.readTextFileSync(join(target, "sub", ".f2.nfreezer-12345678")),
        "the user's\n",
      );
      assert.deepEqual(scratchOf(target), []);
    });
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
    await ok(["init", repo]);
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
      assert.match(listed.stderr, /warning: skipped snapshot f0f0f0f0f0f0f0f0: /);
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
    await ok(["init", repo]);
    await ok(["backup", source, repo]);
    const [old] = repoFiles(repo, "snapshots");
    await ok(["backup", source, repo]);
    const bytes = Deno.readFileSync(old);
    bytes[bytes.length - 1] ^= 1;
    Deno.writeFileSync(old, bytes);
    const name = old.split("/").at(-1)!;
    const backed = await nfreezer(["backup", source, repo]);
    assert.equal(backed.code, 3, backed.stderr);
    assert.match(
      backed.stderr,
      new RegExp(`skipped snapshot ${name}: snapshots/${name} is corrupted`),
    );
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
    await ok(["init", repo]);
    await ok(["backup", source, repo]);
    const lock = async (pid: number) => {
      Deno.env.set("NFREEZER_PASSWORD", CHILD_ENV.NFREEZER_PASSWORD);
      const opened = await openRepo(repo, {});
      await putJson(opened, "locks/00000000000000aa", { host: Deno.hostname(), pid });
      opened.store.connection.end();
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

Deno.test("a write that fails once its file is made leaves nothing: init says why, backup leaves no lock", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-efbig-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  /** The tool with a file size limit of 0: a file can be made, but any write to it fails (EFBIG). */
  const limited = async (args: string[]): Promise<Run> => {
    const script = `trap '' XFSZ; ulimit -f 0; exec "$0" run -A "$@"`;
    const { code, stderr } = await new Deno.Command("bash", {
      args: ["-c", script, Deno.execPath(), TOOL, ...args],
      env: CHILD_ENV,
      stdout: "null",
      stderr: "piped",
    }).output();
    return { code, stdout: "", stderr: new TextDecoder().decode(stderr) };
  };
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    assertOneLineError(await limited(["init", repo]), 1, /Cannot write config: /);
    assert.ok(!exists(join(repo, "config")), "a partial config was left");
    Deno.removeSync(repo, { recursive: true });
    await ok(["init", repo]);
    const backup = await limited(["backup", source, repo]);
    assertOneLineError(backup, 1, /Cannot write locks\/[0-9a-f]{16}\.new: /);
    assert.deepEqual(repoFiles(repo, "locks"), [], "a partial lock was left");
    assert.deepEqual(repoFiles(repo, "tmp"), []);
    await ok(["backup", source, repo]);
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
  let [screen, ended] = ["", false];
  for (const answer of answers) {
    const prompts = screen.split(": ").length;
    while (!ended && screen.split(": ").length === prompts) {
      const chunk = await reader.read();
      if (chunk.done) ended = true; // it exited without asking: no more answers
      else screen += new TextDecoder().decode(chunk.value);
    }
    if (ended) break;
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

Deno.test("no passphrase given: even on a terminal, one line with a hint, nothing made (no prompt)", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-prompt-" });
  try {
    const run = await onTerminal(["init", join(work, "repo")], ["hunter2", "hunter2"]);
    assert.equal(run.code, 1, run.stdout);
    assert.match(run.stdout, /error: A passphrase is needed/);
    assert.match(run.stdout, /hint: .*--password-file FILE .*\$NFREEZER_PASSWORD/);
    assert.ok(!exists(join(work, "repo")), "init made something");
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("the command line: usage, errors that say what to do, and ./nfreezer.ts runs", async () => {
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
    const PATH = `${dirname(Deno.execPath())}:${Deno.env.get("PATH")}`; // run as ./nfreezer.ts:
    const direct = await new Deno.Command(TOOL, {
      args: ["--help"],
      env: { ...CHILD_ENV, PATH },
    })
      .output(); // its first line's V8 flags must be ones this Deno accepts
    assert.equal(direct.code, 0, new TextDecoder().decode(direct.stderr));
    assert.match(new TextDecoder().decode(direct.stdout), /^Usage: .*\n[^]*Exit codes/);
    await ok(["init", join(work, "real")]);
    const missing = await nfreezer(["backup", join(work, "no-such-source"), join(work, "real")]);
    assertOneLineError(missing, 1, /No such file or directory.*no-such-source/);
    Deno.writeTextFileSync(join(work, "file"), "x");
    const notFolder = await nfreezer(["backup", join(work, "file"), join(work, "real")]);
    assertOneLineError(notFolder, 1, /file is not a folder/);
    assert.deepEqual(repoFiles(join(work, "real"), "snapshots"), []);
    assertOneLineError(await nfreezer(["init", join(work, "file")]), 1, /file is not a folder/);
    const noTerminal = await nfreezer(["init", join(work, "repo")], { NFREEZER_PASSWORD: "" });
    assertOneLineError(noTerminal, 1, /passphrase is needed/);
    assert.match(noTerminal.stderr, /--password-file .*\$NFREEZER_PASSWORD/);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("--help's first line names the version", async () => {
  const run = await nfreezer(["--help"]);
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stdout.split("\n")[0], /^Usage: .*\bnfreezer \d+\.\d+\.\d+\b/);
});

// ---- Data safety, round 3 (issue 13): creation, restore targets, backup sources, input ---------

/** Runs the tool and waits for it, at most `seconds`: then it is killed and the test fails. */
async function within(seconds: number, args: string[], env: Record<string, string> = {}) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", TOOL, ...args],
    env: { ...CHILD_ENV, ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), seconds * 1000);
  const { code, stdout, stderr, signal } = await child.output();
  clearTimeout(timer);
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  assert.equal(signal, null, `nfreezer ${args.join(" ")} hung: killed after ${seconds} s`);
  return { code, stdout: decode(stdout), stderr: decode(stderr) };
}

/** What the loser of two inits at once says. Known gap: when it loses the race on a folder (both
 * saw it missing, the winner made it first) it says "Cannot create <folder>: file already exists"
 * (over SFTP: ": Failure"), not "Another run created a repository". */
const LOST_RACE = /Another run created a repository|is a repository already|Cannot create /;

/** The names in a folder, sorted. */
const names = (folder: string) => [...Deno.readDirSync(folder)].map((item) => item.name).sort();

Deno.test("init: of two at once into one new folder exactly one wins, and its passphrase opens it", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-race-" });
  try {
    for (let round = 0; round < 3; round++) {
      const repo = join(work, `repo${round}`);
      const passphrases = [`first ${round}`, `second ${round}`];
      const runs = await Promise.all(
        passphrases.map((NFREEZER_PASSWORD) => nfreezer(["init", repo], { NFREEZER_PASSWORD })),
      );
      const winners = runs.filter((run) => run.code === 0);
      assert.equal(winners.length, 1, runs.map((run) => run.stderr).join("\n"));
      const loser = runs.find((run) => run.code !== 0)!;
      assertOneLineError(loser, 1, LOST_RACE);
      const [winner, other] = runs[0].code === 0 ? passphrases : passphrases.toReversed();
      assert.equal((await nfreezer(["snapshots", repo], { NFREEZER_PASSWORD: winner })).code, 0);
      const wrong = await nfreezer(["snapshots", repo], { NFREEZER_PASSWORD: other });
      assertOneLineError(wrong, 1, /Wrong passphrase/);
      assert.deepEqual(names(join(repo, "tmp")), []);
    }
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("backup never creates a repository: a missing or empty location exits 1, names init, makes nothing", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-noinit-" });
  const source = join(work, "source");
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    Deno.mkdirSync(join(work, "empty"));
    Deno.mkdirSync(join(work, "mounted"));
    Deno.writeTextFileSync(join(work, "mounted", "photos.txt"), "someone else's disk\n");
    for (const place of ["freezr", "unmounted/usb/freezer", "empty", "mounted"]) {
      const repo = join(work, place);
      const before = treeState(work);
      const run = await nfreezer(["backup", source, repo]);
      assertOneLineError(run, 1, new RegExp(`No repository at ${repo}$`, "m"));
      assert.match(
        run.stderr,
        new RegExp(`hint: create one with: .*nfreezer\\.ts init ${repo}$`, "m"),
      );
      assert.deepEqual(treeState(work), before, `backup into ${place} changed something`);
    }
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("init makes missing parents, refuses a non-empty folder and an existing repository", async (t) => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-init-" });
  const [source, repo] = [join(work, "source"), join(work, "a", "b c", "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    await t.step("missing parents are made, as mkdir -p does", async () => {
      await ok(["init", repo]);
      assert.deepEqual(names(repo), ["config", "data", "locks", "snapshots", "tmp"]);
      await ok(["backup", source, repo]);
    });
    await t.step("an empty folder (a freshly mounted disk) becomes a repository", async () => {
      Deno.mkdirSync(join(work, "empty"));
      await ok(["init", join(work, "empty")]);
      assert.ok(exists(join(work, "empty", "config")));
    });
    await t.step("a folder holding anything else is refused and left as it was", async () => {
      const other = join(work, "documents");
      Deno.mkdirSync(other);
      Deno.writeTextFileSync(join(other, "notes.txt"), "mine\n");
      const before = treeState(other);
      const run = await nfreezer(["init", other]);
      assertOneLineError(run, 1, /documents is not empty, and not a repository/);
      assert.deepEqual(treeState(other), before);
    });
    await t.step(
      "an existing repository is refused and keeps its config and passphrase",
      async () => {
        const config = Deno.readFileSync(join(repo, "config"));
        const run = await nfreezer(["init", repo], { NFREEZER_PASSWORD: "another" });
        assertOneLineError(run, 1, /is a repository already/);
        assert.deepEqual(Deno.readFileSync(join(repo, "config")), config);
        assert.equal((await snapshotIds([repo])).length, 1);
      },
    );
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a repository inside its own source is skipped, with one warning", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-inside-" });
  const source = join(work, "source");
  const repo = join(source, "backups", "repo");
  try {
    Deno.mkdirSync(join(source, "backups"), { recursive: true });
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    Deno.writeTextFileSync(join(source, "backups", "b.txt"), "b\n");
    Deno.symlinkSync(source, join(work, "alias")); // the repository named through a link
    await ok(["init", repo]);
    for (const location of [repo, join(work, "alias", "backups", "repo")]) {
      const run = await nfreezer(["backup", source, location]);
      assert.equal(run.code, 0, run.stderr);
      const warnings = run.stderr.split("\n").filter((line) => line.includes("warning"));
      assert.equal(warnings.length, 1, run.stderr);
      assert.match(warnings[0], /skipped backups\/repo: it is the repository/);
      assert.match(run.stdout, /of 2 files; /);
    }
    await ok(["restore", repo, join(work, "out")]);
    assert.deepEqual(Object.keys(treeState(join(work, "out"))).sort(), [
      ".",
      "a.txt",
      "backups",
      "backups/b.txt",
    ]);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("restore never sets the setuid or setgid bit (owners are not restored)", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-setuid-" });
  const [source, repo, out] = ["source", "repo", "out"].map((name) => join(work, name));
  try {
    Deno.mkdirSync(join(source, "shared"), { recursive: true });
    const modes: Record<string, number> = {
      "suid": 0o4755,
      "sgid": 0o2755,
      "both": 0o6711,
      "sticky": 0o1644,
      "shared/plain": 0o640,
    };
    for (const [path, mode] of Object.entries(modes)) {
      Deno.writeTextFileSync(join(source, path), `${path}\n`);
      Deno.chmodSync(join(source, path), mode);
    }
    Deno.chmodSync(join(source, "shared"), 0o3775); // setgid and sticky folder
    await ok(["init", repo]);
    await ok(["backup", source, repo]);
    for (const path of [...Object.keys(modes), "shared"]) { // what restore should give
      Deno.chmodSync(join(source, path), Deno.lstatSync(join(source, path)).mode! & 0o1777);
    }
    const first = await ok(["restore", repo, out]);
    assert.equal(Deno.statSync(join(out, "suid")).mode! & 0o7777, 0o755);
    assert.deepEqual(treeState(out), treeState(source));
    assert.equal(alreadyThere(first), 0);
    assert.equal(alreadyThere(await ok(["restore", repo, out])), 5); // modes compared as restored
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("restore as root refuses a target others can write to, and folders in it another user owns", async (t) => {
  if (Deno.uid() !== 0) {
    console.warn("SKIPPED: this test runs as root (the check is root's)");
    return;
  }
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-rootdir-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  const nobody = idOf("nobody");
  try {
    Deno.mkdirSync(join(source, "sub"), { recursive: true });
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    Deno.writeTextFileSync(join(source, "sub", "b.txt"), "b\n");
    Deno.chmodSync(source, 0o700);
    await ok(["init", repo]);
    await ok(["backup", source, repo]);
    const cases: [string, number, number][] = [
      ["0777 and not sticky", 0o777, 0],
      ["group-writable 0770", 0o770, 0],
      ["owned by nobody, 0700", 0o700, nobody.uid],
      ["sticky 1777 like tmp: others can still add names", 0o1777, 0],
    ];
    for (const [name, mode, uid] of cases) {
      await t.step(name, async () => {
        const target = join(work, name);
        Deno.mkdirSync(target);
        Deno.chmodSync(target, mode);
        Deno.chownSync(target, uid, uid === 0 ? 0 : nobody.gid);
        Deno.writeTextFileSync(join(target, "keep.txt"), "theirs\n");
        const before = treeState(target);
        const run = await nfreezer(["restore", repo, target]);
        assertOneLineError(run, 1, /is open to other users/);
        assert.ok(run.stderr.includes(target), run.stderr);
        assert.deepEqual(treeState(target), before, "something was written or changed");
      });
    }
    await t.step(
      "a folder inside the target that another user owns is not written into",
      async () => {
        const target = join(work, "holds-theirs");
        Deno.mkdirSync(join(target, "sub"), { recursive: true });
        Deno.chmodSync(target, 0o755);
        Deno.chmodSync(join(target, "sub"), 0o755);
        Deno.chownSync(join(target, "sub"), nobody.uid, nobody.gid); // they could swap it for a link
        const before = treeState(join(target, "sub"));
        const run = await nfreezer(["restore", repo, target]);
        assert.equal(run.code, 1, run.stderr);
        assert.match(run.stderr, /warning: cannot restore sub: /);
        assert.deepEqual(treeState(join(target, "sub")), before);
        assert.equal(Deno.statSync(join(target, "sub")).uid, nobody.uid);
        assert.equal(Deno.readTextFileSync(join(target, "a.txt")), "a\n");
      },
    );
    await t.step("a 0755 folder root owns, and a new one, are accepted", async () => {
      const target = join(work, "fine");
      Deno.mkdirSync(target);
      Deno.chmodSync(target, 0o755);
      await ok(["restore", repo, target]);
      assert.deepEqual(treeState(target), treeState(source));
      await ok(["restore", repo, join(work, "new", "folder")]);
      assert.deepEqual(treeState(join(work, "new", "folder")), treeState(source));
    });
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

/** A user's numeric ids, from id(1). */
function idOf(user: string): { uid: number; gid: number } {
  const id = (flag: string) =>
    Number(
      new TextDecoder().decode(new Deno.Command("id", { args: [flag, user] }).outputSync().stdout),
    );
  return { uid: id("-u"), gid: id("-g") };
}

Deno.test("a non-root user re-restores into read-only 0555 folders, which end 0555", async () => {
  const become = ["/usr/bin/setpriv", "/usr/sbin/runuser"].find(exists);
  if (Deno.uid() !== 0 || !become) {
    console.warn("SKIPPED: this test needs root and setpriv or runuser (util-linux) to be nobody");
    return;
  }
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-readonly-" });
  const [source, repo, home] = ["source", "repo", "home"].map((name) => join(work, name));
  const target = join(home, "target");
  const { uid, gid } = idOf("nobody");
  try {
    Deno.chmodSync(work, 0o755); // nobody passes through
    Deno.mkdirSync(join(source, "ro", "inner"), { recursive: true });
    Deno.writeTextFileSync(join(source, "ro", "a.txt"), "a\n");
    Deno.writeTextFileSync(join(source, "ro", "inner", "b.txt"), "b\n");
    Deno.chmodSync(join(source, "ro", "inner"), 0o555);
    Deno.chmodSync(join(source, "ro"), 0o555);
    Deno.chmodSync(source, 0o755);
    await ok(["init", repo]);
    await ok(["backup", source, repo]);
    // nobody's own copy of deno, its npm cache and the repository (root's HOME is closed)
    const deno = join(work, "deno");
    try {
      Deno.linkSync(Deno.execPath(), deno);
    } catch {
      Deno.copyFileSync(Deno.execPath(), deno);
    }
    Deno.mkdirSync(join(home, "deno-dir"), { recursive: true });
    await run("cp", ["-r", join(DENO_DIR, "npm"), join(home, "deno-dir")]);
    await run("chown", ["-R", `${uid}:${gid}`, home, repo]);
    const asNobody = async () => {
      const line = ["env", "-i", `HOME=${home}`, `DENO_DIR=${join(home, "deno-dir")}`];
      line.push(`NFREEZER_PASSWORD=${CHILD_ENV.NFREEZER_PASSWORD}`, "PATH=/usr/bin:/bin");
      line.push(deno, "run", "-A", "--cached-only", TOOL, "restore", repo, target);
      const args = become.endsWith("setpriv")
        ? [`--reuid=${uid}`, `--regid=${gid}`, "--clear-groups", ...line]
        : ["-u", "nobody", "--", ...line];
      const { code, stderr } = await new Deno.Command(become, { args, stderr: "piped" }).output();
      assert.equal(code, 0, new TextDecoder().decode(stderr));
    };
    await asNobody();
    assert.equal(Deno.statSync(join(target, "ro")).uid, uid);
    assert.deepEqual(treeState(target), treeState(source));
    Deno.writeTextFileSync(join(target, "ro", "a.txt"), "changed\n"); // as root: still nobody's
    Deno.removeSync(join(target, "ro", "inner", "b.txt"));
    await asNobody(); // writes into both 0555 folders
    assert.deepEqual(treeState(target), treeState(source));
    assert.equal(Deno.statSync(join(target, "ro")).mode! & 0o7777, 0o555);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("backup follows no link and waits on no FIFO, even one swapped in after the scan", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-swap-" });
  const [source, repo, out] = ["source", "repo", "out"].map((name) => join(work, name));
  const [secret, secrets] = [join(work, "secret.txt"), join(work, "secrets")];
  const holdsSecret = (root: string) =>
    Object.keys(treeState(root)).some((path) =>
      Deno.lstatSync(join(root, path)).isFile &&
      Deno.readTextFileSync(join(root, path)).includes("TOP-SECRET")
    );
  try {
    Deno.writeTextFileSync(secret, "TOP-SECRET-MARKER\n");
    Deno.chmodSync(secret, 0o600);
    Deno.mkdirSync(secrets, { mode: 0o700 });
    Deno.writeTextFileSync(join(secrets, "w.txt"), "TOP-SECRET-MARKER in a folder\n");
    Deno.mkdirSync(join(source, "d"), { recursive: true });
    Deno.writeFileSync(join(source, "a.bin"), randomBytes(96 * MiB)); // read first: time to swap
    Deno.writeTextFileSync(join(source, "d", "w.txt"), "harmless\n");
    Deno.writeTextFileSync(join(source, "u.txt"), "harmless\n");
    Deno.writeTextFileSync(join(source, "v.txt"), "harmless too\n");
    await run("mkfifo", [join(source, "z-fifo")]); // there at scan time
    await ok(["init", repo]);
    const backup = within(60, ["backup", source, repo]);
    while (repoFiles(repo, "data").length === 0) await new Promise((r) => setTimeout(r, 5));
    // the scan is done, a.bin is being read: a local user swaps what comes after it
    Deno.renameSync(join(source, "d"), join(source, "d-old")); // a folder on the path: a link
    Deno.symlinkSync(secrets, join(source, "d"));
    Deno.removeSync(join(source, "u.txt")); // the file itself: a link
    Deno.symlinkSync(secret, join(source, "u.txt"));
    Deno.removeSync(join(source, "v.txt")); // a FIFO: opening it for reading would wait
    await run("mkfifo", [join(source, "v.txt")]);
    const result = await backup;
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /warning: skipped z-fifo: not a file, folder or symlink/);
    const swapped = /warning: [\w ]+ u\.txt: /;
    assert.match(result.stderr, swapped, "the swap came too late to test anything");
    assert.match(result.stderr, /warning: [\w ]+ v\.txt: /);
    assert.match(result.stderr, /warning: [\w ]+ d\/w\.txt: /);
    assert.match(result.stderr, /error: 3 problems/);
    await ok(["restore", repo, out]);
    assert.ok(!holdsSecret(out), "the secret is in the snapshot");
    assert.deepEqual(Object.keys(treeState(out)).sort(), [".", "a.bin", "d"]);
    const again = await within(60, ["backup", source, repo]); // all present at scan time
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /skipped v\.txt: not a file/);
    await ok(["restore", repo, join(work, "again")]);
    assert.ok(!holdsSecret(join(work, "again")), "the secret is in the snapshot");
    assert.equal(Deno.readLinkSync(join(work, "again", "u.txt")), secret); // a link, not its bytes
    assert.equal(Deno.readLinkSync(join(work, "again", "d")), secrets);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a backup whose manifest would pass the 256 MiB limit fails before writing a snapshot", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-huge-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "a\n");
    // 11,000 links whose 4,095-byte targets of \x01 take 6 bytes each in JSON: 270 MB of manifest
    const target = "\x01".repeat(4095);
    for (let i = 0; i < 11_000; i++) Deno.symlinkSync(target, join(source, `l${i}`));
    await ok(["init", repo]);
    const run = await nfreezer(["backup", source, repo]);
    assertOneLineError(run, 1, /The manifest would be 2\d\d\.\d MiB, over its limit/);
    assert.deepEqual(repoFiles(repo, "snapshots"), [], "a snapshot restore would refuse");
    assert.deepEqual(repoFiles(repo, "locks"), []);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

/** Runs the tool and samples its peak resident memory (VmHWM) until it exits. */
async function peakMemory(args: string[]): Promise<Run & { peakMib: number }> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", TOOL, ...args],
    env: CHILD_ENV,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let [peakMib, finished] = [0, false];
  const output = child.output().finally(() => (finished = true));
  while (!finished) {
    try {
      const status = Deno.readTextFileSync(`/proc/${child.pid}/status`);
      peakMib = Math.max(peakMib, Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0) / 1024);
    } catch { /* it has exited */ }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  const { code, stdout, stderr } = await output;
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return { code, stdout: decode(stdout), stderr: decode(stderr), peakMib };
}

Deno.test("a forged manifest of one 4 MiB chunk repeated past 256 MiB is refused unread (exit 3)", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-repeat-" });
  const [repo, target] = [join(work, "repo"), join(work, "target")];
  try {
    await forgeSnapshot(repo, () => [], "00000000000000cc", {
      manifest: async (put) => {
        const id = await put(new Uint8Array(randomBytes(4 * MiB)));
        return { size: 100 * 4 * MiB, chunks: Array(100).fill(id) }; // 400 MiB from one chunk
      },
    });
    const run = await peakMemory(["restore", repo, target]);
    assertOneLineError(run, 3, /snapshot 00000000000000cc.* is corrupted/);
    // measured: 180 MiB (scrypt takes 128 of them); reading the 400 MiB before refusing: 900
    assert.ok(run.peakMib < 400, `restore peaked at ${run.peakMib.toFixed(0)} MiB`);
    assert.ok(!exists(target), "the target was made");
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("a passphrase that is not UTF-8 in $NFREEZER_PASSWORD: one line, exit 1, nothing made", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-utf8-" });
  const repo = join(work, "repo");
  try {
    const withBadPassphrase = async (args: string[]) => {
      const script = `NFREEZER_PASSWORD=$(printf '\\377') exec "$0" run -A "$@"`;
      const { code, stdout, stderr } = await new Deno.Command("sh", {
        args: ["-c", script, Deno.execPath(), TOOL, ...args],
        env: CHILD_ENV,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
      return { code, stdout: decode(stdout), stderr: decode(stderr) };
    };
    assertOneLineError(await withBadPassphrase(["init", repo]), 1, /not valid UTF-8/);
    assert.ok(!exists(repo), "init made something");
    await ok(["init", repo]);
    assertOneLineError(await withBadPassphrase(["snapshots", repo]), 1, /not valid UTF-8/);
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

/** Sends SIGKILL to each descendant of pid named `name` (ssh runs under sh, under nfreezer);
 * returns how many there were. */
function killDescendants(pid: number, name: string): number {
  const processes: { pid: number; parent: number; name: string }[] = [];
  for (const item of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(item.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${item.name}/stat`); // pid (name) state ppid ...
      const [open, close] = [stat.indexOf("("), stat.lastIndexOf(")")];
      const parent = Number(stat.slice(close + 2).split(" ")[1]);
      processes.push({ pid: Number(item.name), parent, name: stat.slice(open + 1, close) });
    } catch { /* it has exited */ }
  }
  const below = new Set([pid]);
  for (let grew = true; grew;) {
    const before = below.size;
    for (const process of processes) if (below.has(process.parent)) below.add(process.pid);
    grew = below.size > before;
  }
  const found = processes.filter((process) => process.pid !== pid && below.has(process.pid));
  const named = found.filter((process) => process.name === name);
  for (const process of named) Deno.kill(process.pid, "SIGKILL");
  return named.length;
}

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
 * given sftp subsystem, or rclone serve sftp; null if it is not installed (outside CI). With
 * `maxFiles`, sshd runs under `ulimit -n maxFiles` (its sftp announces maxFiles - 5 handles). */
async function startServer(
  kind: "sshd" | "gesftpserver" | "rclone",
  maxFiles = 0,
): Promise<Sshd | null> {
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
  const limited = ["-c", `ulimit -n ${maxFiles} && exec /usr/sbin/sshd "$@"`, "sh", ...args];
  const process = new Deno.Command(
    kind === "rclone" ? binary : maxFiles > 0 ? "sh" : "/usr/sbin/sshd",
    { args: maxFiles > 0 ? limited : args, stdout: "null", stderr: "null" },
  ).spawn();
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
        assert.match(unknown.stderr, /hint: .*--accept-new-host/);
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
            assert.equal((await nfreezer(["init", repo], env)).code, 0);
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
        await ok(["init", ...sftp.repo(repo)]);
        const child = new Deno.Command(Deno.execPath(), {
          args: ["run", "-A", TOOL, ...args],
          env: CHILD_ENV,
          stdout: "null",
          stderr: "piped",
        }).spawn();
        while (count() < 4) await new Promise((resolve) => setTimeout(resolve, 10));
        assert.equal(killDescendants(child.pid, "ssh"), 1, "no ssh under nfreezer (and its sh)");
        const { code, stderr } = await child.output();
        const dropped = { code, stdout: "", stderr: new TextDecoder().decode(stderr) };
        assertOneLineError(dropped, 1, /SSH connection to .*127\.0\.0\.1|No response from server/);
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
        assertOneLineError(under, 1, /Cannot create .*a-file\/repo: /);
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
    await ok(["init", ...repo]);
    await ok(["backup", source, ...repo]); // many objects in flight: within the server's handles
    const first = treeState(source);
    Deno.writeTextFileSync(join(source, "sub", "small.txt"), "changed\n");
    Deno.writeFileSync(join(source, "more.bin"), randomBytes(300_000));
    assert.ok(stored(await ok(["backup", source, ...repo])).mib < 1);
    const ids = await snapshotIds(repo);
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

Deno.test("an sshd that announces few handles (ulimit -n 64): objects in flight stay under them", async () => {
  const server = await startServer("sshd", 64); // sftp announces max-open-handles 59
  if (!server) return;
  try {
    await otherServerScenario(server, join(server.dir, "repo")); // 400 small files each way
  } finally {
    await server.stop();
  }
});

Deno.test("the SSH side: sftp:// locations, $NFREEZER_SSH through sh, timeouts and hints, quoting, no passphrase for ssh", async (t) => {
  const server = await startServer("sshd");
  if (!server) return;
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-ssh-" });
  const url = (dir: string) => `sftp://${USER}@127.0.0.1:${server.port}${dir}`;
  const auth = ["-i", server.userKey, "--known-hosts", server.knownHosts];
  const source = join(work, "source");
  /** A stand-in for ssh that writes its arguments, one a line, to `file` and fails. */
  const recorder = (file: string) => {
    const script = join(work, `record-${Math.random().toString(16).slice(2)}`);
    Deno.writeTextFileSync(script, `#!/bin/sh\nprintf '%s\\n' "$@" > '${file}'\nexit 255\n`);
    Deno.chmodSync(script, 0o755);
    return script;
  };
  try {
    Deno.mkdirSync(source);
    Deno.writeTextFileSync(join(source, "a.txt"), "over ssh\n");

    await t.step(
      "backup into a missing server path exits 1, names init, makes nothing",
      async () => {
        const repo = url(join(work, "server", "freezr"));
        const run = await nfreezer(["backup", source, repo, ...auth]);
        assertOneLineError(run, 1, /No repository at sftp:\/\/.*\/server\/freezr$/m);
        assert.match(run.stderr, /hint: create one with: .* init sftp:\/\/.*\/server\/freezr$/m);
        assert.ok(!exists(join(work, "server")), "the backup made a folder on the server");
      },
    );

    await t.step(
      "init over SFTP: missing parents made; of two at once exactly one wins",
      async () => {
        const repo = url(join(work, "server", "a b", "repo")); // a space, sent as %20 or as is
        const passphrases = ["first", "second"];
        const runs = await Promise.all(
          passphrases.map((NFREEZER_PASSWORD) =>
            nfreezer(["init", repo, ...auth], { NFREEZER_PASSWORD })
          ),
        );
        assert.equal(
          runs.filter((run) => run.code === 0).length,
          1,
          runs[0].stderr + runs[1].stderr,
        );
        const loser = runs.find((run) => run.code !== 0)!;
        assertOneLineError(loser, 1, LOST_RACE);
        const winner = passphrases[runs.findIndex((run) => run.code === 0)];
        const env = { NFREEZER_PASSWORD: winner };
        assert.equal((await nfreezer(["backup", source, repo, ...auth], env)).code, 0);
        const out = join(work, "out");
        assert.equal((await nfreezer(["restore", repo, out, ...auth], env)).code, 0);
        assert.deepEqual(treeState(out), treeState(source));
        assert.ok(Deno.statSync(join(work, "server", "a b", "repo", "config")).isFile);
      },
    );

    await t.step("sftp:// without a path is a usage error; [::1] is the host ::1", async () => {
      const argsFile = join(work, "ssh-args");
      const NFREEZER_SSH = recorder(argsFile);
      for (const location of [`sftp://${USER}@127.0.0.1:${server.port}`, url("/")]) {
        const run = await nfreezer(["snapshots", location], { NFREEZER_SSH });
        assertOneLineError(run, 2, /write sftp:\/\/user@host\[:port\]\/path/);
        assert.ok(!exists(argsFile), `ssh was run for ${location}`);
      }
      const run = await nfreezer(["snapshots", "sftp://me@[::1]:2300/x"], { NFREEZER_SSH });
      assertOneLineError(run, 1, /SSH connection to me@::1\b/);
      const args = Deno.readTextFileSync(argsFile).trimEnd().split("\n");
      assert.deepEqual(args.slice(args.indexOf("--")), ["--", "me@::1", "sftp"], args.join(" "));
      assert.equal(args[args.indexOf("-p") + 1], "2300");
      assert.ok(args.some((arg) => /^ConnectTimeout=\d+$/.test(arg)), "no ConnectTimeout");
    });

    await t.step('$NFREEZER_SSH runs through sh: `-F ~/"nfz config"` works', async () => {
      const config = join(HOME, "nfz config"); // HOME is the children's throwaway home
      Deno.writeTextFileSync(
        config,
        `Host nfz-tilde\n  HostName 127.0.0.1\n  Port ${server.port}\n  User ${USER}\n` +
          `  IdentityFile ${server.userKey}\n  UserKnownHostsFile ${server.knownHosts}\n`,
      );
      try {
        const env = { NFREEZER_SSH: 'ssh -F ~/"nfz config"' };
        const repo = `nfz-tilde:${join(work, "tilde-repo")}`;
        for (const args of [["init", repo], ["backup", source, repo]]) {
          const run = await nfreezer(args, env);
          assert.equal(run.code, 0, run.stderr);
        }
        const run = await nfreezer(["restore", repo, join(work, "tilde-out")], env);
        assert.equal(run.code, 0, run.stderr);
        assert.deepEqual(treeState(join(work, "tilde-out")), treeState(source));
      } finally {
        Deno.removeSync(config);
      }
    });

    await t.step("--known-hosts with a space in its path", async () => {
      Deno.mkdirSync(join(work, "my hosts"));
      const knownHosts = join(work, "my hosts", "known hosts");
      Deno.copyFileSync(server.knownHosts, knownHosts);
      const args = ["snapshots", url(join(work, "none")), "-i", server.userKey];
      const run = await nfreezer([...args, "--known-hosts", knownHosts]);
      assertOneLineError(run, 1, /No repository at/); // connected: the host key was known
    });

    await t.step(
      "a listener that accepts and never speaks: one line within ConnectTimeout",
      async () => {
        const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
        const held: Deno.Conn[] = [];
        const accepting = (async () => {
          for await (const conn of listener) held.push(conn); // and never a byte
        })();
        try {
          const location = `sftp://${USER}@127.0.0.1:${listener.addr.port}/x`;
          const started = Date.now();
          const args = ["snapshots", location, "--known-hosts", server.knownHosts];
          const run = await within(30, args, { NFREEZER_SSH: "ssh -o ConnectTimeout=2" });
          assertOneLineError(run, 1, /SSH connection to .*127\.0\.0\.1 ended/);
          assert.match(run.stderr, /hint: .*--accept-new-host.*`ssh /);
          assert.ok(Date.now() - started < 15_000, `${Date.now() - started} ms`);
          assert.ok(held.length > 0, "ssh never connected to the listener");
        } finally {
          listener.close();
          await accepting.catch(() => {});
          for (const conn of held) conn.close();
        }
      },
    );

    await t.step("ssh and what it runs never see $NFREEZER_PASSWORD", async () => {
      const dump = join(work, "ssh-env");
      const script = join(work, "env-ssh");
      Deno.writeTextFileSync(script, `#!/bin/sh\nenv > '${dump}'\nexec ssh "$@"\n`);
      Deno.chmodSync(script, 0o755);
      const run = await nfreezer(["snapshots", url(join(work, "none")), ...auth], {
        NFREEZER_SSH: script,
      });
      assertOneLineError(run, 1, /No repository at/); // connected through the script
      const env = Deno.readTextFileSync(dump);
      assert.match(env, /^HOME=/m);
      assert.ok(!env.includes("NFREEZER_PASSWORD"), env);
      assert.ok(!env.includes(CHILD_ENV.NFREEZER_PASSWORD), env);
    });
  } finally {
    await server.stop();
    Deno.removeSync(work, { recursive: true });
  }
});

// ---- The reference's features (issue 14) and the format's known answers (issue 15) ----

/** The snapshot id a backup's summary names. */
function featureSnapshotId(stdout: string): string {
  const match = /^Snapshot ([0-9a-f]{16}): /m.exec(stdout);
  assert.ok(match, `no snapshot id in: ${stdout}`);
  return match[1];
}

/** Each snapshot id and the tree it was taken of (treeState of the source right after). */
type FeatureStates = Map<string, Record<string, string>>;

/** Backs source up and remembers what its snapshot holds; returns the snapshot's id. */
async function featureBackup(source: string, repoArgs: string[], states: FeatureStates) {
  const id = featureSnapshotId(await ok(["backup", source, ...repoArgs]));
  states.set(id, treeState(source));
  return id;
}

/** Runs the tool on a pseudo-terminal (util-linux `script`), the test passphrase given in its
 * environment: stdout and stderr both reach the terminal, in the order they were written. */
async function featureOnTerminal(args: string[]): Promise<{ code: number; screen: string }> {
  const line = [Deno.execPath(), "run", "-A", TOOL, ...args].map((word) => `'${word}'`).join(" ");
  const child = new Deno.Command("script", {
    args: ["-qfec", line, "/dev/null"],
    env: CHILD_ENV,
    stdin: "piped", // left open: script ends when the command does, not at the end of its input
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const screen = await new Response(child.stdout).text();
  await child.stdin.close().catch(() => {});
  const { code } = await child.status;
  return { code, screen };
}

/** Checks a terminal transcript: before the summary, only status lines redrawn in place ("\r",
 * erase line, text with MiB done of the total), at least `least` of them, at most one a second of
 * the run (the summary's elapsed time), and the line erased just before the summary. */
function featureAssertStatusLines(screen: string, summary: RegExp, least: number) {
  const at = screen.search(summary);
  assert.ok(at >= 0, `no summary in: ${JSON.stringify(screen)}`);
  const before = screen.slice(0, at);
  assert.ok(!before.includes("\n"), `more than a status line before the summary: ${before}`);
  assert.ok(before.endsWith("\r\x1b[K"), `the status line is not erased before the summary`);
  // deno-lint-ignore no-control-regex
  const redraws = [...before.matchAll(/\r\x1b\[K([^\r\n\x1b]+)/g)].map((match) => match[1]);
  assert.ok(redraws.length >= least, `${redraws.length} status redraws: ${JSON.stringify(screen)}`);
  let previous = 0;
  for (const text of redraws) {
    const match = /([\d.]+) MiB of 400\.0 MiB/.exec(text);
    assert.ok(match, `a status line without the MiB done of the total: ${text}`);
    assert.ok(Number(match[1]) >= previous, `the MiB done went backwards: ${redraws}`);
    previous = Number(match[1]);
  }
  const seconds = Number(/; ([\d.]+) s\r?\n/.exec(screen.slice(at))?.[1]);
  assert.ok(Number.isFinite(seconds), `no elapsed time in the summary: ${screen.slice(at)}`);
  assert.ok(
    redraws.length <= Math.floor(seconds + 0.1) + 1,
    `${redraws.length} redraws in ${seconds} s: more than one a second`,
  );
  return { redraws, seconds };
}

Deno.test("progress line: on a terminal backup and restore redraw one status line, at most once a second; piped, none", async (t) => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-progress-" });
  const [source, repo] = [join(work, "source"), join(work, "repo")];
  const names = ["a.bin", "b.bin", "c.bin", "d.bin"];
  /** A new mtime for each file: the next backup reads all 400 MiB again (and sends nothing). */
  const touch = () => {
    const now = new Date();
    for (const name of names) Deno.utimeSync(join(source, name), now, now);
  };
  try {
    Deno.mkdirSync(source);
    for (const name of names) Deno.writeFileSync(join(source, name), randomBytes(100 * MiB));
    await ok(["init", repo]);

    await t.step(
      "a backup of 400 MiB on a terminal: status redraws, then the summary",
      async () => {
        const run = await featureOnTerminal(["backup", source, repo]);
        assert.equal(run.code, 0, run.screen);
        const { redraws, seconds } = featureAssertStatusLines(
          run.screen,
          /Snapshot [0-9a-f]{16}: /,
          1,
        );
        assert.match(redraws[0], /of 4 files; [\d.]+ MiB of 400\.0 MiB; .* sent .*; [\d.]+ s$/);
        if (seconds >= 1.5) assert.ok(redraws.length >= 2, `one redraw in ${seconds} s`);
      },
    );

    await t.step("its restore on a terminal: status redraws, then the summary", async () => {
      const run = await featureOnTerminal(["restore", repo, join(work, "restored")]);
      assert.equal(run.code, 0, run.screen);
      const { redraws, seconds } = featureAssertStatusLines(run.screen, /Restored snapshot /, 1);
      assert.match(redraws[0], /MiB of 400\.0 MiB, [\d.]+ MiB written; [\d.]+ s$/);
      if (seconds >= 1.5) assert.ok(redraws.length >= 2, `one redraw in ${seconds} s`);
      assert.deepEqual(treeState(join(work, "restored")), treeState(source));
      Deno.removeSync(join(work, "restored"), { recursive: true });
    });

    await t.step("stderr piped: no status line, no \\r at all", async () => {
      touch();
      const backed = await nfreezer(["backup", source, repo]);
      assert.equal(backed.code, 0, backed.stderr);
      assert.equal(backed.stderr, "");
      assert.ok(!backed.stdout.includes("\r"), JSON.stringify(backed.stdout));
      assert.equal(stored(backed.stdout).readMib, 400);
      const restored = await nfreezer(["restore", repo, join(work, "piped")]);
      assert.equal(restored.code, 0, restored.stderr);
      assert.equal(restored.stderr, "");
      assert.ok(!restored.stdout.includes("\r"), JSON.stringify(restored.stdout));
      assert.match(restored.stdout, /^Restored snapshot [0-9a-f]{16}: .*400\.0 MiB written/);
      Deno.removeSync(join(work, "piped"), { recursive: true });
    });
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

Deno.test("format §5, §6: a manifest without its root entry is refused; a snapshot without a manifest is named and skipped", async (t) => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-spec-" });
  try {
    await t.step(
      "a forged manifest [] (no root entry): exit 3, nothing written",
      async () => {
        const repo = join(work, "empty-manifest");
        await forgeSnapshot(repo, () => [], "00000000000000ee");
        const target = join(work, "target");
        const run = await nfreezer(["restore", repo, target]);
        assertOneLineError(
          run,
          3,
          /(The manifest of snapshot|Manifest) 00000000000000ee is corrupted/,
        );
        assert.ok(!exists(target), "the target was made: the refusal came late");
      },
    );

    await t.step("a sealed snapshot without a manifest: named and skipped, exit 3", async () => {
      const [source, repo] = [join(work, "source"), join(work, "repo")];
      const states: FeatureStates = new Map();
      Deno.mkdirSync(source);
      Deno.writeTextFileSync(join(source, "a.txt"), "first\n");
      await ok(["init", repo]);
      const ids = [await featureBackup(source, [repo], states)];
      Deno.writeTextFileSync(join(source, "a.txt"), "second, longer\n");
      ids.push(await featureBackup(source, [repo], states));
      Deno.env.set("NFREEZER_PASSWORD", CHILD_ENV.NFREEZER_PASSWORD);
      const opened = await openRepo(repo, {});
      try { // the newest, of this host and source: it would be the default and the parent
        const time = new Date(Date.now() + 1000).toISOString();
        const forged = { time, host: Deno.hostname(), source: Deno.realPathSync(source) };
        await putJson(opened, "snapshots/00000000000000dd", forged);
      } finally {
        opened.store.connection.end();
        Deno.env.delete("NFREEZER_PASSWORD");
      }
      const named = /snapshot 00000000000000dd/;

      const listed = await nfreezer(["snapshots", repo]);
      assert.equal(listed.code, 3, listed.stderr);
      assert.match(listed.stderr, named);
      assert.ok(!/^\s+at /m.test(listed.stderr), listed.stderr);
      const lines = listed.stdout.trim().split("\n");
      assert.deepEqual(lines.map((line) => line.slice(0, 16)), ids);

      const out = join(work, "out");
      const restored = await nfreezer(["restore", repo, out]);
      assert.equal(restored.code, 3, restored.stderr);
      assert.match(restored.stderr, named);
      assert.match(restored.stdout, new RegExp(`^Restored snapshot ${ids[1]}: `));
      assert.deepEqual(treeState(out), states.get(ids[1]));

      const backed = await nfreezer(["backup", source, repo]);
      assert.equal(backed.code, 3, backed.stderr);
      assert.match(backed.stderr, named);
      assert.match(backed.stdout, /: 0 new, 0 changed, 1 unchanged/); // its parent: the newest good
    });
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});

/** The README's known-answer vectors (Format: "Known-answer vectors"); bytes in hex. */
const FEATURE_VECTORS = {
  passphrase: "correct horse",
  configSalt: "01".repeat(32),
  configNonce: "02".repeat(12),
  master: Array.from({ length: 64 }, (_, byte) => byte.toString(16).padStart(2, "0")).join(""),
  kek: "676e7425012cd597c1e3a20175a0e113314d780137d01e3ca7b002d3c0cd95e6",
  config: '{"format":2,"kdf":{"log2N":17,"r":8,"p":1,"salt":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEB' +
    'AQEBAQE="},"nonce":"AgICAgICAgICAgIC","keys":"mb/Hhlv9xhTWphSD2atvl9EmAshb1SjC5x0Pq2UEUfX0XZ' +
    'YxP+OOfXYRC1pi/+Lj2x7YT32eyg27TXGiTAeT62wBSx9oHnfXOW6s9K/Su28="}',
  content: "nfreezer\n",
  chunkId: "e5c615e826e0fa0436fbd27521d8c49d770f160ee69b098ec2703389b1f43297",
  objectSalt: "04".repeat(32),
  objectKey: "210603b5ad3889a5556fef864ca284835191d2cd3f2bf3ff4681d24ecfd6addc",
  payload: "000000096e667265657a65720a00",
  sealed: "4e465a31" + "04".repeat(32) +
    "c02a6338a34181dfa4eb334cc700c8e9d4027d3536998b53ac8ed94162c2",
  padme: [
    [0, 0],
    [1, 1],
    [2, 2],
    [3, 3],
    [9, 10],
    [100, 104],
    [1000, 1024],
    [4194303, 4194304],
    [4194304, 4194304],
  ],
};

Deno.test("known-answer vectors: the config, a sealed object, a chunk id and padme, as the README gives them", async () => {
  const v = FEATURE_VECTORS;
  const bytes = (hex: string) => Uint8Array.from(hex.match(/../g)!, (pair) => parseInt(pair, 16));
  const hexOf = (data: ArrayBuffer | Uint8Array) =>
    Array.from(new Uint8Array(data), (byte) => byte.toString(16).padStart(2, "0")).join("");
  const [master, content] = [bytes(v.master), new TextEncoder().encode(v.content)];
  const name = `data/${v.chunkId}`;

  const config = await wrapMaster(v.passphrase, master, bytes(v.configSalt), bytes(v.configNonce));
  assert.equal(config, v.config); // byte for byte
  const readme = Deno.readTextFileSync(new URL("./README.md", import.meta.url)).replace(/\s/g, "");
  const written = [v.master, v.kek, v.config, v.chunkId, v.objectKey, v.payload, v.sealed];
  for (const value of written) assert.ok(readme.includes(value), `the README lacks ${value}`);
  const table = v.padme.map(([length, padded]) => [`|${length}`, `|${padded}`]);
  assert.ok(readme.includes(`|L${table.map(([length]) => length).join("")}|`), "padme table");
  assert.ok(readme.includes(`|padme(L)${table.map(([, padded]) => padded).join("")}|`));
  const keys = await importKeys(master);
  assert.equal(await chunkId(keys, content), v.chunkId);
  const sealed = await seal(keys, name, content, bytes(v.objectSalt));
  assert.equal(hexOf(sealed), v.sealed);
  assert.equal(sealed.length, 36 + 4 + padme(content.length) + 16); // §3, §4: the stored size
  for (const [length, padded] of v.padme) assert.equal(padme(length), padded, `padme(${length})`);

  const unlocked = await unlockConfig(new TextEncoder().encode(v.config), v.passphrase);
  assert.equal(await chunkId(unlocked, content), v.chunkId);
  assert.equal(hexOf(await seal(unlocked, name, content, bytes(v.objectSalt))), v.sealed);

  // The intermediate values, from the spec's words and WebCrypto alone:
  const subtle = crypto.subtle;
  const kek = await subtle.importKey("raw", bytes(v.kek), "AES-GCM", false, ["decrypt"]);
  const wrapped = Uint8Array.from(atob(JSON.parse(config).keys), (char) => char.charCodeAt(0));
  const aad = new TextEncoder().encode("nfreezer/1 config");
  const iv = bytes(v.configNonce);
  const unwrapped = await subtle.decrypt(
    { name: "AES-GCM", iv, additionalData: aad },
    kek,
    wrapped,
  );
  assert.equal(hexOf(unwrapped), v.master, "§2: the config's keys are master under the KEK");
  const ikm = await subtle.importKey("raw", master.slice(0, 32), "HKDF", false, ["deriveBits"]);
  const info = new TextEncoder().encode(`nfreezer/1 object ${name}`);
  const hkdf = { name: "HKDF", hash: "SHA-256", salt: bytes(v.objectSalt), info };
  assert.equal(hexOf(await subtle.deriveBits(hkdf, ikm, 256)), v.objectKey, "§3: K");
  const key = await subtle.importKey("raw", bytes(v.objectKey), "AES-GCM", false, ["decrypt"]);
  const zero = new Uint8Array(12);
  const opened = await subtle.decrypt(
    { name: "AES-GCM", iv: zero },
    key,
    bytes(v.sealed.slice(72)),
  );
  assert.equal(
    hexOf(opened),
    v.payload,
    "§3: the payload is u32be(L) || content || 0^(padme(L) - L)",
  );
  const hmacKey = await subtle.importKey(
    "raw",
    master.slice(32),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  assert.equal(hexOf(await subtle.sign("HMAC", hmacKey, content)), v.chunkId, "§4: the chunk id");
});

Deno.test("the command line refuses every option of another command, bad %-escapes, and the repository as its own source", async () => {
  const work = Deno.makeTempDirSync({ prefix: "nfreezer-cli2-" });
  try {
    const repo = join(work, "repo");
    await ok(["init", repo]);
    const both = await nfreezer([
      "restore",
      repo,
      join(work, "out"),
      "--snapshot",
      "a",
      "--exclude",
      "b",
    ]);
    assertOneLineError(both, 2, /restore does not take --exclude/);
    assert.ok(!exists(join(work, "out")), "the restore ran");
    assertOneLineError(
      await nfreezer(["snapshots", "sftp://me@127.0.0.1/%zz"]),
      2,
      /URI malformed/,
    );
    assertOneLineError(await nfreezer(["backup", repo, repo]), 1, /is the repository itself/);
    assert.deepEqual(repoFiles(repo, "snapshots"), []);
  } finally {
    Deno.removeSync(work, { recursive: true });
  }
});
