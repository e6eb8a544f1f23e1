"""What a scored cell of the study is: :class:`CellLabel` (a method's top k, the sign control, or one draw of a
registered null), written ``ipg|k16`` / ``push3|k16`` in ``scores.json`` and the cells' names."""

from __future__ import annotations

from dataclasses import dataclass

from .nulls import labels

SIGN_CONTROL = "ipg_bottom"  # IPG's bottom k: the label of the sign control's cells


@dataclass(frozen=True)
class CellLabel:
    """What a scored cell is: a method's (or the sign control's) top ``k``, or draw ``draw`` of a null at ``k``.
    Written as ``<name>[<draw>]|k<k>`` in ``scores.json`` (``ipg|k16``, ``push3|k16``, ``null0|k4``), where
    ``name`` is the method or the null's label prefix (:mod:`.nulls`)."""

    name: str
    k: int
    draw: int | None = None

    @property
    def set(self) -> str:
        """The set's name without its size: ``push3``, ``ipg``."""
        return f"{self.name}{'' if self.draw is None else self.draw}"

    def __str__(self) -> str:
        return f"{self.set}|k{self.k}"

    @classmethod
    def parse(cls, text: str) -> "CellLabel":
        head, _, k = text.rpartition("|k")
        for prefix in labels().values():  # a null's draw: its prefix then digits only
            if head.startswith(prefix) and head[len(prefix):].isdigit():
                return cls(prefix, int(k), int(head[len(prefix):]))
        return cls(head, int(k))


def null_labels(cells: dict, kind: str, k: int | None) -> list[str]:
    """The labels of one null's cells at ``k`` (at every k when None), in draw order (the order they were scored)."""
    prefix = labels()[kind]
    parsed = ((label, CellLabel.parse(label)) for label in cells)
    return [label for label, p in parsed if p.name == prefix and p.draw is not None and (k is None or p.k == k)]
