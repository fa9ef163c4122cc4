/**
 * nfreezer.ts: encrypted-at-rest backups to an SFTP server or a local disk, in one auditable file.
 *   deno run -A nfreezer.ts backup ~/Documents user@host:/backups/docs      (--help for more)
 *
 * THREAT MODEL
 * Trusted: this machine, the passphrase, the user's OpenSSH client and its known_hosts.
 * Untrusted: the storage server, anyone who can write to the repository, the network, and what
 *   a restore target already holds.
 * Guaranteed: the server never gets keys, file names, paths, contents, modes or times in clear.
 *   A changed, truncated, swapped, renamed or replayed object fails authentication before any
 *   byte of it reaches a final path: restore reproduces the snapshot or exits 3 naming the paths
 *   it could not verify. No manifest entry lands outside the target; restore never writes,
 *   chmods or sets times through a link it finds there, nor does a local repository's link lead
 *   a write or a delete elsewhere. Memory stays bounded whatever the server holds.
 * Not hidden: the total size, number and padded sizes of objects (Padmé), so the size of each
 *   changed file to within ~12%; when backups run and how much changed. The server can delete
 *   the repository or withhold the newest snapshots, and that is not detected.
 *
 * ON-DISK FORMAT, version 2. The README's Format section has the full text with "to write" and
 * "to read" steps; each § is cited where the code implements it.
 * §1 Layout: config, snapshots/<16 hex>, data/<64 hex>, locks/<16 hex>, tmp/<16 hex>.
 * §2 config: plaintext JSON {format, kdf: {log2N, r, p, salt}, nonce, keys}, bytes in base64;
 *    KEK = scrypt(NFKC(passphrase), salt, 2^log2N, r, p); keys = AES-256-GCM(KEK, nonce,
 *    encKey(32) || idKey(32), aad = CONFIG_AAD).
 * §3 Object named N: "NFZ1" || salt(32) || AES-256-GCM(K, 0^12, u32be(L) || content(L) || 0^pad),
 *    K = HKDF-SHA-256(ikm = encKey, salt, info = "nfreezer/1 object " || N), padded by Padmé.
 * §4 Chunk: a file or manifest is cut into CHUNK_BYTES pieces, each stored as object
 *    data/<hex(HMAC-SHA-256(idKey, piece))>.
 * §5 Manifest: gzipped JSON array of entries {path, type, mode, mtime (ms), size and chunks |
 *    target}, sorted by path, the root "" first; stored as chunks (§4).
 * §6 Snapshot: object snapshots/<random>: JSON {time, host, source, parent, manifest: {size,
 *    chunks}, files, bytes}, written only once every chunk it names is stored.
 * §7 Writes go to tmp/<random>, are synced, then renamed: a name never holds a partial object.
 * §8 Lock: object locks/<random>: JSON {host, pid, exclusive}; backup shares, prune excludes.
 * SSH is the user's own `ssh -s sftp`; ssh2's SFTP class (an internal API of the pinned version
 * below, held by the tests) speaks SFTP over its pipes.
 */

import { Buffer } from "node:buffer";
import { scryptSync } from "node:crypto";
import fs from "node:fs";
import { lutimes } from "node:fs/promises";
import { hostname } from "node:os";
import { basename, dirname, join, matchesGlob, resolve } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { gunzipSync, gzipSync } from "node:zlib";
import { SFTP } from "npm:ssh2@1.17.0/lib/protocol/SFTP.js";

const VERSION = "0.3.0";
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
const SMALL_OBJECT_BYTES = 64 * 1024; // §2, §6, §8: a few hundred bytes; larger is refused unread
const IN_FLIGHT_BYTES = 32 * 2 ** 20; // chunk bytes being sealed, sent or fetched at once
const IN_FLIGHT_COUNT = 64; // objects at once: hides the ~6 round trips each small one costs
const RESTORE_WINDOW = 2; // chunks fetched ahead within one restored file
const PROGRESS_MS = 250; // the progress line is redrawn at most this often
const LEFTOVER = /^\..+\.nfreezer-[0-9a-f]{8}$/; // a killed restore's temporary file

/** The error a user sees: one line, maybe a hint, and an exit code (1 error, 2 usage, 3 integrity).
 * Any other error is a bug and keeps its stack trace. */
class UserError extends Error {
  constructor(message: string, readonly exitCode = 1, readonly hint = "") {
    super(message);
  }
}
const damaged = (what: string) => new UserError(`${what} is corrupted or tampered with`, 3);
const fail = (error: Error): never => {
  throw error;
};
function parseJson(bytes: Uint8Array, what: string, gzipped = false) {
  try {
    return JSON.parse(new TextDecoder().decode(gzipped ? gunzipSync(bytes) : bytes));
  } catch {
    throw damaged(what);
  }
}

// ---- Crypto (§2–§4): the only code that touches crypto.subtle ---------------------------------

type Bytes = Uint8Array<ArrayBuffer>;
type Keys = { encKey: CryptoKey; idKey: CryptoKey };
const subtle = crypto.subtle;
const utf8 = (text: string): Bytes => new TextEncoder().encode(text);
const random = (count: number): Bytes => crypto.getRandomValues(new Uint8Array(count));
const hex = (bytes: ArrayBuffer) => Buffer.from(bytes).toString("hex");
const base64 = (bytes: Bytes) => Buffer.from(bytes).toString("base64");
const unbase64 = (text: unknown): Bytes =>
  new Uint8Array(typeof text === "string" ? Buffer.from(text, "base64") : []);
const gcm = (iv: Bytes, aad = "") => ({ name: "AES-GCM", iv, additionalData: utf8(aad) });
const ZERO_NONCE = new Uint8Array(NONCE_BYTES); // §3: each object key seals one payload only

/** §2: KEK = scrypt(NFKC(passphrase), salt, 2^log2N, r, p), its cost bounded before it runs. */
function deriveKek(passphrase: string, kdf: Record<string, number>, salt: Bytes) {
  const { log2N, r, p } = kdf ?? {};
  const memory = 128 * 2 ** log2N * r;
  const sane = [log2N, r, p].every(Number.isInteger) && r > 0 && p > 0 && p <= 4;
  if (!sane || log2N < 14 || log2N >= 16 * r || memory > SCRYPT_MAX_BYTES) {
    throw damaged("The scrypt parameters of the repository config"); // 2^log2N < 2^(16 r): RFC 7914
  }
  const options = { N: 2 ** log2N, r, p, maxmem: 2 * memory };
  const kek = scryptSync(passphrase.normalize("NFKC"), salt, KEY_BYTES, options);
  return subtle.importKey("raw", new Uint8Array(kek), "AES-GCM", false, ["encrypt", "decrypt"]);
}

/** §2: a new random master key, wrapped under the passphrase. */
async function createConfig(passphrase: string): Promise<{ config: string; keys: Keys }> {
  const [salt, nonce, master] = [random(SALT_BYTES), random(NONCE_BYTES), random(2 * KEY_BYTES)];
  const kek = await deriveKek(passphrase, SCRYPT, salt);
  const wrapped = new Uint8Array(await subtle.encrypt(gcm(nonce, CONFIG_AAD), kek, master));
  const kdf = { ...SCRYPT, salt: base64(salt) };
  const config = { format: FORMAT, kdf, nonce: base64(nonce), keys: base64(wrapped) };
  return { config: JSON.stringify(config, null, 2), keys: await importKeys(master) };
}

/** §2: unwraps the master key; a wrong passphrase is told apart from a malformed config. */
async function unlockConfig(bytes: Uint8Array, passphrase: string): Promise<Keys> {
  const config = parseJson(bytes, "The repository config");
  if (config?.format !== FORMAT) throw new UserError(`Unknown repository format ${config?.format}`);
  const [salt, nonce, wrapped] = [config.kdf?.salt, config.nonce, config.keys].map(unbase64);
  if (salt.length !== SALT_BYTES || nonce.length !== NONCE_BYTES) throw damaged("The config");
  if (wrapped.length !== 2 * KEY_BYTES + TAG_BYTES) throw damaged("The repository config");
  const kek = await deriveKek(passphrase, config.kdf, salt);
  const master = await subtle.decrypt(gcm(nonce, CONFIG_AAD), kek, wrapped).catch(() => {
    throw new UserError("Wrong passphrase", 1, "if it is right, the repository config was altered");
  });
  return importKeys(new Uint8Array(master));
}

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
const sealedBytes = (length: number) => HEADER_BYTES + 4 + padme(length) + TAG_BYTES; // §3

/** §3: K = HKDF-SHA-256(ikm = encKey, salt, info = OBJECT_INFO || name). */
function objectKey(keys: Keys, salt: Bytes, name: string): Promise<CryptoKey> {
  const hkdf = { name: "HKDF", hash: "SHA-256", salt, info: utf8(OBJECT_INFO + name) };
  const aes = { name: "AES-GCM", length: 256 };
  return subtle.deriveKey(hkdf, keys.encKey, aes, false, ["encrypt", "decrypt"]);
}

/** §3: "NFZ1" || salt || AES-256-GCM(K, 0^12, u32be(L) || content || padding). The salt is
 * fresh, so K is too, and K seals only this payload: the fixed nonce never repeats under a key.
 * The name is bound into K: an object moved to another name (a swap, a replay) fails to open. */
async function seal(keys: Keys, name: string, content: Uint8Array): Promise<Bytes> {
  const payload = new Uint8Array(4 + padme(content.length));
  new DataView(payload.buffer).setUint32(0, content.length);
  payload.set(content, 4);
  const salt = random(SALT_BYTES);
  const key = await objectKey(keys, salt, name);
  const sealed = new Uint8Array(await subtle.encrypt(gcm(ZERO_NONCE), key, payload));
  const object = new Uint8Array(HEADER_BYTES + sealed.length);
  object.set(utf8(MAGIC));
  object.set(salt, MAGIC.length);
  object.set(sealed, HEADER_BYTES);
  return object;
}

/** §3: opens an object read from name; only authenticated bytes come out. */
async function unseal(keys: Keys, name: string, object: Bytes): Promise<Bytes> {
  const magic = new TextDecoder().decode(object.subarray(0, MAGIC.length));
  if (magic !== MAGIC || object.length < HEADER_BYTES + 4 + TAG_BYTES) throw damaged(name);
  const key = await objectKey(keys, object.subarray(MAGIC.length, HEADER_BYTES), name);
  const sealed = object.subarray(HEADER_BYTES);
  const payload = await subtle.decrypt(gcm(ZERO_NONCE), key, sealed).catch(() =>
    fail(damaged(name))
  );
  const length = new DataView(payload).getUint32(0);
  if (4 + length > payload.byteLength) throw damaged(name);
  return new Uint8Array(payload, 4, length);
}

/** §4: id = hex(HMAC-SHA-256(idKey, chunk)): keyed, so the server cannot test for known files. */
async function chunkId(keys: Keys, chunk: Bytes): Promise<string> {
  return hex(await subtle.sign("HMAC", keys.idKey, chunk));
}

// ---- Repository objects (§4–§8): everything read is checked before it is used ----------------

type Repo = { store: Store; keys: Keys };
type Content = { size: number; chunks: string[] }; // §4: a file's or a manifest's chunks
type Entry = { path: string; type: "file" | "dir" | "symlink"; mode: number; mtime: number } & {
  size?: number;
  chunks?: string[];
  target?: string;
};
type Snapshot = { id: string; time: string; host: string; source: string; parent?: string } & {
  manifest: Content;
  files: number;
  bytes: number;
};
const isHex = (text: unknown, length: number) =>
  typeof text === "string" && text.length === length && /^[0-9a-f]*$/.test(text);
const chunkBytes = (content: Content, index: number) =>
  Math.min(CHUNK_BYTES, content.size - index * CHUNK_BYTES);
const isContent = (value: Content) =>
  Number.isSafeInteger(value?.size) && value.size >= 0 && Array.isArray(value.chunks) &&
  value.chunks.length === Math.ceil(value.size / CHUNK_BYTES) &&
  value.chunks.every((id) => isHex(id, 64));
const parentOf = (path: string) => path.slice(0, Math.max(0, path.lastIndexOf("/")));

async function putJson(repo: Repo, name: string, value: unknown): Promise<void> {
  await repo.store.write(name, await seal(repo.keys, name, utf8(JSON.stringify(value))));
}

async function getJson(repo: Repo, name: string) {
  return parseJson(await unseal(repo.keys, name, await repo.store.read(name)), name);
}

/** §4: a chunk is handed out only once it is authenticated and matches its id and length. */
async function loadChunk(repo: Repo, id: string, length: number): Promise<Bytes> {
  const name = `data/${id}`;
  const chunk = await unseal(repo.keys, name, await repo.store.read(name, sealedBytes(length)));
  if (chunk.length === length && await chunkId(repo.keys, chunk) === id) return chunk;
  throw damaged(`Chunk ${id}`);
}

/** §4: the chunks of a file or manifest in order, fetched RESTORE_WINDOW ahead. */
async function* chunksOf(repo: Repo, content: Content): AsyncGenerator<Bytes> {
  const pending: Promise<Bytes>[] = [];
  for (let next = 0; next < content.chunks.length || pending.length;) {
    while (next < content.chunks.length && pending.length < RESTORE_WINDOW) {
      pending.push(loadChunk(repo, content.chunks[next], chunkBytes(content, next++)));
      pending.at(-1)!.catch(() => {}); // awaited in order below; this only marks it handled
    }
    yield await pending.shift()!;
  }
}

/** §5: every field of every entry is checked; paths are unique, relative, and each sits in a
 * folder entry: no entry can land outside the target, under a link, or be written twice. */
function checkEntries(entries: Entry[], what: string): Entry[] {
  const types = new Map<string, string>();
  for (const entry of Array.isArray(entries) ? entries : [null as unknown as Entry]) {
    const { path, type, mode, mtime, target } = entry ?? {};
    const parts = typeof path === "string" ? path.split("/") : [""];
    const named = path === "" || parts.every((part) => !["", ".", ".."].includes(part));
    const placed = path === "" ? type === "dir" : types.get(parentOf(path)) === "dir";
    const fields = Number.isInteger(mode) && mode >= 0 && mode <= 0o7777 && isFinite(mtime);
    const typed = type === "dir" || (type === "file" && isContent(entry as Content)) ||
      (type === "symlink" && typeof target === "string" && target !== "");
    const clean = !`${path}${target ?? ""}`.includes("\0") && !types.has(path);
    if (!(named && placed && fields && typed && clean)) throw damaged(`${what} (at ${path})`);
    types.set(path, type);
  }
  return entries;
}

async function loadManifest(repo: Repo, snapshot: Snapshot): Promise<Entry[]> {
  const parts = [];
  for await (const part of chunksOf(repo, snapshot.manifest)) parts.push(part);
  const what = `The manifest of snapshot ${snapshot.id}`;
  return checkEntries(parseJson(Buffer.concat(parts), what, true), what);
}

async function getSnapshot(repo: Repo, id: string): Promise<Snapshot> {
  const value = await getJson(repo, `snapshots/${id}`);
  const named = [value?.time, value?.host, value?.source].every((text) => typeof text === "string");
  return named && isContent(value.manifest) ? { ...value, id } : fail(damaged(`Snapshot ${id}`));
}

/** §6: every snapshot that opens, oldest first, opened a few at a time; a damaged one is named
 * and counted (the command then exits 3) but does not stop the others. */
async function listSnapshots(repo: Repo, ui: Ui) {
  const [snapshots, opening] = [[] as Snapshot[], limiter(Infinity, 8)];
  let damagedCount = 0;
  for (const id of (await repo.store.list("snapshots")).filter((id) => isHex(id, 16))) {
    await opening.add(
      0,
      () =>
        getSnapshot(repo, id).then((snapshot) => void snapshots.push(snapshot), (error) => {
          ui.damaged(error, `skipped snapshot ${id}`);
          damagedCount++;
        }),
    );
  }
  await opening.drain();
  snapshots.sort((a, b) => a.time.localeCompare(b.time));
  return { snapshots, damaged: damagedCount };
}

/** §6: the snapshot named by a unique id prefix, else the newest. */
async function findSnapshot(repo: Repo, ui: Ui, prefix = ""): Promise<Snapshot> {
  const { snapshots, damaged } = await listSnapshots(repo, ui);
  const matches = snapshots.filter((snapshot) => snapshot.id.startsWith(prefix));
  if (prefix && matches.length > 1) {
    throw new UserError(`${matches.length} ids start with ${prefix}`);
  }
  return matches.at(-1) ??
    fail(new UserError(prefix ? `No snapshot ${prefix}` : "No snapshots", damaged ? 3 : 1));
}

/** §8: runs work holding a lock, shared (backup) or exclusive (prune). The lock is written before
 * the others are read, so of two runs that race, at least one sees the other. A lock of this host
 * whose process is gone is stale and removed; with no other lock left, tmp/ is emptied (§7). */
async function withLock<T>(repo: Repo, ui: Ui, exclusive: boolean, work: () => Promise<T>) {
  const alive = (pid: number) => {
    try {
      return process.kill(pid, 0);
    } catch (error) {
      return (error as Untyped).code !== "ESRCH";
    }
  };
  const own = hex(random(8).buffer);
  await putJson(repo, `locks/${own}`, { host: hostname(), pid: Deno.pid, exclusive });
  try {
    const others = [];
    for (const id of (await repo.store.list("locks")).filter((id) => isHex(id, 16) && id !== own)) {
      const lock = await getJson(repo, `locks/${id}`).catch((error) => ui.damaged(error, "a lock"));
      if (lock?.host === hostname() && !alive(lock.pid)) await repo.store.remove(`locks/${id}`);
      else others.push({ id, ...lock });
    }
    const blocker = others.find((lock) => exclusive || lock.exclusive !== false);
    const holder = `${blocker?.host ?? "an unreadable lock"} (process ${blocker?.pid})`;
    const hint = `if no nfreezer runs there, delete locks/${blocker?.id} in the repository`;
    if (blocker) throw new UserError(`The repository is in use by ${holder}`, 1, hint);
    for (const name of others.length ? [] : await repo.store.list("tmp")) {
      if (isHex(name, 16)) await repo.store.remove(`tmp/${name}`); // only names we write
    }
    return await work();
  } finally {
    await repo.store.remove(`locks/${own}`).catch(() => {});
  }
}

/** Runs tasks with at most maxBytes of data and maxCount tasks at once: add() waits for room,
 * drain() for the rest; the first failure is rethrown by both, and no new task starts after it. */
function limiter(maxBytes: number, maxCount: number) {
  const running = new Set<Promise<void>>();
  let [bytes, failure] = [0, null as unknown];
  const settle = () => failure && fail(failure as Error);
  async function add(size: number, task: () => Promise<unknown>) {
    while (running.size && (running.size >= maxCount || bytes + size > maxBytes)) {
      await Promise.race(running);
    }
    settle();
    bytes += size;
    const promise: Promise<void> = task()
      .then(() => {}, (error) => void (failure ??= error))
      .finally(() => (bytes -= size, running.delete(promise)));
    running.add(promise);
  }
  const drain = async () => (await Promise.all(running), settle());
  return { add, drain };
}

// ---- Storage (§1, §7): one interface; an SFTP server or a local folder behind it --------------

interface Store {
  read(name: string, size?: number): Promise<Bytes>; // size known, else small (§2, §6, §8)
  write(name: string, object: Uint8Array): Promise<void>; // §7: to tmp/, then renamed
  exists(name: string): Promise<boolean>;
  list(folder: string): Promise<string[]>; // [] if the folder does not exist
  remove(name: string): Promise<void>;
  prepare(create: boolean): Promise<void>; // §1: the root and its folders are real folders
  close(): void;
}
// deno-lint-ignore no-explicit-any
type Untyped = any; // ssh2's SFTP objects (npm:ssh2 ships no types) and node:fs callbacks
const FOLDERS = ["snapshots", "data", "locks", "tmp"]; // §1
const isMissing = (error: Untyped) => ["ENOENT", "ENOTDIR", 2].includes(error?.code); // 2: SFTP's

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
}

async function readFull(file: Deno.FsFile, buffer: Uint8Array): Promise<number> {
  let done = 0;
  for (let count: number | null = 0; count !== null && done < buffer.length; done += count ?? 0) {
    count = await file.read(buffer.subarray(done));
  }
  return done;
}

/** Promise form of a callback call (ssh2 SFTP or node:fs); failures become one-line UserErrors
 * that keep the library's code. `files.lost` fails the calls pending when SSH is gone. */
function call<T>(files: Untyped, method: string, ...args: unknown[]): Promise<T> {
  const request = new Promise<T>((done, reject) =>
    files[method](...args, (error: Untyped, result: T) => {
      if (!error) return done(result);
      const what = typeof args[0] === "string" ? ` ${args[0]}` : "";
      const reason = String(error.message).replace(/^E[A-Z]+: ([^,]+).*$/s, "$1"); // node:fs
      reject(Object.assign(new UserError(`Cannot ${method}${what}: ${reason}`), { reason, error }));
    })
  );
  return files.lost ? Promise.race([request, files.lost]) : request;
}

/** A Store on ssh2's SFTP calls. node:fs has the same callback API, so a local folder runs this
 * same code through LOCAL_FILES. One object costs lstat, open, write, fsync, close and rename;
 * each write call is sent in offset order (ssh2 sends a piece once the last one is answered). */
function makeStore(files: Untyped, root: string, close = () => {}): Store {
  const path = (name: string) => name ? `${root}/${name}` : root;
  const offers = (extension: string) => !files._extensions || extension in files._extensions;
  const rename = offers("posix-rename@openssh.com") ? "ext_openssh_rename" : "rename";
  const piece = files._maxReadLen ?? CHUNK_BYTES; // limits@openssh.com, else 32 KiB
  const lstat = (where: string, method = "lstat") =>
    call<Untyped>(files, method, where).catch((error) =>
      isMissing(error.error) ? null : fail(error)
    );
  async function read(name: string, size?: number) {
    const handle = await call(files, "open", path(name), "r", {});
    try {
      const length = size ?? (await call<Untyped>(files, "fstat", handle)).size;
      if (size === undefined && length > SMALL_OBJECT_BYTES) throw new Error("it is too large");
      const buffer = Buffer.alloc(length);
      const reads = [];
      for (let at = 0; at < length; at += piece) {
        reads.push(
          call<number>(files, "read", handle, buffer, at, Math.min(piece, length - at), at),
        );
      }
      const counts = await Promise.all(reads);
      if (counts.reduce((sum, count) => sum + count, 0) !== length) throw new Error("it is short");
      return new Uint8Array(buffer.buffer, buffer.byteOffset, length); // its own, unpooled buffer
    } finally {
      call(files, "close", handle).catch(() => {}); // not waited for: one round trip less
    }
  }
  return {
    read: (name, size) =>
      read(name, size).catch((error) => {
        if (files.gone) throw error; // the connection failed, not the repository
        const why = isMissing(error.error)
          ? "is missing"
          : `is unreadable: ${error.reason ?? error.message}`;
        throw new UserError(`${name} ${why}`, 3);
      }),
    async write(name, object) {
      const temporary = path(`tmp/${hex(random(8).buffer)}`);
      const handle = await call(files, "open", temporary, "wx", { mode: 0o600 });
      const data = Buffer.from(object.buffer, object.byteOffset, object.length);
      try {
        const written = await call<number>(files, "write", handle, data, 0, data.length, 0);
        if (written !== data.length) throw new UserError(`Only ${written} bytes of ${name} stored`);
        if (offers("fsync@openssh.com")) await call(files, "ext_openssh_fsync", handle);
      } finally {
        await call(files, "close", handle);
      }
      await call(files, rename, temporary, path(name)); // atomic; an older copy is replaced
    },
    exists: async (name) => (await lstat(path(name))) !== null,
    list: (folder) =>
      call<Untyped[]>(files, "readdir", path(folder)).then(
        (items) => items.map((item) => item.filename),
        (error) => isMissing(error.error) ? [] : fail(error),
      ),
    remove: (name) => call(files, "unlink", path(name)),
    async prepare(create) {
      for (const folder of ["", ...FOLDERS]) { // a link could lead writes and deletes elsewhere
        const info = await lstat(path(folder), folder ? "lstat" : "stat");
        if (!info && create) await call(files, "mkdir", path(folder), { mode: 0o700 });
        else if (!info?.isDirectory()) {
          throw new UserError(`${path(folder)} is not a folder`, folder ? 3 : 1);
        }
      }
    },
    close,
  };
}
const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
const LOCAL_FILES = {
  ...fs,
  /** Follows no link, waits on no FIFO, and opens nothing but a regular file. */
  open(path: string, flags: string, attrs: { mode?: number }, done: Untyped) {
    const mode = (flags === "r" ? O_RDONLY : O_WRONLY | O_CREAT | O_EXCL) | O_NOFOLLOW | O_NONBLOCK;
    fs.open(path, mode, attrs.mode ?? 0o600, (error, fd) => {
      if (error) return done(error);
      fs.fstat(fd, (error, info) => {
        if (!error && info.isFile()) return done(null, fd);
        fs.close(fd, () => done(error ?? new Error("it is not a regular file")));
      });
    });
  },
  readdir: (path: string, done: Untyped) =>
    fs.readdir(path, (error, names) => done(error, names?.map((filename) => ({ filename })))),
  ext_openssh_rename: fs.rename,
  ext_openssh_fsync: fs.fsync,
};

/** Starts the user's own `ssh ... -s -- DESTINATION sftp` and speaks SFTP over its pipes with
 * ssh2's SFTP class, through the two calls it makes of an SSH channel. OpenSSH checks the host
 * key and authenticates; an unknown host is refused unless --accept-new-host, whatever
 * ssh_config says (options given on ssh's command line win). `--` keeps a location from
 * becoming an ssh option. A dead link fails within a minute (ServerAlive*). */
async function connectSsh(destination: string, port: string, options: Options) {
  const [program, ...words] = (Deno.env.get("NFREEZER_SSH") || "ssh").trim().split(/\s+/);
  const args = [...words, "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"];
  args.push("-o", `StrictHostKeyChecking=${options["accept-new-host"] ? "accept-new" : "yes"}`);
  if (options.identity) args.push("-i", options.identity);
  if (options["known-hosts"]) args.push("-o", `UserKnownHostsFile=${options["known-hosts"]}`);
  if (port) args.push("-p", port);
  args.push("-s", "--", destination, "sftp");
  const command = new Deno.Command(program, { args, stdin: "piped", stdout: "piped" });
  const child = (() => {
    try {
      return command.spawn();
    } catch (error) {
      throw new UserError(`Cannot run ${program}: ${(error as Error).message}`);
    }
  })();
  const writer = child.stdin.getWriter();
  const protocol = {
    channelData: (_id: number, data: Uint8Array) => void writer.write(data).catch(() => {}),
    channelClose: () => void writer.close().catch(() => {}),
  };
  const outgoing = { id: 0, state: "open", window: Infinity, packetSize: Infinity }; // ssh's job
  const sftp = new SFTP({ _protocol: protocol }, { type: "sftp", outgoing }, {});
  sftp.on("error", () => {}); // a protocol error ends the channel; pending calls fail with it
  sftp.lost = child.status.then(({ code }) => {
    sftp.gone = true;
    throw new UserError(`The SSH connection to ${destination} ended (ssh exit code ${code})`);
  });
  sftp.lost.catch(() => {}); // it only matters to calls still pending when it fails
  (async () => {
    for await (const data of child.stdout) {
      sftp.push(Buffer.from(data.buffer, data.byteOffset, data.length));
    }
  })().catch(() => {}).finally(() => {
    sftp.gone = true;
    sftp.push(null); // fails every request still pending
  });
  sftp._init();
  await Promise.race([new Promise((ready) => sftp.once("ready", ready)), sftp.lost]);
  return sftp;
}

/** A Store for user@host:path, sftp://user@host[:port]/path or a local path. */
async function openStore(location: string, options: Options): Promise<Store> {
  const url = /^sftp:\/\/([^/:]+)(?::(\d+))?(\/.*)$/.exec(location);
  const scp = /^([^/:]+):(.*)$/.exec(location); // as scp: a local "a:b" is written ./a:b
  if (!url && !scp) return makeStore(LOCAL_FILES, resolve(location));
  const [destination, port, path] = url ? url.slice(1) : [scp![1], "", scp![2] || "."];
  const sftp = await connectSsh(destination, port, options);
  return makeStore(sftp, path.replace(/^~\//, ""), () => sftp.end());
}

// ---- Backup -----------------------------------------------------------------------------------

type Ui = ReturnType<typeof makeUi>;
const isFsError = (error: unknown): error is Error =>
  Object.values(Deno.errors).some((type) => error instanceof type);
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const since = (start: number) => `${((Date.now() - start) / 1000).toFixed(1)} s`;

/** Walks root without following links; dotfiles included; sockets, fifos, devices skipped. */
function scanTree(root: string, excludes: string[], ui: Ui): Entry[] {
  const entries: Entry[] = [];
  const visit = (path: string) => {
    try {
      const info = Deno.lstatSync(join(root, path));
      const entry = { path, mode: info.mode! & 0o7777, mtime: info.mtime!.getTime() };
      if (info.isFile) return entries.push({ ...entry, type: "file", size: info.size });
      if (info.isSymlink) {
        return entries.push({
          ...entry,
          type: "symlink",
          target: Deno.readLinkSync(join(root, path)),
        });
      }
      if (!info.isDirectory) return ui.warn(`skipped ${path}: not a file, folder or symlink`);
      entries.push({ ...entry, type: "dir" });
      for (const { name } of Deno.readDirSync(join(root, path))) {
        const child = path ? `${path}/${name}` : name;
        if (!excludes.some((glob) => matchesGlob(child, glob) || matchesGlob(name, glob))) {
          visit(child);
        }
      }
    } catch (error) {
      if (!isFsError(error)) throw error;
      ui.problem(`cannot read ${path || root}: ${error.message}`);
    }
  };
  visit("");
  return entries.sort((a, b) => (a.path < b.path ? -1 : 1));
}

/** Chunks one file; null if it kept changing while read: never stored half old, half new. */
async function storeFile(path: string, entry: Entry, put: (chunk: Bytes) => Promise<string>) {
  for (let attempt = 0; attempt < 3; attempt++) {
    using file = await Deno.open(path);
    const { size, mtime } = await file.stat();
    const chunks: string[] = [];
    for (let offset = 0; offset < size; offset += CHUNK_BYTES) {
      const chunk = new Uint8Array(Math.min(CHUNK_BYTES, size - offset));
      await readFull(file, chunk);
      chunks.push(await put(chunk));
    }
    const after = await file.stat();
    if (after.size === size && after.mtime!.getTime() === mtime!.getTime()) {
      return { ...entry, size, mtime: mtime!.getTime(), chunks };
    }
  }
  return null;
}

/** Adds a snapshot of root. Only files whose size or mtime differ from the parent snapshot's are
 * read (all with --full), and only chunks the repository lacks are sent, many at once (§4). */
async function backup(repo: Repo, root: string, options: Options, ui: Ui) {
  const started = Date.now();
  const { snapshots } = await listSnapshots(repo, ui); // only the parent must open
  const parent = snapshots.findLast((item) => item.host === hostname() && item.source === root);
  const previous = new Map<string, Entry>();
  for (const entry of parent ? await loadManifest(repo, parent) : []) {
    previous.set(entry.path, entry);
  }
  const trusted = options.full ? [] : [...previous.values()]; // --full asks about every chunk
  const known = new Set(trusted.flatMap((entry) => entry.chunks ?? []));
  const uploads = limiter(IN_FLIGHT_BYTES, IN_FLIGHT_COUNT);
  const done = { files: 0, bytes: 0, read: 0, sent: 0, chunks: 0 };
  const counts = { new: 0, changed: 0, unchanged: 0 };
  const entries = scanTree(root, options.exclude ?? [], ui);
  const files = entries.filter((entry) => entry.type === "file");
  const total = files.reduce((sum, entry) => sum + entry.size!, 0);
  const progress = () =>
    `${done.files}/${files.length} files, ${mib(done.bytes)} of ${mib(total)}, ${
      mib(done.sent)
    } sent`;
  const put = async (chunk: Bytes) => {
    const id = await chunkId(repo.keys, chunk);
    done.bytes += chunk.length;
    ui.progress(progress);
    if (known.has(id)) return id;
    known.add(id);
    await uploads.add(chunk.length, async () => {
      if (await repo.store.exists(`data/${id}`)) return; // sent by an interrupted run or another host
      await repo.store.write(`data/${id}`, await seal(repo.keys, `data/${id}`, chunk));
      done.sent += chunk.length;
      done.chunks++;
    });
    return id;
  };
  const kept: Entry[] = [];
  for (const entry of entries) {
    const old = previous.get(entry.path);
    const same = old?.chunks && old.size === entry.size && old.mtime === entry.mtime;
    if (entry.type !== "file") kept.push(entry);
    else if (same && !options.full) {
      kept.push({ ...entry, chunks: old.chunks });
      done.bytes += entry.size!;
    } else {
      const stored = await storeFile(join(root, entry.path), entry, put).catch((error) =>
        isFsError(error) ? ui.problem(`cannot read ${entry.path}: ${error.message}`) : fail(error)
      );
      if (stored === null) ui.problem(`skipped ${entry.path}: it kept changing while being read`);
      done.read += stored?.size ?? 0;
      if (stored) kept.push(stored);
    }
    if (entry.type === "file") {
      counts[same ? "unchanged" : old?.type === "file" ? "changed" : "new"]++;
    }
    done.files += entry.type === "file" ? 1 : 0;
    ui.progress(progress);
  }
  const packed = gzipSync(utf8(JSON.stringify(kept)));
  const manifest = { size: packed.length, chunks: [] as string[] };
  for (let offset = 0; offset < packed.length; offset += CHUNK_BYTES) {
    manifest.chunks.push(await put(new Uint8Array(packed.subarray(offset, offset + CHUNK_BYTES))));
  }
  await uploads.drain(); // §6: every chunk is stored before a snapshot can refer to it
  const id = hex(random(8).buffer);
  const [time, bytes] = [new Date().toISOString(), total];
  const snapshot = { time, host: hostname(), source: root, parent: parent?.id, manifest, bytes };
  await putJson(repo, `snapshots/${id}`, { ...snapshot, files: kept.length });
  const oldFiles = [...previous.values()].filter((entry) => entry.type === "file").length;
  const removed = oldFiles - counts.changed - counts.unchanged;
  const changes = `${counts.new} new, ${counts.changed} changed, ${counts.unchanged} unchanged`;
  const traffic = `${mib(done.read)} read, ${mib(done.sent)} sent in ${done.chunks} new chunks`;
  ui.info(`Snapshot ${id}: ${changes}, ${removed} removed files; ${traffic}; ${since(started)}`);
}

// ---- Restore ----------------------------------------------------------------------------------

/** True if path already is a regular file (not a link) whose chunks have the entry's ids. */
async function sameContent(keys: Keys, path: string, entry: Entry): Promise<boolean> {
  const info = await Deno.lstat(path).catch(() => null);
  if (!info?.isFile || info.size !== entry.size) return false;
  using file = await Deno.open(path);
  for (const [index, id] of entry.chunks!.entries()) {
    const chunk = new Uint8Array(chunkBytes(entry as Content, index));
    if (await readFull(file, chunk) < chunk.length || await chunkId(keys, chunk) !== id) {
      return false;
    }
  }
  return true;
}

/** §4: verified chunks go to a new temporary file, which gets its mode and time and is then
 * renamed over path: a link found there is replaced, never followed. */
async function restoreFile(repo: Repo, path: string, temporary: string, entry: Entry) {
  const time = new Date(entry.mtime);
  if (await sameContent(repo.keys, path, entry)) {
    await Deno.chmod(path, entry.mode);
    return await Deno.utime(path, time, time);
  }
  using file = await Deno.open(temporary, { write: true, createNew: true, mode: 0o600 });
  for await (const chunk of chunksOf(repo, entry as Content)) await writeAll(file, chunk);
  await file.utime(time, time);
  await Deno.chmod(temporary, entry.mode);
  await Deno.rename(temporary, path);
  return entry.size;
}

/** Makes path a real folder (a file or link there is removed, never followed) and removes the
 * temporary files a killed restore left in it. */
async function restoreFolder(path: string) {
  const info = await Deno.lstat(path).catch(() => null);
  if (info && !info.isDirectory) await Deno.remove(path);
  if (!info?.isDirectory) await Deno.mkdir(path, { mode: 0o700 });
  for (const item of Deno.readDirSync(path)) {
    if (LEFTOVER.test(item.name) && !item.isDirectory) await Deno.remove(join(path, item.name));
  }
}

/** Restores into target in path order: folders, then files (many at once), then links, then the
 * folders' modes and times, deepest first. An entry whose folder failed is not attempted. */
async function restore(repo: Repo, target: string, options: Options, ui: Ui) {
  const started = Date.now();
  const snapshot = await findSnapshot(repo, ui, options.snapshot);
  const includes = (options.include ?? []).map((path) => path.replace(/\/+$/, ""));
  const under = (path: string, folder: string) =>
    !folder || path === folder || path.startsWith(`${folder}/`);
  const wanted = (path: string) =>
    !includes.length || includes.some((item) => under(path, item) || under(item, path));
  const entries = (await loadManifest(repo, snapshot)).filter((entry) => wanted(entry.path));
  const absent = includes.find((item) => !entries.some((entry) => entry.path === item));
  if (absent !== undefined) throw new UserError(`${absent} is not in snapshot ${snapshot.id}`);
  if (!(await Deno.stat(target).catch(() => null))?.isDirectory) {
    await Deno.mkdir(target, { recursive: true }); // fails on a file: one error, up front
  }
  const root = Deno.realPathSync(target);
  const [failed, done] = [new Set<string>(), { written: 0, bytes: 0, same: 0 }];
  const attempt = async (entry: Entry, work: (path: string, temporary: string) => unknown) => {
    const path = join(root, entry.path);
    const temporary = join(dirname(path), `.${basename(path)}.nfreezer-${hex(random(4).buffer)}`);
    if (entry.path && failed.has(parentOf(entry.path))) return failed.add(entry.path);
    try {
      await work(path, temporary);
    } catch (error) {
      if (!(error instanceof UserError || isFsError(error))) throw error;
      await Deno.remove(temporary).catch(() => {});
      failed.add(entry.path);
      const code = error instanceof UserError ? error.exitCode : 1;
      ui.problem(`cannot restore ${entry.path || "."}: ${error.message}`, code);
    }
  };
  const ofType = (type: string) => entries.filter((entry) => entry.type === type);
  const files = ofType("file");
  const progress = () => `${done.written + done.same}/${files.length} files, ${mib(done.bytes)}`;
  for (const entry of ofType("dir")) await attempt(entry, restoreFolder);
  const restoring = limiter(IN_FLIGHT_BYTES, IN_FLIGHT_COUNT);
  for (const entry of files) {
    await restoring.add(
      Math.min(entry.size!, RESTORE_WINDOW * CHUNK_BYTES),
      () =>
        attempt(entry, async (path, temporary) => {
          const written = await restoreFile(repo, path, temporary, entry);
          done[written === undefined ? "same" : "written"]++;
          done.bytes += written ?? 0;
          ui.progress(progress);
        }),
    );
  }
  await restoring.drain();
  for (const entry of ofType("symlink")) {
    await attempt(entry, async (path, temporary) => {
      await Deno.symlink(entry.target!, temporary);
      await lutimes(temporary, new Date(entry.mtime), new Date(entry.mtime));
      await Deno.rename(temporary, path);
    });
  }
  for (const entry of ofType("dir").toReversed().filter((entry) => !failed.has(entry.path))) {
    await attempt(entry, async (path) => {
      if (!(await Deno.lstat(path)).isDirectory) throw new UserError("it is no longer a folder");
      await Deno.chmod(path, entry.mode);
      await Deno.utime(path, new Date(entry.mtime), new Date(entry.mtime));
    });
  }
  const written = `${done.written} files written (${
    mib(done.bytes)
  }), ${done.same} already identical`;
  ui.info(
    `Restored snapshot ${snapshot.id}: ${written}, ${entries.length} entries; ${since(started)}`,
  );
}

// ---- Maintenance: snapshots, ls, check, forget, prune -----------------------------------------

/** Opens every snapshot and manifest and confirms that each chunk they name is stored; with
 * --read-data also fetches and authenticates every chunk. Damage is named and exits 3. */
async function check(repo: Repo, options: Options, ui: Ui) {
  const { snapshots } = await listSnapshots(repo, ui);
  const stored = new Set(await repo.store.list("data"));
  const chunks = new Map<string, { length: number; where: string }>();
  const note = (content: Content, where: string) =>
    content.chunks.forEach((id, index) =>
      chunks.set(id, { length: chunkBytes(content, index), where })
    );
  for (const snapshot of snapshots) {
    note(snapshot.manifest, `the manifest of snapshot ${snapshot.id}`);
    const entries = await loadManifest(repo, snapshot).catch((error) =>
      ui.damaged(error, "skipped")
    );
    for (const entry of entries?.filter((entry) => entry.chunks) ?? []) {
      note(entry as Content, `${entry.path} in snapshot ${snapshot.id}`);
    }
  }
  const reading = limiter(IN_FLIGHT_BYTES, IN_FLIGHT_COUNT);
  for (const [id, { length, where }] of chunks) {
    if (!stored.has(id)) ui.problem(`chunk ${id} of ${where} is missing`, 3);
    else if (options["read-data"]) {
      await reading.add(
        length,
        () => loadChunk(repo, id, length).catch((error) => ui.damaged(error, where)),
      );
    }
  }
  await reading.drain();
  const read = options["read-data"] ? ", all read and authenticated" : "";
  ui.info(`Checked ${snapshots.length} snapshots and ${chunks.size} chunks${read}`);
}

/** Removes snapshots beyond --keep-last N and older than --keep-within, per host and source. */
async function forget(repo: Repo, options: Options, ui: Ui) {
  const last = Number(options["keep-last"] ?? 0);
  const within = /^(\d+)([hdwy])$/.exec(options["keep-within"] ?? "0h");
  const unit = { h: 1, d: 24, w: 168, y: 8766 }[within?.[2] as "h"] * 3600e3;
  if (!Number.isSafeInteger(last) || !within || !(last || Number(within[1]))) {
    throw new UserError("forget needs --keep-last N and/or --keep-within N(h|d|w|y)", 2);
  }
  const { snapshots } = await listSnapshots(repo, ui);
  const newer = (a: Snapshot, b: Snapshot) =>
    a.host === b.host && a.source === b.source && b.time > a.time;
  const old = snapshots.filter((snapshot) =>
    snapshots.filter((other) => newer(snapshot, other)).length >= last &&
    Date.now() - Date.parse(snapshot.time) > Number(within[1]) * unit
  );
  for (const snapshot of old) await repo.store.remove(`snapshots/${snapshot.id}`);
  ui.info(`Removed ${old.length} snapshots, kept ${snapshots.length - old.length}`);
  if (options.prune) await prune(repo, ui);
}

/** Deletes the chunks no snapshot uses, holding the repository alone (§8). It refuses while a
 * snapshot cannot be read, and deletes only unused chunks: a killed prune harms no snapshot. */
function prune(repo: Repo, ui: Ui) {
  return withLock(repo, ui, true, async () => {
    const { snapshots, damaged } = await listSnapshots(repo, ui);
    if (damaged) throw new UserError("Not pruning: the chunks of a damaged snapshot would go", 3);
    const used = new Set<string>();
    for (const snapshot of snapshots) {
      snapshot.manifest.chunks.forEach((id) => used.add(id));
      for (const entry of await loadManifest(repo, snapshot)) {
        entry.chunks?.forEach((id) => used.add(id));
      }
    }
    const unused = (await repo.store.list("data")).filter((id) => isHex(id, 64) && !used.has(id));
    const removing = limiter(Infinity, IN_FLIGHT_COUNT);
    for (const id of unused) await removing.add(0, () => repo.store.remove(`data/${id}`));
    await removing.drain();
    ui.info(`Pruned ${unused.length} unused chunks; ${used.size} chunks in use`);
  });
}

// ---- Command line -----------------------------------------------------------------------------

const SELF = basename(Deno.execPath()) === "deno"
  ? "deno run -A nfreezer.ts"
  : basename(Deno.execPath());
const USAGE = `Usage: ${SELF} <command> ...     (nfreezer ${VERSION}: encrypted backups)
  init      <repo>                create an empty repository (backup also creates one)
  backup    <source-dir> <repo>   add a snapshot       [--exclude GLOB]... [--full]
  restore   <repo> <target-dir>   restore a snapshot   [--snapshot ID] [--include PATH]...
  snapshots <repo>                list the snapshots   [--json]
  ls        <repo>                list a snapshot's paths  [--snapshot ID] [--json]
  check     <repo>                check that every chunk is stored  [--read-data]
  forget    <repo>                remove old snapshots  [--keep-last N] [--keep-within 30d] [--prune]
  prune     <repo>                delete the chunks no snapshot uses
<repo>: /local/path, ./relative/path, user@host:path or sftp://user@host[:port]/path.
--snapshot ID: a unique prefix of an id; the default is the newest snapshot.
--full: read every file and ask the repository about every chunk (sends what check found missing).

Options:
  --password-file FILE  read the passphrase from FILE (else $NFREEZER_PASSWORD, else a prompt)
  -i, --identity FILE   SSH private key, passed to ssh (else ssh's own: agent, ~/.ssh/config)
  --known-hosts FILE    SSH known hosts file, passed to ssh as UserKnownHostsFile
  --accept-new-host     trust and remember the key of a host not yet in known_hosts
  -q, --quiet           print only warnings and errors
  -h, --help            show this help (after a command: its own)     --version
$NFREEZER_SSH: the ssh command to run (default: ssh), e.g. "ssh -F ~/.ssh/other_config".
Exit codes: 0 ok, 1 error, 2 usage error, 3 integrity error (tampered or missing data)`;
const OPTIONS = {
  "password-file": { type: "string" },
  identity: { type: "string", short: "i" },
  "known-hosts": { type: "string" },
  "accept-new-host": { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
  exclude: { type: "string", multiple: true },
  full: { type: "boolean" },
  snapshot: { type: "string" },
  include: { type: "string", multiple: true },
  json: { type: "boolean" },
  "read-data": { type: "boolean" },
  "keep-last": { type: "string" },
  "keep-within": { type: "string" },
  prune: { type: "boolean" },
} as const;
type Options = ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>["values"];

/** Output: info on stdout (not with -q), warnings on stderr; problems are counted, and the
 * command exits 1 (or 3 if one was damage) once it has done what it could. */
function makeUi(quiet = false) {
  const live = !quiet && Deno.stderr.isTerminal();
  let shown = 0;
  const clear = () => live && shown && Deno.stderr.writeSync(utf8("\r\x1b[K"));
  const ui = {
    problems: 0,
    exitCode: 1,
    info: (text: string) => (clear(), quiet || console.log(text)),
    warn: (text: string) => (clear(), console.error(`nfreezer: warning: ${text}`)),
    problem(text: string, exitCode = 1) {
      ui.warn(text);
      ui.problems++;
      ui.exitCode = Math.max(ui.exitCode, exitCode);
    },
    /** An integrity error becomes a problem (exit 3, after the rest is done); others are thrown. */
    damaged(error: Untyped, context: string): undefined {
      if (error?.exitCode !== 3) throw error;
      ui.problem(`${context}: ${error.message}`, 3);
    },
    progress(text: () => string) {
      if (!live || Date.now() - shown < PROGRESS_MS) return;
      shown = Date.now();
      Deno.stderr.writeSync(utf8(`\r${text()}\x1b[K`));
    },
  };
  return ui;
}

/** Reads a line from the terminal without echoing it; backspace removes a whole character. */
async function promptSecret(question: string): Promise<string> {
  const hint = "give it with --password-file FILE or $NFREEZER_PASSWORD";
  if (!Deno.stdin.isTerminal()) {
    throw new UserError("A passphrase is needed, but no terminal", 1, hint);
  }
  Deno.stderr.writeSync(utf8(question));
  Deno.stdin.setRaw(true);
  const [bytes, byte] = [[] as number[], new Uint8Array(1)];
  try {
    while (await Deno.stdin.read(byte) && byte[0] !== 13 && byte[0] !== 10) {
      if (byte[0] === 3) throw new UserError("Interrupted");
      if (byte[0] !== 127 && byte[0] !== 8) bytes.push(byte[0]);
      else while ((bytes.pop()! & 0xc0) === 0x80) continue; // UTF-8 continuation bytes
    }
  } finally {
    Deno.stdin.setRaw(false);
    Deno.stderr.writeSync(utf8("\n"));
  }
  return strictUtf8(Uint8Array.from(bytes));
}
function strictUtf8(bytes: Uint8Array): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes); // no two passphrases collapse
  } catch {
    throw new UserError("The passphrase is not valid UTF-8");
  }
}

/** The passphrase from --password-file, else $NFREEZER_PASSWORD, else asked (twice if new). */
async function getPassphrase(options: Options, creating: boolean): Promise<string> {
  const file = options["password-file"];
  const given = file ? strictUtf8(Deno.readFileSync(file)).replace(/\r?\n$/, "") : undefined;
  const passphrase = given ?? Deno.env.get("NFREEZER_PASSWORD") ??
    await promptSecret("Repository passphrase: ");
  const asked = !file && Deno.env.get("NFREEZER_PASSWORD") === undefined;
  if (asked && creating && passphrase !== await promptSecret("Repeat it: ")) {
    throw new UserError("The passphrases differ");
  }
  return passphrase || fail(new UserError("The passphrase is empty"));
}

/** Opens the repository at location; init and backup create it where there is none. */
async function openRepo(location: string, options: Options, create: boolean): Promise<Repo> {
  const store = await openStore(location, options);
  try {
    const names = await store.list("");
    const found = names.includes("config");
    const hint = `create one with: ${SELF} init ${location}`;
    if (!found && !create) throw new UserError(`No repository at ${location}`, 1, hint);
    if (!found && names.some((name) => !FOLDERS.includes(name))) {
      throw new UserError(`${location} is not empty, and not a repository`);
    }
    await store.prepare(!found);
    if (found) {
      const config = await store.read("config");
      return { store, keys: await unlockConfig(config, await getPassphrase(options, false)) };
    }
    const { config, keys } = await createConfig(await getPassphrase(options, true));
    await store.write("config", utf8(config));
    return { store, keys };
  } catch (error) {
    store.close();
    throw error;
  }
}

type Command = (repo: Repo, args: string[], options: Options, ui: Ui) => Promise<unknown>;
const COMMANDS: Record<string, Command> = {
  init: (_repo, [location], _options, ui) => Promise.resolve(ui.info(`Created ${location}`)),
  backup: (repo, [source], options, ui) =>
    withLock(repo, ui, false, () => backup(repo, Deno.realPathSync(source), options, ui)),
  restore: (repo, [, target], options, ui) => restore(repo, resolve(target), options, ui),
  async snapshots(repo, _args, options, ui) {
    const { snapshots } = await listSnapshots(repo, ui);
    if (options.json) return console.log(JSON.stringify(snapshots, null, 2));
    for (const { id, time, host, source, files, bytes } of snapshots) {
      ui.info(`${id}  ${time}  ${host}:${source}  ${files} entries, ${mib(bytes)}`);
    }
  },
  async ls(repo, _args, options, ui) {
    const entries = await loadManifest(repo, await findSnapshot(repo, ui, options.snapshot));
    if (options.json) return console.log(JSON.stringify(entries, null, 2));
    for (const { path, type, size, mtime, target } of entries) {
      const link = target === undefined ? "" : ` -> ${target}`;
      const when = new Date(mtime).toISOString();
      console.log(
        `${type.padEnd(7)} ${String(size ?? "").padStart(12)}  ${when}  ${path || "."}${link}`,
      );
    }
  },
  check: (repo, _args, options, ui) => check(repo, options, ui),
  forget: (repo, _args, options, ui) => forget(repo, options, ui),
  prune: (repo, _args, _options, ui) => prune(repo, ui),
};

const OWN = new Set(USAGE.match(/\[--[a-z-]+/g)!.map((text) => text.slice(3))); // command options

/** A command's USAGE line is its spec: the <arguments> it takes and the [--options] it adds. */
async function runCli(argv: string[]): Promise<void> {
  process.umask(0o077); // safe default: what this process creates is private to the user
  const help = `see ${SELF} --help`;
  const parsed = (() => {
    try {
      return parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
    } catch (error) {
      throw new UserError((error as Error).message.split(". ")[0], 2, help); // not the paragraph
    }
  })();
  const { values: options, positionals: [name, ...args] } = parsed;
  if (options.version) return console.log(`nfreezer ${VERSION}, repository format ${FORMAT}`);
  const line = USAGE.split("\n").find((text) => COMMANDS[name] && text.startsWith(`  ${name} `));
  if (!line && (options.help || !name)) return console.log(USAGE);
  if (!line) throw new UserError(`Unknown command ${name}`, 2, help);
  const usage = `usage: ${SELF} ${line.trim()}`;
  if (options.help) return console.log(`${usage}\n\n${USAGE.slice(USAGE.indexOf("Options:"))}`);
  const wanted = line.match(/<[^>]+>/g)!;
  const foreign = Object.keys(options).find((key) => OWN.has(key) && !line.includes(`[--${key}`));
  if (foreign) throw new UserError(`${name} does not take --${foreign}`, 2, usage);
  if (args.length !== wanted.length) {
    throw new UserError(`${name} takes ${wanted.join(" ")}`, 2, usage);
  }
  if (name === "backup" && !Deno.statSync(args[0]).isDirectory) {
    throw new UserError(`${args[0]} is not a folder`); // checked before a repository is made
  }
  const ui = makeUi(options.quiet);
  const repo = await openRepo(
    args[wanted.indexOf("<repo>")],
    options,
    ["init", "backup"].includes(name),
  );
  await COMMANDS[name](repo, args, options, ui).finally(() => repo.store.close());
  const hint = name === "check" ? `${SELF} backup --full sends missing chunks again` : "";
  const problems = `${ui.problems} problem${ui.problems === 1 ? "" : "s"} (see the warnings above)`;
  if (ui.problems) throw new UserError(problems, ui.exitCode, hint);
}

/** Runs the command line and returns the exit code; errors that are not ours keep their stack. */
export async function main(argv: string[]): Promise<number> {
  try {
    await runCli(argv);
    return 0;
  } catch (error) {
    if (!(error instanceof UserError || isFsError(error))) throw error;
    console.error(`nfreezer: error: ${error.message.replace(/ \(os error \d+\)/, "")}`);
    if (error instanceof UserError && error.hint) console.error(`nfreezer: hint: ${error.hint}`);
    return error instanceof UserError ? error.exitCode : 1;
  }
}

export { chunkId, openRepo, putJson, seal }; // for the tests, which forge hostile snapshots

if (import.meta.main) Deno.exit(await main(Deno.args));
