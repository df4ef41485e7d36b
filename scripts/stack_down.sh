#!/usr/bin/env bash
# Stop what scripts/stack_up.sh started (each daemon's whole process group, by the pids it recorded),
# cancel the stack's SLURM jobs first, and remove what it made: $RCDM_STACK_DIR and the /etc/hosts line.
# --keep-logs keeps $RCDM_STACK_DIR/log (a failed start leaves them to read).
set -uo pipefail
DIR=${RCDM_STACK_DIR:-/tmp/rcdm-stack}
KEEP_LOGS=0
[ "${1:-}" = --keep-logs ] && KEEP_LOGS=1
log() { echo "stack_down: $*" >&2; }
[ -d "$DIR" ] || { log "nothing at $DIR"; exit 0; }

alive() { kill -0 "$1" 2>/dev/null; }
stop_group() {  # stop_group NAME: TERM the process group, KILL it after 10 s
  local f=$DIR/pids/$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 20); do alive "$pid" || break; sleep 0.5; done
    alive "$pid" && { log "$1 ($pid) ignored TERM: KILL"; kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; }
  fi
  rm -f "$f"
}

if [ -f "$DIR/etc/slurm.conf" ] && [ -f "$DIR/pids/slurmctld" ] && alive "$(cat "$DIR/pids/slurmctld")"; then
  export SLURM_CONF=$DIR/etc/slurm.conf
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
# the order reverses the start: clients first, the database last
for name in mlflow s3 slurmd-n2 slurmd-n1 slurmctld slurmdbd mariadb munged; do
  stop_group "$name"
done
# job steps whose slurmd is gone (slurmstepd runs in its own session)
if [ -d "$DIR/slurmd" ]; then
  pkill -KILL -x slurmstepd 2>/dev/null || true
fi
if grep -q "# rcdm-stack" /etc/hosts 2>/dev/null; then
  hosts=$(grep -v "# rcdm-stack" /etc/hosts)
  printf '%s\n' "$hosts" > /etc/hosts
fi
if [ "$KEEP_LOGS" = 1 ]; then
  find "$DIR" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +
  log "stopped; logs kept in $DIR/log"
else
  rm -rf "$DIR"
  log "stopped; removed $DIR"
fi
