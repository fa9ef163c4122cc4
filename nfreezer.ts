#!/usr/bin/env -S deno run -A --v8-flags=--max-semi-space-size=8,--heap-growing-percent=20
/**
 * nfreezer.ts: encrypted-at-rest backups to an SFTP server or a local disk, in one auditable file.
 *   deno run -A nfreezer.ts backup ~/Documents user@host:/backups/docs      (--help for more)
 * THREAT MODEL. Trusted: this machine, the passphrase, the user's OpenSSH client and known_hosts.
 * Untrusted: the storage server, anyone who can write to the repository, the network, and what a
 *   restore target already holds.
 * Guaranteed: keys, names, paths, contents, modes and times never leave in clear. A changed,
 *   truncated, swapped, renamed or replayed object fails authentication before a byte of it
 *   reaches a final path: restore reproduces the snapshot or exits 3 naming what it could not
 *   verify. Nothing lands outside the target, or through a link found in it or in a local
 *   repository. Memory stays bounded whatever the stored objects hold.
 * Not hidden: the total size, number and Padmé-padded sizes of objects (so a changed file's size
 *   to ~12%), when backups run and how much changed. The server can delete the repository or
 *   withhold the newest snapshots, undetected.
 * FORMAT 2: §1 layout, §2 config, §3 objects, §4 chunks, §5 manifest, §6 snapshots, §7 writes,
 * §8 locks, cited in the code; the README's Format section has each in full, to write and to read.
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
const IN_FLIGHT_BYTES = 12 * 2 ** 20; // chunk bytes sealed, sent or fetched at once (RSS)
const IN_FLIGHT_COUNT = 96; // objects at once, hiding round trips; gesftpserver has 128 handles
const LEFTOVER = /^\..+\.nfreezer-[0-9a-f]{8}$/; // a killed restore's temporary file

/** What a user sees: one line, a hint, an exit code (1 error, 2 usage, 3 integrity). */
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
    const text = gzipped ? gunzipSync(bytes, { maxOutputLength: 2 ** 28 }) : bytes; // no gzip bomb
    return JSON.parse(new TextDecoder().decode(text));
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
const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex");
const base64 = (bytes: Bytes) => Buffer.from(bytes).toString("base64");
const unbase64 = (text: unknown) => new Uint8Array(Buffer.from(String(text), "base64"));
const gcm = (iv: Bytes, aad = "") => ({ name: "AES-GCM", iv, additionalData: utf8(aad) });
const ZERO_NONCE = new Uint8Array(NONCE_BYTES); // §3: each object key seals one payload only

/** §2: KEK = scrypt(NFKC(passphrase), salt, 2^log2N, r, p), its cost bounded before it runs. */
function deriveKek(passphrase: string, kdf: Record<string, number>, salt: Bytes) {
  const { log2N, r, p } = kdf ?? {};
  const memory = 128 * 2 ** log2N * r;
  const sane = [log2N, r, p].every(Number.isInteger) && r > 0 && p > 0 && p <= 4; // RFC 7914:
  const bounded = log2N >= 14 && log2N < 16 * r && memory <= SCRYPT_MAX_BYTES; // N < 2^(128 r / 8)
  if (!sane || !bounded) throw damaged("The scrypt parameters of the repository config");
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
  const sizes = [salt.length, nonce.length, wrapped.length - TAG_BYTES].join();
  if (sizes !== [SALT_BYTES, NONCE_BYTES, 2 * KEY_BYTES].join()) throw damaged("The config");
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
function objectKey(keys: Keys, salt: Uint8Array, name: string): Promise<CryptoKey> {
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
  const length = payload ? new DataView(payload).getUint32(0) : Infinity;
  if (!payload || 4 + length > payload.byteLength) throw damaged(name);
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
type Entry = Meta & Partial<Content> & { target?: string }; // §5
type Snapshot = { id: string; time: string; host: string; source: string; parent?: string } & {
  manifest: Content;
};
const isHex = (text: unknown, length: number) =>
  typeof text === "string" && text.length === length && /^[0-9a-f]*$/.test(text);
const chunkBytes = (content: Content, index: number) =>
  Math.min(CHUNK_BYTES, content.size - index * CHUNK_BYTES);
const isContent = ({ size, chunks }: Content) =>
  Number.isSafeInteger(size) && size >= 0 && Array.isArray(chunks) &&
  chunks.length === Math.ceil(size / CHUNK_BYTES) && chunks.every((id) => isHex(id, 64));
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

/** §4: the chunks of a file or manifest in order, each authenticated before it is handed out. */
async function* chunksOf(repo: Repo, content: Content): AsyncGenerator<Bytes> {
  for (const [at, id] of content.chunks.entries()) {
    yield loadChunk(repo, id, chunkBytes(content, at));
  }
}

/** §5: every field of every entry is checked; paths are unique, relative, and each sits in a
 * folder entry: no entry can land outside the target, under a link, or be written twice. */
function checkEntries(entries: Entry[], what: string): Entry[] {
  const types = new Map<string, string>();
  for (const entry of Array.isArray(entries) ? entries : [{} as Entry]) {
    const { path, type, mode, mtime, target } = entry ?? {};
    const parts = typeof path === "string" ? path.split("/") : [""];
    const named = path === "" || parts.every((part) => !["", ".", ".."].includes(part));
    const placed = path === "" ? type === "dir" : types.get(parentOf(`${path}`)) === "dir";
    const fields = Number.isInteger(mode) && mode >= 0 && mode <= 0o7777 && Number.isFinite(mtime);
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

/** §6: the snapshots that open, oldest first, 32 at a time; a damaged one is named, not fatal. */
async function listSnapshots(repo: Repo, ui: Ui) {
  const ids = (await repo.store.list("snapshots")).filter((id) => isHex(id, 16));
  const open = async (id: string) => {
    const value = await getJson(repo, `snapshots/${id}`);
    const named = ["time", "host", "source"].every((key) => typeof value?.[key] === "string");
    return named && isContent(value.manifest) ? { ...value, id } : fail(damaged(`Snapshot ${id}`));
  };
  const tryOpen = (id: string) => open(id).catch((error) => ui.damaged(error, "skipped"));
  const snapshots: (Snapshot | undefined)[] = [];
  for (let at = 0; at < ids.length; at += 32) {
    snapshots.push(...await Promise.all(ids.slice(at, at + 32).map(tryOpen)));
  }
  const opened = snapshots.filter((item) => item !== undefined);
  opened.sort((a, b) => a.time.localeCompare(b.time));
  return { snapshots: opened, damaged: ids.length - opened.length };
}

/** §6: the snapshot named by a unique id prefix, else the newest. */
async function findSnapshot(repo: Repo, ui: Ui, prefix = ""): Promise<Snapshot> {
  const { snapshots, damaged } = await listSnapshots(repo, ui);
  const matches = snapshots.filter((snapshot) => snapshot.id.startsWith(prefix));
  if (prefix && matches.length > 1) throw new UserError(`${matches.length} ids start ${prefix}`);
  const none = new UserError(prefix ? `No snapshot ${prefix}` : "No snapshots", damaged ? 3 : 1);
  return matches.at(-1) ?? fail(none);
}

/** §8: runs a backup holding a lock. A lock of this host whose process is gone is stale and
 * removed; with no other lock left, no other run can be writing, and tmp/ is emptied (§7). */
async function withLock<T>(repo: Repo, work: () => Promise<T>) {
  const own = hex(random(8));
  await putJson(repo, `locks/${own}`, { host: hostname(), pid: Deno.pid });
  try {
    let others = 0;
    for (const id of (await repo.store.list("locks")).filter((id) => isHex(id, 16) && id !== own)) {
      const lock = await getJson(repo, `locks/${id}`).catch(() => null); // gone, or not ours
      if (lock?.host === hostname() && gone(lock.pid)) await repo.store.remove(`locks/${id}`);
      else others++;
    }
    const leftovers = others ? [] : await repo.store.list("tmp"); // §7: of runs that were killed
    for (const id of leftovers.filter((id) => isHex(id, 16))) await repo.store.remove(`tmp/${id}`);
    return await work();
  } finally {
    await repo.store.remove(`locks/${own}`).catch(() => {});
  }
}

function gone(pid: number): boolean {
  try {
    return !process.kill(pid, 0);
  } catch (error) {
    return (error as Untyped).code === "ESRCH"; // EPERM: alive, another user's
  }
}

/** At most maxBytes and maxCount tasks at once; add() and drain() rethrow the first failure. */
function limiter(maxBytes: number, maxCount: number) {
  const running = new Map<Promise<void>, number>(); // each task and its bytes
  const bytes = () => [...running.values()].reduce((sum, size) => sum + size, 0);
  let failure: Error | null = null;
  async function add(size: number, task: () => Promise<unknown>) {
    while (running.size && (running.size >= maxCount || bytes() + size > maxBytes)) {
      await Promise.race(running.keys());
    }
    if (failure) throw failure;
    const promise: Promise<void> = task().then(() => {}, (error) => void (failure ??= error))
      .finally(() => running.delete(promise));
    running.set(promise, size);
  }
  return { add, drain: () => Promise.all(running.keys()).then(() => failure && fail(failure)) };
}

// ---- Storage (§1, §7): one interface; an SFTP server or a local folder behind it --------------

type Store = ReturnType<typeof makeStore>;
// deno-lint-ignore no-explicit-any
type Untyped = any; // ssh2's SFTP objects (npm:ssh2 ships no types) and node:fs callbacks
const FOLDERS = ["snapshots", "data", "locks", "tmp"]; // §1
const isMissing = (error: Untyped) => ["ENOENT", "ENOTDIR", 2].includes(error?.code); // 2: SFTP's

/** A callback call (ssh2 SFTP or node:fs) as a promise that fails with a one-line UserError. */
function call<T>(files: Untyped, method: string, ...args: unknown[]): Promise<T> {
  return new Promise<T>((done, reject) => {
    if (files.readable === false) return reject(files.lost); // ssh2: the connection has ended
    files[method](...args, (error: Untyped, result: T) => {
      if (!error) return done(result);
      const what = typeof args[0] === "string" ? ` ${args[0]}` : "";
      const reason = String(error.message).replace(/^E[A-Z]+: ([^,]+).*$/s, "$1"); // node:fs
      reject(Object.assign(new UserError(`Cannot ${method}${what}: ${reason}`), { reason, error }));
    });
  });
}

/** A Store on ssh2's SFTP calls, or node:fs's (the same API) for a local folder. ssh2 sends the
 * pieces of a read or write in order, as any SFTP server accepts; many objects hide round trips. */
function makeStore(files: Untyped, root: string, close = () => {}) {
  const path = (name: string) => name ? `${root}/${name}` : root;
  const offers = (extension: string) => !files._extensions || extension in files._extensions;
  const orNull = (error: Untyped) => isMissing(error.error) ? null : fail(error);
  const stat = (name: string, how = "lstat") => call<Untyped>(files, how, path(name)).catch(orNull);
  async function read(name: string, size?: number) {
    const handle = await call(files, "open", path(name), "r", {});
    try {
      const length = size ?? (await call<Untyped>(files, "fstat", handle)).size;
      if (size === undefined && length > SMALL_OBJECT_BYTES) throw new Error("it is too large");
      const buffer = Buffer.alloc(length);
      const count = await call(files, "read", handle, buffer, 0, length, 0); // in pieces
      if (count !== length) throw new Error("it is too short");
      return new Uint8Array(buffer.buffer, buffer.byteOffset, length); // its own, unpooled buffer
    } finally {
      call(files, "close", handle).catch(() => {}); // not waited for: one round trip less
    }
  }
  return {
    /** The whole object, of the size given (else its own, SMALL_OBJECT_BYTES at most). */
    read: (name: string, size?: number): Promise<Bytes> =>
      read(name, size).catch((error) => {
        if (files.readable === false) throw error; // the connection failed, not the repository
        const reason = isMissing(error.error) ? "it is missing" : error.reason ?? error.message;
        throw new UserError(`Cannot read ${name}: ${reason}`, 3);
      }),
    /** §7: to tmp/, synced, then renamed: a name never holds a partial object. */
    async write(name: string, object: Uint8Array) {
      const temporary = path(`tmp/${hex(random(8))}`);
      const handle = await call(files, "open", temporary, "wx", { mode: 0o600 });
      const data = Buffer.from(object.buffer, object.byteOffset, object.length);
      try {
        const written = await call<number>(files, "write", handle, data, 0, data.length, 0);
        if (written !== data.length) throw new UserError(`Only ${written} bytes of ${name} stored`);
        if (offers("fsync@openssh.com")) await call(files, "ext_openssh_fsync", handle);
      } finally {
        await call(files, "close", handle);
      }
      const rename = offers("posix-rename@openssh.com") ? "ext_openssh_rename" : "rename";
      await call(files, rename, temporary, path(name)); // atomic; an older copy is replaced
    },
    exists: async (name: string) => (await stat(name)) !== null,
    list: async (folder: string): Promise<string[]> =>
      ((await call<Untyped[]>(files, "readdir", path(folder)).catch(orNull)) ?? []) // if none
        .map((item) => item.filename),
    remove: (name: string) => call(files, "unlink", path(name)),
    /** §1: the root and its folders are real folders, made if `create`. */
    async prepare(create: boolean) {
      for (const folder of ["", ...FOLDERS]) { // a link could lead writes and deletes elsewhere
        const [info, code] = [await stat(folder, folder ? "lstat" : "stat"), folder ? 3 : 1];
        if (!info && create) await call(files, "mkdir", path(folder), { mode: 0o700 });
        else if (!info?.isDirectory()) throw new UserError(`${path(folder)} is not a folder`, code);
      }
    },
    close,
  };
}
const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
const LOCAL_FILES = {
  ...fs,
  /** Follows no link and waits on no FIFO; what is not a regular file reads short or fails. */
  open(path: string, flags: string, attrs: { mode?: number }, done: Untyped) {
    const mode = (flags === "r" ? O_RDONLY : O_WRONLY | O_CREAT | O_EXCL) | O_NOFOLLOW | O_NONBLOCK;
    fs.open(path, mode, attrs.mode ?? 0o600, done);
  },
  readdir: (path: string, done: Untyped) =>
    fs.readdir(path, (error, names) => done(error, names?.map((filename) => ({ filename })))),
  ext_openssh_rename: fs.rename,
  ext_openssh_fsync: fs.fsync,
};

/** Runs the user's own `ssh ... -s -- DESTINATION sftp` (OpenSSH checks host keys, authenticates)
 * and speaks SFTP over its pipes with ssh2's SFTP class (internal API of the pinned version,
 * held by the tests). Options on ssh's command line win over ssh_config: an unknown host is
 * refused unless --accept-new-host. `--` keeps a location from becoming an ssh option. */
async function connectSsh(destination: string, port: string, options: Options) {
  const [program, ...words] = (Deno.env.get("NFREEZER_SSH") || "ssh").trim().split(/\s+/);
  const args = [...words, "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"];
  args.push("-o", `StrictHostKeyChecking=${options["accept-new-host"] ? "accept-new" : "yes"}`);
  if (options.identity) args.push("-i", options.identity);
  if (options["known-hosts"]) args.push("-o", `UserKnownHostsFile=${options["known-hosts"]}`);
  if (port) args.push("-p", port);
  args.push("-s", "--", destination, "sftp");
  const child = new Deno.Command(program, { args, stdin: "piped", stdout: "piped" }).spawn();
  const writer = child.stdin.getWriter();
  const protocol = {
    channelData: (_id: number, data: Uint8Array) => void writer.write(data).catch(() => {}),
    channelClose: () => void writer.close().catch(() => {}),
  };
  const outgoing = { id: 0, state: "open", window: Infinity, packetSize: Infinity }; // ssh's job
  const sftp = new SFTP({ _protocol: protocol }, { type: "sftp", outgoing }, {});
  sftp.on("error", () => {}); // a protocol error ends the channel; pending calls fail with it
  sftp.lost = new UserError(`The SSH connection to ${destination} ended`); // see call()
  const push = (data: Uint8Array) =>
    sftp.push(Buffer.from(data.buffer, data.byteOffset, data.length));
  const ended = child.stdout.pipeTo(new WritableStream({ write: push })).catch(() => {})
    .then(() => sftp.push(null)); // fails every request still pending, and all that follow
  sftp._init();
  const ready = new Promise((resolve) => sftp.once("ready", resolve));
  await Promise.race([ready, ended.then(() => fail(sftp.lost))]);
  return sftp;
}

// ---- Backup -----------------------------------------------------------------------------------

type Ui = ReturnType<typeof makeUi>;
const isFsError = (error: unknown): error is Error => /^E[A-Z0-9]+$/.test((error as Untyped)?.code);
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const printable = (text: string) => text.replace(/\p{Cc}/gu, "?"); // no control codes from a server
const since = (start: number) => `${((Date.now() - start) / 1000).toFixed(1)} s`;

/** Walks root without following links; dotfiles included; sockets, fifos, devices skipped. */
function scanTree(root: string, excludes: string[], ui: Ui): Entry[] {
  const entries: Entry[] = [];
  const visit = (path: string) => {
    try {
      const info = Deno.lstatSync(join(root, path));
      const entry = { path, mode: info.mode! & 0o7777, mtime: info.mtime!.getTime() };
      const target = info.isSymlink ? Deno.readLinkSync(join(root, path)) : undefined;
      if (info.isFile) return entries.push({ ...entry, type: "file", size: info.size });
      if (target !== undefined) return entries.push({ ...entry, type: "symlink", target });
      if (!info.isDirectory) return ui.warn(`skipped ${path}: not a file, folder or symlink`);
      entries.push({ ...entry, type: "dir" });
      for (const { name } of Deno.readDirSync(join(root, path))) {
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

/** Chunks one file; null if it kept changing while read: never stored half old, half new. */
async function storeFile(path: string, entry: Entry, put: (chunk: Bytes) => Promise<string>) {
  for (let attempt = 0; attempt < 3; attempt++) {
    using file = await Deno.open(path);
    const { size, mtime } = await file.stat();
    const chunks: string[] = [];
    for (let offset = 0; offset < size; offset += CHUNK_BYTES) {
      const chunk = new Uint8Array(Math.min(CHUNK_BYTES, size - offset));
      let done = 0; // at the end of the file (it shrank: the stat below notices) the rest stays 0
      while (done < chunk.length) done += await file.read(chunk.subarray(done)) ?? chunk.length;
      chunks.push(await put(chunk));
    }
    const after = await file.stat();
    const same = after.size === size && after.mtime!.getTime() === mtime!.getTime();
    if (same) return { ...entry, size, mtime: mtime!.getTime(), chunks };
  }
  return null;
}

/** Adds a snapshot of root: reads only files whose size or mtime changed, sends only new chunks. */
async function backup(repo: Repo, root: string, options: Options, ui: Ui) {
  const started = Date.now();
  const { snapshots } = await listSnapshots(repo, ui); // only the parent must open
  const parent = snapshots.findLast((item) => item.host === hostname() && item.source === root);
  const orphan = (error: unknown) => ui.damaged(error, "no parent"); // then every file is read
  const before = (parent && await loadManifest(repo, parent).catch(orphan)) || [];
  const previous = new Map(before.map((entry) => [entry.path, entry]));
  const known = new Set(before.flatMap((entry) => entry.chunks ?? [])); // §4: stored already
  const uploads = limiter(IN_FLIGHT_BYTES, IN_FLIGHT_COUNT);
  const done = { read: 0, sent: 0, chunks: 0, new: 0, changed: 0, same: 0 };
  const entries = scanTree(root, options.exclude ?? [], ui);
  const total = entries.reduce((sum, entry) => sum + (entry.size ?? 0), 0);
  const put = async (chunk: Bytes) => {
    const id = await chunkId(repo.keys, chunk);
    if (known.has(id)) return id;
    known.add(id);
    await uploads.add(chunk.length, async () => {
      if (await repo.store.exists(`data/${id}`)) return; // sent by an interrupted run, another host
      await repo.store.write(`data/${id}`, await seal(repo.keys, `data/${id}`, chunk));
      done.sent += chunk.length;
      done.chunks++;
    });
    return id;
  };
  const kept: Entry[] = [];
  for (const entry of entries) {
    const old = previous.get(entry.path);
    const same = old?.type === "file" && old.size === entry.size && old.mtime === entry.mtime;
    if (entry.type !== "file") kept.push(entry);
    else if (same) kept.push({ ...entry, chunks: old.chunks });
    else {
      const stored = await storeFile(join(root, entry.path), entry, put).catch((error) =>
        isFsError(error) ? ui.problem(`cannot read ${entry.path}: ${error.message}`) : fail(error)
      );
      if (stored === null) ui.problem(`skipped ${entry.path}: it kept changing while being read`);
      done.read += stored?.size ?? 0;
      if (stored) kept.push(stored);
    }
    if (entry.type === "file") done[same ? "same" : old?.type === "file" ? "changed" : "new"]++;
  }
  const packed = gzipSync(utf8(JSON.stringify(kept)));
  const manifest = { size: packed.length, chunks: [] as string[] };
  for (let offset = 0; offset < packed.length; offset += CHUNK_BYTES) {
    manifest.chunks.push(await put(new Uint8Array(packed.subarray(offset, offset + CHUNK_BYTES))));
  }
  await uploads.drain(); // §6: every chunk is stored before a snapshot can refer to it
  const [id, time] = [hex(random(8)), new Date().toISOString()];
  const snapshot = { time, host: hostname(), source: root, parent: parent?.id, manifest };
  await putJson(repo, `snapshots/${id}`, { ...snapshot, files: kept.length, bytes: total });
  const removed = before.filter((old) => old.type === "file").length - done.changed - done.same;
  const changes = `${done.new} new, ${done.changed} changed, ${done.same} unchanged`;
  const sent = `${mib(done.read)} read, ${mib(done.sent)} sent in ${done.chunks} new chunks`;
  ui.info(`Snapshot ${id}: ${changes}, ${removed} removed files; ${sent}; ${since(started)}`);
}

// ---- Restore ----------------------------------------------------------------------------------

/** §4: verified chunks go to a new temporary file, renamed over path (a link there is replaced);
 * a regular file there with the entry's mode, time and chunks is left untouched. */
async function restoreFile(repo: Repo, path: string, temporary: string, entry: Entry) {
  const [info, time] = [await Deno.lstat(path).catch(() => null), new Date(entry.mtime)];
  const hash = (chunk: Bytes) => chunkId(repo.keys, chunk);
  const same = info?.isFile && info.mtime?.getTime() === entry.mtime && info.size === entry.size;
  const found = same && (info.mode! & 0o7777) === entry.mode && await storeFile(path, entry, hash);
  if (found && found.chunks.join() === entry.chunks!.join()) return undefined;
  using file = await Deno.open(temporary, { write: true, createNew: true, mode: 0o600 });
  for await (const chunk of chunksOf(repo, entry as Content)) {
    for (let done = 0; done < chunk.length;) done += await file.write(chunk.subarray(done));
  }
  await Deno.chmod(temporary, entry.mode);
  await Deno.utime(temporary, time, time);
  await Deno.rename(temporary, path);
  return entry.size;
}

/** Restores into target in path order: folders, then files (many at once), then links, then the
 * folders' modes and times, deepest first. An entry whose folder failed is not attempted. */
async function restore(repo: Repo, target: string, options: Options, ui: Ui) {
  const started = Date.now();
  const snapshot = await findSnapshot(repo, ui, options.snapshot);
  const entries = await loadManifest(repo, snapshot);
  if (!(await Deno.stat(target).catch(() => null))?.isDirectory) {
    await Deno.mkdir(target, { recursive: true }); // fails on a file: one error, up front
  }
  const root = Deno.realPathSync(target);
  const [failed, done] = [new Set<string>(), { written: 0, bytes: 0, same: 0 }];
  const attempt = async (entry: Entry, work: (path: string, temporary: string) => unknown) => {
    const path = join(root, entry.path);
    const temporary = join(
      dirname(path),
      `.${basename(path).slice(0, 40)}.nfreezer-${hex(random(4))}`,
    );
    if (failed.has(entry.path) || failed.has(parentOf(entry.path))) return failed.add(entry.path);
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
  const file = (entry: Entry) => async (path: string, temporary: string) => {
    const written = await restoreFile(repo, path, temporary, entry);
    done[written === undefined ? "same" : "written"]++;
    done.bytes += written ?? 0;
  };
  const link = (entry: Entry) => async (path: string, temporary: string) => {
    await Deno.symlink(entry.target!, temporary);
    await lutimes(temporary, new Date(entry.mtime), new Date(entry.mtime));
    await Deno.rename(temporary, path); // replaces what is there, never follows it
  };
  const restoring = limiter(IN_FLIGHT_BYTES, IN_FLIGHT_COUNT);
  const folder = async (path: string) => { // a real folder: a file or link there is replaced
    const info = await Deno.lstat(path).catch(() => null);
    if (info && !info.isDirectory) await Deno.remove(path);
    if (!info?.isDirectory) await Deno.mkdir(path, { mode: 0o700 });
    for (const item of Deno.readDirSync(path)) { // what a killed restore left
      if (LEFTOVER.test(item.name) && !item.isDirectory) await Deno.remove(join(path, item.name));
    }
  };
  for (const entry of entries) { // in path order: a folder is made before what it holds
    const size = Math.min(entry.size ?? 0, CHUNK_BYTES); // a file holds one chunk at a time
    if (entry.type === "file") await restoring.add(size, () => attempt(entry, file(entry)));
    else await attempt(entry, entry.type === "dir" ? folder : link(entry));
  }
  await restoring.drain();
  for (const entry of entries.toReversed().filter((entry) => entry.type === "dir")) {
    await attempt(entry, async (path) => {
      if (!(await Deno.lstat(path)).isDirectory) throw new UserError("it is no longer a folder");
      await Deno.chmod(path, entry.mode);
      await Deno.utime(path, new Date(entry.mtime), new Date(entry.mtime));
    });
  }
  const files = `${done.written} files (${mib(done.bytes)}) written, ${done.same} already there`;
  ui.info(`Restored snapshot ${snapshot.id}: ${files}; ${since(started)}`);
}

// ---- Command line -----------------------------------------------------------------------------

const BINARY = basename(Deno.execPath());
const SELF = BINARY === "deno" ? "deno run -A nfreezer.ts" : BINARY; // as the user runs it
const HELP = `see ${SELF} --help`;
const USAGE = `Usage: ${SELF} <command> ...     (nfreezer ${VERSION}: encrypted backups)
  init      <repo>                create an empty repository (backup also creates one)
  backup    <source-dir> <repo>   add a snapshot         [--exclude GLOB]...
  restore   <repo> <target-dir>   restore a snapshot     [--snapshot ID]
  snapshots <repo>                list the snapshots     [--json]
<repo>: /local/path, ./relative/path, user@host:path or sftp://user@host[:port]/path.
ID: a unique prefix of a snapshot id; the default is the newest snapshot.
Options:
  --password-file FILE  read the passphrase from FILE (else $NFREEZER_PASSWORD, else a prompt)
  -i, --identity FILE   SSH key for ssh ($NFREEZER_SSH, default ssh, with its ~/.ssh/config)
  --known-hosts FILE    SSH known hosts file (ssh's UserKnownHostsFile)
  --accept-new-host     trust and remember the key of a host not yet in known_hosts
  -q, --quiet  only warnings and errors      -h, --help  this help      --version  the version
Exit codes: 0 ok, 1 error, 2 usage error, 3 integrity error (tampered or missing data)`;
/** Options as USAGE shows them ("-x, --name VALUE]..."); a command's own are on its line. */
const OPTIONS: Record<string, Untyped> = {};
const OPTION = /(?:-(\w), )?--([a-z-]+)( [A-Z]+)?(\]\.{3})?/g; // -x, --name VALUE]...
for (const [, short, name, value, many] of USAGE.matchAll(OPTION)) {
  OPTIONS[name] = { type: value ? "string" : "boolean", multiple: !!many, ...short && { short } };
}
const OWN = new Set(USAGE.match(/\[--[a-z-]+/g)!.map((text) => text.slice(3)));
type Options = Record<string, Untyped>;

/** Output; problems are counted: the command exits 1 (3 for damage) once it did the rest. */
function makeUi(quiet: boolean) {
  const ui = {
    problems: 0,
    exitCode: 1,
    info: (text: string) => quiet || console.log(text),
    warn: (text: string) => console.error(`nfreezer: warning: ${printable(text)}`),
    problem(text: string, exitCode = 1) {
      ui.warn(text);
      ui.problems++;
      ui.exitCode = Math.max(ui.exitCode, exitCode);
    },
    /** An integrity error becomes a problem (exit 3, once the rest is done); others are thrown. */
    damaged: (error: Untyped, context: string): undefined =>
      void (error?.exitCode === 3 ? ui.problem(`${context}: ${error.message}`, 3) : fail(error)),
  };
  return ui;
}

/** Reads a line without echo; backspace erases a character; strict UTF-8 (no two collide). */
async function promptSecret(question: string): Promise<string> {
  const hint = "give it with --password-file FILE or $NFREEZER_PASSWORD";
  if (!Deno.stdin.isTerminal()) throw new UserError("A passphrase is needed", 1, hint);
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
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new UserError("The passphrase is not valid UTF-8");
  }
}

/** The passphrase from --password-file, else $NFREEZER_PASSWORD, else asked (twice if new). */
async function getPassphrase(options: Options, creating: boolean): Promise<string> {
  const file = options["password-file"];
  const read = () => strictUtf8(Deno.readFileSync(file)).replace(/\r?\n$/, "");
  const given = file ? read() : Deno.env.get("NFREEZER_PASSWORD") || undefined;
  const passphrase = given ?? await promptSecret("Repository passphrase: ");
  const again = given ?? (creating ? await promptSecret("Repeat it: ") : passphrase);
  if (passphrase !== again) throw new UserError("The passphrases differ");
  return passphrase || fail(new UserError("The passphrase is empty"));
}

/** Opens (init and backup: creates) the repository at a path, user@host:path or sftp:// URL. */
async function openRepo(location: string, options: Options, create: boolean): Promise<Repo> {
  const url = /^sftp:\/\/([^/:]+)(?::(\d+))?(\/.*)$/.exec(location);
  const scp = /^([^/:]+):(.*)$/.exec(location); // as scp: a local "a:b" is written ./a:b
  const [destination, port, path] = url ? url.slice(1) : [scp?.[1], "", scp?.[2] || "."];
  const sftp = destination && await connectSsh(destination, port, options);
  const root = sftp ? path.replace(/^~\//, "") : resolve(location); // ~/x: relative to home
  const store = makeStore(sftp || LOCAL_FILES, root, () => sftp && sftp.end());
  try {
    const names = await store.list("");
    const found = names.includes("config");
    const hint = `create one with: ${SELF} init ${location}`;
    if (!found && !create) throw new UserError(`No repository at ${location}`, 1, hint);
    const foreign = names.some((name) => !FOLDERS.includes(name));
    if (!found && foreign) throw new UserError(`${location} is not empty, and not a repository`);
    await store.prepare(!found);
    const passphrase = await getPassphrase(options, !found);
    if (found) return { store, keys: await unlockConfig(await store.read("config"), passphrase) };
    const { config, keys } = await createConfig(passphrase);
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
    withLock(repo, () => backup(repo, Deno.realPathSync(source), options, ui)),
  restore: (repo, [, target], options, ui) => restore(repo, resolve(target), options, ui),
  async snapshots(repo, _args, options, ui) {
    const { snapshots } = await listSnapshots(repo, ui);
    if (options.json) return console.log(JSON.stringify(snapshots, null, 2));
    for (const { id, time, host, source, files, bytes } of snapshots as Untyped[]) {
      ui.info(`${id}  ${time}  ${host}:${source}  ${files} entries, ${mib(bytes)}`);
    }
  },
};

/** A command's USAGE line is its spec: the <arguments> it takes and the [--options] it adds. */
async function runCli(argv: string[]): Promise<void> {
  process.umask(0o077); // safe default: what this process creates is private to the user
  const parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const [options, [name, ...args]] = [parsed.values as Options, parsed.positionals];
  if (options.version) return console.log(`nfreezer ${VERSION}, repository format ${FORMAT}`);
  if (options.help || !name) return console.log(USAGE);
  const line = USAGE.split("\n").find((text) => COMMANDS[name] && text.startsWith(`  ${name} `));
  if (!line) throw new UserError(`Unknown command ${name}`, 2, HELP);
  const usage = `usage: ${SELF} ${line.trim()}`;
  const slots = line.match(/<[^>]+>/g)!;
  const foreign = Object.keys(options).find((key) => OWN.has(key) && !line.includes(`[--${key}`));
  if (foreign) throw new UserError(`${name} does not take --${foreign}`, 2, usage);
  if (args.length !== slots.length) {
    throw new UserError(`${name} takes ${slots.join(" ")}`, 2, usage);
  }
  if (name === "backup" && !Deno.statSync(args[0]).isDirectory) {
    throw new UserError(`${args[0]} is not a folder`); // checked before a repository is made
  }
  const ui = makeUi(options.quiet);
  const repo = await openRepo(args[slots.indexOf("<repo>")], options, /init|backup/.test(name));
  await COMMANDS[name](repo, args, options, ui).finally(() => repo.store.close());
  const problems = `${ui.problems} problem${ui.problems === 1 ? "" : "s"} (see the warnings above)`;
  if (ui.problems) throw new UserError(problems, ui.exitCode);
}

/** Runs the command line and returns the exit code; errors that are not ours keep their stack. */
export async function main(argv: string[]): Promise<number> {
  try {
    await runCli(argv);
    return 0;
  } catch (thrown: Untyped) {
    const usage = String(thrown?.code).startsWith("ERR_PARSE_ARGS"); // not the parser's paragraph
    const error = usage ? new UserError(thrown.message.split(". ")[0], 2, HELP) : thrown;
    if (!(error instanceof UserError || isFsError(error))) throw error;
    console.error(`nfreezer: error: ${printable(error.message.replace(/ \(os error \d+\)/, ""))}`);
    if (error instanceof UserError && error.hint) console.error(`nfreezer: hint: ${error.hint}`);
    return error instanceof UserError ? error.exitCode : 1;
  }
}

export { chunkId, openRepo, putJson, seal }; // for the tests, which forge hostile snapshots

if (import.meta.main) Deno.exit(await main(Deno.args));
