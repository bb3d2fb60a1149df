"""The two hypergradients that need no linear solve: backprop through the inner loop, and its
first-order approximation (drop every second derivative: d w_T / d phi treated as identity)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Unroll", "unroll", "first_order"]


@dataclass(frozen=True)
class Unroll:
    """Differentiate through the inner loop. ``first_order=True`` detaches inner gradients
    (FOMAML; the LSTM optimizer's "drop second derivatives")."""

    first_order: bool = False

    @property
    def name(self) -> str:
        return "first_order" if self.first_order else "unroll"

    kind = "unroll"


def unroll() -> Unroll:
    """Second-order: exact gradient of the outer loss through every inner step."""
    return Unroll(first_order=False)


def first_order() -> Unroll:
    """First-order: inner gradients are constants to the outer derivative."""
    return Unroll(first_order=True)
