"""results.json as a contract: its schema version, the JSON Schema it obeys (``results_schema.json``,
shipped in the package; every key is described in docs/results-schema.md) and the check against it.

``schema_version`` changes whenever a key is renamed, removed or changes meaning (additions are backwards
compatible and keep the version); readers such as ``prunelab-report`` look at it before anything else.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

SCHEMA_VERSION = 1


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of results.json."""
    return json.loads(resources.files("prunelab").joinpath("results_schema.json").read_text())


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from the file ``atomic_write_json`` writes (inf/nan -> null, tuples -> lists,
    paths and tensors converted)."""
    from prunelab.utils.io import _finite, _json_default

    return json.loads(json.dumps(_finite(obj), default=_json_default, allow_nan=False))


def schema_errors(results: dict[str, Any]) -> list[str]:
    """Every violation of the schema by ``results`` (empty: valid), as ``<json path>: <message>``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(as_json(results)), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
