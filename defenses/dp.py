"""User-level differential privacy on the server: clip, sum, add Gaussian noise.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv 1710.06963, Alg. 1 with the fixed denominator):

    each sampled client's delta is clipped to L2 norm C:  d_k * min(1, C / ||d_k||)
    aggregate = (sum_k clipped d_k + N(0, (z C)^2 I)) / (q N)

One user changes the sum by at most C, so with Poisson sampling at rate q each
round is one sampled Gaussian mechanism with noise multiplier z (what the
accountants compose). The denominator q N (the expected number of clients) is fixed;
dividing by the actual count would leak it and need about twice the noise.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping", arXiv 1905.03871, Alg. 1): clients also send the CENTRED
indicator b_k - 1/2 with b_k = 1[||d_k|| <= C] (unclipped), so one client moves the
count's sum by at most 1/2 (its sensitivity); the server releases
s~ = sum_k (b_k - 1/2) + N(0, sigma_b^2), estimates the unclipped fraction
b~ = s~ / (q N) + 1/2, and moves C geometrically towards the target quantile gamma:
C <- C exp(-eta_C (b~ - gamma)). The count is then a Gaussian mechanism with
multiplier sigma_b / (1/2) = 2 sigma_b, and the two releases together are one
Gaussian mechanism with multiplier (z_delta^-2 + (2 sigma_b)^-2)^(-1/2), which is z
when the update noise uses z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Thm. 1).
(An UNcentred count, sensitivity 1, would give (z_delta^-2 + sigma_b^-2)^(-1/2) < z:
the epsilon accounted at z would be understated. TensorFlow Privacy's quantile
estimator centres the same way.) A client whose update was rejected or never came
contributes 0 to the count, inside the same bound.

Everything here is a pure function of (deltas, parameters, generator). The noise
generator is the DP stream, separate from every training stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipResult:
    clipped: torch.Tensor  # [n, d], every row of norm <= C
    norms: torch.Tensor  # [n], the norms before clipping (float64)
    unclipped: torch.Tensor  # [n] bool: ||d_k|| <= C (Andrew et al.'s b_k)


# The fast path scales a float32 row by s = fl32(C / ||d|| * (1 - MARGIN)) in float32. Each of the
# d products rounds by at most 2^-24 relative, the cast of s by 2^-24, and the float64 norm is off
# by at most d 2^-53 <= 1.2e-7 for rows up to 10^9 long, so the clipped norm is at most
# C (1 - 1e-6)(1 + 2^-24)^2 (1 + 1.2e-7) < C (1 - 7e-7): no row can exceed C, with no second pass.
# The cast of s is that close only while s is a normal number: a huge row against a tiny C
# (2e9 against 1e-30 gives s = 5e-40, subnormal in float32) takes the float64 path.
# Products in float32's subnormal range round by an absolute 2^-150 instead, negligible against
# 1e-6 C unless C is below ~1e-30, which takes the float64 path.
MARGIN = 1e-6
_FAST_MIN_CLIP = 1e-30


NORM_BLOCK = 1 << 18  # float64 elements per block of a row's norm: 2 MB, so the conversion stays in cache


def squared_norm(row: torch.Tensor, buffer: torch.Tensor, copy_to: torch.Tensor | None = None) -> float:
    """sum(row^2) in float64, block by block: each block converted exactly into `buffer` (float64,
    NORM_BLOCK long, reused), so the row is read once and no float64 copy of it is made. With
    `copy_to` (a float32 row of the same length) the row is copied there on the way and the
    squares are taken from that copy while it is in cache: stacking and norm in one read.
    A row holding NaN or Inf gives a non-finite sum; a finite float32 row never does (its
    squares stay far below float64's range). Summed in blocks, the float64 rounding is still at
    most d 2^-53 relative (the bound clip_to_norm's margin allows for)."""
    total = 0.0
    for start in range(0, row.numel(), NORM_BLOCK):
        part = row[start: start + NORM_BLOCK]
        if copy_to is not None:
            target = copy_to[start: start + NORM_BLOCK]
            target.copy_(part)
            part = target
        block = buffer[: part.numel()]
        block.copy_(part)
        total += float(torch.dot(block, block))
    return total


def norm_buffer(length: int, device) -> torch.Tensor:
    """The float64 block buffer `squared_norm` converts through."""
    return torch.empty(min(NORM_BLOCK, max(length, 1)), dtype=torch.float64, device=device)


def row_norms(rows) -> torch.Tensor:
    """The L2 norm of each row (of a matrix [n, d], or of a list of vectors of one length) in
    float64 (`squared_norm`: one read of each row, no float64 copy of the matrix)."""
    if isinstance(rows, torch.Tensor) and rows.dtype == torch.float64:
        return torch.linalg.vector_norm(rows, dim=1)
    if not len(rows):
        device = rows.device if isinstance(rows, torch.Tensor) else "cpu"
        return torch.zeros(0, dtype=torch.float64, device=device)
    buffer = norm_buffer(rows[0].numel(), rows[0].device)
    return torch.tensor([math.sqrt(squared_norm(row, buffer)) for row in rows], dtype=torch.float64,
                        device=rows[0].device)


def clip_to_norm(deltas: torch.Tensor, clip_norm: float, norms: torch.Tensor | None = None,
                 in_place: bool = False) -> ClipResult:
    """Scale each row of `deltas` [n, d] to L2 norm at most `clip_norm` (inf: unchanged).

    Rows with norm <= C are returned unchanged; a longer row is scaled to norm just below C
    (by the factor 1 - MARGIN, so rounding can never take it above C; see the note above).
    `norms`: the rows' float64 norms when already computed (`row_norms`); `in_place`: scale
    `deltas` itself (the caller's own copy), the same values without a second matrix.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norms = row_norms(deltas) if norms is None else norms
    unclipped = norms <= clip_norm
    if math.isinf(clip_norm) or bool(unclipped.all()):
        return ClipResult(deltas, norms, unclipped)
    scale = clip_factors(norms, clip_norm)
    if fast_scaling(scale, clip_norm, deltas.dtype):
        factors = scale.to(deltas.dtype)[:, None]
        return ClipResult(deltas.mul_(factors) if in_place else deltas * factors, norms, unclipped)
    # half precisions, absurdly small C or scale: scale in float64, cast, and shrink any row rounding pushed over
    clipped = (deltas.to(torch.float64) * scale[:, None]).to(deltas.dtype)
    over = torch.linalg.vector_norm(clipped.to(torch.float64), dim=1) > clip_norm
    while bool(over.any()):  # halving ends: a subnormal halved rounds to 0
        clipped[over] = (clipped[over].to(torch.float64) * 0.5).to(deltas.dtype)
        over = torch.linalg.vector_norm(clipped.to(torch.float64), dim=1) > clip_norm
    return ClipResult(clipped, norms, unclipped)


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each row's clipping factor (float64): 1 within C, else C / ||d|| (1 - MARGIN)."""
    return torch.where(norms <= clip_norm, torch.ones_like(norms), clip_norm / norms * (1 - MARGIN))


def fast_scaling(factors: torch.Tensor, clip_norm: float, dtype: torch.dtype) -> bool:
    """Whether rows of `dtype` may be scaled by `factors` cast to `dtype` with no check (the
    note above MARGIN); otherwise clip_to_norm scales in float64 and checks."""
    return (dtype in (torch.float32, torch.float64) and clip_norm >= _FAST_MIN_CLIP
            and (not len(factors) or float(factors.min()) >= torch.finfo(dtype).tiny))


def gaussian_noise(dim: int, std: float, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std^2 I_dim) from `generator` (drawn in float64, returned in `dtype`; the same
    values as randn(dim) * std, drawn in one pass)."""
    if std == 0:
        return torch.zeros(dim, dtype=dtype, device=generator.device)
    draw = torch.empty(dim, dtype=torch.float64, device=generator.device)
    return draw.normal_(0.0, std, generator=generator).to(dtype)


@dataclass(frozen=True)
class PrivateMean:
    aggregate: torch.Tensor  # [d]
    noise: torch.Tensor  # [d], the noise added to the sum (before the division)
    norms: torch.Tensor  # [n] delta norms before clipping
    num_clipped: int
    num_unclipped: int


def private_mean(deltas: torch.Tensor, clip_norm: float, noise_multiplier: float,
                 expected_clients: float, generator: torch.Generator) -> PrivateMean:
    """(sum of clipped deltas + N(0, (z C)^2 I)) / expected_clients  (DP-FedAvg).

    deltas may have zero rows (nobody sampled): the aggregate is then noise alone.
    With z = 0 and C = inf this is the plain mean sum_k d_k / expected_clients.
    """
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and math.isinf(clip_norm):
        raise ValueError("noise needs a finite clip_norm (the noise std is z * C)")
    n, dim = deltas.shape
    clip = clip_to_norm(deltas, clip_norm)
    noise = gaussian_noise(dim, noise_multiplier * clip_norm if noise_multiplier > 0 else 0.0,
                           generator, deltas.dtype)
    weights = torch.full((n,), 1.0 / expected_clients, dtype=torch.float64, device=deltas.device).to(deltas.dtype)
    aggregate = weights @ clip.clipped if n else torch.zeros(dim, dtype=deltas.dtype, device=deltas.device)
    if noise_multiplier > 0:
        aggregate = aggregate + noise / expected_clients
    unclipped = int(clip.unclipped.sum())
    return PrivateMean(aggregate, noise, clip.norms, n - unclipped, unclipped)


COUNT_SENSITIVITY = 0.5  # one client's b_k - 1/2 is +-1/2


def joint_noise_multiplier(update_noise: float, count_stddev: float,
                           count_sensitivity: float = COUNT_SENSITIVITY) -> float:
    """The multiplier of the update and the count released together:
    (z_delta^-2 + (sigma_b / s_b)^-2)^(-1/2), the Gaussian mechanism both make up."""
    if update_noise == 0 or count_stddev == 0:
        return 0.0
    return (update_noise ** -2 + (count_stddev / count_sensitivity) ** -2) ** -0.5


def adaptive_update_noise(noise_multiplier: float, count_stddev: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Thm. 1), for the centred
    count (sensitivity 1/2): joint_noise_multiplier(z_delta, sigma_b) == z."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(f"adaptive clipping needs 2 * clip_count_stddev ({2 * count_stddev:g}) > "
                         f"noise_multiplier ({noise_multiplier:g})")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def noisy_centred_count(num_unclipped: int, num_clipped: int, count_stddev: float,
                        generator: torch.Generator) -> float:
    """The released count s~ = sum_k (b_k - 1/2) + N(0, sigma_b^2) (sensitivity 1/2)."""
    noise = float(torch.randn((), generator=generator, dtype=torch.float64, device=generator.device)) * count_stddev
    return (num_unclipped - num_clipped) / 2 + noise


def adapt_clip_norm(clip_norm: float, num_unclipped: int, num_clipped: int, expected_clients: float,
                    target_quantile: float, learning_rate: float, count_stddev: float,
                    generator: torch.Generator) -> tuple[float, float]:
    """One geometric update of C towards the target quantile; returns (new C, noisy b~).

    b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2; C <- C exp(-eta_C (b~ - gamma)).
    If more than the target share was already under C (b~ > gamma), C shrinks.
    """
    released = noisy_centred_count(num_unclipped, num_clipped, count_stddev, generator)
    fraction = released / expected_clients + 0.5
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile)), fraction


def secagg_sensitivity(clip_norm: float, dim: int, clip_range: float, bits: int) -> float:
    """The L2 sensitivity of a sum released through Flower's SecAgg+ when each node sends
    the sum of its clients' deltas, each clipped to `clip_norm`.

    SecAgg+ clips every coordinate of a node's vector to [-r, r] (r = `clip_range`) and
    rounds it stochastically to a grid of step 2r / 2^bits; the masked integers then sum
    exactly (mod 2^32). Removing one client changes its node's vector v by at most C in
    L2. Coordinate clipping is 1-Lipschitz, so it keeps that bound. Stochastic rounding
    is floor(y + U), U uniform on [0, 1) per coordinate: under one shared U the two
    roundings differ from the exact difference by less than one grid step per
    coordinate, so by less than sqrt(d) steps in L2, and the other nodes' roundings are
    identical. For every U the released sum therefore has sensitivity at most
    C + sqrt(d) * 2r / 2^bits; Gaussian noise at multiplier z on that bound is
    (epsilon, delta)-DP for each U, hence for the mixture over U (the hockey-stick
    divergence is jointly convex), the accountants' epsilon at z unchanged.
    """
    if clip_norm <= 0 or dim < 1 or clip_range <= 0 or bits < 1:
        raise ValueError(f"need clip_norm > 0, dim >= 1, clip_range > 0, bits >= 1; got "
                         f"{clip_norm}, {dim}, {clip_range}, {bits}")
    return clip_norm + math.sqrt(dim) * 2.0 * clip_range / 2.0 ** bits
