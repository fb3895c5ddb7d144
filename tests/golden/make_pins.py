"""Write tests/golden/pins.safetensors: the trained weights of a few classification runs, as kdistill 0.1 trained them.

Run once, before a change that must not alter classification arithmetic (the one-pipeline redesign): the test
tests/test_pins.py then checks that the same runs still give bit-identical weights. Rerun only when a change is meant
to alter these runs' floats, and say so in the commit.

    python tests/golden/make_pins.py      # ~20 s on a 2-core CPU

The floats depend on the CPU's kernels too (the same code gives other bits on an Intel AVX-512 machine than on the
AMD machine the first pins were made on), so ``--machine`` writes ``pins-<vendor>-<instruction set>.safetensors``
for this machine (:func:`pin_cases.machine_key`), which the test then uses here. Make those only from a commit whose
runs match the pins on a machine that has them (the code then trains as kdistill 0.1 did), and say so in the
commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pin_cases import CASES, machine_key


def main() -> None:
    tensors = {}
    for name, case in CASES.items():
        for key, value in case().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    name = f"pins-{machine_key()}.safetensors" if "--machine" in sys.argv[1:] else "pins.safetensors"
    save_file(tensors, str(Path(__file__).with_name(name)))
    print(f"wrote {len(tensors)} tensors from {len(CASES)} runs to {name}")


if __name__ == "__main__":
    main()
