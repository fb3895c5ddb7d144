"""Write tests/golden/pins.safetensors: the trained weights of a few classification runs, as kdistill 0.1 trained them.

Run once, before a change that must not alter classification arithmetic (the one-pipeline redesign): the test
tests/test_pins.py then checks that the same runs still give bit-identical weights. Rerun only when a change is meant
to alter these runs' floats, and say so in the commit.

    python tests/golden/make_pins.py      # ~20 s on a 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pin_cases import CASES


def main() -> None:
    tensors = {}
    for name, case in CASES.items():
        for key, value in case().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(Path(__file__).with_name("pins.safetensors")))
    print(f"wrote {len(tensors)} tensors from {len(CASES)} runs")


if __name__ == "__main__":
    main()
