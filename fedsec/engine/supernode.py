"""`flower-supernode` with its idle waits shortened, for the SuperNodes fedsec starts itself.

Flower's SuperNode (flwr 1.41, `flwr.supernode.start_client_internal`) sleeps 3 s whenever a
pull from the SuperLink finds no message, and 0.5 s per look while a ClientApp's reply is
pending; neither is a setting. A SuperNode pulls again as soon as it has sent a reply, finds
nothing (the server is still collecting the round), and sleeps: so each message of a round
(train, then evaluate) waited up to 3 s before its SuperNode saw it.

`LocalDeployment` (fedsec.engine.deploy) starts its SuperNodes as
`python -m fedsec.engine.supernode ARGS` instead: Flower's own entry point and arguments, with
those sleeps capped at IDLE_SECONDS. Nothing else changes (messages, TLS, authentication and
the SuperExec are Flower's). Each look is a call to the SuperLink and costs it CPU time,
which a deployment on the clients' own cores takes from the training, so the cap is not
lower: benchmarks/RESULTS.md has both sides measured. An organisation's SuperNode can run
this module the same way; `flower-supernode` keeps Flower's waits.
"""

from __future__ import annotations

import importlib
import sys
import time
import types

IDLE_SECONDS = 0.2


class _ShortWaits(types.ModuleType):
    """The `time` module as the SuperNode loop sees it: the same, but `sleep` is capped."""

    def __init__(self, cap: float):
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def shorten_waits(cap: float = IDLE_SECONDS) -> bool:
    """Cap the SuperNode loop's sleeps at `cap` seconds in this process. False, with nothing
    changed, where the loop does not sleep through its own module's `time` (another Flower,
    or already capped)."""
    internal = importlib.import_module("flwr.supernode.start_client_internal")
    if getattr(internal, "time", None) is not time:
        return False
    internal.time = _ShortWaits(cap)
    return True


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if not shorten_waits():
        print("fedsec: this Flower's SuperNode loop does not sleep where fedsec.engine.supernode shortens it; "
              "it keeps Flower's own waits", file=sys.stderr)
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
