"""Test plugin for a driver killed between a trial's attack stages. Every stage a fine-tuning
trial finishes is appended to ``defended.log`` in the trials folder as "<lr> <stage seed>". The
first trial to reach a stage other than the first pauses there for good (``plugin_helpers``)."""
from trainables.defenses.ft import FineTuning
from trainables.plugins import register_trial_hook

from plugin_helpers import claim, pause_for_good, trial_id_of


@register_trial_hook
def pause_second_stage(case, out_dir):
    lr = case.params_dict.get("lr")
    trials = out_dir.parent
    trials.mkdir(parents=True, exist_ok=True)
    run = FineTuning.run

    def logged_run(self, ctx):
        if ctx.seed != 0 and claim(trials / ".paused"):
            pause_for_good(trial_id_of(out_dir))
        model = run(self, ctx)
        with open(trials / "defended.log", "a") as f:
            f.write(f"{lr} {ctx.seed}\n")
        return model

    FineTuning.run = logged_run          # this trial's worker process only
