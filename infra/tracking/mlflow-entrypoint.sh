#!/bin/sh
# The MLflow server with basic-auth on and proxied artifacts, configured from the environment:
#   MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_DATABASE_URI  the runs' and the users' databases, as
#                                  SQLAlchemy URLs without a password
#                                  (postgresql+psycopg2://mlflow@postgres:5432/mlflow, .../mlflow_auth)
#   MLFLOW_DB_PASSWORD             their password (optional), percent-encoded into both URLs here,
#                                  so that / @ : % and the like survive
#   MLFLOW_ARTIFACTS_DESTINATION   where the server stores the artifacts it proxies (s3://bucket)
#   MLFLOW_BUCKETS                 S3 buckets to create if missing (optional); the S3 store may still
#                                  be starting, so it is asked again for up to 2 minutes
#   MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   the admin account (MLflow reads them)
#   MLFLOW_FLASK_SERVER_SECRET_KEY signs the UI's sessions
#   MLFLOW_HOST, MLFLOW_PORT       where it listens (default 127.0.0.1:5000)
#   MLFLOW_ALLOWED_HOSTS           the Host headers it answers, comma-separated (fnmatch patterns).
#                                  The list REPLACES MLflow's defaults (localhost, private IPs): name
#                                  every host:port that clients use. Unset: the defaults.
# Clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"
umask 077
MLFLOW_AUTH_CONFIG_PATH="$(mktemp -d)/basic_auth.ini"
export MLFLOW_AUTH_CONFIG_PATH
exec python - <<'PY'
import os
import time
from urllib.parse import quote, urlsplit, urlunsplit

env = os.environ


def with_password(url: str) -> str:
    password = env.get("MLFLOW_DB_PASSWORD")
    if not password:
        return url
    u = urlsplit(url)
    host = u.netloc.rsplit("@", 1)[-1]
    return urlunsplit(u._replace(netloc=f"{quote(u.username or '', safe='')}:{quote(password, safe='')}@{host}"))


# passed through the environment, not argv: a password in argv shows in every `ps`
env["MLFLOW_BACKEND_STORE_URI"] = with_password(env["MLFLOW_BACKEND_STORE_URI"])
auth_db = with_password(env["MLFLOW_AUTH_DATABASE_URI"])
with open(env["MLFLOW_AUTH_CONFIG_PATH"], "w") as f:   # configparser interpolates: % is written %%
    f.write("[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {auth_db.replace('%', '%%')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")

buckets = env.get("MLFLOW_BUCKETS", "").split()
if buckets:
    import boto3
    import botocore.exceptions

    s3 = boto3.client("s3", endpoint_url=env.get("MLFLOW_S3_ENDPOINT_URL"))
    for attempt in range(60):
        try:
            existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
            break
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            last = e
            time.sleep(2)
    else:
        raise SystemExit(f"the S3 store at {env.get('MLFLOW_S3_ENDPOINT_URL')} did not answer: {last}")
    for bucket in buckets:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)

allowed = env.get("MLFLOW_ALLOWED_HOSTS")
os.execvp("mlflow", ["mlflow", "server", "--app-name", "basic-auth", "--serve-artifacts",
                     "--host", env.get("MLFLOW_HOST", "127.0.0.1"), "--port", env.get("MLFLOW_PORT", "5000"),
                     *(["--allowed-hosts", allowed] if allowed else [])])
PY
