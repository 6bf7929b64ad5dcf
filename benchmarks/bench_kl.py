"""Are the KL estimators right at the code lengths people use? Estimate vs analytic KL, and where the gradient points.

Outputs with independent bits (sign +1 with probability pi, |z| uniform on the target's [1-2u, 1]) have an analytic
KL to the binary target Q of ``pi log(2 pi) + (1-pi) log(2 (1-pi))`` nats per bit; the table gives each estimator's
value per bit (mean ± sd over seeds) beside it, for a training batch's n outputs and m = n target samples. The last
column is the share of coordinates that the estimator's negative gradient moves towards the output's own sign, for
outputs near random corners (|z| in [0.6, 0.9]); 1.0 = rounding to bits is what the term asks for.

The corners estimator measures KL to the corners themselves (u = 0, a distribution without density: its value
is not comparable with the truth column, only its gradient is). The boxes estimator is its limit for the target's
u > 0: consistent (d log 4u minus the whole-code entropy estimate, whose bias at high d offsets it), and with no
pull on a coordinate that lies in its box (|z| >= 1-2u), so its own-sign share counts the coordinates below 0.8.

    .venv/bin/python benchmarks/bench_kl.py --bits 16,32,64,128 --n 256 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from rayhash.losses.kl import (block_kl_divergence, corner_kl_divergence, knn_kl_divergence,
                               sample_binary_target)


def _estimators(block: int):
    u = 0.1
    return {
        "sampled": lambda x, g: knn_kl_divergence(x, sample_binary_target(len(x), x.shape[1], u, g, dtype=x.dtype)),
        f"blockwise b={block} tc=none": lambda x, g: block_kl_divergence(x, block=block, tc="none", m=len(x),
                                                                        uniformity=u, generator=g),
        f"blockwise b={block} tc=gaussian": lambda x, g: block_kl_divergence(x, block=block, tc="gaussian",
                                                                            m=len(x), uniformity=u, generator=g),
        f"blockwise b={block} tc=rho": lambda x, g: block_kl_divergence(x, block=block, tc="rho", m=len(x),
                                                                       uniformity=u, generator=g),
        "corners (u=0)": lambda x, g: corner_kl_divergence(x),
        f"boxes (u={u})": lambda x, g: corner_kl_divergence(x, uniformity=u),
    }


def _sample(n, d, pi, g, u=0.1, dtype=torch.float64):
    s = torch.where(torch.rand(n, d, generator=g, dtype=dtype) < pi, 1.0, -1.0)
    return s * (1 - 2 * u * torch.rand(n, d, generator=g, dtype=dtype))


def _own_sign_share(fn, n, d, g) -> float:
    s = torch.where(torch.rand(n, d, generator=g) < 0.5, 1.0, -1.0)
    x = (s * (0.6 + 0.3 * torch.rand(n, d, generator=g))).requires_grad_()
    fn(x, g).backward()
    return float(((-x.grad * s) > 0).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="16,32,64,128", help="code lengths d")
    p.add_argument("--n", type=int, default=256, help="outputs per estimate (a global batch)")
    p.add_argument("--pis", default="0.5,0.9", help="P(bit = +1) of the outputs (0.5: P = Q, KL 0)")
    p.add_argument("--block", type=int, default=4, help="bits per block of the blockwise estimator")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ms = lambda v: f"{np.mean(v):+.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"  # noqa: E731
    names = list(_estimators(args.block))
    pis = [float(x) for x in args.pis.split(",")]
    head = ["bits", "estimator"] + [f"pi={pi} (truth {pi * math.log(2 * pi) + (1 - pi) * math.log(2 * (1 - pi)):.3f})"
                                    for pi in pis] + ["own-sign share of -grad"]
    print(f"nats per bit, n = m = {args.n}, mean ± sd over seeds {args.seeds}\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for d in (int(b) for b in args.bits.split(",")):
        for name in names:
            cells = []
            for pi in pis:
                vals = []
                for seed in seeds:
                    g = torch.Generator().manual_seed(seed)
                    vals.append(float(_estimators(args.block)[name](_sample(args.n, d, pi, g), g)) / d)
                cells.append(ms(vals))
            share = [_own_sign_share(_estimators(args.block)[name], args.n, d, torch.Generator().manual_seed(s))
                     for s in seeds]
            print(f"| {d} | {name} | " + " | ".join(cells) + f" | {np.mean(share):.3f} |")


if __name__ == "__main__":
    main()
