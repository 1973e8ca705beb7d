"""The one training config: a strict dataclass, two profiles, CLI flags generated from its fields.

A run's config is a profile with some fields overridden. It is printed at start, logged to MLflow
as params and stored in every checkpoint; unknown keys and unknown profiles fail loudly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline.errors import InputError
from pipeline.schedules import SCHEDULES

INITS = ("torchvision", "paper")  # AlexNet's initialisations (pipeline.model)
NORMALIZATIONS = ("mean-std", "mean-image")
PROMOTE_POLICIES = ("if-better", "always", "never")
DECODE_ON = ("data", "train")  # pipeline.train.ingest


class ConfigError(InputError):
    """A config key, value or profile that cannot be used; the message says what to change."""


def option(default: Any, help: str) -> Any:
    """A config field: its default, and its one-line help (the CLI flag's, the README's table)."""
    return field(default=default, metadata={"help": help})


FORWARD_ENV_HELP = (  # jobs/train.py, evaluate.py and infer.py
    'credentials a cluster\'s workers get from this shell, "NAME,..." (e.g. MLFLOW_TRACKING_USERNAME,'
    "MLFLOW_TRACKING_PASSWORD); Ray keeps them in its job table. Default: none, the nodes use their own"
)


@dataclass(frozen=True)
class TrainConfig:
    profile: str = option("imagenet", "which preset the other fields started from")
    data: str = option("", "prepared shards (jobs/prepare.py --output); empty: the bundled sample, built on first use")
    sample_dir: str = option("data/sample", "where the sample dataset (raw + shards) lives")
    crop: int = option(224, "random crop for training, centre crop for validation")
    epochs: int = option(90, "passes over the training set")
    batch_size: int = option(128, "per train worker")
    lr: float = option(0.01, "learning rate for `lr_batch` images; scaled linearly with the global batch")
    lr_batch: int = option(128, "the batch size `lr` is quoted for (the paper: 0.01 at 128)")
    schedule: str = option("plateau", "lr schedule: plateau (the paper's), step (torchvision's) or constant")
    plateau_patience: int = option(5, "plateau: epochs without a new best val top-1 error before lr ÷10")
    lr_drops: int = option(3, "plateau: at most this many ÷10 drops (the paper: three)")
    step_epochs: int = option(30, "step: lr ÷10 every this many epochs (torchvision: 30)")
    warmup_epochs: float = option(
        5.0, "epochs over which the lr rises per step from 1% to its scaled value (Goyal et al.); 0: no warmup"
    )
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 weight decay, on every parameter as in the paper")
    lighting_std: float = option(0.1, "σ of the paper's PCA colour augmentation; 0 turns it off")
    normalize: str = option("mean-std", '"mean-std" (per-channel mean and std) or "mean-image" (the paper\'s)')
    lrn: bool = option(False, "the paper's local response normalisation after conv1 and conv2")
    init: str = option("torchvision", '"torchvision" (PyTorch defaults) or "paper" (N(0, 0.01), biases 1)')
    paper_bias: float = option(1.0, 'positive bias of init="paper" (Caffe used 0.1)')
    dropout: float = option(0.5, "dropout before fc6 and fc7")
    fc_width: int = option(4096, "width of fc6 and fc7 (the paper: 4096); narrower for experiments and tests")
    clip_grad_norm: float = option(0.0, "clip the global gradient norm to this; 0: off (the paper does not clip)")
    workers: int = option(
        1,
        "Ray Train workers (DDP ranks): N, or MIN:MAX to train elastically (starts once MIN can be placed, "
        "shrinks when workers or nodes are lost, grows back to MAX; the global batch stays batch_size × MAX)",
    )
    min_workers: int = option(0, "the fewest workers an elastic run trains with (--workers MIN:MAX); 0: fixed")
    resize_interval: float = option(
        60.0,
        "seconds between an elastic run's looks for room for more workers (growing restarts them from the latest checkpoint)",
    )
    gpu: bool | None = option(
        None, "one GPU per train worker; unset: where the cluster has or can add GPU nodes (--no-gpu: CPUs)"
    )
    compile: bool = option(False, "torch.compile the model (worth it on GPUs; slow to start on CPUs)")
    decode_on: str = option(
        "data",
        '"data": Ray Data\'s CPU tasks decode, crop and flip; "train": they ship the JPEG bytes and each train '
        "worker decodes on its device (nvJPEG on a GPU), so the CPU nodes need no cores for decoding",
    )
    cpus_per_worker: float = option(1.0, "CPUs each train worker reserves; the rest of the cluster decodes")
    worker_resources: str = option(
        "", 'more Ray resources per train worker, "name=amount,..." (mock_gpu=1 without GPUs)'
    )
    data_cpus: int = option(2, "CPUs a locally started Ray keeps for Ray Data beside the train workers")
    data_cpu_limit: float = option(0.0, "most CPUs Ray Data's tasks may hold at once; 0: all the train workers leave")
    seed: int = option(0, "model init, file order, colour augmentation")
    tracking: bool = option(True, "log to MLflow and register the model; --no-tracking: checkpoints only")
    experiment: str = option("alexnet", "MLflow experiment")
    model_name: str = option("alexnet", "MLflow registered model")
    promote: str = option("if-better", 'new version @champion: "if-better" (val top-1, same data), "always", "never"')
    system_metrics_interval: float = option(10.0, "seconds between CPU/memory/GPU samples logged to the run")
    storage_path: str = option(
        "runs", "Ray Train checkpoints and the run record: a local directory or s3://bucket/prefix"
    )
    shared_storage: bool = option(
        False, "local --storage-path and --data are on a filesystem every node mounts at the same path (NFS, EFS)"
    )
    forward_env: str = option("", FORWARD_ENV_HELP)
    name: str = option("", "run name; empty: alexnet-<profile>-<timestamp>")
    resume: str = option(
        "", "continue the stopped run of this name (under --storage-path) with its own config and MLflow run"
    )
    keep_checkpoints: int = option(2, "best checkpoints kept (by val top-1 error), besides the latest")
    checkpoint_every_steps: int = option(0, "also checkpoint every N training steps, mid-epoch; 0: at epoch ends only")
    preemption_check_steps: int = option(
        20,
        "steps between asks whether a node of the run announced its preemption (spot): then a checkpoint at once; 0: never",
    )
    max_failures: int = option(
        3, "worker-group restarts from the latest checkpoint before the run stops (0: stop at the first; -1: no limit)"
    )
    progress_interval: float = option(
        60.0, "seconds between lines inside an epoch (step, images/s, running loss) and Ray Data's bars; 0: none"
    )
    stall_warning: float = option(
        120.0, "seconds without a training batch before the job says what the cluster waits for; 0: never"
    )
    skip_resource_check: bool = option(
        False, "start even where this cluster, which has no autoscaler, cannot hold the plan (nodes will join)"
    )

    def __post_init__(self) -> None:
        checks = [
            (self.profile in PROFILE_NAMES, f"unknown profile {self.profile!r}; choose one of {PROFILE_NAMES}"),
            (self.init in INITS, f"init must be one of {INITS}, got {self.init!r}"),
            (self.decode_on in DECODE_ON, f"decode_on must be one of {DECODE_ON}, got {self.decode_on!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.promote in PROMOTE_POLICIES, f"promote must be one of {PROMOTE_POLICIES}, got {self.promote!r}"),
            (self.system_metrics_interval > 0, "system_metrics_interval must be positive"),
            (self.normalize in NORMALIZATIONS, f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}"),
            (self.plateau_patience >= 1 and self.step_epochs >= 1, "plateau_patience and step_epochs must be >= 1"),
            (self.lr_drops >= 0, f"lr_drops must be >= 0, got {self.lr_drops}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0 (0: no warmup), got {self.warmup_epochs}"),
            (self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0 (0: at epoch ends only)"),
            (self.preemption_check_steps >= 0, "preemption_check_steps must be >= 0 (0: never)"),
            (self.resize_interval >= 0, f"resize_interval must be >= 0, got {self.resize_interval}"),
            (self.crop >= 63, f"crop must be at least 63 pixels (AlexNet's smallest input), got {self.crop}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.workers >= 1, f"workers must be at least 1, got {self.workers}"),
            (
                0 <= self.min_workers <= self.workers,
                f"--workers MIN:MAX needs 1 <= MIN <= MAX, got {self.min_workers}:{self.workers}",
            ),
            (self.lr > 0 and self.lr_batch > 0, "lr and lr_batch must be positive"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.fc_width >= 1, f"fc_width must be at least 1, got {self.fc_width}"),
            (self.lighting_std >= 0, f"lighting_std must be >= 0, got {self.lighting_std}"),
            (self.cpus_per_worker >= 0 and self.data_cpus >= 1, "cpus_per_worker must be >= 0, data_cpus >= 1"),
            (self.data_cpu_limit >= 0, "data_cpu_limit must be >= 0 (0: no limit)"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.clip_grad_norm >= 0, f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}"),
            (self.max_failures >= -1, "max_failures must be >= -1 (-1: retry forever)"),
            (self.progress_interval >= 0, f"progress_interval must be >= 0 (0: none), got {self.progress_interval}"),
            (self.stall_warning >= 0, f"stall_warning must be >= 0 (0: no watchdog), got {self.stall_warning}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for flag, value in (("name", self.name), ("resume", self.resume)):
            if value and not PLAIN_NAME.fullmatch(value):
                raise ConfigError(
                    f"{flag} {value!r} is not a plain name: letters, digits, '.', '_' and '-', starting with a "
                    "letter or digit (it names a folder under --storage-path, and may not leave it)"
                )
        parse_resources(self.worker_resources)

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """What each train worker asks Ray for, besides the GPU of --gpu."""
        return {"CPU": self.cpus_per_worker, **parse_resources(self.worker_resources)}

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.workers

    @property
    def worker_count(self) -> int | tuple[int, int]:
        """ScalingConfig's num_workers: N, or (MIN, MAX) for an elastic run."""
        return (self.min_workers, self.workers) if self.elastic else self.workers

    @property
    def workers_shown(self) -> str:
        """ "4 worker(s)", or "1..4 workers (elastic)"."""
        return f"{self.min_workers}..{self.workers} workers (elastic)" if self.elastic else f"{self.workers} worker(s)"

    @property
    def global_batch(self) -> int:
        """The configured global batch: batch_size on each of the (most) workers."""
        return self.batch_size * self.workers

    @property
    def scaled_lr(self) -> float:
        """The paper's lr scaled linearly with the global batch (Goyal et al.)."""
        return self.lr_at(self.workers)

    def accumulation(self, world: int) -> int:
        """Micro-batches per optimizer step on `world` workers: the global batch stays batch_size ×
        workers, or the nearest that `world` allows (between two equally near, the larger)."""
        if not 1 <= world <= self.workers:
            raise ValueError(f"world size {world} is outside 1..{self.workers}")
        low = self.workers // world
        return min((low, low + 1), key=lambda k: (abs(world * k - self.workers), -k))

    def global_batch_at(self, world: int) -> int:
        """The global batch an optimizer step takes on `world` workers (with accumulation)."""
        return self.batch_size * world * self.accumulation(world)

    def lr_at(self, world: int) -> float:
        """The lr that goes with `global_batch_at(world)`: the same as the configured one whenever the
        global batch is exact, scaled linearly with it where it is only the nearest."""
        return self.lr * self.global_batch_at(world) / self.lr_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(f.name for f in fields(cls))}")
        return cls(**values)


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # a run's folder: no '/', '..' or '.' of its own

# Profiles: a name and the fields in which it differs from the dataclass defaults (the paper's).
PROFILES: dict[str, dict[str, Any]] = {
    # The paper on ILSVRC-2012: batch 128, lr 0.01, momentum 0.9, weight decay 5e-4, 90 epochs,
    # lr ÷10 when the validation error stops improving (at most three times).
    "imagenet": {"cpus_per_worker": 4.0},  # a GPU's train worker: its loop, the batches' copies, DDP
    # The bundled sample on a laptop CPU: 72-pixel shards, 64-pixel crops, minutes not days.
    # One worker using both cores of a small machine is twice as fast as two DDP workers there
    # (each DDP worker repeats the optimizer step and they exchange 230 MB of gradients per step);
    # --workers 2 shows DDP. At 64 pixels AlexNet's last feature map is 1×1, copied 36 times by
    # the 6×6 average pool, so gradients into the conv layers are large and an occasional spike
    # undoes the run: the sample clips the gradient norm at 5 (typical norms 1-15, spikes 30+).
    "sample": {
        "crop": 64,
        "epochs": 22,
        "batch_size": 128,
        "workers": 1,
        "cpus_per_worker": 2.0,
        "clip_grad_norm": 5.0,
        "keep_checkpoints": 1,
        "warmup_epochs": 0.0,  # one worker at the paper's batch: nothing to warm up from
        # The sample's loss sits at ln 10 for its first ~6 epochs before it falls: a plateau
        # schedule would cut the lr before learning starts. 22 epochs at a constant lr instead.
        "schedule": "constant",
    },
}
PROFILE_NAMES = tuple(PROFILES)
DEFAULT_PROFILE = "sample"  # what `jobs/train.py` and resolve() start from when no profile is named

# What a resumed run (--resume NAME) may change: how long, on what and how it is watched. The rest
# (the data, the model, the recipe) would make it another run: given with another value, refused.
CHANGEABLE_ON_RESUME = (
    "epochs", "workers", "min_workers", "resize_interval", "gpu", "cpus_per_worker", "worker_resources", "data_cpus",
    "data_cpu_limit", "decode_on", "compile", "max_failures", "stall_warning", "progress_interval", "preemption_check_steps",
    "checkpoint_every_steps", "keep_checkpoints", "system_metrics_interval", "skip_resource_check", "storage_path",
    "shared_storage", "forward_env", "promote",
)  # fmt: skip


def parse_resources(text: str) -> dict[str, float]:
    """ "mock_gpu=1,memory_heavy=0.5" -> {"mock_gpu": 1.0, "memory_heavy": 0.5}; "" -> {}."""
    resources: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, amount = item.partition("=")
        name = name.strip()
        try:
            value = float(amount) if amount.strip() else 1.0
        except ValueError:
            value = -1.0
        if not re.fullmatch(r"[A-Za-z_][\w.-]*", name) or value <= 0:
            raise ConfigError(f"worker_resources: {item!r} is not NAME=AMOUNT with a positive amount (e.g. mock_gpu=1)")
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(
                f"worker_resources: {name} has its own flag (--cpus-per-worker, --gpu); list custom resources only"
            )
        resources[name] = value
    return resources


def resolve(profile: str = DEFAULT_PROFILE, **overrides: Any) -> TrainConfig:
    """The profile's config with `overrides` applied; None values are ignored."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {PROFILE_NAMES}")
    values = {"profile": profile, **PROFILES[profile]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values)


# String fields with a fixed set of values: --help lists them, argparse refuses others.
CHOICES = {"schedule": SCHEDULES, "promote": PROMOTE_POLICIES, "decode_on": DECODE_ON, "init": INITS,
           "normalize": NORMALIZATIONS}  # fmt: skip

# --help's sections: every field but profile and min_workers (--workers MIN:MAX) in one of them.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data", "sample_dir", "crop", "decode_on", "lighting_std", "normalize"),
    "model": ("lrn", "init", "paper_bias", "dropout", "fc_width", "compile"),
    "optimisation": ("epochs", "batch_size", "lr", "lr_batch", "schedule", "plateau_patience", "lr_drops",
                     "step_epochs", "warmup_epochs", "momentum", "weight_decay", "clip_grad_norm", "seed"),
    "cluster": ("workers", "resize_interval", "gpu", "cpus_per_worker", "worker_resources", "data_cpus",
                "data_cpu_limit", "shared_storage", "skip_resource_check"),
    "tracking": ("tracking", "experiment", "model_name", "promote", "system_metrics_interval", "forward_env"),
    "run, checkpoints and fault tolerance": ("storage_path", "name", "resume", "keep_checkpoints",
                                             "checkpoint_every_steps", "preemption_check_steps", "max_failures",
                                             "progress_interval", "stall_warning"),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`--batch-size`, `--lrn/--no-lrn`, …), defaults left to the profile,
    in FLAG_GROUPS' sections."""
    parser.add_argument(
        "--profile", default=None, choices=PROFILE_NAMES, help=f"preset to start from (default: {DEFAULT_PROFILE})"
    )
    by_name = {f.name: f for f in fields(TrainConfig)}
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, by_name[name])


def _add_flag(parser, f) -> None:
    """The field's flag, its help ending with each profile's value; a string field with a fixed set
    of values lists them (and refuses others)."""
    flag = "--" + f.name.replace("_", "-")
    values = {p: _profile_value(p, f.name) for p in PROFILE_NAMES}
    defaults = ", ".join(f"{p}: {'auto' if v is None else repr(v)}" for p, v in values.items())
    help_text = f"{f.metadata['help'].replace('%', '%%')} [{defaults}]"
    if f.name == "workers":
        parser.add_argument(flag, dest=f.name, type=worker_range, default=None, metavar="N|MIN:MAX", help=help_text)
    elif f.type in ("bool", "bool | None"):
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        kind = {"int": int, "float": float, "str": str}[f.type]
        parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=CHOICES.get(f.name), help=help_text)


def from_args(args: argparse.Namespace) -> TrainConfig:
    values = given(args)
    return resolve(values.pop("profile", DEFAULT_PROFILE), **values)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command line set, and nothing else (a resumed run applies just these)."""
    names = {f.name for f in fields(TrainConfig)} - {"min_workers", "workers"}
    values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.workers is not None:
        values["min_workers"], values["workers"] = args.workers
    return values


def resumed(recorded: dict[str, Any], given: dict[str, Any], resume: str) -> tuple[TrainConfig, list[str]]:
    """A stopped run's own config (`recorded`) with what the command line `given` may change on a
    resumed run applied; (the config, the flags applied). A flag that may not change, given with
    another value than the run's, is a ConfigError saying why."""
    refused = sorted(k for k, v in given.items() if k not in (*CHANGEABLE_ON_RESUME, "resume") and recorded.get(k) != v)
    if refused:
        shown = ", ".join(f"--{k.replace('_', '-')} (the run's: {recorded.get(k)!r})" for k in refused)
        raise ConfigError(
            f"{shown} cannot change on a resumed run: the data, the model and the recipe make it the run it is. "
            f"Start a new run (another --name) for that; --resume may change {', '.join(_flags(CHANGEABLE_ON_RESUME))}"
        )
    changes = {k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME and recorded.get(k) != v}
    return TrainConfig.from_dict({**recorded, **changes, "resume": resume}), sorted(changes)


def _flags(names) -> list[str]:
    return [f"--{n.replace('_', '-')}" for n in names if n != "min_workers"]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0")
    return value


def positive(text: str) -> float:
    """An argparse type: a number above 0."""
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def worker_range(text: str) -> tuple[int, int]:
    """--workers: "N" → (0, N), fixed; "MIN:MAX" → (MIN, MAX), elastic."""
    low, sep, high = text.partition(":")
    try:
        values = (int(low), int(high)) if sep else (0, int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN:MAX (e.g. 8, or 2:8)") from None
    if values[1] < 1 or (sep and not 1 <= values[0] <= values[1]):
        raise argparse.ArgumentTypeError(f"{text!r}: need N >= 1, or 1 <= MIN <= MAX")
    return values


def _profile_value(profile: str, name: str) -> Any:
    return PROFILES[profile].get(name, next(f.default for f in fields(TrainConfig) if f.name == name))
