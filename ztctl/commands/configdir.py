"""A config folder (what ztd serves with --config-dir), loaded and translated exactly as ztd does, for the
offline commands (`x authz check`, `ztunnel-config --config-dir`): one set of loading and error lines."""

from __future__ import annotations

import os
from pathlib import Path

from ztcore.mesh.registry.files import read_dir
from ztcore.mesh.registry.store import RegistrySnapshot
from ztcore.mesh.translate import TranslateOptions, Translation, translate
from ztcore.model.authz import Authorization
from ztcore.model.workload import Workload
from ztctl.errors import CliError


class ConfigDirSource:
    """The folder ztd would serve with --config-dir, translated exactly as ztd translates it."""

    def __init__(self, path: Path, options: TranslateOptions) -> None:
        self._path = path
        self._snapshot = _load(path)
        self._translation: Translation = translate(self._snapshot, options)

    def describe(self) -> str:
        return str(self._path)

    @property
    def translation(self) -> Translation:
        return self._translation

    def policies(self) -> tuple[Authorization, ...]:
        return self._translation.authorizations

    def pod_workload(self, namespace: str, name: str) -> Workload:
        workload = self._translation.pod_workload(namespace, name)
        if workload is not None:
            return workload
        pod = self._snapshot.pod(namespace, name)
        if pod is None:
            raise CliError(f"pod {namespace}/{name} is not in {self._path}")
        why = f"phase {pod.phase}" if pod.phase in ("Failed", "Succeeded") else "no pod IP"
        raise CliError(f"pod {namespace}/{name} has no workload ({why}), so ztunnel knows no such destination")


def _load(path: Path) -> RegistrySnapshot:
    try:
        os.listdir(path)  # os.walk would skip an unreadable folder silently
        result = read_dir(path)
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from None
    if result.errors:
        more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
        raise CliError(f"{path} has errors, first: {result.errors[0]}{more}")
    return RegistrySnapshot(result.objects)
