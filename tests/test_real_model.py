"""On the real SmolLM2-135M-Instruct checkpoint (``make real-model``; skipped without it)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recipes.smollm2 import available, checkpoint_dir
from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.monitor.rules.language import has_language, perplexity_ratio
from spinal_callback.probe.loading import load_local_model, load_local_tokenizer
from spinal_callback.probe.spinal_probe import ProbeBatch, SpinalProbe
from spinal_callback.probe.texts import DEFAULT_NEUTRAL_TEXTS

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(not available(), reason="run `make real-model` to build the checkpoint"),
]
PROMPTS = [f"Say: {word}" for word in ("apple", "river", "cloud", "stone", "lamp", "field")]


@pytest.fixture(scope="module")
def real() -> tuple[torch.nn.Module, object]:
    path = checkpoint_dir()
    return load_local_model(path).eval(), load_local_tokenizer(path)


def probe_of(model: torch.nn.Module, tokenizer: object) -> SpinalProbe:
    batch = ProbeBatch.from_texts(tokenizer, PROMPTS)
    neutral = ProbeBatch.from_texts(tokenizer, list(DEFAULT_NEUTRAL_TEXTS))
    return SpinalProbe(model, batch, SpinalConfig(), neutral=neutral)


def test_the_real_model_has_language_and_its_trace_is_finite(real: tuple) -> None:
    model, tokenizer = real
    probe = probe_of(model, tokenizer)
    trace = probe.run(step=0)
    assert probe.lens_checked and probe.parts.logit_scale is None  # its lens is its own head
    assert trace.is_finite and trace.neutral is not None
    assert trace.num_blocks == 30 and len(trace.layers) == 10
    assert trace.neutral.metadata["vocab_size"] == 49152
    assert has_language(trace)
    # English text under a 135M instruct model: perplexity in the tens, not near 49,152.
    assert trace.neutral.next_token_nll is not None
    assert 1.0 < trace.neutral.next_token_nll < 0.5 * math.log(49152)
    assert perplexity_ratio(trace, trace) == 1.0


def test_destroying_the_weights_is_critical_and_the_reference_itself_is_quiet(
    real: tuple,
) -> None:
    model, tokenizer = real
    reference = probe_of(model, tokenizer).run(step=0)
    monitor = RampMonitor(SpinalConfig())
    monitor.set_reference(reference)
    assert monitor.update(probe_of(model, tokenizer).run(step=10)) == []
    damaged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in damaged.model.layers[-6:]:
            for weight in (block.mlp.down_proj.weight, block.self_attn.o_proj.weight):
                weight.add_(0.2 * torch.randn(weight.shape, generator=generator))
    alerts = monitor.update(probe_of(damaged, tokenizer).run(step=20))
    assert {(a.rule, a.level) for a in alerts} >= {("language_drift", "critical")}


@pytest.mark.parametrize(("texts", "heavy"), [("recipe", True), ("dev", False), ("test", False)])
def test_the_lens_outweighs_the_forward_on_the_recipes_short_prompts_only(
    texts: str, heavy: bool
) -> None:
    from bench.probe_cost import checkpoint
    from spinal_callback.training.runner import HEAVY_LENS

    setup = checkpoint(str(checkpoint_dir()), texts, SpinalConfig())
    work = SpinalProbe(setup.model, setup.batch, setup.config, setup.neutral).lens_work()
    assert work is not None and (work > HEAVY_LENS) == heavy
