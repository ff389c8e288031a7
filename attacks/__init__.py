"""Malicious clients: Byzantine updates so far (poisoned data and memorization probes next).

- `attacks.updates`: the update attacks as pure functions of the attacker's own delta
  or the round's honest deltas.
- `attacks.clients`: fixed malicious identities, the round's attack, and the defense
  scored against the known identities.
"""
