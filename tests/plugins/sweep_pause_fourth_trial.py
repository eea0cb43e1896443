"""Test plugin: the fourth trial of a sweep to start pauses for good, once Ray Tune's saved
experiment state knows it, after telling the test through a FIFO; the test then kills the driver
at a known point (two trials done, two running, all four in the state a resumed Tuner restores).

Where things are comes from the environment, since a trial's own folder says nothing of it when
its outputs go to a storage: ``PAUSE_FIFO`` (the FIFO), ``PAUSE_COUNTERS`` (a folder to count
trial starts in) and ``PAUSE_STATE_GLOB`` (the Tune experiment-state files to look in)."""
import glob
import os
import threading
import time
from pathlib import Path

from trainables.plugins import register_trial_hook

PAUSE_AT = 4


def _claim_start_number(counters: Path) -> int:
    counters.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            os.close(os.open(counters / f".started-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def _state_knows(pattern: str, trial_id: str) -> bool:
    for path in glob.glob(pattern):
        try:
            if trial_id in Path(path).read_text():
                return True
        except OSError:          # replaced while we read it
            pass
    return False


@register_trial_hook
def pause_fourth(case, out_dir):
    if _claim_start_number(Path(os.environ["PAUSE_COUNTERS"])) != PAUSE_AT:
        return
    trial_id = out_dir.name.split("-")[1] if out_dir.name.startswith("trial-") else out_dir.name
    while not _state_knows(os.environ["PAUSE_STATE_GLOB"], trial_id):
        time.sleep(0.2)          # Tune saves its state on its own schedule: wait for the condition
    with open(os.environ["PAUSE_FIFO"], "w") as fifo:   # blocks until the test listens
        fifo.write(f"{os.getpid()}\n")
    threading.Event().wait()     # paused until the test kills the sweep
