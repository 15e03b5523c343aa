"""Bad input through the real `pxopt` CLI, table-driven.

Every row gives either one `error:` line with exit code 2 (no traceback), or a trial that
fails with its reason while the search goes on. After every row, the shared study that
an earlier good search filled is still readable, with all its trials unchanged.

Rows marked `fake` run the search with the fake pipeline of the search tests (the error
is caught before any model work, or in the search layer itself). The other rows use the
real model, data, LRP and pruning code on tiny models and folders built here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_fakes import FakePipeline

import pxopt.pipeline
from pxopt.cli import main
from pxopt.search.storage import open_storage

GOOD_MODEL = "builtin:tiny"


@dataclass(frozen=True)
class Row:
    name: str
    args: list[str]  # {db}, {dir} are filled in
    expect: str  # regex on the one error line, or on the failed trial's fail_reason
    kind: str = "error"  # "error" (exit 2, one line) or "failed-trial" (exit 0, a FAIL trial)
    fake: bool = True  # run with the fake pipeline (no real model or data needed)


def _export(tmp: Path, name: str, **rules_changes) -> str:
    """A valid pxopt.export/1 file with its rules changed (the rules JSON under test)."""
    rules = {"format": "pxopt.rules/1",
             "groups": {g: {"rule": "epsilon", "epsilon": 1e-6} for g in ("input", "low", "mid", "high", "fc")}}
    for key, value in rules_changes.items():
        if key == "format":
            rules["format"] = value
        else:
            rules["groups"][key] = value
    data = {
        "format": "pxopt.export/1", "study": "good", "trial": 0, "rules": rules, "ranking": "abs",
        "components": "conv", "model": GOOD_MODEL,
        "task": {"data": "fashion-mnist", "classes": 3, "n_ref": 2, "n_val": 4, "seed": 0, "batch_size": 8},
        "curve": {"rates": [0.0, 0.5], "accuracies": [0.9, 0.5]}, "area": 0.35, "top_pr": 0.0,
        "versions": {},
    }
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def _space_spec(tmp: Path, name: str, space: str, *, model: str = GOOD_MODEL) -> str:
    path = tmp / f"{name}.toml"
    path.write_text(f"""
[study]
name = "{name}"
trials = 2
baselines = false
[model]
spec = "{model}"
[task]
data = "fashion-mnist"
classes = 3
n_ref = 2
n_val = 4
[prune]
rates = [0.0, 0.5]
[sampler]
name = "random"
[space]
{space}
""")
    return str(path)


ROWS: list[Row] = [
    Row("rates-above-one", ["search", "--storage", "{db}", "--study", "r1", "--model", GOOD_MODEL,
                            "--rates", "0,0.5,1.2"], r"rates must lie in \[0, 1\)"),
    Row("rates-negative", ["search", "--storage", "{db}", "--study", "r2", "--model", GOOD_MODEL,
                           "--rates", "-0.1,0.5"], r"rates must lie in \[0, 1\)"),
    Row("rates-not-increasing", ["search", "--storage", "{db}", "--study", "r3", "--model", GOOD_MODEL,
                                 "--rates", "0,0.5,0.3"], r"rates must be strictly increasing"),
    Row("workers-zero", ["search", "--storage", "{db}", "--study", "good", "--model", GOOD_MODEL,
                         "--workers", "0"], r"--workers must be >= 1, got 0"),
    Row("storage-unreachable", ["search", "--storage", "postgresql://pxopt:secret@127.0.0.1:1/pxopt",
                                "--study", "good", "--model", GOOD_MODEL],
        r"cannot open storage 'postgresql\+psycopg2?://pxopt:\*\*\*@127\.0\.0\.1:1/pxopt': .*refused"),
    Row("storage-bad-url", ["search", "--storage", "nosuchdb://x@y/z", "--study", "good",
                            "--model", GOOD_MODEL], r"cannot open storage 'nosuchdb://x@y/z'"),
    Row("storage-not-a-database", ["search", "--storage", "{dir}/garbage.json", "--study", "good",
                                   "--model", GOOD_MODEL], r"cannot open storage '.*garbage\.json': file is not a database"),
    Row("study-of-another-model", ["search", "--storage", "{db}", "--study", "good",
                                   "--model", "builtin:other", "--trials", "6"],
        r"study 'good' was created for model 'builtin:tiny', not 'builtin:other': use another --study name"),
    Row("study-of-another-task", ["search", "--storage", "{db}", "--study", "good", "--model", GOOD_MODEL,
                                  "--n-ref", "7", "--trials", "6", "--rates", "0,0.25,0.5,0.75"],
        r"study 'good' was created for another task \(n_ref: stored \d+, now 7\): use another --study"),
    Row("rules-unknown-format", ["prune", "--config", "{dir}/fmt.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"rules.format: expected 'pxopt.rules/1', got 'pxopt.rules/9'"),
    Row("rules-unknown-rule", ["prune", "--config", "{dir}/rule.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"rules: .*(unknown|not a known|invalid).*rule.*teleport|rules: .*teleport"),
    Row("rules-negative-epsilon", ["prune", "--config", "{dir}/neg.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"rules: .*groups\.mid\.epsilon"),
    Row("rules-not-json", ["prune", "--config", "{dir}/garbage.json", "--rate", "0.5", "--out", "{dir}/o.pt"],
        r"is not valid JSON"),
    Row("space-negative-epsilon", ["search", "--storage", "{db}", "--spec", "{dir}/negspace.toml"],
        r"space\.low\.epsilon must be > 0"),
    # --- real model, data and LRP (tiny checkpoints and folders built by the fixture) ---
    Row("model-unknown-kind", ["search", "--storage", "{db}", "--study", "m1", "--model", "nosuch:thing"],
        r"unknown model spec kind 'nosuch'", fake=False),
    Row("model-unknown-torchvision", ["search", "--storage", "{db}", "--study", "m2",
                                      "--model", "torchvision:resnet5000"],
        r"unknown torchvision model 'resnet5000'", fake=False),
    Row("data-missing-folder", ["search", "--storage", "{db}", "--study", "d1", "--model", "{real}",
                                "--data", "{dir}/nowhere"], r"dataset '.*nowhere' is neither", fake=False),
    Row("data-empty-folder", ["search", "--storage", "{db}", "--study", "d2", "--model", "{real}",
                              "--data", "{dir}/empty"], r"empty has no class folders \(expected <root>/\[train\|val\]",
        fake=False),
    Row("data-class-below-n-ref", ["search", "--storage", "{db}", "--study", "d3", "--model", "{real}",
                                   "--data", "{dir}/imgs", "--n-ref", "3", "--n-val", "1"],
        r"n_ref=3 but class 'c' .*only 1 images", fake=False),
    Row("checkpoint-corrupted", ["search", "--storage", "{db}", "--study", "c1",
                                 "--model", "file:{dir}/corrupt.pth@builtin:fmnist-resnet"],
        r"cannot read checkpoint .*corrupt\.pth", fake=False),
    Row("checkpoint-other-architecture", ["search", "--storage", "{db}", "--study", "c2",
                                          "--model", "file:{dir}/vgg.pth@builtin:fmnist-resnet"],
        r"vgg\.pth does not fit the architecture: .*missing keys", fake=False),
    Row("checkpoint-pickled-code", ["search", "--storage", "{db}", "--study", "c4",
                                    "--model", "file:{dir}/pickled.pth@builtin:fmnist-resnet"],
        r"^error: checkpoint \S*pickled\.pth holds pickled code \(pxopt\.models\.builtin\.archs\.FmnistResNet\), "
        r"not a plain state dict; pxopt loads checkpoints with weights_only=True and will not run it", fake=False),
    Row("checkpoint-missing", ["search", "--storage", "{db}", "--study", "c3",
                               "--model", "file:{dir}/absent.pth@builtin:fmnist-resnet"],
        r"checkpoint file .*absent\.pth does not exist", fake=False),
    Row("study-of-another-model-real", ["search", "--storage", "{db}", "--study", "good", "--model", "{real}",
                                        "--classes", "3", "--n-ref", "2", "--n-val", "4", "--trials", "6"],
        r"study 'good' was created for model 'builtin:tiny', not 'file:.*good\.pth@builtin:fmnist-resnet'",
        fake=False),
    Row("model-regnet-unsupported", ["search", "--storage", "{db}", "--study", "rn",
                                     "--model", "file:{dir}/regnet.pth@torchvision:regnet_x_400mf",
                                     "--data", "{dir}/imgs", "--class-names", "a,b", "--n-ref", "1",
                                     "--n-val", "1", "--rates", "0,0.5"],
        r"operation 'add' after layer 'trunk_output\.block\d\.block\d-\d+\.f\.c\.0' in the model's "
        r"forward is not inside a layer with an LRP rule", fake=False),
    Row("epsilon-too-small-nan", ["search", "--storage", "{db}", "--spec", "{dir}/tinyeps.toml",
                                  "--no-report", "--out-dir", "{dir}/out"],
        r"^NonFiniteRelevanceError: relevances became NaN or infinite", kind="failed-trial", fake=False),
    Row("prune-rate-one", ["prune", "--config", "{dir}/ok.json", "--rate", "1.0", "--out", "{dir}/o.pt"],
        r"--rate must be in \[0, 1\), got 1\.0"),
]


def _real_files(tmp: Path) -> None:
    """Checkpoints of the built-in ResNet architecture (no training) and image folders.

    `zeroed.pth` has one conv layer with zero weights (as after heavy pruning): its
    pre-activations are exactly 0, so only the epsilon stabiliser keeps LRP finite there.
    `regnet.pth`: torchvision regnet_x_400mf without pretrained weights (an unsupported
    family: its residual addition has no rule).
    """
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from pxopt.models.builtin.archs import FmnistResNet, fmnist_vgg

    torch.manual_seed(0)
    model = FmnistResNet()
    torch.save(model.state_dict(), tmp / "good.pth")
    with torch.no_grad():
        model.layer2[0].conv1.weight.zero_()
    torch.save(model.state_dict(), tmp / "zeroed.pth")
    torch.save(fmnist_vgg().state_dict(), tmp / "vgg.pth")
    torch.save(torchvision.models.regnet_x_400mf(weights=None).state_dict(), tmp / "regnet.pth")
    torch.save(FmnistResNet(), tmp / "pickled.pth")  # the whole module, pickled: code, not weights
    (tmp / "corrupt.pth").write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    rng = np.random.default_rng(0)
    for cls, n in (("a", 5), ("b", 5), ("c", 1)):
        folder = tmp / "imgs" / cls
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp / "empty").mkdir()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A storage with a good study (6 finished trials) and the bad files of the table."""
    tmp = tmp_path_factory.mktemp("bad")
    db = str(tmp / "shared.db")
    _export(tmp, "ok")
    _export(tmp, "fmt", format="pxopt.rules/9")
    _export(tmp, "rule", low={"rule": "teleport"})
    _export(tmp, "neg", mid={"rule": "epsilon", "epsilon": -1e-3})
    (tmp / "garbage.json").write_text("{not json")
    _space_spec(tmp, "negspace", 'low = { rules = ["epsilon"], epsilon = -1e-3 }')
    _real_files(tmp)
    tiny = "\n".join(f'{g} = {{ rules = ["epsilon"], epsilon = 1e-300 }}'
                     for g in ("low", "mid", "high", "fc"))
    _space_spec(tmp, "tinyeps", 'ranking = ["abs"]\n' + tiny, model=f"file:{tmp}/zeroed.pth@builtin:fmnist-resnet")
    mp = pytest.MonkeyPatch()
    mp.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    try:
        code = _exit_code(["search", "--storage", db, "--study", "good", "--model", GOOD_MODEL,
                           "--trials", "6", "--rates", "0,0.25,0.5,0.75", "--no-report",
                           "--out-dir", str(tmp / "out")])
        assert code == 0
    finally:
        mp.undo()
    return {"db": db, "dir": str(tmp), "real": f"file:{tmp}/good.pth@builtin:fmnist-resnet"}


def _exit_code(args: list[str]) -> int:
    """Run the real entry point; its exit status (0 when it returns normally)."""
    try:
        main(args)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return 0


def _good_trials(db: str) -> list[tuple]:
    study = optuna.load_study(study_name="good", storage=open_storage(db, heartbeat_interval=None))
    return [(t.number, t.state, t.value, t.params) for t in study.trials]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row: Row, world: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    before = _good_trials(world["db"])
    assert len(before) == 6 and all(s == TrialState.COMPLETE for _, s, _, _ in before)
    if row.fake:
        monkeypatch.setattr(pxopt.pipeline.Pipeline, "from_spec", FakePipeline.from_spec)
    monkeypatch.chdir(world["dir"])
    args = [a.format(**world) for a in row.args]
    capsys.readouterr()
    code = _exit_code(args)
    err = capsys.readouterr().err
    if row.kind == "error":
        assert code == 2, err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
        assert re.search(row.expect, lines[0]), lines[0]
        assert "secret" not in err
    else:  # the run ends normally; its trials failed with the reason recorded
        assert code == 0, err
        name = re.search(r"--spec \S+/(\w+)\.toml", " ".join(args)).group(1)
        study = optuna.load_study(study_name=name, storage=open_storage(world["db"], heartbeat_interval=None))
        assert study.trials and all(t.state == TrialState.FAIL for t in study.trials)
        assert all(re.search(row.expect, t.user_attrs["fail_reason"]) for t in study.trials)
        assert "Traceback" not in err
    assert _good_trials(world["db"]) == before  # the earlier study is untouched and readable


def test_the_table_covers_the_issue() -> None:
    names = {r.name for r in ROWS}
    assert len(names) == len(ROWS) >= 12


def test_resuming_with_other_weights_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """The spec names the same file, but the file now holds another network: no mixing."""
    import torch

    from pxopt.models.builtin.archs import FmnistResNet

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "net.pth"
    torch.manual_seed(0)
    torch.save(FmnistResNet().state_dict(), ckpt)
    args = ["search", "--storage", str(tmp_path / "s.db"), "--study", "w", "--model", f"file:{ckpt}@builtin:fmnist-resnet",
            "--classes", "3", "--n-ref", "2", "--n-val", "4", "--rates", "0,0.5", "--no-report",
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert _exit_code([*args, "--trials", "1"]) == 0
    assert _exit_code([*args, "--trials", "2"]) == 0  # same weights: resumes
    torch.manual_seed(1)
    torch.save(FmnistResNet().state_dict(), ckpt)
    capsys.readouterr()
    assert _exit_code([*args, "--trials", "3"]) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.endswith(lines[0]), err
    assert re.search(r"^error: study 'w' was made with other weights of model 'file:.*net\.pth@builtin:fmnist-resnet' "
                     r"\(fingerprint \w+, now \w+; the model was retrained or its checkpoint changed\)", lines[0]), err
    study = optuna.load_study(study_name="w", storage=open_storage(str(tmp_path / "s.db"), heartbeat_interval=None))
    assert len(study.trials) == 2
