"""`nad sanitize`, `nad evaluate`, `nad attack` and `nad subset`: the engine on local files, with a progress bar."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import TypeAdapter, ValidationError

from core.params import INPUT_SIZES, PARAMS_LIMIT, Method, Mode, SanitizeParams, TriggerSpec

if TYPE_CHECKING:
    from tqdm import tqdm

    from core.engine.events import Event

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
    except ValidationError as error:  # a ValueError too, but of many lines
        raise argparse.ArgumentTypeError(f"not a usable trigger: {validation_message(error, str)}") from None
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
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:  # argparse would name this function: "invalid _floats value"
        raise argparse.ArgumentTypeError(f"{text} is not a comma-separated list of numbers") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:  # argparse would name this function: "invalid _ints value"
        raise argparse.ArgumentTypeError(f"{text} is not a comma-separated list of whole numbers") from None


def _whole(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type for a whole number from `least` to `most`, said as argparse says a flag's error:
    `nad attack` and `nad subset` have no parameter model to refuse a batch of 0, a label of -1 or images of
    100,000 pixels square for them, and would end in a traceback, run out of memory, or train nothing."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} is below {least}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text} is above {most}")
        return value

    return whole


def _number(text: str) -> float:
    """float(text), or NaN where it is none: the types below refuse it in their own words, as argparse would name
    them instead ("invalid _fraction value")."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _positive(text: str) -> float:
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _rate(text: str) -> float:
    """A share that may be the whole: above 0, at most 1 (NaN and infinity are neither)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not above 0 and at most 1")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", required=True, help="wrn-16-1, preact-resnet18, resnet18 or a torchvision name")
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="safetensors or torch.save state dict")
    _input_arguments(parser)


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", type=_whole(*INPUT_SIZES),
                        help="images are resized to this square size, 8 to 1024 (default 32)")
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
    parser.add_argument("--mode", choices=get_args(Mode), help="fast (default) or the authors' execution")
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
    parser.add_argument("--target-label", type=_whole(0), required=True, help="the class the trigger leads to")
    parser.add_argument("--poison-rate", type=_rate, default=0.1,
                        help="share of images poisoned (for sig, share of the target class)")
    parser.add_argument("--epochs", type=_whole(1), default=30,
                        help="lr drops tenfold at half and three quarters of them")
    parser.add_argument("--lr", type=_positive, default=0.1)
    parser.add_argument("--batch-size", type=_whole(1), default=128)
    parser.add_argument("--seed", type=int, default=0)
    _input_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(run=run_attack, input_size=32)


def _add_subset(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("subset", help="a stratified share of an archive as .npz (e.g. 5%% as clean data)")
    parser.add_argument("archive", type=Path)
    parser.add_argument("--fraction", type=_fraction, required=True, help="share of each class to keep, e.g. 0.05")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=_whole(*INPUT_SIZES), default=32)
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write (x uint8 NHWC, y, classes)")
    parser.set_defaults(run=run_subset)


def _params(args: argparse.Namespace) -> SanitizeParams:
    fields = SanitizeParams.model_fields
    given = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    return SanitizeParams.model_validate(given)


def _flag(field: str) -> str:
    """The command-line flag of a parameter, as the user typed it."""
    return "--" + field.replace("_", "-")


def validation_message(error: ValidationError, name: Callable[[str], str] = _flag) -> str:
    """Pydantic's errors on one line, each under the name the user set it by (`name`: a flag, an environment
    variable): pydantic's own text takes three lines a field, with its field names and a link."""
    parts = []
    for detail in error.errors():
        message = detail["msg"].removeprefix("Value error, ")  # a validator's own words need no prefix
        loc = [str(part) for part in detail["loc"]]
        parts.append(f"{'.'.join([name(loc[0]), *loc[1:]])}: {message}" if loc else message)
    return "; ".join(parts)


def terminal_bar(show: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only where stderr is a terminal: in a log its redraws pile up on one line, a
    megabyte over a job of hours. `show` False hides it on a terminal too."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=None if show else True, **options)


class StageBar:
    """A bar in percent of a whole job, labelled with its stage and epoch. Where stderr is no terminal, so that the
    bar is not drawn, a log still sees the job move: each new label is a line of its own, with the percent."""

    def __init__(self, bar_format: str, show: bool = True) -> None:
        self.bar = terminal_bar(show, total=100, unit="%", bar_format=bar_format)
        self.lines = show and self.bar.disable
        self.label = ""

    def show(self, label: str, percent: float) -> None:
        """Move to `percent` under `label`."""
        relabelled, self.label = label != self.label, label
        if relabelled and self.lines:
            print(f"{label} ({percent:.0f}%)", file=sys.stderr, flush=True)
        self.bar.set_description(label, refresh=False)
        self.bar.update(percent - self.bar.n)
        if relabelled:  # an epoch may start without the percentage moving (sau's unplanned retry)
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class ProgressBar(StageBar):
    """The engine's events on a StageBar, an epoch's loss and lr beside it."""

    def __init__(self) -> None:
        super().__init__("{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]{postfix}")

    def __call__(self, event: Event) -> None:
        label = event.stage + (f" {event.epoch}/{event.epochs}" if event.epoch else "")
        if event.loss is not None:
            self.bar.set_postfix(loss=f"{event.loss:.3f}", lr=event.lr, refresh=False)
        elif label != self.label:  # an epoch's loss and lr come at its end: not beside the next epoch's label
            self.bar.set_postfix_str("", refresh=False)
        self.show(label, 100 * event.progress)


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


def fail(message: str) -> int:
    """Say why a command stops, on one line, and return its exit status: every `nad` command ends so."""
    print(f"nad: error: {message}", file=sys.stderr)
    return 2


def missing_input(*paths: Path | None) -> str | None:
    """The first given input that is not a file, said plainly: a traceback is not an answer to a typo. `nad
    submit` calls it too, before it uploads."""
    for path in paths:
        if path is not None and not path.is_file():
            return f"{path}: no such file"
    return None


def prepare_outputs(*paths: Path | None, inputs: tuple[Path | None, ...] = ()) -> str | None:
    """Check the given output files can be written, making their folders, before any work starts: a job of
    minutes must not end in a traceback, its report lost. Why one of them cannot be written there, or would
    overwrite one of `inputs` or another output; or None. `nad submit` calls it too, before it uploads."""
    outputs = [path for path in paths if path is not None]
    if problem := _same_files(outputs, [path for path in inputs if path is not None]):
        return problem
    for path in outputs:
        if path.is_dir():
            return f"{path} is a folder; name the file to write"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot make the folder for {path}: {error.strerror}"
        try:  # a folder that exists may still refuse files: read-only, another user's, a full disk
            tempfile.NamedTemporaryFile(dir=path.parent).close()
        except OSError as error:
            return f"cannot write files in {path.parent}, for {path}: {error.strerror}"
    return None


def _same_files(outputs: list[Path], inputs: list[Path]) -> str | None:
    """An output that names an input or an earlier output (through a symlink or `..` too), or None: the one
    written last would replace the other, a checkpoint by its report or the user's data by a result."""
    seen = {path.resolve(): "is an input, which writing it would destroy" for path in inputs}
    for path in outputs:
        if clash := seen.get(resolved := path.resolve()):
            return f"{path} {clash}; name another file"
        seen[resolved] = "is named for two outputs, one would overwrite the other"
    return None


def save_report(path: Path | None, data: dict[str, Any]) -> int:
    """Write a JSON report, if asked for, once its results are printed; the exit status. A disk that filled up
    meanwhile loses no result that way, and is said in one line rather than a traceback."""
    if path is None:
        return 0
    try:
        path.write_text(json.dumps(data, indent=2))
    except OSError as error:
        return write_failed(path, error)
    return 0


def write_failed(path: Path, error: OSError) -> int:
    """An output that could not be written once the work was done (a disk that filled up meanwhile): one line,
    exit 2, where a traceback ended the command."""
    return fail(f"cannot write {path}: {error.strerror or error}")


def run_sanitize(args: argparse.Namespace) -> int:
    from core.engine.errors import InputError
    from core.engine.sanitize import JobFiles, sanitize

    try:
        params = _params(args)
    except ValidationError as error:
        return fail(validation_message(error))
    if args.teacher and params.teacher_unused:
        return fail(f"--teacher: {params.teacher_unused}")
    inputs = (args.checkpoint, args.clean_data, args.test_data, args.poison_data, args.teacher)
    if problem := missing_input(*inputs) or prepare_outputs(args.out, args.report, inputs=inputs):
        return fail(problem)
    files = JobFiles(checkpoint=args.checkpoint, clean_data=args.clean_data, out=args.out, test_data=args.test_data,
                     poison_data=args.poison_data, teacher=args.teacher)
    try:
        with closing(ProgressBar()) as bar:  # closed before an error is said: not on the bar's line, nor redrawn
            report = sanitize(files, params, on_event=bar)
    except InputError as error:
        return fail(str(error))
    except OSError as error:  # an input it may not read, or the checkpoint's write on a disk that filled up
        if error.filename is None:  # a failed read names no file (EIO); the checkpoint's writes name theirs
            return fail(f"an input could not be read, or {args.out} written: {error.strerror}")
        if Path(error.filename) in inputs:
            return fail(cannot_read(error))
        return write_failed(Path(error.filename), error)
    print(report["evaluation"]["note"])
    if report["auto"]:
        print(f"auto kept {report['auto']['chosen']}: {report['auto']['reason']}")
    if report["resampling"]:
        print(f"resampling sign: {report['resampling']['note']}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print(table(report["before"], report["after"]))
    print(f"cleansed checkpoint: {args.out}")
    return save_report(args.report, report)


def _columns(text: str) -> int:
    """How many terminal columns `text` takes: East Asian wide and full-width characters take two (a class
    `二` pushed its row's number one column right)."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def run_evaluate(args: argparse.Namespace) -> int:
    from core.engine.errors import InputError
    from core.engine.sanitize import evaluate_checkpoint

    try:
        params = _params(args)
    except ValidationError as error:
        return fail(validation_message(error))
    inputs = (args.checkpoint, args.test_data, args.poison_data)
    if problem := missing_input(*inputs) or prepare_outputs(args.report, inputs=inputs):
        return fail(problem)
    try:
        metrics, evaluation = evaluate_checkpoint(args.checkpoint, args.test_data, params, args.poison_data)
    except InputError as error:
        return fail(str(error))
    print(f"ACC {_fmt(metrics['acc'])}  ACC* {_fmt(metrics.get('acc_non_target'))}  ASR {_fmt(metrics['asr'])}"
          f"  ({evaluation.note}; ACC* leaves out the target class)")
    for name, value in metrics["per_class_acc"].items():
        print(f"  {' ' * max(0, 16 - _columns(name))}{name} {value:6.2f}")
    return save_report(args.report, metrics)


def attack_milestones(epochs: int) -> tuple[int, ...]:
    """The epochs (0-based) where `nad attack`'s lr drops tenfold: at half and three quarters of the run, but never
    at its first epoch, where a 1-epoch run would have trained at a hundredth of the lr it was given."""
    return tuple(sorted({epoch for epoch in (epochs // 2, epochs * 3 // 4) if epoch > 0}))


def run_attack(args: argparse.Namespace) -> int:
    from core.engine.attack import Poisoning, train_backdoored
    from core.engine.checkpoints import write_checkpoint
    from core.engine.data import load_images
    from core.engine.errors import InputError
    from core.engine.sanitize import device
    from core.engine.training import Normalization, Recipe

    if problem := missing_input(args.data) or prepare_outputs(args.out, inputs=(args.data,)):
        return fail(problem)
    try:
        data = load_images(args.data, args.input_size, args.classes)
        if args.target_label >= len(data.classes):
            return fail(f"--target-label {args.target_label} is not a class of {args.data}: it has "
                        f"{len(data.classes)}, 0 to {len(data.classes) - 1}")
        poisoning = Poisoning(args.trigger, args.target_label, args.poison_rate)
        recipe = Recipe(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        milestones=attack_milestones(args.epochs), weight_decay=5e-4)
        with closing(ProgressBar()) as bar:
            model = train_backdoored(args.arch, data, poisoning, recipe, Normalization(args.mean, args.std),
                                     device(), on_event=bar)
    except InputError as error:
        return fail(str(error))
    try:
        write_checkpoint(model, args.out, {"arch": args.arch, "num_classes": len(data.classes),
                                           "classes": data.classes, "method": "attack",
                                           "trigger": args.trigger.model_dump(), "target_label": args.target_label,
                                           "poison_rate": args.poison_rate})
    except OSError as error:
        return write_failed(args.out, error)
    print(f"backdoored checkpoint: {args.out}")
    return 0


def run_subset(args: argparse.Namespace) -> int:
    import numpy as np

    from core.engine.data import load_images, stratified_split
    from core.engine.errors import InputError

    # numpy adds the suffix the archive readers go by when the name lacks it: say where the file really is.
    out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")
    if problem := missing_input(args.archive) or prepare_outputs(out, inputs=(args.archive,)):
        return fail(problem)
    try:
        data = load_images(args.archive, args.input_size)
        _, chosen = stratified_split(data.labels, args.fraction, args.seed)
    except InputError as error:
        return fail(str(error))
    part = data.subset(np.sort(chosen))
    try:
        np.savez(out, x=part.images, y=part.labels, classes=np.array(part.classes))
    except OSError as error:
        return write_failed(out, error)
    print(f"{len(part.labels)} of {len(data.labels)} images ({len(part.classes)} classes) -> {out}")
    return 0
