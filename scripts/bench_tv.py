#!/usr/bin/env python3
"""numpy TV-ADMM for `cargo bench -p dmqsm-common --bench tv`.

The same weighted-linear TV-ADMM as dmqsm_common::inversion::tv (FANSI style; see that
module's docs for the iteration), written independently with numpy's float32 rfftn:
reads field.f32 and weight.f32 (n³, C order, little-endian) from --dir, runs exactly
--iterations iterations (no early stop, so both sides do the same work), writes
chi.f32 there and prints one JSON line with the best wall time of --runs.
B0 is along the last axis and voxels are 1 mm (the bench's setting).
"""
import argparse
import json
import pathlib
import time

import numpy as np


def tv_admm(phi, w2, alpha, mu1, mu2, iterations):
    n = phi.shape
    f = [np.fft.fftfreq(m).astype(np.float64) for m in n[:2]] + [np.fft.rfftfreq(n[2])]
    kx, ky, kz = np.meshgrid(*f, indexing="ij")
    k2 = kx**2 + ky**2 + kz**2
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(k2 > 0, 1.0 / 3.0 - kz**2 / k2, 0.0)
    q = [np.arange(m) for m in n[:2]] + [np.arange(n[2] // 2 + 1)]
    e1 = [np.exp(2j * np.pi * qa / na) - 1.0 for qa, na in zip(q, n)]
    shape = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    e = [ea.reshape(s).astype(np.complex64) for ea, s in zip(e1, shape)]
    d = d.astype(np.float32)
    den = mu1 * sum(np.abs(ea) ** 2 for ea in e) + mu2 * d * d
    inv_den = np.where(den > 0, 1.0 / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)
    tau = np.float32(alpha / mu1)
    z1 = [np.zeros(n, np.float32) for _ in range(3)]
    s1 = [np.zeros(n, np.float32) for _ in range(3)]
    z2 = (w2 * phi / (w2 + mu2)).astype(np.float32)
    s2 = np.zeros(n, np.float32)
    chi = np.zeros(n, np.float32)
    for _ in range(iterations):
        rhs = mu2 * d * np.fft.rfftn(z2 - s2)
        for a in range(3):
            rhs += mu1 * np.conj(e[a]) * np.fft.rfftn(z1[a] - s1[a])
        rhs *= inv_den
        chi = np.fft.irfftn(rhs, s=n).astype(np.float32)
        dchi = np.fft.irfftn(rhs * d, s=n).astype(np.float32)
        v = [np.roll(chi, -1, axis=a) - chi + s1[a] for a in range(3)]
        norm = np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2)
        fac = np.where(norm > tau, (norm - tau) / np.where(norm > 0, norm, 1), 0).astype(np.float32)
        for a in range(3):
            z1[a] = fac * v[a]
            s1[a] = v[a] - z1[a]
        v2 = dchi + s2
        z2 = ((w2 * phi + mu2 * v2) / (w2 + mu2)).astype(np.float32)
        s2 = v2 - z2
    return chi


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--runs", type=int, default=1)
    a = p.parse_args()
    d = pathlib.Path(a.dir)
    shape = (a.n,) * 3
    phi = np.fromfile(d / "field.f32", dtype="<f4").reshape(shape)
    w = np.fromfile(d / "weight.f32", dtype="<f4").reshape(shape)
    best = float("inf")
    for _ in range(a.runs):
        t = time.perf_counter()
        chi = tv_admm(phi, w * w, a.alpha, 100.0 * a.alpha, 1.0, a.iterations)
        best = min(best, time.perf_counter() - t)
    chi.astype("<f4").tofile(d / "chi.f32")
    print(json.dumps({"numpy": np.__version__, "seconds": best}))


if __name__ == "__main__":
    main()
