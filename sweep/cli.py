"""``python -m sweep``: the command line.

    python -m sweep <preset> [--set key=value ...]    run a preset sweep (e.g. quickstart, nba_cifar)
    python -m sweep list                              datasets, models, attacks, defenses, presets
    python -m sweep train --dataset D --model M --epochs N --out DIR
    python -m sweep run --dataset D --model M --attack A [--defense X] [--set k=v ...] --out DIR
    python -m sweep report <sweep-id|preset> [--seeds]
    python -m sweep replicate <sweep-id|preset> --seed N   a search's selected configs and the paper
                                                      defaults, re-measured at another seed
    python -m sweep bench train [--json]
    python -m sweep bench sweep [--nodes 2 --cpus-per-node 1] [--json]
    python -m sweep bench early-stopping [--json]

Every command validates its input first and stops with one message naming what is wrong.
Exit codes: 0 done; 2 bad input (one ``error:`` line, nothing started); 3 a sweep that ended
partial (some attack stage or pair failed; the report covers what finished, ``--resume`` redoes
the rest); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

COMMANDS = ("list", "train", "run", "report", "replicate", "bench")
EXIT_PARTIAL = 3


def _print(msg: str) -> None:
    print(msg, flush=True)


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------------- --set parsing

def parse_sets(items: list[str], allowed: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``["attack.alpha=0.2", "train.epochs=5"]`` -> ``{"attack": {"alpha": "0.2"}, "train": {...}}``."""
    out: dict[str, dict[str, str]] = {k: {} for k in allowed}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UsageError(f"--set {item!r}: expected section.param=value (sections: {', '.join(allowed)})")
        if section not in allowed:
            raise UsageError(f"--set {item!r}: unknown section {section!r}; this command takes {', '.join(allowed)}")
        out[section][name] = value
    return out


# ----------------------------------------------------------------------------- commands

def cmd_list(args) -> int:
    from trainables import registry
    from trainables.data import describe_datasets
    from trainables.models import list_models, model_summary
    from trainables.params import describe

    _print("datasets:")
    for name, doc in describe_datasets().items():
        _print(f"  {name}: {doc}")
    _print("models:")
    for name in list_models():
        _print(f"  {model_summary(name)}")
    for title, methods in (("attacks", registry.attacks()), ("defenses", registry.defenses())):
        _print(f"{title}:")
        for name, cls in methods.items():
            _print(f"  {name} ({cls.kind}): {cls.summary}")
            for pname, tname, default, doc in describe(cls.Params):
                _print(f"      {pname} [{tname}] = {default!r}  {doc}")
    from trainables.recipes import RECIPE_SUMMARIES, recipe_fields

    _print("attack-training recipes (train.recipe / budget.attack.recipe; single fields override):")
    for name, summary in RECIPE_SUMMARIES.items():
        fields = recipe_fields(name)
        _print(f"  {name}: {summary}")
        _print("      " + " ".join(f"{k}={fields[k]}" for k in ("epochs", "lr", "schedule", "batch_size", "weight_decay",
                                                                "nesterov", "augment", "shuffle")))
    _print("presets:")
    for name, summary in _presets():
        _print(f"  {name}: {summary}")
    return 0


def _presets() -> list[tuple[str, str]]:
    import yaml

    from sweep.config import PRESETS_DIR

    rows = []
    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            doc = {}
        rows.append((p.stem, str(doc.get("description", "")).strip().splitlines()[0] if doc.get("description") else ""))
    return rows


def cmd_train(args) -> int:
    from trainables.engine import pick_runtime
    from trainables.stages import build_attack_stage, resolve_attack_stage

    sets = parse_sets(args.set, ("train",))["train"]
    if args.epochs is not None:
        sets["epochs"] = args.epochs
    spec = resolve_attack_stage(args.dataset, args.model, "none", {}, sets, args.seed)
    out = Path(args.out)
    build_attack_stage(spec, out, cache=args.cache, data_root=args.data_root, rt=pick_runtime(args.device),
                       progress=lambda m: _print(f"[train {spec.model} {spec.dataset}] {m}"),
                       epoch_eval_size=args.eval_size)
    _print(f"wrote {out / 'model.pt'}, {out / 'spec.json'}, {out / 'metrics.json'}")
    return 0


def cmd_run(args) -> int:
    from trainables.engine import pick_runtime
    from trainables.stages import (defend, export_artifact, load_attack_artifact, load_external,
                                   resolve_attack_stage, resolve_defense, run_attack_stage)

    sets = parse_sets(args.set, ("attack", "defense", "train"))
    clean_fraction = float(sets["defense"].pop("clean_fraction", 0.05))
    out = Path(args.out)
    rt = pick_runtime(args.device)
    # validate everything before any work
    dspec = resolve_defense(args.defense, sets["defense"], clean_fraction, args.seed) if args.defense else None
    if args.defense is None and sets["defense"]:
        raise UsageError("--set defense.* given without --defense")
    if args.model_file:
        if not (args.spec and args.defense):
            raise UsageError("--model-file needs --spec spec.json and --defense")
        art = load_external(args.model_file, args.spec, attack=args.attack, attack_params=sets["attack"],
                            data_root=args.data_root, rt=rt, progress=_print)
    else:
        if not (args.dataset and args.model and args.attack):
            raise UsageError("run needs --dataset, --model and --attack (or --model-file/--spec)")
        spec = resolve_attack_stage(args.dataset, args.model, args.attack, sets["attack"], sets["train"], args.seed)
        path = run_attack_stage(spec, args.cache, data_root=args.data_root, rt=rt, progress=_print,
                                epoch_eval_size=args.eval_size)
        if dspec is None:
            export_artifact(path, out)
            _print(f"wrote {out} (attack-stage artifact {path.name})")
            return 0
        art = load_attack_artifact(path, data_root=args.data_root)
    m = defend(art, dspec, out, rt=rt, progress=_print, epoch_eval_size=args.eval_size)
    b, a = m["before"], m["after"]
    line = f"BA {100 * b['ba']:.2f}% -> {100 * a['ba']:.2f}%"
    if "asr" in b:
        line += f", ASR {100 * b['asr']:.2f}% -> {100 * a['asr']:.2f}%, DER {m['der']:.3f}"
    _print(f"{line}; wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from sweep.bench import main as bench
    return bench(args)


def cmd_report(args) -> int:
    from sweep.analysis import layout_section, make_report, make_seeds_report
    if args.seeds:
        path = make_seeds_report(args.sweep, workdir=args.workdir, tracking_uri=args.tracking_uri, progress=_print)
        print(layout_section(path.read_text()))
        return 0
    result = make_report(args.sweep, workdir=args.workdir, tracking_uri=args.tracking_uri)
    _print(str(result))
    print(layout_section(result.markdown))
    return 0


def preset_parser() -> argparse.ArgumentParser:
    """The options of ``python -m sweep <preset>``."""
    p = argparse.ArgumentParser(prog="python -m sweep <preset>", description="Run a preset sweep.")
    p.add_argument("preset", help="a preset name (python -m sweep list) or a path to a preset YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any preset field")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return _run_options(p)


def replicate_parser() -> argparse.ArgumentParser:
    """The options of ``python -m sweep replicate``."""
    p = argparse.ArgumentParser(
        prog="python -m sweep replicate",
        description="Re-measure a finished search at another seed: the same preset and settings at --seed, "
                    "each searched defense trying its paper default and the configurations the search selected "
                    "(one per attack), nothing else. `report <preset> --seeds` then compares the two on the "
                    "new seeds.")
    p.add_argument("sweep", help="the searching sweep: its id, or a preset name (its newest finished search)")
    p.add_argument("--seed", type=int, required=True, help="the seed to re-measure at")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return _run_options(p)


def _run_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dry-run", action="store_true", help="print stage/trial counts, a cost estimate and the packing (on the cluster of --address) and exit")
    p.add_argument("--workdir", default=os.environ.get("SWEEP_WORKDIR", "./sweep-runs"),
                   help="holds mlflow.db, the attack-stage cache, Ray results and reports (default ./sweep-runs)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join an existing Ray cluster (a head started with `ray start --head` needs "
                        "RAY_AUTH_MODE=token here and on every node)")
    p.add_argument("--storage", default=os.environ.get("SWEEP_STORAGE"),
                   help="what the nodes share: a path every node mounts, or s3://bucket/prefix "
                        "(the preset's storage.uri; default: the work directory)")
    p.add_argument("--storage-endpoint", default=None,
                   help="a self-hosted S3-compatible store's URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--optuna-storage", default=os.environ.get("SWEEP_OPTUNA_STORAGE"),
                   help="an RDB URL (e.g. postgresql://...) for the Optuna studies, so that a lost head "
                        "does not take them (default: the work directory's journal file)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep from its storage")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the preset's)")
    return p


def cmd_preset(argv: list[str]) -> int:
    from sweep import load_preset

    args = preset_parser().parse_args(argv)
    cfg = load_preset(args.preset, [*args.set, *storage_overrides(args.storage, args.storage_endpoint)])
    return _run_config(cfg, args)


def cmd_replicate(argv: list[str]) -> int:
    from sweep.analysis import replication_config
    from sweep.config import config_with

    args = replicate_parser().parse_args(argv)
    cfg, sets, said = replication_config(args.sweep, args.seed, workdir=args.workdir, tracking_uri=args.tracking_uri)
    cfg = config_with(cfg, storage_overrides(args.storage, args.storage_endpoint))
    _print(f"replicating {args.sweep} at seed {args.seed}: " + "; ".join(said))
    _print("  = the preset's settings with " + " ".join(f"--set {shlex.quote(x)}" for x in sets))
    return _run_config(cfg, args)


def _run_config(cfg, args) -> int:
    """Print, price or run (then report) the sweep ``cfg`` as the run options ask."""
    from sweep import dry_run, format_config

    if args.print_config:
        _print(format_config(cfg))
        return 0
    if args.dry_run:
        _print(dry_run(cfg, address=args.address))
        return 0
    from sweep.analysis import make_report
    from sweep.execution import run_sweep

    result = run_sweep(cfg, workdir=args.workdir, tracking_uri=args.tracking_uri, address=args.address,
                       resume=args.resume, experiment=args.experiment, optuna_storage=args.optuna_storage,
                       progress=_print)
    # the sweep's runs are closed and safe in MLflow; the report reads them back
    make_report(result.sweep_id, workdir=result.workdir, tracking_uri=result.tracking_uri,
                experiment=result.experiment, progress=_print)
    if result.status == "PARTIAL":
        print(partial_message(result), file=sys.stderr)
        return EXIT_PARTIAL
    return 0


def storage_overrides(uri: str | None, endpoint: str | None) -> list[str]:
    """``--storage``/``--storage-endpoint`` as preset overrides (JSON-quoted: any path survives)."""
    return [f"storage.{k}={json.dumps(v)}" for k, v in (("uri", uri), ("endpoint", endpoint)) if v]


def partial_message(result) -> str:
    """One line: what failed in a partial sweep, and how to redo it."""
    failed = [f"attack stage {a}" for a in result.failed_stages] + list(result.failed_pairs)
    return (f"error: sweep {result.sweep_id} ended partial ({len(failed)} failed: {', '.join(failed)}); "
            f"the report covers what finished; --resume runs what failed again")


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweep",
        description="Backdoor attack/defense experiments and hyperparameter sweeps.\n\n"
                    "  python -m sweep <preset> [--set key=value ...]   run a preset sweep "
                    "(quickstart, nba_cifar, dlp_cifar, ...; see `list`)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{list,train,run,report,replicate,bench} or <preset>")

    sub.add_parser("list", help="datasets, models, attacks, defenses (with parameters), presets")

    def common(sp):
        sp.add_argument("--data-root", default=os.environ.get("SWEEP_DATA_ROOT"),
                        help="folder holding downloaded datasets (or SWEEP_DATA_ROOT)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        sp.add_argument("--eval-size", type=int, default=2000,
                        help="test images evaluated after each epoch for the log (the final figures use all)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    t = sub.add_parser("train", help="train a clean model")
    t.add_argument("--dataset", required=True, help="cifar10, cifar100, gtsrb, imagefolder:<path>, synthetic")
    t.add_argument("--model", default="wrn-16-1")
    t.add_argument("--epochs", type=int, default=None, help="default: the paper setting, 100")
    t.add_argument("--out", required=True)
    t.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    common(t)

    r = sub.add_parser("run", help="run an attack stage (cached), optionally followed by a defense")
    r.add_argument("--dataset")
    r.add_argument("--model", default="wrn-16-1")
    r.add_argument("--attack", help="an attack (python -m sweep list shows them), or none")
    r.add_argument("--defense", help="a defense (python -m sweep list shows them)")
    r.add_argument("--out", required=True)
    r.add_argument("--cache", default=os.environ.get("SWEEP_CACHE", "./sweep-runs/cache"),
                   help="attack-stage artifact cache (default ./sweep-runs/cache or SWEEP_CACHE)")
    r.add_argument("--model-file", help="defend your own model: a state_dict file ...")
    r.add_argument("--spec", help="... and a spec.json with its 'model' and 'dataset' sections")
    common(r)

    rep = sub.add_parser("report", help="Pareto fronts, best configs and tables of a finished sweep")
    rep.add_argument("sweep", help="a sweep id or a preset name (its latest sweep)")
    rep.add_argument("--workdir", default=os.environ.get("SWEEP_WORKDIR", "./sweep-runs"))
    rep.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    rep.add_argument("--seeds", action="store_true",
                     help="the sweep and its repeats at other seeds (same preset and config but the seed: "
                          "--set seed=N), each cell as mean ± std; writes report/seeds.md")

    # parsed by replicate_parser (main routes it there); listed here for --help
    sub.add_parser("replicate", help="re-measure a finished search at another seed: its selected configurations "
                                     "and the paper defaults (`replicate -h`)")

    b = sub.add_parser("bench", help="benchmarks (not tests): `bench train` = training images/s vs a reference "
                                     "loop; `bench sweep` = trials/h and utilisation of a reduced sweep on a "
                                     "local multi-node Ray, concurrent Tuners against one at a time; `bench early-stopping` = "
                                     "epochs saved by early stopping and whether the selected config changes")
    b.add_argument("what", choices=["train", "sweep", "early-stopping"])
    b.add_argument("--json", action="store_true")
    b.add_argument("--model", default="wrn-16-1")
    b.add_argument("--images", type=int, default=5120)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default min(4, cores))")
    b.add_argument("--dataset", default="synthetic")
    b.add_argument("--nodes", type=int, default=2, help="bench sweep: loopback Ray nodes")
    b.add_argument("--cpus-per-node", type=int, default=1, help="bench sweep: CPUs of each node")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from sweep.errors import ConfigError
    from trainables.data.base import DataError
    from trainables.engine import TrainingDiverged
    from trainables.params import ParamError
    from trainables.plugins import PluginError
    from trainables.rundir import CheckpointError

    # bad input and runs that cannot go on: one line each; anything else is a bug and shows its traceback
    expected = (UsageError, ConfigError, ParamError, DataError, CheckpointError, PluginError, TrainingDiverged,
                FileNotFoundError)
    try:
        if argv and argv[0] == "replicate":
            return cmd_replicate(argv[1:])
        if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
            return cmd_preset(argv)
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        return {"list": cmd_list, "train": cmd_train, "run": cmd_run, "report": cmd_report,
                "bench": cmd_bench}[args.command](args)
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
