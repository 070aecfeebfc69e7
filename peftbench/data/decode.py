"""Decode-once fast path: JPEG/PNG files -> uint8 (3, H, W) arrays, cached on disk as ``.npy`` files.

Decoding and resizing runs in a thread pool (PIL releases the GIL in its decoders and resamplers, so threads
scale like processes without their start-up and pickling cost). A decoded split is written beside the data,
``<task_root>/.peftbench_cache/<entry>/``, as ``images.npy`` (N, 3, H, W) for fixed-size transforms, or as a
flat ``flat.npy`` uint8 buffer plus ``index.npy`` rows ``(offset, C, H, W)`` for ragged ones, with ``labels.npy``
and ``meta.json`` (the cache key). The next run memory-maps them (``allow_pickle=False``) in milliseconds.
The key covers the caller's ``key_extra`` (e.g. the split file's hash), every image's path, size and mtime,
the transform and the Pillow version: when any of them changes the entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from peftbench.console import say
from peftbench.data.base import SplitArrays
from peftbench.errors import ConfigError, DataError

CACHE_FORMAT = 1  # bump when the on-disk layout changes
CACHE_DIRNAME = ".peftbench_cache"
_CHUNK = 256  # images in flight per thread-pool round (bounds memory on huge splits)
_SERIAL_BELOW = 64  # splits smaller than this decode in the calling thread
_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def default_num_workers() -> int:
    """Decode threads when the config gives none: min(4, CPU count)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class ImageTransform:
    """A deterministic PIL transform to a uint8 (3, H, W) array, matching torchvision on PIL images.

    ``square=True``: ``Resize((resize, resize))``; ``square=False``: ``Resize(resize)`` (shorter side to ``resize``,
    longer side ``int(resize * long / short)`` as torchvision computes it). ``crop``: then ``CenterCrop(crop)``.
    """

    resize: int
    square: bool = True
    crop: int | None = None
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERP:
            raise ConfigError(f"interpolation must be one of {sorted(_INTERP)}, got {self.interpolation!r}")
        if self.crop is not None and self.crop > self.resize:
            raise ConfigError(f"crop {self.crop} larger than resize {self.resize}")

    @property
    def fixed_size(self) -> int | None:
        """Output side when every output is square and the same size, else None (ragged)."""
        if self.crop is not None:
            return self.crop
        return self.resize if self.square else None

    @property
    def tag(self) -> str:
        """Short name for cache folders, e.g. ``sq224-bicubic`` or ``short256-crop224-bilinear``."""
        kind = f"sq{self.resize}" if self.square else f"short{self.resize}"
        crop = f"-crop{self.crop}" if self.crop is not None else ""
        return f"{kind}{crop}-{self.interpolation}"

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        if self.square:
            return self.resize, self.resize
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def apply(self, img: Image.Image) -> np.ndarray:
        """RGB-convert, resize and crop one PIL image; returns a contiguous uint8 (3, H, W) array.

        16-bit grayscale images (PIL modes ``I;16*`` and ``I``) are scaled to 8 bits (v / 257), not clipped.
        """
        if img.mode.startswith("I;16") or img.mode == "I":
            wide = np.asarray(img, dtype=np.float64)  # (H, W) 0..65535
            img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
        img = img.convert("RGB")
        size = self._target_size(*img.size)
        if img.size != size:
            img = img.resize(size, _INTERP[self.interpolation])
        if self.crop is not None:
            w, h = img.size
            top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
            img = img.crop((left, top, left + self.crop, top + self.crop))
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)

    def __call__(self, path: Path) -> np.ndarray:
        """Decode the image file ``path``; an unreadable or corrupt file raises :class:`DataError`."""
        try:
            with Image.open(path) as img:
                return self.apply(img)
        except FileNotFoundError:
            raise DataError(f"image {path} not found: check the split file or paths.data_dir") from None
        except MemoryError:
            raise
        except Exception as err:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, ...
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"cannot decode image {path} ({msg}): replace or remove the file") from None


# ----------------------------------------------------------------------------------------------- cache location
def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def resolve_cache_root(task_root: Path, task_name: str, override: str | Path | None = None) -> Path:
    """Where a task keeps its decoded splits.

    ``override`` (a config value) -> ``<override>/<task_name>``; else ``<task_root>/.peftbench_cache`` when that can
    be written; else ``~/.cache/peftbench/<task_name>-<hash of task_root>`` (read-only data folders).
    """
    if override is not None:
        return Path(override).expanduser() / task_name
    local = Path(task_root) / CACHE_DIRNAME
    if _writable(local):
        return local
    digest = hashlib.sha1(str(Path(task_root).resolve()).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "peftbench" / f"{task_name}-{digest}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (split files are small)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _files_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of every image's path, size and mtime (a missing image raises DataError)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DataError(f"image {p} not found: check the split file or paths.data_dir") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever, a device or folder is no image
            raise DataError(f"image {p} is not a regular file: replace it with the image or fix the split file")
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- cache files
def _npy_header(length: int) -> bytes:
    """The .npy v1.0 header of a 1-D uint8 array of ``length`` (128 bytes for any length, so it can be patched)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


def _load_npy(path: Path) -> np.ndarray:
    # Copy-on-write map: lazy like mmap_mode="r", but writable, so torch never wraps a read-only buffer.
    return np.load(path, mmap_mode="c", allow_pickle=False)


def load_cached(entry: Path, key: str) -> SplitArrays | None:
    """The split stored in ``entry`` if its meta.json carries ``key`` and its files are intact, else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        return None
    return _read_entry(entry, meta)


def _read_entry(entry: Path, meta: dict) -> SplitArrays | None:
    """Memory-map the arrays of ``entry`` described by ``meta``; None when a file is missing or damaged."""
    try:
        labels = torch.from_numpy(np.array(np.load(entry / "labels.npy", allow_pickle=False), dtype=np.int64))
        if meta["ragged"]:
            flat = torch.from_numpy(_load_npy(entry / "flat.npy"))  # (total bytes,) uint8
            index = np.load(entry / "index.npy", allow_pickle=False)  # (N, 4): offset, C, H, W
            images: torch.Tensor | list[torch.Tensor] = [
                flat[o : o + c * h * w].view(int(c), int(h), int(w)) for o, c, h, w in index.tolist()
            ]
        else:
            images = torch.from_numpy(_load_npy(entry / "images.npy"))  # (N, 3, H, W) uint8
    except (OSError, ValueError, KeyError):
        return None
    if len(images) != meta["n"] or len(labels) != meta["n"]:
        return None
    return SplitArrays(images, labels)


class _Writer:
    """Streams decoded (3, H, W) arrays, in order, into memory or into a cache entry's temporary files."""

    def __init__(self, entry: Path | None, n: int, fixed_size: int | None) -> None:
        self.entry, self.n, self.fixed = entry, n, fixed_size
        self.tmp = f".tmp-{os.getpid()}"
        self.index: list[tuple[int, int, int, int]] = []
        self.tensors: list[torch.Tensor] = []
        self.images: np.ndarray | None = None
        self.stream: io.BufferedWriter | None = None
        self.offset = 0
        if entry is not None:
            entry.mkdir(parents=True, exist_ok=True)
            (entry / "meta.json").unlink(missing_ok=True)  # an entry being rebuilt is never valid
            if fixed_size is not None:
                shape = (n, 3, fixed_size, fixed_size)
                self.images = np.lib.format.open_memmap(entry / f"images.npy{self.tmp}", "w+", np.uint8, shape)
            else:
                self.stream = open(entry / f"flat.npy{self.tmp}", "wb")  # closed in finish() or abort()
                self.stream.write(_npy_header(0))
        elif fixed_size is not None:
            self.images = np.empty((n, 3, fixed_size, fixed_size), np.uint8)

    def add(self, i: int, img: np.ndarray) -> None:
        if self.images is not None:
            if img.shape != self.images.shape[1:]:
                raise DataError(f"decoded image {i} has shape {img.shape}, expected {self.images.shape[1:]}")
            self.images[i] = img
        elif self.stream is not None:
            self.stream.write(img.tobytes())
            self.index.append((self.offset, *img.shape))
            self.offset += img.size
        else:
            self.tensors.append(torch.from_numpy(img))

    def abort(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.entry is not None:
            for f in self.entry.glob(f"*{self.tmp}"):
                f.unlink(missing_ok=True)

    def finish(self, labels: torch.Tensor, key: str) -> SplitArrays:
        if self.entry is None:
            return SplitArrays(torch.from_numpy(self.images) if self.images is not None else self.tensors, labels)
        e, tmp = self.entry, self.tmp
        np.save(e / f"labels{tmp}.npy", labels.numpy())
        os.replace(e / f"labels{tmp}.npy", e / "labels.npy")
        ragged = self.fixed is None
        if self.images is not None:
            self.images.flush()
            self.images = None  # closes the map before the rename
            os.replace(e / f"images.npy{tmp}", e / "images.npy")
        else:
            assert self.stream is not None
            self.stream.seek(0)
            header = _npy_header(self.offset)
            assert len(header) == len(_npy_header(0)), "npy header length changed"
            self.stream.write(header)
            self.stream.close()
            os.replace(e / f"flat.npy{tmp}", e / "flat.npy")
            np.save(e / f"index{tmp}.npy", np.asarray(self.index, dtype=np.int64).reshape(-1, 4))
            os.replace(e / f"index{tmp}.npy", e / "index.npy")
        meta = {"format": CACHE_FORMAT, "key": key, "n": self.n, "ragged": ragged}
        (e / f"meta.json{tmp}").write_text(json.dumps(meta))
        os.replace(e / f"meta.json{tmp}", e / "meta.json")  # written last: marks the entry valid
        cached = _read_entry(e, meta)  # not via meta.json: another process may be rebuilding the same entry
        if cached is None:
            raise DataError(f"decode cache {e} could not be read back after writing: delete it and retry")
        return cached


def _ordered(items: Sequence, fn: Callable, num_workers: int) -> Iterator:
    """``map(fn, items)`` in order, on ``num_workers`` threads, at most ``_CHUNK`` results held at once."""
    if num_workers <= 1 or len(items) < _SERIAL_BELOW:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="peftbench-decode") as pool:
        for start in range(0, len(items), _CHUNK):
            yield from pool.map(fn, items[start : start + _CHUNK])


def build_split(
    items: Sequence,
    labels: Iterable[int] | torch.Tensor | None,
    fn: Callable,
    entry: Path | None,
    key: str,
    fixed_size: int | None,
    num_workers: int | None = None,
) -> SplitArrays:
    """Decode ``fn(item)`` for every item (in parallel, in order) into memory or into the cache ``entry``.

    ``fn`` returns a uint8 (3, H, W) array, or an ``(array, label)`` pair when ``labels`` is None.
    """
    if labels is not None:
        labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.int64)
        if len(labels) != len(items):
            raise ConfigError(f"{len(items)} items but {len(labels)} labels")
    collected: list[int] = []
    writer = _Writer(entry if len(items) else None, len(items), fixed_size)  # empty files cannot be mapped
    start = time.perf_counter()
    if len(items) >= 200:  # a first decode of a real split takes a while: say what is happening
        where = f" into {entry}" if entry is not None else ""
        say(f"decoding {len(items)} images once{where} (later runs load them in a second) ...")
    try:
        for i, out in enumerate(_ordered(items, fn, num_workers or default_num_workers())):
            if labels is None:
                out, label = out
                collected.append(int(label))
            writer.add(i, out)
        if labels is None:
            labels = torch.tensor(collected, dtype=torch.int64)
        split = writer.finish(labels, key)
        if len(items) >= 200:
            say(f"decoded {len(items)} images in {time.perf_counter() - start:.1f}s")
        return split
    finally:
        writer.abort()  # removes leftovers of a failed build; a no-op after finish()


def cache_key(*parts: object) -> str:
    """SHA-256 over the cache format, the Pillow version and ``parts`` (json-serialisable)."""
    blob = json.dumps([CACHE_FORMAT, PIL.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def decode_files(
    paths: list[Path],
    labels: Iterable[int] | torch.Tensor,
    transform: ImageTransform,
    cache_dir: Path | None,
    key_extra: str,
    num_workers: int | None = None,
) -> SplitArrays:
    """Decode image files once with ``transform``, caching the result in the folder ``cache_dir`` (None: no cache).

    ``key_extra`` names what the caller knows changes the split (e.g. ``"vtab:test:<sha256 of test.txt>"``).
    A second call with the same files, transform and ``key_extra`` loads the cached arrays without opening an image.
    """
    paths = [Path(p) for p in paths]
    key = cache_key(key_extra, transform.tag, _files_fingerprint(paths))
    if cache_dir is not None:
        cached = load_cached(Path(cache_dir), key)
        if cached is not None:
            return cached
    return build_split(paths, labels, transform, cache_dir and Path(cache_dir), key, transform.fixed_size, num_workers)
