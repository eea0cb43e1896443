#!/bin/sh
# SeaweedFS with one S3 identity whose keys come from the environment (no keys in any file of
# the repository); data in /data.
set -eu
: "${S3_ACCESS_KEY:?}" "${S3_SECRET_KEY:?}"
umask 077
cat > /tmp/s3.json <<JSON
{"identities": [{"name": "backdoor-sweep",
  "credentials": [{"accessKey": "${S3_ACCESS_KEY}", "secretKey": "${S3_SECRET_KEY}"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
exec weed server -dir=/data -s3 -s3.port=8333 -s3.config=/tmp/s3.json
