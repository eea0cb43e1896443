#!/usr/bin/env bash
# The README's MLflow comparison screenshot: a real `mlflow ui` on a sweep's SQLite store, opened
# at the view the sweep stored, rendered by headless Chromium (Debian's chromium package).
#   docs/img/screenshot.sh <workdir of a finished quickstart sweep> [out.png]
set -euo pipefail
workdir=$(cd "$1" && pwd)
out=${2:-docs/img/quickstart_mlflow_compare.png}
port=5055
python -m mlflow ui --backend-store-uri "sqlite:///$workdir/mlflow.db" --host 127.0.0.1 --port $port \
    > /tmp/mlflow-ui.log 2>&1 &
ui=$!
trap 'kill $ui' EXIT
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 1; done
exp=$(python - "$workdir" <<'PY'
import sys
from mlflow import MlflowClient
c = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
print(c.get_experiment_by_name("quickstart").experiment_id)
PY
)
url="http://127.0.0.1:$port/#/experiments/$exp/runs?viewStateShareKey=backdoor-sweep"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --window-size=2100,820 --hide-scrollbars \
    --virtual-time-budget=20000 --screenshot="$out" "$url"
echo "wrote $out ($url)"
# keep the runs table: the UI's assistant panel (right) opens on first load and shows nothing here
python - "$out" <<'PY'
import sys
from PIL import Image
img = Image.open(sys.argv[1])
img.crop((0, 0, img.width - 535, img.height)).save(sys.argv[1])
PY
