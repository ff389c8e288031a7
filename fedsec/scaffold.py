"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging").

Each client i keeps a control variate c_i, the server keeps c. During local
training the gradient is corrected by (c - c_i) at every step; afterwards the
client uses option II of the paper (eq. 4):

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)

and the server moves c by the sum of the clients' changes over all N clients:

    c <- c + (1 / N) * sum_{i in S} (c_i+ - c_i)

Client variates live on disk (one file per client and round), so memory does not
grow with the number of clients that ever took part; only the sampled clients'
variates are in RAM during a round.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from fedsec.rundir import atomic_write_bytes


def client_variate(c_i: torch.Tensor, c: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                   steps: int, lr: float) -> torch.Tensor:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K * eta_l)."""
    return c_i - c + (start - end) / (steps * lr)


def server_variate(c: torch.Tensor, variate_deltas: list[torch.Tensor], num_clients: int) -> torch.Tensor:
    """c + (1/N) * sum of the sampled clients' variate changes."""
    if not variate_deltas:
        return c
    return c + torch.stack(variate_deltas).sum(0) / num_clients


class VariateStore:
    """Client control variates on disk: client_CCCCC_rRRRR.pt per (client, round).

    `get(client, round_idx)` reads the newest file written in an earlier round (zeros
    if none), so a round redone after a crash never sees its own half-written state.
    `put` keeps that earlier file and the new one, and deletes anything older.
    """

    def __init__(self, folder: Path, dim: int):
        self.folder, self.dim = Path(folder), dim
        self.folder.mkdir(parents=True, exist_ok=True)

    def _files(self, client: int) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"client_{client:05d}_r(\d+)\.pt$")
        out = []
        for path in self.folder.glob(f"client_{client:05d}_r*.pt"):
            match = pattern.search(path.name)
            if match:
                out.append((int(match.group(1)), path))
        return sorted(out)

    def get(self, client: int, round_idx: int) -> torch.Tensor:
        earlier = [p for r, p in self._files(client) if r < round_idx]
        if not earlier:
            return torch.zeros(self.dim, device="cpu")  # variates are kept in host memory and on disk
        return torch.load(earlier[-1], weights_only=True, map_location="cpu")

    def put(self, client: int, round_idx: int, variate: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save(variate.clone(), buffer)
        atomic_write_bytes(self.folder / f"client_{client:05d}_r{round_idx:04d}.pt", buffer.getvalue())
        files = self._files(client)
        earlier = [r for r, _ in files if r < round_idx]
        keep = {round_idx} | ({max(earlier)} if earlier else set())
        for r, path in files:
            if r not in keep and r < round_idx:
                path.unlink(missing_ok=True)
