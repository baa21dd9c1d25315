"""The hash that ties a model version's bundle (what the worker reads beside Triton) to its served graph.

A version's metadata.json carries `bundle_sha256` over its vocab.json, categories.json and the ONNX graph's
sha256: the exporter writes it, the worker recomputes it from the files it loads and refuses the version on a
mismatch (a vocabulary from another version would name the wrong items). Pure: callers do the file I/O.
"""

from __future__ import annotations

import hashlib


def bundle_hash(vocab_json: bytes, categories_json: bytes, onnx_sha256: str) -> str:
    h = hashlib.sha256()
    for part in (b"vocab.json", vocab_json, b"categories.json", categories_json, b"onnx", onnx_sha256.encode()):
        h.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no two inputs hash alike by shifting bytes
    return h.hexdigest()
