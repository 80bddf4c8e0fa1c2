"""Where a data set comes from: generated phantoms, URL archives, Kaggle, or a local folder.

Every source has the same two methods. ``fetch(cache_dir)`` makes the data set available and
returns its root folder; ``provenance()`` says, as JSON-able data, exactly what was used. Fetching
is idempotent: a finished fetch leaves ``.complete.json`` (holding the provenance) in its root, and
a later fetch that finds it returns at once (a local folder is used in place and needs no
marker). Data is built in a hidden staging folder beside the
root and renamed into place, and the marker is written last, so an interrupted run never leaves
anything a later run would trust.

Pure library code: no Prefect imports. Retries here are HTTP retries inside one download; the
Prefect task around a fetch may add its own.

One module a job: ``base`` (the interface and its error), ``kinds`` (the four sources and
``source_from_config``), ``download`` (HTTP with resume and sha256), ``archives`` (safe
extraction) and ``build_once`` (staging, marker and lock).
"""

from lung_models.data.sources.archives import safe_extract
from lung_models.data.sources.base import MARKER_NAME, SOURCE_KINDS, DataSource, DataSourceError, Progress
from lung_models.data.sources.download import download_url
from lung_models.data.sources.kinds import (
    GeneratedSource,
    KaggleSource,
    LocalFolderSource,
    UrlArchive,
    UrlSource,
    source_from_config,
)

__all__ = [
    "MARKER_NAME",
    "SOURCE_KINDS",
    "DataSource",
    "DataSourceError",
    "GeneratedSource",
    "KaggleSource",
    "LocalFolderSource",
    "Progress",
    "UrlArchive",
    "UrlSource",
    "download_url",
    "safe_extract",
    "source_from_config",
]
