"""metalab.hypergrad: hypergradients of bilevel problems, usable without the trainer."""
from metalab.hypergrad.unroll import Unroll, first_order, unroll

__all__ = ["Unroll", "first_order", "unroll"]
