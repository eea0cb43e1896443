"""What the test plugins share: fine-tuning that logs each stage it defends, a once-only claim
between processes, and a pause that holds a trial until the test kills the sweep."""
import glob
import os
import threading
import time
from pathlib import Path

from trainables.defenses.ft import FineTuning


def log_defended_stages(case, out_dir: Path, before=None, after=None):
    """Wrap ``FineTuning.run`` in this trial's worker process: ``before(lr, ctx, trials)`` runs
    first; every stage the trial finishes is appended to ``defended.log`` in the trials folder as
    "<lr> <stage seed>"; ``after(lr, ctx, model)`` may replace the model it returns."""
    lr = case.params_dict.get("lr")
    trials = out_dir.parent
    trials.mkdir(parents=True, exist_ok=True)
    run = FineTuning.run

    def logged_run(self, ctx):
        if before is not None:
            before(lr, ctx, trials)
        model = run(self, ctx)
        with open(trials / "defended.log", "a") as f:
            f.write(f"{lr} {ctx.seed}\n")
        return model if after is None else after(lr, ctx, model)

    FineTuning.run = logged_run


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
