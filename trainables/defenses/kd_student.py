"""KD: distil a fresh student from the suspicious model on clean data (the victim's distillation).

A user who downloads a teacher and distils their own student from it, on clean data only, is the
victim CheatKD targets (Chen, Li, Jin, Chen, Zheng and Li, "CheatKD: a knowledge-distillation
backdoor attack method based on poisoned-neuron assimilation", Computer Science 51(3), 2024,
Sec. 4.1.5). As a defense it asks whether a backdoor survives the distillation: an ordinary
backdoor (BadNets) does not reach the student (the paper's control: student ASR 0.4%), CheatKD's
is built to (96.1%). The "defended" model is the student; its BA / ASR / RA are the student's.

The distillation is ``trainables.kd.distill`` (the same call as CheatKD's own step 6):
``overhaul`` (Heo et al., ICCV 2019, the paper's), ``at`` or ``logit``, with Heo et al.'s
CIFAR-100 schedule (``kd.heo_sgd``: nesterov SGD lr 0.1, ÷10 at 1/2 and 3/4 of the epochs, wd
5e-4, batch 128, 200 epochs) and crop + flip.

* **Data.** The clean subset (the stage's ``clean_fraction``, drawn from the images the attack
  did not poison). A preset reproducing the victim sets ``clean_fraction: 1.0``: every clean
  training image, which is CheatKD's step 6 less the poisoned images' clean versions (45,000
  instead of 50,000 images at a 10% poison rate), the same set for every attack it is compared on.
* **Student.** A fresh model, initialised from the defense seed, of ``student_model``: the
  suspicious model's architecture by default, or another (the paper's pair: WRN-28-4 teacher,
  WRN-16-4 student); the saved run's spec.json names the student's.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trainables import kd
from trainables.defenses._common import epoch_logger
from trainables.defenses.base import Cost, Defense, DefenseContext
from trainables.models import check_model_name
from trainables.params import param
from trainables.registry import register_defense


@dataclass(frozen=True)
class Params:
    student_model: str | None = param(None, "the student's architecture (None: the suspicious model's; "
                                            "CheatKD's pair: a wrn-28-4 teacher, a wrn-16-4 student)")
    method: str = param("overhaul", "distillation: overhaul (Heo et al. 2019; CheatKD's victim) | at | logit",
                        choices=kd.METHODS)
    epochs: int = param(200, "distillation epochs (Heo et al. CIFAR-100: 200)", low=1)
    lr: float = param(0.1, "initial lr, ÷10 at 1/2 and 3/4 of the epochs (Heo et al.: 0.1)", low=1e-6, high=1.0)
    batch_size: int = param(128, "batch size (Heo et al.: 128)", low=1)
    weight: float | None = param(None, "weight of the distillation term (None: the method's own, "
                                       "trainables.kd.DEFAULT_WEIGHT)", low=0.0)
    temperature: float = param(kd.DEFAULT_TEMPERATURE, "softmax temperature of the logit method (4)", low=1e-3)

    def __post_init__(self):
        if self.student_model is not None:
            try:        # a bad architecture name fails at the boundary, before any work
                check_model_name(self.student_model)
            except ValueError as e:
                raise ValueError(f"student_model: {e}") from None


@register_defense
class StudentDistillation(Defense):
    name = "kd"
    kind = "post-training"
    Params = Params
    summary = "distil a fresh student from the model on clean data (does the backdoor reach it?)"
    paper = "the victim of CheatKD (Chen et al. 2024); Heo et al. 2019"

    @classmethod
    def cost(cls, p, n_images: int) -> Cost:
        # the student's forward + backward and the frozen teacher's forward (1/3 of a pass)
        return Cost(passes=p.epochs * n_images * 4 / 3, logged_epochs=p.epochs)

    def run(self, ctx: DefenseContext) -> nn.Module:
        p = self.params
        student = ctx.build_model(p.student_model)
        ctx.output_model = p.student_model
        ctx.progress(f"distilling a fresh student with {p.method} KD ({len(ctx.clean)} clean images, "
                     f"{p.epochs} epochs)")
        kd.distill(student, ctx.model, ctx.clean, p.method, kd.heo_sgd(p.epochs, p.lr, p.batch_size), ctx.rt,
                   seed=ctx.seed, weight=p.weight, temperature=p.temperature,
                   on_epoch=epoch_logger(ctx, "kd", student), progress=ctx.progress)
        return student.eval()
