#!/usr/bin/env -S deno run -A --v8-flags=--max-semi-space-size=8,--heap-growing-percent=20
/**
 * nfreezer.ts: encrypted-at-rest backups to an SFTP server or a local disk, in one auditable file.
 * THREAT MODEL. Trusted: this machine, the passphrase, the user's OpenSSH client and known_hosts.
 * Untrusted: the storage server, anyone who can write to the repository, the network, and what a
 *   restore target already holds.
 * Guaranteed: keys, names, paths, contents, modes and times never leave in clear. A changed,
 *   truncated, swapped, renamed or replayed object fails authentication before a byte of it is
 *   in place: restore reproduces the snapshot or exits 3 naming what it could not verify. Nothing
 *   lands outside the target or through a link in it (races: README). Memory stays bounded.
 * Not hidden: the size, number and Padmé-padded sizes of objects, when backups run, how much
 *   changed. The server can delete it all or withhold new snapshots. More in the README.
 * FORMAT 2: §1 layout, §2 config, §3 objects, §4 chunks, §5 manifest, §6 snapshots, §7 writes,
 * §8 locks, cited in the code; the README's Format section has each in full.
 */

import { Buffer } from "node:buffer";
import { scryptSync } from "node:crypto";
import fs from "node:fs";
import { type FileHandle, lutimes, open as openFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join, matchesGlob, resolve as absolutePath } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { gunzipSync, gzipSync } from "node:zlib";
import { SFTP } from "npm:ssh2@1.17.0/lib/protocol/SFTP.js";

const FORMAT = 2; // §2 (1 was the pre-release format)
const SCRYPT = { log2N: 17, r: 8, p: 1 }; // §2: ~0.6 s and 128 MiB on our machines
const SCRYPT_MAX_BYTES = 256 * 2 ** 20; // §2: a config may not make us allocate more
const KEY_BYTES = 32; // §2, §3: AES-256 and HMAC-SHA-256 keys
const CONFIG_AAD = "nfreezer/1 config"; // §2
const MAGIC = "NFZ1"; // §3
const OBJECT_INFO = "nfreezer/1 object "; // §3: HKDF info prefix; the object name follows
const SALT_BYTES = 32; // §2, §3
const NONCE_BYTES = 12; // §2, §3: AES-GCM
const TAG_BYTES = 16; // §2, §3: AES-GCM
const HEADER_BYTES = MAGIC.length + SALT_BYTES; // §3
const CHUNK_BYTES = 4 * 2 ** 20; // §4: the unit of dedup, of resume and of memory use
const MANIFEST_MAX_BYTES = 256 * 2 ** 20; // §5: its JSON and its gzip, when written and read
const SMALL_OBJECT_BYTES = 64 * 1024; // §2, §6, §8: a few hundred bytes; larger is refused
const RESTORED_MODE_BITS = 0o1777; // never setuid or setgid: owners are not restored
const PRIVATE = { mode: 0o600 }; // §7: what nfreezer creates is its user's alone
const STATUS_EVERY_MS = 1000; // the progress line is redrawn at most this often

/** What a user sees: one line, a hint, an exit code (1 error, 2 usage, 3 integrity). */
class UserError extends Error {
  constructor(message: string, readonly exitCode = 1, readonly hint = "", cause?: unknown) {
    super(message, { cause });
  }
}
const damaged = (what: string) => new UserError(`${what} is corrupted or tampered with`, 3);
const isDamage = (error: unknown) => error instanceof UserError && error.exitCode === 3;

function parseJson(bytes: Uint8Array, what: string, gzipped = false) {
  try {
    const text = gzipped ? gunzipSync(bytes, { maxOutputLength: MANIFEST_MAX_BYTES }) : bytes;
    return JSON.parse(new TextDecoder().decode(text));
  } catch {
    throw damaged(what); // not JSON, or a gzip bomb
  }
}

/** Output. A problem is counted: exit 1 (3 for damage) once the rest is done. On a terminal, a
 * status line on stderr, redrawn at most once a second. */
function makeUi() {
  let drawnAt = 0; // when the status line was last drawn; 0: never (nothing to erase)
  const print = (text: string, log = console.log) => {
    if (drawnAt > 0) Deno.stderr.writeSync(utf8("\r\x1b[K"));
    log(text);
  };
  const ui = {
    problems: 0,
    exitCode: 1, // for problems: 3 once one was damage
    info: (text: string) => print(text),
    warn: (text: string) => print(`nfreezer: warning: ${printable(text)}`, console.error),
    problem(text: string, exitCode = 1) {
      ui.warn(text);
      ui.problems++;
      ui.exitCode = Math.max(ui.exitCode, exitCode);
    },
    status(text: () => string) {
      if (!Deno.stderr.isTerminal() || Date.now() - drawnAt < STATUS_EVERY_MS) return;
      drawnAt = Date.now();
      Deno.stderr.writeSync(utf8(`\r\x1b[K${printable(text())}`));
    },
  };
  return ui;
}
const printable = (text: string) => text.replace(/\p{Cc}/gu, "?"); // no control code is shown
// deno-lint-ignore no-explicit-any
type Untyped = any; // what ssh2 (it ships no types) hands back, and errors of any kind
type Options = Record<string, Untyped>; // the command line's, as OPTIONS parses them
type Ui = ReturnType<typeof makeUi>;
// ---- Crypto (§2–§4): the only code that touches crypto.subtle ---------------------------------
type Bytes = Uint8Array<ArrayBuffer>;
type Keys = { encKey: CryptoKey; idKey: CryptoKey };
const subtle = crypto.subtle;
const utf8 = (text: string): Bytes => new TextEncoder().encode(text);
const random = (count: number): Bytes => crypto.getRandomValues(new Uint8Array(count));
const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex");
const base64 = (bytes: Bytes) => Buffer.from(bytes).toString("base64");
const unbase64 = (text: unknown) => new Uint8Array(Buffer.from(String(text), "base64"));
const gcm = (iv: Bytes, aad = "") => ({ name: "AES-GCM", iv, additionalData: utf8(aad) });
const ZERO_NONCE = new Uint8Array(NONCE_BYTES); // §3: each object key seals one payload only

/** §2: KEK = scrypt(NFKC(passphrase), salt, 2^log2N, r, p), its cost bounded before it runs. */
function deriveKek(passphrase: string, kdf: unknown, salt: Bytes) {
  const { log2N, r, p } = (kdf ?? {}) as Record<string, number>; // a forger's JSON: checked next
  const memory = 128 * 2 ** log2N * r;
  const sane = [log2N, r, p].every(Number.isInteger) && r > 0 && p > 0 && p <= 4;
  const bounded = log2N >= 14 && log2N < 16 * r && memory <= SCRYPT_MAX_BYTES; // RFC 7914's N bound
  if (!sane || !bounded) throw damaged("The scrypt parameters of the repository config");
  const options = { N: 2 ** log2N, r, p, maxmem: 2 * memory };
  const kek = scryptSync(passphrase.normalize("NFKC"), salt, KEY_BYTES, options);
  return subtle.importKey("raw", new Uint8Array(kek), "AES-GCM", false, ["encrypt", "decrypt"]);
}
/** §2: the config that wraps master (64 bytes) under the passphrase. */
async function wrapMaster(passphrase: string, master: Bytes, salt: Bytes, nonce: Bytes) {
  const kek = await deriveKek(passphrase, SCRYPT, salt);
  const wrapped = new Uint8Array(await subtle.encrypt(gcm(nonce, CONFIG_AAD), kek, master));
  const kdf = { ...SCRYPT, salt: base64(salt) };
  return JSON.stringify({ format: FORMAT, kdf, nonce: base64(nonce), keys: base64(wrapped) });
}
/** §2: unwraps the master key; a wrong passphrase is told apart from a malformed config. */
async function unlockConfig(bytes: Uint8Array, passphrase: string): Promise<Keys> {
  const config = parseJson(bytes, "The repository config");
  if (config?.format !== FORMAT) throw new UserError(`Unknown repository format ${config?.format}`);
  const [salt, nonce, wrapped] = [config.kdf?.salt, config.nonce, config.keys].map(unbase64);
  const sized = salt.length === SALT_BYTES && nonce.length === NONCE_BYTES;
  if (!sized || wrapped.length !== 2 * KEY_BYTES + TAG_BYTES) throw damaged("The config");
  const kek = await deriveKek(passphrase, config.kdf, salt);
  const master = await subtle.decrypt(gcm(nonce, CONFIG_AAD), kek, wrapped).catch(() => null);
  const hint = "if it is right, the repository config was altered";
  if (master === null) throw new UserError("Wrong passphrase", 1, hint);
  return importKeys(new Uint8Array(master));
}
/** §2: encKey = master[0:32] (HKDF input only), idKey = master[32:64] (HMAC only). */
async function importKeys(master: Bytes): Promise<Keys> {
  const [enc, id] = [master.slice(0, KEY_BYTES), master.slice(KEY_BYTES)];
  return {
    encKey: await subtle.importKey("raw", enc, "HKDF", false, ["deriveKey"]),
    idKey: await subtle.importKey("raw", id, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]),
  };
}
/** §3: Padmé: at most ~12% larger, and only O(log log L) bits of L stay visible. */
function padme(length: number): number {
  if (length < 2) return length;
  const exponent = Math.floor(Math.log2(length));
  const step = 2 ** (exponent - Math.floor(Math.log2(exponent)) - 1);
  return Math.ceil(length / step) * step;
}
/** §3: the stored size of an object holding `length` bytes: header, u32be(L), padded, tag. */
const sealedBytes = (length: number) => HEADER_BYTES + 4 + padme(length) + TAG_BYTES;

/** §3: K = HKDF-SHA-256(ikm = encKey, salt, info = OBJECT_INFO || name). */
function objectKey(keys: Keys, salt: Uint8Array, name: string): Promise<CryptoKey> {
  const hkdf = { name: "HKDF", hash: "SHA-256", salt, info: utf8(OBJECT_INFO + name) };
  const aes = { name: "AES-GCM", length: 256 };
  return subtle.deriveKey(hkdf, keys.encKey, aes, false, ["encrypt", "decrypt"]);
}
/** §3: "NFZ1" || salt || AES-256-GCM(K, 0^12, u32be(L) || content || padding). The salt is
 * fresh, so K is too, and K seals only this payload: the fixed nonce never repeats under a key.
 * The name (with its folder: "data/…") is bound into K: an object moved to another name fails. */
async function seal(keys: Keys, name: string, content: Uint8Array, salt = random(SALT_BYTES)) {
  const payload = new Uint8Array(4 + padme(content.length));
  new DataView(payload.buffer).setUint32(0, content.length);
  payload.set(content, 4);
  const sealed = await subtle.encrypt(gcm(ZERO_NONCE), await objectKey(keys, salt, name), payload);
  return Buffer.concat([utf8(MAGIC), salt, new Uint8Array(sealed)]);
}
/** §3: opens an object read from name; only authenticated bytes come out. */
async function unseal(keys: Keys, name: string, object: Bytes): Promise<Bytes> {
  const magic = new TextDecoder().decode(object.subarray(0, MAGIC.length));
  if (magic !== MAGIC || object.length < HEADER_BYTES + 4 + TAG_BYTES) throw damaged(name);
  const key = await objectKey(keys, object.subarray(MAGIC.length, HEADER_BYTES), name);
  const sealed = object.subarray(HEADER_BYTES);
  const payload = await subtle.decrypt(gcm(ZERO_NONCE), key, sealed).catch(() => null);
  if (payload === null) throw damaged(name);
  const length = new DataView(payload).getUint32(0);
  if (4 + length > payload.byteLength) throw damaged(name);
  return new Uint8Array(payload, 4, length);
}
/** §4: id = hex(HMAC-SHA-256(idKey, chunk)): keyed, so the server cannot test for known files. */
async function chunkId(keys: Keys, chunk: Bytes): Promise<string> {
  return hex(new Uint8Array(await subtle.sign("HMAC", keys.idKey, chunk)));
}

// ---- Repository objects (§4–§8): everything read is checked before it is used ----------------
type Repo = { store: Store; keys: Keys };
type Content = { size: number; chunks: string[] }; // §4: a file's or a manifest's chunks
type Meta = { path: string; type: "file" | "dir" | "symlink"; mode: number; mtime: number };
type Entry = Meta & { size?: number; chunks?: string[]; target?: string }; // §5
type Snapshot = { id: string; time: string; host: string; source: string; manifest: Content };
const isHex = (text: unknown, length: number) =>
  typeof text === "string" && text.length === length && /^[0-9a-f]*$/.test(text);
const parentOf = (path: string) => path.slice(0, Math.max(0, path.lastIndexOf("/")));
const putJson = async (repo: Repo, name: string, value: unknown) =>
  await repo.store.write(name, await seal(repo.keys, name, utf8(JSON.stringify(value))));
const getJson = async (repo: Repo, name: string) =>
  parseJson(await unseal(repo.keys, name, await repo.store.read(name)), name);

/** §4: a size, and as many 64-hex chunk ids as that size needs. */
function isContent(value: unknown): value is Content {
  const { size, chunks } = (value ?? {}) as Content; // a forger's null, number or string too
  if (!Number.isSafeInteger(size) || size < 0 || !Array.isArray(chunks)) return false;
  return chunks.length === Math.ceil(size / CHUNK_BYTES) && chunks.every((id) => isHex(id, 64));
}
/** §4: a file's or manifest's chunks, each handed out once it opens and matches id and length. */
async function* chunksOf(repo: Repo, content: Content): AsyncGenerator<Bytes> {
  for (const [index, id] of content.chunks.entries()) {
    const length = Math.min(CHUNK_BYTES, content.size - index * CHUNK_BYTES);
    const name = `data/${id}`;
    const chunk = await unseal(repo.keys, name, await repo.store.read(name, sealedBytes(length)));
    if (chunk.length !== length || await chunkId(repo.keys, chunk) !== id) throw damaged(name);
    yield chunk;
  }
}
/** §5: one entry's fields, each of the right type whatever JSON a forger wrote. */
function isEntry(entry: unknown): entry is Entry {
  const { path, mode, mtime, type, target } = (entry ?? {}) as Entry; // checked one by one
  if (typeof path !== "string" || !path.isWellFormed() || path.includes("\0")) return false;
  if (path !== "" && path.split("/").some((part) => ["", ".", ".."].includes(part))) return false;
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777 || !Number.isFinite(mtime)) return false;
  if (type === "file") return isContent(entry);
  if (type === "symlink") return typeof target === "string" && target !== "" && !/\0/.test(target);
  return type === "dir";
}
/** §5: the manifest is refused whole unless the root folder "" comes first, every entry is well
 * formed, no path repeats, and each entry's parent is an earlier folder entry: so no entry can
 * land outside the target, under a link or a file, or be written twice. */
async function loadManifest(repo: Repo, snapshot: Snapshot): Promise<Entry[]> {
  const packed = new Uint8Array(snapshot.manifest.size); // at most MANIFEST_MAX_BYTES (§6)
  let filled = 0;
  for await (const chunk of chunksOf(repo, snapshot.manifest)) {
    packed.set(chunk, filled);
    filled += chunk.length;
  }
  const what = `Manifest ${snapshot.id}`;
  const entries = parseJson(packed, what, true);
  const rooted = Array.isArray(entries) && entries[0]?.path === "" && entries[0]?.type === "dir";
  if (!rooted) throw damaged(what);
  const types = new Map<string, string>();
  for (const entry of entries) {
    const placed = isEntry(entry) && (!entry.path || types.get(parentOf(entry.path)) === "dir");
    if (!placed || types.has(entry.path)) {
      throw damaged(`${what}, ${entry?.path}`);
    }
    types.set(entry.path, entry.type);
  }
  return entries;
}
/** §6: the snapshots that open, oldest first; one that does not is named (exit 3) and skipped. */
async function listSnapshots(repo: Repo, ui: Ui): Promise<Snapshot[]> {
  const ids = (await repo.store.list("snapshots")).filter((id) => isHex(id, 16));
  const snapshots: Snapshot[] = [];
  const open = async (id: string) => {
    try {
      const value = await getJson(repo, `snapshots/${id}`);
      const named = ["time", "host", "source"].every((key) => typeof value?.[key] === "string");
      const sized = isContent(value?.manifest) && value.manifest.size <= MANIFEST_MAX_BYTES;
      if (!named || !sized) throw damaged(`Snapshot ${id}`);
      snapshots.push({ ...value, id });
    } catch (error) {
      if (!isDamage(error)) throw error; // a lost connection is not a damaged snapshot
      ui.problem(`skipped snapshot ${id}: ${(error as Error).message}`, 3);
    }
  };
  for (let at = 0; at < ids.length; at += 32) await Promise.all(ids.slice(at, at + 32).map(open));
  return snapshots.sort((a, b) => a.time.localeCompare(b.time));
}
/** §8: runs a backup holding a lock, written in locks/ (not through tmp/): there whole before any
 * tmp/ file of its run. tmp/ is listed, then the locks: one of this host whose process is gone is
 * stale and removed; any other counts. With none left, the tmp/ files listed are deleted (§7). */
async function withLock<T>(repo: Repo, work: () => Promise<T>): Promise<T> {
  const own = hex(random(8));
  const lock = utf8(JSON.stringify({ host: hostname(), pid: Deno.pid }));
  try {
    const sealed = await seal(repo.keys, `locks/${own}`, lock);
    await repo.store.write(`locks/${own}`, sealed, `locks/${own}.new`); // not a lock till renamed
    const leftovers = (await repo.store.list("tmp")).filter((name) => isHex(name, 16));
    let others = 0;
    for (const id of await repo.store.list("locks")) {
      if (!isHex(id, 16) || id === own) continue;
      const other = await getJson(repo, `locks/${id}`).catch(() => null); // gone, or won't open
      const stale = other?.host === hostname() && !isAlive(other.pid); // its process is gone
      if (stale) await repo.store.remove(`locks/${id}`).catch(() => {}); // or another run did
      else others++;
    }
    const deletable = others === 0 ? leftovers : []; // else a live run may be writing them
    for (const name of deletable) await repo.store.remove(`tmp/${name}`).catch(() => {}); // or gone
    return await work();
  } finally {
    await repo.store.remove(`locks/${own}`).catch(() => {});
  }
}
function isAlive(pid: unknown): boolean {
  try {
    return process.kill(Number(pid), 0);
  } catch (error) {
    return (error as Untyped).code !== "ESRCH"; // EPERM: alive, another user's
  }
}

// ---- Storage (§1, §7): one Store over an SFTP server or a local folder ------------------------
type Done<T = void> = (error: Untyped, result: T) => void;
type Info = { isDirectory(): boolean };
type Item = { filename: string };
/** The callback calls a Store makes, as ssh2's SFTP client names them; LOCAL_FILES: node:fs's. */
type Files = {
  open(path: string, flags: "r" | "wx", attrs: { mode?: number }, done: Done<Untyped>): void;
  read(handle: Untyped, data: Buffer, offset: 0, length: number, pos: 0, done: Done<number>): void;
  write(handle: Untyped, data: Buffer, offset: 0, length: number, pos: 0, done: Done<number>): void;
  close(handle: Untyped, done: Done): void;
  lstat(path: string, done: Done<Info>): void;
  readdir(path: string, done: Done<Item[]>): void;
  mkdir(path: string, attrs: { mode: number }, done: Done): void;
  unlink(path: string, done: Done): void;
  rename(from: string, to: string, done: Done): void; // SFTP v3: fails if `to` exists
  ext_openssh_rename(from: string, to: string, done: Done): void; // replaces `to` atomically
  ext_openssh_fsync(handle: Untyped, done: Done): void;
};
/** Files, what they offer (OpenSSH's extensions on a server), and whether the link was lost. */
type Connection = Offers & { files: Files; name: string; local: boolean };
type Offers = { posixRename: boolean; fsync: boolean; isLost: () => boolean; end: () => void };
type Store = ReturnType<typeof makeStore>;
const FOLDERS = ["snapshots", "data", "locks", "tmp"]; // §1
const asBuffer = (bytes: Uint8Array) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
const isMissing = (error: Untyped) => ["ENOENT", "ENOTDIR", 2].includes(error?.code); // 2: SFTP's
const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_DIRECTORY } = fs.constants;

/** Objects read and written whole, by name, inside root; each failure is one line. */
function makeStore(connection: Connection, root: string) {
  const { files } = connection;
  const path = (name: string) => name ? `${root}/${name}` : root;
  /** One call as a promise; its error becomes "Cannot <action> <name>: <reason>". */
  const call = <T>(action: string, name: string, start: (done: Done<T>) => void) =>
    new Promise<T>((resolve, reject) => {
      const lost = new UserError(`Lost the SSH connection to ${connection.name}`);
      if (connection.isLost()) return reject(lost); // ssh2 would never answer
      start((error, result) => {
        if (!error) return resolve(result);
        if (connection.isLost()) return reject(lost);
        const reason = String(error.message).replace(/^E[A-Z]+: ([^,]+).*$/s, "$1"); // node:fs
        reject(new UserError(`Cannot ${action} ${name || root}: ${reason}`, 1, "", error));
      });
    });
  /** What is at name (or a full path: makeFolders'), as lstat sees it; null if nothing is. */
  const lstat = (name: string, full = path(name)) =>
    call<Info>("check", name, (done) => files.lstat(full, done)).catch((error) => {
      if (isMissing(error.cause)) return null;
      throw error;
    });
  /** Creates name exclusively (mode 0600), writes and syncs it; a failure then removes it. */
  async function create(name: string, object: Uint8Array): Promise<void> {
    const data = asBuffer(object);
    const file = await call("create", name, (done) => files.open(path(name), "wx", PRIVATE, done));
    try {
      const written = await call<number>("write", name, (done) => {
        files.write(file, data, 0, data.length, 0, done);
      });
      if (written !== data.length) throw new UserError(`Only ${written} bytes of ${name} stored`);
      if (connection.fsync) await call("sync", name, (done) => files.ext_openssh_fsync(file, done));
    } catch (error) {
      await call("delete", name, (done) => files.unlink(path(name), done)).catch(() => {});
      throw error; // the first failure, not the clean-up's
    } finally {
      await call("close", name, (done) => files.close(file, done));
    }
  }
  /** The first `length` bytes of name: fewer if it is shorter. */
  async function readStart(name: string, length: number): Promise<Bytes> {
    const handle = await call("open", name, (done) => files.open(path(name), "r", {}, done));
    const buffer = Buffer.alloc(length); // its own memory, not a shared pool
    const count = await call<number>("read", name, (done) => {
      files.read(handle, buffer, 0, length, 0, done); // ssh2: in pieces, in order
    }).finally(() => files.close(handle, () => {})); // not waited for: one round trip less
    return new Uint8Array(buffer.buffer as ArrayBuffer, buffer.byteOffset, count);
  }
  return {
    root,
    connection,
    create,
    lstat,
    remove: (name: string) => call("delete", name, (done) => files.unlink(path(name), done)),
    /** The whole object: of the size given, else of at most SMALL_OBJECT_BYTES; else exit 3. */
    async read(name: string, size?: number): Promise<Bytes> {
      const refuse = (reason: string) => new UserError(`Cannot read ${name}: ${reason}`, 3);
      const limit = size ?? SMALL_OBJECT_BYTES;
      const data = await readStart(name, limit + 1).catch((error) => { // 1 more: longer is refused
        if (connection.isLost()) throw error;
        if (isMissing(error.cause)) throw refuse("it is missing");
        throw new UserError(error.message, 3);
      });
      if (data.length > limit) throw refuse("it is too large");
      if (size !== undefined && data.length !== size) throw refuse("it is too short");
      return data;
    },
    /** §7: to tmp/ (created exclusively), synced, then renamed: a name never holds a part. */
    async write(name: string, object: Uint8Array, temporary = `tmp/${hex(random(8))}`) {
      await create(temporary, object);
      await call("rename", temporary, (done) => {
        if (connection.posixRename) files.ext_openssh_rename(path(temporary), path(name), done);
        else files.rename(path(temporary), path(name), done);
      });
    },
    /** The names in a folder; none if there is no such folder. */
    async list(folder: string): Promise<string[]> {
      if ((await lstat(folder)) === null) return [];
      const items = await call<Item[]>("list", folder, (done) => files.readdir(path(folder), done));
      return items.map((item) => item.filename);
    },
    /** mkdir -p of the root (mode 0700), then §1's folders in it. */
    async makeFolders(): Promise<void> {
      const parts = root.split("/");
      const above = parts.map((_part, index) => parts.slice(0, index + 1).join("/"));
      for (const folder of [...above, ...FOLDERS.map(path)]) {
        if (folder === "" || folder === "." || await lstat(folder, folder) !== null) continue;
        await call("create", folder, (done) => files.mkdir(folder, { mode: 0o700 }, done));
      }
    },
    /** §7: a local folder is synced after renames into it, so they survive a power cut. */
    async syncFolder(folder: string): Promise<void> {
      if (!connection.local) return; // a server's file system decides
      const handle = await openFile(path(folder), O_RDONLY | O_DIRECTORY | O_NOFOLLOW); // no FIFO
      await handle.sync().finally(() => handle.close());
    },
  };
}
/** A local folder: node:fs, whose opens follow no link and wait on no FIFO (§1). */
const LOCAL_OFFERS = { local: true, posixRename: true, fsync: true, isLost: () => false, end() {} };
const LOCAL_FILES: Files = {
  ...fs, // read, write, close, lstat, mkdir, unlink and rename take ssh2's arguments
  open: (path, flags, _attrs, done) => {
    const how = flags === "r" ? O_RDONLY : O_WRONLY | O_CREAT | O_EXCL;
    fs.open(path, how | O_NOFOLLOW | O_NONBLOCK, PRIVATE.mode, done);
  },
  readdir: (path, done) =>
    fs.readdir(path, (error, names) => done(error, names?.map((filename) => ({ filename })))),
  ext_openssh_rename: fs.rename, // atomic, replaces the target
  ext_openssh_fsync: fs.fsync,
};
/** Runs the user's own ssh (`$NFREEZER_SSH` through `sh -c`, as git runs GIT_SSH_COMMAND: its
 * options come first and win) as `ssh [options] -s -- DESTINATION sftp`: OpenSSH checks the host
 * key and authenticates. ssh2's SFTP class (1.17.0) speaks SFTP over ssh's pipes, through the
 * internals named below; the SFTP tests hold them. */
async function connectSsh(destination: string, port: string, options: Options) {
  const hostKeys = options["accept-new-host"] ? "accept-new" : "yes";
  const args = ["-o", `StrictHostKeyChecking=${hostKeys}`, "-o", "ServerAliveInterval=15"];
  args.push("-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=20"); // dead host: fail, not hang
  if (options.identity) args.push("-i", options.identity);
  if (options["known-hosts"]) args.push("-o", `UserKnownHostsFile="${options["known-hosts"]}"`);
  if (port) args.push("-p", port);
  const ssh = Deno.env.get("NFREEZER_SSH") || "ssh";
  const shell = ["-c", `${ssh} "$@"`, ssh, ...args, "-s", "--", destination, "sftp"];
  const child = new Deno.Command("sh", { args: shell, stdin: "piped", stdout: "piped" }).spawn();
  const writer = child.stdin.getWriter();
  const channel = { // ssh2 writes through `_protocol`; no window: ssh does flow control
    channelData: (_id: number, data: Uint8Array) => void writer.write(data).catch(() => {}),
    channelClose: () => void writer.close().catch(() => {}),
  };
  const outgoing = { id: 0, state: "open", window: Infinity, packetSize: Infinity };
  const sftp = new SFTP({ _protocol: channel }, { type: "sftp", outgoing }, {});
  sftp.on("error", () => {}); // a protocol error ends the channel; pending calls fail with it
  let lost = false;
  const receive = new WritableStream({ write: (data: Uint8Array) => sftp.push(asBuffer(data)) });
  const ended = child.stdout.pipeTo(receive).catch(() => {}); // `push()`: ssh's output to ssh2
  ended.then(() => {
    lost = true;
    sftp.push(null); // ssh2 fails every pending request; again, for the closes their failures
    sftp.push(null); // send (ssh2's readdir closes its handle when a read fails)
  });
  sftp._init(); // ssh2 sends the version request; the reply lists `_extensions`
  const ready = new Promise((resolve) => sftp.once("ready", resolve));
  if (await Promise.race([ready.then(() => true), ended.then(() => false)]) === false) {
    const hint = `an unknown host needs --accept-new-host; \`ssh ${destination}\` shows why`;
    throw new UserError(`The SSH connection to ${destination} ended before SFTP started`, 1, hint);
  }
  const posixRename = sftp._extensions["posix-rename@openssh.com"] === "1";
  const fsync = sftp._extensions["fsync@openssh.com"] === "1";
  const connection = { files: sftp as Files, name: destination, local: false, posixRename, fsync };
  return { ...connection, isLost: () => lost, end: () => sftp.end() };
}

// ---- Backup -----------------------------------------------------------------------------------
type FileState = { size: number; mtime: number; chunks: string[] };
type UseChunk = (chunk: Bytes) => Promise<string>;
const isFsError = (error: unknown): error is Error => /^E[A-Z0-9]+$/.test((error as Untyped)?.code);
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const since = (start: number) => `${((Date.now() - start) / 1000).toFixed(1)} s`;

/** Walks root, following no link; skips sockets, FIFOs, devices and the repository itself. */
function scanTree(root: string, excludes: string[], localRepo: string, ui: Ui): Entry[] {
  const entries: Entry[] = [];
  const visit = (path: string) => {
    const full = join(root, path);
    if (full === localRepo) return ui.warn(`skipped ${path}: it is the repository`);
    try {
      const info = Deno.lstatSync(full);
      const entry = { path, mode: info.mode! & 0o7777, mtime: info.mtime!.getTime() };
      const target = info.isSymlink ? Deno.readLinkSync(full) : undefined;
      if (info.isFile) return entries.push({ ...entry, type: "file", size: info.size });
      if (target !== undefined) return entries.push({ ...entry, type: "symlink", target });
      if (!info.isDirectory) return ui.warn(`skipped ${path}: not a file, folder or symlink`);
      entries.push({ ...entry, type: "dir" });
      for (const { name } of Deno.readDirSync(full)) {
        const child = path ? `${path}/${name}` : name;
        const matches = (glob: string) => matchesGlob(child, glob) || matchesGlob(name, glob);
        if (!excludes.some(matches)) visit(child);
      }
    } catch (error) {
      if (!isFsError(error)) throw error;
      ui.problem(`cannot read ${path || root}: ${error.message}`);
    }
  };
  visit("");
  return entries.sort((a, b) => (a.path < b.path ? -1 : 1));
}
/** A regular file's chunks, each handed to `use` (backup stores it; restore hashes it to compare)
 * as read through one handle that follows no link and waits on no FIFO: the path may have been
 * swapped since the scan. null if it changed while read, or is no longer a file. */
async function readChunks(path: string, use: UseChunk): Promise<FileState | null> {
  const file = await openFile(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  try {
    const before = await file.stat();
    const moved = Deno.build.os === "linux" && fs.readlinkSync(`/proc/self/fd/${file.fd}`) !== path;
    if (!before.isFile() || moved) return null; // swapped since the scan, or a folder on its path
    const chunks: string[] = [];
    for (let offset = 0; offset < before.size; offset += CHUNK_BYTES) {
      const chunk = new Uint8Array(Math.min(CHUNK_BYTES, before.size - offset));
      const { bytesRead } = await file.read(chunk, 0, chunk.length, offset);
      if (bytesRead < chunk.length) return null; // it shrank while being read
      chunks.push(await use(chunk));
    }
    const after = await file.stat();
    if (after.size !== before.size || after.mtimeMs !== before.mtimeMs) return null;
    return { size: before.size, mtime: before.mtime.getTime(), chunks };
  } finally {
    await file.close();
  }
}
/** Stores one changed file; null (a problem named) if it cannot be read, or keeps changing. */
async function storeFile(root: string, path: string, useChunk: UseChunk, ui: Ui) {
  try {
    for (let attempt = 0; attempt < 3; attempt++) {
      const stored = await readChunks(join(root, path), useChunk);
      if (stored !== null) return stored;
    }
    ui.problem(`skipped ${path}: it kept changing while being read (or is no file now)`);
  } catch (error) {
    if (!isFsError(error)) throw error; // not the file's: an upload failed, or a bug
    ui.problem(`cannot read ${path}: ${error.message}`);
  }
  return null;
}
/** Adds a snapshot: reads only files whose size or mtime changed, sends only new chunks. */
async function backup(repo: Repo, [source]: string[], options: Options, ui: Ui): Promise<void> {
  if (!Deno.statSync(source).isDirectory) throw new UserError(`${source} is not a folder`);
  const started = Date.now();
  const root = Deno.realPathSync(source); // no link in it: readChunks' /proc check needs that
  const listed = await listSnapshots(repo, ui);
  const parent = listed.findLast((item) => item.host === hostname() && item.source === root);
  let before: Entry[] = []; // the parent's entries: unchanged files are not read again
  try {
    if (parent) before = await loadManifest(repo, parent);
  } catch (error) {
    if (!isDamage(error)) throw error;
    ui.problem(`the parent snapshot: ${(error as Error).message}; every file is read`, 3);
  }
  const previous = new Map(before.map((entry) => [entry.path, entry]));
  const known = new Set(before.flatMap((entry) => entry.chunks ?? [])); // §4: stored already
  const localRepo = repo.store.connection.local ? Deno.realPathSync(repo.store.root) : "";
  if (root === localRepo) throw new UserError(`${source} is the repository itself`);
  const entries = scanTree(root, options.exclude ?? [], localRepo, ui);
  const files = entries.filter((entry) => entry.type === "file");
  const total = files.reduce((sum, entry) => sum + entry.size!, 0);
  const done = { bytes: 0, read: 0, sent: 0, chunks: 0, new: 0, changed: 0, same: 0 };
  const progress = () =>
    `${done.new} new, ${done.changed} changed, ${done.same} unchanged of ${files.length} files` +
    `; ${mib(done.bytes)} of ${mib(total)}; ${mib(done.read)} read, ${mib(done.sent)} sent in ` +
    `${done.chunks} new chunks; ${since(started)}`;
  /** §4: stores a chunk unless it is stored already: known, or sent by an interrupted run. */
  const storeChunk = async (chunk: Bytes) => {
    ui.status(progress);
    const id = await chunkId(repo.keys, chunk);
    if (known.has(id)) return id;
    known.add(id);
    if ((await repo.store.lstat(`data/${id}`)) !== null) return id;
    await repo.store.write(`data/${id}`, await seal(repo.keys, `data/${id}`, chunk));
    done.sent += chunk.length;
    done.chunks++;
    return id;
  };
  const storeFileChunk = (chunk: Bytes) => {
    done.read += chunk.length; // a retry's too (the manifest's chunks are not read from files)
    return storeChunk(chunk);
  };
  const kept: Entry[] = [];
  for (const entry of entries) {
    const old = previous.get(entry.path);
    done.bytes += entry.size ?? 0; // the files reached, read or not: the status line's "of"
    if (entry.type !== "file") kept.push(entry);
    else if (old?.type === "file" && old.size === entry.size && old.mtime === entry.mtime) {
      kept.push({ ...entry, chunks: old.chunks });
      done.same++;
    } else {
      const stored = await storeFile(root, entry.path, storeFileChunk, ui);
      if (stored === null) continue;
      kept.push({ ...entry, ...stored });
      if (old?.type === "file") done.changed++;
      else done.new++;
    }
  }
  const json = utf8(JSON.stringify(kept));
  const packed = gzipSync(json);
  if (json.length > MANIFEST_MAX_BYTES || packed.length > MANIFEST_MAX_BYTES) {
    const limit = `${mib(MANIFEST_MAX_BYTES)}: about 1.4 million files`;
    throw new UserError(`The manifest would be ${mib(json.length)}, over its limit (${limit})`);
  }
  const manifest = { size: packed.length, chunks: [] as string[] };
  for (let offset = 0; offset < packed.length; offset += CHUNK_BYTES) {
    manifest.chunks.push(await storeChunk(packed.slice(offset, offset + CHUNK_BYTES)));
  }
  await repo.store.syncFolder("data"); // §6: every chunk is stored before a snapshot names it
  const snapshotId = hex(random(8));
  const snapshot = { time: new Date().toISOString(), host: hostname(), source: root, manifest };
  await putJson(repo, `snapshots/${snapshotId}`, { ...snapshot, parent: parent?.id, bytes: total });
  await repo.store.syncFolder("snapshots");
  ui.info(`Snapshot ${snapshotId}: ${progress()}`);
}

// ---- Restore ----------------------------------------------------------------------------------
/** node:fs takes seconds: half a millisecond more keeps float rounding from losing one. */
const fsTime = (entry: Entry) => (entry.mtime + 0.5) / 1000;

/** Sets an entry's mode (never setuid or setgid) and time through an open file or folder. */
async function finish(file: FileHandle, entry: Entry): Promise<void> {
  await file.chmod(entry.mode & RESTORED_MODE_BITS);
  await file.utimes(fsTime(entry), fsTime(entry));
}
/** Restores the newest snapshot (or --snapshot's) in path order: a folder (0700 until the end)
 * before what it holds; a file or link made in a private folder, then renamed into place, so
 * nothing is written through a link; a file already there with the same content is kept. Last,
 * folders get their modes and times, deepest first. A failed entry is named, and so is all that
 * a failed folder holds. As root, a target others can write to is refused: they could swap it. */
async function restore(repo: Repo, [target]: string[], options: Options, ui: Ui): Promise<void> {
  const started = Date.now();
  const asked = options.snapshot ?? ""; // an id's start; "": the newest
  const matches = (await listSnapshots(repo, ui)).filter((item) => item.id.startsWith(asked));
  if (asked && matches.length > 1) throw new UserError(`${matches.length} ids start ${asked}`);
  const snapshot = matches.at(-1); // §6: the newest
  if (!snapshot) throw new UserError(asked ? `No snapshot ${asked}` : "No snapshots", ui.exitCode);
  const entries = await loadManifest(repo, snapshot);
  const existing = await Deno.stat(target).catch(() => null);
  if (existing !== null && !existing.isDirectory) throw new UserError(`${target} is not a folder`);
  await Deno.mkdir(target, { recursive: true });
  const root = Deno.realPathSync(target);
  const { uid, mode: rootMode } = Deno.statSync(root);
  const exposed = uid !== Deno.uid() || (rootMode! & 0o022) !== 0; // its owner or others could swap
  const hint = "restore into a folder root owns and alone can write to, then move what you need";
  if (Deno.uid() === 0 && exposed) throw new UserError(`${target} is open to other users`, 1, hint);
  for (const item of Deno.readDirSync(root)) { // a killed restore's private folder
    const leftover = item.isDirectory && /^\.nfreezer-restore-[0-9a-f]{16}$/.test(item.name);
    if (leftover) await Deno.remove(join(root, item.name), { recursive: true });
  }
  const scratch = await Deno.makeTempDir({ dir: root, prefix: ".nfreezer-restore-" }); // 0700
  const files = entries.filter((entry) => entry.type === "file");
  const total = files.reduce((sum, entry) => sum + entry.size!, 0);
  const done = { files: 0, same: 0, bytes: 0, written: 0 };
  const progress = () =>
    `${done.files} of ${files.length} files (${done.same} already there); ${mib(done.bytes)} of ` +
    `${mib(total)}, ${mib(done.written)} written; ${since(started)}`;
  const failed = new Set<string>(); // paths of entries that could not be restored
  /** Runs one entry's work; a failure is named and counted, and the restore goes on. */
  async function attempt(entry: Entry, work: typeof restoreFile, temporary = ""): Promise<void> {
    const orphaned = entry.path !== "" && failed.has(parentOf(entry.path));
    try {
      if (orphaned) throw new UserError("its folder could not be restored");
      await work(entry, join(root, entry.path), temporary);
    } catch (error) {
      const expected = error instanceof UserError || isFsError(error); // else a bug: keep its stack
      if (!expected || (!orphaned && repo.store.connection.isLost())) throw error;
      failed.add(entry.path);
      const exitCode = error instanceof UserError ? error.exitCode : 1;
      ui.problem(`cannot restore ${entry.path || "."}: ${error.message}`, exitCode);
    }
  }
  async function restoreFolder(entry: Entry, path: string): Promise<void> {
    const info = await Deno.lstat(path).catch(() => null);
    if (info !== null && !info.isDirectory) await Deno.remove(path); // a file or link there
    if (info === null || !info.isDirectory) return await Deno.mkdir(path, { mode: 0o700 });
    if (info.uid !== Deno.uid()) throw new UserError("another user owns it, and could swap it");
    await finishFolder({ ...entry, mode: 0o700 }, path); // writable for us, closed to others
  }
  async function isRestored(entry: Entry, path: string): Promise<boolean> {
    const info = await Deno.lstat(path).catch(() => null);
    const mode = (info?.mode ?? 0) & 0o7777;
    const same = info?.isFile && info.size === entry.size && info.mtime?.getTime() === entry.mtime;
    const ownedAsSaved = info?.uid === Deno.uid() && mode === (entry.mode & RESTORED_MODE_BITS);
    if (!same || !ownedAsSaved) return false;
    const found = await readChunks(path, (chunk) => chunkId(repo.keys, chunk)).catch(() => null);
    return found?.chunks.join() === entry.chunks!.join();
  }
  async function restoreFile(entry: Entry, path: string, temporary: string): Promise<void> {
    if (await isRestored(entry, path)) done.same++;
    else await writeFile(entry, path, temporary);
    done.files++;
    done.bytes += entry.size!;
    ui.status(progress);
  }
  async function writeFile(entry: Entry, path: string, temporary: string): Promise<void> {
    const file = await openFile(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
    try {
      for await (const chunk of chunksOf(repo, entry as Content)) { // §4: each one verified
        for (let at = 0; at < chunk.length;) at += (await file.write(chunk, at)).bytesWritten;
        done.written += chunk.length;
        ui.status(progress);
      }
      await finish(file, entry); // mode and time through the handle, not the path
    } finally {
      await file.close();
    }
    await Deno.rename(temporary, path); // replaces a file or link there, never follows it
  }
  async function restoreLink(entry: Entry, path: string, temporary: string): Promise<void> {
    await Deno.symlink(entry.target!, temporary);
    await lutimes(temporary, fsTime(entry), fsTime(entry));
    await Deno.rename(temporary, path);
  }
  async function finishFolder(entry: Entry, path: string): Promise<void> {
    const folder = await openFile(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    await finish(folder, entry).finally(() => folder.close());
  }
  const restorers = { dir: restoreFolder, file: restoreFile, symlink: restoreLink };
  try {
    for (const [index, entry] of entries.entries()) {
      await attempt(entry, restorers[entry.type], join(scratch, String(index)));
    }
  } finally {
    await Deno.remove(scratch, { recursive: true }); // before the target's own time is set
  }
  for (const entry of entries.toReversed()) { // deepest first
    if (entry.type === "dir" && !failed.has(entry.path)) await attempt(entry, finishFolder);
  }
  ui.info(`Restored snapshot ${snapshot.id}: ${progress()}`);
}

// ---- Command line -----------------------------------------------------------------------------
const SELF = Deno.execPath().endsWith("/deno") ? "deno run -A nfreezer.ts" : "nfreezer"; // compiled
const HELP = `see ${SELF} --help`;
const USAGE = `Usage: ${SELF} <command> ...     (nfreezer 0.4.0: encrypted backups)
  init      <repo>                create a repository (backup needs one)
  backup    <source-dir> <repo>   add a snapshot         [--exclude GLOB]...
  restore   <repo> <target-dir>   restore the newest snapshot, or [--snapshot ID-PREFIX]
  snapshots <repo>                list the snapshots
<repo>: /local/path, ./relative/path, user@host:path or sftp://user@host[:port]/path.
Options:
  --password-file FILE  read the passphrase from FILE (else $NFREEZER_PASSWORD)
  -i, --identity FILE   SSH key for ssh ($NFREEZER_SSH, default ssh, with its ~/.ssh/config)
  --known-hosts FILE    SSH known hosts file (ssh's UserKnownHostsFile)
  --accept-new-host     trust and remember the key of a host not yet in known_hosts
Exit codes: 0 ok, 1 error, 2 usage error, 3 integrity error (tampered or missing data)`;
const OPTIONS = {
  exclude: { type: "string", multiple: true },
  snapshot: { type: "string" },
  "password-file": { type: "string" },
  identity: { type: "string", short: "i" },
  "known-hosts": { type: "string" },
  "accept-new-host": { type: "boolean" },
  help: { type: "boolean", short: "h" },
} as const;
/** A command: its arguments (<repo> is opened, or made if it `creates`), options and lock (§8). */
type Command = { args: string[]; options: string[]; creates?: true; locked?: true; run: Run };
type Run = (repo: Repo, args: string[], options: Options, ui: Ui) => Promise<void> | void;
const reportCreated: Run = (repo, _args, _options, ui) => ui.info(`Created ${repo.store.root}`);
async function listCommand(repo: Repo, _args: string[], _options: Options, ui: Ui): Promise<void> {
  for (const { id, time, host, source, bytes } of await listSnapshots(repo, ui) as Untyped[]) {
    ui.info(printable(`${id}  ${time}  ${host}:${source}  ${mib(bytes)}`));
  }
}
const COMMANDS: Record<string, Command> = {
  init: { args: ["<repo>"], options: [], creates: true, run: reportCreated },
  backup: { args: ["<source-dir>", "<repo>"], options: ["exclude"], locked: true, run: backup },
  restore: { args: ["<repo>", "<target-dir>"], options: ["snapshot"], run: restore },
  snapshots: { args: ["<repo>"], options: [], run: listCommand },
};

/** The passphrase from --password-file, else $NFREEZER_PASSWORD, which is then removed from the
 * environment: ssh and its ProxyCommand never see it. Strict UTF-8: no two passphrases collide. */
function getPassphrase(options: Options): string {
  const file = options["password-file"];
  const strict = new TextDecoder("utf-8", { fatal: true });
  let passphrase = "";
  try {
    if (file) passphrase = strict.decode(Deno.readFileSync(file)).replace(/\r?\n$/, "");
    else passphrase = Deno.env.get("NFREEZER_PASSWORD") ?? "";
    Deno.env.delete("NFREEZER_PASSWORD");
  } catch (error) {
    if (isFsError(error)) throw error; // the file cannot be read
    throw new UserError("The passphrase is not valid UTF-8");
  }
  const hint = "give it with --password-file FILE or $NFREEZER_PASSWORD";
  if (passphrase === "") throw new UserError("A passphrase is needed", 1, hint);
  return passphrase;
}
/** Splits a location into an ssh destination, port and path (no destination: a local path). */
function parseLocation(location: string) {
  if (location.startsWith("sftp://")) {
    const url = URL.parse(location);
    const path = decodeURIComponent(url?.pathname ?? "").replace(/^\/~\//, ""); // ~/: home
    const usage = new UserError(`${location}: write sftp://user@host[:port]/path`, 2, HELP);
    if (!url?.hostname || path === "" || path === "/") throw usage;
    const user = url.username ? `${decodeURIComponent(url.username)}@` : "";
    const host = url.hostname.replace(/^\[(.*)\]$/, "$1"); // ssh takes [::1] as ::1
    return { destination: user + host, port: url.port, path };
  }
  const scp = /^([^/:]+):(.*)$/.exec(location); // as scp: a local "a:b" is written ./a:b
  if (scp) return { destination: scp[1], port: "", path: scp[2].replace(/^~(\/|$)/, "") || "." };
  return { destination: "", port: "", path: absolutePath(location) };
}
/** Opens the repository at a location, or with `create` makes a new one there (init). */
async function openRepo(location: string, options: Options, create = false): Promise<Repo> {
  const { destination, port, path } = parseLocation(location);
  const passphrase = getPassphrase(options); // before ssh starts: it must not see the variable
  const local = { files: LOCAL_FILES, name: path, ...LOCAL_OFFERS };
  const connection = destination ? await connectSsh(destination, port, options) : local;
  const store = makeStore(connection, path);
  try {
    if (create) return await createRepo(store, location, passphrase);
    const names = await store.list("");
    const hint = `create one with: ${SELF} init ${location}`;
    if (!names.includes("config")) throw new UserError(`No repository at ${location}`, 1, hint);
    for (const folder of FOLDERS) {
      if (!(await store.lstat(folder))?.isDirectory()) throw damaged(`${path}/${folder}`);
    }
    return { store, keys: await unlockConfig(await store.read("config"), passphrase) };
  } catch (error) {
    store.connection.end();
    throw error;
  }
}
/** §1, §2: a repository in an empty or missing folder (mkdir -p). The config, last, is created
 * exclusively and read back: of two runs at once one wins, and the other stops. */
async function createRepo(store: Store, location: string, passphrase: string): Promise<Repo> {
  const names = await store.list("").catch(() => null);
  if (names === null) throw new UserError(`${location} is not a folder`);
  if (names.includes("config")) throw new UserError(`${location} is a repository already`);
  if (names.length > 0) throw new UserError(`${location} is not empty, and not a repository`);
  const [master, salt, nonce] = [random(2 * KEY_BYTES), random(SALT_BYTES), random(NONCE_BYTES)];
  const config = utf8(await wrapMaster(passphrase, master, salt, nonce));
  await store.makeFolders();
  await store.create("config", config).catch(async (error) => {
    if ((await store.lstat("config")) === null) throw error;
    throw new UserError(`Another run created a repository at ${location} meanwhile`);
  });
  if (Buffer.compare(await store.read("config"), config) !== 0) throw damaged("The new config");
  return { store, keys: await importKeys(master) };
}
async function runCli(argv: string[]): Promise<void> {
  process.umask(0o077); // safe default: what this process creates is private to the user
  const parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const options = parsed.values as Options;
  const [name, ...args] = parsed.positionals;
  if (options.help || name === undefined) return console.log(USAGE);
  if (!Object.hasOwn(COMMANDS, name)) throw new UserError(`Unknown command ${name}`, 2, HELP);
  const command = COMMANDS[name];
  const usage = `usage: ${SELF} ${name} ${command.args.join(" ")}`;
  const commandOptions = Object.values(COMMANDS).flatMap((other) => other.options); // not global
  const isForeign = (key: string) => commandOptions.includes(key) && !command.options.includes(key);
  const foreign = Object.keys(options).find(isForeign); // another command's option
  if (foreign) throw new UserError(`${name} does not take --${foreign}`, 2, usage);
  const wanted = command.args.join(" ");
  if (args.length !== command.args.length) throw new UserError(`${name} takes ${wanted}`, 2, usage);
  const ui = makeUi();
  const at = command.args.indexOf("<repo>");
  const repo = await openRepo(args[at], options, command.creates);
  const run = async () => await command.run(repo, args.toSpliced(at, 1), options, ui); // not <repo>
  await (command.locked ? withLock(repo, run) : run()).finally(() => repo.store.connection.end());
  const problems = `${ui.problems} problem${ui.problems === 1 ? "" : "s"} (see the warnings above)`;
  if (ui.problems > 0) throw new UserError(problems, ui.exitCode);
}
/** Runs the command line, returns the exit code; errors not ours keep their stack trace. */
export async function main(argv: string[]): Promise<number> {
  try {
    await runCli(argv);
    return 0;
  } catch (thrown: Untyped) {
    const usage = String(thrown?.code).startsWith("ERR_PARSE_ARGS") || thrown instanceof URIError;
    const error = usage ? new UserError(thrown.message.split(". ")[0], 2, HELP) : thrown;
    if (!(error instanceof UserError || isFsError(error))) throw error;
    console.error(`nfreezer: error: ${printable(error.message.replace(/ \(os error \d+\)/, ""))}`);
    if (error instanceof UserError && error.hint) console.error(`nfreezer: hint: ${error.hint}`);
    return error instanceof UserError ? error.exitCode : 1;
  }
}

export { chunkId, importKeys, openRepo, padme, putJson, seal, unlockConfig, wrapMaster }; // tests

if (import.meta.main) Deno.exit(await main(Deno.args));
