"""The pure-PyTorch `sgl_kernel` stand-in (sgl_kernel_cpu/) against plain torch indexing and the installed SGLang."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

sgl_kernel = pytest.importorskip("sgl_kernel")


def _sglang_root() -> Path:
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.origin is not None, "sglang is not installed in this environment"
    return Path(spec.origin).parent


def _cpu_names_imported_by_sglang() -> set[str]:
    """Every `from sgl_kernel import X` with X ending in `_cpu`, anywhere in the installed SGLang source."""
    names: set[str] = set()
    for path in _sglang_root().rglob("*.py"):
        text = path.read_text(errors="replace")
        if "sgl_kernel" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "sgl_kernel":
                names.update(alias.name for alias in node.names if alias.name.endswith("_cpu"))
    return names


def test_stand_in_provides_exactly_the_cpu_names_sglang_imports():
    provided = {name for name in dir(sgl_kernel) if name.endswith("_cpu")}
    assert provided == _cpu_names_imported_by_sglang()
    assert set(sgl_kernel.__all__) == provided


def test_stand_in_registers_no_torch_ops():
    # SGLang enables its AMX fused layers only when this op exists; the stand-in must keep them off.
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")


def test_assign_req_to_token_pool_cpu_matches_indexing():
    generator = torch.Generator().manual_seed(0)
    req_to_token = torch.zeros(6, 32, dtype=torch.int32)
    req_pool_indices = torch.tensor([4, 1, 3], dtype=torch.int64)
    start = torch.tensor([0, 5, 7], dtype=torch.int64)
    end = torch.tensor([3, 5, 12], dtype=torch.int64)  # the middle request writes nothing
    out_cache_loc = torch.randint(1, 1000, (8,), generator=generator, dtype=torch.int64)

    expected = req_to_token.clone()
    expected[4, 0:3] = out_cache_loc[0:3].int()
    expected[3, 7:12] = out_cache_loc[3:8].int()

    sgl_kernel.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, 32)
    assert torch.equal(req_to_token, expected)


def test_copy_all_layer_kv_cache_cpu_matches_indexing():
    generator = torch.Generator().manual_seed(1)
    buffers = [torch.randn(10, 3, 4, generator=generator, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)]
    buffers.append(torch.randn(10, 2, generator=generator, dtype=torch.float32))
    expected = [b.clone() for b in buffers]
    tgt = torch.tensor([7, 2, 9], dtype=torch.int64)
    src = torch.tensor([1, 4, 5], dtype=torch.int64)
    for b in expected:
        b[tgt] = b[src]

    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in buffers], dtype=torch.int64)
    sgl_kernel.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)
    for got, want in zip(buffers, expected):
        assert torch.equal(got, want)


def test_speculative_functions_raise_clearly():
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        sgl_kernel.verify_tree_greedy_cpu()
