"""Shared by the study commands: find the study a command refers to."""

from __future__ import annotations

from pathlib import Path

import optuna

from pxopt.errors import StorageError


def default_study_name() -> str:
    """The name in studies/default.toml (or the built-in default)."""
    from pxopt.cli.search_cmd import find_default_spec
    from pxopt.search.spec import StudySpec

    path = find_default_spec()
    return StudySpec.from_toml(path).name if path else StudySpec().name


def load_study(study: str | None, storage: str | None, out_dir: Path = Path("studies")) -> tuple[optuna.Study, str]:
    """Open an existing study: `--storage` or `<out_dir>/<study>.db`; error if missing."""
    from pxopt.search.storage import require_existing
    from pxopt.search.study import open_storage

    name = study or default_study_name()
    if storage is None:
        path = (out_dir / f"{name}.db").resolve()
        if not path.is_file():
            raise StorageError(f"no study file {str(path)!r}: run `pxopt search` first or pass --storage")
        storage = str(path)
    require_existing(storage)  # opening a missing SQLite file would create an empty study database
    backend = open_storage(storage)
    try:
        loaded = optuna.load_study(study_name=name, storage=backend)
    except KeyError:
        names = optuna.study.get_all_study_names(backend)
        raise StorageError(f"study {name!r} not found in the storage (it holds: {names or 'none'})") from None
    return loaded, storage
