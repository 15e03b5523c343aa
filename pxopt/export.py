"""The best (or a chosen) trial as a self-contained JSON file, and reading it back.

Format `pxopt.export/1`: everything needed to re-apply the configuration to the same
model and task (`pxopt prune --config`) and to check the result against the stored curve,
including the grouping that turned layers into rule groups (`grouping`, and the groups it
made, `layer_groups`, when the study recorded them), and `heldout`: the trial's and the
all-epsilon baseline's curves on the study's held-out images beside their search-split
areas (`pxopt.search.heldout.heldout_summary`), or `{"note": why there are none}`, and
`naming`: the re-scored candidates it was named best among (`pxopt.search.naming`), if it was.
Imports are validated field by field before use; nothing is ever unpickled.

`area` is `pxopt.evaluate.AREA_DEFINITION`, named in `area_definition`. Files of older
pxopt versions (no `area_definition`: their `area` was the plain trapezoid) are read with
the area recomputed from their curve, so every export in memory means the same thing.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pxopt.errors import ConfigError
from pxopt.evaluate import AREA_DEFINITION, curve_area
from pxopt.search.meta import library_versions
from pxopt.vocab import (
    AUTO_COMPONENTS,
    COMPONENTS,
    GROUPINGS,
    LEGACY_GROUPING,
    RANKINGS,
    check_choice,
    check_rates,
)

EXPORT_FORMAT = "pxopt.export/1"
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "rules": dict,
    "ranking": str,
    "components": str,
    "model": str,
    "task": dict,
    "curve": dict,
    "area": (int, float),
    "top_pr": (int, float),
    "trial": int,
    "versions": dict,
}
_TASK_KEYS = ("data", "classes", "n_ref", "n_val", "seed", "batch_size")


def pick_trial(study: optuna.Study, number: int | None = None) -> optuna.trial.FrozenTrial:
    """The trial named best (`pxopt.search.naming.named_trial`: after re-scoring, where the
    study has a current naming), or trial `number` (which must be complete)."""
    from pxopt.search.naming import named_trial

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"study {study.study_name!r} has no completed trial to export yet")
    if number is None:
        return named_trial(study)
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            if trial.state != TrialState.COMPLETE:
                raise ConfigError(f"trial {number} is {trial.state.name}, only complete trials can be exported")
            return trial
    raise ConfigError(f"study {study.study_name!r} has no trial {number} (it has {len(study.trials)})")


def export_trial(study: optuna.Study, number: int | None = None,
                 heldout: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trial -> `pxopt.export/1` dict (validated).

    `heldout`: the trial's held-out summary; None: the one stored in the study, if any
    (nothing is loaded here: `pxopt export` evaluates what is missing).
    """
    from pxopt.search.heldout import heldout_summary
    from pxopt.search.naming import stored_naming

    trial = pick_trial(study, number)
    if heldout is None:
        heldout = heldout_summary(study, trial)
    naming = stored_naming(study)
    spec = study.user_attrs.get("pxopt.spec", {})
    attrs = trial.user_attrs
    curve = attrs["curve"]
    data = {
        "format": EXPORT_FORMAT,
        "study": study.study_name,
        "trial": trial.number,
        "baseline": attrs.get("baseline"),
        "rules": attrs["rules"],
        "ranking": attrs["ranking"],
        "components": spec.get("components", "conv"),
        # how hidden layers formed the rule groups (studies made before the option: count)
        "grouping": spec.get("grouping", LEGACY_GROUPING),
        "layer_groups": study.user_attrs.get("pxopt.layer_groups"),
        "model": spec.get("model", ""),
        "task": {
            "data": spec.get("data"),
            "classes": spec.get("classes"),
            "n_ref": spec.get("n_ref"),
            "n_val": spec.get("n_val"),
            "seed": spec.get("task_seed", 0),
            "batch_size": spec.get("batch_size", 128),
            "description": study.user_attrs.get("pxopt.task_description"),
        },
        "curve": {"rates": curve["rates"], "accuracies": curve["accuracies"]},
        # from the curve, not trial.value: the same number for studies of older pxopt versions
        "area": curve_area(curve["rates"], curve["accuracies"]),
        "area_definition": AREA_DEFINITION,
        "top_pr": float(curve["top_pr"]),
        "seeds": attrs.get("seeds", {}),
        "heldout": heldout,
        # how the trial was named best (re-scored candidates), when it was
        "naming": naming if naming is not None and naming["named"] == trial.number else None,
        "versions": attrs.get("versions") or library_versions(),
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return validate_export(data)


def validate_export(data: Any) -> dict[str, Any]:
    """Check an export's structure and content; raise `ConfigError` naming the field."""
    if not isinstance(data, dict):
        raise ConfigError("export must be a JSON object")
    if data.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"format: expected {EXPORT_FORMAT!r}, got {data.get('format')!r}")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise ConfigError(f"export lacks field {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ConfigError(f"{key}: wrong type {type(data[key]).__name__}")
    check_choice(data["ranking"], RANKINGS, "ranking")
    check_choice(data["components"], (*COMPONENTS, AUTO_COMPONENTS), "components")
    # exports written before the grouping option used the count grouping
    data.setdefault("grouping", LEGACY_GROUPING)
    check_choice(data["grouping"], GROUPINGS, "grouping")
    groups = data.get("layer_groups")
    if groups is not None and not (
            isinstance(groups, dict)
            and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in groups.values())):
        raise ConfigError("layer_groups: expected an object mapping group -> list of layer names")
    if not data["model"]:
        raise ConfigError("model: empty model spec")
    missing = [k for k in _TASK_KEYS if k not in data["task"]]
    if missing:
        raise ConfigError(f"task lacks {missing[0]!r}")
    curve = data["curve"]
    try:
        rates = check_rates(curve["rates"])
        accuracies = [float(a) for a in curve["accuracies"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"curve: {exc}") from exc
    if len(rates) != len(accuracies) or not all(0.0 <= a <= 1.0 for a in accuracies):
        raise ConfigError("curve: accuracies must match the rates and lie in [0, 1]")
    if not math.isfinite(data["area"]):
        raise ConfigError("area must be finite")
    area = curve_area(rates, accuracies)
    if "area_definition" not in data:  # an older pxopt's file: its area was the trapezoid
        data["area"] = area
        data["area_definition"] = AREA_DEFINITION
        data.pop("area_normalised", None)
    elif abs(float(data["area"]) - area) > 1e-6:
        raise ConfigError(f"area: {data['area']} is not the mean accuracy of the curve ({area:.6f})")
    _validate_rules(data["rules"])
    if data.get("heldout") is not None:
        _validate_heldout(data["heldout"])
    naming = data.get("naming")
    if naming is not None and not (isinstance(naming, dict) and naming.get("named") == data["trial"]
                                   and isinstance(naming.get("candidates"), list)):
        raise ConfigError("naming: expected the re-scored candidates of the trial named best")
    return data


def _validate_heldout(held: Any) -> None:
    """`heldout`: a note, or rows whose curves and areas agree (files before it: absent)."""
    if not isinstance(held, dict):
        raise ConfigError("heldout: expected an object")
    for name, row in (held.get("rows") or {}).items():
        try:
            for kind in ("search", "heldout"):
                curve = row[f"{kind}_curve"]
                rates = check_rates(curve["rates"])
                accuracies = [float(a) for a in curve["accuracies"]]
                if len(rates) != len(accuracies) or not all(0.0 <= a <= 1.0 for a in accuracies):
                    raise ValueError("accuracies must match the rates and lie in [0, 1]")
                if abs(float(row[f"{kind}_area"]) - curve_area(rates, accuracies)) > 1e-6:
                    raise ValueError(f"{kind}_area is not the mean accuracy of {kind}_curve")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"heldout.rows.{name}: {exc}") from exc


def _validate_rules(rules: dict[str, Any]) -> None:
    """The rules must parse as `pxopt.rules/1` (the LRP package's own validator)."""
    if rules.get("format") != "pxopt.rules/1":
        raise ConfigError(f"rules.format: expected 'pxopt.rules/1', got {rules.get('format')!r}")
    try:
        from pxopt.lrp import RuleConfig
    except ImportError:  # LRP engine not installed in this checkout: structure check only
        if not isinstance(rules.get("groups"), dict):
            raise ConfigError("rules.groups must be an object") from None
        return
    try:
        RuleConfig.from_dict(rules)
    except ValueError as exc:  # ConfigError is a ValueError too
        raise ConfigError(f"rules: {exc}") from exc


def write_export(data: dict[str, Any], path: str | Path) -> Path:
    """Write an export as pretty JSON; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(validate_export(data), indent=2) + "\n", encoding="utf-8")
    return out


def read_export(path: str | Path) -> dict[str, Any]:
    """Read and validate an export file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {exc}") from exc
    return validate_export(data)
