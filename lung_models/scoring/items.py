"""The scoring vocabulary: what an item is, the statuses of a result, and which items each modality takes.

An *item* (a scan) is what one report row per model is about: an image file (a histology tile or a
CT slice, PNG/JPEG/TIFF or a single DICOM slice), a NIfTI volume, or a DICOM series (the slices of
one SeriesInstanceUID in one folder). A volume and a series are one scan for every model: the 3-D
model scores the volume, the 2-D CT models score its axial slices and report one aggregated row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lung_models.data.readers import DICOM, IMAGE, NIFTI  # noqa: F401 - file kinds, part of this vocabulary
from lung_models.registry import CT_SLICE, CT_VOLUME, HISTOLOGY_TILE

# Statuses of a row. ``ok`` and ``rejected`` are *done* (a rejected input would be rejected again);
# ``error`` (the system's fault: permissions, the model, the runtime) is retried by the next run.
OK, REJECTED, ERROR = "ok", "rejected", "error"
STATUSES = frozenset({OK, REJECTED, ERROR})
DONE_STATUSES = frozenset({OK, REJECTED})

# An item's file kind, how it is read: one file of a kind the readers decode (IMAGE, NIFTI, DICOM),
# the slices of a DICOM series, or nothing (refused unread: a link out of the folder, a pipe...).
DICOM_SERIES, REFUSED = "dicom_series", "refused"
# An item's input kind, what it shows: a modality, or an image whose modality cannot be told (it
# does not even open), which goes to every image model so that each reports the problem on its row.
UNKNOWN_IMAGE = "image"
# Which input kinds each modality scores. A volume is a stack of CT slices to the 2-D CT models.
MODALITY_INPUTS = {HISTOLOGY_TILE: frozenset({HISTOLOGY_TILE, UNKNOWN_IMAGE}),
                   CT_SLICE: frozenset({CT_SLICE, UNKNOWN_IMAGE, CT_VOLUME}),
                   CT_VOLUME: frozenset({CT_VOLUME})}
DEFAULT_SETTLE_SECONDS = 60.0


class FileChanged(RuntimeError):
    """A file changed between discovery and reading (still being written): skip it this run."""


class BundleInputError(RuntimeError):
    """The bundle cannot take this kind of input (an error of the model, not of the file)."""


@dataclass(frozen=True)
class Item:
    key: str  # relative path of the file, or of the folder holding a DICOM series ("." for the input folder)
    input_kind: str  # histology_tile | ct_slice | ct_volume | image (an image that does not open)
    file_kind: str  # image | nifti | dicom | dicom_series | refused
    files: tuple[str, ...]  # relative paths of the files read to score it
    sha256: str  # content hash: the file's, or for a series a hash over its slices' names and hashes
    stats: tuple[tuple[int, ...], ...] = ()  # stat key of each file when it was hashed
    series_uid_hash: str = ""
    refusal: str = ""  # set when the item is refused without being read (symlink out of the folder...)
    refusal_status: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Item:
        return cls(**{**d, "files": tuple(d["files"]), "stats": tuple(tuple(s) for s in d["stats"])})


@dataclass
class Incoming:
    items: list[Item] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    hashed: int = 0  # files read and hashed this run (the others came from the hash cache)
    cached: int = 0  # files whose hash the cache held (same size, mtime, ctime and inode)


def takes(modality: str, item: Item) -> bool:
    """Whether a model of ``modality`` scores ``item``."""
    return item.input_kind in MODALITY_INPUTS[modality]
