#!/bin/sh
# The MLflow server with basic-auth on and proxied artifacts, configured from the environment:
#   MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_DATABASE_URI  runs; users and permissions
#   MLFLOW_ARTIFACTS_DESTINATION                         where the server stores artifacts
#   MLFLOW_BUCKETS                                       S3 buckets to create if missing (optional)
#   MLFLOW_ADMIN_USERNAME, MLFLOW_ADMIN_PASSWORD         the admin account
#   MLFLOW_FLASK_SERVER_SECRET_KEY                       signs the UI's sessions
#   MLFLOW_HOST, MLFLOW_PORT                             where it listens (default 127.0.0.1:5000)
#   MLFLOW_ALLOWED_HOSTS                                 Host headers it answers besides localhost and
#                                                        private IPs (the name clients use for it)
# Clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}"
: "${MLFLOW_ADMIN_USERNAME:?}" "${MLFLOW_ADMIN_PASSWORD:?}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"
umask 077
config="$(mktemp -d)/basic_auth.ini"
cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_ADMIN_USERNAME}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
if [ -n "${MLFLOW_BUCKETS:-}" ]; then
  python - <<PY
import os, boto3, botocore
s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL"))
for bucket in os.environ["MLFLOW_BUCKETS"].split():
    try:
        s3.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        s3.create_bucket(Bucket=bucket)
PY
fi
exec mlflow server --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  ${MLFLOW_ALLOWED_HOSTS:+--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"}
