"""The SuperNode's persistent worker (fedsec.engine.worker): exact frames, the same updates
as the in-process client side, errors as one message, and gone with its SuperNode."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fedsec.config import dump_config
from fedsec.engine import worker


def test_a_frame_carries_meta_and_float32_arrays_exactly():
    gen = np.random.default_rng(0)
    arrays = {"global": gen.standard_normal(1000).astype(np.float32),
              "deltas": gen.standard_normal((3, 7)).astype(np.float32), "none": np.zeros((0, 5), np.float32)}
    meta = {"op": "train", "clients": [1, 5], "lr": 1e-3, "text": "naïve: ünïcode"}
    frame = worker.pack(meta, arrays)
    back_meta, back = worker.unpack(frame[8:])  # the first 8 bytes: the frame's length
    assert back_meta == meta and list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].shape == array.shape and np.array_equal(back[name], array)
        assert back[name].tobytes() == array.tobytes()  # bit for bit


@pytest.fixture
def supernode():
    """A stand-in SuperNode: a process whose life bounds the worker's."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


def test_the_worker_trains_as_the_in_process_client_side_and_ends_with_its_supernode(tmp_path, supernode):
    from fedsec.clients import client_updates, prepare_clients

    cfg = tiny_config(tmp_path)
    request = {"config": dump_config(cfg), "workdir": str(tmp_path), "data_path": "", "partition": 1,
               "partitions": 2}
    reply, _ = worker.call(supernode.pid, {"op": "describe", **request}, {})
    assert reply == {"clients": 4}
    here = prepare_clients(cfg, lambda c: c % 2 == 1)
    start = here.trainer.adapter.get() + 0.01  # not the initial adapter: the start must travel
    asked = [0, 1, 3]  # client 0 is not this node's: it is not trained here
    reply, arrays = worker.call(supernode.pid, {"op": "train", **request, "clients": asked, "lr": 1e-3, "round": 2,
                                                "prox_mu": 0.0, "record_noise": -1.0, "first": -1, "total": 4},
                                {"global": start.numpy()})
    expected = client_updates(here, start, [1, 3], 1e-3, 2)
    assert reply["clients"] == [1, 3] and reply["num_examples"] == [u.num_examples for u in expected]
    assert reply["loss"] == [u.metrics["loss"] for u in expected]
    assert torch.equal(torch.from_numpy(arrays["deltas"].copy()), torch.stack([u.delta for u in expected]))
    reply, _ = worker.call(supernode.pid, {"op": "evaluate", **request, "record_noise": -1.0, "first": -1,
                                           "total": 4}, {"global": start.numpy()})
    tested = here.evaluate(start)  # the hosted clients' held-out examples under the sent adapter
    assert reply["clients"] == [1, 3] == list(tested) and reply["loss"] == [r.loss for r in tested.values()]
    assert reply["accuracy"] == [r.accuracy for r in tested.values()] and reply["n"] == [2, 2]
    with pytest.raises(RuntimeError, match="unknown request 'explode'"):  # an error comes back as one message
        worker.call(supernode.pid, {"op": "explode", **request}, {})
    socket = worker.runtime_dir() / f"{supernode.pid}.sock"
    assert socket.exists()
    supernode.kill()
    supernode.wait()
    deadline = time.monotonic() + 10
    while socket.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not socket.exists()  # the worker went with its SuperNode
