"""Segmentation datasets as Parquet shards plus a manifest, on local disk or S3 (README "Datasets").

Public API: the format (:class:`DatasetInfo`, :class:`Sample`, :class:`DatasetWriter`,
:func:`read_manifest`, :func:`validate_dataset`), storage resolution (:func:`resolve`,
:func:`fsspec_filesystem`), readers (:func:`read_ray_dataset`, :func:`iter_samples`,
:func:`decode_image`, :func:`decode_mask`) and the built-in sources (:data:`BUILTIN_SOURCES`).
Readers and sources import Ray, nibabel and nilearn lazily.
"""

from segplatform.data.format import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    BadSampleError,
    ConvertReport,
    DatasetError,
    DatasetInfo,
    DatasetWriter,
    Sample,
    default_palette,
    encode_png,
    read_manifest,
    validate_dataset,
)
from segplatform.data.io import fsspec_filesystem, resolve
from segplatform.data.reader import decode_image, decode_mask, iter_samples, read_ray_dataset
from segplatform.data.sources import BUILTIN_SOURCES

__all__ = [
    "BUILTIN_SOURCES",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "BadSampleError",
    "ConvertReport",
    "DatasetError",
    "DatasetInfo",
    "DatasetWriter",
    "Sample",
    "decode_image",
    "decode_mask",
    "default_palette",
    "encode_png",
    "fsspec_filesystem",
    "iter_samples",
    "read_manifest",
    "read_ray_dataset",
    "resolve",
    "validate_dataset",
]
