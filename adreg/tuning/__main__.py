"""``python -m adreg.tuning``: print the default search space as YAML, a starting point for ``--space FILE``."""

import yaml

from adreg.tuning.space import DEFAULT_SPACE

print(yaml.safe_dump(DEFAULT_SPACE, sort_keys=False), end="")
