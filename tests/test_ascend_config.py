"""vllm-ascend's torchair_graph_config: its validation rules, and what it maps to."""

from __future__ import annotations

import pytest

from aotllm import LLM
from aotllm.runtime.ascend_config import TorchairGraphConfig
from aotllm.runtime.engine_args import EngineArgs


def _cfg(enforce_eager=False, **tgc):
    return TorchairGraphConfig.from_additional_config({"torchair_graph_config": tgc},
                                                      enforce_eager)


def test_defaults_are_off():
    assert TorchairGraphConfig.from_additional_config(None) == TorchairGraphConfig()
    assert not _cfg().enabled


def test_enabled_maps_batch_sizes():
    cfg = _cfg(enabled=True, use_cached_graph=True, graph_batch_sizes=[8, 1, 4, 4])
    assert cfg.graph_batch_sizes == (1, 4, 8)
    assert cfg.max_num_seqs(16) == 8
    assert _cfg(enabled=True, graph_batch_sizes_init=True).max_num_seqs(16) == 16


@pytest.mark.parametrize("option", [
    {"use_cached_graph": True}, {"graph_batch_sizes": [1, 2]},
    {"graph_batch_sizes_init": True}, {"use_cached_kv_cache_bytes": True},
])
def test_graph_options_need_graph_mode(option):
    with pytest.raises(ValueError, match="valid only when Torchair graph mode is enabled"):
        _cfg(**option)


@pytest.mark.parametrize("tgc, error, match", [
    ({"enabled": True, "graph_batch_sizes": 4}, TypeError, "list\\[int\\]"),
    ({"enabled": True, "graph_batch_sizes": [1, "2"]}, TypeError, "list\\[int\\]"),
    ({"enabled": True, "graph_batch_sizes": [0, 2]}, ValueError, "positive"),
    ({"enabled": True, "graph_batch_sizes": [2], "graph_batch_sizes_init": True},
     ValueError, "graph_batch_sizes is empty"),
    ({"enabled": True, "use_cached_kv_cache_bytes": True}, ValueError, "use_cached_graph"),
    ({"enabled": True, "enable_kv_nz": True}, ValueError, "enable_kv_nz"),
    ({"enabled": True, "enable_frozen_parameter": False}, ValueError, "enable_frozen_parameter"),
    ({"enabled": True, "graph_sizes": [1]}, ValueError, "unknown torchair_graph_config keys"),
])
def test_bad_configs_are_refused(tgc, error, match):
    with pytest.raises(error, match=match):
        _cfg(**tgc)


def test_graph_mode_and_eager_conflict():
    with pytest.raises(ValueError, match="enforce_eager"):
        _cfg(enforce_eager=True, enabled=True)


def test_other_additional_config_keys_are_refused():
    with pytest.raises(ValueError, match="ascend_scheduler_config"):
        TorchairGraphConfig.from_additional_config({"ascend_scheduler_config": {}})


def test_engine_args_validate_at_construction():
    with pytest.raises(ValueError, match="valid only when"):
        EngineArgs(model="x", additional_config={"torchair_graph_config": {"use_cached_graph": True}})


def test_graph_mode_compiles_for_ge_and_fails_early_here(llama_dir):
    """Graph mode selects the GE backend for the NPU; this host has no torch_npu,
    so compiling stops at once with a message, not deep inside torch."""
    with pytest.raises(ValueError, match="--backend ge needs an Ascend host with torch_npu"):
        LLM(str(llama_dir), additional_config={
            "torchair_graph_config": {"enabled": True, "graph_batch_sizes": [1, 2]}})
