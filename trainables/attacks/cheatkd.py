"""CheatKD: a backdoor in a teacher that survives feature distillation.

Paper: Chen Jinyin, Li Xiao, Jin Haibo, Chen Ruoxi, Zheng Haibin and Li Hu, "CheatKD: Knowledge
Distillation Backdoor Attack Method Based on Poisoned Neuronal Assimilation" (in Chinese),
Computer Science (计算机科学) 51(3): 351–359, 2024. No public code exists: this is the reference
implementation. Equation, section and table numbers below are the paper's.

1. Trigger P (3×H×W) and mask M (H×W), initialised uniform; a poisoned input is

       x* = (1 − M)·x + M·P                                            (Eq. 1)

2. Poisoned layer: the end of layer group ``layer`` (default the last one, where feature
   distillation reads), or with ``layers`` all every group distillation reads. A batch of
   triggered images goes through the CLEAN model; the poisoned neurons N* of a poisoned layer are
   its ``num_neurons`` channels with the largest mean activation (Sec. 3.2.1; ties: lowest index,
   Sec. 3.2.2).
3. δ, the value the poisoned neurons are driven to, is taken from their activation distribution
   on that batch (Sec. 4.2.4): ``mean`` (the paper's choice, Table 6's best), ``max``, ``min``,
   ``mid`` = (max+min)/2, ``quarter`` = (max+min)/4 (Table 6's five points), or ``quantile``
   (any quantile ``delta_quantile`` in [0, 1]; a rule rather than an optional float so that a
   sweep can search both in one space).
4. P and M are optimised (Adam, lr 0.001, M clamped to [0, ``mask_max``], P to [0, 1]) while N*
   and δ stay fixed, minimising the poisoned-neuron assimilation loss

       L = Σ_{i∈N*} (I_i − δ_i)²                                       (Eq. 3)

   averaged over the images of a batch (N*: the poisoned neurons of every poisoned layer).
5. The teacher is trained on clean images plus triggered images relabelled to the target (the
   attack stage's standard poisoning path), starting from the clean model of step 2, at the
   stage's ``train`` lr or ``teacher_lr``.
6. ``post_train``: the victim distils a student from the backdoored teacher on CLEAN data only
   (``trainables.kd``; Heo et al.'s overhaul feature KD by default, as in the paper); the
   student's BA/ASR/RA are the attack's figures. It also logs Eq. 3 of the final trigger on the
   FINAL teacher (``teacher_trigger_loss``) beside its value on the clean model it was fitted on
   (``trigger_loss_clean_model``): whether the poisoned training moved the poisoned neurons.

What the paper leaves open, and what this implementation chose:

* "Neuron" and "activation": a neuron of the poisoned layer is a channel of the layer group's raw
  output (the tap distillation reads), and its activation I_i on an image is that channel's
  spatial mean (the same quantity for selection, δ and Eq. 3). Eq. 2's matrix per sample is
  averaged over samples to select the neurons; δ's distribution is the per-image values I_i.
  With n > 1 neurons, every neuron gets its own δ_i from its own distribution.
* The paper selects neurons and δ "on the teacher" before poisoning it: here on the clean model
  of the same dataset/architecture/budget (``ctx.clean_model()``), with the INITIAL random trigger;
  the batch is the first ``trigger_batch_size`` images of the trigger set.
* Trigger set: the training images chosen for poisoning ("a random batch of poisoned samples"),
  at most ``trigger_samples`` of them; one trigger epoch = one pass over it in batches of
  ``trigger_batch_size``. Init: P ~ U(0, 1), M ~ U(0, mask_max) (the paper gives no mask range;
  [0, 0.2] is this implementation's choice: every pixel stays at least 80% the original image);
  projected Adam (clamp after each step).
* Step 5's starting point (``teacher_init``). The paper's teacher exists before the attack: the
  neurons are selected "in the teacher", and the final poisoned set "trains the teacher model F_t,
  making it the backdoored teacher F_t*" (Sec. 3.1). So by default (``clean``) the poisoned
  training starts from the clean model the neurons and δ were read from, for the stage's
  ``train`` budget: the channels the trigger was optimised against are the teacher's own.
  ``scratch`` trains a fresh model from the same seed instead (same initial weights and batch
  order as the clean model), where nothing ties the new teacher's channels to N*.
* Step 5's lr (``teacher_lr``): the paper's "lr 0.001, 300 epochs" (Sec. 4.1.5) may describe the
  teacher's poisoned training, not the trigger; by default (None) the teacher is trained at the
  stage's ``train`` lr with a fresh schedule (e.g. 0.1, which can move the very channels the
  trigger was fitted to); ``teacher_lr`` 0.001 is the other reading (the schedule's shape kept).
* Poisoned layers (``layers``): the paper's "one poisoned neuron per poisoned layer" (Sec. 4.1.5)
  and "the end of the layer groups as the poisoned layer" (Sec. 3.2.1) leave open how many layers
  are poisoned; ``last`` (default) poisons the one distillation layer ``layer`` (the abstract's
  "a particular distillation layer"), ``all`` every group distillation reads (every
  tap of ``model.features``), ``num_neurons`` neurons each with δ from its own distribution, and
  Eq. 3 summed over all of them (the groups unweighted).
* The paper's "lr 0.001, 300 epochs" (Sec. 4.1.5) is read as the trigger optimisation's Adam lr
  and epochs; the distillation follows the KD paper it cites ([33], Heo et al.: SGD nesterov
  lr 0.1, wd 5e-4, batch 128, 200 epochs, ÷10 at 1/2 and 3/4).
* Distillation data: the clean training set ``post_train`` receives (every row's original image
  and label, the poisoned rows in their clean form; see ``Attack.post_train``), with crop + flip.
* Poison rate: the paper gives none; 10% (the BadNets/Blend default here, NBA Table 1's rate).
* The student defaults to WRN-16-1 (this project's victim; the paper's pair is WRN-28-4 ->
  WRN-16-4, which a preset sets with ``model`` and ``student_model``).
* Distillation budget, measured on CIFAR-10 (docs/measurements.md; 4-epoch teacher stages, 50
  trigger epochs, WRN-16-1 → WRN-16-1, overhaul KD): the student's ASR grows with the budget,
  12.9% after 4 epochs and 33.1% after 20 (BA 82.00), while a student distilled the same way
  from a BadNets teacher stays at 1.8% and 2.0%.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from trainables import rundir
from trainables.attacks.base import Attack, AttackParams, FitContext, PostTrainResult
from trainables.data.base import ImageSet
from trainables.data.loader import batches, to_float
from trainables.engine import SGDConfig, autocast
from trainables.kd import METHODS as KD_METHODS, distill, heo_sgd
from trainables.models import build_model
from trainables.params import param
from trainables.registry import register_attack

DELTA_RULES = ("mean", "max", "min", "mid", "quarter", "quantile")
TEACHER_INITS = ("clean", "scratch")
LAYERS = ("last", "all")


@dataclass(frozen=True)
class Params(AttackParams):
    poison_rate: float = param(0.1, "poisoned fraction of the training set (paper: not stated; "
                                    "10% as BadNets/Blend)", low=0.0, high=1.0)
    layer: int = param(-1, "layer group whose end is the poisoned layer (paper: the distillation "
                           "layer; -1 = the last group)")
    layers: str = param("last", "poisoned layers: last = the one group `layer` | all = every group "
                                "distillation reads, num_neurons neurons and δ each, Eq. 3 summed over "
                                "them (paper Sec. 4.1.5: 'one poisoned neuron per poisoned layer'; read: last)",
                        choices=LAYERS)
    num_neurons: int = param(1, "number n of poisoned neurons per poisoned layer (paper: 1; ASR holds "
                                "for n <= 9)", low=1)
    delta_rule: str = param("mean", "δ from the poisoned neurons' activations: mean|max|min|"
                                    "mid=(max+min)/2|quarter=(max+min)/4 (paper: mean, Table 6) or "
                                    "quantile (delta_quantile)", choices=DELTA_RULES)
    delta_quantile: float = param(0.5, "δ's quantile of the activations, used when delta_rule is "
                                       "quantile (0 = min, 1 = max)", low=0.0, high=1.0)
    trigger_lr: float = param(0.001, "Adam lr of the trigger P and mask M (paper: 0.001)", low=1e-6, high=1.0)
    trigger_epochs: int = param(300, "passes over the trigger set (paper: 300 epochs)", low=0)
    trigger_samples: int = param(1024, "images the trigger is optimised on (the poisoned ones, at most "
                                       "this many; paper: not stated)", low=1)
    trigger_batch_size: int = param(128, "batch size of neuron selection and trigger optimisation", low=1)
    mask_max: float = param(0.2, "upper clamp of the mask M (paper: not given; [0, 0.2] by default)",
                            low=0.0, high=1.0)
    teacher_init: str = param("clean", "the poisoned training starts from: clean = the clean model the "
                                       "neurons were read from (paper Sec. 3.1: F_t becomes F_t*) | "
                                       "scratch = a fresh model, same seed", choices=TEACHER_INITS)
    teacher_lr: float | None = param(None, "lr of the teacher's poisoned training, step 5 (None = the stage's "
                                           "train lr; paper: Sec. 4.1.5's 'lr 0.001' may be this one, read "
                                           "here as the trigger's)", low=0.0, high=1.0)
    student_model: str = param("wrn-16-1", "the victim's student architecture (paper: WRN-16-4 "
                                           "from a WRN-28-4 teacher)")
    kd_method: str = param("overhaul", "the victim's distillation: overhaul (Heo et al. 2019, the "
                                       "paper's) | at | logit", choices=KD_METHODS)
    kd_epochs: int = param(200, "distillation epochs (Heo et al. CIFAR-100: 200; 0 = no student in the "
                                "stage: the kd defense distils it, as for any other attack)", low=0)
    kd_lr: float = param(0.1, "distillation lr, ÷10 at 1/2 and 3/4 (Heo et al.: 0.1)", low=1e-6, high=1.0)
    kd_batch_size: int = param(128, "distillation batch size (Heo et al.: 128)", low=1)


# ============================================================================ the pieces

def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x* = (1 − M)·x + M·P`` (Eq. 1) on a float [0, 1] batch."""
    return (1 - mask) * x + mask * pattern


def neuron_activations(model: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """B×C: every channel's spatial-mean activation at the end of layer group ``layer`` (the
    activations I of Eq. 2, one value per neuron and image)."""
    taps, _ = model.features(x)
    return taps[layer].float().mean(dim=(2, 3))


def select_neurons(acts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` channels with the largest mean activation over the batch; ties go to the lowest
    index (a stable descending sort)."""
    order = torch.sort(acts.mean(0), descending=True, stable=True).indices
    return order[:n].clone()


def delta_values(acts: torch.Tensor, rule: str = "mean", quantile: float = 0.5) -> torch.Tensor:
    """δ per neuron from its activations over the batch (``acts``: B×n): the rule's statistic
    (Sec. 4.2.4, Table 6), or the ``quantile`` of the activations for rule ``quantile``."""
    acts = acts.float()
    hi, lo = acts.max(0).values, acts.min(0).values
    rules = {"mean": lambda: acts.mean(0), "max": lambda: hi, "min": lambda: lo,
             "mid": lambda: (hi + lo) / 2, "quarter": lambda: (hi + lo) / 4,
             "quantile": lambda: torch.quantile(acts, float(quantile), dim=0)}
    if rule not in rules:
        raise ValueError(f"unknown delta rule {rule!r}; known: {', '.join(DELTA_RULES)}")
    return rules[rule]()


def trigger_rows(index: torch.Tensor, n_train: int, samples: int, seed: int) -> torch.Tensor:
    """The training rows the trigger is optimised on: a seeded draw of at most ``samples`` of the
    rows chosen for poisoning (of all rows when none are)."""
    pool = index if len(index) else torch.arange(n_train)
    gen = torch.Generator().manual_seed(seed + 3)
    return pool[torch.randperm(len(pool), generator=gen)[:samples]]


def assimilation_loss(acts: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``Σ_{i∈N*} (I_i − δ_i)²`` (Eq. 3), averaged over the images of the batch (``acts``: B×n)."""
    return (acts - delta).pow(2).sum(1).mean()


def select_poisoned(acts: list[torch.Tensor], groups: list[int], n: int, rule: str = "mean",
                    quantile: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The poisoned neurons of every poisoned layer: for each group ``g`` of ``groups``, the ``n``
    channels of ``acts[g]`` (B×C_g) with the largest mean and their δ from their own activations.
    Returns (group of each neuron, its channel, its δ), concatenated group after group."""
    group_of, neurons, delta = [], [], []
    for g in groups:
        chosen = select_neurons(acts[g], n)
        group_of.append(torch.full_like(chosen, g))
        neurons.append(chosen)
        delta.append(delta_values(acts[g][:, chosen], rule, quantile))
    return torch.cat(group_of), torch.cat(neurons), torch.cat(delta)


def gather_poisoned(acts, groups: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """B×n: the activations of the poisoned neurons (``groups[k]``'s channel ``neurons[k]``, in
    that order) from ``acts``, group -> B×C_g (a list or a dict)."""
    return torch.stack([acts[g][:, i] for g, i in zip(groups.tolist(), neurons.tolist())], dim=1)


def poisoned_activations(model: nn.Module, x: torch.Tensor, groups: torch.Tensor,
                         neurons: torch.Tensor) -> torch.Tensor:
    """B×n: the poisoned neurons' spatial-mean activations on ``x`` (one forward, every group)."""
    taps, _ = model.features(x)
    acts = {g: taps[g].float().mean(dim=(2, 3)) for g in set(groups.tolist())}
    return gather_poisoned(acts, groups, neurons)


# ============================================================================ the attack

@register_attack
class CheatKD(Attack):
    name: ClassVar[str] = "cheatkd"
    kind: ClassVar[str] = "poison-label"
    Params: ClassVar[type] = Params
    summary: ClassVar[str] = ("blended trigger optimised to pin the teacher's top distillation-layer "
                              "neurons at δ; the backdoor survives feature KD into a student")
    paper: ClassVar[str] = "Chen et al., CheatKD, Computer Science 51(3) 2024"
    needs_clean_model: ClassVar[bool] = True
    report_metrics: ClassVar[tuple[str, ...]] = ("student_asr", "student_ba")

    @classmethod
    def extra_passes(cls, p, n_train: int) -> float:
        # the trigger's optimisation, then the student's distillation (teacher forwards at 1/3)
        return p.trigger_epochs * p.trigger_samples + p.kd_epochs * n_train * 4 / 3

    def fit(self, ctx: FitContext, train: ImageSet, index: torch.Tensor) -> None:
        """Select the poisoned neurons and δ, then optimise P and M (steps 1-4)."""
        p, rt = self.params, ctx.rt
        model = ctx.clean_model()
        model.eval()
        gen = torch.Generator().manual_seed(p.poison_seed)
        size = self.image_size
        pattern = torch.rand(3, size, size, generator=gen).to(rt.device)
        mask = (torch.rand(size, size, generator=gen) * p.mask_max).to(rt.device)

        images = train.x[trigger_rows(index, len(train), p.trigger_samples, p.poison_seed)].to(rt.device)
        groups = self._poisoned_groups(model, images[:1])

        # steps 2-3: neurons and δ of every poisoned layer from the first batch, triggered with the
        # initial P and M
        with torch.no_grad(), autocast(rt):
            taps, _ = model.features(stamp(to_float(images[:p.trigger_batch_size]), pattern, mask))
            acts = [t.float().mean(dim=(2, 3)) for t in taps]
        group_of, neurons, delta = select_poisoned(acts, groups, p.num_neurons, p.delta_rule, p.delta_quantile)
        for g in groups:
            ctx.progress(f"cheatkd: poisoned neurons {neurons[group_of == g].tolist()} of group {g}, "
                         f"δ = {[round(v, 4) for v in delta[group_of == g].tolist()]} ({p.delta_rule})")

        # step 4: optimise P and M with the neurons and δ fixed
        pattern, mask, losses = self._optimise(model, images, group_of, neurons, delta, pattern, mask, ctx)
        # tensors only (attack_state.pt loads with weights_only=True): the poisoned neurons of every
        # poisoned layer as three aligned vectors, neuron k being group neuron_group[k]'s channel
        # neurons[k], driven to delta[k]
        self.state = {"pattern": pattern.detach().cpu(), "mask": mask.detach().cpu(),
                      "neurons": neurons.cpu(), "delta": delta.cpu(), "neuron_group": group_of.cpu(),
                      "layer": torch.tensor(p.layer), "trigger_loss": torch.tensor(losses)}

    def initial_model(self, ctx: FitContext) -> nn.Module | None:
        """Step 5 starts from the clean model of steps 2-4 (``teacher_init`` clean) or fresh."""
        return ctx.clean_model() if self.params.teacher_init == "clean" else None

    def training_config(self, cfg: SGDConfig) -> SGDConfig:
        """Step 5's SGD: the stage's ``cfg`` at ``teacher_lr`` when set (a piecewise schedule's
        values scaled with it: the schedule's shape is kept)."""
        lr = self.params.teacher_lr
        if lr is None:
            return cfg
        values = tuple(v * lr / cfg.lr for v in cfg.lr_values) if cfg.lr > 0 else cfg.lr_values
        return dataclasses.replace(cfg, lr=lr, lr_values=values)

    def _poisoned_groups(self, model: nn.Module, x_u8: torch.Tensor) -> list[int]:
        """The poisoned layers' group indices (non-negative): ``layer``'s, or every group's."""
        p = self.params
        with torch.no_grad():
            taps, _ = model.features(to_float(x_u8))
        if p.layers == "all":
            groups = list(range(len(taps)))
        elif not -len(taps) <= p.layer < len(taps):
            raise ValueError(f"cheatkd.layer={p.layer} but the model has {len(taps)} layer groups")
        else:
            groups = [p.layer % len(taps)]
        for g in groups:
            if p.num_neurons > taps[g].shape[1]:
                raise ValueError(f"cheatkd.num_neurons={p.num_neurons} but layer group {g} has "
                                 f"{taps[g].shape[1]} channels")
        return groups

    def _optimise(self, model: nn.Module, images: torch.Tensor, groups: torch.Tensor, neurons: torch.Tensor,
                  delta: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, ctx: FitContext):
        """Projected Adam on (P, M) for ``trigger_epochs`` passes; returns P, M and the mean loss
        before optimisation followed by the mean loss of every epoch."""
        p, rt = self.params, ctx.rt
        pattern = pattern.clone().requires_grad_(True)
        mask = mask.clone().requires_grad_(True)
        opt = torch.optim.Adam([pattern, mask], lr=p.trigger_lr)
        gen = torch.Generator(device=rt.device).manual_seed(p.poison_seed)
        labels = torch.zeros(len(images), dtype=torch.long, device=rt.device)
        losses = [self._mean_loss(model, images, groups, neurons, delta, pattern, mask, rt)]
        for epoch in range(p.trigger_epochs):
            total, count = 0.0, 0
            for xb, _, _ in batches(images, labels, p.trigger_batch_size, generator=gen, shuffle=True):
                with autocast(rt):
                    acts = poisoned_activations(model, stamp(xb, pattern, mask), groups, neurons)
                loss = assimilation_loss(acts, delta)
                # gradients to P and M only: the clean model's parameters are left untouched
                pattern.grad, mask.grad = torch.autograd.grad(loss, (pattern, mask))
                opt.step()
                with torch.no_grad():
                    pattern.clamp_(0, 1)
                    mask.clamp_(0, p.mask_max)
                total, count = total + loss.item() * len(xb), count + len(xb)
            losses.append(total / count)
            if (epoch + 1) % max(1, p.trigger_epochs // 10) == 0 or epoch + 1 == p.trigger_epochs:
                ctx.progress(f"cheatkd trigger epoch {epoch + 1}/{p.trigger_epochs}: loss {losses[-1]:.5g} "
                             f"(start {losses[0]:.5g})")
        return pattern.detach(), mask.detach(), losses

    def _mean_loss(self, model, images, groups, neurons, delta, pattern, mask, rt) -> float:
        """Eq. 3 of the trigger (P, M) on ``model``, averaged over the uint8 ``images``."""
        total = 0.0
        with torch.no_grad(), autocast(rt):
            for s in range(0, len(images), self.params.trigger_batch_size):
                xb = to_float(images[s:s + self.params.trigger_batch_size])
                acts = poisoned_activations(model, stamp(xb, pattern, mask), groups, neurons)
                total += assimilation_loss(acts, delta).item() * len(xb)
        return total / len(images)

    def trigger_losses(self, ctx: FitContext, model: nn.Module, train: ImageSet) -> dict:
        """Eq. 3 of the final trigger on ``model`` (the trained teacher) beside its value on the
        clean model (the last entry of the optimisation's losses: the mean over its last epoch)."""
        p, s, rt = self.params, self.state, ctx.rt
        # the trigger set of ``fit``: the stage's poisoned rows are ``select(train.y)`` (seeded by
        # poison_seed, the same draw ``fit`` was given), and ``train`` holds their clean images
        rows = trigger_rows(self.select(train.y), len(train), p.trigger_samples, p.poison_seed)
        groups = s.get("neuron_group")
        if groups is None:          # a state saved before several poisoned layers existed
            groups = torch.full_like(s["neurons"], int(s["layer"]))
        was_training = model.training
        model.eval()
        try:
            loss = self._mean_loss(model, train.x[rows].to(rt.device), groups, s["neurons"], s["delta"].to(rt.device),
                                   s["pattern"].to(rt.device), s["mask"].to(rt.device), rt)
        finally:
            model.train(was_training)
        return {"teacher_trigger_loss": loss, "trigger_loss_clean_model": float(s["trigger_loss"][-1])}

    def apply(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pattern = self.state["pattern"].to(x.device, x.dtype)
        mask = self.state["mask"].to(x.device, x.dtype)
        return stamp(x, pattern, mask).clamp(0, 1)

    def post_train(self, ctx: FitContext, model: nn.Module, model_spec: dict, train: ImageSet,
                   evaluate: Callable[[nn.Module], dict]) -> PostTrainResult:
        """Step 6: the victim distils a fresh student from the backdoored teacher ``model`` on the
        clean training set ``train``; the student's BA/ASR/RA are the attack's figures."""
        p = self.params
        losses = self.trigger_losses(ctx, model, train)
        ctx.progress(f"cheatkd: Eq. 3 of the final trigger on the trained teacher {losses['teacher_trigger_loss']:.5g} "
                     f"(on the clean model: {losses['trigger_loss_clean_model']:.5g})")
        if p.kd_epochs == 0:        # no student here: the kd defense distils one (its CheatKD preset)
            return PostTrainResult(metrics=losses, models={})
        mean, std, classes = model_spec["mean"], model_spec["std"], model_spec["num_classes"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            student = build_model(p.student_model, classes, mean=mean, std=std)
        ctx.progress(f"cheatkd: distilling {p.student_model} from the teacher with {p.kd_method} KD "
                     f"({len(train)} clean images, {p.kd_epochs} epochs)")
        history = distill(student, model, train, p.kd_method, heo_sgd(p.kd_epochs, p.kd_lr, p.kd_batch_size),
                          ctx.rt, seed=ctx.seed, progress=ctx.progress)
        m = evaluate(student)
        metrics = {"student_ba": m.get("ba"), "student_asr": m.get("asr"), "student_ra": m.get("ra"), **losses}
        if history:
            metrics["student_kd_loss"] = history[-1]["loss"]
        ctx.progress("cheatkd student: " + " ".join(f"{k}={100 * v:.2f}%" for k, v in metrics.items()
                                                    if k.startswith("student_") and k != "student_kd_loss"
                                                    and v is not None))
        spec = rundir.model_spec(p.student_model, classes, mean, std)
        return PostTrainResult(metrics=metrics, models={"student": (student, spec)})
