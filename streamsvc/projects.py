"""Projects: folders under a root, named by ids that can never point outside it."""

from __future__ import annotations

from pathlib import Path

from .errors import UnknownProject

MAX_ID_CHARS = 200


class Projects:
    """The configured projects: each direct, non-hidden subfolder of `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, project_id: str) -> Path:
        """The project's folder; `UnknownProject` for anything that is not one, including
        ids that would resolve outside the root (`..`, absolute, a symlink out)."""
        if (
            not project_id
            or len(project_id) > MAX_ID_CHARS
            or project_id.startswith(".")
            or not project_id.isprintable()
            or any(c in project_id for c in "/\\\0")
        ):
            raise UnknownProject(project_id)
        root = self.root.resolve()
        try:
            folder = (root / project_id).resolve(strict=True)
        except (OSError, RuntimeError):
            raise UnknownProject(project_id) from None
        if folder.parent != root or not folder.is_dir():
            raise UnknownProject(project_id)
        return folder

    def ids(self) -> list[str]:
        try:
            entries = sorted(self.root.iterdir())
        except OSError:
            return []
        ids = []
        for entry in entries:
            try:
                self.resolve(entry.name)
            except UnknownProject:
                continue
            ids.append(entry.name)
        return ids
