"""The whole NAD job in both engine modes, each in a fresh process, on the same data: time per stage, images per
second, peak memory and the resulting ACC/ASR.

    .venv/bin/python bench/engine.py --out bench/results/engine-cpu.json

Data: the NAD authors' BadNets WRN-16-1 (grid trigger, target 5), 5 % of the shared CIFAR-10 as clean data
(`nad subset`, seed 0) and its 10,000 test images (9,000 triggered). Needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.engine.data import load_images, stratified_split
from core.engine.sanitize import JobFiles, sanitize
from core.engine.triggers import NAD_GRID
from core.params import SanitizeParams
from machine import cpu

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR = SHARED / "datasets" / "cifar10"
MODEL = SHARED / "models" / "nad-official" / "wrn16_1-badnets-grid-backdoored.pth.tar"


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last reset (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peaks() -> None:
    """Reset VmHWM (writing 5 to clear_refs), and the GPU's peak counter, so each mode is measured alone."""
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def clean_subset(folder: Path) -> Path:
    """5 % of the training set, stratified, as `nad subset` makes it."""
    path = folder / "clean-5pct.npz"
    data = load_images(CIFAR / "train.tar.gz", 32)
    _, chosen = stratified_split(data.labels, 0.05, 0)
    part = data.subset(np.sort(chosen))
    np.savez(path, x=part.images, y=part.labels, classes=np.array(part.classes))
    return path


def run_mode(mode: str, files: JobFiles, params: SanitizeParams) -> dict:
    reset_peaks()
    start = time.perf_counter()
    report = sanitize(files, params.model_copy(update={"mode": mode}))
    wall = time.perf_counter() - start
    timings = report["timings"]
    n_train, n_eval = report["evaluation"]["n_train"], report["evaluation"]["n_clean"]
    n_eval += report["evaluation"]["n_poison"] or 0
    train_images = n_train * (params.teacher_epochs + params.epochs)
    train_seconds = timings.get("teacher", 0) + timings.get("student", 0)
    evaluate_seconds = timings["evaluate_before"] + timings["evaluate_after"]
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "stages_s": {"load": timings["load"], "teacher": timings.get("teacher", 0),
                     "distill": timings.get("student", 0), "evaluate": round(evaluate_seconds, 3)},
        "train_images_per_s": round(train_images / train_seconds, 1),
        "eval_images_per_s": round(2 * n_eval / evaluate_seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "before": {k: report["before"][k] for k in ("acc", "acc_non_target", "asr")},
        "after": {k: report["after"][k] for k in ("acc", "acc_non_target", "asr")},
    }


def run_alone(mode: str, files: JobFiles, params: SanitizeParams) -> dict:
    """`run_mode` in a fresh interpreter, so that no mode starts warm from another's run and each peak is its
    own. In one process `reference` took 214.5 s run first and 186.0 s run second (2026-12-06,
    `docs/benchmarks.md`); alone, 188.8 and 191.6 s."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_mode, (mode, files, params))


def table(results: list[dict]) -> str:
    head = f"{'mode':10}{'wall s':>8}{'load':>7}{'teacher':>9}{'distill':>9}{'eval':>7}{'train img/s':>13}" \
           f"{'eval img/s':>12}{'RSS MiB':>9}{'ACC*':>7}{'ASR':>7}"
    rows = [head]
    for r in results:
        s = r["stages_s"]
        rows.append(f"{r['mode']:10}{r['wall_s']:>8.1f}{s['load']:>7.1f}{s['teacher']:>9.1f}{s['distill']:>9.1f}"
                    f"{s['evaluate']:>7.1f}{r['train_images_per_s']:>13.0f}{r['eval_images_per_s']:>12.0f}"
                    f"{r['peak_rss_mib']:>9.0f}{r['after']['acc_non_target']:>7.2f}{r['after']['asr']:>7.2f}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="wrn-16-1", help="wrn-16-1 (the authors' checkpoint) only, for now")
    parser.add_argument("--modes", default="reference,fast")
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    args = parser.parse_args()
    if not MODEL.exists():
        print(f"needs the shared data beside the repository ({SHARED})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = JobFiles(checkpoint=MODEL, clean_data=clean_subset(folder), test_data=CIFAR / "test.tar.gz",
                         out=folder / "out.safetensors")
        # The performance issue's job is the authors' NAD: plain SGD for the student, its bias as trained (the
        # default's sharpness-aware steps cost about 1.6 times the student's time: docs/benchmarks.md).
        params = SanitizeParams(arch=args.arch, num_classes=10, method="nad", trigger=NAD_GRID, target_label=5,
                                nad_sam_rho=0, nad_refit_bias=False)
        results = [run_alone(mode, files, params) for mode in args.modes.split(",")]
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu": cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
