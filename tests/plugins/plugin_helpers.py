"""What the test plugins share: a once-only claim between processes, and a pause that holds a
trial until the test kills the sweep."""
import glob
import os
import threading
import time
from pathlib import Path


def claim(marker: Path) -> bool:
    """True in the one process that creates ``marker`` first."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _state_knows(pattern: str, trial_id: str) -> bool:
    for path in glob.glob(pattern):
        try:
            if trial_id in Path(path).read_text():
                return True
        except OSError:          # replaced while we read it
            pass
    return False


def pause_for_good(trial_id: str) -> None:
    """Once Ray Tune's saved experiment state (``PAUSE_STATE_GLOB``) knows the trial, say so
    through the FIFO ``PAUSE_FIFO`` and wait until the test kills the sweep."""
    while not _state_knows(os.environ["PAUSE_STATE_GLOB"], trial_id):
        time.sleep(0.2)          # Tune saves its state on its own schedule: wait for the condition
    with open(os.environ["PAUSE_FIFO"], "w") as fifo:   # blocks until the test listens
        fifo.write(f"{os.getpid()}\n")
    threading.Event().wait()


def trial_id_of(out_dir: Path) -> str:
    return out_dir.name.split("-")[1] if out_dir.name.startswith("trial-") else out_dir.name
