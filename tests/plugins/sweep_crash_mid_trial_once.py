"""Test plugin: the first trial of a sweep dies at its third logged epoch, as if its node were
lost there (once per sweep: the trial claims the crash with a marker file in the trials folder).
Tune retries it; the retry must go on from the trial's checkpoint."""
import os

from trainables.defenses.base import DefenseContext
from trainables.plugins import register_trial_hook


class NodeLost(RuntimeError):
    pass


@register_trial_hook
def crash_the_first_trial_once(case, out_dir):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(out_dir.parent / ".injected-crash", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log_epoch = DefenseContext.log_epoch

    def dying_log_epoch(self, stage, logs, model=None):
        if len(self.history) == 2:
            raise NodeLost(f"injected crash at step 3 ({stage})")
        return log_epoch(self, stage, logs, model)

    DefenseContext.log_epoch = dying_log_epoch      # this trial's worker process only
