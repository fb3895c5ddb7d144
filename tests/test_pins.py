"""Classification runs give bit-identical weights to kdistill 0.1's (tests/golden/pins.safetensors, made by
tests/golden/make_pins.py before the one-pipeline redesign): a refactor of the pipeline must not change the floats.
The bits also depend on the CPU's kernels, so a machine whose vendor and instruction set have their own pins
(``pins-<key>.safetensors``, ``make_pins.py --machine``) is checked against those."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pin_cases import CASES, machine_key

GOLDEN = Path(__file__).with_name("golden")
_OWN = GOLDEN / f"pins-{machine_key()}.safetensors"
PINS = load_file(str(_OWN if _OWN.exists() else GOLDEN / "pins.safetensors"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_match_the_pinned_run(name: str) -> None:
    trained = CASES[name]()
    expected = {key.split("/", 1)[1]: value for key, value in PINS.items() if key.startswith(f"{name}/")}
    assert expected, f"no pinned weights for {name}"
    assert sorted(trained) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(trained[key].cpu(), value), f"{name}: {key} differs from the pinned run"
