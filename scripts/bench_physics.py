#!/usr/bin/env python3
"""numpy reference for the physics benchmark (`cargo bench -p dmqsm-common --bench physics`).

Implements the same two operations as dmqsm on the same input:
- forward field simulation: pad chi to fast_len(2N) with the corner value, multiply the
  FFT by the dipole kernel D(k) = 1/3 - (k.b)^2/|k|^2 (D(0) = 0, k = fftfreq / voxel size),
  inverse FFT, real part, crop;
- TKD: FFT of the field (padded to the next fast length), multiply by the sign-preserving
  truncated inverse (1/D if |D| > delta, sign(D)/delta otherwise, 0 at D = 0), inverse,
  real part, crop.

Two variants are timed: the idiomatic one (complex `fftn` in float64, as qsm-forward
does) and a tuned one (`rfftn` in float32, half the spectrum). numpy.fft is single-threaded.
Prints one JSON object with the timings (seconds, best of --runs) and, with --out DIR,
writes float64 results as little-endian float32 C-order raw files for a cross-check (TKD
recomputed, untimed, with dmqsm's symmetrised Nyquist planes; the naive kernel differs
there by ~2 % of peak on hard-edged phantoms because 1/D is nonlinear).
"""

import argparse
import json
import os
import time

import numpy as np


def fast_len(n):
    m = max(n, 1)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def phantom(n):
    """Three balls (hard edges) on an n^3 grid, chi in ppm; same as the Rust benchmark."""
    i = np.arange(n, dtype=np.float64)
    x, y, z = i[:, None, None], i[None, :, None], i[None, None, :]
    chi = np.zeros((n, n, n), dtype=np.float32)
    for (cx, cy, cz), r, v in (
        ((0.5, 0.5, 0.5), 0.3, 0.05),
        ((0.35, 0.45, 0.55), 0.08, 0.2),
        ((0.62, 0.58, 0.4), 0.05, -0.1),
    ):
        d2 = (x - cx * n) ** 2 + (y - cy * n) ** 2 + (z - cz * n) ** 2
        chi[d2 <= (r * n) ** 2] += np.float32(v)
    return chi


def dipole_kernel(shape, vox, b0, dtype, half=False):
    ks = [np.fft.fftfreq(n).astype(dtype) / dtype(v) for n, v in zip(shape, vox)]
    if half:
        ks[2] = np.fft.rfftfreq(shape[2]).astype(dtype) / dtype(vox[2])
    kx, ky, kz = ks[0][:, None, None], ks[1][None, :, None], ks[2][None, None, :]
    k2 = kx * kx + ky * ky + kz * kz
    kb = kx * dtype(b0[0]) + ky * dtype(b0[1]) + kz * dtype(b0[2])
    kb *= kb
    k2[0, 0, 0] = 1
    kb /= k2
    d = dtype(1.0 / 3.0) - kb
    d[0, 0, 0] = 0
    return d


def forward(chi, vox, b0, dtype, real):
    n = chi.shape
    pad = tuple(fast_len(2 * s) for s in n)
    x = np.full(pad, chi[0, 0, 0], dtype=dtype)
    x[: n[0], : n[1], : n[2]] = chi
    if real:
        spec = np.fft.rfftn(x)
        spec *= dipole_kernel(pad, vox, b0, dtype, half=True)
        out = np.fft.irfftn(spec, s=pad)
    else:
        spec = np.fft.fftn(x)
        spec *= dipole_kernel(pad, vox, b0, dtype)
        out = np.fft.ifftn(spec).real
    return np.ascontiguousarray(out[: n[0], : n[1], : n[2]])


def symmetrised_kernel(shape, vox, b0):
    """dmqsm's D: on even-axis Nyquist planes, the mean over both signs of the Nyquist
    component, 1/3 - (P^2 + Q^2)/|k|^2 (P: non-Nyquist axes, Q: Nyquist axes). Equal to
    the naive D elsewhere; for the linear forward model the two give identical results."""
    ks = np.meshgrid(*[np.fft.fftfreq(n) / v for n, v in zip(shape, vox)], indexing="ij")
    nyq = np.meshgrid(*[(np.arange(n) == n // 2) & (n % 2 == 0) for n in shape], indexing="ij")
    p = sum(np.where(nyq[a], 0.0, ks[a] * b0[a]) for a in range(3))
    q = sum(np.where(nyq[a], ks[a] * b0[a], 0.0) for a in range(3))
    k2 = sum(k * k for k in ks)
    k2[0, 0, 0] = 1
    d = 1.0 / 3.0 - (p * p + q * q) / k2
    d[0, 0, 0] = 0
    return d


def tkd(field, vox, b0, delta, dtype, real, symmetrised=False):
    n = field.shape
    pad = tuple(fast_len(s) for s in n)
    x = np.zeros(pad, dtype=dtype)
    x[: n[0], : n[1], : n[2]] = field
    if symmetrised:
        d = symmetrised_kernel(pad, vox, b0)
    else:
        d = dipole_kernel(pad, vox, b0, dtype, half=real)
    small = np.abs(d) <= delta
    inv = np.where(small, np.sign(d) / dtype(delta), 1 / np.where(small, 1, d)).astype(dtype)
    inv[d == 0] = 0
    if real:
        out = np.fft.irfftn(np.fft.rfftn(x) * inv, s=pad)
    else:
        out = np.fft.ifftn(np.fft.fftn(x) * inv).real
    return np.ascontiguousarray(out[: n[0], : n[1], : n[2]])


def best_of(runs, fn):
    best, result = float("inf"), None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="grid size (n^3)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", help="directory for float32 raw results (cross-check)")
    ap.add_argument("--skip-f64", action="store_true", help="only the rfftn/float32 variant")
    a = ap.parse_args()
    vox = (1.0, 1.0, 1.0)
    b = np.array([0.1, -0.2, 1.0])
    b0 = tuple(b / np.linalg.norm(b))
    chi = phantom(a.n)
    res = {"n": a.n, "numpy": np.__version__}
    variants = [("rfftn_f32", np.float32, True)]
    if not a.skip_f64:
        variants.insert(0, ("fftn_f64", np.float64, False))
    for name, dtype, real in variants:
        t_fwd, field = best_of(a.runs, lambda: forward(chi.astype(dtype), vox, b0, dtype, real))
        t_tkd, chi_tkd = best_of(a.runs, lambda: tkd(field, vox, b0, 0.1, dtype, real))
        res[f"forward_{name}"] = t_fwd
        res[f"tkd_{name}"] = t_tkd
        if a.out and name == variants[0][0]:
            field.astype("<f4").tofile(os.path.join(a.out, "field.f32"))
            # Cross-check (untimed) with dmqsm's Nyquist convention: TKD's inverse is
            # nonlinear in D, so the naive kernel differs on the Nyquist planes.
            ref = tkd(field, vox, b0, 0.1, np.float64, False, symmetrised=True)
            ref.astype("<f4").tofile(os.path.join(a.out, "tkd.f32"))
            del ref
        del field, chi_tkd
    print(json.dumps(res))


if __name__ == "__main__":
    main()
