/**
 * nfreezer.ts: encrypted-at-rest backups to an SFTP server or a local disk, in one auditable file.
 *   deno run -A nfreezer.ts backup ~/Documents user@host:/backups/docs      (--help for more)
 *
 * THREAT MODEL
 * Trusted: this machine, the passphrase, the user's known_hosts.
 * Untrusted: the storage server, anyone who can write to the repository, the network.
 * Guaranteed: the server never gets keys, file names, paths, contents, modes or times in clear.
 *   A changed, truncated, swapped, renamed or replayed object fails authentication before any
 *   byte of it reaches a final path: restore reproduces the snapshot or exits 3 naming the paths
 *   it could not verify. SSH host keys must match known_hosts.
 * Not hidden: the total size, number and padded sizes of objects (Padmé: O(log log n) bits of a
 *   size), when backups run, how much changed. The server can delete the repository or withhold
 *   the newest snapshots.
 *
 * ON-DISK FORMAT, version 1 (|| concatenates; sizes in bytes)
 * §1 Layout: config, snapshots/<16 hex>, data/<64 hex>, locks/<16 hex>, tmp/<16 hex>.
 * §2 config: plaintext JSON {format: 1, kdf: {log2N, r, p, salt}, nonce, keys}, bytes in base64.
 *    To write: KEK = scrypt(NFKC(passphrase), salt = random(32), N = 2^log2N, r, p, dkLen = 32);
 *    keys = AES-256-GCM(KEK, nonce = random(12), master = random(64), aad = CONFIG_AAD).
 *    To read: bound the cost (log2N >= 14, 128·N·r <= 256 MiB, p <= 4) before deriving; a bad
 *    tag means a wrong passphrase (or an altered config). encKey = master[0:32] is used only as
 *    HKDF input (§3), idKey = master[32:64] only as an HMAC key (§4).
 * §3 Object named N: "NFZ1" || salt(32) || AES-256-GCM(K, nonce = 0^12, payload), where
 *    K = HKDF-SHA-256(ikm = encKey, salt, info = "nfreezer/1 object " || N) and
 *    payload = u32be(L) || content(L) || 0^(padme(L) - L). Each object has a fresh random salt,
 *    hence its own K, which seals only this payload: the fixed nonce never repeats under a key.
 *    N is bound into K, so an object moved to another name (a swap, a replayed snapshot) fails
 *    to open. To read: check magic and size, derive K from the name read, decrypt.
 * §4 Chunk: files are cut into CHUNK_BYTES pieces; id = hex(HMAC-SHA-256(idKey, piece)), stored
 *    as object data/<id>. To read: open it (§3), then recompute the id and compare.
 * §5 Manifest: JSON array of entries sorted by path: {path ("/"-separated, relative), type
 *    ("file", "dir" or "symlink"), mode, mtime (ms), size and chunks (files), target (links)},
 *    gzipped, cut into chunks (§4). To read: every path must stay inside the restore target.
 * §6 Snapshot: object snapshots/<random 16 hex>, JSON {time (ISO 8601), host, source, parent,
 *    manifest (chunk ids), files, bytes}, written only once all its chunks are stored.
 * §7 Every object is written to tmp/<random 16 hex>, then renamed to its name: a name never
 *    holds a partial object. A backup that finds no other lock empties tmp/.
 * §8 Lock: object locks/<random 16 hex>, JSON {host, pid}, present while a backup runs; one of
 *    this host whose process is gone is stale and removed.
 */

import { Buffer } from "node:buffer";
import { createHash, createHmac, scryptSync } from "node:crypto";
import fs, { existsSync, readFileSync } from "node:fs";
import { lutimes } from "node:fs/promises";
import { connect } from "node:net";
import { homedir, hostname, userInfo } from "node:os";
import { basename, dirname, join, matchesGlob, resolve } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { gunzipSync, gzipSync } from "node:zlib";
import ssh2 from "npm:ssh2@1.17.0";

const FORMAT = 1; // §2
const SCRYPT = { log2N: 17, r: 8, p: 1 }; // §2: ~0.6 s and 128 MiB on our machines
const SCRYPT_LIMITS = { minLog2N: 14, maxMemoryBytes: 256 * 2 ** 20, maxP: 4 }; // §2
const KEY_BYTES = 32; // §2, §3: AES-256 and HMAC-SHA-256 keys
const CONFIG_AAD = "nfreezer/1 config"; // §2
const MAGIC = "NFZ1"; // §3
const OBJECT_INFO = "nfreezer/1 object "; // §3: HKDF info prefix; the object name follows
const SALT_BYTES = 32; // §2, §3
const NONCE_BYTES = 12; // §2, §3: AES-GCM
const HEADER_BYTES = MAGIC.length + SALT_BYTES; // §3
const CHUNK_BYTES = 4 * 2 ** 20; // §4: the unit of dedup, of resume and of memory use
const MAX_OBJECT_BYTES = HEADER_BYTES + 4 + CHUNK_BYTES + 16; // §3, §4: larger is refused unread
const IN_FLIGHT = 4; // chunks stored, or files restored, at once: bounds memory and keeps SSH busy
const RESTORE_WINDOW = 2; // chunks fetched ahead within one restored file
const COLLECT_EVERY = 8; // chunks between garbage collections (see collectGarbage)
const SFTP_PIECE_BYTES = 255 * 1024; // the largest read or write OpenSSH's sftp-server accepts

/** Exit 1: a failure reported in one line. UsageError exits 2, IntegrityError exits 3. */
class UserError extends Error {
  exitCode = 1;
  constructor(message: string, readonly hint = "") {
    super(message);
  }
}
class UsageError extends UserError {
  override exitCode = 2;
}
class IntegrityError extends UserError {
  override exitCode = 3;
}
const fail = (error: Error): never => {
  throw error;
};
function parseJson(bytes: Uint8Array, what: string) {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new IntegrityError(`The ${what} is not valid JSON: it is corrupted`);
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
const unbase64 = (text: string): Bytes => new Uint8Array(Buffer.from(text, "base64"));
const gcm = (iv: Bytes, aad = "") => ({ name: "AES-GCM", iv, additionalData: utf8(aad) });
const ZERO_NONCE = new Uint8Array(NONCE_BYTES); // §3: each object key seals one payload only

/** §2: KEK = scrypt(NFKC(passphrase), salt, 2^log2N, r, p), its cost bounded first. */
function deriveKek(passphrase: string, kdf: Record<string, number>, salt: Bytes) {
  const { log2N, r, p } = kdf;
  const memory = 128 * 2 ** log2N * r;
  const sane = [log2N, r, p].every(Number.isInteger) && r > 0 && p > 0 && p <= SCRYPT_LIMITS.maxP;
  if (!sane || log2N < SCRYPT_LIMITS.minLog2N || memory > SCRYPT_LIMITS.maxMemoryBytes) {
    throw new IntegrityError("The repository config has invalid scrypt parameters");
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

/** §2: unwraps the master key; a wrong passphrase is told apart from a corrupted config. */
async function unlockConfig(text: string, passphrase: string): Promise<Keys> {
  const config = parseJson(utf8(text), "config");
  if (config?.format !== FORMAT) throw new UserError("Unsupported repository format");
  const kek = await deriveKek(passphrase, config.kdf, unbase64(config.kdf.salt));
  const wrap = gcm(unbase64(config.nonce), CONFIG_AAD);
  const master = await subtle.decrypt(wrap, kek, unbase64(config.keys)).catch(() => {
    throw new UserError("Wrong passphrase", "if it is right, the repository config was altered");
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

/** §3: K = HKDF-SHA-256(ikm = encKey, salt, info = OBJECT_INFO || name). */
function objectKey(keys: Keys, salt: Bytes, name: string): Promise<CryptoKey> {
  const hkdf = { name: "HKDF", hash: "SHA-256", salt, info: utf8(OBJECT_INFO + name) };
  const aes = { name: "AES-GCM", length: 256 };
  return subtle.deriveKey(hkdf, keys.encKey, aes, false, ["encrypt", "decrypt"]);
}

/** §3: "NFZ1" || salt || AES-256-GCM(K, 0^12, u32be(L) || content || padding), in two parts. */
async function seal(keys: Keys, name: string, content: Uint8Array): Promise<Bytes[]> {
  const payload = new Uint8Array(4 + padme(content.length));
  new DataView(payload.buffer).setUint32(0, content.length);
  payload.set(content, 4);
  const header = new Uint8Array(HEADER_BYTES);
  header.set(utf8(MAGIC));
  header.set(random(SALT_BYTES), MAGIC.length);
  const key = await objectKey(keys, header.subarray(MAGIC.length), name); // §3: a fresh K
  return [header, new Uint8Array(await subtle.encrypt(gcm(ZERO_NONCE), key, payload))];
}

/** §3: opens an object read from name; only authenticated bytes come out. */
async function unseal(keys: Keys, name: string, object: Bytes): Promise<Bytes> {
  const failure = new IntegrityError(`Cannot open ${name}: it is corrupted or tampered with`);
  const magic = new TextDecoder().decode(object.subarray(0, MAGIC.length));
  if (magic !== MAGIC || object.length < HEADER_BYTES + 4 + 16) throw failure;
  const key = await objectKey(keys, object.subarray(MAGIC.length, HEADER_BYTES), name);
  const sealed = object.subarray(HEADER_BYTES);
  const payload = await subtle.decrypt(gcm(ZERO_NONCE), key, sealed).catch(() => fail(failure));
  const length = new DataView(payload).getUint32(0);
  if (4 + length > payload.byteLength) throw failure;
  return new Uint8Array(payload, 4, length);
}

/** §4: id = hex(HMAC-SHA-256(idKey, chunk)): keyed, so the server cannot test for known files. */
async function chunkId(keys: Keys, chunk: Bytes): Promise<string> {
  return hex(await subtle.sign("HMAC", keys.idKey, chunk));
}

// ---- Repository objects (§4–§8) ---------------------------------------------------------------

type Repo = { store: Store; keys: Keys };
type Entry = { path: string; type: "file" | "dir" | "symlink"; mode: number; mtime: number } & {
  size?: number;
  chunks?: string[];
  target?: string;
};
type Snapshot = { id: string; time: string; host: string; source: string; parent?: string } & {
  manifest: string[];
  files: number;
  bytes: number;
};

async function putJson(repo: Repo, name: string, value: unknown): Promise<void> {
  await repo.store.write(name, await seal(repo.keys, name, utf8(JSON.stringify(value))));
}

async function getJson<T>(repo: Repo, name: string): Promise<T> {
  return parseJson(await unseal(repo.keys, name, await repo.store.read(name)), name);
}

/** §4: a chunk is handed out only once it is authenticated and matches its id. */
async function loadChunk(repo: Repo, id: string): Promise<Bytes> {
  const chunk = await unseal(repo.keys, `data/${id}`, await repo.store.read(`data/${id}`));
  if (await chunkId(repo.keys, chunk) === id) return chunk;
  throw new IntegrityError(`Chunk ${id} does not match its id: it was tampered with`);
}

/** §5: reads a manifest and rejects sneaky paths, so no entry can land outside the target. */
async function loadManifest(repo: Repo, snapshot: Snapshot): Promise<Entry[]> {
  const parts = await Promise.all(snapshot.manifest.map((id) => loadChunk(repo, id)));
  const entries: Entry[] = parseJson(gunzipSync(Buffer.concat(parts)), "manifest");
  for (const { path } of entries) {
    const parts = typeof path === "string" ? path.split("/") : [""];
    if (parts.some((part) => ["", ".", ".."].includes(part) || part.includes("\0"))) {
      throw new IntegrityError(`Snapshot ${snapshot.id} holds the unsafe path ${path}`);
    }
  }
  return entries;
}

/** §6: the snapshots whose id starts with prefix, oldest first; a damaged one stops the command
 * (exit 3), so tampering is never passed over in silence. */
async function listSnapshots(repo: Repo, prefix = ""): Promise<Snapshot[]> {
  const ids = (await repo.store.list("snapshots")).filter((id) => /^[0-9a-f]{16}$/.test(id));
  const open = async (id: string) => ({ ...await getJson<Snapshot>(repo, `snapshots/${id}`), id });
  const snapshots = await Promise.all(ids.filter((id) => id.startsWith(prefix)).map(open));
  return snapshots.sort((a, b) => a.time.localeCompare(b.time));
}

/** §6: the snapshot named by a unique id prefix, else the newest. */
async function findSnapshot(repo: Repo, prefix?: string): Promise<Snapshot> {
  const snapshots = await listSnapshots(repo, prefix);
  const unique = !prefix || snapshots.length === 1;
  if (!unique) throw new UserError(`${snapshots.length} snapshot ids start with "${prefix}"`);
  return snapshots.at(-1) ?? fail(new UserError("The repository has no snapshots yet"));
}

/** §8: runs work under a lock, after removing stale locks of this host and (§7) leftovers. */
async function withLock<T>(repo: Repo, work: () => Promise<T>): Promise<T> {
  const gone = (pid: number) => {
    try {
      return !process.kill(pid, 0);
    } catch (error) {
      return (error as Untyped).code === "ESRCH";
    }
  };
  let others = 0;
  for (const name of await repo.store.list("locks")) {
    const lock = await getJson<Untyped>(repo, `locks/${name}`).catch(() => null);
    if (lock?.host !== hostname() || !gone(lock.pid)) others++;
    else await repo.store.remove(`locks/${name}`);
  }
  for (const name of others ? [] : await repo.store.list("tmp")) {
    await repo.store.remove(`tmp/${name}`);
  }
  const lock = `locks/${hex(random(8).buffer)}`;
  await putJson(repo, lock, { host: hostname(), pid: Deno.pid });
  try {
    return await work();
  } finally {
    await repo.store.remove(lock);
  }
}

/** V8 frees ArrayBuffers lazily: 4 MiB chunks churning at hundreds of MB/s would let memory
 * float far above what is in use, so backup and restore collect every COLLECT_EVERY chunks. */
setFlagsFromString("--expose-gc");
const collectGarbage: () => void = runInNewContext("gc");

/** Keeps at most `limit` tasks running, oldest awaited first; add() and drain() rethrow. */
function inFlight(limit: number) {
  const pending: Promise<unknown>[] = [];
  const add = async (task: Promise<unknown>) => {
    task.catch(() => {}); // awaited below or in drain(); this only marks it handled
    pending.push(task);
    if (pending.length >= limit) await pending.shift();
  };
  return { add, drain: () => Promise.all(pending.splice(0)) };
}

// ---- Storage (§1, §7): one interface; an SFTP server or a local folder behind it --------------

interface Store {
  read(name: string): Promise<Bytes>; // the whole object; an IntegrityError if it is missing
  write(name: string, parts: Uint8Array[]): Promise<void>; // §7: to tmp/, then renamed
  exists(name: string): Promise<boolean>;
  list(folder: string): Promise<string[]>; // [] if the folder does not exist
  remove(name: string): Promise<void>;
  makeFolders(): Promise<void>; // §1
  close(): void;
}
// deno-lint-ignore no-explicit-any
type Untyped = any; // ssh2's Client and SFTP objects (npm:ssh2 ships no types) and node:fs
const FOLDERS = ["snapshots", "data", "locks", "tmp"]; // §1
const missing = (name: string) => new IntegrityError(`${name} is missing from the repository`);

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

/** Promise form of a callback call (ssh2 SFTP or node:fs); failures become one-line UserErrors.
 * ssh2 never answers requests pending when a connection drops: target.lost fails them then. */
function call<T>(target: Untyped, method: string, ...args: unknown[]): Promise<T> {
  const request = new Promise<T>((done, reject) =>
    target[method](...args, (error: Untyped, result: T) => {
      if (!error) return done(result);
      const what = typeof args[0] === "string" ? ` ${args[0]}` : "";
      reject(Object.assign(new UserError(`Cannot ${method}${what}: ${error.message}`), error));
    })
  );
  return target.lost ? Promise.race([request, target.lost]) : request;
}

/** Reads or writes a whole object as concurrent SFTP_PIECE_BYTES requests: one round trip. */
function transfer(
  files: Untyped,
  method: "read" | "write",
  handle: unknown,
  buffer: Buffer,
  at = 0,
) {
  const requests = [];
  for (let offset = 0; offset < buffer.length; offset += SFTP_PIECE_BYTES) {
    const length = Math.min(SFTP_PIECE_BYTES, buffer.length - offset);
    requests.push(call<number>(files, method, handle, buffer, offset, length, at + offset));
  }
  return Promise.all(requests);
}

/** A Store on ssh2's SFTP calls. node:fs has the same callback API, so a local folder runs this
 * same code through LOCAL_FILES, which only names three calls as ssh2 does. */
function makeStore(files: Untyped, root: string, close = () => {}): Store {
  const path = (name: string) => `${root}/${name}`;
  const ifMissing = <T>(value: T) => (error: Untyped) =>
    error.code === 2 || error.code === "ENOENT" ? value : fail(error); // SSH_FX_NO_SUCH_FILE
  const stat = (path: string) => call<Untyped>(files, "stat", path);
  const closing = (handle: unknown) => () => call(files, "close", handle);
  return {
    async read(name) {
      const handle = await call(files, "open", path(name), "r", {}).catch(ifMissing(null));
      if (handle === null) throw missing(name);
      const size = await call<Untyped>(files, "fstat", handle).then((info) => info.size);
      const buffer = Buffer.alloc(size <= MAX_OBJECT_BYTES ? size : 0); // §3, §4: none is larger
      const counts = await transfer(files, "read", handle, buffer).finally(closing(handle));
      if (size > MAX_OBJECT_BYTES) throw new IntegrityError(`${name} is too large: tampered with`);
      if (counts.reduce((sum, count) => sum + count, 0) !== size) throw missing(name);
      return new Uint8Array(buffer.buffer, buffer.byteOffset, size); // its own, unpooled buffer
    },
    async write(name, parts) {
      const temporary = path(`tmp/${hex(random(8).buffer)}`);
      const handle = await call(files, "open", temporary, "wx", { mode: 0o600 });
      let length = 0;
      const buffers = parts.map((part) => Buffer.from(part.buffer, part.byteOffset, part.length));
      const writes = buffers.map((part) =>
        transfer(files, "write", handle, part, (length += part.length) - part.length)
      );
      await Promise.all(writes)
        .then(() => call(files, "ext_openssh_fsync", handle).catch(() => {})) // if the server can
        .finally(closing(handle));
      const { size } = await stat(temporary); // the byte count is checked before the rename
      if (size !== length) throw new UserError(`Only ${size} of ${length} bytes were stored`);
      await call(files, "ext_openssh_rename", temporary, path(name)); // atomic, replaces the target
    },
    exists: (name) => stat(path(name)).then(() => true, ifMissing(false)),
    list: (folder) =>
      call<Untyped[]>(files, "readdir", path(folder))
        .then((items) => items.map((item) => item.filename), ifMissing([])),
    remove: (name) => call(files, "unlink", path(name)),
    async makeFolders() {
      for (const folder of [root, ...FOLDERS.map(path)]) {
        const made = await call(files, "mkdir", folder).then(() => true, () => false);
        if (!made && !(await stat(folder).catch(() => null))?.isDirectory()) {
          throw new UserError(`Cannot create the folder ${folder}`);
        }
      }
    },
    close,
  };
}
const LOCAL_FILES = {
  ...fs,
  open: (path: string, flags: string, attrs: Untyped, done: Untyped) =>
    fs.open(path, flags, attrs.mode ?? 0o666, done),
  readdir: (path: string, done: Untyped) =>
    fs.readdir(path, (error, names) => done(error, names?.map((filename) => ({ filename })))),
  ext_openssh_rename: fs.rename,
  ext_openssh_fsync: fs.fsync,
};

// ---- SFTP (npm:ssh2): host keys, authentication -----------------------------------------------

type Remote = { user: string; host: string; port: number; path: string; identity?: string };
const SSH_CIPHERS = ["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-ctr"];
const SSH_DEFAULT_KEYS = ["id_ed25519", "id_ecdsa", "id_rsa"];
const readLines = (file: string) => existsSync(file) ? readFileSync(file, "utf8").split("\n") : [];

/** user@host:/path or sftp://user@host[:port]/path, ~/.ssh/config applied; null if local. */
function parseRemote(location: string): Remote | null {
  const match = /^sftp:\/\/(?:([^@/]+)@)?([^/:]+)(?::(\d+))?(\/.*)$/.exec(location) ??
    /^(?:([^@/]+)@)?([^/:]+):()(.*)$/.exec(location);
  if (!match) return null;
  const config: Record<string, string> = {}; // ~/.ssh/config: the first value wins, as in OpenSSH
  let applies = true;
  for (const line of readLines(join(homedir(), ".ssh", "config"))) {
    const [keyword, ...values] = line.trim().split(/\s*=\s*|\s+/);
    const key = keyword.toLowerCase();
    if (key === "host") applies = values.some((pattern) => matchesGlob(match[2], pattern));
    else if (key === "match") applies = false;
    else if (applies && values.length && !(key in config)) config[key] = values.join(" ");
  }
  const user = match[1] ?? config.user ?? userInfo().username;
  const port = Number(match[3] || config.port || 22);
  const path = match[4].replace(/^~\/?/, "") || ".";
  const identity = config.identityfile?.replace(/^~/, homedir());
  return { user, host: config.hostname ?? match[2], port, path, identity };
}

/** Strict host-key checking against known_hosts (hashed |1| entries too); a new key only with
 * --accept-new-host, which then appends it; a changed key never. Returns why it refuses. */
function hostKeyRefusal(file: string, name: string, key: Buffer, acceptNew: boolean) {
  const matches = (pattern: string) => {
    const [, hashed, salt, hash] = pattern.split("|");
    if (hashed !== "1") return pattern === name;
    return createHmac("sha1", unbase64(salt)).update(name).digest("base64") === hash;
  };
  const known = readLines(file).map((line) => line.trim().split(/\s+/))
    .filter(([hosts, , key]) => key && !hosts.startsWith("#") && hosts.split(",").some(matches));
  if (known.some((fields) => fields[2] === key.toString("base64"))) return null;
  const print = `SHA256:${createHash("sha256").update(key).digest("base64").replace(/=+$/, "")}`;
  if (known.length) {
    const hint = `if you expected this change, remove the old key from ${file}`;
    return new UserError(`HOST KEY OF ${name} HAS CHANGED to ${print}: refusing to connect`, hint);
  }
  const hint = "check the fingerprint with the server's owner, then use --accept-new-host";
  if (!acceptNew) return new UserError(`Unknown host ${name}, key fingerprint ${print}`, hint);
  const type = key.subarray(4, 4 + key.readUInt32BE(0)).toString();
  Deno.mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  Deno.writeTextFileSync(file, `${name} ${type} ${key.toString("base64")}\n`, { append: true });
  return null;
}

/** Authentication in order: -i (or IdentityFile), ssh-agent, default keys, then a password. */
function authMethods(remote: Remote, identity?: string): (() => Promise<object>)[] {
  const username = remote.user;
  const withKey = (file: string) => async () => {
    const key = readFileSync(file);
    const locked = ssh2.utils.parseKey(key) instanceof Error;
    const passphrase = locked ? await promptSecret(`Passphrase for ${file}: `) : undefined;
    return { type: "publickey", username, key, passphrase };
  };
  const agent = Deno.env.get("SSH_AUTH_SOCK");
  const password = async () =>
    Deno.env.get("NFREEZER_SSH_PASSWORD") ?? await promptSecret(`Password for ${username}: `);
  return [
    ...[identity ?? remote.identity].filter((file) => file !== undefined).map(withKey),
    ...(agent ? [() => Promise.resolve({ type: "agent", username, agent })] : []),
    ...SSH_DEFAULT_KEYS.map((key) => join(homedir(), ".ssh", key)).filter(existsSync).map(withKey),
    async () => ({ type: "password", username, password: await password() }),
  ];
}

async function connectSftp(remote: Remote, options: Options): Promise<Store> {
  const file = options["known-hosts"] ?? join(homedir(), ".ssh", "known_hosts");
  const name = remote.port === 22 ? remote.host : `[${remote.host}]:${remote.port}`;
  const socket = connect({ host: remote.host, port: remote.port });
  socket.setNoDelay(true); // ssh2 under Deno leaves Nagle on: ~44 ms per small request otherwise
  const [client, methods] = [new ssh2.Client(), authMethods(remote, options.identity)];
  let refusal: Error | null = null;
  const acceptNew = !!options["accept-new-host"];
  const ready = new Promise((done, reject) => client.once("ready", done).once("error", reject));
  client.connect({
    sock: socket,
    username: remote.user,
    algorithms: { cipher: SSH_CIPHERS }, // chacha20 is ~2x faster than AES-GCM in ssh2 on Deno
    hostVerifier: (key: Buffer) => !(refusal ??= hostKeyRefusal(file, name, key, acceptNew)),
    authHandler: (_methods: unknown, _partial: unknown, next: (method: object | false) => void) => {
      const tryNext = (): void => {
        const method = methods.shift(); // one that cannot be prepared (no terminal) is skipped
        return method ? void method().then(next, tryNext) : next(false);
      };
      tryNext();
    },
  });
  await ready.catch((error) => {
    socket.destroy();
    const denied = error.level === "client-authentication";
    if (denied) refusal ??= new UserError(`SSH authentication as ${remote.user}@${name} failed`);
    throw refusal ?? new UserError(`Cannot connect to ${name}: ${error.message}`);
  });
  client.on("error", () => {}); // later failures reach the pending SFTP calls through `lost`
  const sftp = await call<Untyped>(client, "sftp");
  sftp.lost = new Promise((_, reject) =>
    client.once("close", () => reject(new UserError(`The connection to ${name} was lost`)))
  );
  sftp.lost.catch(() => {}); // it only matters to calls still pending when it fails
  return makeStore(sftp, remote.path, () => client.end());
}

// ---- Backup -----------------------------------------------------------------------------------

type Log = { info(text: string): void; warn(text: string): void };
const isFsError = (error: unknown): error is Error =>
  Object.values(Deno.errors).some((type) => error instanceof type);

/** Walks root without following links; dotfiles included; sockets, fifos, devices skipped. */
function scanTree(root: string, excludes: string[], log: Log, failed: string[]): Entry[] {
  const entries: Entry[] = [];
  const visit = (path: string) => {
    try {
      const info = Deno.lstatSync(join(root, path));
      const entry = { path, mode: info.mode! & 0o7777, mtime: info.mtime!.getTime() };
      const target = info.isSymlink ? Deno.readLinkSync(join(root, path)) : undefined;
      if (info.isFile) return entries.push({ ...entry, type: "file", size: info.size });
      if (target !== undefined) return entries.push({ ...entry, type: "symlink", target });
      if (!info.isDirectory) return log.warn(`skipped ${path}: not a file, folder or symlink`);
      if (path) entries.push({ ...entry, type: "dir" });
      for (const { name } of Deno.readDirSync(join(root, path))) {
        const child = path ? `${path}/${name}` : name;
        if (!excludes.some((glob) => matchesGlob(child, glob) || matchesGlob(name, glob))) {
          visit(child);
        }
      }
    } catch (error) {
      if (!isFsError(error)) throw error;
      log.warn(`cannot read ${path || root}: ${error.message}`);
      failed.push(path || root);
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

/** Adds a snapshot of source. Only files whose size or mtime differ from the parent snapshot's
 * are read, and only chunks the repository lacks are stored, IN_FLIGHT at once (§4). */
async function backup(repo: Repo, source: string, excludes: string[], log: Log) {
  const root = resolve(source);
  const snapshots = await listSnapshots(repo);
  const parent = snapshots.findLast((item) => item.host === hostname() && item.source === root);
  const previous = new Map<string, Entry>();
  const known = new Set(parent?.manifest);
  for (const entry of parent ? await loadManifest(repo, parent) : []) {
    previous.set(entry.path, entry);
    entry.chunks?.forEach((id) => known.add(id));
  }
  const stats = { bytesRead: 0, chunksStored: 0, bytesStored: 0 };
  const uploads = inFlight(IN_FLIGHT);
  let count = 0;
  const upload = async (id: string, chunk: Bytes) => {
    if (await repo.store.exists(`data/${id}`)) return; // stored by an earlier, interrupted run
    await repo.store.write(`data/${id}`, await seal(repo.keys, `data/${id}`, chunk));
    stats.chunksStored++;
    stats.bytesStored += chunk.length;
  };
  const put = async (chunk: Bytes) => {
    const id = await chunkId(repo.keys, chunk);
    if (++count % COLLECT_EVERY === 0) collectGarbage();
    if (!known.has(id)) await uploads.add(upload(id, chunk));
    return known.add(id) && id;
  };
  const [failed, entries]: [string[], Entry[]] = [[], []];
  for (const entry of scanTree(root, excludes, log, failed)) {
    const old = previous.get(entry.path);
    if (entry.type !== "file") entries.push(entry);
    else if (old?.chunks && old.size === entry.size && old.mtime === entry.mtime) {
      entries.push({ ...entry, chunks: old.chunks });
    } else {
      const stored = await storeFile(join(root, entry.path), entry, put).catch((error) =>
        isFsError(error) ? log.warn(`cannot read ${entry.path}: ${error.message}`) : fail(error)
      );
      if (stored === null) log.warn(`skipped ${entry.path}: it kept changing while being read`);
      stats.bytesRead += stored?.size ?? 0;
      if (stored) entries.push(stored);
      else failed.push(entry.path);
    }
  }
  const packed = gzipSync(utf8(JSON.stringify(entries)));
  const manifest: string[] = [];
  for (let offset = 0; offset < packed.length; offset += CHUNK_BYTES) {
    manifest.push(await put(new Uint8Array(packed.subarray(offset, offset + CHUNK_BYTES))));
  }
  await uploads.drain(); // §6: every chunk is stored before a snapshot can refer to it
  const id = hex(random(8).buffer);
  const time = new Date().toISOString();
  const bytes = entries.reduce((sum, { size }) => sum + (size ?? 0), 0);
  const snapshot = { time, host: hostname(), source: root, parent: parent?.id, manifest, bytes };
  await putJson(repo, `snapshots/${id}`, { ...snapshot, files: entries.length });
  return { id, entries, failed, ...stats };
}

// ---- Restore ----------------------------------------------------------------------------------

/** True if path already is a regular file whose chunks have exactly the entry's ids. */
async function sameContent(keys: Keys, path: string, entry: Entry): Promise<boolean> {
  const info = await Deno.lstat(path).catch(() => null);
  if (!info?.isFile || info.size !== entry.size) return false;
  using file = await Deno.open(path);
  for (const [index, id] of entry.chunks!.entries()) {
    const chunk = new Uint8Array(Math.min(CHUNK_BYTES, entry.size! - index * CHUNK_BYTES));
    if (await readFull(file, chunk) < chunk.length) return false;
    if (await chunkId(keys, chunk) !== id) return false;
  }
  return true;
}

/** Writes verified chunks to a temporary file, renamed into place only once all of them passed. */
async function restoreFile(repo: Repo, path: string, temporary: string, entry: Entry) {
  if (await sameContent(repo.keys, path, entry)) return;
  using file = await Deno.open(temporary, { write: true, createNew: true, mode: 0o600 });
  const [ids, pending] = [entry.chunks!, [] as Promise<Bytes>[]];
  for (let next = 0; next < ids.length || pending.length;) {
    while (next < ids.length && pending.length < RESTORE_WINDOW) {
      pending.push(loadChunk(repo, ids[next++]));
      pending.at(-1)!.catch(() => {}); // awaited in order below; this only marks it handled
    }
    await writeAll(file, await pending.shift()!);
    if (next % COLLECT_EVERY === 0) collectGarbage();
  }
  await Deno.rename(temporary, path);
}

/** Restores into target: folders, files, links, then modes and times (deepest first). */
async function restore(repo: Repo, target: string, includes: string[], log: Log, id?: string) {
  const snapshot = await findSnapshot(repo, id);
  const wanted = (path: string) =>
    !includes.length ||
    includes.some((prefix) => `${path}/`.startsWith(`${prefix.replace(/\/+$/, "")}/`));
  const entries = (await loadManifest(repo, snapshot)).filter((entry) => wanted(entry.path));
  if (!entries.length && includes.length) throw new UserError("No path matches --include");
  const failed = new Map<string, Error>();
  const attempt = async (entry: Entry) => {
    const path = join(target, entry.path);
    const temporary = join(dirname(path), `.${basename(path)}.nfreezer-${hex(random(4).buffer)}`);
    try {
      await Deno.mkdir(entry.type === "dir" ? path : dirname(path), { recursive: true });
      if (entry.type === "file") await restoreFile(repo, path, temporary, entry);
      if (entry.type !== "symlink" || await Deno.readLink(path).catch(() => "") === entry.target) {
        return;
      }
      await Deno.symlink(entry.target!, temporary);
      await Deno.rename(temporary, path);
    } catch (error) {
      if (!(error instanceof UserError || isFsError(error))) throw error;
      await Deno.remove(temporary).catch(() => {});
      log.warn(`cannot restore ${entry.path}: ${error.message}`);
      failed.set(entry.path, error);
    }
  };
  const files = inFlight(IN_FLIGHT); // links come last: none can redirect a file being written
  const ofType = (type: string) => entries.filter((entry) => entry.type === type);
  for (const entry of ofType("dir")) await attempt(entry);
  for (const entry of ofType("file")) await files.add(attempt(entry));
  await files.drain();
  for (const entry of ofType("symlink")) await attempt(entry);
  for (const entry of entries.toReversed().filter((entry) => !failed.has(entry.path))) {
    if (entry.type !== "symlink") await Deno.chmod(join(target, entry.path), entry.mode);
    await lutimes(join(target, entry.path), new Date(entry.mtime), new Date(entry.mtime));
  }
  const message = `${failed.size} of ${entries.length} paths could not be restored (see above)`;
  const tampered = [...failed.values()].some((error) => error instanceof IntegrityError);
  if (failed.size) throw tampered ? new IntegrityError(message) : new UserError(message);
  return { snapshot, entries };
}

// ---- Command line -----------------------------------------------------------------------------

const USAGE = `Usage: deno run -A nfreezer.ts <command> ...    (nfreezer: encrypted backups)
  init      <repo>                create an empty repository (backup also creates one)
  backup    <source-dir> <repo>   add a snapshot of source-dir  [--exclude GLOB]...
  restore   <repo> <target-dir>   restore a snapshot            [--snapshot ID] [--include PATH]...
  snapshots <repo>                list the snapshots            [--json]
<repo>: /local/path, ./relative/path, user@host:/path or sftp://user@host[:port]/path.
--snapshot ID takes a unique prefix of an id; the default is the newest snapshot.

Options:
  --password-file FILE  read the passphrase from FILE (else $NFREEZER_PASSWORD, else a prompt)
  -i, --identity FILE   SSH private key (else ssh-agent, ~/.ssh/id_ed25519, id_ecdsa, id_rsa,
                        else a password from $NFREEZER_SSH_PASSWORD or a prompt)
  --known-hosts FILE    SSH known hosts file (default ~/.ssh/known_hosts)
  --accept-new-host     trust and remember the key of a host not yet in known_hosts
  -q, --quiet           print only warnings and errors
  -h, --help            show this help
Exit codes: 0 ok, 1 error, 2 usage error, 3 integrity error (tampered or missing data)`;
const OPTIONS = {
  "password-file": { type: "string" },
  identity: { type: "string", short: "i" },
  "known-hosts": { type: "string" },
  "accept-new-host": { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  help: { type: "boolean", short: "h" },
  exclude: { type: "string", multiple: true },
  snapshot: { type: "string" },
  include: { type: "string", multiple: true },
  json: { type: "boolean" },
} as const;
type Options = ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>["values"];

/** Reads a line from the terminal without echoing it. */
async function promptSecret(question: string): Promise<string> {
  const what = question.replace(/: $/, "");
  if (!Deno.stdin.isTerminal()) throw new UserError(`${what} needed, but no terminal to ask`);
  Deno.stderr.writeSync(utf8(question));
  Deno.stdin.setRaw(true);
  const [bytes, byte] = [[] as number[], new Uint8Array(1)];
  try {
    while (await Deno.stdin.read(byte) && byte[0] !== 13 && byte[0] !== 10) {
      if (byte[0] === 3) throw new UserError("Interrupted");
      if (byte[0] === 127) bytes.pop();
      else bytes.push(byte[0]);
    }
  } finally {
    Deno.stdin.setRaw(false);
    Deno.stderr.writeSync(utf8("\n"));
  }
  return new TextDecoder().decode(Uint8Array.from(bytes));
}

/** The passphrase from --password-file, else $NFREEZER_PASSWORD, else asked (twice if new). */
async function getPassphrase(options: Options, creating: boolean): Promise<string> {
  const file = options["password-file"];
  const given = file
    ? Deno.readTextFileSync(file).replace(/\r?\n$/, "")
    : Deno.env.get("NFREEZER_PASSWORD");
  const passphrase = given ?? await promptSecret("Repository passphrase: ");
  const again = given === undefined && creating ? await promptSecret("Repeat it: ") : passphrase;
  if (passphrase !== again) throw new UserError("The passphrases differ");
  return passphrase || fail(new UserError("The passphrase is empty"));
}

/** Opens the repository at location; init and backup create it if there is none. */
async function openRepo(location: string, options: Options, create: boolean): Promise<Repo> {
  const remote = parseRemote(location);
  const store = remote
    ? await connectSftp(remote, options)
    : makeStore(LOCAL_FILES, resolve(location));
  try {
    if (await store.exists("config")) {
      const config = new TextDecoder().decode(await store.read("config"));
      return { store, keys: await unlockConfig(config, await getPassphrase(options, false)) };
    }
    if (!create) throw new UserError(`No repository at ${location}`, "create one with init");
    if ((await store.list("")).length) throw new UserError(`${location} is not empty`);
    const { config, keys } = await createConfig(await getPassphrase(options, true));
    await store.makeFolders();
    await store.write("config", [utf8(config)]);
    return { store, keys };
  } catch (error) {
    store.close();
    throw error;
  }
}

type Command = (repo: Repo, args: string[], options: Options, log: Log) => Promise<unknown>;
const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const COMMANDS: Record<string, Command> = {
  init: (_repo, [location], _options, log) => Promise.resolve(log.info(`Created ${location}`)),
  async backup(repo, [source], options, log) {
    const done = await withLock(repo, () => backup(repo, source, options.exclude ?? [], log));
    const stored = `${done.chunksStored} new chunks (${mib(done.bytesStored)})`;
    log.info(
      `Snapshot ${done.id}: ${done.entries.length} entries, ${mib(done.bytesRead)} read, ${stored}`,
    );
    if (done.failed.length) {
      throw new UserError(`${done.failed.length} paths could not be backed up (see above)`);
    }
  },
  async restore(repo, [, target], options, log) {
    const done = await restore(repo, resolve(target), options.include ?? [], log, options.snapshot);
    log.info(`Restored snapshot ${done.snapshot.id}: ${done.entries.length} entries`);
  },
  async snapshots(repo, _args, options, log) {
    const snapshots = await listSnapshots(repo);
    if (options.json) return console.log(JSON.stringify(snapshots, null, 2));
    for (const { id, time, host, source, files, bytes } of snapshots) {
      log.info(`${id}  ${time}  ${host}:${source}  ${files} entries, ${mib(bytes)}`);
    }
  },
};

/** A command's USAGE line is its spec: the <arguments> it takes and the [--options] it adds. */
async function runCli(argv: string[]): Promise<void> {
  process.umask(0o077); // safe default: what this process creates is private to the user
  const parsed = (() => {
    try {
      return parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
    } catch (error) {
      throw new UsageError((error as Error).message, "see nfreezer --help");
    }
  })();
  const { values: options, positionals: [name, ...args] } = parsed;
  const line = USAGE.split("\n").find((text) => COMMANDS[name] && text.startsWith(`  ${name} `));
  if (!line && (options.help || !name)) return console.log(USAGE);
  if (!line) throw new UsageError(`Unknown command ${name}`, "see nfreezer --help");
  const usage = `usage: deno run -A nfreezer.ts ${line.trim()}`;
  if (options.help) return console.log(`${usage}\n\n${USAGE.slice(USAGE.indexOf("Options:"))}`);
  const wanted = line.match(/<[^>]+>/g)!;
  const own = ["exclude", "snapshot", "include", "json"].filter((key) => key in options);
  const foreign = own.find((key) => !line.includes(`[--${key}`));
  if (foreign) throw new UsageError(`${name} does not take --${foreign}`, usage);
  if (args.length !== wanted.length) {
    throw new UsageError(`${name} takes ${wanted.join(" ")}`, usage);
  }
  const log = {
    info: (text: string) => options.quiet || console.log(text),
    warn: (text: string) => console.error(`nfreezer: warning: ${text}`),
  };
  const create = ["init", "backup"].includes(name);
  const source = name === "backup" && Deno.statSync(args[0]); // checked before a repository is made
  if (source && !source.isDirectory) throw new UserError(`${args[0]} is not a folder`);
  const repo = await openRepo(args[wanted.indexOf("<repo>")], options, create);
  await COMMANDS[name](repo, args, options, log).finally(() => repo.store.close());
}

/** Runs the command line and returns the exit code; errors that are not ours keep their stack. */
export async function main(argv: string[]): Promise<number> {
  try {
    await runCli(argv);
    return 0;
  } catch (error) {
    if (!(error instanceof UserError || isFsError(error))) throw error;
    console.error(`nfreezer: error: ${error.message}`);
    if (error instanceof UserError && error.hint) console.error(`nfreezer: hint: ${error.hint}`);
    return error instanceof UserError ? error.exitCode : 1;
  }
}

export { chunkId, openRepo, putJson, seal }; // for the tests, which forge hostile snapshots

if (import.meta.main) Deno.exit(await main(Deno.args));
