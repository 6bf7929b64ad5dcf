"""The first thing to run on a new GPU node: prove rayhash's GPU paths and time them, in one command, in minutes.

    make gpu-check                                  # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --images 20000 --database 1000000

Three checks, one table:

- **train**: one step of the CIFAR recipe's network and loss (CE + L_sim + L_KL) on the same batch, bf16 autocast on
  the GPU against float32 on the CPU: the loss must agree within ``--loss-tol`` (relative; bf16 rounds the
  backbone's activations, the hash layer and the losses run in float32); then a timed bf16 epoch of ``--images``
  synthetic images (images/s).
- **encode**: rayhash's ``Encoder`` on the GPU against a plain PyTorch loop (same model, same batches, no
  rayhash code) on the same GPU: codes identical, throughput ratio.
- **search**: ``GpuIndexBinaryFlat`` against the CPU ``IndexBinaryFlat`` over ``--database`` random codes:
  identical distances, queries/s of each.

Without an NVIDIA GPU it says so and exits 2. ``--device cpu`` runs the same checks on the CPU (the tests do, so
every line here that needs no GPU is exercised on every commit).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NO_GPU = 2


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_train(device, images: int, batch_size: int, loss_tol: float, seed: int = 0) -> dict:
    """bf16 step on ``device`` == float32 step on CPU (within ``loss_tol``), then a timed epoch."""
    import torch

    from rayhash.config import load_config
    from rayhash.pipeline import find_config
    from rayhash.runtime import bf16_supported
    from rayhash.train import build_training, loss_step

    cfg = load_config(find_config("cifar100-cpu"), [f"train.batch_size={batch_size}", "loss.beta=0.1"])
    classes, size = 100, cfg.data.image_size
    similarity = np.eye(classes, dtype=np.float32) * 0.5 + 0.5
    torch.manual_seed(seed)
    cpu_model, _, _, cpu_loss = build_training(cfg, classes, 10, similarity=similarity)
    model, opt, _, loss_fn = build_training(cfg, classes, 10, similarity=similarity)
    model.load_state_dict(cpu_model.state_dict())
    model, loss_fn = model.to(device), loss_fn.to(device)
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, 3, size, size, generator=g),
             "label": torch.randint(0, classes, (batch_size,), generator=g)}
    ref, _, _ = loss_step(cpu_model, cpu_loss, batch, cfg, torch.Generator().manual_seed(1), autocast=False)
    autocast = device.type == "cuda" and bf16_supported(device)
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    got, _, z = loss_step(model, loss_fn, dev_batch, cfg, torch.Generator().manual_seed(1), autocast=autocast)
    got, ref = float(got.detach()), float(ref.detach())
    rel = abs(got - ref) / max(abs(ref), 1e-12)
    steps = max(1, images // batch_size)
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch_size,), device=device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        total, _, _ = loss_step(model, loss_fn, {"image": x, "label": y}, cfg, None, autocast=autocast)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"check": "train", "ok": rel <= loss_tol and z.dtype == torch.float32,
            "detail": f"loss {got:.5f} ({'bf16' if autocast else 'fp32'}) vs CPU fp32 {ref:.5f}: "
                      f"rel diff {rel:.2e} (tol {loss_tol:.0e}); codes {str(z.dtype).replace('torch.', '')}",
            "speed": f"{steps * batch_size / seconds:,.0f} img/s training"}


def check_encode(device, images: int, batch_size: int, seed: int = 0) -> dict:
    """rayhash's Encoder against a plain PyTorch loop on the same device: same codes, throughput ratio."""
    import torch

    from rayhash.config import load_config
    from rayhash.model import Encoder, HashNet
    from rayhash.model.checkpoint import LoadedModel
    from rayhash.pipeline import find_config

    cfg = load_config(find_config("cifar100-cpu"))
    torch.manual_seed(seed)
    net = HashNet.from_config(cfg.model, 100).eval()
    loaded = LoadedModel(model=net, config=cfg, bits=cfg.model.bits, image_size=cfg.data.image_size,
                         label_names=[], meta={}, path="<memory>", digest="")
    encoder = Encoder(loaded, device=device)
    size = cfg.data.image_size
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(seed)).numpy()

    def plain() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, images, batch_size):
                z, _ = net(torch.from_numpy(x[i:i + batch_size]).to(device))
                out.append((z >= 0).cpu().numpy())
        return np.packbits(np.concatenate(out), axis=1, bitorder="big")

    def ours() -> np.ndarray:
        return np.concatenate([encoder.encode_tensor(x[i:i + batch_size])[1] for i in range(0, images, batch_size)])

    timings, codes = {}, {}
    for name, fn in (("plain", plain), ("rayhash", ours), ("plain", plain), ("rayhash", ours)):  # 2nd round timed
        _sync(device)
        t0 = time.perf_counter()
        codes[name] = fn()
        _sync(device)
        timings[name] = time.perf_counter() - t0
    same = np.array_equal(codes["plain"], codes["rayhash"])
    return {"check": "encode", "ok": same,
            "detail": f"{images} images, codes {'identical' if same else 'DIFFER'} to a plain PyTorch loop",
            "speed": f"{images / timings['rayhash']:,.0f} img/s ({timings['plain'] / timings['rayhash']:.2f}x the "
                     "plain loop)"}


def check_search(device, database: int, queries: int, k: int, bits: int = 64, seed: int = 0) -> dict:
    """GpuIndexBinaryFlat against IndexBinaryFlat on the CPU: identical distances, queries/s."""
    import faiss

    from rayhash.index.search import faiss_gpu_usable

    rng = np.random.default_rng(seed)
    db = rng.integers(0, 256, (database, bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, (queries, bits // 8), dtype=np.uint8)
    cpu = faiss.IndexBinaryFlat(bits)
    cpu.add(db)
    t0 = time.perf_counter()
    d_cpu, _ = cpu.search(q, k)
    cpu_s = time.perf_counter() - t0
    if device.type != "cuda":
        index, what = cpu, "CPU IndexBinaryFlat (no GPU index on this device)"
    elif not faiss_gpu_usable():
        return {"check": "search", "ok": False, "detail": "faiss cannot use this GPU (see the warning above)",
                "speed": f"{queries / cpu_s:,.0f} q/s on CPU"}
    else:
        index, what = faiss.GpuIndexBinaryFlat(faiss.StandardGpuResources(), cpu), "GpuIndexBinaryFlat"
    index.search(q[:8], k)  # warm-up
    t0 = time.perf_counter()
    d_dev, _ = index.search(q, k)
    dev_s = time.perf_counter() - t0
    same = np.array_equal(d_dev, d_cpu)
    return {"check": "search", "ok": same,
            "detail": f"{what} over {database:,} {bits}-bit codes, k={k}: distances "
                      f"{'identical' if same else 'DIFFER'} to the CPU index",
            "speed": f"{queries / dev_s:,.0f} q/s ({cpu_s / dev_s:.1f}x CPU {queries / cpu_s:,.0f} q/s)"}


def table(rows: list[dict]) -> str:
    width = max(len(r["detail"]) for r in rows)
    lines = [f"{'check':<7} {'result':<6} {'what was compared':<{width}}  speed"]
    lines += [f"{r['check']:<7} {'PASS' if r['ok'] else 'FAIL':<6} {r['detail']:<{width}}  {r['speed']}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same checks without a GPU)")
    p.add_argument("--images", type=int, default=10_000, help="images in the timed epoch and the encode check")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--database", type=int, default=1_000_000, help="codes in the search check")
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--loss-tol", type=float, default=2e-2, help="relative loss tolerance of bf16 vs fp32")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no NVIDIA GPU is visible here (torch.cuda.is_available() is False); run it on a GPU "
              "node, or pass --device cpu to exercise the checks on the CPU", file=sys.stderr)
        return NO_GPU
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"gpu-check on {torch.cuda.get_device_name(device)} (compute capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}), torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}", flush=True)
    rows = [check_train(device, args.images, args.batch_size, args.loss_tol),
            check_encode(device, args.images, args.batch_size),
            check_search(device, args.database, args.queries, args.k)]
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
