"""``trainer.precision``: the arithmetic a run computes in, as Lightning's ``precision=``.

* "32" (the default): float32, with TensorFloat-32 off for CUDA matrix products and convolutions
  (cuDNN's convolutions would otherwise use TF32 by default).
* "tf32": float32 storage, TF32 matrix products and convolutions on CUDA (Ampere and later). On any
  other device it is the same as "32", with a one-line warning (accepted rather than refused, so that a
  config written for a GPU also runs, unchanged in its arithmetic, on a CPU).
* "bf16": ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the algorithm's ``train_step``
  and ``evaluate``; parameters, meta-gradients and the optimizer's state stay float32. Allowed on a
  CPU, with a warning: CPU bf16 autocast is slower than float32 on most CPUs.
* "64": float64 everything, the meta-parameters and every batch (a check, not a way to train fast).

The trainer builds one ``Precision`` and calls ``prepare(algorithm)`` once, then runs each step and
each evaluation inside ``with precision.applied():`` on ``precision.batch(batch)``; it knows nothing of
the algorithm. The TF32 switches are process-wide, so ``applied`` sets them on entry and restores the
previous values on exit (torch's ``fp32_precision`` settings; the legacy ``allow_tf32`` flags must not be
mixed with them in one process).

    precision = Precision.of("bf16", torch.device("cuda"))
    with precision.applied():
        algorithm.train_step(precision.batch(batch))
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from metalab.errors import MetalabWarning, require

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("32", "tf32", "bf16", "64")
Batch = TypeVar("Batch")


@dataclasses.dataclass(frozen=True)
class Precision:
    """One of ``PRECISIONS`` on one device; build it with ``Precision.of``."""

    name: str
    device: torch.device

    @classmethod
    def of(cls, setting: str | int, device: torch.device | str) -> Precision:
        """The policy of ``trainer.precision=setting`` (a string, or the number Hydra parses from
        ``trainer.precision=32``) on ``device``, refused in one sentence when it is unknown."""
        name, device = str(setting).lower(), torch.device(device)
        require(
            name in PRECISIONS,
            f"trainer.precision={setting} is not a precision: use 32 (float32), tf32, bf16 or 64 (float64).",
        )
        if name == "tf32" and device.type != "cuda":
            warnings.warn(
                f"trainer.precision=tf32 changes CUDA matrix products only: on {device} it computes as 32.",
                MetalabWarning,
                stacklevel=2,
            )
        if name == "bf16" and device.type == "cpu":
            warnings.warn(
                "trainer.precision=bf16 on a CPU runs bf16 autocast, which is slower than float32 on most CPUs.",
                MetalabWarning,
                stacklevel=2,
            )
        return cls(name, device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters and of the data (bf16 computes in bfloat16 but stores float32)."""
        return torch.float64 if self.name == "64" else torch.float32

    def prepare(self, algorithm: Any) -> Any:
        """Under "64", the algorithm's model and meta-parameters made float64 in place (the same tensors,
        so an optimizer built on them keeps them); otherwise nothing. Returns ``algorithm``."""
        if self.name == "64":
            algorithm.model.to(torch.float64)
            with torch.no_grad():
                for value in algorithm.meta_parameters().values():
                    if value.is_floating_point():
                        value.data = value.data.to(torch.float64)
        return algorithm

    def batch(self, batch: Batch) -> Batch:
        """``batch`` with its floating-point tensors in ``dtype`` (a dataclass of tensors, such as
        ``TaskBatch``, or a tensor); anything else is returned as it is."""
        if self.name != "64":
            return batch
        if isinstance(batch, torch.Tensor):
            return batch.to(self.dtype) if batch.is_floating_point() else batch
        if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
            fields = {f.name: self.batch(getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.init}
            return dataclasses.replace(batch, **fields)
        return batch

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The arithmetic of this precision inside the block: the TF32 switches (CUDA), and bf16 autocast."""
        with self._tf32(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.name == "bf16"):
            yield

    @contextmanager
    def _tf32(self) -> Iterator[None]:
        if self.device.type != "cuda":
            yield
            return
        wanted = "tf32" if self.name == "tf32" else "ieee"
        switches = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        before = [switch.fp32_precision for switch in switches]
        try:
            for switch in switches:
                switch.fp32_precision = wanted
            yield
        finally:
            for switch, value in zip(switches, before):
                switch.fp32_precision = value
