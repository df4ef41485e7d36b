#!/usr/bin/env bash
# One image, several roles: rcdm-entrypoint <slurmctld|slurmdbd|slurmd|login|...>
# Every SLURM role starts munged first, with the key shared by all containers (the munge-key volume).
set -euo pipefail
role=${1:-login}
shift || true

start_munge() {
  for _ in $(seq 1 60); do [ -s /etc/munge-shared/munge.key ] && break; sleep 1; done
  [ -s /etc/munge-shared/munge.key ] || { echo "no munge key in /etc/munge-shared (the munge-key service makes it)" >&2; exit 1; }
  install -o munge -g munge -m 400 /etc/munge-shared/munge.key /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- munged
}

case "$role" in
  slurmdbd)
    start_munge
    install -o slurm -g slurm -m 600 /etc/slurm-shared/slurmdbd.conf /etc/slurm/slurmdbd.conf
    [ -n "${SLURM_DB_PASSWORD:-}" ] || { echo "SLURM_DB_PASSWORD is not set: bash docker/make_env.sh" >&2; exit 1; }
    echo "StoragePass=$SLURM_DB_PASSWORD" >> /etc/slurm/slurmdbd.conf
    exec slurmdbd -D ;;
  slurmctld)
    start_munge
    exec slurmctld -D -i ;;
  slurmd)
    start_munge
    exec slurmd -D -N "$(hostname -s)" ;;
  login)
    start_munge
    exec runuser -u rcdm -- sleep infinity ;;   # attach with: docker compose exec -u rcdm login bash
  *)
    exec "$role" "$@" ;;
esac
