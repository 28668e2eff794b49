#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for CI and the slurm tests.
#   bash scripts/slurm_cluster.sh start    # install (once), configure, start, wait until both nodes are up
#   bash scripts/slurm_cluster.sh status   # sinfo
#   bash scripts/slurm_cluster.sh stop     # stop the daemons by the PIDs in their pid files
# Runs as root on Debian 12 without systemd. `start` is idempotent: with the cluster
# already up and the same slurm.conf it does nothing. node1 and node2 are two slurmd
# processes on 127.0.0.1 (ports 17001/17002), each claiming NODE_CPUS CPUs whatever the
# hardware has (SlurmdParameters=config_overrides).
#
# Environment: SAMPLEDKD_SLURM_DIR (state, logs, pids; default /tmp/sampledkd-slurm),
# SLURM_CONF (default /etc/slurm/slurm.conf), NODE_CPUS (2), NODE_MEM_MB (8192),
# SLURM_START_TIMEOUT (60 s).
set -Eeuo pipefail

DIR=${SAMPLEDKD_SLURM_DIR:-/tmp/sampledkd-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
NODE_CPUS=${NODE_CPUS:-2}
NODE_MEM_MB=${NODE_MEM_MB:-8192}
TIMEOUT=${SLURM_START_TIMEOUT:-60}
NODES=(node1 node2)
MARKER="# Written by SampledKD scripts/slurm_cluster.sh"
MUNGE_PID=/run/munge/munged.pid

log() { echo "[slurm_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Files that may vanish (a /proc entry, a stale pid file) are read with `read`, never with
# `$(<file)`: under `set -e`, bash 5.2 exits the whole script when `$(<file)` cannot open
# its file, whatever `||` follows (a stale munged.pid left by an earlier boot did that in CI).
# read_file FILE VAR: VAR = first line of FILE; status 1 when FILE cannot be read.
read_file() {
  { IFS= read -r "$2" <"$1"; } 2>/dev/null
}

# running PID: the process exists and is not a zombie (daemons are reparented to a
# PID 1 that may reap them late, and a zombie keeps its /proc entry).
running() {
  local stat
  read_file "/proc/$1/stat" stat || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# alive PIDFILE NAME: the pid file names a running process whose command is NAME.
alive() {
  local pid comm
  read_file "$1" pid && [[ -n $pid ]] || return 1
  running "$pid" && read_file "/proc/$pid/comm" comm && [[ $comm == "$2" ]]
}

# on_error: say which command failed and show the daemons' logs (they log to files, not
# to this terminal, so a daemon that refuses to start would otherwise fail silently).
on_error() {
  local rc=$? f
  log "ERROR: '$BASH_COMMAND' failed (exit $rc, line ${BASH_LINENO[0]})"
  for f in /var/log/munge/munged.log "$DIR/slurmctld.log" "$DIR/node1/slurmd.log" "$DIR/node2/slurmd.log"; do
    [[ -f $f ]] && { echo "----- tail $f" >&2; tail -n 15 "$f" >&2; }
  done
  exit "$rc"
}
trap on_error ERR

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sinfo >/dev/null || missing+=(slurm-client)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}) and not root: run as root"
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  # A munged that answers (ours, or one whose pid file went stale) is all slurm needs.
  if alive "$MUNGE_PID" munged || munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    # 1024 random bytes, readable only by munge (munged refuses a looser key).
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged
  touch "$DIR/munged.ours"  # `stop` only stops a munged this script started
  munge -n | unmunge >/dev/null || die "munge credential round-trip failed (see /var/log/munge/munged.log)"
}

write_conf() {
  local host tmp
  host=$(hostname -s)
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARKER (state in $DIR).
ClusterName=sampledkd
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Job credentials live 30 s, not 120: a requeued job waits this long before it can restart
# (its old credential must expire first), so a requeue costs CI half a minute, not two.
AuthInfo=cred_expire=30
StateSaveLocation=$DIR/ctld
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
# %n = node name: each emulated node gets its own spool, pid file, log and tmp.
SlurmdSpoolDir=$DIR/%n/spool
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmdLogFile=$DIR/%n/slurmd.log
TmpFS=$DIR/%n/tmp
# No cgroups here: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Nodes may claim more CPUs/memory than the hardware has.
SlurmdParameters=config_overrides
# Reject an impossible request at submission instead of letting it pend forever.
EnforcePartLimits=ALL
ReturnToService=2
# Keep finished jobs visible to "scontrol show job" for 10 min (there is no sacct).
MinJobAge=600
MpiDefault=pmi2
# Backfill every 5 s (default 30): it is what starts a requeued job once it is eligible.
SchedulerParameters=bf_interval=5
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1  # unchanged
  fi
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    rm -f "$tmp"
    die "$CONF exists and was not written by this script; move it away or set SLURM_CONF"
  fi
  install -d "$(dirname "$CONF")"
  install -m 0644 "$tmp" "$CONF"
  rm -f "$tmp"
  return 0  # changed
}

add_hosts() {
  # MASTER_ADDR is the allocation's first hostname (node1): it must resolve.
  if ! getent hosts node1 >/dev/null || ! getent hosts node2 >/dev/null; then
    echo "127.0.0.1 node1 node2" >>/etc/hosts
  fi
}

# wait_up: both nodes respond (idle, or busy with jobs when the cluster was already up).
wait_up() {
  local deadline=$((SECONDS + TIMEOUT)) states
  while ((SECONDS < deadline)); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ $states =~ ^node1\ (idle|mixed|allocated|completing)\ node2\ (idle|mixed|allocated|completing)\ $ ]]; then
      log "up: $states"
      return 0
    fi
    sleep 0.5
  done
  log "nodes not up after ${TIMEOUT}s; sinfo says: ${states:-<no answer>}"
  for f in "$DIR/slurmctld.log" "$DIR/node1/slurmd.log" "$DIR/node2/slurmd.log"; do
    [[ -f $f ]] && { echo "----- tail $f" >&2; tail -n 20 "$f" >&2; }
  done
  die "cluster did not come up"
}

# stop_pid PIDFILE NAME: SIGTERM, wait up to 5 s, then SIGKILL (a slurmd once ignored SIGTERM).
stop_pid() {
  local pid _
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  read_file "$1" pid
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    running "$pid" || break
    sleep 0.1
  done
  if running "$pid"; then
    log "$2 ($pid) ignored SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop_slurm() {
  local n
  for n in "${NODES[@]}"; do stop_pid "$DIR/$n/slurmd.pid" slurmd & done
  stop_pid "$DIR/slurmctld.pid" slurmctld &
  wait
}

start() {
  install_packages
  mkdir -p "$DIR/ctld"
  local n
  for n in "${NODES[@]}"; do mkdir -p "$DIR/$n/spool" "$DIR/$n/tmp"; done
  add_hosts
  start_munge
  if write_conf; then
    log "wrote $CONF"
    stop_slurm  # daemons running with another configuration: restart them
  fi
  alive "$DIR/slurmctld.pid" slurmctld || slurmctld
  for n in "${NODES[@]}"; do
    # Never start a second slurmd for a node: it would kill the first through the pid file.
    alive "$DIR/$n/slurmd.pid" slurmd || slurmd -N "$n"
  done
  wait_up
}

stop() {
  stop_slurm
  if [[ -f $DIR/munged.ours ]]; then
    stop_pid "$MUNGE_PID" munged
    rm -f "$DIR/munged.ours"
  fi
  log "stopped"
}

status() {
  local n f name pid
  for n in slurmctld "${NODES[@]}"; do
    f=$DIR/$n/slurmd.pid name=slurmd
    [[ $n == slurmctld ]] && f=$DIR/slurmctld.pid name=slurmctld
    if alive "$f" "$name"; then read_file "$f" pid; log "$n: pid $pid"; else log "$n: not running"; fi
  done
  sinfo -N || true
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 {start|stop|status}" >&2; exit 2 ;;
esac
