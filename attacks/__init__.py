"""Malicious clients: poisoned data, Byzantine updates, memorization probes.

Empty until the attack issues land; the package exists so the layout of
DESIGN.md installs as one distribution.
"""
