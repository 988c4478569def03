#!/usr/bin/env bash
# Bring up a one-node Slurm on loopback (127.0.0.1): install Debian's slurm-wlm daemons and munge
# when missing, write slurm.conf, start munged, slurmctld and slurmd, and wait until the node is
# idle. Idempotent: installs only what is missing, starts only what is not running, and leaves an
# already working Slurm (a real cluster, or a second run of this script) alone.
#
#   bash launch/slurm_local/start.sh        (or: make slurm-up)
#
# Needs root or passwordless sudo, and apt (Debian/Ubuntu). Environment knobs:
#   SLURM_LOCAL_STATE   state and spool folder      (default /var/spool/slurm-loopback)
#   SLURM_LOCAL_LOGS    daemon logs                 (default /var/log/slurm)
#   SLURM_LOCAL_CPUS    CPUs the node offers        (default: nproc)
#   SLURM_LOCAL_WAIT_S  how long to wait for idle   (default 60)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
STATE="${SLURM_LOCAL_STATE:-/var/spool/slurm-loopback}"
LOGS="${SLURM_LOCAL_LOGS:-/var/log/slurm}"
CPUS="${SLURM_LOCAL_CPUS:-$(nproc)}"
WAIT_S="${SLURM_LOCAL_WAIT_S:-60}"
HOST="$(hostname -s)"
CONF=/etc/slurm/slurm.conf
MARK="written by launch/slurm_local/start.sh"

say() { echo "[slurm-up] $*"; }
die() { echo "[slurm-up] error: $*" >&2; exit 1; }

if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  die "needs root or passwordless sudo (to install packages and start daemons)"
fi
as_root() { "${SUDO[@]}" "$@"; }

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }

# 0. A Slurm we did not configure (a real cluster) that answers with a usable node is left alone.
if command -v sinfo >/dev/null && ! grep -qs "$MARK" "$CONF" && scontrol ping 2>/dev/null | grep -q "is UP"; then
  case "$(sinfo -h -o %T 2>/dev/null | head -n1)" in
    idle*|mixed*|allocated*|completing*)
      say "Slurm is already up: $(sinfo -h -o '%P %D %T' | head -n1)"; exit 0 ;;
  esac
fi

# 1. Packages (the daemons, the client commands, munge), only when missing.
need_install=0
for cmd in munged slurmctld slurmd sbatch srun scontrol sinfo; do
  command -v "$cmd" >/dev/null || need_install=1
done
if [ "$need_install" = 1 ]; then
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing: install slurm-wlm and munge yourself"
  pkgs=(slurmctld slurmd slurm-client munge)
  say "installing ${pkgs[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! as_root apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/tmp/slurm-up-apt.log 2>&1; then
    as_root apt-get update -q >>/tmp/slurm-up-apt.log 2>&1 || true
    as_root apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>/tmp/slurm-up-apt.log 2>&1 \
      || { tail -n 20 /tmp/slurm-up-apt.log >&2; die "apt-get install ${pkgs[*]} failed (log: /tmp/slurm-up-apt.log)"; }
  fi
fi

# 2. munge: a key, its folders, the daemon.
as_root mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  say "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null; then
    as_root mungekey --create --keyfile=/etc/munge/munge.key
  else
    as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
if id munge >/dev/null 2>&1; then
  as_root chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
fi
as_root chmod 0700 /etc/munge
as_root chmod 0400 /etc/munge/munge.key
as_root chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running"
else
  say "starting munged"
  if id munge >/dev/null 2>&1; then
    as_root runuser -u munge -- munged 2>/dev/null || as_root munged --force
  else
    as_root munged --force
  fi
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# 3. slurm.conf (ours only: a slurm.conf written by someone else is never overwritten).
as_root mkdir -p "$STATE/slurmctld" "$STATE/slurmd" "$LOGS" /etc/slurm
conf_text="$(sed -e "s|@HOST@|$HOST|g" -e "s|@CPUS@|$CPUS|g" -e "s|@STATE@|$STATE|g" -e "s|@LOGS@|$LOGS|g" \
  "$here/slurm.conf.in" | sed -e "1s|^.*$|# $MARK (one node on loopback)|")"
if [ -f "$CONF" ] && ! grep -q "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; not touching it (move it away to use the loopback Slurm)"
fi
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$conf_text" ]; then
  if scontrol ping 2>/dev/null | grep -q "is UP"; then
    say "slurm.conf changes: stopping the running daemons first (scontrol shutdown)"
    as_root scontrol shutdown || true
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" || break; sleep 0.2; done
    for _ in $(seq 50); do [ -f "$STATE/slurmd.pid" ] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null || break; sleep 0.2; done
  fi
  say "writing $CONF (node $HOST, $CPUS CPUs, partition debug)"
  printf '%s\n' "$conf_text" | as_root tee "$CONF" >/dev/null
fi

# 4. The daemons (they daemonise themselves).
if scontrol ping 2>/dev/null | grep -q "is UP"; then
  say "slurmctld already running"
else
  say "starting slurmctld"
  as_root slurmctld
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
  scontrol ping | grep -q "is UP" || { tail -n 20 "$LOGS/slurmctld.log" >&2 || true; die "slurmctld does not answer"; }
fi
if [ -f "$STATE/slurmd.pid" ] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; then
  say "slurmd already running"
else
  say "starting slurmd"
  as_root slurmd
fi

# 5. Wait until the node takes jobs.
deadline=$((SECONDS + WAIT_S))
while :; do
  state="$(node_state)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    down|drained|draining|drain|fail|failing)
      as_root scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$LOGS/slurmd.log" >&2 || true; die "node $HOST is '$state' after ${WAIT_S}s"; }
  sleep 0.5
done
say "Slurm is up: $(sinfo -h -o '%P %D %T %c' | head -n1) (partition, nodes, state, CPUs)"
