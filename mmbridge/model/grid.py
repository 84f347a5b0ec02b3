"""Where an encoder's features lie: :class:`FeatureGrid`, the one value every bridge and strategy reads a layout from.

A vision encoder turns one input of ``height × width`` pixels into ``N`` feature tokens. Most of them lie on a
grid of ``rows × cols`` cells in row-major order (a ViT's patches, a CNN's last feature map); some encoders also
keep tokens that have no cell (CLIP's CLS token when ``select: full``), and some give a plain sequence with no
spatial layout at all. The encoder says which (:meth:`~mmbridge.model.vision.base.VisionEncoder.feature_layout`),
and a bridge answers, for that grid, how many tokens it returns and where they lie
(:meth:`~mmbridge.model.bridges.base.Bridge.num_tokens`, :meth:`~mmbridge.model.bridges.base.Bridge.token_grid`).
Nothing else guesses a grid from a token count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureGrid:
    """``rows × cols`` cells in row-major order after ``extra`` tokens that have no cell.

    ``FeatureGrid(7, 7)``: a 7×7 map (49 tokens). ``FeatureGrid(24, 24, extra=1)``: a CLS token, then 24×24
    patches. ``FeatureGrid.sequence(16)``: 16 tokens with no spatial layout.
    """

    rows: int
    cols: int
    extra: int = 0

    def __post_init__(self) -> None:
        if min(self.rows, self.cols, self.extra) < 0 or (self.rows == 0) != (self.cols == 0):
            raise ValueError(f"a feature grid has rows and cols both >= 1 (or both 0) and extra >= 0, got {self}")
        if self.count < 1:
            raise ValueError("a feature grid holds at least one token")

    @classmethod
    def sequence(cls, count: int) -> "FeatureGrid":
        """``count`` tokens with no spatial layout."""
        return cls(0, 0, extra=count)

    @property
    def count(self) -> int:
        """Tokens in all: the cells and the extra tokens."""
        return self.rows * self.cols + self.extra

    @property
    def spatial(self) -> bool:
        """True when every token is a cell of the grid."""
        return self.rows > 0 and self.extra == 0

    def cells(self, who: str, count: int | None = None) -> tuple[int, int]:
        """``(rows, cols)``; a ``ValueError`` naming ``who`` when some tokens are not cells of a grid, or when
        ``count`` (the features a call holds) is not the grid's."""
        if not self.spatial:
            raise ValueError(f"{who} needs the encoder's features on a grid, but they are {self.describe()}")
        if count is not None and count != self.count:
            raise ValueError(f"{who}: the features hold {count} tokens but the grid {self.rows}x{self.cols} has "
                             f"{self.count}")
        return self.rows, self.cols

    def describe(self) -> str:
        """Human words for the layout, for error messages."""
        if self.rows == 0:
            return f"{self.count} tokens with no grid"
        if self.extra:
            return f"{self.count} tokens ({self.extra} without a cell, then a {self.rows}x{self.cols} grid)"
        return f"a {self.rows}x{self.cols} grid"
