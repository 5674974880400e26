"""The exact gradient paths (ffid.engine.paths): the paths agree, forcing and the fixed choice,
what a failing kernel does, transient bounds. That every path gives full finetuning's gradient
on every matmul route (fp32 and bf16 autocast) is a matrix invariant: test_matrix.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ffid import attach, plan
from ffid.engine import paths
from ffid.errors import ConfigError
from matrix import ROUTES, RouteNet

pytestmark = pytest.mark.usefixtures("one_thread")

_linear = ROUTES["linear"]


def _loss(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out.shape, generator=g)
    return (out.float() * w).sum()


def _run(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    _loss(out).backward()


def _reference(model: torch.nn.Module, x: torch.Tensor, sel, bf16: bool) -> dict[str, torch.Tensor]:
    """Full finetuning's gradient at the selected positions (what every path must reproduce)."""
    ref = copy.deepcopy(model)
    _run(ref, x, bf16)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    return {n: grads[n].reshape(-1)[sel.indices(n)].float() for n in sel}


def _ffid(model, x, sel, bf16, path):  # type: ignore[no-untyped-def]
    m = copy.deepcopy(model)
    handle = attach(m, sel, grad_path=path)
    _run(m, x, bf16)
    return handle, {n: p.grad.clone() for n, p in handle.proxies()}


@pytest.mark.parametrize("route", ROUTES)
def test_paths_agree_with_each_other(route: str) -> None:
    model, x = ROUTES[route]()
    sel = plan(model, 0.05, 1, "spread")
    got = {p: _ffid(model, x, sel, False, p)[1] for p in paths.PATHS}
    for p in ("dense", "chunked"):
        for n in got["sampled"]:
            torch.testing.assert_close(got[p][n], got["sampled"][n], atol=1e-5, rtol=1e-5)


def test_compat_whole_tensor_picks_ignore_the_path() -> None:
    model, x = _linear()
    sel = plan(model, 0.5, 1, "compat-v2")
    assert any(p.whole for p in sel.values())
    ref = _reference(model, x, sel, False)
    for p in paths.PATHS:
        _, got = _ffid(model, x, sel, False, p)
        for n in got:
            torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-5)


class _Spy(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[tuple[int, ...], torch.dtype, int]] = []
        self.storages: list[tuple[tuple[int, ...], torch.dtype, int, int]] = []  # + data_ptr

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                s = t.untyped_storage()
                self.outputs.append((tuple(t.shape), t.dtype, s.nbytes()))
                self.storages.append((tuple(t.shape), t.dtype, s.nbytes(), s.data_ptr()))
        return out


def test_sampled_path_makes_no_full_fp32_copy_of_an_activation(monkeypatch) -> None:
    # bf16 autocast: the backward may convert the activation and the output gradient to fp32
    # only one token chunk at a time (64 tokens here), never all 600 tokens.
    monkeypatch.setattr(paths, "SAMPLED_CHUNK_BYTES", {"cpu": 1, "default": 1})
    torch.manual_seed(0)
    model = RouteNet(torch.nn.Linear(48, 40))
    x = torch.randn(600, 48)
    sel = plan(model, 0.05, 1, "spread")
    attach(model, sel, grad_path="sampled")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    loss = (out * w).float().sum()  # gradients stay bf16 up to the layer
    spy = _Spy()
    with spy:
        loss.backward()
    fp32 = [(s, b) for s, d, b in spy.outputs if d == torch.float32 and len(s) == 2]
    assert any(64 in s for s, _ in fp32), "the spy saw the chunks"
    # (an expanded view of the loss's scalar gradient has the full shape but no storage)
    assert all(b < 600 * 40 * 4 for _, b in fp32), fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sampled_path_converts_each_operand_once(dtype, monkeypatch) -> None:
    # Each chunk's operands are converted to fp32 once (a 16-bit one a block of columns at a
    # time, no second full fp32 copy), and b goes to the CPU kernel as the transpose view of a
    # contiguous b^T, so the kernel's own `mat2.transpose(-1, -2).contiguous()` copies nothing.
    # The values are bit for bit those of the plain formulation (same data, same sums).
    block = 600 * 4 * 16
    monkeypatch.setattr(paths, "CONVERT_BLOCK_BYTES", block)  # several blocks per chunk
    n, rows, cols = 600, 40, 96
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, rows, generator=g).to(dtype), torch.randn(n, cols, generator=g).to(dtype)
    count = rows * cols // 20
    flat = torch.randperm(rows * cols, generator=g)[:count].sort().values
    pattern = paths.Pattern(lambda: flat, count, rows * cols, False).matrix(rows, cols)
    seen = []
    real = paths._sddmm

    def spy(pattern, col, at, bc, values):  # type: ignore[no-untyped-def]
        seen.append((at.is_contiguous(), bc.t().is_contiguous(), at.dtype, bc.dtype))
        return real(pattern, col, at, bc, values)

    monkeypatch.setattr(paths, "_sddmm", spy)
    with _Spy() as alloc:
        got = paths.sampled(pattern, a, b)
    assert seen == [(True, True, torch.float32, torch.float32)]
    inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}  # (views of them)
    fp32 = {
        ptr: nbytes
        for shape, d, nbytes, ptr in alloc.storages
        if d == torch.float32 and len(shape) == 2 and ptr not in inputs
    }
    # one full fp32 copy of each operand; the rest are conversion blocks of at most `block` bytes
    assert sorted(v for v in fp32.values() if v > block) == sorted([n * rows * 4, n * cols * 4])
    dense = (a.t().float() @ b.float()).reshape(-1)[flat]
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(paths, "_sddmm", real)
    csr = torch.sparse_csr_tensor(pattern.crow("cpu"), flat % cols, torch.zeros(count), (rows, cols))
    plain = torch.sparse.sampled_addmm(csr, a.t().float().contiguous(), b.float()).values()
    assert torch.equal(got, plain)


def test_forcing_the_path(monkeypatch) -> None:
    model, x = _linear()
    sel = plan(model, 0.05, 1, "spread")
    weight = "layer.weight"
    monkeypatch.setenv(paths.ENV_PATH, "chunked")
    handle, _ = _ffid(model, x, sel, False, None)
    assert handle.grad_paths()[weight] == "chunked"
    handle, _ = _ffid(model, x, sel, False, "dense")  # the attach option wins over the variable
    assert handle.grad_paths()[weight] == "dense"
    monkeypatch.setenv(paths.ENV_PATH, "fastest")
    with pytest.raises(ConfigError, match="FFID_GRAD_PATH"):
        _ffid(model, x, sel, False, None)
    with pytest.raises(ConfigError, match="grad_path"):
        attach(copy.deepcopy(model), sel, grad_path="fastest")


@pytest.mark.parametrize(
    ("rows", "cols", "ff", "dtype", "device", "want"),
    [
        (1024, 1024, 0.01, torch.float32, "cpu", "sampled"),  # 8 k + 64 (R + C) = 0.2 R C
        (1024, 1024, 0.01, torch.bfloat16, "cpu", "sampled"),
        (1024, 1024, 0.15, torch.float32, "cpu", "dense"),  # 8 k alone is 1.2 R C
        (64, 128, 0.01, torch.float32, "cpu", "dense"),  # converting the tokens costs more
        (5120, 5120, 0.01, torch.bfloat16, "cuda", "dense"),  # tensor cores
        (13824, 5120, 0.01, torch.bfloat16, "cuda", "chunked"),  # product above DENSE_MAX_BYTES
        (5120, 5120, 0.0001, torch.bfloat16, "cuda", "sampled"),
        (5120, 5120, 0.001, torch.float32, "cuda", "sampled"),
    ],
)
def test_auto_is_a_fixed_rule(rows, cols, ff, dtype, device, want) -> None:
    assert paths.auto_path(rows, cols, round(rows * cols * ff), dtype, device) == want


def test_auto_depends_on_no_clock_thread_count_or_cache(monkeypatch) -> None:
    # The choice used to come from a timed probe cached on disk: now no clock is read, the
    # thread count changes nothing, and a process keeps no state that could make it differ.
    import time

    def no_clock() -> float:
        raise AssertionError("the path choice read a clock")

    for name in ("perf_counter", "process_time", "time", "monotonic"):
        monkeypatch.setattr(time, name, no_clock)
    monkeypatch.delenv(paths.ENV_PATH, raising=False)
    model, x = _linear()
    sel = plan(model, 0.05, 1, "spread")
    chosen = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            handle, _ = _ffid(model, x, sel, False, None)
        finally:
            torch.set_num_threads(before)
        chosen.append(handle.grad_paths())
    assert chosen[0] == chosen[1] == {"layer.weight": "dense"}  # 40x48: converting costs more
    monkeypatch.setattr(paths, "DENSE_MAX_BYTES", 16)
    handle, _ = _ffid(model, x, sel, False, "auto")
    assert handle.grad_paths()["layer.weight"] == "chunked"
    assert not hasattr(paths, "rates") and not hasattr(paths, "ENV_CACHE")


def _failing_sddmm(exc: Exception):  # type: ignore[no-untyped-def]
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise exc

    return fail


def test_a_failing_sampled_kernel_runs_chunked_and_says_so(monkeypatch) -> None:
    # A missing SDDMM (a device or build without sparse CSR) used to fall back to another
    # computation while grad_paths() still said "sampled": now the chunked path runs, a warning
    # says so once, and grad_paths() names what ran.
    model, x = _linear()
    sel = plan(model, 0.05, 1, "spread")
    _, want = _ffid(model, x, sel, False, "chunked")
    monkeypatch.setattr(paths, "_WARNED", set())
    monkeypatch.setattr(paths, "_sddmm", _failing_sddmm(NotImplementedError("no SDDMM on this backend")))
    with pytest.warns(RuntimeWarning, match="sampled gradient path failed on cpu .*chunked"):
        handle, got = _ffid(model, x, sel, False, "sampled")
    assert handle.grad_paths()["layer.weight"] == "chunked"
    assert all(torch.equal(got[n], want[n]) for n in want)
    monkeypatch.setattr(paths, "_sddmm", _failing_sddmm(RuntimeError("sampled_addmm: unsupported")))
    handle, _ = _ffid(model, x, sel, False, "sampled")  # warned once per process and device type
    assert handle.grad_paths()["layer.weight"] == "chunked"


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_in_the_sampled_path_is_raised(exc, monkeypatch) -> None:
    # Not swallowed: a fallback would make the bits depend on how much memory happened to be free.
    model, x = _linear()
    sel = plan(model, 0.05, 1, "spread")
    monkeypatch.setattr(paths, "_sddmm", _failing_sddmm(exc))
    with pytest.raises(RuntimeError, match="allocate"):
        _ffid(model, x, sel, False, "sampled")


@pytest.mark.parametrize("path", paths.PATHS)
def test_transient_bounds(path: str) -> None:
    n, rows, cols = 32768, 13824, 5120  # Wan 14B FFN at a 480p clip
    got = paths.transient_bytes(path, n, rows, cols, rows * cols // 100)
    full_copy = n * (rows + cols) * 4
    assert got < full_copy
    if path == "dense":
        assert got == rows * cols * 4
    else:
        assert got <= max(paths.DENSE_BLOCK_BYTES, paths.SAMPLED_CHUNK_BYTES["default"])


def test_the_estimate_mirrors_the_paths() -> None:
    from ffid.estimate import ENGINE, estimate

    assert ENGINE.dense_grad_max_bytes == paths.DENSE_MAX_BYTES
    assert ENGINE.dense_block_bytes == paths.DENSE_BLOCK_BYTES
    assert ENGINE.sampled_chunk_bytes == paths.SAMPLED_CHUNK_BYTES["default"]
    for path in paths.PATHS:
        for n, rows, cols in ((32760, 5120, 5120), (32760, 13824, 5120), (100, 64, 64)):
            got = ENGINE.grad_transient(path, rows, cols, n)
            assert got == paths.transient_bytes(path, n, rows, cols, 1), (path, rows, cols)
    kw = {"video_size": [480, 832], "frames": 81}
    by_path = {
        p: estimate("wan2.1-t2v-14b", 0.01, grad_path=p, **kw)[0].gpu["grad_path"] for p in paths.CHOICES
    }
    assert by_path["dense"] == 6 * 5120 * 5120 * 4  # time_projection's product, the largest weight
    assert by_path["chunked"] <= paths.DENSE_BLOCK_BYTES
    assert by_path["auto"] == max(by_path["sampled"], 5120 * 5120 * 4)  # larger ones run chunked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["auto", *paths.PATHS])
def test_every_path_on_cuda_bf16(path: str) -> None:
    """On CUDA under bf16 autocast (tensor-core dense product with fp32 output, SDDMM chunks of
    64 MiB): every path matches full finetuning's gradient."""
    torch.manual_seed(0)
    model = RouteNet(torch.nn.Linear(512, 384)).cuda()
    x = torch.randn(4096, 512, device="cuda")
    sel = plan(model, 0.01, 1, "spread")

    def run(m: torch.nn.Module) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()

    ref = copy.deepcopy(model)
    run(ref)
    want = ref.layer.weight.grad.reshape(-1)[sel.indices("layer.weight").cuda()].float()
    m = copy.deepcopy(model)
    handle = attach(m, sel, grad_path=path)
    run(m)
    got = dict(handle.proxies())["layer.weight"].grad
    assert handle.grad_paths()["layer.weight"] in paths.PATHS
    torch.testing.assert_close(got, want, atol=1e-2 * want.abs().max().item(), rtol=0)
