#!/usr/bin/env bash
# A single-node SLURM cluster on localhost (Debian's slurm-wlm + munge), for testing the sbatch launcher:
#
#   bash launch/slurm/local_cluster.sh start DIR    # installs the packages if missing (root + apt-get),
#                                                   # starts munged, slurmctld, slurmd; prints SLURM_CONF=...
#   export SLURM_CONF=DIR/slurm.conf; sbatch ...
#   bash launch/slurm/local_cluster.sh stop DIR     # cancels every job, stops the daemons it started
#
# Everything lives in DIR (keys, sockets, state, logs); nothing is written to /etc. Needs root (the daemons
# run as root: SlurmUser=root). The node gets this machine's CPUs and a bit less memory than it has.
set -euo pipefail
CMD=${1:?usage: local_cluster.sh start|stop DIR}
DIR=$(mkdir -p "${2:?usage: local_cluster.sh start|stop DIR}" && cd "$2" && pwd)
export SLURM_CONF=$DIR/slurm.conf

stop() {
  if [ -f "$SLURM_CONF" ] && command -v scancel >/dev/null; then
    scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true   # cancel jobs before the daemons go
    for _ in $(seq 1 20); do
      [ -z "$(squeue -h 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  for d in slurmd slurmctld munged; do
    if [ -f "$DIR/$d.pid" ]; then
      pid=$(cat "$DIR/$d.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$DIR/$d.pid"
    fi
  done
}

if [ "$CMD" = stop ]; then stop; exit 0; fi
[ "$CMD" = start ] || { echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "local_cluster.sh: slurm-wlm and munge are missing and cannot be installed (needs root and apt-get)" >&2
    exit 3
  fi
  echo "installing slurm-wlm and munge ..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null
fi
if [ "$(id -u)" != 0 ]; then echo "local_cluster.sh: the daemons run as root here" >&2; exit 3; fi

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
chmod 700 "$DIR/munge"
# munge: own key, socket and pid in DIR
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" 2>/dev/null; chmod 400 "$DIR/munge/munge.key"; }
MUNGE_SOCKET=$DIR/munge/munge.sock
munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"

HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1)    # what slurmd sees (not `nproc`, which obeys OMP_NUM_THREADS)
CPUS=$(echo "$NODE" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
MEM=$(echo "$NODE" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( MEM > 2048 ? MEM - 1024 : MEM ))
cat > "$SLURM_CONF" <<EOF
ClusterName=jtoklocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
DefMemPerCPU=1000
SlurmctldPort=$(( 16800 + RANDOM % 400 ))
SlurmdPort=$(( 17300 + RANDOM % 400 ))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
# ready = the node registered and is idle ("idle*" would be a node that has not answered yet)
for _ in $(seq 1 60); do
  if [ "$(sinfo -h -N -o '%T' 2>/dev/null)" = idle ]; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "local_cluster.sh: the node did not become idle; logs in $DIR/log" >&2
sinfo >&2 || true
exit 1
