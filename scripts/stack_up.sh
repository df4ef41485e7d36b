#!/usr/bin/env bash
# Start a real mini cluster on this one Debian host, as root, without systemd or Docker:
#   munge, MariaDB + slurmdbd (accounting: sacct, and submitit seeing cancelled jobs), slurmctld,
#   two slurmd nodes (n1, n2) on this host, an S3-API server on 127.0.0.1 (moto; or your own endpoint),
#   and an `mlflow server` (sqlite backend, artifacts proxied to the S3 store).
# Everything it makes lives under $RCDM_STACK_DIR (default /tmp/rcdm-stack); it writes
# $RCDM_STACK_DIR/env.sh, which you source to talk to the stack:
#   bash scripts/stack_up.sh && source /tmp/rcdm-stack/env.sh && sinfo
# scripts/stack_down.sh stops exactly what this started and removes what it made.
#
# Settings (environment): RCDM_STACK_DIR, RCDM_S3_ENDPOINT (use this S3 endpoint instead of starting
# moto; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), RCDM_S3_PORT (moto, 9010),
# RCDM_S3_BUCKET (rcdm), RCDM_MLFLOW_PORT (5010), RCDM_SLURMCTLD_PORT (6817), RCDM_SLURMDBD_PORT (6819),
# RCDM_SLURMD_PORTS (17001), RCDM_DB_PORT (3307).
set -euo pipefail

DIR=${RCDM_STACK_DIR:-/tmp/rcdm-stack}
S3_PORT=${RCDM_S3_PORT:-9010}
BUCKET=${RCDM_S3_BUCKET:-rcdm}
MLFLOW_PORT=${RCDM_MLFLOW_PORT:-5010}
CTLD_PORT=${RCDM_SLURMCTLD_PORT:-6817}
DBD_PORT=${RCDM_SLURMDBD_PORT:-6819}
SLURMD_PORT=${RCDM_SLURMD_PORTS:-17001}
DB_PORT=${RCDM_DB_PORT:-3307}
CLUSTER=rcdm
HOST=$(hostname -s)
PY=${PYTHON:-python}

die() { echo "stack_up: $*" >&2; exit 1; }
log() { echo "stack_up: $*" >&2; }
[ "$(id -u)" = 0 ] || die "needs root (it installs Debian packages and runs the SLURM daemons); run it as root"
[ -e "$DIR/pids" ] && die "$DIR already holds a stack; stop it first: bash scripts/stack_down.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
# a failed start stops whatever it had started
trap 'rc=$?; if [ $rc != 0 ]; then log "failed; stopping what was started"; RCDM_STACK_DIR=$DIR bash "$HERE/stack_down.sh" --keep-logs; fi' EXIT

# --- packages -------------------------------------------------------------------------------------
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v mariadbd >/dev/null; then
  log "installing $PKGS"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends $PKGS >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $PKGS >/dev/null; } \
    || die "could not install $PKGS with apt-get"
fi

mkdir -p "$DIR"/{etc,log,pids,run,slurmctld,slurmd/n1,slurmd/n2,mlflow}
chmod 755 "$DIR"

# start NAME CMD...: run CMD in its own session (its pid is its process group), record the pid
start() {
  local name=$1; shift
  setsid "$@" >>"$DIR/log/$name.out" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name"
}
wait_for() {  # wait_for WHAT SECONDS CMD...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 "$((secs * 2))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "$what did not come up in ${secs}s; logs in $DIR/log"
}

# --- munge ----------------------------------------------------------------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munge already running: using it"
else
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
  start munged runuser -u munge -- munged -F
  wait_for munge 15 bash -c 'munge -n | unmunge'
fi

# --- MariaDB + slurmdbd ---------------------------------------------------------------------------
install -d -o mysql -g mysql "$DIR/mysql" "$DIR/run/mysqld"
mariadb-install-db --user=mysql --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
  --skip-test-db >"$DIR/log/mariadb-install.out" 2>&1 || die "mariadb-install-db failed: $DIR/log/mariadb-install.out"
SOCK=$DIR/run/mysqld/mysqld.sock
start mariadb mariadbd --user=mysql --datadir="$DIR/mysql" --socket="$SOCK" --port="$DB_PORT" \
  --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mysqld/mysqld.pid" \
  --log-error="$DIR/log/mariadb.log"
wait_for MariaDB 60 mariadb-admin --socket="$SOCK" ping
DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9)
mariadb --socket="$SOCK" -u root <<SQL
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$HOST
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"

# --- slurm.conf: two slurmd on this host (Debian builds slurmd with multiple-slurmd support) -------
# nproc obeys OMP_NUM_THREADS: a shell that pins torch to one thread would otherwise declare 1-CPU nodes
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny
StateSaveLocation=$DIR/slurmctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MailProg=/bin/true
KillWait=5
MinJobAge=60
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$SLURMD_PORT-$((SLURMD_PORT + 1)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
export SLURM_CONF=$DIR/etc/slurm.conf

# a master address of n1 must resolve: the nodes are names for this host
if ! grep -q "# rcdm-stack" /etc/hosts; then
  hosts=$(cat /etc/hosts)
  printf '%s\n127.0.0.1 n1 n2 # rcdm-stack\n' "$hosts" > /etc/hosts  # rewrite in place: /etc/hosts may be a bind mount
fi

start slurmdbd slurmdbd -D  # reads slurmdbd.conf beside $SLURM_CONF
wait_for slurmdbd 60 sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
start slurmctld slurmctld -D -i -f "$SLURM_CONF"
wait_for slurmctld 60 scontrol ping
start slurmd-n1 slurmd -D -N n1 -f "$SLURM_CONF"
start slurmd-n2 slurmd -D -N n2 -f "$SLURM_CONF"
wait_for "two idle slurmd nodes" 90 bash -c '[ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" = 2 ]'

# --- S3: moto on 127.0.0.1, unless an endpoint is given -----------------------------------------
# moto accepts any credentials: made up per stack unless given (no credential lives in the repository)
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-rcdm-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
if [ -n "${RCDM_S3_ENDPOINT:-}" ]; then
  S3=$RCDM_S3_ENDPOINT
else
  S3=http://127.0.0.1:$S3_PORT
  start s3 "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT"
  wait_for "S3 server (moto)" 60 "$PY" -c "import urllib.request; urllib.request.urlopen('$S3/moto-api/')"
fi
"$PY" - "$S3" "$BUCKET" <<'EOF' || die "could not create bucket $BUCKET at $S3"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[2])
EOF

# --- MLflow server: sqlite backend, artifacts proxied to the S3 store ----------------------------
MLFLOW=http://127.0.0.1:$MLFLOW_PORT
MLFLOW_S3_ENDPOINT_URL=$S3 start mlflow "$PY" -m mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
  --workers 1 --backend-store-uri "sqlite:///$DIR/mlflow/mlflow.db" \
  --artifacts-destination "s3://$BUCKET/mlflow-artifacts"
wait_for "MLflow server" 120 "$PY" -c "import urllib.request; urllib.request.urlopen('$MLFLOW/health')"

cat > "$DIR/env.sh" <<EOF
# written by scripts/stack_up.sh: source it to use the stack
export SLURM_CONF=$SLURM_CONF
export AWS_ENDPOINT_URL=$S3
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export MLFLOW_TRACKING_URI=$MLFLOW
export RCDM_S3_BUCKET=$BUCKET
EOF
log "up: $(sinfo -h -N -o '%N %T' | tr '\n' ' ')| S3 $S3 (bucket $BUCKET) | MLflow $MLFLOW"
log "use it: source $DIR/env.sh"
