"""DeepSpeed's CPU ops load from the cache ``cluster/install.sh`` built, whatever ninja a
process finds first on its PATH: a second ninja version would compile them again."""

import os
import subprocess
import sys

from rayllm.paths import cache_dir

LOAD = """
from rayllm.train.deepspeed_engine import use_this_environments_ninja
use_this_environments_ninja()
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=True)
CPUAdamBuilder().load(verbose=True)
"""


def test_the_ops_load_without_compiling_when_another_ninja_comes_first():
    env = os.environ | {
        "PATH": f"/usr/bin:{os.environ['PATH']}",  # a system ninja first, where there is one
        "TORCH_EXTENSIONS_DIR": str(cache_dir() / "torch_extensions"),
        "DS_ACCELERATOR": "cpu",
    }
    run = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert output.count("ninja: no work to do") == 2, output[-3000:]
