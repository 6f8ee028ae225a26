"""Where bytes live: local paths and s3:// URIs behind one small API (fsspec underneath).

Every module that reads or writes a file by URI (shards, checkpoints, fault markers) goes
through here, so the S3 settings are read in one place and a local path and an object-store
prefix are interchangeable everywhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec


def is_remote(uri: str) -> bool:
    """True for an object-store URI (s3://...), false for a local path or file:// URI."""
    return "://" in uri and not uri.startswith("file://")


def join_uri(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path) for a local path or s3:// URI.

    S3 settings come from the standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). They are passed explicitly so fsspec's instance
    cache can never hand back a client built for another endpoint or key pair.
    """
    if uri.startswith("s3://"):
        # Imported here: s3fs (with aiobotocore) costs ~0.2 s at import and only s3:// needs it.
        import s3fs

        fs = s3fs.S3FileSystem(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL"),
            key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            client_kwargs={"region_name": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")},
        )
        return fs, uri[len("s3://") :]
    if is_remote(uri):
        return fsspec.core.url_to_fs(uri)
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; a local file appears only complete (temp name + rename)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a half-written file
        return
    fs.pipe_file(path, data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
