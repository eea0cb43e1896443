"""The README's MLflow screenshot: the runs view a sweep links to, opened in headless Chromium.

Starts ``mlflow ui`` on 127.0.0.1 over a sweep's work directory (its ``mlflow.db``), opens the
link the sweep printed (``--link``; without it, the experiment's shared runs view, the
``viewStateShareKey`` its sweep stored), waits for the runs table, closes the UI's assistant
panel, saves a PNG and, with ``--table``, writes what the page shows (the runs table's columns
and rows and the sidebar's entries, read from the DOM) as JSON::

    python tools/mlflow_screenshot.py sweep-runs [--link URL] [--out docs/img/quickstart_mlflow_compare.png]
        [--experiment quickstart] [--table table.json]

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``; another
binary through ``SWEEP_CHROMIUM`` / ``SWEEP_CHROMEDRIVER``) and the ``selenium`` package (in the
test extras).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "quickstart_mlflow_compare.png"
SHARED_VIEW_TAG = "mlflow.sharedViewState."      # the experiment tag a viewStateShareKey link reads
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'
# every rendered row of the runs table (AG Grid splits a row over its pinned and scrolling parts,
# each carrying the row's index), and the header cells, each keyed by the column's id
READ_TABLE_JS = """
const columns = [...document.querySelectorAll('.ag-header-cell[col-id]')]
  .map(h => ({id: h.getAttribute('col-id'), text: h.innerText.trim()}));
const rows = {};
for (const part of document.querySelectorAll('.ag-row[row-index]')) {
  const cells = rows[part.getAttribute('row-index')] ??= {};
  for (const c of part.querySelectorAll('.ag-cell[col-id]')) cells[c.getAttribute('col-id')] = c.innerText.trim();
}
const count = document.body.innerText.match(/(\\d+) matching runs?/);
const nav = document.querySelector('nav');
return {columns, matching_runs: count ? Number(count[1]) : null,
        sidebar: nav ? nav.innerText.split('\\n').map(s => s.trim()).filter(Boolean) : [],
        rows: Object.keys(rows).sort((a, b) => a - b).map(i => rows[i])};
"""


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None where either is missing."""
    chromium = os.environ.get("SWEEP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("SWEEP_CHROMEDRIVER") or shutil.which("chromedriver")
    if chromium and driver and Path(chromium).is_file() and Path(driver).is_file():
        return chromium, driver
    return None


def shared_view_path(tracking_uri: str, experiment: str) -> str:
    """The UI path of the experiment's shared runs view, in the UI's model-training mode, as the
    sweep links to it (``#/experiments/<id>/runs?viewStateShareKey=...&workflowType=machine_learning``)."""
    from mlflow import MlflowClient

    exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: {tracking_uri} has no experiment named {experiment!r}")
    views = sorted(k[len(SHARED_VIEW_TAG):] for k in exp.tags if k.startswith(SHARED_VIEW_TAG))
    if not views:
        raise SystemExit(f"error: experiment {experiment!r} in {tracking_uri} has no shared runs view "
                         f"(a sweep stores one when it starts)")
    return f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey={views[0]}&workflowType=machine_learning"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(tracking_uri: str, log: Path, timeout: float = 180.0):
    """A ``mlflow ui`` on 127.0.0.1 over ``tracking_uri``; yields its base URL, stops it after."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: mlflow ui did not start (see {log})")
                time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)      # its own process group: the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def headless_chromium(chromium: str, driver: str, width: int, height: int):
    """A Selenium driver of a headless Chromium with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(driver), options=options)
        try:
            yield browser
        finally:
            browser.quit()


def _wait_for_table(browser, timeout: float) -> dict:
    """The runs table once its row count has held for two seconds (the UI fills it in steps)."""
    deadline, last, held = time.monotonic() + timeout, None, 0
    while time.monotonic() < deadline:
        table = browser.execute_script(READ_TABLE_JS)
        shape = (len(table["rows"]), table["matching_runs"])
        held = held + 1 if shape == last and table["rows"] else 0
        if held >= 4:
            return table
        last = shape
        time.sleep(0.5)
    raise SystemExit(f"error: the runs table did not settle within {timeout:.0f} s")


def capture(workdir: Path, out: Path, experiment: str = "quickstart", link: str | None = None,
            width: int = 1600, height: int = 1100, timeout: float = 120.0) -> dict:
    """Open a sweep's runs view over ``workdir/mlflow.db``, save ``out`` (PNG) and return what
    the page shows.

    Args:
        workdir: a sweep's work directory holding ``mlflow.db``.
        out: where the PNG goes.
        experiment: the MLflow experiment (a sweep's is its preset's name).
        link: the link the sweep printed (``http://…/#/experiments/…``; only its part from ``#/``
            is used); None: the experiment's shared runs view.
        width, height: the browser window, in CSS pixels.
        timeout: seconds to wait for the runs table.

    Returns:
        ``{"url", "columns": [{"id", "text"}], "rows": [{column id: cell text}], "matching_runs",
        "sidebar": [entry]}``, rows in the order the page shows them.
    """
    db = workdir / "mlflow.db"
    if not db.is_file():
        raise SystemExit(f"error: {db} does not exist (give the work directory of a sweep)")
    browser_paths = find_browser()
    if browser_paths is None:
        raise SystemExit("error: Chromium or its driver is missing (apt-get install chromium chromium-driver, "
                         "or set SWEEP_CHROMIUM and SWEEP_CHROMEDRIVER)")
    tracking_uri = f"sqlite:///{db.resolve()}"
    if link is None:
        path = shared_view_path(tracking_uri, experiment)
    elif "#/" in link:
        path = link[link.index("#/"):]
    else:
        raise SystemExit(f"error: --link {link!r} is not a link into the MLflow UI (it has no '#/')")
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as tmp, mlflow_ui(tracking_uri, Path(tmp) / "ui.log") as base, \
            headless_chromium(*browser_paths, width, height) as browser:
        browser.get(f"{base}/{path}")
        _wait_for_table(browser, timeout)
        for button in browser.find_elements("css selector", ASSISTANT_CLOSE):
            button.click()          # the assistant panel opens on a first visit and covers the table
        table = _wait_for_table(browser, timeout)
        out.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(out))
    return {"url": f"{base}/{path}", **table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="a sweep's work directory (holding mlflow.db)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the PNG (default {DEFAULT_OUT})")
    parser.add_argument("--experiment", default="quickstart", help="the MLflow experiment (default quickstart)")
    parser.add_argument("--link", help="the link the sweep printed (default: the experiment's shared runs view)")
    parser.add_argument("--table", type=Path, help="also write the runs table the page shows, as JSON")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1100)
    args = parser.parse_args(argv)
    table = capture(args.workdir, args.out, args.experiment, args.link, args.width, args.height)
    if args.table:
        args.table.write_text(json.dumps(table, indent=1))
    print(f"wrote {args.out}: {len(table['rows'])} runs of {table['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
