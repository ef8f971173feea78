"""What a benchmark ends with: its markdown table printed with the machine's load, and its rows, table,
arguments and machine written as JSON to ``--out``."""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def finish(rows: list[dict], text: str, args: Any, out: str | None) -> dict:
    """Prints ``text`` and the load average; writes ``{"rows", "table", "args", "machine"}`` to ``out``
    (none when empty) and returns it."""
    print(text)
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load)}")
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(), load_average=load)
    result = dict(rows=rows, table=text, args=vars(args), machine=machine)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result
