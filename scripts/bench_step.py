#!/usr/bin/env python3
"""numpy reference of one DM-QSM sampler step outside the model (for common/benches/step.rs).

Implements the same step as dmqsm_common::diffusion::sampler on the same padded patch grid:
split x_t into P^3 patches, overlap-average the returned eps (f64 sums / count), form
x0_hat, apply the DPS data term ||M (y - A x0_hat)|| (A = identity for `dipinv`, A = M o D
dipole convolution via rfftn for `dipinv-physics`), its gradient (approx: g / sqrt(abar);
exact: split the cotangent g/count and accumulate the returned J^T v), and the DDIM/DDPM
update with fresh Gaussian noise. The "model" (eps = x patch, J^T v = v) is excluded from
the timing, as in the Rust benchmark.

Prints one JSON object: {"task", "guidance", "shape", "patches", "ms_per_step", ...}.
Run: .venv/bin/python scripts/bench_step.py --task dipinv --guidance approx --steps 5
"""

import argparse
import json
import math
import time

import numpy as np


def grid_1d(n, p, stride):
    m = 0 if n <= p else -(-(n - p) // stride)
    padded = p + m * stride
    return padded, (padded - n) // 2, [j * stride for j in range(m + 1)]


def dipole_half_spectrum(shape, voxel, b0):
    k = [np.fft.fftfreq(n) / v for n, v in zip(shape[:2], voxel[:2])]
    k.append(np.fft.rfftfreq(shape[2]) / voxel[2])
    kx, ky, kz = np.meshgrid(*k, indexing="ij")
    k2 = kx**2 + ky**2 + kz**2
    kb = kx * b0[0] + ky * b0[1] + kz * b0[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb**2 / k2
    d[0, 0, 0] = 0.0
    return d.astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="dipinv", choices=["dipinv", "dipinv-physics"])
    ap.add_argument("--guidance", default="approx", choices=["approx", "exact"])
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()

    shape, p = a.shape, a.patch
    stride = p - a.overlap
    axes = [grid_1d(n, p, stride) for n in shape]
    padded = tuple(ax[0] for ax in axes)
    crop = tuple(slice(ax[1], ax[1] + n) for ax, n in zip(axes, shape))
    origins = [(i, j, k) for i in axes[0][2] for j in axes[1][2] for k in axes[2][2]]
    count = np.zeros(padded, np.float64)
    for o in origins:
        count[o[0]:o[0] + p, o[1]:o[1] + p, o[2]:o[2] + p] += 1.0
    assert count.min() >= 1.0

    rng = np.random.default_rng(0)
    x = rng.standard_normal(padded, dtype=np.float32)
    y = (0.05 * rng.standard_normal(tuple(shape), dtype=np.float32))
    mask = np.zeros(tuple(shape), bool)
    c = [(n - 1) / 2 for n in shape]
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    mask[((ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (kk - c[2]) ** 2) < (0.4 * min(shape)) ** 2] = True
    y = np.where(mask, y, 0).astype(np.float32)
    if a.task == "dipinv-physics":
        dk = dipole_half_spectrum(shape, [1.0, 1.0, 1.0], [0.0, 0.0, 1.0])

        def A(v):
            f = np.fft.irfftn(np.fft.rfftn(v) * dk, s=v.shape).astype(np.float32)
            return np.where(mask, f, 0).astype(np.float32)

        def At(r):
            r = np.where(mask, r, 0).astype(np.float32)
            return np.fft.irfftn(np.fft.rfftn(r) * dk, s=r.shape).astype(np.float32)
    else:

        def A(v):
            return v

        def At(r):
            return r

    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    xi = 0.5

    def split(vol):
        return np.stack([vol[o[0]:o[0] + p, o[1]:o[1] + p, o[2]:o[2] + p] for o in origins])

    def accumulate(patches):
        acc = np.zeros(padded, np.float64)
        for o, v in zip(origins, patches):
            acc[o[0]:o[0] + p, o[1]:o[1] + p, o[2]:o[2] + p] += v
        return acc

    timings = []
    for step in range(a.warmup + a.steps):
        t, tp = 999 - 5 * step, 994 - 5 * step
        a_t, a_p = abar[t], abar[tp]
        sa, s1a = math.sqrt(a_t), math.sqrt(1 - a_t)
        sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        ce = math.sqrt(max(1 - a_p - sigma**2, 0.0))
        model_time = 0.0
        t0 = time.perf_counter()
        xp = split(x)
        m0 = time.perf_counter()
        eps = xp.copy()  # the "model"
        model_time += time.perf_counter() - m0
        eps_hat = (accumulate(eps) / count).astype(np.float32)
        x0 = ((x.astype(np.float64) - s1a * eps_hat) / sa).astype(np.float32)
        r = np.where(mask, y - A(x0[crop]), 0).astype(np.float32)
        norm = float(np.sqrt(np.sum(r.astype(np.float64) ** 2)))
        g = np.zeros(padded, np.float32)
        g[crop] = -At(r) / norm
        if a.guidance == "exact":
            cot = split((g / count).astype(np.float32))
            xp = split(x)
            m0 = time.perf_counter()
            jtv = cot.copy()  # the "model" J^T v
            model_time += time.perf_counter() - m0
            grad = ((g - s1a * accumulate(jtv)) / sa).astype(np.float32)
        else:
            grad = (g / sa).astype(np.float32)
        z = rng.standard_normal(padded, dtype=np.float32)
        x = (a_p**0.5 * x0.astype(np.float64) + ce * eps_hat + sigma * z - xi * grad).astype(np.float32)
        elapsed = time.perf_counter() - t0 - model_time
        if step >= a.warmup:
            timings.append(elapsed)
    print(json.dumps({
        "task": a.task,
        "guidance": a.guidance,
        "shape": shape,
        "padded": list(padded),
        "patches": len(origins),
        "steps": a.steps,
        "ms_per_step": 1000 * float(np.median(timings)),
        "ms_min": 1000 * float(np.min(timings)),
        "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
