#!/usr/bin/env bash
# Side-by-side benchmark over a throwaway OpenSSH sshd on 127.0.0.1: nfreezer.ts against raw `sftp`
# put/get, restic, rclone crypt and borg (each when installed: apt-get install restic rclone
# borgbackup). Same data, same server, tools alternated within each run; prints a markdown table
# of medians (backup, no-op re-run, restore, peak RSS) and the ratios nfreezer / restic.
#   bench/run.sh big [SIZE_MIB=1024] [RUNS=3]   SIZE_MIB of random bytes in 16 files, loopback
#   bench/run.sh small [RUNS=1]                 6,500 files of 100 B-64 KiB (~63 MiB) in 343
#                                               folders (make_small_tree.py), every SSH connection
#                                               through delay_proxy.py: +10 ms each way = 20 ms RTT
# (bench/run.sh SIZE_MIB [RUNS], the old form, is the big case.) One small run takes ~35 min on
# 2 cores, mostly sftp (~17 min: one file at a time) and rclone (~15 min); restic and nfreezer
# (at e2733cf) under a minute each: TOOLS="nfreezer restic" bench/run.sh small 3 for quick comparisons.
# Peak RSS is GNU time's %M: the largest resident set of the tool's process tree (the tool itself,
# or the ssh/sftp child it spawns if that is larger), not their sum. Every restore is checked
# with diff -r against the source, so a broken tool cannot look fast; a failing tool is reported
# and left out of the run. NFREEZER_TS=path benchmarks another nfreezer.ts (default: this repo's);
# TOOLS="nfreezer restic" picks the tools (default: nfreezer, sftp and each one installed).
set -euo pipefail
[[ ${1:-} =~ ^[0-9]+$ ]] && set -- big "$@"
CASE=${1:-big}
case $CASE in
  big) SIZE_MIB=${2:-1024} RUNS=${3:-3} ;;
  small) RUNS=${2:-1} ;;
  *) echo "usage: $0 big [SIZE_MIB] [RUNS] | small [RUNS]" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nfreezer-bench.XXXXXX") # TMPDIR=/dev/shm: no disk in the timings
SSHD_PID='' PROXY_PID=''
trap 'kill $SSHD_PID $PROXY_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
trap 'echo "$0: line $LINENO failed" >&2' ERR
USER_NAME=$(id -un)
export NFREEZER_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench SSH_AUTH_SOCK= \
  RESTIC_CACHE_DIR=$WORK/cache/restic BORG_BASE_DIR=$WORK/cache/borg
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }

# A throwaway sshd on a free loopback port, as in the tests.
ssh-keygen -q -t ed25519 -N "" -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/user_key"
cp "$WORK/user_key.pub" "$WORK/authorized_keys"
SSHD_PORT=$(free_port)
mkdir -p /run/sshd
cat >"$WORK/sshd_config" <<EOF
Port $SSHD_PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
StrictModes no
PidFile none
UsePAM no
PasswordAuthentication no
Subsystem sftp internal-sftp
MaxStartups 100
LogLevel ERROR
EOF
/usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
SSHD_PID=$!
wait_port "$SSHD_PORT"
PORT=$SSHD_PORT # the port every tool connects to
if [ "$CASE" = small ]; then # the small case goes through the delay proxy
  PORT=$(free_port)
  python3 "$HERE/bench/delay_proxy.py" "$PORT" "$SSHD_PORT" 10 &
  PROXY_PID=$!
  wait_port "$PORT"
fi
for port in "$SSHD_PORT" "$PORT"; do
  echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$WORK/host_key.pub")" >>"$WORK/known_hosts"
done
SSH_OPTS="-i $WORK/user_key -p $PORT -o UserKnownHostsFile=$WORK/known_hosts -o BatchMode=yes"
SFTP_OPTS="-i $WORK/user_key -P $PORT -o UserKnownHostsFile=$WORK/known_hosts -o BatchMode=yes"

mkdir -p "$WORK/data"
if [ "$CASE" = big ]; then # incompressible data: 16 files
  for i in $(seq 1 16); do head -c "$((SIZE_MIB * 1024 * 1024 / 16))" /dev/urandom >"$WORK/data/file$i.bin"; done
  echo "case big: $SIZE_MIB MiB in 16 files; $RUNS runs per tool; sshd on 127.0.0.1:$PORT (loopback)"
else
  echo "case small: $(python3 "$HERE/bench/make_small_tree.py" "$WORK/data" 1 6500);" \
    "$RUNS runs per tool; sshd behind a 10 ms each-way delay proxy on 127.0.0.1:$PORT"
fi
MARKER=$(cd "$WORK/data" && find . -type f | sort | awk 'NR == 1' | cut -c3-) # locates restored trees

NFREEZER_TS=${NFREEZER_TS:-$HERE/nfreezer.ts}
deno cache --quiet "$NFREEZER_TS"
# nfreezer runs as its first line runs it (./nfreezer.ts, and the compiled binary): with its V8 flags
NF="deno run -A $(head -1 "$NFREEZER_TS" | grep -o -- '--v8-flags=[^ ]*' || true) $NFREEZER_TS"
NF_REPO="sftp://$USER_NAME@127.0.0.1:$PORT$WORK/remote/nfreezer"
NF_OPTS="-i $WORK/user_key --known-hosts $WORK/known_hosts"
touch "$WORK/rclone.conf"
export RCLONE_CONFIG=$WORK/rclone.conf RCLONE_CONFIG_R_TYPE=sftp RCLONE_CONFIG_R_HOST=127.0.0.1 \
  RCLONE_CONFIG_R_PORT=$PORT RCLONE_CONFIG_R_USER=$USER_NAME RCLONE_CONFIG_R_KEY_FILE=$WORK/user_key \
  RCLONE_CONFIG_R_KNOWN_HOSTS_FILE=$WORK/known_hosts RCLONE_CONFIG_C_TYPE=crypt \
  RCLONE_CONFIG_C_REMOTE="r:$WORK/remote/rclone"
command -v rclone >/dev/null && RCLONE_CONFIG_C_PASSWORD=$(rclone obscure bench) && export RCLONE_CONFIG_C_PASSWORD
RESTIC_REPO="sftp:$USER_NAME@127.0.0.1:$WORK/remote/restic"
RESTIC_SSH="ssh $SSH_OPTS $USER_NAME@127.0.0.1 -s sftp"
export BORG_RSH="ssh $SSH_OPTS" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
BORG_REPO="ssh://$USER_NAME@127.0.0.1:$PORT$WORK/remote/borg"

tools=(nfreezer sftp)
command -v restic >/dev/null && tools+=(restic)
command -v rclone >/dev/null && tools+=(rclone)
command -v borg >/dev/null && tools+=(borg)
[ -z "${TOOLS:-}" ] || read -ra tools <<<"$TOOLS" # e.g. TOOLS="restic rclone" bench/run.sh small

fresh() { rm -rf "$WORK/remote" "$WORK/out" "$WORK/cache"; mkdir -p "$WORK/remote"; }
# The repositories are on this machine, so "does it exist yet" is a local test, not a tool run.
backup() {
  case $1 in
    nfreezer) [ -e "$WORK/remote/nfreezer/config" ] || $NF init "$NF_REPO" $NF_OPTS >/dev/null
      $NF backup "$WORK/data" "$NF_REPO" $NF_OPTS >/dev/null 2>&1 ;;
    sftp) { [ -d "$WORK/remote/sftp" ] || echo "mkdir $WORK/remote/sftp"
      echo "put -r $WORK/data $WORK/remote/sftp"; } |
      sftp -q -b - $SFTP_OPTS "$USER_NAME@127.0.0.1" >/dev/null ;;
    restic) [ -e "$WORK/remote/restic/config" ] ||
      restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" init >/dev/null
      restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" backup "$WORK/data" >/dev/null ;;
    rclone) rclone copy "$WORK/data" c:data ;;
    borg) [ -d "$WORK/remote/borg" ] || borg init -e repokey "$BORG_REPO" >/dev/null 2>&1
      echo "run$(date +%s%N)" >"$WORK/borg-last"
      borg create "$BORG_REPO::$(cat "$WORK/borg-last")" "$WORK/data" ;;
  esac
}
restore() {
  case $1 in
    nfreezer) $NF restore "$NF_REPO" "$WORK/out" $NF_OPTS >/dev/null 2>&1 ;;
    sftp) printf 'get -r %s %s\n' "$WORK/remote/sftp" "$WORK/out" |
      sftp -q -b - $SFTP_OPTS "$USER_NAME@127.0.0.1" >/dev/null ;;
    restic) restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" restore latest --target "$WORK/out" >/dev/null ;;
    rclone) rclone copy c:data "$WORK/out" ;;
    borg) (mkdir -p "$WORK/out" && cd "$WORK/out" && borg extract "$BORG_REPO::$(cat "$WORK/borg-last")") ;;
  esac
}
export -f backup restore
export WORK NF NF_REPO NF_OPTS SFTP_OPTS USER_NAME RESTIC_REPO RESTIC_SSH BORG_REPO
# measure TOOL PHASE COMMAND...: appends the wall seconds to results[TOOL:PHASE] and keeps the
# largest peak RSS (KiB) of this run's phases in rss; fails if the command does.
measure() {
  local tool=$1 phase=$2 start status=0
  shift 2
  start=$(date +%s.%N)
  /usr/bin/time -f %M -o "$WORK/rss" bash -c 'set -euo pipefail; "$@"' _ "$@" || status=$?
  results[$tool:$phase]+=" $(echo "$(date +%s.%N) - $start" | bc)"
  rss=$(( $(tail -1 "$WORK/rss") > rss ? $(tail -1 "$WORK/rss") : rss ))
  [ "$status" = 0 ] || { echo "$tool: $phase failed (exit $status)" >&2; return 1; }
}
# The restored copy of the data: wherever the tool put it, the folder that holds MARKER.
restored() { local hit; hit=$(find "$WORK/out" -path "*/$MARKER" -print -quit); echo "${hit%/"$MARKER"}"; }

declare -A results failed
for run in $(seq 1 "$RUNS"); do
  for tool in "${tools[@]}"; do
    [ -z "${failed[$tool]:-}" ] || continue
    fresh
    rss=0
    # sftp's no-op re-run re-sends everything, as slow as its backup: not repeated in the small case
    if measure "$tool" backup backup "$tool" &&
      { [ "$CASE:$tool" = small:sftp ] || measure "$tool" rerun backup "$tool"; } &&
      measure "$tool" restore restore "$tool"; then
      results[$tool:rss]+=" $(echo "$rss / 1024" | bc -l)"
      out=$(restored)
      [ -n "$out" ] && diff -rq "$WORK/data" "$out" >&2 ||
        { echo "$tool: restored tree differs from the source" >&2; failed[$tool]=1; }
    else
      failed[$tool]=1
    fi
    echo "run $run/$RUNS $tool done$([ -n "${failed[$tool]:-}" ] && echo ": FAILED, left out")" >&2
  done
done

median() { tr ' ' '\n' | awk NF | sort -n | awk '{a[NR]=$1} END {if (NR) print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
phases=(backup rerun restore rss)
echo
echo "| tool | backup s | no-op s | restore s | peak RSS MiB |"
echo "|---|---:|---:|---:|---:|"
for tool in "${tools[@]}"; do
  line="| $tool"
  for phase in "${phases[@]}"; do
    value=$(echo "${results[$tool:$phase]:-}" | median)
    if [ -n "${failed[$tool]:-}" ]; then line+=" | failed"
    elif [ -z "$value" ]; then line+=" | -"
    else line+=$(printf ' | %.2f' "$value"); fi
  done
  echo "$line |"
done
line="| **nfreezer / restic**"
for phase in "${phases[@]}"; do
  nf=$(echo "${results[nfreezer:$phase]:-}" | median) restic=$(echo "${results[restic:$phase]:-}" | median)
  if [ -n "${failed[nfreezer]:-}${failed[restic]:-}" ] || [ -z "$nf" ] || [ -z "$restic" ]; then
    line+=" | n/a"
  else line+=$(printf ' | %.2fx' "$(echo "$nf / $restic" | bc -l)"); fi
done
echo "$line |"
echo
echo "Medians of $RUNS run(s). no-op = the same backup again, nothing changed (sftp has no notion of"
echo "unchanged files: it re-sends everything; not repeated in the small case). Peak RSS = GNU time"
echo "%M, the largest single process of the tool's tree (for tools that spawn ssh, usually the tool"
echo "itself), max over the phases."
