"""The twinrt/1 artifact: manifest, verified loading, atomic writing."""

from twinrt.artifact.manifest import FORMAT, MANIFEST, Manifest
from twinrt.artifact.store import Artifact, atomic_dir, checksum_tree, write_manifest
from twinrt.artifact.writer import ArtifactWriter

__all__ = ["FORMAT", "MANIFEST", "Artifact", "ArtifactWriter", "Manifest", "atomic_dir", "checksum_tree",
           "write_manifest"]
