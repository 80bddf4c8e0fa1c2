"""Turn a data set folder into labelled items, a seeded split, and cached preprocessed arrays.

The cache is keyed by the files' content (sha256) and the preprocessing parameters, so a
second run with the same data and parameters reuses it, and any change rebuilds it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lung_models import preprocess
from lung_models.data import near_copies
from lung_models.data.catalog import DatasetSpec
from lung_models.data.readers import IMAGE, NIFTI, READER_VERSION, READERS, InputError
from lung_models.fileutil import atomic_write_json, sha256_bytes, sha256_file
from lung_models.registry import ModelSpec

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    pass


@dataclass(frozen=True)
class LabelledFile:
    """A file of a data set and the index of its class."""

    path: Path
    label: int


def _class_of(folder_name: str, dataset: DatasetSpec, class_names: tuple[str, ...]) -> int | None:
    """The class whose layout pattern (a folder name or an fnmatch pattern) matches the folder."""
    for label, cls in enumerate(class_names):
        if fnmatch.fnmatchcase(folder_name, dataset.layout[cls]):
            return label
    return None


def _files_in(folder: Path, dataset: DatasetSpec) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(dataset.file_suffixes))


def find_items(root: Path, dataset: DatasetSpec, class_names: tuple[str, ...]) -> list[LabelledFile]:
    """Every file of every class under ``root``, in the data set's documented folder layout.

    Each class's folder (``dataset.layout[class]``, a name or an fnmatch pattern) is looked for
    anywhere below ``root``, so the archive's own top-level folders do not matter.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: data folder not found; fetch the data set or pass --data-dir")
    items: list[LabelledFile] = []
    for label, cls in enumerate(class_names):
        pattern = dataset.layout[cls]
        folders = sorted(p for p in root.rglob("*") if p.is_dir() and fnmatch.fnmatchcase(p.name, pattern))
        files = [f for folder in folders for f in _files_in(folder, dataset)]
        if not files:
            raise DatasetLayoutError(
                f"{root}: no {'/'.join(dataset.file_suffixes)} files in a folder named {pattern!r} "
                f"for class {cls!r}; expected the {dataset.name} layout "
                f"({', '.join(dataset.layout.values())} folders)")
        items.extend(LabelledFile(f, label) for f in files)
    return items


def find_split_folders(root: Path, dataset: DatasetSpec, class_names: tuple[str, ...]
                       ) -> dict[str, list[LabelledFile]]:
    """Items of a data set that ships its own splits (``split["folders"]`` names each split's folder).

    Every class folder inside a split folder must map to a class; one that maps to none is an
    error naming it (a silently dropped class would skew every metric).
    """
    root = Path(root)
    found: dict[str, list[LabelledFile]] = {}
    for split, folder_name in dataset.split["folders"].items():
        candidates = sorted(p for p in root.rglob(folder_name) if p.is_dir())
        if not candidates:
            continue
        items: list[LabelledFile] = []
        for folder in candidates:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                label = _class_of(sub.name, dataset, class_names)
                if label is None:
                    raise DatasetLayoutError(
                        f"{sub}: class folder matches none of {', '.join(class_names)} "
                        f"(patterns {', '.join(dataset.layout[c] for c in class_names)}); rename it or "
                        "remove it from the data set")
                items.extend(LabelledFile(f, label) for f in _files_in(sub, dataset))
        found[split] = items
    if "train" not in found or not found["train"]:
        raise DatasetLayoutError(f"{root}: no {dataset.split['folders']['train']!r} folder with class "
                                 f"folders; expected the {dataset.name} layout")
    return found


def limit_per_class(items: list[LabelledFile], max_per_class: int | None, seed: int) -> list[LabelledFile]:
    if not max_per_class:
        return items
    rng = np.random.default_rng(seed)
    kept: list[LabelledFile] = []
    for label in sorted({i.label for i in items}):
        group = [i for i in items if i.label == label]
        order = rng.permutation(len(group))[:max_per_class]
        kept.extend(group[j] for j in sorted(order))
    return kept


def split_items(items: list[LabelledFile], split: dict[str, Any]) -> dict[str, list[LabelledFile]]:
    """Seeded train/val/test split with the fractions in ``split``, stratified by class.

    Each class is shuffled with the seed and cut by the fractions (rounded, at least one item in
    val and test when the class has three or more), so even a tiny data set keeps every class in
    every split.
    """
    rng = np.random.default_rng(split["seed"])
    out: dict[str, list[LabelledFile]] = {name: [] for name in SPLITS}
    for label in sorted({i.label for i in items}):
        group = [i for i in items if i.label == label]
        group = [group[j] for j in rng.permutation(len(group))]
        n = len(group)
        n_test = max(1, round(n * split["test"])) if n >= 3 and split["test"] > 0 else 0
        n_val = max(1, round(n * split["val"])) if n >= 3 and split["val"] > 0 else 0
        out["test"] += group[:n_test]
        out["val"] += group[n_test:n_test + n_val]
        out["train"] += group[n_test + n_val:]
    return {name: sorted(v, key=lambda i: str(i.path)) for name, v in out.items()}


def drop_duplicates(given: dict[str, list[LabelledFile]], hashes: dict[str, str], class_names: tuple[str, ...]
                    ) -> tuple[dict[str, list[LabelledFile]], list[dict[str, str]]]:
    """Keep one file per content hash, so no image is in two splits (real data sets ship copies).

    The first copy is kept (train before val before test); a hash whose copies carry different
    labels is dropped entirely, since its label cannot be trusted. Returns what was dropped, why.
    """
    labels: dict[str, set[int]] = {}
    for group in given.values():
        for item in group:
            labels.setdefault(hashes[str(item.path)], set()).add(item.label)
    order = [s for s in ("all", *SPLITS) if s in given]
    seen: set[str] = set()
    kept: dict[str, list[LabelledFile]] = {}
    dropped: list[dict[str, str]] = []
    for split in order:
        kept[split] = []
        for item in given[split]:
            digest = hashes[str(item.path)]
            if len(labels[digest]) > 1:
                dropped.append({"path": str(item.path), "sha256": digest, "reason": "same image under classes "
                                + ", ".join(class_names[i] for i in sorted(labels[digest]))})
            elif digest in seen:
                dropped.append({"path": str(item.path), "sha256": digest, "reason": "copy of an earlier file"})
            else:
                seen.add(digest)
                kept[split].append(item)
    return kept, dropped


def assign_splits(given: dict[str, list[LabelledFile]], split: dict[str, Any]
                  ) -> tuple[dict[str, list[LabelledFile]], str]:
    """Train/val/test from the data set's own split folders, or by seeded fractions.

    A data set that ships split folders but arrives without some of them (e.g. a sample with no
    ``test`` folder) gets the missing ones carved from ``train`` with ``split["carve"]`` fractions,
    and the manifest says so.
    """
    if "all" in given:
        return split_items(given["all"], split), "seeded stratified split by fractions"
    out = {name: list(given.get(name, [])) for name in SPLITS}
    missing = [name for name in ("val", "test") if not out[name]]
    if not missing:
        return out, "the data set's own split folders"
    carve = split["carve"]
    fractions = {"train": 1.0 - sum(carve[m] for m in missing), "val": 0.0, "test": 0.0,
                 "seed": split["seed"], **{m: carve[m] for m in missing}}
    carved = split_items(out["train"], fractions)
    for name in ("train", *missing):
        out[name] = carved[name]
    return out, f"{', '.join(missing)} carved from the train folder ({carve}, seed {split['seed']})"


# The file kind each preprocessing kind is trained from.
TRAINING_FILE_KINDS = {"ct_volume": NIFTI, "rgb_image": IMAGE}


def reader_for(params: dict[str, Any]) -> Callable[[Path], np.ndarray]:
    """The decoder that feeds a preprocessing kind (from a spec or a bundle's card)."""
    if params["kind"] not in TRAINING_FILE_KINDS:
        raise ValueError(f"no reader for preprocessing kind {params['kind']!r}")
    return READERS[TRAINING_FILE_KINDS[params["kind"]]]


@dataclass(frozen=True)
class PreparedData:
    """Cached, preprocessed arrays of each split (``<split>_x.npy``, ``<split>_y.npy``)."""

    folder: Path

    def arrays(self, split: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        x = np.load(self.folder / f"{split}_x.npy", mmap_mode="r" if mmap else None)
        y = np.load(self.folder / f"{split}_y.npy")
        return x, y

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.folder / "manifest.json").read_text())


def _without_near_copies_of(earlier: list[tuple[LabelledFile, np.ndarray]], kept: list[tuple[LabelledFile, np.ndarray]],
                            split: str, hashes: dict[str, str], dropped: list[dict[str, Any]], root: Path
                            ) -> list[tuple[LabelledFile, np.ndarray]]:
    """``kept`` without the images that are near-copies of one in an earlier split (train before
    val before test, as for byte-identical copies), each drop recorded in ``dropped``; ``earlier``
    grows by what is kept."""
    thumbs = np.stack([near_copies.thumbnail(a) for _, a in kept])
    if earlier:
        copies: dict[int, tuple[int, float]] = {}
        for i, j, r in near_copies.pairs(thumbs, np.stack([t for _, t in earlier])):
            copies.setdefault(i, (j, r))
        for i, (j, r) in sorted(copies.items()):
            item = kept[i][0]
            dropped.append({"path": str(item.path.relative_to(root)), "sha256": hashes[str(item.path)], "split": split,
                            "near_copy_of": str(earlier[j][0].path.relative_to(root)), "correlation": round(r, 4)})
        keep = [i for i in range(len(kept)) if i not in copies]
        kept, thumbs = [kept[i] for i in keep], thumbs[keep]
    earlier.extend((item, t) for (item, _), t in zip(kept, thumbs))
    return kept


def prepare(spec: ModelSpec, root: Path, cache_root: Path, *, max_per_class: int | None = None,
            input_shape: tuple[int, ...] | None = None, preprocessing: dict[str, Any] | None = None,
            progress: Callable[[str], None] | None = None) -> PreparedData:
    """Split ``root``'s files and cache their preprocessed arrays; idempotent.

    ``input_shape`` (tests, and the demo profile's smaller inputs) overrides the spatial size;
    ``preprocessing`` (a profile's, e.g. ``{"colour": "grey"}``) overrides other parameters.
    """
    say = progress or log.info
    params = {**spec.preprocessing, **(preprocessing or {})}
    if input_shape is not None:
        key = "size" if params["kind"] == "rgb_image" else "target_shape"
        params[key] = list(input_shape[: len(params[key])])
    seed = spec.dataset.split["seed"]
    if "folders" in spec.dataset.split:
        given = find_split_folders(root, spec.dataset, spec.class_names)
        given = {k: limit_per_class(v, max_per_class, seed) for k, v in given.items()}
    else:
        given = {"all": limit_per_class(find_items(root, spec.dataset, spec.class_names), max_per_class, seed)}
    items = [i for group in given.values() for i in group]
    say(f"{spec.name}: hashing {len(items)} files under {root}")
    hashes = {str(i.path): sha256_file(i.path) for i in items}
    key_src = json.dumps({"params": params, "classes": spec.class_names, "split": spec.dataset.split,
                          "reader_version": READER_VERSION, "near_copies": near_copies.RULE,
                          "files": sorted((hashes[str(i.path)], i.label) for i in items)}, sort_keys=True)
    folder = Path(cache_root) / f"{spec.dataset.name.split()[0].lower()}-{sha256_bytes(key_src.encode())[:16]}"
    if (folder / "manifest.json").exists():
        say(f"{spec.name}: preprocessed cache found at {folder}, reusing it")
        return PreparedData(folder)
    folder.mkdir(parents=True, exist_ok=True)
    given, duplicates = drop_duplicates(given, hashes, spec.class_names)
    if duplicates:
        say(f"{spec.name}: dropped {len(duplicates)} byte-identical duplicate files (see the split manifest)")
    splits, split_note = assign_splits(given, spec.dataset.split)
    read = reader_for(params)
    manifest: dict[str, Any] = {"preprocessing": params, "class_names": list(spec.class_names),
                                "root": str(root), "split": spec.dataset.split, "split_note": split_note, "splits": {},
                                "skipped": [], "duplicates_dropped": duplicates, "near_copies_dropped": []}
    earlier: list[tuple[LabelledFile, np.ndarray]] = []  # (item, thumbnail) of the splits already made
    for name in SPLITS:
        kept: list[tuple[LabelledFile, np.ndarray]] = []
        for n, item in enumerate(splits[name], 1):
            try:
                kept.append((item, preprocess.cache_stage(read(item.path), params)))
            except InputError as exc:  # one bad file must not sink a training run; it is recorded
                log.warning("skipping %s: %s", item.path, exc)
                manifest["skipped"].append({"path": str(item.path), "reason": str(exc)})
            if n % 50 == 0 or n == len(splits[name]):
                say(f"{spec.name}: preprocessed {n}/{len(splits[name])} {name} files")
        if not kept:  # say why, not numpy's "need at least one array to stack"
            if not splits[name]:
                raise ValueError(f"{spec.name}: the {name} split under {root} has no files (after dropping "
                                 f"byte-identical duplicates: {len(duplicates)}); add files to it")
            first = manifest["skipped"][-len(splits[name])]["reason"]
            raise ValueError(f"{spec.name}: none of the {len(splits[name])} {name} files under {root} could be "
                             f"read (the first: {first}); fix or convert them (8-bit PNG/JPEG, 3-D NIfTI in HU) "
                             "and run again")
        if params["kind"] == "rgb_image":
            kept = _without_near_copies_of(earlier, kept, name, hashes, manifest["near_copies_dropped"], root)
            if not kept:
                raise ValueError(f"{spec.name}: every file of the {name} split under {root} is a near-copy of a file "
                                 "in an earlier split (see near_copies_dropped in the split manifest); add distinct "
                                 "files to it")
        x = np.stack([a for _, a in kept]).astype(preprocess.cached_dtype(params))
        y = np.array([i.label for i, _ in kept], dtype=np.int64)
        np.save(folder / f"{name}_x.npy", x)
        np.save(folder / f"{name}_y.npy", y)
        manifest["splits"][name] = [
            {"path": str(i.path.relative_to(root)), "sha256": hashes[str(i.path)],
             "label": spec.class_names[i.label]} for i, _ in kept]
    if manifest["near_copies_dropped"]:
        say(f"{spec.name}: dropped {len(manifest['near_copies_dropped'])} near-copies of images in an earlier split "
            "(see the split manifest)")
    atomic_write_json(folder / "manifest.json", manifest)  # written last: marks the cache complete
    return PreparedData(folder)
