"""Helpers of ``rayhash query``: codes of database keys, the result table, a contact sheet of the hits."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rayhash.index.codes import read_code_file
from rayhash.index.merge import SearchResult, label_name


def codes_for_keys(manifest: dict[str, Any], keys: Sequence[str]) -> np.ndarray:
    """Packed codes of database ``keys``, read from the code shards the index was built from."""
    files = list(dict.fromkeys(src[0] for s in manifest["shards"] for src in s["sources"]))
    wanted, found = set(keys), {}
    for f in files:
        table = read_code_file(f)
        for i in np.flatnonzero(np.isin(table.keys, list(wanted))):
            found.setdefault(table.keys[i], table.codes[i])
        if len(found) == len(wanted):
            break
    missing = [k for k in keys if k not in found]
    if missing:
        raise ValueError(f"key(s) {missing[:5]} not found in the code shards of this index ({len(files)} files); "
                         "check the key spelling or query with --image")
    return np.stack([found[k] for k in keys])


def _label_name(label: int, names: Sequence[str]) -> str:
    return label_name(label, names) or "-"


def format_table(queries: Sequence[str], res: SearchResult, label_names: Sequence[str] = ()) -> str:
    """One block per query: rank, distance, key, label name."""
    lines = []
    for qi, q in enumerate(queries):
        keys = [str(k) for k in res.keys[qi] if k is not None]
        width = max([len("key")] + [len(k) for k in keys])
        lines += [f"query {q}", f"{'rank':>4}  {'distance':>8}  {'key':<{width}}  label"]
        for r, (d, key, lab) in enumerate(zip(res.distances[qi], res.keys[qi], res.labels[qi]), 1):
            if key is not None:
                lines.append(f"{r:>4}  {int(d):>8}  {str(key):<{width}}  {_label_name(int(lab), label_names)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def image_source(manifest: dict[str, Any]) -> str | list[str] | None:
    """Where the images of an index's codes are: the dataset split recorded at encode time, else the tars the codes
    were encoded from (each codes folder's ``codes.json``; codes of raw img2dataset tars record no split)."""
    import os

    from rayhash.layout import CodesDir

    if manifest.get("data"):
        return manifest["data"]
    folders = dict.fromkeys(os.path.dirname(src[0]) for s in manifest["shards"] for src in s["sources"])
    tars = [entry["source"] for folder in folders if (summary := CodesDir(folder).read_summary())
            for entry in summary.shards or () if entry.get("source")]
    return tars or None


def _images_for_keys(data: str | Sequence[str] | None, keys: set[str]) -> dict[str, np.ndarray]:
    """uint8 HWC images of ``keys`` from ``data`` (a dataset split or a list of tars; empty when unavailable)."""
    if not data or not keys:
        return {}
    from rayhash.data import read_shards

    def pick(batch):
        keep = np.isin(batch["key"].astype(str), list(keys))
        return {"key": batch["key"][keep], "image": batch["image"][keep]}

    rows = read_shards(data, mode="raw", image_size=64).map_batches(pick, batch_format="numpy").take_all()
    return {str(r["key"]): np.asarray(r["image"]) for r in rows}


def write_contact_sheet(out: str, queries: Sequence[str], res: SearchResult, label_names: Sequence[str] = (),
                        *, images: bool, data: str | None) -> None:
    """A PNG grid: one row per query (query image, then the hits with distance and label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from rayhash import storage

    hit_keys = {str(k) for k in res.keys.ravel() if k is not None}
    wanted = hit_keys | (set() if images else set(queries))
    pics = _images_for_keys(data, wanted)
    if len(pics) < len(wanted):
        from rayhash.runtime import get_logger

        where = "the index records no dataset" if not data else f"not found in {data}"
        get_logger("rayhash.index").warning(
            "contact sheet: no image for %d of %d tiles (%s), left blank; pass --data DS/SPLIT or the tars the codes "
            "were encoded from", len(wanted) - len(pics), len(wanted), where)
    nq, k = res.distances.shape
    fig, axes = plt.subplots(nq, k + 1, figsize=(1.3 * (k + 1), 1.5 * nq), squeeze=False)
    for qi, q in enumerate(queries):
        qimg = np.asarray(Image.open(q).convert("RGB")) if images else pics.get(str(q))
        cells = [(qimg, f"query\n{str(q)[-14:]}")]
        for d, key, lab in zip(res.distances[qi], res.keys[qi], res.labels[qi]):
            title = "" if key is None else f"d={int(d)} {_label_name(int(lab), label_names)[:12]}"
            cells.append((pics.get(str(key)), title))
        for ax, (img, title) in zip(axes[qi], cells):
            ax.axis("off")
            if img is not None:
                ax.imshow(img)
            ax.set_title(title, fontsize=6)
    fig.tight_layout()
    with storage.atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
