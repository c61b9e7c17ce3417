"""examples/multihost.py: two processes, one mesh, gloo on 127.0.0.1, trained like one process.

The launcher of the example starts 2 worker processes (1 or 2 CPU devices each) that join through
``jax.distributed.initialize`` and train data-parallel with ``mx_adagrad.adagrad``. Checked: both
end with bitwise the same params, equal to the single-process run up to float32 summation order;
a run that does not finish in time fails with a clear message and leaves no process behind.
``examples/sharded_bags_multihost.py`` trains a row-sharded embedding-bag table the same way
(``mx_adagrad.sharding``, owner pooling, one-pass step per shard): its table and history are
bitwise the one-device run's in both processes.
"""

from __future__ import annotations

import importlib.util
import re
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.xla_bits import assert_xla_bits

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "multihost.py"
STEPS = 5
TIMEOUT = 120.0
# The gradient's batch sum is split into per-device partial sums: float32 reassociation, bounded
# as in tests/test_sharding.py (DP_RTOL). Observed: < 1e-7.
RTOL, ATOL = 1e-5, 1e-5


def load_example(path: Path = EXAMPLE) -> ModuleType:
    """Imports an example as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = load_example()
bags_example = load_example(EXAMPLES / "sharded_bags_multihost.py")
pytestmark = pytest.mark.skipif(
    not example.gloo_stays_on_loopback(),
    reason="this machine's hostname does not resolve to loopback: gloo would leave 127.0.0.1",
)


def child_pids() -> set[int]:
    """The live (or unreaped) child processes of this process (Linux /proc)."""
    return {
        int(pid)
        for path in Path("/proc/self/task").glob("*/children")
        for pid in path.read_text().split()
    }


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return example.single_process_run(STEPS)


@pytest.mark.parametrize("local_devices", [1, 2])
def test_two_processes_end_identical_and_equal_to_one_process(local_devices, reference):
    before = child_pids()
    try:
        results = example.launch(
            processes=2, local_devices=local_devices, steps=STEPS, timeout=TIMEOUT
        )
    except TimeoutError as error:
        pytest.fail(f"the 2-process run did not finish within {TIMEOUT:.0f} s:\n{error}")
    assert child_pids() <= before, "worker processes left behind"
    assert len(results) == 2
    for name, want in reference.items():
        np.testing.assert_array_equal(results[1][name], results[0][name], err_msg=name)
        np.testing.assert_allclose(results[0][name], want, rtol=RTOL, atol=ATOL, err_msg=name)


def test_a_run_past_its_timeout_is_killed_with_a_clear_message():
    before = child_pids()
    with pytest.raises(
        TimeoutError, match=r"2 workers \(coordinator 127\.0\.0\.1:\d+\) not done"
    ) as error:
        example.launch(processes=2, local_devices=1, steps=STEPS, timeout=0.5)
    assert child_pids() <= before, "worker processes left behind"
    port = int(re.search(r"127\.0\.0\.1:(\d+)", str(error.value)).group(1))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # nothing listens on the coordinator's port any more


@pytest.mark.parametrize("local_devices", [1, 2])
def test_a_row_sharded_bag_table_over_two_processes_is_bitwise_one_device(local_devices):
    before = child_pids()
    try:
        results = bags_example.launch(processes=2, local_devices=local_devices, timeout=TIMEOUT)
    except TimeoutError as error:
        pytest.fail(f"the 2-process run did not finish within {TIMEOUT:.0f} s:\n{error}")
    assert child_pids() <= before, "worker processes left behind"
    want = bags_example.single_process_run(4)
    assert len(results) == 2 and set(results[0]) == set(want) == {"table", "history"}
    for result in results:
        assert_xla_bits(result, want)
