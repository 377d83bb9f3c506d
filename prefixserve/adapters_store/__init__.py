"""Task artifacts: the format (one safetensors file), the kind registry, backbone fingerprints and
PEFT import. Stores and caches build on these; nothing here imports the engine or the server."""

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.fingerprint import backbone_fingerprint, fingerprint_from_parts
from prefixserve.adapters_store.format import (
    FORMAT_VERSION,
    artifact_version,
    decode_artifact,
    encode_artifact,
)
from prefixserve.adapters_store.kinds import KINDS, AdapterKind, get_kind
from prefixserve.adapters_store.peft_import import import_peft

__all__ = ["FORMAT_VERSION", "KINDS", "AdapterKind", "Artifact", "artifact_version", "backbone_fingerprint",
           "decode_artifact", "encode_artifact", "fingerprint_from_parts", "get_kind", "import_peft"]
