"""prefect-kubernetes 0.8.0's slugs of many strings in one round trip: reads a JSON list of
strings on stdin, writes a JSON list of `[_slugify_name, _slugify_label_key,
_slugify_label_value]` triples on stdout (`_slugify_name` is `null` when the slug is empty).

Usage (with the venv of `scripts/prefect-venv.sh kubernetes`): python slugs.py < in.json
"""

import json
import sys

from prefect_kubernetes.utilities import (
    _slugify_label_key,
    _slugify_label_value,
    _slugify_name,
)

texts = json.load(sys.stdin)
json.dump(
    [[_slugify_name(t), _slugify_label_key(t), _slugify_label_value(t)] for t in texts],
    sys.stdout,
    ensure_ascii=True,
)
