"""Build the VTAB-1k folder format from TFDS, as the commonly distributed VTAB-1k release lays it out.

    python scripts/prepare_vtab.py --tasks all --out data --data-dir data/tensorflow_datasets

For every task: ``<out>/vtab-1k/<task>/images/train800val200/<000123>.jpg`` (the 800 train800 images, then the 200
val200 images), ``images/test/<000123>.jpg``, and the split files ``train800.txt``, ``val200.txt``,
``train800val200.txt`` (= train800 then val200) and ``test.txt`` with lines ``<relative path> <label>``.
Each TFDS builder is downloaded and prepared in array_record format (needs internet, and TensorFlow for most
builders' generation; diabetic_retinopathy_detection needs a manual Kaggle download); splits and labels follow
``peftbench.data.tfds_task.VTAB_TFDS`` (google-research task_adaptation's definitions).

A task that fails (a builder that cannot be downloaded, a manual download missing) does not stop the others: every
failure is reported at the end and the script exits 1. JPEG re-encoding (the default, as the distributed release)
changes pixels slightly, so numbers from these folders and from ``dataset=tfds/<task>`` (raw pixels) can differ;
``--image-format png`` is pixel-exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

from peftbench.data.tfds_task import VTAB_TFDS, VTABReader
from peftbench.data.vtab import VTAB_TASKS, canonical_vtab_name
from peftbench.errors import DataError


def parse_tasks(spec: str) -> list[str]:
    """``all`` or a comma-separated list of task names (aliases accepted) -> canonical names, table order."""
    if spec.strip() == "all":
        return list(VTAB_TASKS)
    names = {canonical_vtab_name(s.strip()) for s in spec.split(",") if s.strip()}
    return [t for t in VTAB_TASKS if t in names]


def prepare_builder(builder: str, data_dir: str | None) -> None:
    """Download and prepare one TFDS builder in array_record format (a no-op when already prepared)."""
    import tensorflow_datasets as tfds

    tfds.builder(builder, data_dir=data_dir).download_and_prepare(file_format="array_record")


def write_task(task: str, out: Path, data_dir: str | None, image_format: str = "jpg", quality: int = 95) -> dict:
    """Write one task's VTAB-1k folder under ``out/vtab-1k/<task>``; returns split -> number of images."""
    reader = VTABReader(task, data_dir)
    folder = out / "vtab-1k" / task
    options = {"quality": quality} if image_format == "jpg" else {}
    lines: dict[str, list[str]] = {}
    layout = [("train800", "train800val200"), ("val200", "train800val200"), ("test", "test")]  # split, folder
    next_index: dict[str, int] = {}  # val200's images follow train800's in images/train800val200/
    for split, image_folder in layout:
        (folder / "images" / image_folder).mkdir(parents=True, exist_ok=True)
        start = next_index.get(image_folder, 0)
        rows = []
        for i, (image, label) in enumerate(reader.examples(split), start=start):
            rel = f"images/{image_folder}/{i:06d}.{image_format}"
            Image.fromarray(image).save(folder / rel, **options)
            rows.append(f"{rel} {label}\n")
        next_index[image_folder] = start + len(rows)
        lines[split] = rows
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():  # split files last: a folder with all four is complete
        tmp = folder / f".{split}.txt.tmp"
        tmp.write_text("".join(rows))
        tmp.replace(folder / f"{split}.txt")
    return {split: len(rows) for split, rows in lines.items()}


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 when any task failed; the others are still written)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="all", help="'all' or comma-separated VTAB task names")
    parser.add_argument("--out", type=Path, required=True, help="data folder: writes <out>/vtab-1k/<task>/")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--skip-download", action="store_true", help="use already prepared TFDS data only")
    args = parser.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    failed: dict[str, str] = {}
    prepared: dict[str, str | None] = {}  # builder -> None (ready) or the reason it is not
    for task in tasks:
        builder = VTAB_TFDS[task].builder
        start = time.perf_counter()
        try:
            if not args.skip_download and builder not in prepared:
                prepared[builder] = None
                try:
                    prepare_builder(builder, args.data_dir)
                except Exception as err:  # noqa: BLE001 - reported per task; the other tasks go on
                    prepared[builder] = _reason(err)
            if prepared.get(builder):
                raise DataError(f"TFDS builder {builder} could not be prepared ({prepared[builder]})")
            counts = write_task(task, args.out, args.data_dir, args.image_format, args.jpeg_quality)
        except Exception as err:  # noqa: BLE001 - one task cannot stop the others
            failed[task] = _reason(err)
            print(f"{task}: FAILED ({failed[task]})", file=sys.stderr, flush=True)
            continue
        print(f"{task}: {counts} in {time.perf_counter() - start:.1f}s", flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(tasks)} task(s) failed, the others were written:", file=sys.stderr)
        for task, reason in failed.items():
            print(f"  {task}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
