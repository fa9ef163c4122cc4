#!/usr/bin/env bash
# Side-by-side benchmark over a loopback OpenSSH sshd: nfreezer.ts against raw `sftp` put/get,
# restic, rclone crypt and borg (each when installed: apt-get install restic rclone borgbackup).
# Same data, same server, runs alternated between tools; prints medians and ratios to nfreezer.
#   bench/run.sh [SIZE_MIB=1024] [RUNS=3]
set -euo pipefail
SIZE_MIB=${1:-1024}
RUNS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/nfreezer-bench.XXXXXX)
trap 'kill "$SSHD_PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
USER_NAME=$(id -un)
export NFREEZER_PASSWORD=bench RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench SSH_AUTH_SOCK=

# A throwaway sshd on a free loopback port, as in the tests.
ssh-keygen -q -t ed25519 -N "" -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/user_key"
cp "$WORK/user_key.pub" "$WORK/authorized_keys"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p /run/sshd
cat >"$WORK/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
StrictModes no
PidFile none
UsePAM no
PasswordAuthentication no
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
/usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2>"$WORK/sshd.log" &
SSHD_PID=$!
sleep 0.5
echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$WORK/host_key.pub")" >"$WORK/known_hosts"
SSH_OPTS="-i $WORK/user_key -p $PORT -o UserKnownHostsFile=$WORK/known_hosts -o BatchMode=yes"
SFTP_OPTS="-i $WORK/user_key -P $PORT -o UserKnownHostsFile=$WORK/known_hosts -o BatchMode=yes"

# Incompressible data: 16 files.
mkdir -p "$WORK/data"
for i in $(seq 1 16); do head -c "$((SIZE_MIB * 1024 * 1024 / 16))" /dev/urandom >"$WORK/data/file$i.bin"; done
echo "data: $SIZE_MIB MiB in 16 files; $RUNS runs per tool; sshd on 127.0.0.1:$PORT"

deno cache --quiet "$HERE/nfreezer.ts"
NF="deno run -A $HERE/nfreezer.ts"
NF_REPO="sftp://$USER_NAME@127.0.0.1:$PORT$WORK/remote/nfreezer"
NF_OPTS="-q -i $WORK/user_key --known-hosts $WORK/known_hosts"
export RCLONE_CONFIG_R_TYPE=sftp RCLONE_CONFIG_R_HOST=127.0.0.1 RCLONE_CONFIG_R_PORT=$PORT \
  RCLONE_CONFIG_R_USER=$USER_NAME RCLONE_CONFIG_R_KEY_FILE=$WORK/user_key \
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

fresh() { rm -rf "$WORK/remote" "$WORK/out"; mkdir -p "$WORK/remote"; }
backup() {
  case $1 in
    nfreezer) $NF backup "$WORK/data" "$NF_REPO" $NF_OPTS ;;
    sftp) printf -- '-mkdir %s\nput -r %s %s\n' "$WORK/remote/sftp" "$WORK/data" "$WORK/remote/sftp" |
      sftp -q -b - $SFTP_OPTS "$USER_NAME@127.0.0.1" >/dev/null ;;
    restic) restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" snapshots >/dev/null 2>&1 ||
      restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" init >/dev/null
      restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" backup "$WORK/data" >/dev/null ;;
    rclone) rclone copy "$WORK/data" c:data ;;
    borg) borg info "$BORG_REPO" >/dev/null 2>&1 || borg init -e repokey "$BORG_REPO" >/dev/null 2>&1
      echo "run$(date +%s%N)" >"$WORK/borg-last"
      borg create "$BORG_REPO::$(cat "$WORK/borg-last")" "$WORK/data" ;;
  esac
}
restore() {
  case $1 in
    nfreezer) $NF restore "$NF_REPO" "$WORK/out" $NF_OPTS ;;
    sftp) printf 'get -r %s %s\n' "$WORK/remote/sftp" "$WORK/out" |
      sftp -q -b - $SFTP_OPTS "$USER_NAME@127.0.0.1" >/dev/null ;;
    restic) restic -q -r "$RESTIC_REPO" -o sftp.command="$RESTIC_SSH" restore latest --target "$WORK/out" >/dev/null ;;
    rclone) rclone copy c:data "$WORK/out" ;;
    borg) (mkdir -p "$WORK/out" && cd "$WORK/out" && borg extract "$BORG_REPO::$(cat "$WORK/borg-last")") ;;
  esac
}
seconds() { local start=$(date +%s.%N); "$@"; echo "$(date +%s.%N) - $start" | bc; }

declare -A results
for run in $(seq 1 "$RUNS"); do
  for tool in "${tools[@]}"; do
    fresh
    results[$tool:backup]+=" $(seconds backup "$tool")"
    results[$tool:rerun]+=" $(seconds backup "$tool")"
    results[$tool:restore]+=" $(seconds restore "$tool")"
    cmp -s "$WORK/data/file7.bin" "$(find "$WORK/out" -name file7.bin | head -1)" || { echo "$tool restored wrong bytes"; exit 1; }
  done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf '\n%-10s %12s %12s %12s   (median seconds; ratio = tool / nfreezer)\n' tool backup "no-op rerun" restore
for tool in "${tools[@]}"; do
  line=$(printf '%-10s' "$tool")
  for phase in backup rerun restore; do
    value=$(echo "${results[$tool:$phase]}" | median)
    base=$(echo "${results[nfreezer:$phase]}" | median)
    line+=$(printf ' %6.2f (%4.2fx)' "$value" "$(echo "$value / $base" | bc -l)")
  done
  echo "$line"
done
echo "(sftp 'no-op rerun' re-sends everything: it has no notion of unchanged files)"
