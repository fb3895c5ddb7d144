"""Transfer sets for scarce labels: unlabeled rows and generated rows that the teacher labels.

>>> from kdistill.transfer import Munge, Transfer
>>> Transfer(Munge(p=0.5, s=10.0), rows=1000).describe()["kind"]
'munge'

``kdistill.distill(teacher, student, (X, y), unlabeled=X_u, transfer=Transfer(Munge(), rows=50_000))``: the teacher
labels the unlabeled rows and the generated pool once (through the cache), and the student learns from all of them;
the hard-label term sees only the labelled rows. See :mod:`kdistill.transfer.plan` for the per-batch mix and
docs/scarce_labels.md for what each generator costs and gains.
"""

from __future__ import annotations

from kdistill.transfer.generators import ClassGaussian, Jitter, Mixup, Munge, TransferGenerator
from kdistill.transfer.plan import (
    GENERATORS,
    ExtraRows,
    LiveTransfer,
    Transfer,
    as_transfer,
    extra_rows,
    read_unlabeled,
    row_summary,
)

__all__ = [
    "GENERATORS",
    "ClassGaussian",
    "ExtraRows",
    "Jitter",
    "LiveTransfer",
    "Mixup",
    "Munge",
    "Transfer",
    "TransferGenerator",
    "as_transfer",
    "extra_rows",
    "read_unlabeled",
    "row_summary",
]
