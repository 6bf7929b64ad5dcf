"""Run configs: YAML + key=value overrides merged by OmegaConf, validated by pydantic, failing fast by key."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rayhash.config import RunConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_and_every_key_is_commented(path):
    cfg = load_config(path)
    assert cfg.model.bits % 8 == 0
    # every leaf key line in the YAML carries a comment explaining it
    leaf_lines = [ln for ln in path.read_text().splitlines()
                  if ln.startswith("  ") and ":" in ln and not ln.strip().startswith("#")]
    assert leaf_lines and all("#" in ln for ln in leaf_lines), [ln for ln in leaf_lines if "#" not in ln]


def test_overrides_merge_over_yaml_and_round_trip(tmp_path):
    base = load_config(CONFIGS[0])
    cfg = load_config(CONFIGS[0], ["model.bits=48", "train.lr=0.5", "data.val_split=null", "loss.k=5"])
    assert (cfg.model.bits, cfg.train.lr, cfg.data.val_split, cfg.loss.k) == (48, 0.5, None, 5)
    assert cfg.train.epochs == base.train.epochs  # untouched keys keep the file's values
    assert load_config(cfg.model_dump()) == cfg
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(tmp_path / "c.yaml") == cfg
    assert RunConfig.model_validate(cfg.model_dump()) == cfg


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ValueError) as e:
        load_config({"model": {"bitz": 32}})
    msg = str(e.value)
    assert "model.bitz" in msg and "did you mean 'bits'" in msg and "backbone" in msg
    with pytest.raises(ValueError, match=r"trian: unknown key; did you mean 'train'"):
        load_config(None, ["trian.epochs=3"])


@pytest.mark.parametrize("bits", [20, 63])
def test_bits_not_multiple_of_8(bits):
    with pytest.raises(ValueError, match=r"model\.bits: bits must be a multiple of 8"):
        load_config(None, [f"model.bits={bits}"])


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match=r"model\.bits: .*greater than or equal to 16"):
        load_config(None, ["model.bits=8"])
    with pytest.raises(ValueError, match=r"model\.backbone"):
        load_config(None, ["model.backbone=vgg"])
    with pytest.raises(ValueError, match=r"train\.lr"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["model.bits"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_missing_data_path_fails_fast_naming_key(tmp_path, capsys):
    from rayhash.train.cli import register

    missing = tmp_path / "no_such_ds"
    cfg = load_config(None, [f"data.path={missing}"])
    with pytest.raises(FileNotFoundError, match=r"data\.path: .*no_such_ds/dataset\.json not found"):
        cfg.check_paths()
    with pytest.raises(ValueError, match=r"data\.path is not set"):
        load_config(None).check_paths()
    # through the CLI handler: fails before Ray starts (no Ray needed for this test)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", str(CONFIGS[0]), "--data", str(missing), "--out",
                              str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        args.func(args)
    assert not (tmp_path / "run").exists()


def test_settings_wrong_together_are_refused_naming_both_keys():
    """A warm-up longer than training (the learning rate would never reach its peak) and a KL block that does not
    divide the code length are refused with both keys named; the boundary cases pass."""
    from rayhash.config import load_config

    with pytest.raises(ValueError, match=r"train\.warmup_epochs=3 exceeds train\.epochs=1"):
        load_config(None, ["train.warmup_epochs=3", "train.epochs=1"])
    assert load_config(None, ["train.warmup_epochs=2", "train.epochs=2"]).train.epochs == 2
    with pytest.raises(ValueError, match=r"loss\.kl_block=3 must divide model\.bits=32"):
        load_config(None, ["loss.kl_estimator=blockwise", "loss.kl_block=3", "model.bits=32"])
    assert load_config(None, ["loss.kl_estimator=sampled", "loss.kl_block=3"]).loss.kl_block == 3


def test_kl_rank_must_fit_in_a_batch_as_the_estimator_needs():
    """loss.k (the rho neighbour's rank) against train.batch_size: refused at load time exactly where the estimator
    itself would fail at the first step (k-th nearest *other* output of the batch + queue)."""
    import torch

    from rayhash.config import load_config
    from rayhash.losses.hashing import HashingLoss

    z = torch.randn(32, 8).tanh()  # the first step of a batch of 32, with a KL queue that has not filled yet
    HashingLoss(alpha=0.0, beta=0.3, k=31, kl_queue=8, kl_estimator="corners")(z)
    with pytest.raises(ValueError):
        HashingLoss(alpha=0.0, beta=0.3, k=32, kl_queue=8, kl_estimator="corners")(z)
    with pytest.raises(ValueError, match=r"loss\.k=32 .*train\.batch_size=32"):
        load_config(None, ["loss.beta=0.3", "loss.k=32", "train.batch_size=32"])
    assert load_config(None, ["loss.beta=0.3", "loss.k=31", "train.batch_size=32"]).loss.k == 31
    with pytest.raises(ValueError, match=r"loss\.k=32 .*train\.batch_size=32"):  # the queue is empty at step one
        load_config(None, ["loss.beta=0.3", "loss.k=32", "train.batch_size=32", "loss.kl_queue=8"])
    assert load_config(None, ["loss.beta=0", "loss.k=32", "train.batch_size=32"]).loss.k == 32  # L_KL off


def test_environment_variables_are_listed_once():
    """rayhash reads environment variables only through rayhash.settings (a grep of the package finds
    ``os.environ`` nowhere else but runtime.py's process set-up), submit forwards exactly the settings marked
    forwarded and never a token, and the README's table is the generated one."""
    import re

    from rayhash import settings
    from rayhash.submit import PASSTHROUGH_ENV

    root = Path(__file__).resolve().parents[1]
    readers = sorted(str(p.relative_to(root)) for p in (root / "rayhash").rglob("*.py")
                     if re.search(r"os\.environ|os\.getenv", p.read_text()))
    assert set(readers) <= {"rayhash/settings.py", "rayhash/runtime.py"}, readers
    assert PASSTHROUGH_ENV == settings.forwarded()
    assert not {"RAYHASH_TOKEN", "RAY_AUTH_TOKEN", "RAYHASH_TOKEN_FILE"} & set(PASSTHROUGH_ENV)
    assert {"RAYHASH_ACTOR_START_TIMEOUT", "RAYHASH_FAISS_GPU"} <= set(PASSTHROUGH_ENV)
    readme = (root / "README.md").read_text()
    table = readme.split("checked by tests/test_config.py -->\n", 1)[1].split("\n<!-- end settings table -->")[0]
    assert table == settings.markdown_table()
    assert len({s.name for s in settings.ALL}) == len(settings.ALL)
