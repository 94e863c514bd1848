"""Every Triton kernel compiles for an H100 (sm_90) through its wrapper, without a GPU (`sm90_compile.py`): the
interpreter the other CPU tests use does not type-check or lower a kernel as the compiler does, and a lent GPU's
minutes are too few to find out there."""
import subprocess
import sys
from pathlib import Path

import pytest
import triton

KERNELS = ("_decode_kernel", "_decode_shared_kernel", "_prefill_kernel",
           "_store_kvcache_kernel", "_rope_kernel", "_rms_norm_kernel", "_silu_mul_kernel", "_matmul_kernel",
           "_group_advantages_kernel", "_logp_kernel", "_dlogits_kernel")


def test_every_kernel_compiles_for_sm90():
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / tool).exists() for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this triton has no bundled ptxas/cuobjdump")
    script = Path(__file__).with_name("sm90_compile.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         cwd=script.parent.parent)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split("\t") for line in run.stdout.splitlines() if line.count("\t") == 2]
    compiled = {kernel for _, kernel, _ in rows}
    assert set(KERNELS) <= compiled, f"not compiled: {sorted(set(KERNELS) - compiled)}"
    assert ("decode, cascade", "_decode_shared_kernel") in {(case, kernel) for case, kernel, _ in rows}
    # programmatic dependent launch: every decode-step kernel waits for its predecessor before touching memory,
    # and no kernel launched without it carries the instructions
    pdl = {kernel: info for case, kernel, info in rows if case.startswith("PDL ")}
    assert set(pdl) == {"_decode_kernel", "_decode_shared_kernel", "_rope_kernel",
                        "_rms_norm_kernel", "_silu_mul_kernel", "_matmul_kernel"}
    assert all(info.endswith("griddepcontrol 2 wait first yes") for case, _, info in rows if case.startswith("PDL ")), \
        pdl
    assert all(info.endswith("griddepcontrol 0 wait first n/a") for case, _, info in rows
               if not case.startswith("PDL "))
