"""The frozen-prefix cache computes what the full model computes."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import tiny_config

from fedsec.config import LoraConfig, ModelConfig
from fedsec.data import build_federated_data
from fedsec.encoding import collate, encode_all
from fedsec.loop import run_experiment
from fedsec.models import attach_lora, load_base_model
from fedsec.objectives import SftObjective
from fedsec.prefix import cache_frozen_prefix
from fedsec.training import completion_loss


def _model_and_items(tmp_path, top_layers):
    cfg = tiny_config(tmp_path)
    model, tok = load_base_model(ModelConfig(name="tiny"))
    model = attach_lora(model, LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                                          top_layers=top_layers), seed=0)
    data = build_federated_data(cfg.data, 0, "sft")
    items = encode_all(data.clients[0].train, tok, "chat", 160)
    # give the adapter non-zero B so the top layers' adapters matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model, tok, items


def test_cached_prefix_gives_the_full_models_loss_and_gradients(tmp_path):
    model, tok, items = _model_and_items(tmp_path, top_layers=1)
    first = model.config.num_hidden_layers - 1
    cached = cache_frozen_prefix(model, items, first, tok.pad_token_id, batch_size=3)
    assert cached[0].hidden.shape == (items[0].input_ids.numel(), model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for batch_items in (items[:5], cached[:5]):
        model.zero_grad()
        loss, n = completion_loss(model, collate(batch_items, tok.pad_token_id))
        loss.backward()
        results.append((float(loss.detach()), n, [p.grad.clone() for p in params]))
    (full_loss, full_n, full_grads), (fast_loss, fast_n, fast_grads) = results
    assert full_n == fast_n
    assert abs(full_loss - fast_loss) <= 1e-5 * abs(full_loss)
    for a, b in zip(full_grads, fast_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # SftObjective takes cached items unchanged
    assert abs(float(SftObjective(tok.pad_token_id).loss(model, cached[:5])[0].detach()) - fast_loss) < 1e-6


def test_a_run_with_the_cache_matches_the_run_without(tmp_path):
    lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "top_layers": 1}
    plain = tiny_config(tmp_path / "a", lora=lora)
    fast = tiny_config(tmp_path / "b", lora={**lora, "cache_frozen_layers": True})
    a = run_experiment(plain, out=tmp_path / "plain", progress=False, log=lambda _: None)
    b = run_experiment(fast, out=tmp_path / "fast", progress=False, log=lambda _: None)
    ga = torch.load(sorted((tmp_path / "plain" / "checkpoints").glob("*.pt"))[-1])["global"]
    gb = torch.load(sorted((tmp_path / "fast" / "checkpoints").glob("*.pt"))[-1])["global"]
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6)
    assert abs(a.final["loss"] - b.final["loss"]) < 1e-4
    assert a.final["accuracy"] == b.final["accuracy"]


def test_dpo_reference_uses_the_cached_path_so_the_untuned_margin_is_zero(tmp_path):
    """Reference and policy log-probabilities come from the same computation: at round 0
    the policy is the reference, so every margin is exactly 0 (no pair counted as won)."""
    cfg = tiny_config(tmp_path, task="dpo", lora={"rank": 4, "alpha": 8, "target_modules": ["q_proj"],
                                                   "top_layers": 1, "cache_frozen_layers": True},
                      federation={"rounds": 1, "clients_per_round": 2, "local_only_clients": 0})
    result = run_experiment(cfg, out=tmp_path / "run", progress=False, log=lambda _: None)
    before = result.untuned["preference"]
    assert before["preference_accuracy"] == 0.0 and before["reward_margin"] == 0.0
    assert before["n"] > 0


def test_setup_shows_its_progress_with_counts_only_when_the_run_does(tmp_path, capsys, monkeypatch):
    from conftest import tiny_config

    import fedsec.prefix
    from fedsec.loop import run_experiment

    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})  # states earlier tests computed in this process
    monkeypatch.setattr(fedsec.prefix, "prefix_cache_dir", lambda: tmp_path / "prefix")  # and stored
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal (bars go to terminals only)

    cfg = tiny_config(tmp_path, lora={"cache_frozen_layers": True, "top_layers": 1},
                      federation={"rounds": 1, "clients_per_round": 2})
    import re

    run_experiment(cfg, out=tmp_path / "shown", progress=True, log=lambda _: None)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"tokenizing: .* \d+/4 ", err)  # the 4 clients, counted
    assert re.search(r"frozen prefix: .* \d+/\d+ ", err)  # examples done of all
    run_experiment(cfg, out=tmp_path / "quiet", progress=False, log=lambda _: None)
    assert "tokenizing" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # into a file or pipe: no bar, the error stays one line
    run_experiment(cfg, out=tmp_path / "piped", progress=True, log=lambda _: None)
    assert "tokenizing" not in capsys.readouterr().err


def test_a_sweep_shows_its_runs_setup_progress_but_no_round_bars(tmp_path, capsys, monkeypatch):
    """A sweep's runs have no round bar of their own (the sweep's bar counts runs), but their
    setup (minutes of frozen prefix on a real model) shows its bars, as `fedsec run` does."""
    import sys

    import yaml
    from conftest import TINY

    import fedsec.prefix
    from fedsec.sweeps import run_sweep

    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})
    monkeypatch.setattr(fedsec.prefix, "prefix_cache_dir", lambda: tmp_path / "prefix")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    base = {**TINY, "lora": {**TINY["lora"], "cache_frozen_layers": True, "top_layers": 1},
            "federation": {"rounds": 1, "clients_per_round": 2}}
    for name, progress in (("shown", True), ("quiet", False)):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(yaml.safe_dump({"name": name, "base": base, "output_dir": str(tmp_path / "runs"),
                                        "variants": {"a": []}}))
        run_sweep(spec, progress=progress, log=lambda _: None)
        err = capsys.readouterr().err.replace("\r", "\n")
        assert bool(re.search(r"tokenizing: .* \d+/4 ", err)) is progress, err
        assert "rounds:" not in err
        monkeypatch.setattr(fedsec.prefix, "_MEMO", {})


def test_the_prefix_cache_on_disk_is_reused_by_a_later_run_and_keyed_by_what_the_states_depend_on(
        tmp_path, capsys, monkeypatch):
    import fedsec.prefix
    from fedsec import progress
    from fedsec.setup import prepare

    monkeypatch.setattr(fedsec.prefix, "prefix_cache_dir", lambda: tmp_path / "prefix")
    calls = []
    computed = fedsec.prefix.prefix_states
    monkeypatch.setattr(fedsec.prefix, "prefix_states", lambda *a, **k: calls.append(len(a[1])) or computed(*a, **k))
    cfg = tiny_config(tmp_path, lora={"cache_frozen_layers": True, "top_layers": 1},
                      federation={"rounds": 1, "clients_per_round": 2})
    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})
    with progress.showing(True):
        first = prepare(cfg)
    assert calls and "cached in" in capsys.readouterr().err
    stored = sorted((tmp_path / "prefix").glob("*.pt"))
    assert len(stored) == len(calls)  # one file per collection: training items, each evaluation set
    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})  # a new process: only the disk remains
    calls.clear()
    with progress.showing(True):
        second = prepare(cfg)
    err = capsys.readouterr().err
    assert calls == [] and "read from" in err and "KiB" in err  # the setup skipped the prefix pass
    for a, b in zip(first.train_sets[0], second.train_sets[0]):
        assert torch.equal(a.hidden, b.hidden) and a.hidden_layer == b.hidden_layer == 1
    # another template changes the token ids, another first layer the states: new entries
    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})
    prepare(tiny_config(tmp_path, lora={"cache_frozen_layers": True, "top_layers": 1},
                        data={"template": "alpaca", "max_length": 400},
                        federation={"rounds": 1, "clients_per_round": 2}))
    assert calls and len(list((tmp_path / "prefix").glob("*.pt"))) == 2 * len(stored)
    # a damaged entry is computed again and replaced, not trusted
    stored[0].write_bytes(b"not a tensor file")
    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})
    calls.clear()
    with progress.showing(True):
        prepare(cfg)
    assert len(calls) == 1 and "unreadable" in capsys.readouterr().err
    assert torch.load(stored[0], weights_only=True)[0].shape[-1] == first.train_sets[0][0].hidden.shape[-1]


def test_the_frozen_fingerprint_follows_the_weights_not_the_name(tmp_path):
    from fedsec.models import load_base_model
    from fedsec.prefix import frozen_fingerprint

    cfg = tiny_config(tmp_path)
    model, _ = load_base_model(cfg.model)
    again, _ = load_base_model(cfg.model)
    assert frozen_fingerprint(model, 1) == frozen_fingerprint(again, 1) != frozen_fingerprint(model, 2)
    with torch.no_grad():
        again.get_decoder().layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert frozen_fingerprint(again, 2) != frozen_fingerprint(model, 2)  # one weight below layer 2 moved


def test_packed_prefix_states_are_the_plain_states_with_the_opening_computed_once_per_row(tmp_path, monkeypatch):
    """training.pack computes the frozen prefix behind the items' shared opening: each item's
    state is the plain batch's to float rounding, its opening rows are one row's (bit for bit
    the same across a packed row's items), and a group's states are what a call on it alone
    gives, as a Flower SuperNode computes them."""
    import fedsec.prefix
    from fedsec.encoding import attention_weight, pack_rows, shared_prefix_length
    from fedsec.prefix import PACK_ROW, prefix_states

    model, tok, _ = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    data = build_federated_data(tiny_config(tmp_path).data, 0, "sft")
    items = [e for c in data.clients for e in encode_all(c.train, tok, "chat", 160)][:12]
    shared = shared_prefix_length(items)
    assert shared > 4 and len(items) > PACK_ROW  # two rows: the check covers the row split
    forwards = []
    decoder = fedsec.prefix._decoder(model)
    monkeypatch.setattr(fedsec.prefix, "_PACKS", fedsec.prefix.weakref.WeakKeyDictionary())
    decoder.layers[0].register_forward_pre_hook(lambda _m, args, kwargs: forwards.append(
        (args[0] if args else kwargs["hidden_states"]).shape[:2]), with_kwargs=True)
    plain = prefix_states(model, items, first, pad, batch_size=len(items))
    forwards.clear()
    packed = prefix_states(model, items, first, pad, batch_size=len(items), pack=True)
    # the batch's rows: by length, PACK_ROW items at most, fewer where pack_rows finds it
    # cheaper (on this 64-wide model, items of about 130 tokens go two to a row)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    lengths = [len(items[i].input_ids) for i in order]
    sizes = [size for k in range(0, len(items), PACK_ROW)
             for size in pack_rows(lengths[k: k + PACK_ROW], shared, attention_weight(model.config))]
    assert sizes == [2] * 6
    # the first packed batch is checked once against its plain batch, then trusted
    assert [f[0] for f in forwards] == [len(sizes), len(items)]  # the packed rows, the check's plain batch
    width = forwards[0][1]
    assert width == max(shared + sum(lengths[k: k + 2]) - 2 * shared for k in range(0, len(items), 2))
    positions = sum(int(f[0] * f[1]) for f in forwards[:1])
    assert positions < sum(len(i.input_ids) for i in items)  # fewer positions through the frozen layers
    for a, b, item in zip(packed, plain, items):
        assert a.shape == b.shape == (len(item.input_ids), model.config.hidden_size)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    row = [packed[i] for i in order[: sizes[0]]]
    assert all(torch.equal(r[:shared], row[0][:shared]) for r in row)
    # a second call trusts the first check: one packed forward, no plain one
    forwards.clear()
    again = prefix_states(model, items, first, pad, batch_size=len(items), pack=True)
    assert len(forwards) == 1 and all(torch.equal(a, b) for a, b in zip(again, packed))
    # groups: bit for bit what each group alone gives
    grouped = prefix_states(model, items, first, pad, batch_size=4, groups=[5, 7], pack=True)
    alone = (prefix_states(model, items[:5], first, pad, batch_size=4, pack=True)
             + prefix_states(model, items[5:], first, pad, batch_size=4, pack=True))
    assert all(torch.equal(a, b) for a, b in zip(grouped, alone))
    for a, b in zip(grouped, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_whose_states_packing_would_change_computes_the_prefix_plain(tmp_path, monkeypatch):
    import fedsec.prefix
    from fedsec.prefix import prefix_states

    model, tok, items = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    monkeypatch.setattr(fedsec.prefix, "_PACKS", fedsec.prefix.weakref.WeakKeyDictionary())
    plain = prefix_states(model, items[:6], first, pad, batch_size=6)
    real = fedsec.prefix._chunk_states

    def ignores_the_mask(decoder, model, chunk, pad_id, shared):  # as an architecture might
        states = real(decoder, model, chunk, pad_id, shared)
        return [s + 1.0 for s in states] if shared else states

    monkeypatch.setattr(fedsec.prefix, "_chunk_states", ignores_the_mask)
    fallback = prefix_states(model, items[:6], first, pad, batch_size=6, pack=True)
    assert all(torch.equal(a, b) for a, b in zip(fallback, plain))


def _clients_items(tmp_path, tok, count):
    data = build_federated_data(tiny_config(tmp_path).data, 0, "sft")
    return [e for c in data.clients for e in encode_all(c.train, tok, "chat", 160)][:count]


def test_prefix_forwards_run_side_by_side_on_one_thread_each_and_give_a_one_core_nodes_bits(tmp_path):
    """On the CPU every frozen-prefix forward runs on one torch thread, as many at once as the
    process has threads: each client's states are bit for bit what a process given one core
    computes for that client alone (a Flower SuperNode), and torch's setting is restored."""
    import threading

    import fedsec.prefix
    from fedsec.prefix import prefix_states

    model, tok, _ = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    items, groups = _clients_items(tmp_path, tok, 12), [2, 3, 2, 3, 2]
    bounds = [0, 2, 5, 7, 10, 12]
    seen = []
    decoder = fedsec.prefix._decoder(model)
    handle = decoder.layers[0].register_forward_pre_hook(
        lambda *_: seen.append((threading.get_ident(), torch.get_num_threads())))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [h for a, b in zip(bounds, bounds[1:])
                 for h in prefix_states(model, items[a:b], first, pad, batch_size=2, pack=True)]
        seen.clear()
        torch.set_num_threads(3)
        side_by_side = prefix_states(model, items, first, pad, batch_size=2, groups=groups, pack=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(side_by_side, alone, strict=True))
    assert {n for _, n in seen} == {1}  # every forward on one thread
    assert threading.get_ident() in {t for t, _ in seen} and len({t for t, _ in seen}) > 1


def test_an_error_in_a_side_by_side_prefix_forward_reaches_the_caller_and_restores_the_threads(
        tmp_path, monkeypatch):
    import fedsec.prefix
    from fedsec.prefix import prefix_states

    model, tok, _ = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    items = _clients_items(tmp_path, tok, 8)
    real, calls = fedsec.prefix._chunk_states, []

    def fails_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("the third batch")
        return real(*args)

    monkeypatch.setattr(fedsec.prefix, "_chunk_states", fails_third)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(MemoryError, match="the third batch"):
            prefix_states(model, items, first, pad, batch_size=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert not fedsec.prefix._decoder(model).layers[first]._forward_pre_hooks  # the stop removed


def test_a_call_reuses_the_groups_an_earlier_call_computed_bit_for_bit(tmp_path, monkeypatch):
    """A sweep's runs that differ in a few clients (an attack's, the server's own set):
    the second call computes only the groups no memo entry holds, each distinct group
    once, and gives what a fresh computation of the whole call gives, bit for bit."""
    import fedsec.prefix

    model, tok, items = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    monkeypatch.setattr(fedsec.prefix, "_MEMO", {})
    monkeypatch.setenv("FEDSEC_CACHE", str(tmp_path / "cache"))
    asked = []
    compute = fedsec.prefix.prefix_states
    monkeypatch.setattr(fedsec.prefix, "prefix_states",
                        lambda m, xs, *a, **k: asked.append(len(xs)) or compute(m, xs, *a, **k))
    a, b, c, d = items[:2], items[2:4], items[4:5], [items[1], items[4]]
    changed = b[::-1]  # another client, unlike any of the first call's
    first_call = cache_frozen_prefix(model, a + b + c, first, pad, 4, "tiny", groups=[2, 2, 1], pack=True)
    assert asked == [5]
    groups = [2, 2, 1, 2, 2]
    second = cache_frozen_prefix(model, a + changed + c + d + a, first, pad, 4, "tiny", groups=groups, pack=True)
    assert asked == [5, 4]  # the changed client and d; a and c from the first call, a's repeat with it
    fresh = compute(model, a + changed + c + d + a, first, pad, 4, groups=groups, pack=True)
    assert all(torch.equal(x.hidden, y) for x, y in zip(second, fresh))
    reused = zip(second[:2] + second[4:5] + second[7:], first_call[:2] + first_call[4:] + first_call[:2])
    assert all(x.hidden is y.hidden for x, y in reused)  # the first call's tensors themselves
    # a memo hit keeps the entry's groups for later calls
    cache_frozen_prefix(model, a + changed + c + d + a, first, pad, 4, "tiny", groups=groups, pack=True)
    alone = cache_frozen_prefix(model, d, first, pad, 4, "tiny", groups=[2], pack=True)
    assert asked == [5, 4] and alone[0].hidden is second[5].hidden
    # without groups (batches across the items) nothing is taken from another call
    cache_frozen_prefix(model, a + c, first, pad, 4, "tiny", pack=True)
    assert asked == [5, 4, 3]


def test_a_model_whose_forward_changes_its_input_embeddings_is_refused_not_cached_wrong(tmp_path):
    """The cache feeds the frozen layers' output as `inputs_embeds`: a decoder that transforms
    them (here scaled by 2, as some architectures scale their embeddings in the forward)
    would train on wrong numbers; the first item's check against the full forward refuses it."""
    import pytest

    from fedsec.errors import ConfigError
    from fedsec.prefix import FrozenPrefix

    model, tok, items = _model_and_items(tmp_path, top_layers=1)
    first = model.config.num_hidden_layers - 1
    assert len(FrozenPrefix(first, "plain").attach(model, items[:2], tok.pad_token_id, 2)) == 2
    other, _, _ = _model_and_items(tmp_path, top_layers=1)  # a model of its own: checked once per model
    decoder = other.get_base_model().get_decoder()
    forward = decoder.forward
    decoder.forward = lambda *a, inputs_embeds=None, **k: forward(
        *a, inputs_embeds=None if inputs_embeds is None else 2 * inputs_embeds, **k)
    with pytest.raises(ConfigError, match="do not reproduce this model's forward") as err:
        FrozenPrefix(first, "scaled").attach(other, items[:2], tok.pad_token_id, 2)
    assert err.value.field == "lora.cache_frozen_layers"


def _equal_width_clients(vocab: int, clients: int, seed: int = 0):
    """`clients` groups of 2 items behind one 12-token opening, every group's packed row 12 +
    2 x 20 tokens wide, the tokens otherwise random: rows `_join` may put in one forward."""
    from fedsec.encoding import IGNORE, Encoded

    gen = torch.Generator().manual_seed(seed)
    opening = torch.randint(3, vocab, (12,), generator=gen, dtype=torch.int32)
    items, groups = [], []
    for c in range(clients):
        own = (17, 23) if c % 2 else (20, 20)  # the same width, two shapes of row
        for n in own:
            ids = torch.cat([opening, torch.randint(3, vocab, (n,), generator=gen, dtype=torch.int32)])
            labels = torch.full_like(ids, IGNORE)
            labels[-3:] = ids[-3:]
            items.append(Encoded(ids, labels))
        groups.append(2)
    return items, groups


def test_one_row_groups_of_one_width_share_a_forward_and_keep_their_own_bits(tmp_path, monkeypatch):
    """Packed, groups whose batch is one row (a DP client's few examples) of the same width go
    through the frozen layers JOIN_ROWS rows at a time, without padding; each group's states
    are bit for bit what a call on that group alone computes (a Flower SuperNode)."""
    import fedsec.prefix
    from fedsec.prefix import JOIN_ROWS, prefix_states

    model, tok, _ = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    items, groups = _equal_width_clients(model.config.vocab_size, 10)
    monkeypatch.setattr(fedsec.prefix, "_JOINS", fedsec.prefix.weakref.WeakKeyDictionary())
    forwards = []
    handle = fedsec.prefix._decoder(model).layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: forwards.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one forward at a time: the order of the forwards is the test's
        joined = prefix_states(model, items, first, pad, batch_size=32, groups=groups, pack=True)
        first_call, forwards[:] = list(forwards), []
        again = prefix_states(model, items, first, pad, batch_size=32, groups=groups, pack=True)
        second_call, forwards[:] = list(forwards), []
        alone = [h for k in range(0, len(items), 2)
                 for h in prefix_states(model, items[k: k + 2], first, pad, batch_size=32, pack=True)]
        lone_calls = list(forwards)
    finally:
        torch.set_num_threads(threads)
        handle.remove()
    assert fedsec.prefix._JOINS[model] == {(first, JOIN_ROWS): True, (first, 2): True}
    # 10 rows of 52 positions: 4 + 4 + 2 a forward once the joined forwards were checked
    assert second_call == [(JOIN_ROWS, 52), (JOIN_ROWS, 52), (2, 52)]
    assert lone_calls == [(1, 52)] * 10
    # the first call checked the first joined forward of 4 rows and of 2 against their rows alone
    assert first_call.count((1, 52)) == JOIN_ROWS + 2 and len(first_call) == 3 + JOIN_ROWS + 2 + 1  # + packing's
    assert all(torch.equal(a, b) for a, b in zip(joined, alone, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(again, alone, strict=True))


def test_rows_a_joined_forward_would_change_go_through_one_at_a_time(tmp_path, monkeypatch):
    """Where the first joined forward gives any row other bits than its own forward (a CPU whose
    products depend on how many rows they carry), the process computes a forward per group from
    then on, and the states are the lone forwards' bits."""
    import fedsec.prefix
    from fedsec.prefix import prefix_states

    model, tok, _ = _model_and_items(tmp_path, top_layers=1)
    first, pad = model.config.num_hidden_layers - 1, tok.pad_token_id
    items, groups = _equal_width_clients(model.config.vocab_size, 6, seed=1)
    monkeypatch.setattr(fedsec.prefix, "_JOINS", fedsec.prefix.weakref.WeakKeyDictionary())
    real, rows_seen = fedsec.prefix._rows_states, []

    def last_bit_off(decoder, model, rows, pad_id):  # as such a CPU's products would be
        rows_seen.append(len(rows))
        states = real(decoder, model, rows, pad_id)
        return [torch.nextafter(s, s + 1) for s in states] if len(rows) > 1 else states

    monkeypatch.setattr(fedsec.prefix, "_rows_states", last_bit_off)
    alone = [h for k in range(0, len(items), 2)
             for h in prefix_states(model, items[k: k + 2], first, pad, batch_size=32, pack=True)]
    rows_seen.clear()
    grouped = prefix_states(model, items, first, pad, batch_size=32, groups=groups, pack=True)
    assert set(fedsec.prefix._JOINS[model].values()) == {False}
    assert all(torch.equal(a, b) for a, b in zip(grouped, alone, strict=True))
    assert max(rows_seen) > 1 and rows_seen.count(1) == len(groups)  # one joined try, then a row each
    rows_seen.clear()
    assert all(torch.equal(a, b) for a, b in zip(
        prefix_states(model, items, first, pad, batch_size=32, groups=groups, pack=True), alone, strict=True))
    assert rows_seen == [1] * len(groups)
