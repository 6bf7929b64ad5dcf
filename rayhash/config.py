"""Run configuration: YAML files + ``key=value`` overrides (OmegaConf), validated by pydantic v2 models.

``load_config("configs/cifar100.yaml", ["model.bits=32", "train.epochs=5"])`` returns a :class:`RunConfig`;
unknown keys, out-of-range values and wrong types fail fast with the key path and the fix. The configs shipped in the
package (``rayhash/resources/configs/``, which the checkout's ``configs/`` links to) are found by name:
``find_config("demo")``; ``rayhash config show NAME`` prints one.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BETA_SCHEDULES = ("constant", "ramp")  # rayhash.losses.hashing.beta_at
KL_DISTANCES = ("l2", "l1")  # rayhash.losses.kl.DISTANCES
KL_ESTIMATORS = ("sampled", "blockwise", "corners", "boxes")  # rayhash.losses.kl.ESTIMATORS (checked there at import)
KL_TC = ("rho", "none", "gaussian")  # blockwise: how the total correlation between blocks enters (README)


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "resources" / "configs"  # packaged with the wheel


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (``--config NAME``)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def find_config(name_or_path: str | os.PathLike) -> str:
    """A config file by path, else by name: ``./configs/NAME.yaml`` (your own copies), then the shipped one."""
    name = str(name_or_path)
    candidates = [Path(name)]
    if not name.endswith((".yaml", ".yml")) and "/" not in name:
        candidates += [Path.cwd() / "configs" / f"{name}.yaml", SHIPPED_CONFIGS / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise FileNotFoundError(f"config {name!r} not found (looked in {', '.join(map(str, candidates))}); pass a YAML "
                            f"path or one of the shipped configs: {', '.join(shipped_configs())}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the WebDataset shards are and how samples become training targets."""

    path: str | None = None  # dataset folder DS (with dataset.json); `rayhash train --data DS` sets it
    train_split: str = "train"
    val_split: str | None = "test"  # held-out split for validation mAHP; null = no validation
    image_size: int = Field(32, ge=8, le=1024)
    targets: Literal["hierarchy", "captions", "none"] = "hierarchy"
    caption_embeddings: str | None = None  # Parquet of `rayhash data embed-captions`
    # (default DS/caption_embeddings.parquet)
    shuffle_buffer: int = Field(2048, ge=0)  # rows mixed across shards per worker; 0: in-shard shuffle only
    train_classes: list[int] | None = None  # train on these labels only (zero-shot: eval --classes the others)
    verify_shards: bool = True  # check every shard's sha256 against dataset.json before training (one read)

    @field_validator("path", "caption_embeddings")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        """Ray workers do not share the caller's working directory: local paths become absolute."""
        from rayhash.storage import absolute

        return absolute(v) if v else v


class ModelConfig(_Section):
    backbone: str = "cifar_resnet"  # a name in rayhash.model.BACKBONES (`rayhash train --help` lists them)
    bits: int = Field(64, ge=16, le=128)
    pretrained: str | None = None  # local .pt/.pth state_dict for the torchvision backbone; never downloaded
    width: int = Field(32, ge=4, le=512)  # channels of the first block (tiny_cnn, resnet9)
    hash_norm: bool = False  # BatchNorm before tanh: centred, balanced bits that do not saturate to constants

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from rayhash.model.backbones import BACKBONES

        if v not in BACKBONES:
            raise ValueError(BACKBONES.unknown(v))
        return v

    @field_validator("bits")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("bits must be a multiple of 8 (codes are packed into bytes); "
                             f"use e.g. {max(16, v // 8 * 8)} or {v // 8 * 8 + 8}")
        return v


class LossConfig(_Section):
    """L = CE + alpha·L_sim + beta·L_KL/d (CE where labels exist; README "Method definitions")."""

    alpha: float = Field(1.0, ge=0)  # weight of the relative similarity loss L_sim
    beta: float = Field(1.0, ge=0)  # weight of the k-NN KL loss L_KL (divided by bits)
    k: int = Field(3, ge=1)  # k of the k-NN KL estimator
    uniformity: float = Field(0.1, ge=0, le=1)  # u: target = (1-u)·corners + u·uniform cube
    similarity: Literal["relative", "softmax"] = "relative"  # form of L_sim
    tau: float = Field(0.1, gt=0)  # temperature of the softmax form
    beta_schedule: Literal[BETA_SCHEDULES] = "constant"  # constant | ramp (0 until beta_start, then linear)
    beta_start: float = Field(0.0, ge=0, le=1)  # ramp: fraction of training before L_KL is switched on
    beta_ramp: float = Field(0.0, ge=0, le=1)  # ramp: fraction of training over which beta rises to its value
    kl_samples: float = Field(1.0, gt=0)  # m target samples = kl_samples x n outputs (n includes the queue)
    kl_distance: Literal[KL_DISTANCES] = "l2"  # norm of the k-NN KL estimator (l1 = Hamming on corners)
    kl_queue: int = Field(0, ge=0)  # recent detached outputs added to the estimator's sample (0 = off)
    kl_estimator: Literal[KL_ESTIMATORS] = "sampled"  # how L_KL's cross-entropy half is estimated (README)
    kl_block: int = Field(4, ge=1, le=12)  # blockwise: bits per block (divides model.bits; 2^b well below n)
    kl_tc: Literal[KL_TC] = "rho"  # blockwise: rho = whole-code entropy | none = per-block bound | gaussian = +
    # the Gaussian total correlation between blocks (a decorrelation penalty)
    kl_nu_k: int | None = Field(None, ge=1)  # rank l of the target neighbour (null: k; corners: 1 = own corner)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # of the cross-entropy term


class TrainConfig(_Section):
    num_workers: int = Field(1, ge=1)  # Ray Train workers (one GPU each when use_gpu)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=2)  # GLOBAL batch; each worker gets batch_size / num_workers
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr·min_lr_ratio
    use_gpu: bool | Literal["auto"] = "auto"  # auto = GPU when the Ray cluster has GPUs
    cpus_per_worker: float = Field(1.0, gt=0)
    mixed_precision: bool = True  # bf16 autocast where the device has bf16 (GPU; CPU with AVX512-BF16/AMX)
    threads: int | None = Field(None, ge=1)  # torch threads per worker on CPU (default: cpus_per_worker)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd = Nesterov momentum 0.9
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1 = forever)
    checkpoint_every: int = Field(1, ge=1)  # epochs between checkpoints (the last epoch always saves)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    steps_per_epoch: int | None = Field(None, ge=1)  # optional cap on steps per epoch
    storage_path: str | None = None  # Ray Train storage (local dir, s3://, gs://); default <out>/ray
    tensorboard: bool = False  # also log to <out>/tensorboard when torch.utils.tensorboard is importable


class ValidationConfig(_Section):
    subset: int | None = Field(None, ge=0)  # held-out images used as queries AND database (null = the whole
    # split: the reference protocol; 0 = no validation)
    k: int = Field(250, ge=1)  # mAHP@k
    every: int = Field(1, ge=1)  # epochs between validations (the last epoch always validates)


class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        """Settings that are only wrong together, each error naming both keys."""
        if self.loss.kl_estimator == "blockwise" and self.model.bits % self.loss.kl_block:
            raise ValueError(f"loss.kl_block={self.loss.kl_block} must divide model.bits={self.model.bits} "
                             "(blocks of 4 or 8 bits fit every code length)")
        # L_KL's first estimate sees the global batch alone (full batches only; the kl_queue starts empty)
        if self.loss.beta and self.loss.k >= self.train.batch_size:
            raise ValueError(f"loss.k={self.loss.k} needs more than k outputs per step, but train.batch_size="
                             f"{self.train.batch_size} gives a first step only that many (loss.kl_queue fills "
                             "later): lower loss.k (about batch_size / 8) or raise train.batch_size")
        if self.train.warmup_epochs > self.train.epochs:
            raise ValueError(f"train.warmup_epochs={self.train.warmup_epochs:g} exceeds train.epochs="
                             f"{self.train.epochs}: the learning rate would never finish warming up; lower "
                             "train.warmup_epochs or raise train.epochs")
        return self

    def to_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(self.model_dump()))

    def check_paths(self) -> None:
        """Fail fast (before Ray starts) when a local input path named in the config is missing."""
        from rayhash.layout import DatasetDir
        from rayhash.storage import exists

        if not self.data.path:
            raise ValueError("data.path is not set: pass --data DS (a folder from `rayhash data convert`) "
                             "or set data.path=DS")
        info = DatasetDir(self.data.path).info
        if not exists(info):
            raise FileNotFoundError(f"data.path: {info} not found; point data.path / --data at a dataset "
                                    "folder written by `rayhash data convert`")
        for key, path in (("model.pretrained", self.model.pretrained),
                          ("data.caption_embeddings", self.data.caption_embeddings)):
            if path and not exists(path):
                raise FileNotFoundError(f"{key}: {path} not found; fix the path or set {key}=null")


def load_config(path_or_dict: str | os.PathLike | Mapping[str, Any] | RunConfig | None = None,
                overrides: Sequence[str] = ()) -> RunConfig:
    """Load YAML (or a dict), merge ``key=value`` overrides (OmegaConf dotlist), validate into a RunConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if path_or_dict is None:
        base = OmegaConf.create({})
    elif isinstance(path_or_dict, RunConfig):
        base = OmegaConf.create(path_or_dict.model_dump())
    elif isinstance(path_or_dict, Mapping):
        base = OmegaConf.create(dict(path_or_dict))
    else:
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f"config file {path_or_dict} not found; shipped configs (`rayhash config show "
                                    f"NAME`): {', '.join(shipped_configs())}")
        try:
            base = OmegaConf.load(path_or_dict)
        except Exception as e:  # yaml errors
            raise ValueError(f"{path_or_dict}: not valid YAML ({e})") from e
    overrides = list(overrides)
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value (e.g. model.bits=32)")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ValueError(f"config: {e}") from e
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as e:
        raise ValueError(_explain(e, source=str(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike))
                                  else "config")) from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    """One message per problem: the dotted key, what is wrong, and how to fix it."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(e["loc"])
            near = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            lines.append(f"{key}: unknown key; {hint}allowed keys here: {', '.join(allowed)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {e.get('input')!r})" if key else msg)  # no key: names its keys
    return f"{source}: invalid configuration: " + "; ".join(lines)
