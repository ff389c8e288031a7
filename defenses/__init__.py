"""Server-side stages applied to client updates: sanitation and aggregation.

Stages are pure functions over a stacked tensor of deltas [n, d] (and weights),
so defenses compose as a pipeline and attack x defense is a product of configs:
`fedsec.defenses.sanitize` (reject malformed updates), `fedsec.defenses.dp` (clip, noise, adaptive
clipping for user-level DP), `fedsec.defenses.robust` (the robust rules as pure functions)
and `fedsec.defenses.registry` (the rules by name, plugins' included).
"""

from fedsec.defenses.robust import weighted_mean
from fedsec.defenses.sanitize import SanitizeResult, sanitize, sanitize_updates

__all__ = ["weighted_mean", "sanitize", "sanitize_updates", "SanitizeResult"]
