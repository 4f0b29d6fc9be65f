"""Two JAX processes with 4 CPU devices each train exactly like one process with 8.

Both fine-tune the tiny digits model for a few steps. Each of the two hosts
reads its own shard of the data; the one-process run reads both shards
(``data.shards_per_process=2``), so the global batches hold the same examples
in the same order and the params must agree to float rounding.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from train_helpers import (
    ROOT,
    SHIFT_INVARIANT,
    cli_command,
    cli_env,
    global_relative_error,
    load_export,
    max_relative_error,
    straight_tiny_run,
    tiny_config,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)

STEPS = 3


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return straight_tiny_run(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tiny_run, tmp_path):
    from jaxdiff.train.loop import train_and_evaluate

    straight, _ = tiny_run
    common = (
        f"model.pretrained={straight / 'export'}",
        f"total_steps={STEPS}",
        "log_every=1",
        "save_every=100",
        "eval.kind=",  # the straight run's report covers the evaluation
    )
    two = tmp_path / "two_hosts"
    port = _free_port()
    procs = [
        subprocess.Popen(
            cli_command(two, *common),
            env=cli_env(
                devices=4,
                JAXDIFF_COORDINATOR=f"127.0.0.1:{port}",
                JAXDIFF_NUM_PROCESSES="2",
                JAXDIFF_PROCESS_ID=str(i),
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    # The one-process reference runs meanwhile (the hosts mostly wait on each other).
    one = tmp_path / "one_host"
    summary = train_and_evaluate(tiny_config(*common, "data.shards_per_process=2"), one)
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"{out}\n{err[-4000:]}"
    # Process 0 logs and exports; both processes trained every step.
    assert f"[diffusion] step {STEPS}:" in outputs[0][0]
    assert "[diffusion] step" not in outputs[1][0]
    assert summary["diffusion"]["step"] == STEPS

    two_params, one_params = load_export(two / "export"), load_export(one / "export")
    per_leaf = max_relative_error(two_params, one_params, skip=SHIFT_INVARIANT)
    overall = global_relative_error(two_params, one_params)
    print(f"2 processes x 4 devices vs 1 x 8: per leaf <= {per_leaf:.2e}, overall {overall:.2e}")
    assert per_leaf <= 1e-5 and overall <= 1e-5
    # The runs trained: the exports moved away from the model they started from.
    assert max_relative_error(one_params["unet"], load_export(straight / "export")["unet"]) > 1e-4
