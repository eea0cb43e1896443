"""Test plugin: the fourth trial of a sweep to start pauses for good, once Ray Tune's saved
experiment state knows it, after telling the test through the FIFO ``<workdir>/trial-paused.fifo``;
the test then kills the driver at a known point (two trials done, two running, all four in the
state a resumed Tuner restores)."""
import os
import threading
import time
from pathlib import Path

from trainables.plugins import register_trial_hook

PAUSE_AT = 4


def _claim_start_number(trials_dir: Path) -> int:
    trials_dir.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            os.close(os.open(trials_dir / f".started-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def _state_knows(sweep_dir: Path, trial_id: str) -> bool:
    for path in (sweep_dir / "ray").glob("*/experiment_state-*.json"):
        try:
            if trial_id in path.read_text():
                return True
        except OSError:          # replaced while we read it
            pass
    return False


@register_trial_hook
def pause_fourth(case, out_dir):
    trials_dir = out_dir.parent
    if _claim_start_number(trials_dir) != PAUSE_AT:
        return
    sweep_dir, workdir = trials_dir.parent, trials_dir.parents[2]
    while not _state_knows(sweep_dir, out_dir.name):
        time.sleep(0.2)          # Tune saves its state on its own schedule: wait for the condition
    with open(workdir / "trial-paused.fifo", "w") as fifo:   # blocks until the test listens
        fifo.write(f"{os.getpid()}\n")
    threading.Event().wait()     # paused until the test kills the sweep
