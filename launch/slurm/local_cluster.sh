#!/usr/bin/env bash
# An N-node SLURM cluster on this one machine (Debian's slurm-wlm + munge), for testing the sbatch launcher
# across nodes: every node is a network namespace with its own address, hostname and /etc/hosts, and runs its
# own slurmd; slurmctld and munged run in the machine's own namespace, on a bridge that joins the nodes.
#
#   bash launch/slurm/local_cluster.sh start DIR [--nodes N] [--owner-pid PID]
#       N nodes (default 2), named node1..nodeN; installs slurm-wlm and munge if missing (root + apt-get);
#       prints SLURM_CONF=DIR/slurm.conf last. With --owner-pid the cluster stops by itself once PID exits.
#   export SLURM_CONF=DIR/slurm.conf; sbatch ...          # from the machine's namespace, like a login node
#   bash launch/slurm/local_cluster.sh exec DIR NODE CMD... # run CMD on a node (its namespace, hostname, hosts)
#   bash launch/slurm/local_cluster.sh stop DIR             # cancels every job, stops the daemons, removes the
#                                                           # namespaces, links and bridge (also after a failed
#                                                           # start; safe to run twice)
#
# The network: a private /24 of the 10/8 range chosen from DIR (so two clusters do not collide), the bridge at
# .254 (the controller's address), node i at .i, one veth pair per node. Only these addresses are used: the
# nodes' /etc/hosts (a bind mount inside each node, nothing is written to /etc) lists the nodes and the
# controller only. Everything else lives in DIR (keys, sockets, state, logs, cluster.env with what was made).
# Needs root (namespaces; the daemons run as root: SlurmUser=root).
set -euo pipefail
CMD=${1:?usage: local_cluster.sh start|stop|exec DIR ...}
DIR=$(mkdir -p "${2:?usage: local_cluster.sh start|stop|exec DIR ...}" && cd "$2" && pwd)
shift 2
export SLURM_CONF=$DIR/slurm.conf
STATE=$DIR/cluster.env

ns_of() { echo "jtok$TAG-$1"; }          # the namespace of node NAME

stop() {
  [ -f "$STATE" ] || return 0
  # shellcheck disable=SC1090
  source "$STATE"
  if [ -f "$SLURM_CONF" ] && command -v scancel >/dev/null && [ -f "$DIR/slurmctld.pid" ]; then
    timeout 20 scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true   # jobs go before the daemons
    for _ in $(seq 1 20); do
      [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  if [ -n "${WATCHDOG:-}" ] && [ "${JTOK_CLUSTER_WATCHDOG:-}" != 1 ]; then kill "$WATCHDOG" 2>/dev/null || true; fi
  for f in "$DIR"/slurmd.*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  for node in ${NODES:-}; do
    ns=$(ns_of "$node")
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done   # left-over tasks
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "jt$TAG${node#node}" 2>/dev/null || true     # the node's veth (gone with its namespace, usually)
  done
  ip link del "jt${TAG}br" 2>/dev/null || true
  rm -f "$STATE"
}

if [ "$CMD" = stop ]; then stop; exit 0; fi

if [ "$CMD" = exec ]; then
  # shellcheck disable=SC1090
  source "$STATE"
  node=${1:?usage: local_cluster.sh exec DIR NODE CMD...}; shift
  # nsenter, not `ip netns exec`: that one remounts /sys, which hides the cgroup mounts slurmd needs
  exec nsenter "--net=/var/run/netns/$(ns_of "$node")" unshare --uts --mount --propagation private \
    bash -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' _ "$DIR/hosts" "$node" "$@"
fi

[ "$CMD" = start ] || { echo "usage: local_cluster.sh start|stop|exec DIR ..." >&2; exit 2; }
N=2; OWNER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) N=$2; shift 2 ;;
    --owner-pid) OWNER=$2; shift 2 ;;
    *) echo "local_cluster.sh: unknown option $1 (use --nodes N, --owner-pid PID)" >&2; exit 2 ;;
  esac
done
case "$N" in ''|*[!0-9]*) echo "local_cluster.sh: --nodes $N is not a node count (use 1 to 9)" >&2; exit 2 ;; esac
[ "$N" -ge 1 ] && [ "$N" -le 9 ] || { echo "local_cluster.sh: --nodes $N is out of range (use 1 to 9)" >&2; exit 2; }
if [ "$(id -u)" != 0 ]; then echo "local_cluster.sh: needs root (network namespaces; the daemons run as root)" >&2; exit 3; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "local_cluster.sh: slurm-wlm and munge are missing and cannot be installed (needs apt-get)" >&2
    exit 3
  fi
  echo "installing slurm-wlm and munge ..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null
fi
[ ! -f "$STATE" ] || stop          # a cluster left in DIR by an earlier start

# a /24 chosen from DIR; TAG keeps interface names (at most 15 characters) and namespaces apart
SUM=$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)
TAG=$(( SUM % 900 + 100 ))
NET=10.$(( 100 + SUM / 900 % 100 )).$(( SUM / 90000 % 250 ))
NODES=$(seq -f 'node%g' 1 "$N" | tr '\n' ' ')
printf 'TAG=%s\nNET=%s\nNODES="%s"\n' "$TAG" "$NET" "$NODES" > "$STATE"
trap 'echo "local_cluster.sh: start failed; tearing down (logs in $DIR/log)" >&2; stop' ERR

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
chmod 700 "$DIR/munge"
{ echo "$NET.254 jtokctl"; for i in $(seq 1 "$N"); do echo "$NET.$i node$i"; done; } > "$DIR/hosts"

ip link add "jt${TAG}br" type bridge
ip addr add "$NET.254/24" dev "jt${TAG}br"
ip link set "jt${TAG}br" up
for i in $(seq 1 "$N"); do
  ns=$(ns_of "node$i")
  ip netns add "$ns"
  ip link add "jt$TAG$i" type veth peer name "jt${TAG}p$i"
  ip link set "jt${TAG}p$i" netns "$ns"
  ip link set "jt$TAG$i" master "jt${TAG}br"
  ip link set "jt$TAG$i" up
  ip -n "$ns" link set "jt${TAG}p$i" name eth0
  ip -n "$ns" addr add "$NET.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
done

# munge: own key, socket and pid in DIR (a path socket: reachable from every node's namespace)
[ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" 2>/dev/null; chmod 400 "$DIR/munge/munge.key"; }
MUNGE_SOCKET=$DIR/munge/munge.sock
munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/munged.pid" \
  --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"

HW=$(slurmd -C | head -n 1)    # what slurmd sees (not `nproc`, which obeys OMP_NUM_THREADS)
CPUS=$(echo "$HW" | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
MEM=$(echo "$HW" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( (MEM > 2048 ? MEM - 1024 : MEM) / N ))
cat > "$SLURM_CONF" <<EOF
ClusterName=jtoklocal
SlurmctldHost=jtokctl($NET.254)
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
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
DefMemPerCPU=500
SlurmctldPort=$(( 16800 + RANDOM % 400 ))
SlurmdPort=$(( 17300 + RANDOM % 400 ))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
EOF
for i in $(seq 1 "$N"); do
  echo "NodeName=node$i NodeAddr=$NET.$i CPUs=$CPUS RealMemory=$MEM State=UNKNOWN" >> "$SLURM_CONF"
done
echo "PartitionName=debug Nodes=node[1-$N] Default=YES MaxTime=INFINITE State=UP" >> "$SLURM_CONF"

# the controller answers to its SlurmctldHost name: its own hostname (a UTS namespace), on the bridge's address
unshare --uts bash -c 'hostname jtokctl && exec slurmctld -c -f "$1"' _ "$SLURM_CONF"
for i in $(seq 1 "$N"); do
  mkdir -p "$DIR/spool/node$i"
  bash "$0" exec "$DIR" "node$i" slurmd -f "$SLURM_CONF"      # daemonizes; its pid file is slurmd.node$i.pid
done
if [ -n "$OWNER" ]; then
  # stop with the owner, however it ends (a test killed by a timeout, a crashed shell)
  JTOK_CLUSTER_WATCHDOG=1 setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; bash "$2" stop "$3"' \
    _ "$OWNER" "$0" "$DIR" </dev/null >>"$DIR/log/watchdog.log" 2>&1 &
  echo "WATCHDOG=$!" >> "$STATE"
fi
trap - ERR
# ready = every node registered and idle ("idle*" would be a node that has not answered yet)
for _ in $(seq 1 90); do
  if [ "$(sinfo -h -N -o '%T' 2>/dev/null | sort -u)" = idle ] && [ "$(sinfo -h -N -o '%N' | wc -l)" = "$N" ]; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "local_cluster.sh: the nodes did not all become idle; logs in $DIR/log" >&2
sinfo -N >&2 || true
stop
exit 1
