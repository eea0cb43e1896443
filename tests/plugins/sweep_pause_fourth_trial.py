"""Test plugin: the fourth trial of a sweep to start pauses for good, once Ray Tune's saved
experiment state knows it, after telling the test through a FIFO; the test then kills the driver
at a known point (two trials done, two running, all four in the state a resumed Tuner restores).

Where things are comes from the environment, since a trial's own folder says nothing of it when
its outputs go to a storage: ``PAUSE_FIFO`` (the FIFO), ``PAUSE_COUNTERS`` (a folder to count
trial starts in) and ``PAUSE_STATE_GLOB`` (the Tune experiment-state files to look in)."""
import os
from pathlib import Path

from trainables.plugins import register_trial_hook

from plugin_helpers import claim, pause_for_good, trial_id_of

PAUSE_AT = 4


def _claim_start_number(counters: Path) -> int:
    counters.mkdir(parents=True, exist_ok=True)
    n = 1
    while not claim(counters / f".started-{n}"):
        n += 1
    return n


@register_trial_hook
def pause_fourth(case, out_dir):
    if _claim_start_number(Path(os.environ["PAUSE_COUNTERS"])) != PAUSE_AT:
        return
    pause_for_good(trial_id_of(out_dir))
