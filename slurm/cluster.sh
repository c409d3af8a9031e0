#!/usr/bin/env bash
# A real Slurm cluster with accounting, on 127.0.0.1, entirely under one directory.
#
#   slurm/cluster.sh install      apt-get the Debian packages if their binaries are missing (root)
#   slurm/cluster.sh up DIR       start munged, mariadbd, slurmdbd, slurmctld, slurmd under DIR
#   slurm/cluster.sh down DIR     stop them again, by the PIDs recorded under DIR/run
#   slurm/cluster.sh status DIR   print each daemon's PID and whether it is alive
#
# After `up`, `source DIR/env.sh` gives a client everything it needs (SLURM_CONF, PATH, ...).
# One node (this host, partition debug) by default; ANONRISK_SLURM_GPU_NODES=2 adds nodes n1, n2 (partition
# gpu) with 8 fake GPUs, 128 CPUs and 1 TiB each, one slurmd apiece (slurm/fake_gpu_nodes.sh).
# `up` on a DIR that already holds a cluster stops what is recorded there, then starts it again on the
# same data (jobs and accounting survive). Daemons are stopped only through their pidfiles, never by name.
# Facts behind the choices: /work/shared/REAL_SERVICES.md; notes and timings: slurm/README.md.
set -euo pipefail

export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
BINS=(slurmctld slurmd sbatch sacct sacctmgr munged slurmdbd mariadbd mariadb-install-db mariadb-admin)
# Start order; `down` stops them in reverse. Fake-GPU nodes add slurmd-n1, slurmd-n2, ... after slurmd.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

CLUSTER_NAME="${ANONRISK_SLURM_CLUSTER:-anonrisk}"
PARTITION="${ANONRISK_SLURM_PARTITION:-debug}"
CPUS="${ANONRISK_SLURM_CPUS:-2}"
MAX_ARRAY_SIZE="${ANONRISK_SLURM_MAX_ARRAY_SIZE:-1001}"
CRED_EXPIRE="${ANONRISK_SLURM_CRED_EXPIRE:-10}"
KILL_WAIT="${ANONRISK_SLURM_KILL_WAIT:-5}"
UP_TIMEOUT="${ANONRISK_SLURM_UP_TIMEOUT:-60}"

T0=$(date +%s.%N)
die() { echo "cluster.sh: error: $*" >&2; exit 1; }
# shellcheck source=fake_gpu_nodes.sh
source "$(dirname "${BASH_SOURCE[0]}")/fake_gpu_nodes.sh"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }
log() { printf '[cluster.sh %6ss] %s\n' "$(elapsed "$T0")" "$*"; }

# ---------------------------------------------------------------------------------------------- install
missing_bins() {
  local b out=()
  for b in "${BINS[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
  echo "${out[@]:-}"
}

cmd_install() {
  local missing
  missing=$(missing_bins)
  if [[ -z "$missing" ]]; then
    log "packages present (slurm $(slurmctld -V 2>/dev/null | awk '{print $2}'))"
    return 0
  fi
  [[ $(id -u) -eq 0 ]] || die "missing binaries ($missing) and not root: install ${PKGS[*]} first"
  log "missing: $missing; installing ${PKGS[*]}"
  # apt must not start the distribution's own munge/mariadb services (no systemd in a container: it
  # would use /etc/init.d and leave system daemons running). policy-rc.d exit 101 = "do not start".
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created_policy=1
  fi
  local rc=0 aptlog
  aptlog=$(mktemp /tmp/anonrisk-apt.XXXXXX.log)
  {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
      apt-get install -y -qq --no-install-recommends "${PKGS[@]}"
  } >"$aptlog" 2>&1 || rc=$?
  [[ $created_policy -eq 1 ]] && rm -f "$policy"
  if [[ $rc -ne 0 ]]; then tail -30 "$aptlog" >&2; die "apt-get failed (rc=$rc), full log: $aptlog"; fi
  rm -f "$aptlog"
  missing=$(missing_bins)
  [[ -z "$missing" ]] || die "still missing after install: $missing"
  log "installed (slurm $(slurmctld -V | awk '{print $2}'))"
}

# ---------------------------------------------------------------------------------------------- helpers
# A process counts as alive unless it is gone or a zombie (exited daemons can stay zombies for a while
# here, and `kill -0` says a zombie is alive).
alive() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null | tr -d ' ') || return 1
  [[ -n "$st" && "$st" != Z* ]]
}

# Ours = started by this script for this DIR: its environment carries ANONRISK_SLURM_DAEMON_OF=<DIR>.
# Guards against a stale pidfile whose PID was reused by an unrelated process.
owned() {
  local pid=$1
  [[ -r /proc/$pid/environ ]] || return 1
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "ANONRISK_SLURM_DAEMON_OF=$DIR"
}

wait_until() { # timeout_s description cmd...
  local timeout=$1 what=$2; shift 2
  local start; start=$(date +%s.%N)
  while true; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if awk -v a="$start" -v b="$(date +%s.%N)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
      echo "cluster.sh: timed out after ${timeout}s waiting for: $what" >&2
      return 1
    fi
    sleep 0.2
  done
}

port_in_use() {
  local p=$1
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE "[:.]$p\$" && return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && return 0
  return 1
}

CHOSEN_PORTS=" "
free_port() { # [preferred]
  local p=${1:-} i
  if [[ -n "$p" ]] && [[ "$CHOSEN_PORTS" != *" $p "* ]] && ! port_in_use "$p"; then
    CHOSEN_PORTS+="$p "; echo "$p"; return 0
  fi
  for i in $(seq 1 500); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    [[ "$CHOSEN_PORTS" == *" $p "* ]] && continue
    port_in_use "$p" && continue
    CHOSEN_PORTS+="$p "; echo "$p"; return 0
  done
  die "no free port found"
}

# Start a daemon in the foreground of its own session, all output to its log, and record its PID.
# setsid execs in place (the background child is not a group leader), so $! is the daemon's own PID.
start_daemon() { # name cmd...
  local name=$1; shift
  ANONRISK_SLURM_DAEMON_OF="$DIR" SLURM_CONF="$DIR/etc/slurm.conf" \
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/run/$name.pid"
}

daemon_pid() { [[ -s "$DIR/run/$1.pid" ]] && cat "$DIR/run/$1.pid"; }

check_alive() { # name
  local pid; pid=$(daemon_pid "$1") || die "$1: no pidfile"
  alive "$pid" || { tail -20 "$DIR/log/$1.out" "$DIR/log/$1.log" 2>/dev/null >&2 || true; die "$1 (pid $pid) exited"; }
}

wait_daemon() { # name timeout description cmd...: wait for cmd, failing fast if the daemon died
  local name=$1 timeout=$2 what=$3; shift 3
  local start out; start=$(date +%s.%N)
  while ! out=$("$@" 2>&1); do
    check_alive "$name"
    if awk -v a="$start" -v b="$(date +%s.%N)" -v t="$timeout" 'BEGIN { exit !(b - a > t) }'; then
      tail -20 "$DIR/log/$name.out" "$DIR/log/$name.log" 2>/dev/null >&2 || true
      echo "last check ($*) said: $out" >&2
      die "timed out after ${timeout}s waiting for $what"
    fi
    sleep 0.2
  done
}

stop_pid() { # name pid: TERM, wait, KILL; zombies count as stopped
  local name=$1 pid=$2 i
  if ! alive "$pid"; then return 0; fi
  if ! owned "$pid"; then
    echo "cluster.sh: $name: pid $pid is alive but not ours (stale pidfile?); leaving it alone" >&2
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do alive "$pid" || return 0; sleep 0.1; done   # 10 s
  echo "cluster.sh: $name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do alive "$pid" || return 0; sleep 0.1; done
  echo "cluster.sh: $name (pid $pid) still alive after SIGKILL" >&2
  return 1
}

# ---------------------------------------------------------------------------------------------- down
cmd_down() {
  [[ -d "$DIR/run" ]] || { log "nothing recorded under $DIR"; return 0; }
  local rc=0 name pid p
  # Running jobs first, while slurmctld still answers: otherwise their slurmstepd outlive slurmd.
  if [[ -s "$DIR/run/slurmctld.pid" ]] && alive "$(cat "$DIR/run/slurmctld.pid")" && [[ -f "$DIR/etc/slurm.conf" ]]; then
    export SLURM_CONF="$DIR/etc/slurm.conf"
    local jobs
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ -n "${jobs// /}" ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 5 scancel $jobs 2>/dev/null || true
      wait_until $((KILL_WAIT + 10)) "jobs to leave squeue" \
        bash -c '[[ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ]]' || true
    fi
  fi
  local daemons=("${DAEMONS[@]}")
  mapfile -t -O "${#daemons[@]}" daemons < <(recorded_gpu_slurmds)
  for ((i = ${#daemons[@]} - 1; i >= 0; i--)); do
    name=${daemons[$i]}
    pid=$(daemon_pid "$name") || continue
    if stop_pid "$name" "$pid"; then rm -f "$DIR/run/$name.pid"; else rc=1; fi
  done
  # Last resort: step daemons of ours that outlived slurmd (they carry our marker in their environment).
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
    owned "$pid" || continue
    alive "$pid" || continue
    echo "cluster.sh: stray slurmstepd pid $pid; killing" >&2
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$DIR/mysql/mysqld.sock" "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
  log "down ($DIR)"
  return $rc
}

cmd_status() {
  local name pid
  for name in "${DAEMONS[@]}" $(recorded_gpu_slurmds); do
    pid=$(daemon_pid "$name") || { echo "$name: no pidfile"; continue; }
    if alive "$pid"; then echo "$name: pid $pid alive"; else echo "$name: pid $pid not running"; fi
  done
}

# ---------------------------------------------------------------------------------------------- up
# Slurm's NoInAddrAny binds each daemon to what `hostname` resolves to (not to the configured address).
# When that is a loopback address (127.0.0.1 here; 127.0.1.1 on a stock Debian /etc/hosts) every daemon
# uses it and listens on loopback only. Otherwise (hostname -> a LAN address) binding there would break
# clients on 127.0.0.1, so the daemons fall back to binding any address; `up` says so.
pick_addr() {
  local host=$1 a
  a=$(getent ahostsv4 "$host" 2>/dev/null | awk 'NR == 1 { print $1 }')
  if [[ "$a" == 127.* ]]; then ADDR=$a; COMM_PARAMS="NoCtldInAddrAny,NoInAddrAny"
  else ADDR=127.0.0.1; COMM_PARAMS=""
    log "warning: hostname '$host' resolves to '${a:-nothing}', not loopback: Slurm daemons listen on all addresses"
  fi
}

write_slurm_conf() {
  local host=$1 realmem
  realmem=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  umask 022
  cat >"$DIR/etc/slurm.conf" <<EOF
# Generated by slurm/cluster.sh up; regenerated on every up.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host($ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
${COMM_PARAMS:+CommunicationParameters=$COMM_PARAMS}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.daemon.pid
SlurmdPidFile=$DIR/run/slurmd.%n.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
$(gpu_gres_types)
MaxArraySize=$MAX_ARRAY_SIZE
KillWait=$KILL_WAIT
MinJobAge=300
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$ADDR
AccountingStoragePort=$DBD_PORT
# slurmctld -> slurmdbd ignores AuthInfo's socket; this names it.
AccountingStoragePass=$DIR/munge/munge.socket
NodeName=$host NodeAddr=$ADDR CPUs=$CPUS RealMemory=$realmem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
$(gpu_slurm_conf "$host")
EOF
  write_gres_conf
  umask 077
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
# Generated by slurm/cluster.sh up (slurmdbd wants mode 600).
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=$ADDR
${COMM_PARAMS:+CommunicationParameters=NoInAddrAny}
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.daemon.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  umask 022
}

mysql_sock() { mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot "$@"; }

UP_DONE=0
on_up_exit() { # a failed `up` leaves nothing running
  if [[ $UP_DONE -eq 0 && -d "${DIR:-}/run" ]]; then
    echo "cluster.sh: up failed; stopping what it started (logs: $DIR/log)" >&2
    cmd_down >&2 || true
  fi
}

cmd_up() {
  [[ $(id -u) -eq 0 ]] || die "up needs root (slurmd starts jobs as their user; SlurmUser=root here)"
  [[ -n "$(missing_bins)" ]] && die "missing binaries: $(missing_bins); run '$0 install'"
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd -P)
  # Unix socket paths (munge, mariadb) are limited to 107 bytes.
  (( ${#DIR} <= 80 )) || die "DIR path too long for unix sockets (${#DIR} > 80 chars): $DIR"
  chmod 700 "$DIR"
  if [[ -d "$DIR/run" ]]; then
    log "existing cluster dir: stopping whatever is recorded there first"
    cmd_down || die "could not stop the previous daemons under $DIR"
  fi
  trap on_up_exit EXIT
  mkdir -p "$DIR"/{etc,run,log,state,spool,munge,mysql/data,mysql/tmp}
  chmod 700 "$DIR/munge"
  : >"$DIR/log/.keep"
  local host t
  host=$(hostname -s)

  # Ports: reuse the ones recorded last time when they are free, so restarts keep the same addresses.
  local old_ctld="" old_slurmd="" old_dbd="" old_db="" old_nodes=""
  if [[ -f "$DIR/ports.env" ]]; then
    # shellcheck disable=SC1091
    source "$DIR/ports.env"
    old_ctld=${CTLD_PORT:-}; old_slurmd=${SLURMD_PORT:-}; old_dbd=${DBD_PORT:-}; old_db=${DB_PORT:-}
    old_nodes=${GPU_NODE_PORTS_RECORDED:-}
  fi
  CTLD_PORT=$(free_port "$old_ctld"); CHOSEN_PORTS+="$CTLD_PORT "
  SLURMD_PORT=$(free_port "$old_slurmd"); CHOSEN_PORTS+="$SLURMD_PORT "
  DBD_PORT=$(free_port "$old_dbd"); CHOSEN_PORTS+="$DBD_PORT "
  DB_PORT=$(free_port "$old_db"); CHOSEN_PORTS+="$DB_PORT "
  pick_gpu_node_ports "$old_nodes"
  printf 'CTLD_PORT=%s\nSLURMD_PORT=%s\nDBD_PORT=%s\nDB_PORT=%s\nGPU_NODE_PORTS_RECORDED="%s"\n' \
    "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT" "${GPU_NODE_PORTS[*]:-}" >"$DIR/ports.env"
  local node nodes=("$host")
  mapfile -t -O 1 nodes < <(gpu_node_names)
  for node in "${nodes[@]}"; do mkdir -p "$DIR/spool/$node"; done
  if (( GPU_NODES > 0 )); then make_fake_gpu_devices; fi

  if [[ ! -s "$DIR/mysql/slurm.pw" ]]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DIR/mysql/slurm.pw")
  fi
  DB_PASS=$(cat "$DIR/mysql/slurm.pw")
  pick_addr "$host"
  write_slurm_conf "$host"
  export SLURM_CONF="$DIR/etc/slurm.conf"

  # munge: its own key and socket.
  t=$(date +%s.%N)
  if [[ ! -s "$DIR/munge/munge.key" ]]; then
    (umask 077; dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
  fi
  chmod 400 "$DIR/munge/munge.key"
  start_daemon munged munged --foreground --force --num-threads=2 \
    --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.daemon.pid" --seed-file="$DIR/munge/munged.seed" \
    --log-file="$DIR/log/munged.log"
  wait_daemon munged 15 "munge socket" bash -c "munge -n -S '$DIR/munge/munge.socket' | unmunge -S '$DIR/munge/munge.socket'"
  log "munged up (pid $(daemon_pid munged), $(elapsed "$t")s)"

  # MariaDB for slurmdbd: data and socket under DIR, TCP on 127.0.0.1 only.
  t=$(date +%s.%N)
  if [[ ! -d "$DIR/mysql/data/mysql" ]]; then
    mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user="$(id -un)" \
      --auth-root-authentication-method=socket --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
      { tail -20 "$DIR/log/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  local userflag=()
  [[ $(id -u) -eq 0 ]] && userflag=(--user=root)
  start_daemon mariadbd mariadbd --no-defaults "${userflag[@]}" \
    --datadir="$DIR/mysql/data" --socket="$DIR/mysql/mysqld.sock" --pid-file="$DIR/run/mariadbd.daemon.pid" \
    --tmpdir="$DIR/mysql/tmp" --log-error="$DIR/log/mariadbd.log" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
    --performance-schema=OFF --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
    --innodb-lock-wait-timeout=900 --max-connections=50
  wait_daemon mariadbd 30 "mariadb to answer" mariadb-admin --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot ping
  mysql_sock -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  log "mariadbd up (pid $(daemon_pid mariadbd), port $DB_PORT, $(elapsed "$t")s)"

  # slurmdbd: reads slurmdbd.conf from SLURM_CONF's folder.
  t=$(date +%s.%N)
  start_daemon slurmdbd slurmdbd -D
  wait_daemon slurmdbd 30 "slurmdbd to answer sacctmgr" timeout 5 sacctmgr -n show cluster
  if ! timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qxF "$CLUSTER_NAME"; then
    timeout 10 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster failed"
  fi
  log "slurmdbd up (pid $(daemon_pid slurmdbd), port $DBD_PORT, cluster '$CLUSTER_NAME' registered, $(elapsed "$t")s)"

  t=$(date +%s.%N)
  start_daemon slurmctld slurmctld -D -f "$SLURM_CONF"
  wait_daemon slurmctld 30 "slurmctld to answer" timeout 5 scontrol ping
  log "slurmctld up (pid $(daemon_pid slurmctld), port $CTLD_PORT, $(elapsed "$t")s)"

  t=$(date +%s.%N)
  start_daemon slurmd slurmd -D -N "$host" -f "$SLURM_CONF"
  for node in "${nodes[@]:1}"; do start_daemon "slurmd-$node" slurmd -D -N "$node" -f "$SLURM_CONF"; done
  local daemon
  for node in "${nodes[@]}"; do
    daemon=slurmd; [[ $node == "$host" ]] || daemon="slurmd-$node"
    wait_daemon "$daemon" "$UP_TIMEOUT" "node $node idle in sinfo" \
      bash -c "[[ \"\$(timeout 5 sinfo -h -N -n '$node' -o %t)\" == idle ]]"
  done
  wait_daemon slurmctld 30 "sacct to answer" timeout 5 sacct -n -X -S now-1hours
  log "slurmd up (pid $(daemon_pid slurmd), port $SLURMD_PORT, node idle, sacct answers, $(elapsed "$t")s)"
  if (( GPU_NODES > 0 )); then
    log "fake-GPU nodes $(gpu_node_names | paste -sd' ') idle in partition $GPU_PARTITION" \
      "(ports ${GPU_NODE_PORTS[*]}; $GPUS_PER_NODE GPUs, $GPU_NODE_CPUS CPUs each)"
  fi

  local envfile="$DIR/env.sh"
  {
    echo "# Generated by slurm/cluster.sh up: source me to use this cluster."
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
    echo 'export PATH="$PATH:/usr/bin:/usr/sbin"  # client commands live in /usr/bin; appended, not prepended'
    printf 'export ANONRISK_SLURM_DIR=%q\n' "$DIR"
    printf 'export ANONRISK_SLURM_CLUSTER=%q\n' "$CLUSTER_NAME"
    printf 'export ANONRISK_SLURM_PARTITION=%q\n' "$PARTITION"
    printf 'export ANONRISK_SLURM_CPUS=%q\n' "$CPUS"
    printf 'export ANONRISK_SLURM_MAX_ARRAY_SIZE=%q\n' "$MAX_ARRAY_SIZE"
    printf 'export ANONRISK_SLURM_CRED_EXPIRE=%q\n' "$CRED_EXPIRE"
    printf 'export ANONRISK_SLURM_KILL_WAIT=%q\n' "$KILL_WAIT"
    printf 'export ANONRISK_SLURM_GPU_NODES=%q\n' "$GPU_NODES"
    printf 'export ANONRISK_SLURM_GPU_PARTITION=%q\n' "$GPU_PARTITION"
    printf 'export ANONRISK_SLURM_GPUS_PER_NODE=%q\n' "$GPUS_PER_NODE"
  } >"$envfile"
  UP_DONE=1
  log "cluster '$CLUSTER_NAME' up in $(elapsed "$T0")s: source $envfile"
}

# ---------------------------------------------------------------------------------------------- main
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 ]] || usage
case "$1" in
  install) cmd_install ;;
  up|down|status)
    [[ $# -eq 2 ]] || usage
    DIR=$2
    case "$1" in
      up) cmd_up ;;
      down) [[ -d "$DIR" ]] && DIR=$(cd "$DIR" && pwd -P); cmd_down ;;
      status) DIR=$(cd "$DIR" && pwd -P); cmd_status ;;
    esac
    ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
