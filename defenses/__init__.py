"""Server-side stages applied to client updates: sanitation and aggregation.

Stages are pure functions over a stacked tensor of deltas [n, d] (and weights),
so defenses compose as a pipeline and attack x defense is a product of configs:
`defenses.sanitize` (reject malformed updates), `defenses.dp` (clip, noise, adaptive
clipping for user-level DP), `defenses.robust` (the robust rules as pure functions)
and `defenses.registry` (the rules by name, plugins' included).
"""

from defenses.aggregators import weighted_mean
from defenses.sanitize import SanitizeResult, sanitize, sanitize_updates

__all__ = ["weighted_mean", "sanitize", "sanitize_updates", "SanitizeResult"]
