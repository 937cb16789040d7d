"""Rewrite the preset section of schema/athanor.schema.json from athanor/runtimes/presets.py's PRESET_KEYS.

Run after adding or changing a preset key: .venv/bin/python scripts/update_schema_presets.py
"""

import json
from pathlib import Path

from athanor.runtimes.presets import PRESET_KEYS

path = Path(__file__).resolve().parent.parent / "schema" / "athanor.schema.json"
schema = json.loads(path.read_text())
schema["$defs"]["preset"]["properties"] = {name: key.json_schema() for name, key in PRESET_KEYS.items()}
path.write_text(json.dumps(schema, indent=2) + "\n")
print(f"updated {path}")
