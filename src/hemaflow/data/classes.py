"""The class matrix (``classes.yaml``): native labels -> fine classes -> coarse groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

__all__ = ["CLASSES_FILE", "ClassMatrix", "load_class_matrix"]

CLASSES_FILE = Path(__file__).with_name("classes.yaml")


@dataclass(frozen=True)
class ClassMatrix:
    coarse_of: dict[str, str]  # fine class -> coarse group
    sources: dict[str, dict[str, str | None]]  # vocabulary -> native label -> fine class or None

    def vocabulary(self, name: str) -> dict[str, str | None]:
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources))
            raise KeyError(f"no vocabulary {name!r} in {CLASSES_FILE.name}; known: {known}") from None

    @property
    def fine_classes(self) -> list[str]:
        return list(self.coarse_of)

    def coarse(self, labels: Iterable[str]) -> list[str]:
        """The coarse group of each label; a label that is no fine class (a group already, or empty)
        stays as it is."""
        return [self.coarse_of.get(label, label) for label in labels]


def parse_class_matrix(data: dict, origin: str = str(CLASSES_FILE)) -> ClassMatrix:
    """Validate the mapping: every source label must land on a declared fine class."""
    coarse_of = dict(data["fine"])
    sources = {name: dict(mapping) for name, mapping in data["sources"].items()}
    for name, mapping in sources.items():
        for label, fine in mapping.items():
            if fine is not None and fine not in coarse_of:
                raise ValueError(f"{origin}: sources.{name}.{label} maps to {fine!r}, which is not under 'fine:'")
    return ClassMatrix(coarse_of, sources)


@cache
def load_class_matrix(path: Path = CLASSES_FILE) -> ClassMatrix:
    return parse_class_matrix(yaml.safe_load(path.read_text()), str(path))
