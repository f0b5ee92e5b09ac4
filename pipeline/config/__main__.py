"""``python -m pipeline.config [FILE]`` writes the config reference (default
docs/config-reference.md)."""

import sys
from pathlib import Path

from pipeline.config.reference import render_reference

target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/config-reference.md")
target.parent.mkdir(parents=True, exist_ok=True)
target.write_text(render_reference(), encoding="utf-8")
print(f"wrote {target}")
