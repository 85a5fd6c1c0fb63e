"""The compact_linear C++ kernel (models/compact_linear.py), called from an
AOTInductor graph as decode graphs call it, against its reference arithmetic
(the op's Python body: FP32 products of the stored values, rounded once).

One graph holds every case: weight dtypes, row counts across the kernel's
register blocks (1-8, and more than 8), K and N that are not multiples of
the vector width or the row block, a strided input view, with and without
scale and bias. It runs once per vector code path (AVX-512, AVX2, plain C++)
that this CPU has, each pinned through the library.
"""

from __future__ import annotations

import pytest
import torch

from aotllm.models import compact_linear

pytestmark = pytest.mark.slow

# (rows, K, N, weight dtype, x dtype, scale, bias)
CASES = [
    (1, 96, 301, torch.int8, torch.bfloat16, True, False),
    (1, 100, 64, torch.bfloat16, torch.bfloat16, False, True),
    (1, 64, 33, torch.float16, torch.float16, False, False),
    (2, 96, 70, torch.bfloat16, torch.bfloat16, False, False),
    (3, 40, 17, torch.int8, torch.float32, True, True),
    (4, 96, 130, torch.bfloat16, torch.float32, False, False),
    (5, 104, 9, torch.int8, torch.bfloat16, True, False),
    (7, 96, 66, torch.float16, torch.float16, False, True),
    (8, 96, 2050, torch.int8, torch.bfloat16, True, False),  # large enough to go parallel
    (11, 48, 23, torch.bfloat16, torch.bfloat16, False, True),
]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs, params = [], []
    for rows, k, n, wdt, xdt, scaled, biased in CASES:
        xs.append(torch.randn(rows, k, generator=g).to(xdt))
        if wdt == torch.int8:
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        else:
            w = (torch.randn(n, k, generator=g) * 0.1).to(wdt)
        scale = torch.rand(n, generator=g) * 0.01 + 1e-3 if scaled else None
        bias = torch.randn(n, generator=g).to(xdt) if biased else None
        params.append((w, scale, bias))
    return xs, params


class Cases(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.params = params
        for i, (w, scale, bias) in enumerate(params):
            self.register_buffer(f"w{i}", w)
            if scale is not None:
                self.register_buffer(f"s{i}", scale)
            if bias is not None:
                self.register_buffer(f"b{i}", bias)

    def forward(self, *xs):
        outs = []
        for i, x in enumerate(xs):
            if i == 1:  # a strided view: every other column of a wider tensor
                x = torch.cat([x, x], dim=-1).view(x.shape[0], x.shape[1], 2)[..., 0]
            outs.append(torch.ops.aotllm.compact_linear(
                x, getattr(self, f"w{i}"), getattr(self, f"s{i}", None),
                getattr(self, f"b{i}", None)))
        return outs


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    xs, params = _inputs()
    module = Cases(params).eval()
    program = torch.export.export(module, tuple(xs))
    path = tmp_path_factory.mktemp("compact") / "cases.pt2"
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path),
        inductor_configs=compact_linear.c_shim_configs())
    lib = compact_linear.load_library(compact_linear.build_library())
    runner = torch._inductor.aoti_load_package(str(path))
    return lib, runner, module, xs


@pytest.mark.parametrize("isa", [2, 1, 0], ids=["avx512", "avx2", "plain"])
def test_kernel_equals_the_reference_arithmetic(graph, isa):
    lib, runner, module, xs = graph
    before = lib.aotllm_compact_linear_isa()
    got_isa = lib.aotllm_compact_linear_set_isa(isa)
    try:
        if got_isa != isa:
            pytest.skip(f"this CPU lacks the {compact_linear.ISA_NAMES[isa]} code path")
        got = runner(*xs)
    finally:
        lib.aotllm_compact_linear_set_isa(before)
    want = module(*xs)  # the op's Python body
    for case, g, w in zip(CASES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, case
        # FP32 sums in another order, then one rounding to x's dtype.
        tol = 1e-5 if w.dtype == torch.float32 else 2 ** -7
        assert torch.allclose(g.float(), w.float(), rtol=tol, atol=tol * w.float().abs().max()
                              ), (case, (g.float() - w.float()).abs().max())


def test_graph_calls_the_c_function_not_the_python_body(graph, monkeypatch):
    """If the graph fell back to the dispatcher, the op's Python body would run:
    make that body fail and run the graph."""
    lib, runner, module, xs = graph

    def fail(*args, **kwargs):
        raise AssertionError("the Python body ran")

    monkeypatch.setattr(torch.nn.functional, "linear", fail)
    runner(*xs)
