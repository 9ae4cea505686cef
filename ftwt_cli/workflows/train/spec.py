"""What a run is: the resolved configuration, its run kind and where it starts from; saved as config.json.

The run kind (``dense``, ``ftwt``, ``static``, ``signature``; see :mod:`.kinds`) is explicit, and a
``--target-flops`` search has chosen r before the run is built (:func:`ftwt_cli.workflows.train.train`),
so ``config.json`` is written once, complete, before the first epoch.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ftwt_cli.errors import BadInput
from ftwt_cli.io.config import Config, check_target_flops
from ftwt_cli.io.config import validate as validate_config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
LAYERS_FILE = "layers.csv"
LAST_FILE = "last.pt"
BEST_FILE = "best.pt"

#: Run kinds whose recipe is the profile's ``[dense]`` one; the others fine-tune with the dynamic recipe.
DENSE_RECIPE_KINDS = ("dense",)
#: Run kinds without decision heads (trained on cross-entropy alone; r means nothing for them).
PLAIN_KINDS = ("dense", "static")


@dataclass
class RunSpec:
    """Everything that defines a run; saved as config.json so that --resume can rebuild it."""

    config: Config
    kind: str  # a registered run kind: dense | ftwt | static | signature
    init: str | None = None  # the dense checkpoint a non-dense run starts from
    target_flops: float | None = None  # percent of FLOPs to remove; r is searched when set (ftwt)
    estimate: dict | None = None  # the search record: target, chosen_r, estimated_reduction_pct
    static: dict | None = None  # a static baseline: method, target_flops, init (and a signature's counts)
    signature: dict | None = None  # a predefined signature: {"source", "counts": {block conv: kept filters}}

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    @property
    def gated(self) -> bool:
        """Whether the run trains decision heads (an FTWT model)."""
        return self.kind not in PLAIN_KINDS

    @property
    def mode(self) -> str:
        return self.config.mode if self.gated else self.kind

    @property
    def epochs(self) -> int:
        return self.config.dense_epochs if self.kind in DENSE_RECIPE_KINDS else self.config.epochs

    @property
    def lr(self) -> float:
        return self.config.dense_lr if self.kind in DENSE_RECIPE_KINDS else self.config.lr

    @property
    def milestones(self) -> list[int]:
        return self.config.dense_milestones if self.kind in DENSE_RECIPE_KINDS else self.config.milestones

    def with_epochs(self, epochs: int) -> "RunSpec":
        """The same run trained up to ``epochs`` (``--resume --epochs``): the field of its own recipe."""
        field = "dense_epochs" if self.kind in DENSE_RECIPE_KINDS else "epochs"
        self.config = self.config.override(**{field: epochs})
        return self

    @property
    def r(self) -> float | None:
        return self.config.r if self.gated else None

    @property
    def freeze_epoch(self) -> int:
        """First epoch with frozen heads: ceil(F × epochs), so F = 1 never freezes and one epoch trains them."""
        return math.ceil(self.config.freeze_heads_after * self.epochs - 1e-9)

    @property
    def selected_on(self) -> str:
        """The split whose top-1 chooses best.pt."""
        return "val" if self.config.val_fraction > 0 else "test"

    def default_dir(self, now: datetime.datetime | None = None) -> Path:
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        ratio = f"-r{self.config.r:.4g}" if self.gated else ""
        return Path("runs") / f"{self.config.profile}-{self.mode}{ratio}-{stamp}"

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "kind": self.kind,
            "dense": self.dense,
            "mode": self.mode,
            "r": self.r,
            "init": self.init,
            "target_flops": self.target_flops,
            "estimate": self.estimate,
            "static": self.static,
            "signature": self.signature,
            "best_selected_on": self.selected_on,
        }

    @classmethod
    def from_dict(cls, doc: dict) -> "RunSpec":
        config = dict(doc["config"])
        config.setdefault("train_samples", config.get("samples", 0))  # runs from before train_samples existed
        kind = doc.get("kind") or _legacy_kind(doc)
        if "kind" not in doc and kind == "static":
            # Static runs from before run kinds trained with the dynamic recipe copied into the dense fields.
            config |= {"epochs": config["dense_epochs"], "lr": config["dense_lr"], "milestones": config["dense_milestones"]}
        init = doc.get("init") or (doc.get("static") or {}).get("init")  # static runs kept it in their record
        return cls(
            Config(**config), kind, init, doc.get("target_flops"), doc.get("estimate"), doc.get("static"),
            doc.get("signature"),
        )  # fmt: skip

    def check(self) -> None:
        """One-line BadInput for every inconsistent choice (before anything is loaded or written)."""
        validate_config(self.config)
        if self.epochs < 1:
            raise BadInput(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0 or (self.gated and self.config.head_lr <= 0):
            raise BadInput("--lr and --head-lr must be positive")
        if any(m < 1 for m in self.milestones):
            raise BadInput(f"--milestones must be positive epoch numbers, got {self.milestones}")
        if self.dense:
            if self.init is not None or self.target_flops is not None:
                raise BadInput("--dense trains the plain backbone; --init and --target-flops are for dynamic training")
            return
        if self.init is None:
            raise BadInput(
                "dynamic training needs --init with dense weights: an ftwt checkpoint or state_dict FILE, or torchvision; "
                f"train them with 'ftwt train --dense --model {self.config.model}'"
            )
        if self.target_flops is not None:
            check_target_flops(self.target_flops)


def _legacy_kind(doc: dict) -> str:
    """The run kind of a config.json written before kinds were recorded."""
    if doc.get("static") is not None:
        return "static"
    if doc.get("dense"):
        return "dense"
    return "signature" if doc.get("signature") is not None else "ftwt"


def parse_milestones(text: str) -> list[int]:
    """``80,120,150`` → [80, 120, 150]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--milestones must be comma-separated epoch numbers (80,120,150), got {text!r}") from None
    return sorted(values)


def read_spec(run_dir: Path) -> RunSpec:
    """The spec of an existing run directory (for --resume); one stopped before its first checkpoint holds
    config.json alone and is restarted from epoch 0 (see :func:`started`)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise BadInput(f"{run_dir} is not an ftwt run directory (no {CONFIG_FILE} and {LAST_FILE})")
    try:
        return RunSpec.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path} is not a valid run configuration: {exc}") from None


def started(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` saved a checkpoint to continue from (else it restarts at epoch 0)."""
    return (run_dir / LAST_FILE).is_file()


def prepare_dir(spec: RunSpec, out: str | None) -> Path:
    """The new run's directory (not created yet); refuses one that already holds a run."""
    run_dir = Path(out) if out else spec.default_dir()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise BadInput(f"{run_dir} already exists and is not empty (use --resume {run_dir} to continue it)")
    return run_dir
