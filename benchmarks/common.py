"""What several benchmarks share: the results as one JSON line on stdout and, optionally, a JSON file."""
from __future__ import annotations

import json
from typing import Any


def emit(results: dict[str, Any], json_path: str | None = None) -> None:
    """Write ``results`` to ``json_path`` (indented; when given), then print them as one JSON line."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(results))
