"""Test plugin: the first trial whose ``lr`` is below 0.1 fails (once per sweep: the first such
trial claims the failure with a marker file in the trials folder)."""
import os

from trainables.plugins import register_trial_hook


class InjectedFailure(RuntimeError):
    pass


@register_trial_hook
def fail_first_low_lr(case, out_dir):
    lr = case.params_dict.get("lr")
    if lr is None or lr >= 0.1:
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(out_dir.parent / ".injected-failure", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise InjectedFailure(f"injected failure for lr={lr!r}")
