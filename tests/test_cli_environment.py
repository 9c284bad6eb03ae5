"""The CLI asks MKL for results that depend on the inputs only (``MKL_CBWR``), before torch can load MKL, and
leaves a user's own choice alone: on AVX-512 CPUs MKL otherwise rounds by memory alignment, and a resumed run stops
equalling a straight one (``test_bad_input_runs``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import sys, os, nullbooth.cli.main; print(os.environ['MKL_CBWR'], 'torch' in sys.modules)"


@pytest.mark.parametrize(("given", "expected"), [(None, "AUTO,STRICT"), ("COMPATIBLE", "COMPATIBLE")])
def test_cli_sets_mkl_reproducibility_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if given is not None:
        env["MKL_CBWR"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [expected, "False"]
