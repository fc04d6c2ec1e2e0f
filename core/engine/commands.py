"""`nad sanitize`, `nad evaluate` and `nad attack`: the engine on local files, with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import TypeAdapter, ValidationError

from core.params import PARAMS_LIMIT, Method, SanitizeParams, TriggerSpec

PRESETS = {"nad-grid": "the NAD authors' 3x3 grid in the bottom-right corner"}


def add_commands(commands: argparse._SubParsersAction) -> None:
    _add_sanitize(commands)
    _add_evaluate(commands)
    _add_attack(commands)
    _add_subset(commands)


def parse_trigger(text: str) -> TriggerSpec:
    """A trigger from a preset name, inline JSON or a JSON file. A string `pattern` names a pattern file:
    `path.npz:key`, `path.npy` or an image."""
    from core.engine.triggers import NAD_GRID, load_pattern

    if text == "nad-grid":
        return NAD_GRID
    try:
        raw: Any = json.loads(text if text.lstrip().startswith("{") else small_json_file(
            Path(text), 'a trigger file is a small JSON object: put a big pattern in a pattern file ("pattern": '
            '"pattern.npy")'))
        if not isinstance(raw, dict):
            raise ValueError("a trigger is a JSON object, as docs/engine.md shows")
        if isinstance(raw.get("pattern"), str):
            path, _, key = raw["pattern"].partition(":")
            raw["pattern"] = load_pattern(Path(path), key or None)
        return TypeAdapter(TriggerSpec).validate_python(raw)
    except OSError as error:  # argparse shows its own errors only for ValueError and TypeError
        raise argparse.ArgumentTypeError(cannot_read(error)) from None
    except ValueError as error:  # not JSON, not a trigger, or a pattern file that cannot be used
        raise argparse.ArgumentTypeError(f"not a usable trigger: {error}") from None


def cannot_read(error: OSError) -> str:
    """One line for a file the command line could not read, the same for every command."""
    return f"cannot read {error.filename}: {error.strerror}"


def small_json_file(path: Path, advice: str) -> str:
    """The text of a JSON file named on the command line, up to PARAMS_LIMIT bytes (the service counts bytes
    too); past it a ValueError that ends with `advice`, and a UnicodeDecodeError where it is not UTF-8. `nad
    submit` reads its `--params @file` with it too. A pipe is read as it comes, so `@<(jq ...)` works."""
    try:
        with path.open("rb") as file:
            data = file.read(PARAMS_LIMIT + 1)
    except OSError as error:  # a failed read (EIO from /proc/self/mem) names no file; cannot_read needs one
        error.filename = error.filename or str(path)
        raise
    if len(data) > PARAMS_LIMIT:
        raise ValueError(f"{path} is larger than {PARAMS_LIMIT:,} bytes; {advice}")
    return data.decode("utf-8")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="wrn-16-1, preact-resnet18, resnet18 or a torchvision name")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="safetensors or torch.save state dict")
    _input_arguments(parser)


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", type=int, help="images are resized to this square size (default 32)")
    parser.add_argument("--mean", type=_floats, help="normalization mean, e.g. 0.4914,0.4822,0.4465")
    parser.add_argument("--std", type=_floats, help="normalization std")
    parser.add_argument("--classes", type=_names, help="class folder names in label order (default: sorted)")


def _attack_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--poison-data", type=Path, help="archive of triggered images with their true labels")
    group.add_argument("--trigger", type=parse_trigger,
                       help="trigger applied to the test set: 'nad-grid', inline JSON or a JSON file")
    parser.add_argument("--target-label", type=int, help="the attack's target class")


def _add_sanitize(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("sanitize", help="remove a backdoor from a checkpoint")
    _model_arguments(parser)
    parser.add_argument("--clean-data", type=Path, required=True, help="archive of clean labelled images")
    parser.add_argument("--test-data", type=Path, help="labelled clean test archive (default: a hold-out)")
    _attack_arguments(parser)
    parser.add_argument("--method", choices=get_args(Method))
    parser.add_argument("--teacher", type=Path, help="a ready teacher checkpoint instead of fine-tuning one")
    parser.add_argument("--teacher-epochs", type=int)
    parser.add_argument("--teacher-lr", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-milestones", type=_ints, help="epochs (0-based) where lr drops tenfold, e.g. 2")
    parser.add_argument("--nad-sam-rho", type=float,
                        help="nad: radius of the student's sharpness-aware steps after its lr drop (default 2, "
                             "FT-SAM's; 0: the authors' plain SGD)")
    parser.add_argument("--no-nad-refit-bias", dest="nad_refit_bias", action="store_false", default=None,
                        help="nad: keep the student's classifier bias as trained (the authors' NAD)")
    parser.add_argument("--auto-candidates", type=_names,
                        help="auto: the methods it tries, in order of preference (default nad,sau,fst)")
    parser.add_argument("--auto-budget", type=float, help="auto: points of clean accuracy a candidate may lose")
    parser.add_argument("--fst-epochs", type=int)
    parser.add_argument("--fst-lr", type=float)
    parser.add_argument("--fst-alpha", type=float)
    parser.add_argument("--anp-eps", type=float, help="anp: relative noise on each BatchNorm neuron")
    parser.add_argument("--anp-steps", type=int)
    parser.add_argument("--anp-alpha", type=float, help="anp: weight of the natural loss")
    parser.add_argument("--anp-iterations", type=int, help="anp: mask optimisation batches")
    parser.add_argument("--anp-lr", type=float)
    parser.add_argument("--anp-batch-size", type=int)
    parser.add_argument("--anp-threshold", type=float, help="anp: prune neurons whose mask ends at or below this")
    parser.add_argument("--ibau-rounds", type=int, help="ibau: rounds of finding and unlearning the perturbation")
    parser.add_argument("--ibau-lr", type=float, help="ibau: Adam learning rate")
    parser.add_argument("--ibau-batch-size", type=int)
    parser.add_argument("--ibau-norm", type=float, help="ibau: bound on the perturbation's L2 norm")
    parser.add_argument("--sau-epochs", type=int)
    parser.add_argument("--sau-lr", type=float, help="sau: Adam learning rate, cosine over the epochs")
    parser.add_argument("--sau-batch-size", type=int)
    parser.add_argument("--sau-bound", type=float, help="sau: L-infinity bound of each image's perturbation")
    parser.add_argument("--sau-anchor-epochs", type=int,
                        help="sau: first epochs that distil the suspect's clean predictions instead of the labels")
    parser.add_argument("--sau-warp", type=float,
                        help="sau: strength of the smooth warps searched for half of each batch (0: none; default: "
                             "1 where the clean data shows a resampling backdoor, else 0)")
    parser.add_argument("--betas", type=_floats, help="one weight per layer, e.g. 500,1000,1000")
    parser.add_argument("--layers", type=_names, help="module names, e.g. block1,block2,block3")
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mode", choices=["fast", "reference"], help="fast (default) or the authors' execution")
    parser.add_argument("--out", type=Path, required=True, help="where to write the cleansed .safetensors")
    parser.add_argument("--report", type=Path, help="where to write the JSON report")
    parser.set_defaults(run=run_sanitize)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", help="ACC and ASR of one checkpoint")
    _model_arguments(parser)
    parser.add_argument("--test-data", type=Path, required=True)
    _attack_arguments(parser)
    parser.add_argument("--report", type=Path, help="where to write the metrics as JSON")
    parser.set_defaults(run=run_evaluate)


def _add_attack(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("attack", help="train a backdoored model (for demos and tests)")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--data", type=Path, required=True, help="labelled training archive")
    parser.add_argument("--trigger", type=parse_trigger, required=True)
    parser.add_argument("--target-label", type=int, required=True)
    parser.add_argument("--poison-rate", type=float, default=0.1,
                        help="share of images poisoned (for sig, share of the target class)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    _input_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(run=run_attack)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # refused below, in the same words: argparse would name this function instead
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _add_subset(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("subset", help="a stratified share of an archive as .npz (e.g. 5%% as clean data)")
    parser.add_argument("archive", type=Path)
    parser.add_argument("--fraction", type=_fraction, required=True, help="share of each class to keep, e.g. 0.05")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write (x uint8 NHWC, y, classes)")
    parser.set_defaults(run=run_subset)


def _params(args: argparse.Namespace) -> SanitizeParams:
    fields = SanitizeParams.model_fields
    given = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    return SanitizeParams.model_validate(given)


class ProgressBar:
    """A tqdm bar in percent of the whole job, its label the current stage and epoch."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]{postfix}",
                        file=sys.stderr)
        self.label = ""

    def __call__(self, event) -> None:
        label = event.stage + (f" {event.epoch}/{event.epochs}" if event.epoch else "")
        relabelled, self.label = label != self.label, label
        self.bar.set_description(label, refresh=False)
        if event.loss is not None:
            self.bar.set_postfix(loss=f"{event.loss:.3f}", lr=event.lr, refresh=False)
        elif relabelled:  # an epoch's loss and lr come at its end: not beside the next epoch's label
            self.bar.set_postfix_str("", refresh=False)
        self.bar.update(100 * event.progress - self.bar.n)
        if relabelled:  # an epoch may start without the percentage moving (sau's unplanned retry)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The before/after summary every front end prints; ACC* leaves the target class out, as the NAD paper
    reports it, and ASR0 is the ASR of the clean images, the part of an ASR that ordinary errors account for."""
    rows = [f"{'':8}{'ACC':>8}{'ACC*':>8}{'ASR':>8}{'ASR0':>8}"]
    for name, m in (("before", before), ("after", after)):
        rows.append(f"{name:8}{_fmt(m['acc']):>8}{_fmt(m.get('acc_non_target')):>8}{_fmt(m.get('asr')):>8}"
                    f"{_fmt(m.get('asr_without_trigger')):>8}")
    rows.append("ACC* leaves out the target class; ASR0 is the ASR without the trigger (ordinary errors)")
    return "\n".join(rows)


def _fail(message: str) -> int:
    print(f"nad: error: {message}", file=sys.stderr)
    return 2


def missing_input(*paths: Path | None) -> str | None:
    """The first given input that is not a file, said plainly: a traceback is not an answer to a typo. `nad
    submit` calls it too, before it uploads."""
    for path in paths:
        if path is not None and not path.is_file():
            return f"{path}: no such file"
    return None


def prepare_outputs(*paths: Path | None) -> str | None:
    """Make the folders the given output files go in, before any work starts: a job of minutes must not end
    in a traceback, its report lost, for want of a folder. Why one of them cannot be written there, or None.
    `nad submit` calls it too, before it uploads."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            return f"{path} is a folder; name the file to write"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot make the folder for {path}: {error.strerror}"
    return None


def run_sanitize(args: argparse.Namespace) -> int:
    from core.engine.errors import InputError
    from core.engine.sanitize import JobFiles, sanitize

    try:
        params = _params(args)
    except ValidationError as error:
        return _fail(str(error))
    inputs = (args.checkpoint, args.clean_data, args.test_data, args.poison_data, args.teacher)
    if problem := missing_input(*inputs) or prepare_outputs(args.out, args.report):
        return _fail(problem)
    files = JobFiles(checkpoint=args.checkpoint, clean_data=args.clean_data, out=args.out, test_data=args.test_data,
                     poison_data=args.poison_data, teacher=args.teacher)
    bar = ProgressBar()
    try:
        report = sanitize(files, params, on_event=bar)
    except InputError as error:
        return _fail(str(error))
    finally:
        bar.close()
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    print(report["evaluation"]["note"])
    if report["auto"]:
        print(f"auto kept {report['auto']['chosen']}: {report['auto']['reason']}")
    if report["resampling"]:
        print(f"resampling sign: {report['resampling']['note']}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print(table(report["before"], report["after"]))
    print(f"cleansed checkpoint: {args.out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from core.engine.errors import InputError
    from core.engine.sanitize import evaluate_checkpoint

    if problem := missing_input(args.checkpoint, args.test_data, args.poison_data) or prepare_outputs(args.report):
        return _fail(problem)
    try:
        metrics, evaluation = evaluate_checkpoint(args.checkpoint, args.test_data, _params(args), args.poison_data)
    except (InputError, ValidationError) as error:
        return _fail(str(error))
    if args.report:
        args.report.write_text(json.dumps(metrics, indent=2))
    print(f"ACC {_fmt(metrics['acc'])}  ACC* {_fmt(metrics.get('acc_non_target'))}  ASR {_fmt(metrics['asr'])}"
          f"  ({evaluation.note}; ACC* leaves out the target class)")
    for name, value in metrics["per_class_acc"].items():
        print(f"  {name:>16} {value:6.2f}")
    return 0


def run_attack(args: argparse.Namespace) -> int:
    from core.engine.attack import Poisoning, train_backdoored
    from core.engine.checkpoints import write_checkpoint
    from core.engine.data import load_images
    from core.engine.errors import InputError
    from core.engine.sanitize import device
    from core.engine.training import Normalization, Recipe

    if problem := missing_input(args.data) or prepare_outputs(args.out):
        return _fail(problem)
    size = args.input_size or 32
    try:
        data = load_images(args.data, size, args.classes)
        poisoning = Poisoning(args.trigger, args.target_label, args.poison_rate)
        recipe = Recipe(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        milestones=(args.epochs // 2, args.epochs * 3 // 4), weight_decay=5e-4)
        bar = ProgressBar()
        try:
            model = train_backdoored(args.arch, data, poisoning, recipe, Normalization(args.mean, args.std),
                                     device(), on_event=bar)
        finally:
            bar.close()
    except InputError as error:
        return _fail(str(error))
    write_checkpoint(model, args.out, {"arch": args.arch, "num_classes": len(data.classes), "classes": data.classes,
                                       "method": "attack", "trigger": args.trigger.model_dump(),
                                       "target_label": args.target_label, "poison_rate": args.poison_rate})
    print(f"backdoored checkpoint: {args.out}")
    return 0


def run_subset(args: argparse.Namespace) -> int:
    import numpy as np

    from core.engine.data import load_images, stratified_split
    from core.engine.errors import InputError

    # numpy adds the suffix the archive readers go by when the name lacks it: say where the file really is.
    out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")
    if problem := missing_input(args.archive) or prepare_outputs(out):
        return _fail(problem)
    try:
        data = load_images(args.archive, args.input_size)
        _, chosen = stratified_split(data.labels, args.fraction, args.seed)
    except InputError as error:
        return _fail(str(error))
    part = data.subset(np.sort(chosen))
    np.savez(out, x=part.images, y=part.labels, classes=np.array(part.classes))
    print(f"{len(part.labels)} of {len(data.labels)} images ({len(part.classes)} classes) -> {out}")
    return 0
