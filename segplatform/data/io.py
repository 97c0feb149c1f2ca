"""Storage access for dataset URIs: local paths, ``file://`` and ``s3://``.

Two views of the same location are offered:

- :func:`resolve` gives a ``pyarrow.fs.FileSystem`` and a path inside it. Ray Data
  (``ray.data.read_parquet(path, filesystem=fs)``) and the dataset writer use it. With a filesystem
  object the path never carries the ``s3://`` scheme (``bucket/prefix``), as pyarrow requires.
- :func:`fsspec_filesystem` gives an fsspec filesystem (``s3fs`` for S3) for tools that want one.

S3 endpoint and credentials come from explicit ``storage_options`` (keys ``endpoint_url``, ``key``,
``secret``, ``region``) first, then from the standard variables ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
``AWS_DEFAULT_REGION`` (or ``AWS_REGION``). Any S3-compatible store (AWS, SeaweedFS, MinIO, ...)
works; a custom endpoint uses path-style addressing.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

# Keys accepted in ``storage_options``.
STORAGE_OPTION_KEYS: frozenset[str] = frozenset({"endpoint_url", "key", "secret", "region"})


class StorageError(ValueError):
    """A URI or storage option that cannot be used."""


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 connection settings."""

    endpoint_url: str | None  # e.g. "http://127.0.0.1:8333"; None = AWS itself
    key: str | None  # access key id; None = the provider chain of the client library
    secret: str | None  # secret access key
    region: str | None  # region name; None = library default


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 location."""
    return str(uri).startswith("s3://")


def _check_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(storage_options or {})
    unknown = sorted(set(options) - STORAGE_OPTION_KEYS)
    if unknown:
        raise StorageError(
            f"unknown storage option(s) {unknown}; valid keys: {sorted(STORAGE_OPTION_KEYS)}"
        )
    return options


def s3_settings(storage_options: dict[str, Any] | None = None) -> S3Settings:
    """S3 settings from explicit options, falling back to the standard AWS variables."""
    options = _check_options(storage_options)

    def pick(option: str, *env_names: str) -> str | None:
        value = options.get(option)
        if value:
            return str(value)
        for name in env_names:
            if os.environ.get(name):
                return os.environ[name]
        return None

    return S3Settings(
        endpoint_url=pick("endpoint_url", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        key=pick("key", "AWS_ACCESS_KEY_ID"),
        secret=pick("secret", "AWS_SECRET_ACCESS_KEY"),
        region=pick("region", "AWS_DEFAULT_REGION", "AWS_REGION"),
    )


def local_path(uri: str) -> str:
    """The absolute local path of a plain path or ``file://`` URI."""
    uri = os.fspath(uri)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must name a local path (file:///abs/path)")
        uri = parsed.path
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(
            f"{uri}: unsupported URI scheme {scheme!r} (use a path, file:// or s3://)"
        )
    return os.path.abspath(os.path.expanduser(uri))


def s3_path(uri: str) -> str:
    """``s3://bucket/prefix/`` -> ``bucket/prefix`` (the form pyarrow and s3fs take)."""
    path = uri[len("s3://") :].strip("/")
    if not path:
        raise StorageError(f"{uri}: an s3:// URI needs a bucket name")
    return posixpath.normpath(path)


def pyarrow_s3(storage_options: dict[str, Any] | None = None) -> pafs.S3FileSystem:
    """A ``pyarrow.fs.S3FileSystem`` for the resolved endpoint and credentials."""
    settings = s3_settings(storage_options)
    kwargs: dict[str, Any] = {}
    if settings.key and settings.secret:
        kwargs.update(access_key=settings.key, secret_key=settings.secret)
    elif settings.key or settings.secret:
        raise StorageError("S3 credentials need both a key and a secret (or neither)")
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(
                f"S3 endpoint {settings.endpoint_url!r} must look like http(s)://host:port"
            )
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    kwargs["region"] = settings.region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path)`` for a local path, ``file://`` or ``s3://`` URI."""
    uri = os.fspath(uri)
    if is_s3(uri):
        return pyarrow_s3(storage_options), s3_path(uri)
    _check_options(storage_options)
    return pafs.LocalFileSystem(), local_path(uri)


def fsspec_filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path)``: ``s3fs.S3FileSystem`` for S3, the local one otherwise."""
    uri = os.fspath(uri)
    if is_s3(uri):
        import s3fs

        settings = s3_settings(storage_options)
        client_kwargs: dict[str, Any] = {}
        config_kwargs: dict[str, Any] = {}
        if settings.endpoint_url:
            client_kwargs["endpoint_url"] = settings.endpoint_url
            config_kwargs["s3"] = {"addressing_style": "path"}
        elif settings.region:
            # Only for AWS itself: with a custom endpoint, region_name in client_kwargs breaks
            # bucket creation; the region then comes from AWS_DEFAULT_REGION.
            client_kwargs["region_name"] = settings.region
        fs = s3fs.S3FileSystem(
            key=settings.key,
            secret=settings.secret,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        return fs, s3_path(uri)
    import fsspec

    _check_options(storage_options)
    return fsspec.filesystem("file"), local_path(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts the way the filesystem of :func:`resolve` expects ('/'-separated)."""
    return posixpath.join(base, *parts)


def canonical_uri(uri: str) -> str:
    """One spelling per location: ``s3://bucket/prefix`` or an absolute local path (no
    trailing slash, ``file://`` dropped), so that two names of one dataset compare equal."""
    return f"s3://{s3_path(uri)}" if is_s3(uri) else local_path(uri)


def display_uri(uri: str, path: str) -> str:
    """A human-readable location for messages: ``s3://bucket/key`` or the local path."""
    return f"s3://{path}" if is_s3(uri) else path
