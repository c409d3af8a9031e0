"""Face records, manifests, dataset adapters and identity-disjoint splits."""

from anonrisk.data.records import FaceRecord, read_manifest, write_manifest

__all__ = ["FaceRecord", "read_manifest", "write_manifest"]
