"""Test plugin for a driver killed between a trial's attack stages. Every stage a fine-tuning
trial finishes is appended to ``defended.log`` in the trials folder as "<lr> <stage seed>". The
first trial to reach a stage other than the first pauses there for good (``plugin_helpers``)."""
from trainables.plugins import register_trial_hook

from plugin_helpers import claim, log_defended_stages, pause_for_good, trial_id_of


@register_trial_hook
def pause_second_stage(case, out_dir):
    def pause_at_second_stage(lr, ctx, trials):
        if ctx.seed != 0 and claim(trials / ".paused"):
            pause_for_good(trial_id_of(out_dir))

    log_defended_stages(case, out_dir, before=pause_at_second_stage)
