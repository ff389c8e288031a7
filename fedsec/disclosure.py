"""What a DP run may publish, and the one place everything else goes.

Under privacy.mode user or record the guarantee covers what the mechanism releases:
the noised global adapter each round, and anything computed from it and from public
things (the config, the global test set, the public benchmarks). So a DP run's
metrics.jsonl, result.json, privacy_ledger.json, console lines and the report's main
pages hold only:

    round, lr                    the public schedule
    global_eval                  the released adapter on the global test set and the
                                 public benchmarks (minus canary exposure, below)
    privacy                      clip norm, noise multiplier, epsilon (adaptive clipping's
                                 clip norm is computed from the noised count)
    the ledger                   one mechanism per round: z, q, C, the noise split

Everything else a run computes reads the clients' data or the mechanism's hidden
internals, and goes to the run directory's `not_covered_by_dp_guarantee/` folder
(`UNCOVERED`), whose README says so: the sampled client ids (`clients`), the rejected
and failed ids, the exact clipped / unclipped counts and the median update norm, the
clients' training loss, per-client evaluation (`client_eval`), the robust aggregator's
and the attack's per-round diagnostics (ids excluded, caught), round timings, canary
exposure (`global_eval.memorization`), membership inference (`membership`), and the
local-only baselines (`local_only`), which train on one client's data alone. The
record-level ledger's per-client step counts (which say who trained) go there too.
These are the attacker's instruments: they are there to measure what the mechanism
hides, and publishing them voids the guarantee.

`split_row` and `split_result` are pure: a row or result in, the (covered, uncovered)
pair out. Runs without DP keep everything in the main files, as before.
"""

from __future__ import annotations

UNCOVERED = "not_covered_by_dp_guarantee"
HEADER = ("NOT COVERED BY THE DP GUARANTEE. This folder holds what a DP run computes from the clients' "
          "data or the mechanism's hidden internals: sampled client ids, exact clipped counts and norms, "
          "training losses, per-client evaluation, canary exposure, membership inference, local-only "
          "baselines. The (epsilon, delta) of the run does not cover any of it: publishing it can reveal "
          "a client's participation or data. Keep it for debugging and for measuring attacks; never "
          "release it beside the model.")

# a federated round row: the keys the guarantee covers (everything else is uncovered)
COVERED_ROW = ("phase", "round", "lr", "global_eval", "privacy")
# canaries planted in clients' training data; metrics that may read the clients' data (fedsec.metrics)
COVERED_GLOBAL_EVAL_DROP = ("memorization", "metrics_uncovered")
COVERED_PRIVACY = ("mode", "clip_norm", "noise_multiplier", "epsilon")
UNCOVERED_RESULT = ("local_only", "membership")


def _split_eval(block: dict | None) -> tuple[dict | None, dict]:
    if block is None:
        return None, {}
    kept = {k: v for k, v in block.items() if k not in COVERED_GLOBAL_EVAL_DROP}
    hidden = {k: v for k, v in block.items() if k in COVERED_GLOBAL_EVAL_DROP}
    return kept, hidden


def split_row(row: dict) -> tuple[dict, dict | None]:
    """A metrics row -> (what the guarantee covers, what it does not; None if nothing)."""
    if row.get("phase") != "federated":  # the local-only baselines' rows: wholly uncovered
        return {}, dict(row)
    covered = {k: row[k] for k in COVERED_ROW if k in row and k not in ("global_eval", "privacy")}
    hidden = {k: v for k, v in row.items() if k not in COVERED_ROW}
    if "global_eval" in row:
        covered["global_eval"], dropped = _split_eval(row["global_eval"])
        if dropped:
            hidden["global_eval"] = dropped
    privacy = row.get("privacy")
    if privacy is not None:
        covered["privacy"] = {k: privacy[k] for k in COVERED_PRIVACY if k in privacy}
        if privacy.get("hidden"):
            hidden["privacy"] = privacy["hidden"]
    elif "privacy" in row:
        covered["privacy"] = None
    if not any(v not in (None, (), [], {}) for v in hidden.values()):
        return covered, None
    return covered, {"phase": row["phase"], "round": row["round"], **hidden}


def split_result(result: dict) -> tuple[dict, dict]:
    """result.json's dict -> (covered, uncovered)."""
    covered = {k: v for k, v in result.items() if k not in UNCOVERED_RESULT}
    hidden = {k: result.get(k) for k in UNCOVERED_RESULT}
    for side in ("untuned", "final"):
        covered[side], dropped = _split_eval(result.get(side))
        if dropped:
            hidden[side] = dropped
    return covered, hidden


def merge_result(covered: dict, hidden: dict) -> dict:
    """The inverse of split_result: result.json's dict with its uncovered part put back."""
    out = dict(covered)
    for key, value in hidden.items():
        if key in ("untuned", "final") and out.get(key) is not None:
            out[key] = {**out[key], **(value or {})}
        else:
            out[key] = value
    return out


def merge_rows(covered: list[dict], hidden: list[dict]) -> list[dict]:
    """The rows as the run computed them: each covered row with its uncovered part (same
    phase and round), and the wholly uncovered rows (baselines) after them."""
    by_key = {(h.get("phase"), h.get("round")): h for h in hidden}
    out, used = [], set()
    for row in covered:
        key = (row.get("phase"), row.get("round"))
        extra = by_key.get(key)
        if extra is None:
            out.append(row)
            continue
        used.add(key)
        merged = {**row, **{k: v for k, v in extra.items() if k not in ("global_eval", "privacy")}}
        if "global_eval" in extra and row.get("global_eval") is not None:
            merged["global_eval"] = {**row["global_eval"], **extra["global_eval"]}
        if "privacy" in extra and row.get("privacy") is not None:
            merged["privacy"] = {**row["privacy"], "hidden": extra["privacy"]}
        out.append(merged)
    out += [h for h in hidden if (h.get("phase"), h.get("round")) not in used]
    return out


def guarantee_statement(config: dict, privacy: dict) -> str:
    """What a DP run's (epsilon, delta) is about, with the assumptions it rests on, from the
    run's resolved config and its privacy report (plain dicts: the report reads them from
    files)."""
    data = config.get("data") or {}
    scheme = (data.get("partition") or {}).get("scheme", "natural")
    record = privacy.get("mode") == "record"
    if record:
        unit = ("adding or removing one training example of any client; a person with several examples "
                "gets only group privacy over them")
        sizes = "each client's example count n_k is treated as public (q_k = batch_size / n_k)"
    else:
        unit = "adding or removing all the data of any one client"
        if data.get("source", "embedded") == "embedded":
            unit += " (the embedded benchmark's clients are synthetic parties)"
        elif scheme == "natural":
            unit += " (a natural partition: one client per user id, so per person as far as that id names one)"
        else:
            unit += (f" (a {scheme} partition may put one person's examples in several clients: a person in k "
                     "clients gets only group privacy, (k epsilon, k e^((k-1) epsilon) delta))")
        sizes = "the number of clients N is treated as public (q = clients_per_round / N)"
    return (f"The guarantee: every released global adapter, all rounds together, is (epsilon, delta)-DP for "
            f"{unit}. Assumed: {sizes}; the server is trusted; who was sampled stays hidden, so nothing "
            f"published names a client (what does is in {UNCOVERED}/).")


def predates_centred_count(privacy: dict, ledger: dict | None) -> bool:
    """A run with adaptive clipping whose ledger predates the centred count (issue 23): its
    released count had sensitivity 1, so its accounted epsilon is understated."""
    if not privacy.get("adaptive_clipping") or not ledger or ledger.get("kind") == "record":
        return False
    entries = ledger.get("entries") or []
    return bool(entries) and "count_sensitivity" not in entries[0]
