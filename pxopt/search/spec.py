"""Study specs: one declarative TOML file per model and task (`studies/*.toml`).

A spec holds everything that defines a study (model, task, components, rates, budget,
sampler, pruner, search-space narrowing), so a search is reproducible from the file and
the CLI flags only override fields of it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pxopt.errors import ConfigError
from pxopt.vocab import (
    AUTO_COMPONENTS,
    COMPONENTS,
    DEFAULT_GROUPING,
    DEFAULT_N_HELDOUT,
    DEFAULT_RATES,
    GROUPINGS,
    LEGACY_GROUPING,
    check_choice,
    check_rates,
)

__all__ = ["AUTO_COMPONENTS", "COMPONENTS", "DEFAULT_RATES", "StudySpec", "check_rates", "json_safe"]

STUDIES_DIR = Path("studies")
# re-scoring before naming the best (measured: README, "Naming the best trial")
DEFAULT_RESCORE_TOP = 5
DEFAULT_RESCORE_SETS = 2

# TOML table -> fields of StudySpec that it may hold.
_TABLES: dict[str, tuple[str, ...]] = {
    "study": ("name", "trials", "timeout", "seed", "storage", "baselines", "rescore_top", "rescore_sets"),
    "model": ("model", "device", "threads"),
    "task": ("data", "classes", "n_ref", "n_val", "n_heldout", "task_seed", "batch_size"),
    "prune": ("components", "rates", "cap", "grouping"),
    "sampler": ("sampler",),
    "pruner": ("pruner",),
    "space": ("space",),
}
_RENAMES = {("model", "spec"): "model", ("task", "seed"): "task_seed"}


@dataclass
class StudySpec:
    """A study: what to prune, on which task, how long to search."""

    name: str = "default"
    model: str = "builtin:fmnist-resnet"
    data: str = "fashion-mnist"
    classes: int | list[int] | list[str] | None = None
    n_ref: int = 10
    n_val: int | None = 50
    # held-out images per task, never seen by the objective (pxopt.search.heldout; 0: none).
    # Not part of the identity: the validation images are the same with any held-out size.
    n_heldout: int = DEFAULT_N_HELDOUT
    task_seed: int = 0
    batch_size: int = 128
    components: str = AUTO_COMPONENTS  # or a key of COMPONENTS
    rates: list[float] = field(default_factory=lambda: list(DEFAULT_RATES))
    cap: float | None = None
    grouping: str = DEFAULT_GROUPING  # how hidden layers form the rule groups (pxopt.vocab.GROUPINGS)
    trials: int | None = 20
    timeout: float | None = None
    seed: int = 0
    storage: str | None = None
    device: str = "auto"
    threads: int | None = None
    baselines: bool = True
    # before one is named best, the rescore_top best trials and all-epsilon are re-scored on
    # rescore_sets other draws of reference and validation images (pxopt.search.naming; 0: name
    # the search's best).
    # Not part of the identity: naming reads the trials, it does not change them.
    rescore_top: int = DEFAULT_RESCORE_TOP
    rescore_sets: int = DEFAULT_RESCORE_SETS
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(
        default_factory=lambda: {"name": "median", "n_startup_trials": 4, "n_warmup_steps": 4}
    )
    space: dict = field(default_factory=dict)
    source: str | None = None  # the file it came from, if any

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> StudySpec:
        """Read a spec file; errors name the file and the field."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"study spec {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"study spec {str(p)!r} is not valid TOML: {exc}") from exc
        spec = cls.from_dict(raw, where=str(p))
        spec.source = str(p)
        return spec

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, where: str = "spec") -> StudySpec:
        """Nested tables (as in the TOML file) -> a validated spec."""
        values: dict[str, Any] = {}
        for table, content in raw.items():
            if table not in _TABLES:
                raise ConfigError(f"{where}: unknown table [{table}] (expected {sorted(_TABLES)})")
            if not isinstance(content, dict):
                raise ConfigError(f"{where}: [{table}] must be a table")
            if table in ("sampler", "pruner", "space"):
                values[table] = dict(content)
                continue
            for key, value in content.items():
                name = _RENAMES.get((table, key), key)
                if name not in _TABLES[table]:
                    raise ConfigError(f"{where}: unknown key {table}.{key}")
                values[name] = value
        return cls(**values).validated()

    def with_overrides(self, **overrides: Any) -> StudySpec:
        """A copy with the given (non-None) fields replaced, e.g. from CLI flags."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown study field {sorted(unknown)[0]!r}")
        return dataclasses.replace(self, **changes).validated()

    # -- checks ---------------------------------------------------------------------------
    def validated(self) -> StudySpec:
        """Check every field; raise `ConfigError` naming the first bad one."""
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError(f"study.name must be a plain name, got {self.name!r}")
        if self.components not in (*COMPONENTS, AUTO_COMPONENTS):
            raise ConfigError(
                f"prune.components must be one of {[*sorted(COMPONENTS), AUTO_COMPONENTS]}, "
                f"got {self.components!r}"
            )
        self.rates = check_rates(self.rates)
        check_choice(self.grouping, GROUPINGS, "prune.grouping")
        for name in ("n_ref", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"task.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_val is not None and (not isinstance(self.n_val, int) or self.n_val < 1):
            raise ConfigError(f"task.n_val must be a positive integer, got {self.n_val!r}")
        if not isinstance(self.n_heldout, int) or isinstance(self.n_heldout, bool) or self.n_heldout < 0:
            raise ConfigError(f"task.n_heldout must be an integer >= 0 (0: no held-out split), got {self.n_heldout!r}")
        for name in ("rescore_top", "rescore_sets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"study.{name} must be an integer >= 0 (0: no re-scoring), got {value!r}")
        if self.trials is not None and (not isinstance(self.trials, int) or self.trials < 1):
            raise ConfigError(f"study.trials must be a positive integer, got {self.trials!r}")
        if self.timeout is not None and not (float(self.timeout) > 0):
            raise ConfigError(f"study.timeout must be > 0 seconds, got {self.timeout!r}")
        if isinstance(self.classes, int) and not isinstance(self.classes, bool) and self.classes < 1:
            raise ConfigError(f"task.classes must be >= 1, got {self.classes!r}")
        if self.cap is not None and not 0 < float(self.cap) <= 1:
            raise ConfigError(f"prune.cap must be in (0, 1], got {self.cap!r}")
        if "name" in self.pruner and self.pruner["name"] not in PRUNERS:
            raise ConfigError(f"pruner.name must be one of {sorted(PRUNERS)}, got {self.pruner['name']!r}")
        if self.sampler.get("name", "tpe") not in SAMPLERS:
            raise ConfigError(f"sampler.name must be one of {sorted(SAMPLERS)}, got {self.sampler['name']!r}")
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """Layer kinds (`pxopt.layers`) whose components are pruned ("auto": resolve first)."""
        if self.components not in COMPONENTS:
            raise ConfigError(f"prune.components {self.components!r} is decided by the model: load it first")
        return COMPONENTS[self.components]

    def storage_url(self, base_dir: str | Path = STUDIES_DIR) -> str:
        """The storage: the spec's URL or path, else `<base_dir>/<name>.db` (SQLite)."""
        if self.storage:
            if "://" in self.storage:
                return self.storage
            return f"sqlite:///{Path(self.storage).expanduser().resolve()}"
        path = (Path(base_dir) / f"{self.name}.db").resolve()  # its folder is made on first write
        return f"sqlite:///{path}"

    def identity(self) -> dict[str, Any]:
        """What must not change when a study is resumed (model, task, components, rates,
        grouping).

        The grouping enters only when it is not "count", the grouping of every study made
        before the option existed, so those studies keep their identity (and resume with
        `grouping = "count"`), while a stage-grouped study never mixes with them.
        """
        out = {
            "model": self.model,
            "data": str(self.data),
            "classes": self.classes,
            "n_ref": self.n_ref,
            "n_val": self.n_val,
            "task_seed": self.task_seed,
            "components": self.components,
            "rates": list(self.rates),
        }
        if self.grouping != LEGACY_GROUPING:
            out["grouping"] = self.grouping
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe copy (stored with the study)."""
        return json_safe(dataclasses.asdict(self))


PRUNERS = ("median", "percentile", "halving", "hyperband", "none")
SAMPLERS = ("tpe", "gp", "random")


def json_safe(value: Any) -> Any:
    """Tuples -> lists, Paths -> str, so the value round-trips through JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
