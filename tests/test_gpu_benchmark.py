"""benchmarks/gpu.py must be ready to run whenever a GPU is lent: every stage runs here on
the CPU at toy size (--cpu-check), and without CUDA the plain command says so and exits."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the plain command measures")
def test_without_cuda_it_says_so_and_measures_nothing(capsys):
    assert gpu.main([]) == {}
    assert "no CUDA device here" in capsys.readouterr().out


def test_every_stage_runs_on_the_cpu_at_toy_size(tmp_path, monkeypatch):
    stored = []
    monkeypatch.setattr("benchmarks.store", stored.append)
    figures = gpu.main(["--cpu-check", "--out", str(tmp_path)])
    assert set(figures) == {"gpu_matmul_peak", "gpu_smollm2_fp32", "gpu_smollm2_bf16", "gpu_qlora_4bit_smollm2",
                            "gpu_llama1b_bf16", "gpu_cohort_1024_clients", "gpu_lockstep_quickstart"}
    assert stored == []  # a check stores nothing
    qlora = figures["gpu_qlora_4bit_smollm2"]
    assert qlora["loss_falls"] and qlora["final_loss"] < qlora["untuned_loss"]
    # each a FLOP/s fraction of the same run's bf16 peak, from its own parts; no bound on it
    # here: a CPU without native bf16 products (AMD EPYC without AVX512-BF16) runs a 256^3
    # bf16 product so slowly that an fp32 step reaches 5.6 times its "peak"
    peak = figures["gpu_matmul_peak"]["bf16_flops"]
    for key in ("gpu_smollm2_fp32", "gpu_smollm2_bf16", "gpu_llama1b_bf16"):
        row = figures[key]
        assert row["value"] > 0 and row["step_flops"] > 0, key
        assert row["value"] == pytest.approx(row["step_flops"] / row["step_seconds"] / peak, rel=1e-12), key
    assert figures["gpu_smollm2_bf16"]["step_tokens"] > 0 and figures["gpu_smollm2_bf16"]["round_tokens_per_s"] > 0
    assert figures["gpu_cohort_1024_clients"]["examples"] == 64 * 4  # 64 clients of 4 examples, one step each
    lockstep = figures["gpu_lockstep_quickstart"]
    assert lockstep["clients"] == 8 and lockstep["lockstep_seconds"] > 0
    # no bound on how far apart: on the tiny model bf16 alone puts AdamW's deltas 1.19 of the largest entry
    # from fp32's (lockstep in bf16: 0.59 from one at a time in bf16); tests/test_lockstep.py checks fp32
    assert lockstep["largest_difference_over_largest_entry"] > 0 and lockstep["speedup"] > 0
    assert all(v["device"] == "cpu (--cpu-check)" for v in figures.values())
