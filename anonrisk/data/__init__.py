"""Face records, manifests, dataset kinds (importing this package registers the built-in ones) and the
prepare stage."""

from anonrisk.data import datasets, hf, unlabeled, wild  # noqa: F401  (register the built-in dataset kinds)
from anonrisk.data.records import FaceRecord, read_manifest, write_manifest

__all__ = ["FaceRecord", "read_manifest", "write_manifest"]
