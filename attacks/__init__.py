"""Malicious clients and attackers: Byzantine updates, poisoned data, memorization probes.

- `fedsec.attacks.updates`: the update attacks as pure functions of the attacker's own delta
  or the round's honest deltas, and their entries in the update_attack registry.
- `fedsec.attacks.clients`: fixed malicious identities, and the driver of whatever attack the
  registries hold (the round's update attack, the data poisoning before training), and the
  defense scored against the known identities.
- `fedsec.attacks.poisoning`: data attacks (alignment poisoning, preference flips, backdoors)
  and their entries in the data_attack registry.
- `fedsec.attacks.memorization`: canary exposure (Carlini et al. 2019) and membership-inference scores.
"""
