"""Test plugin for a driver killed between a trial's attack stages. Every stage a fine-tuning
trial finishes is appended to ``defended.log`` in the trials folder as "<lr> <stage seed>". The
first trial to reach a stage other than the first pauses there for good, once Ray Tune's saved
experiment state knows it, after telling the test through the FIFO ``PAUSE_FIFO``;
``PAUSE_STATE_GLOB`` names the Tune experiment-state files to look in."""
import glob
import os
import threading
import time
from pathlib import Path

from trainables.defenses.ft import FineTuning
from trainables.plugins import register_trial_hook


def _claim(marker: Path) -> bool:
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


@register_trial_hook
def pause_second_stage(case, out_dir):
    lr = case.params_dict.get("lr")
    trials = out_dir.parent
    trials.mkdir(parents=True, exist_ok=True)
    trial_id = out_dir.name.split("-")[1] if out_dir.name.startswith("trial-") else out_dir.name
    run = FineTuning.run

    def logged_run(self, ctx):
        if ctx.seed != 0 and _claim(trials / ".paused"):
            while not _state_knows(os.environ["PAUSE_STATE_GLOB"], trial_id):
                time.sleep(0.2)
            with open(os.environ["PAUSE_FIFO"], "w") as fifo:    # blocks until the test listens
                fifo.write(f"{os.getpid()}\n")
            threading.Event().wait()                              # until the test kills the sweep
        model = run(self, ctx)
        with open(trials / "defended.log", "a") as f:
            f.write(f"{lr} {ctx.seed}\n")
        return model

    FineTuning.run = logged_run          # this trial's worker process only
