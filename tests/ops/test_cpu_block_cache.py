"""The compiled CPU backend's cache of large buffers: a training step's gradient reuses the
block the previous step's released, a live gradient is never handed out twice, the limit
holds, and the cache is safe under concurrent steps."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import pytest
import torch

import stable_dfl
from stable_dfl import stable_dfl_loss
from stable_dfl.ops import backends

from ..support.dfl_cases import assert_close_to_reference, random_case

pytestmark = [
    pytest.mark.cpu_kernel,
    pytest.mark.skipif(
        not backends.compiled_available("cpu"),
        reason=f"stable_dfl._C not loaded: {backends.extension_error()}",
    ),
]

MiB = 1 << 20
#: fp32 rows of 16 bins whose gradient is 8 MiB: above the cache's 4 MiB threshold.
ROWS_8_MIB = 8 * MiB // (16 * 4)


@pytest.fixture(autouse=True)
def fresh_cache():
    """An empty cache at the default limit for each test, and the limit restored after."""
    limit = stable_dfl.cpu_block_cache_info()["limit_bytes"]
    stable_dfl.empty_cpu_block_cache()
    yield
    stable_dfl.set_cpu_block_cache_limit(limit)
    stable_dfl.empty_cpu_block_cache()


def op_grad(pred, target, weight=None):
    return torch.ops.stable_dfl.dfl_forward(pred, target, weight, 1e-6, True, True)[1]


def training_step(leaf, target, weight):
    stable_dfl_loss(leaf, target, weight, backend="cpu").backward()
    grad = leaf.grad
    leaf.grad = None
    return grad


def test_the_next_steps_gradient_reuses_the_block_the_last_one_released():
    pred, target, weight = random_case(ROWS_8_MIB, 16, torch.float32, weighted=True)
    leaf = pred.clone().requires_grad_()
    first = training_step(leaf, target, weight)
    first_address, first_values = first.data_ptr(), first.clone()
    del first  # the step's gradient dies, as after optimizer.zero_grad()
    before = stable_dfl.cpu_block_cache_info()
    assert before["cached_blocks"] == 1 and before["cached_bytes"] >= 8 * MiB

    second = training_step(leaf, target, weight)

    after = stable_dfl.cpu_block_cache_info()
    assert second.data_ptr() == first_address
    assert after["reused"] == before["reused"] + 1
    assert after["allocated"] == before["allocated"]
    assert torch.equal(second, first_values)


def test_a_live_gradient_is_never_handed_out_again():
    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    kept = op_grad(pred, target)
    kept_values = kept.clone()
    for _ in range(3):
        other = op_grad(pred * 2, target)
        assert other.data_ptr() != kept.data_ptr()
        del other
    assert torch.equal(kept, kept_values)


def test_reused_blocks_give_the_reference_gradient_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        pred, target, weight = random_case(ROWS_8_MIB, 16, dtype, weighted=True)
        for _ in range(2):  # fresh block, then a reused one (holding the last values)
            loss, grad = torch.ops.stable_dfl.dfl_forward(pred, target, weight, 1e-6, False, True)
            assert_close_to_reference(loss, grad, pred, target, weight)


def test_small_buffers_are_left_to_torchs_allocator():
    pred, target, _ = random_case(1024, 16, torch.float32)
    before = stable_dfl.cpu_block_cache_info()
    grad = op_grad(pred, target)
    del grad
    assert stable_dfl.cpu_block_cache_info() == before


def test_a_block_far_larger_than_the_request_is_not_used_for_it():
    pred, target, _ = random_case(2 * ROWS_8_MIB, 16, torch.float32)
    op_grad(pred, target)  # leaves one 16 MiB block
    before = stable_dfl.cpu_block_cache_info()
    half = op_grad(pred[:ROWS_8_MIB], target[:ROWS_8_MIB])
    after = stable_dfl.cpu_block_cache_info()
    assert after["allocated"] == before["allocated"] + 1 and after["reused"] == before["reused"]
    assert after["cached_blocks"] == 1 and after["cached_bytes"] >= 16 * MiB
    assert half.numel() == ROWS_8_MIB * 16


def test_limit_zero_keeps_nothing():
    stable_dfl.set_cpu_block_cache_limit(0)
    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    op_grad(pred, target)
    assert stable_dfl.cpu_block_cache_info()["cached_bytes"] == 0


def test_the_limit_evicts_the_oldest_blocks_first():
    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    older, newer = op_grad(pred, target), op_grad(pred, target)
    newer_address = newer.data_ptr()
    stable_dfl.set_cpu_block_cache_limit(9 * MiB)  # room for one 8 MiB block
    del older, newer
    info = stable_dfl.cpu_block_cache_info()
    assert info["cached_blocks"] == 1 and info["cached_bytes"] <= 9 * MiB
    assert op_grad(pred, target).data_ptr() == newer_address


def test_lowering_the_limit_and_emptying_free_kept_blocks():
    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    grads = [op_grad(pred, target) for _ in range(3)]
    del grads
    assert stable_dfl.cpu_block_cache_info()["cached_blocks"] == 3
    stable_dfl.set_cpu_block_cache_limit(20 * MiB)
    assert stable_dfl.cpu_block_cache_info()["cached_blocks"] == 2
    stable_dfl.empty_cpu_block_cache()
    info = stable_dfl.cpu_block_cache_info()
    assert info["cached_blocks"] == 0 and info["cached_bytes"] == 0


@pytest.mark.parametrize("limit", [1.5, True, "1", None])
def test_a_limit_that_is_not_an_int_is_a_type_error(limit):
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        stable_dfl.set_cpu_block_cache_limit(limit)


def test_a_negative_limit_is_a_value_error():
    with pytest.raises(ValueError, match="limit_bytes must be >= 0, got -1"):
        stable_dfl.set_cpu_block_cache_limit(-1)


def cache_limit_in_fresh_process(value: str) -> subprocess.CompletedProcess:
    code = (
        "import torch, stable_dfl\n"
        "pred = torch.randn(4, 16); target = torch.rand(4) * 15\n"
        "torch.ops.stable_dfl.dfl_forward(pred, target, None, 1e-6, True, True)\n"
        "print(stable_dfl.cpu_block_cache_info()['limit_bytes'])\n"
    )
    env = {**os.environ, "STABLE_DFL_CPU_CACHE_MB": value}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_environment_sets_the_limit_in_mib():
    result = cache_limit_in_fresh_process("3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == str(3 * MiB)


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_a_bad_environment_limit_is_a_value_error_naming_the_variable(value):
    result = cache_limit_in_fresh_process(value)
    assert result.returncode != 0
    assert "ValueError: STABLE_DFL_CPU_CACHE_MB must be a whole number of MiB >= 0" in result.stderr
    assert f"got '{value}'" in result.stderr


def test_a_reused_gradient_is_an_ordinary_tensor():
    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    op_grad(pred, target)
    grad = op_grad(pred, target)  # served by the kept block
    values = grad.clone()
    buffer = io.BytesIO()
    torch.save(grad, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), values)
    grad.resize_(2 * ROWS_8_MIB, 16)  # growing reallocates, keeping the values
    assert torch.equal(grad[:ROWS_8_MIB], values)
    grad.add_(1.0)
    assert torch.equal(grad[:ROWS_8_MIB], values + 1.0)


def test_concurrent_steps_get_their_own_correct_gradients():
    cases = [random_case(ROWS_8_MIB, 16, torch.float32, weighted=True) for _ in range(4)]
    expected = [op_grad(*case) for case in cases]
    failures = []

    def steps(index):
        try:
            for _ in range(5):
                if not torch.equal(op_grad(*cases[index]), expected[index]):
                    failures.append(f"thread {index}: wrong gradient")
        except Exception as error:  # reported below, not lost in the thread
            failures.append(f"thread {index}: {error!r}")

    threads = [threading.Thread(target=steps, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert stable_dfl.cpu_block_cache_info()["cached_blocks"] <= len(cases)


def test_the_profiler_sees_a_reused_gradients_memory():
    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    op_grad(pred, target)  # the block the profiled call reuses
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        grad = op_grad(pred, target)
    assert stable_dfl.cpu_block_cache_info()["reused"] >= 1
    allocated = max(event.cpu_memory_usage for event in prof.key_averages())
    assert allocated >= grad.nbytes


def _gradient_in_forked_child(queue, pred, target, expected):
    torch.set_num_threads(1)
    before = stable_dfl.cpu_block_cache_info()["reused"]
    grad = op_grad(pred, target)
    queue.put((torch.equal(grad, expected), stable_dfl.cpu_block_cache_info()["reused"] - before))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_reuses_the_blocks_it_inherited():
    import multiprocessing

    pred, target, _ = random_case(ROWS_8_MIB, 16, torch.float32)
    expected = op_grad(pred, target).clone()
    op_grad(pred, target)  # leaves one block kept
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_gradient_in_forked_child, args=(queue, pred, target, expected))
    child.start()
    correct, reused = queue.get(timeout=120)
    child.join(timeout=120)
    assert child.exitcode == 0
    assert correct and reused == 1


def test_compiled_training_steps_reuse_blocks_and_match_eager():
    pred, target, weight = random_case(ROWS_8_MIB, 16, torch.float32, weighted=True)
    eager = training_step(pred.clone().requires_grad_(), target, weight)
    compiled_loss = torch.compile(
        lambda p: stable_dfl_loss(p, target, weight, backend="cpu"), fullgraph=True
    )

    def compiled_step():
        leaf = pred.clone().requires_grad_()
        compiled_loss(leaf).backward()
        return leaf.grad

    first = compiled_step()
    first_address, first_values = first.data_ptr(), first.clone()
    del first
    second = compiled_step()
    assert second.data_ptr() == first_address
    assert torch.equal(first_values, eager) and torch.equal(second, eager)
