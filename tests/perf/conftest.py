"""What the perf tests share: the result contract's validator."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import jsonschema
import pytest

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "schema" / "perf" / "result.schema.json"


@pytest.fixture(scope="session")
def contract():
    """``check(doc)``: ``doc`` matches docs/schema/perf/result.schema.json,
    and every figure that kept its values has the median, min, max and n of
    them. Returns the figures checked."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))

    def check(doc: dict) -> list[dict]:
        errors = [f"{list(e.absolute_path)}: {e.message[:300]}" for e in validator.iter_errors(doc)]
        assert not errors, errors[:5]
        benches = doc["benches"].values() if "benches" in doc else [doc]
        figs = [f for b in benches for f in b["figures"]]
        for f in figs:
            if f["values"] is not None:
                v = f["values"]
                assert (f["median"], f["min"], f["max"], f["n"]) == (statistics.median(v), min(v), max(v), len(v)), f
        return figs
    return check
