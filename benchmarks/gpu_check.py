"""The first thing to run on a new GPU node: prove rayhash's GPU paths and time them, in one command, in minutes.

    make gpu-check                                  # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --images 20000 --database 1000000

Five checks, one table (PASS / FAIL / SKIP each; exit 1 on any FAIL):

- **train**: one step of the CIFAR recipe's network and loss (CE + L_sim + L_KL) on the same uint8 batch, bf16
  autocast on the GPU against float32 on the CPU: the loss must agree within ``--loss-tol`` (relative; bf16 rounds
  the backbone's activations, the hash layer and the losses run in float32) and the codes must be float32; then a
  timed bf16 epoch of ``--images`` images (uint8 on the device, normalised by the network: images/s).
- **syncs**: a whole training step (forward, loss, backward, optimiser) under ``torch.cuda.set_sync_debug_mode
  ("error")``: any device-to-host synchronisation fails it (GPU only).
- **compile**: ``torch.compile(HashingLoss, fullgraph=True)`` on the device gives the eager loss (no graph break, no
  data-dependent branch).
- **encode**: rayhash's ``Encoder`` (bf16 autocast on a GPU, float32 hash layer) against a plain PyTorch loop on the
  same device: codes identical to the loop under the same autocast, agreement with float32 codes, throughput ratio.
- **search**: ``GpuIndexBinaryFlat`` against the CPU ``IndexBinaryFlat`` over ``--database`` random codes:
  identical distances, queries/s of each. SKIP (not FAIL) where rayhash itself would search on the CPU: faiss-cpu
  installed, or a GPU newer than the faiss GPU wheel's kernels (the line says which, with the compute capability
  read from the CUDA driver as the index processes read it).

Without an NVIDIA GPU it says so and exits 2. ``--device cpu`` runs the same checks on the CPU (the tests do, so
every line here that needs no GPU is exercised on every commit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
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

    from rayhash.runtime import bf16_supported
    from rayhash.train import loss_step

    cfg, model, opt, loss_fn, batch = _recipe(batch_size, seed)
    ref, _, _ = loss_step(model, loss_fn, batch, cfg, torch.Generator().manual_seed(1), autocast=False)
    model, loss_fn = model.to(device), loss_fn.to(device)  # in place: the optimizer keeps its parameters
    autocast = device.type == "cuda" and bf16_supported(device)
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    got, _, z = loss_step(model, loss_fn, dev_batch, cfg, torch.Generator().manual_seed(1), autocast=autocast)
    got, ref = float(got.detach()), float(ref.detach())
    rel = abs(got - ref) / max(abs(ref), 1e-12)
    steps = max(1, images // batch_size)
    x, y = dev_batch["image"], dev_batch["label"]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        total, _, _ = loss_step(model, loss_fn, {"image": x, "label": y}, cfg, None, autocast=autocast)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"check": "train", "result": _verdict(rel <= loss_tol and z.dtype == torch.float32),
            "detail": f"loss {got:.5f} ({'bf16' if autocast else 'fp32'}) vs CPU fp32 {ref:.5f}: "
                      f"rel diff {rel:.2e} (tol {loss_tol:.0e}); codes {str(z.dtype).replace('torch.', '')}",
            "speed": f"{steps * batch_size / seconds:,.0f} img/s training"}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _recipe(batch_size: int, seed: int):
    """(config, model, optimizer, loss, uint8 batch) of the CIFAR recipe on the CPU, seeded."""
    import torch

    from rayhash.config import load_config
    from rayhash.config import find_config
    from rayhash.train import build_training

    cfg = load_config(find_config("cifar100-cpu"), [f"train.batch_size={batch_size}", "loss.beta=0.1"])
    classes, size = 100, cfg.data.image_size
    torch.manual_seed(seed)
    model, opt, _, loss_fn = build_training(cfg, classes, 10, similarity=np.eye(classes, dtype=np.float32) * 0.5 + 0.5)
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randint(0, 256, (batch_size, 3, size, size), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, classes, (batch_size,), generator=g)}
    return cfg, model, opt, loss_fn, batch


def check_syncs(device, batch_size: int, seed: int = 0) -> dict:
    """One whole training step under ``set_sync_debug_mode("error")``: no device-to-host synchronisation."""
    import torch

    from rayhash.runtime import bf16_supported
    from rayhash.train import loss_step

    if device.type != "cuda":
        return {"check": "syncs", "result": "SKIP", "detail": "device-to-host syncs exist on CUDA devices only",
                "speed": ""}
    cfg, model, opt, loss_fn, batch = _recipe(batch_size, seed)
    model, loss_fn = model.to(device), loss_fn.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    gen, autocast = torch.Generator(device=device).manual_seed(seed), bf16_supported(device)

    phases = {"forward + loss": lambda: loss_step(model, loss_fn, batch, cfg, gen, autocast=autocast)[0],
              "backward": lambda: (opt.zero_grad(set_to_none=True), total.backward()),
              "optimiser": lambda: opt.step()}
    for _ in range(2):  # the first step creates lazy state (optimizer moments, cuBLAS handles), which may sync
        total = phases["forward + loss"]()
        phases["backward"]()
        phases["optimiser"]()
    torch.cuda.synchronize(device)
    error = None
    for name, phase in phases.items():
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = phase()
            if name == "forward + loss":
                total = out
        except RuntimeError as e:
            frames = [f for f in traceback.extract_tb(e.__traceback__) if "rayhash" in f.filename]
            where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
            error = f"in {name}{where}: {str(e).splitlines()[0][:80]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if error:
            break
    torch.cuda.synchronize(device)
    return {"check": "syncs", "result": _verdict(error is None),
            "detail": "a training step (forward, CE+L_sim+L_KL, backward, optimiser) made "
                      + ("no device-to-host sync" if error is None else f"a device-to-host sync {error}"),
            "speed": ""}


def check_compile(device, batch_size: int, seed: int = 0) -> dict:
    """``torch.compile(HashingLoss, fullgraph=True)`` on ``device`` == the eager loss."""
    import torch

    from rayhash.config import load_config
    from rayhash.losses import HashingLoss
    from rayhash.config import find_config

    cfg = load_config(find_config("cifar100-cpu"), ["loss.beta=0.1"])
    classes, bits = 100, cfg.model.bits
    loss_fn = HashingLoss.from_config(cfg.loss, np.eye(classes, dtype=np.float32) * 0.5 + 0.5).to(device)
    g = torch.Generator().manual_seed(seed)
    z = torch.tanh(torch.randn(batch_size, bits, generator=g)).to(device)
    logits = torch.randn(batch_size, classes, generator=g).to(device)
    labels = torch.randint(0, classes, (batch_size,), generator=g).to(device)
    labels[:3] = -1  # unlabelled rows too: no boolean indexing may be needed for them

    def run(fn):
        torch.manual_seed(seed)  # L_KL's target samples from the global generator (dynamo traces no Generator)
        return fn(z, logits, labels=labels)[0]

    # inductor on the GPU (Triton kernels; fallback_random keeps the eager random numbers so the values compare);
    # on the CPU only the graph capture (inductor there needs a C++ compiler and minutes)
    backend = "inductor" if device.type == "cuda" else "eager"
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    eager = run(loss_fn)
    t0 = time.perf_counter()
    try:
        compiled = run(torch.compile(loss_fn, fullgraph=True, dynamic=False, backend=backend))
        error = None
    except Exception as e:  # a graph break under fullgraph=True raises
        compiled, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    seconds = time.perf_counter() - t0
    ok = error is None and torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    return {"check": "compile", "result": _verdict(ok),
            "detail": (f"torch.compile(HashingLoss, fullgraph=True, backend={backend}): {float(compiled):.5f} vs "
                       f"eager {float(eager):.5f}"
                       if error is None else f"torch.compile(HashingLoss, fullgraph=True) failed: {error}"),
            "speed": f"compiled in {seconds:.0f} s"}


def check_encode(device, images: int, batch_size: int, seed: int = 0) -> dict:
    """rayhash's Encoder against a plain PyTorch loop on the same device: same codes, throughput ratio."""
    import torch

    from rayhash.config import load_config
    from rayhash.model import Encoder, HashNet
    from rayhash.model.checkpoint import LoadedModel
    from rayhash.config import find_config

    cfg = load_config(find_config("cifar100-cpu"))
    torch.manual_seed(seed)
    net = HashNet.from_config(cfg.model, 100).eval()
    loaded = LoadedModel(model=net, config=cfg, bits=cfg.model.bits, image_size=cfg.data.image_size,
                         label_names=[], meta={}, path="<memory>", digest="")
    encoder = Encoder(loaded, device=device)
    size = cfg.data.image_size
    x = torch.randint(0, 256, (images, 3, size, size), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.uint8).numpy()

    def plain(autocast: bool) -> np.ndarray:
        out = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, images, batch_size):
                z, _ = net(torch.from_numpy(x[i:i + batch_size]).to(device))
                out.append((z >= 0).cpu().numpy())
        return np.packbits(np.concatenate(out), axis=1, bitorder="big")

    def ours() -> np.ndarray:
        return np.concatenate([encoder.encode_tensor(x[i:i + batch_size])[1] for i in range(0, images, batch_size)])

    runs = {"plain": lambda: plain(encoder.autocast), "rayhash": ours}
    timings, codes = {}, {}
    for name in ("plain", "rayhash", "plain", "rayhash"):  # the second round is timed
        _sync(device)
        t0 = time.perf_counter()
        codes[name] = runs[name]()
        _sync(device)
        timings[name] = time.perf_counter() - t0
    same = np.array_equal(codes["plain"], codes["rayhash"])
    fp32 = plain(False)
    agree = 1.0 - np.unpackbits(fp32 ^ codes["rayhash"]).mean()
    mode = "bf16 autocast" if encoder.autocast else "fp32"
    return {"check": "encode", "result": _verdict(same),
            "detail": f"{images} images ({mode}): codes {'identical' if same else 'DIFFER'} to a plain PyTorch loop; "
                      f"{agree:.2%} of bits as in fp32",
            "speed": f"{images / timings['rayhash']:,.0f} img/s ({timings['plain'] / timings['rayhash']:.2f}x the "
                     "plain loop)"}


def check_search(device, database: int, queries: int, k: int, bits: int = 64, seed: int = 0) -> dict:
    """GpuIndexBinaryFlat against IndexBinaryFlat on the CPU: identical distances, queries/s."""
    import faiss

    from rayhash.index.gpu import faiss_gpu_usable, faiss_gpu_wheel, gpu_capability

    rng = np.random.default_rng(seed)
    db = rng.integers(0, 256, (database, bits // 8), dtype=np.uint8)
    q = rng.integers(0, 256, (queries, bits // 8), dtype=np.uint8)
    cpu = faiss.IndexBinaryFlat(bits)
    cpu.add(db)
    t0 = time.perf_counter()
    d_cpu, _ = cpu.search(q, k)
    cpu_s = time.perf_counter() - t0
    cpu_speed = f"{queries / cpu_s:,.0f} q/s on CPU"
    if device.type == "cuda":
        cc = gpu_capability()
        where = f"compute capability {'.'.join(map(str, cc)) if cc else 'unknown'} (from the CUDA driver)"
        if not hasattr(faiss, "GpuIndexBinaryFlat"):
            return {"check": "search", "result": "SKIP", "speed": cpu_speed,
                    "detail": f"faiss here has no GPU classes (faiss-cpu); {where}: pip install 'rayhash[gpu]' for "
                              "GPU index search"}
        if not faiss_gpu_usable():
            wheel = faiss_gpu_wheel()
            return {"check": "search", "result": "SKIP", "speed": cpu_speed,
                    "detail": f"{where} has no kernels in {wheel[0] if wheel else 'this faiss'} (see the warning "
                              "above): index search stays on CPU"}
        index, what = faiss.GpuIndexBinaryFlat(faiss.StandardGpuResources(), cpu), "GpuIndexBinaryFlat"
    else:
        index, what = cpu, "CPU IndexBinaryFlat (no GPU index on this device)"
    index.search(q[:8], k)  # warm-up
    t0 = time.perf_counter()
    d_dev, _ = index.search(q, k)
    dev_s = time.perf_counter() - t0
    same = np.array_equal(d_dev, d_cpu)
    return {"check": "search", "result": _verdict(same),
            "detail": f"{what} over {database:,} {bits}-bit codes, k={k}: distances "
                      f"{'identical' if same else 'DIFFER'} to the CPU index",
            "speed": f"{queries / dev_s:,.0f} q/s ({cpu_s / dev_s:.1f}x CPU {queries / cpu_s:,.0f} q/s)"}


def table(rows: list[dict]) -> str:
    width = max(len(r["detail"]) for r in rows)
    lines = [f"{'check':<7} {'result':<6} {'what was compared':<{width}}  speed"]
    lines += [f"{r['check']:<7} {r['result']:<6} {r['detail']:<{width}}  {r['speed']}" for r in rows]
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
    p.add_argument("--skip", default="", help="comma-separated checks not to run (e.g. compile)")
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
    checks = {"train": lambda: check_train(device, args.images, args.batch_size, args.loss_tol),
              "syncs": lambda: check_syncs(device, args.batch_size),
              "compile": lambda: check_compile(device, args.batch_size),
              "encode": lambda: check_encode(device, args.images, args.batch_size),
              "search": lambda: check_search(device, args.database, args.queries, args.k)}
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(checks):
        p.error(f"--skip: unknown checks {sorted(skip - set(checks))}; choose from {sorted(checks)}")
    rows = []
    for name, run in checks.items():
        rows.append(run() if name not in skip else {"check": name, "result": "SKIP", "detail": "--skip", "speed": ""})
        print(f"{name}: {rows[-1]['result']}", file=sys.stderr, flush=True)
    print(table(rows))
    return 1 if any(r["result"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
