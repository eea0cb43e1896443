"""Test plugin for sweeps over several attack stages. Fine-tuning at lr 0.15 dies once at its
second stage, as if its node were lost there (the trial claims the crash with a marker file in
the trials folder); fine-tuning at lr 0.2 returns an untrained model, so that early stopping
stops it at its first rung. Every stage a fine-tuning trial finishes is appended to
``defended.log`` in the trials folder as "<lr> <stage seed>"."""

from trainables.plugins import register_trial_hook

from plugin_helpers import claim, log_defended_stages

CRASH_LR, WEAK_LR = 0.15, 0.2


class NodeLost(RuntimeError):
    pass


@register_trial_hook
def stage_faults(case, out_dir):
    def crash_once_at_second_stage(lr, ctx, trials):
        if lr == CRASH_LR and ctx.seed != 0 and claim(trials / ".injected-crash"):
            raise NodeLost(f"injected crash at the stage of seed {ctx.seed}")

    def weak_model(lr, ctx, model):
        return ctx.build_model() if lr == WEAK_LR else model

    log_defended_stages(case, out_dir, before=crash_once_at_second_stage, after=weak_model)
