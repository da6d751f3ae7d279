"""Pure-PyTorch stand-in for the `sgl_kernel` functions that SGLang 0.5.23 imports on its CPU path.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a handful of ``*_cpu`` functions from ``sgl_kernel``
at module load. Their CPU build is not published on PyPI, so this package provides exactly those names:

* ``assign_req_to_token_pool_cpu`` and ``copy_all_layer_kv_cache_cpu`` are implemented with plain torch
  indexing (same semantics as SGLang's Triton kernels);
* the speculative-decoding helpers only need to exist and raise ``NotImplementedError``.

It deliberately registers no ``torch.ops.sgl_kernel`` operators, so SGLang's AMX detection stays False and
every fused layer falls back to its ``forward_native`` path. Re-scan SGLang for ``from sgl_kernel import``
on every SGLang upgrade (tests/test_sgl_kernel_cpu.py checks the list against the installed SGLang).
"""

import ctypes

import torch

__version__ = "0.5.23.0"


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """Write each request's new slots into its ``req_to_token`` row.

    For request ``i`` (in order) the next ``end_offset[i] - start_offset[i]`` entries of ``out_cache_loc`` go to
    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]``. ``pool_len`` is unused (kept for the
    kernel's signature).
    """
    del pool_len
    rows = req_pool_indices.tolist()
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    cursor = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[cursor : cursor + n].to(req_to_token.dtype)
        cursor += n


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """Copy rows ``src_loc[j] -> tgt_loc[j]`` in every KV buffer given by base address and row size in bytes.

    ``data_ptrs[b]`` is the base address of buffer ``b`` and ``strides[b]`` its bytes per row. Rows are moved with
    ``ctypes.memmove`` in pair order, as the kernel does (callers never pass overlapping src/tgt sets).
    """
    ptrs = [int(p) for p in data_ptrs.tolist()]
    row_bytes = [int(s) for s in strides.tolist()]
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, stride in zip(ptrs, row_bytes):
        for tgt, src in pairs:
            ctypes.memmove(base + tgt * stride, base + src * stride, stride)


def _speculative_only(name):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: speculative decoding is not available in the CPU stand-in")

    unavailable.__name__ = name
    return unavailable


assign_draft_cache_locs_contiguous_cpu = _speculative_only("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _speculative_only("assign_extend_cache_locs_cpu")
build_draft_decode_metadata_cpu = _speculative_only("build_draft_decode_metadata_cpu")
build_tree_kernel_efficient_cpu = _speculative_only("build_tree_kernel_efficient_cpu")
fill_accept_out_cache_loc_cpu = _speculative_only("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _speculative_only("fill_bonus_tokens_cpu")
rotate_input_ids_cpu = _speculative_only("rotate_input_ids_cpu")
verify_tree_greedy_cpu = _speculative_only("verify_tree_greedy_cpu")

__all__ = [name for name in dir() if name.endswith("_cpu")]

# Keep `torch` referenced so importing this package initialises torch first, as the real one does.
_ = torch
