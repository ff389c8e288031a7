"""fedsec: federated fine-tuning of LLMs with privacy and robustness instruments.

The core package holds the shared types (configs, updates, results), data, models,
local training and the round loop; `defenses`, `attacks`, `accountants` and
`reports` build on them.
"""

__version__ = "0.1.0"
