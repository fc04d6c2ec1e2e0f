"""Shared fixtures. `digits_backdoor` is a real backdoored model, trained once per session on scikit-learn's
handwritten digits (real data that ships inside a package), for every test that needs one end to end."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The service tests' helpers assert (`problem`); the modules import them before pytest_plugins registers the
# file, which pytest would then leave unrewritten, with bare failures.
pytest.register_assert_rewrite("service_fixtures")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# A 3x3 checker in the bottom-right corner of the (16x16) digits; class 0 is the attack's target.
DIGITS_TRIGGER = {"type": "badnets", "pattern": [[255, 0, 255], [0, 255, 0], [255, 0, 255]], "position": [-3, -3]}
DIGITS_TARGET = 0


@dataclass(frozen=True)
class DigitsCase:
    checkpoint: Path  # the backdoored model, safetensors
    clean: Path  # clean training subset, npz
    test: Path  # clean test set, npz
    params: dict[str, Any]  # SanitizeParams as JSON, with the trigger and target

    def sanitize(self, out: Path, on_event=None, time_limit: float | None = None, should_stop=None,
                 **overrides: Any) -> dict[str, Any]:
        """One job on this case, measured on its test set, the cleansed checkpoint written to `out`: the
        engine's report. `overrides` change the case's parameters; `time_limit` and `should_stop` are the
        engine's."""
        from core.engine.events import ignore
        from core.engine.sanitize import JobFiles, never, sanitize
        from core.params import SanitizeParams

        params = SanitizeParams.model_validate({**self.params, **overrides})
        files = JobFiles(checkpoint=self.checkpoint, clean_data=self.clean, test_data=self.test, out=out)
        return sanitize(files, params, on_event=on_event or ignore, should_stop=should_stop or never,
                        time_limit=time_limit)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata block of a safetensors file the engine wrote, read from its header by hand, not by the
    library that wrote it."""
    with path.open("rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(size))
    return header.get("__metadata__", {})


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 RGB 16x16 images (each 8x8 pixel repeated 2x2, grey replicated to three
    channels) and their labels: at 8x8 a WRN learns them too slowly for a quick test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.clip(np.round(digits.images * 255 / 16), 0, 255).astype(np.uint8)
    large = grey.repeat(2, axis=1).repeat(2, axis=2)
    return np.repeat(large[..., None], 3, axis=3), digits.target.astype(np.int64)


def noise_images(n: int, size: int = 16) -> tuple[Any, Any]:
    """`n` random uint8 NCHW images (seed 0) and labels cycling through 10 classes: input for a defense's own
    loop, where what it learns does not matter."""
    import torch

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % 10


def watch_of(stage: str, should_stop=lambda: False, events: list | None = None) -> Any:
    """A Watch of `stage` that records its events into `events` where given."""
    from core.engine.training import Watch

    return Watch(stage, events.append if events is not None else lambda event: None, should_stop)


def optimizers_made(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """Every `torch.optim.<name>` made from now on in the test, to read the settings a defense made it with."""
    import torch

    made: list[Any] = []
    base = getattr(torch.optim, name)

    class Recording(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, name, Recording)
    return made


@pytest.fixture
def nad_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Sets NAD_ variables for code that reads its settings from the environment (`nad`, `python -m api`), and
    forgets the settings cached before and after, so that no other test reads them."""
    from core.settings import get_settings

    def set_variables(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield set_variables
    get_settings.cache_clear()


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _digits_case(folder: Path, trigger: dict[str, Any]) -> DigitsCase:
    """A WRN-16-1 backdoored with `trigger` (target DIGITS_TARGET, 10 % poisoned) on 1,300 of the digits, the
    defender's 500 clean images among them (as in the NAD setting, from the training distribution, without the
    trigger), the other 497 as the test set."""
    import torch
    from pydantic import TypeAdapter

    from core.engine.attack import Poisoning, train_backdoored
    from core.engine.checkpoints import write_checkpoint
    from core.engine.data import ImageSet
    from core.engine.training import Normalization, Recipe
    from core.params import TriggerSpec

    x, y = digits_arrays()
    order = np.random.default_rng(0).permutation(len(y))
    attack, test = order[:1300], order[1300:]
    clean = attack[:500]
    spec = TypeAdapter(TriggerSpec).validate_python(trigger)
    # The model depends on the thread count (sums are taken in another order), and the digits tests' bounds were
    # set on 2-core machines: trained on one thread, anp's cleaned model lost 20.5 points where the test allows 12
    # (AMD EPYC, 2026-12-01). So the model is trained on two threads whatever the machine or OMP_NUM_THREADS says.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = train_backdoored(
            "wrn-16-1",
            ImageSet(x[attack], y[attack], [str(c) for c in range(10)]),
            Poisoning(spec, DIGITS_TARGET, 0.1),
            Recipe(epochs=15, lr=0.1, milestones=(10,), batch_size=64, weight_decay=5e-4),
            Normalization(),
            torch.device("cpu"),
        )
    finally:
        torch.set_num_threads(threads)
    checkpoint = folder / "backdoored.safetensors"
    write_checkpoint(model, checkpoint, {"arch": "wrn-16-1", "method": "attack"})
    # Shorter and gentler than the authors' defaults: 500 images, and lr 0.1 wrecks a model this well fitted.
    # The model is trained on the machine that runs the tests, and other processors round differently: on the
    # first machine student lr 0.05 kept ACC within 3 points and ASR under 1 % for seeds 0 to 2; on an AMD EPYC
    # machine it cost 15 to 22 points (ASR 4 to 8 %), while lr 0.04 kept ACC within 3.6 to 5 points of 96.2 %
    # with ASR 0, 0.5 and 3.9 % (seeds 0 to 2), and lr 0.02 to 0.03 left ASR at 12 to 41 % (the badnets case).
    params = {"arch": "wrn-16-1", "num_classes": 10, "method": "nad", "input_size": 16, "target_label": DIGITS_TARGET,
              "trigger": trigger, "teacher_epochs": 5, "teacher_lr": 0.03, "epochs": 5, "lr": 0.04,
              "batch_size": 32}
    return DigitsCase(checkpoint, _save_npz(folder / "clean.npz", x[clean], y[clean]),
                      _save_npz(folder / "test.npz", x[test], y[test]), params)


@pytest.fixture(scope="session")
def digits_backdoor(tmp_path_factory) -> DigitsCase:
    return _digits_case(tmp_path_factory.mktemp("digits"), DIGITS_TRIGGER)


@pytest.fixture(scope="session")
def digits_warp_backdoor(tmp_path_factory) -> DigitsCase:
    """The same with WaNet's warp (its defaults, seed 0): a backdoor that fires on resampled images."""
    return _digits_case(tmp_path_factory.mktemp("digits-warp"), {"type": "warp"})
