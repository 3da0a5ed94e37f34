#!/usr/bin/env bash
# A real single-node SLURM cluster (munged + slurmctld + slurmd) on this machine, for tests and CI.
#   slurm_cluster.sh install      install Debian's slurm-wlm and munge when missing (root + apt-get)
#   slurm_cluster.sh start DIR    config, state, logs, pid files and sockets all under DIR; prints
#                                 the `export SLURM_CONF=DIR/slurm.conf` line clients need (stdout)
#   slurm_cluster.sh stop DIR     cancel jobs, stop the daemons of DIR (idempotent)
# The daemons run as root and use the default ports 6817/6818: one cluster per machine at a time.
set -u
PATH=$PATH:/usr/sbin:/sbin

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; }

install() {
  have_slurm && return 0
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing slurm-wlm and munge (Debian packages) ..." >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; then
      apt-get update -q >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    fi
    have_slurm && return 0
  fi
  cat >&2 <<MSG
sslrun: SLURM (slurmctld, slurmd, munged) is not installed; the SLURM tests will be skipped.
        Install it with:  sudo apt-get install slurm-wlm munge
MSG
  return 0
}

# Print the last lines of every log, for a start that failed.
logs() { for f in "$1"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 25 "$f" >&2; }; done; }

start() {
  local dir host cpus mem sock i state
  [ "$(id -u)" = "0" ] || { echo "slurm_cluster: start needs root (slurmd runs jobs as their user)" >&2; return 1; }
  have_slurm || { echo "slurm_cluster: SLURM is not installed; run: $0 install" >&2; return 1; }
  # A cluster left running (by another DIR) holds the ports; say which rather than fail obscurely.
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "slurm_cluster: slurm daemons already running: $(pgrep -d' ' -x 'slurmctld|slurmd'); stop them first ($0 stop OLD_DIR)" >&2
    return 1
  fi
  mkdir -p "$1" && dir=$(cd "$1" && pwd) || return 1
  host=$(hostname -s)  # slurmd finds its NodeName from this
  # Jobs reach each other by node name (Lightning's MASTER_ADDR is SLURM's node list).
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
  cpus=${SLURM_CLUSTER_CPUS:-8}
  # RealMemory must not exceed what slurmd sees: 90 % of MemTotal, in MiB.
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  sock=$dir/munge/munge.socket.2
  # Unix socket paths are limited to 107 bytes (munge's here, slurmd's step sockets in spool/).
  [ ${#sock} -lt 90 ] || { echo "slurm_cluster: DIR path too long for unix sockets: $dir" >&2; return 1; }
  mkdir -p "$dir"/{munge,state,spool,log,run}
  # munged wants its key dir closed to writers and its socket dir open to all (755); --force
  # below lets it run under a 0700 parent such as pytest's /tmp/pytest-of-root (clients are root).
  chmod 755 "$dir"/munge
  [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" || return 1
  chmod 400 "$dir/munge/munge.key"
  : > "$dir/plugstack.conf"  # keeps slurm from reading /etc/slurm/plugstack.conf

  cat > "$dir/slurm.conf" <<CONF
ClusterName=sslrun
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
# Our own munged socket; cred_expire is also the delay before a requeued job may start again
# (Slurm sets its begin time to now + cred_expire + 1; default 120 s).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/plugstack.conf
# No cgroups in containers; no accounting database.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Re-run the scheduler often, so tests do not wait for its 60 s default pass.
SchedulerParameters=sched_interval=2,bf_interval=2
# No mail in CI (the default /bin/mail is missing and logged as an error).
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL when a job is cancelled or times out (default 30).
KillWait=10
# Trust this file over the hardware: more CPUs than real so several small jobs run at once.
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$dir/slurm.conf  # daemons (and slurmstepd, srun in jobs) inherit it

  munged --force --socket="$sock" --key-file="$dir/munge/munge.key" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" || { logs "$dir"; return 1; }
  slurmctld -f "$SLURM_CONF" || { logs "$dir"; stop "$dir"; return 1; }
  slurmd -f "$SLURM_CONF" -N "$host" || { logs "$dir"; stop "$dir"; return 1; }

  for i in $(seq 60); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null)
    [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
    sleep 1
  done
  echo "slurm_cluster: node $host not idle after 60 s (state: '${state:-none}')" >&2
  logs "$dir"; stop "$dir"; return 1
}

# Send SIGTERM to the pid in file $1, wait up to 10 s, then SIGKILL.
stop_pid() {
  local pid i
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$1"
}

stop() {
  local dir i
  [ -d "$1" ] || return 0
  dir=$(cd "$1" && pwd)
  if [ -f "$dir/run/slurmctld.pid" ] && [ -f "$dir/slurm.conf" ]; then
    # Kill the jobs first: slurmstepd and the job's processes outlive slurmd otherwise.
    export SLURM_CONF=$dir/slurm.conf
    scancel --quiet --full --signal=KILL $(squeue -h -o %A 2>/dev/null) 2>/dev/null
    for i in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  stop_pid "$dir/run/slurmd.pid"
  stop_pid "$dir/run/slurmctld.pid"
  stop_pid "$dir/run/munged.pid"
  return 0
}

case "${1:-}" in
  install) install ;;
  start) [ $# -eq 2 ] || { echo "usage: $0 start DIR" >&2; exit 2; }; start "$2" ;;
  stop) [ $# -eq 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
