"""Memory guidance: classifier-free guidance on the retrieved long-term entries of a revisit's chunks.

Its unconditional branch is the same context restricted to the sink and the short-term window (less
egolcd's retrieved entries, less dense's older chunks); with rotary positions the sink and window keep
their offsets to the current chunk, so that branch computes what the sink-window policy's context does.
"""

from __future__ import annotations

import pytest
import torch
from test_fast_path import PRESET, K, make_inputs  # the same tiny inputs
from test_fast_path_equality import RESERVE, make_model

from egolcd.chunk_loop import chunk_denoiser
from egolcd.flow import get_sampler, get_sigmas
from egolcd.memory import ContextArena, MemoryPolicy
from egolcd.pipeline import generate_chunk

pytestmark = pytest.mark.usefixtures("one_thread_module")


@torch.inference_mode()
def memory_after(model, chunks: int = 7, name: str = "egolcd"):
    """A memory state after ``chunks`` chunks (segments change every 2 chunks)."""
    policy = MemoryPolicy.from_name(name, K, PRESET.memory)
    state, arena = policy.init_state(), ContextArena(reserve=RESERVE)
    text, keys, noise = make_inputs(chunks + 2)
    sigmas, sample = get_sigmas(2, 5.0), get_sampler("euler")
    for c in range(chunks):
        seg = (c // 2) % len(text)
        generate_chunk(model, policy, state, noise[c], text[seg], keys[seg], seg, [], sigmas, sample, arena=arena)
    return policy, state, arena, text, keys, noise[chunks]


@pytest.mark.parametrize("name", ["egolcd", "dense"])
@torch.inference_mode()
def test_short_term_part_is_the_sink_window_context(name):
    model = make_model()
    policy, state, arena, text, keys, x = memory_after(model, name=name)
    ctx = policy.context(state, keys[1], revisit=[1], arena=arena, segment=2, count_retrieval=False)
    if name == "egolcd":
        assert any(s.kind == "retrieved" and s.segment == 1 for s in ctx.spans)
    short = ctx.short_term(PRESET.memory.window_chunks, PRESET.memory.sink)
    sink_window = MemoryPolicy.from_name("sink-window", K, PRESET.memory).context(state, keys[1], segment=2)
    if name == "dense":  # dense holds no sink chunk of its own: build the sink-window state from the same chunks
        sw_policy = MemoryPolicy.from_name("sink-window", K, PRESET.memory)
        sw_state = sw_policy.init_state()
        for item in state.window.chunks:
            sw_state.window.push(item)
        sw_state.chunk = state.chunk
        sink_window = sw_policy.context(sw_state, keys[1], segment=2)
    assert sorted(s.chunk for s in short.spans) == sorted(s.chunk for s in sink_window.spans)
    assert short.tokens_per_layer == sink_window.tokens_per_layer < ctx.tokens_per_layer
    t = torch.tensor([0.7])
    v_short = chunk_denoiser(model, short, text[2])(x, t)
    v_sink_window = chunk_denoiser(model, sink_window, text[2])(x, t)
    if name == "egolcd":  # the same offsets to the current chunk (positions shifted): the same function
        torch.testing.assert_close(v_short, v_sink_window, atol=1e-5, rtol=1e-4)
    else:  # dense keeps absolute positions: its chunk 0 stays where it was, farther than sink-window's sink
        assert short.spans[0].chunk == 0 and (v_short - v_sink_window).abs().max() > 1e-4


@torch.inference_mode()
def test_memory_guidance_extrapolates_from_sink_window_towards_memory():
    model = make_model()
    policy, state, arena, text, keys, x = memory_after(model)
    ctx = policy.context(state, keys[1], revisit=[1], arena=arena, segment=2, count_retrieval=False)
    t = torch.tensor([0.9])
    v_mem = chunk_denoiser(model, ctx, text[2])(x, t).clone()
    short = ctx.short_term(PRESET.memory.window_chunks, PRESET.memory.sink)
    v_bare = chunk_denoiser(model, short, text[2])(x, t)
    assert (v_mem - v_bare).abs().max() > 1e-3  # the retrieved entries change the prediction
    torch.testing.assert_close(chunk_denoiser(model, ctx, text[2], memory_guidance=1.0, short_term=short)(x, t), v_mem)
    torch.testing.assert_close(chunk_denoiser(model, ctx, text[2], memory_guidance=0.0, short_term=short)(x, t), v_bare)
    v_g = chunk_denoiser(model, ctx, text[2], memory_guidance=2.5, short_term=short)(x, t)
    torch.testing.assert_close(v_g, v_bare + 2.5 * (v_mem - v_bare), atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_memory_guidance_applies_only_to_a_revisits_chunks():
    model = make_model()
    sigmas, sample = get_sigmas(2, 5.0), get_sampler("euler")
    outs = {}
    for revisit in ([], [1]):
        for g in (1.0, 3.0):
            policy, state, arena, text, keys, x = memory_after(model)
            outs[len(revisit), g], _ = generate_chunk(
                model, policy, state, x, text[2], keys[1], 2, revisit, sigmas, sample, arena=arena, memory_guidance=g
            )
    torch.testing.assert_close(outs[0, 1.0], outs[0, 3.0], atol=0, rtol=0)  # no revisit: guidance is off
    assert (outs[1, 1.0] - outs[1, 3.0]).abs().max() > 1e-3
