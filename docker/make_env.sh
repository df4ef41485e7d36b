#!/usr/bin/env bash
# Write docker/.env from docker/.env.example, every empty value a fresh random secret; an existing
# docker/.env is kept (delete it to make new credentials, then recreate the volumes).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/.env}
if [ -e "$OUT" ]; then echo "make_env: $OUT exists; keeping it" >&2; exit 0; fi
umask 077
while IFS= read -r line; do
  if [[ $line =~ ^([A-Z0-9_]+)=$ ]]; then
    echo "${BASH_REMATCH[1]}=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
  else
    echo "$line"
  fi
done < "$HERE/.env.example" > "$OUT"
echo "make_env: wrote $OUT (mode 600); MLflow login: $(grep '^MLFLOW_ADMIN_USERNAME=' "$OUT" | cut -d= -f2) and MLFLOW_ADMIN_PASSWORD from that file" >&2
