#!/usr/bin/env python3
"""Create rcdm's own MLflow user on the basic-auth server, as the admin, once (docker/compose.yaml's
mlflow-user service). Reads MLFLOW_URL, MLFLOW_ADMIN_USERNAME / _PASSWORD and RCDM_MLFLOW_USERNAME / _PASSWORD
from the environment; an existing user is left as it is. Standard library only."""
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("MLFLOW_URL", "http://mlflow:5000").rstrip("/")
    admin = f"{os.environ['MLFLOW_ADMIN_USERNAME']}:{os.environ['MLFLOW_ADMIN_PASSWORD']}"
    body = json.dumps({"username": os.environ["RCDM_MLFLOW_USERNAME"],
                       "password": os.environ["RCDM_MLFLOW_PASSWORD"]}).encode()
    for _ in range(120):  # the server may still be starting
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Basic " + base64.b64encode(admin.encode()).decode()})
        try:
            urllib.request.urlopen(req, timeout=10).read()
            print(f"created MLflow user {os.environ['RCDM_MLFLOW_USERNAME']}")
            return 0
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            if "RESOURCE_ALREADY_EXISTS" in detail:
                print(f"MLflow user {os.environ['RCDM_MLFLOW_USERNAME']} exists")
                return 0
            if e.code in (401, 403):
                print(f"the MLflow admin login was refused ({e.code}); check docker/.env", file=sys.stderr)
                return 1
        except OSError:
            pass
        time.sleep(1)
    print(f"no MLflow server answered at {url}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
