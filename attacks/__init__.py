"""Malicious clients and attackers: Byzantine updates, poisoned data, memorization probes.

- `fedsec.attacks.updates`: the update attacks as pure functions of the attacker's own delta
  or the round's honest deltas.
- `fedsec.attacks.clients`: fixed malicious identities, the round's attack (plugins' update
  attacks included), and the defense scored against the known identities.
- `fedsec.attacks.poisoning`: data attacks (alignment poisoning, preference flips, backdoors).
- `fedsec.attacks.memorization`: canary exposure (Carlini et al. 2019) and membership-inference scores.
"""
