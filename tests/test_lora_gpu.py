"""LoRA on the CUDA fast path: decode steps replayed from captured graphs, where the 4-bit kernel adds each
layer's low-rank update in its epilogue, against one eager many-row pass over the same tokens, where the
layers dequantize for cuBLAS and add the update with a separate product. Switching adapters between
requests reuses the graphs; a request with no adapter replays a graph without their kernels. A tiny random-weight model stands in for a real one, so this runs with
`pytest --noconftest` on a machine without the default model."""

import pytest
import torch

from engine import synthetic
from engine.bench import LORA_PROJECTIONS
from engine.generator import Generator
from engine.lora import LowRankUpdate, layer_shape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def adapted_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(synthetic.SHAPES, "tiny", TINY)
        loaded = synthetic.synthetic_model("tiny", "cuda", max_seq_len=512)
    generator = torch.Generator(device="cuda").manual_seed(3)
    for name, rank, projections in (("alpha", 8, LORA_PROJECTIONS), ("beta", 4, LORA_PROJECTIONS[1::2])):
        updates = []
        for index in range(len(loaded.model.layers)):
            for projection in projections:
                path = f"layers.{index}.{projection}"
                in_features, out_features = layer_shape(loaded.model, path)
                a = torch.randn(rank, in_features, device="cuda", generator=generator) * in_features**-0.5
                b = torch.randn(out_features, rank, device="cuda", generator=generator) * 0.2
                updates.append(LowRankUpdate(path, index, a, b, scale=1.5))
        loaded.adapters.add(name, updates, "random factors")
    return loaded


def many_row_logits(loaded, ids, adapters):
    loaded.adapters.activate(adapters)
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids], device="cuda"), 0, last_only=False)[0]


def graphed_logits(generator, ids, prompt_length, adapters):
    logits, _ = generator.prefill(ids[:prompt_length], adapters)
    steps = [logits.clone()]
    for position in range(prompt_length, len(ids) - 1):
        steps.append(generator._forward([ids[position]], position).clone())
    return torch.stack(steps).view(len(steps), -1)


def test_graphed_decode_with_adapters_matches_the_many_row_path(adapted_model):
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(4)).tolist()
    generator = Generator(adapted_model)
    mixes = [{"alpha": 1.0}, {"alpha": 0.5, "beta": -1.0}, {}, {"beta": 2.0}]
    seen = {}
    for mix in mixes:
        seen[str(mix)] = graphed_logits(generator, ids, 40, mix)
        expected = many_row_logits(adapted_model, ids, mix)[39:-1]
        torch.testing.assert_close(seen[str(mix)], expected.view_as(seen[str(mix)]), rtol=2e-2, atol=2e-2)
    # One bucket: a graph with adapters, captured once and replayed for every mix, and one without.
    assert sorted(generator.graphs.graphs) == [(256, False), (256, True)]
    # The adapters change the logits, so the comparison above could fail.
    assert (seen[str(mixes[0])] - seen[str({})]).abs().max() > 0.1
    assert (seen[str(mixes[3])] - seen[str(mixes[0])]).abs().max() > 0.1


def test_the_mlp_activation_runs_in_the_gate_up_kernel_unless_an_adapter_needs_it(adapted_model, monkeypatch):
    """A decode step's silu(gate) * up comes from the epilogue of the 4-bit kernel of gate and up, unless an applied
    adapter needs gate and up (its update joins them first) or the activation (the down stack's update projects
    it in the same kernel); a prompt's many rows take the activation kernel."""
    from engine.cuda import fused

    calls = []

    def counted(name):
        original = getattr(fused, name)

        def call(*args):
            calls.append(name)
            return original(*args)
        return call

    for name in ("silu_mul", "silu_mul_project"):
        monkeypatch.setattr(fused, name, counted(name))
    model, layers = adapted_model.model, len(adapted_model.model.layers)

    def run(mix, tokens):
        calls.clear()
        adapted_model.adapters.activate(mix)
        with torch.inference_mode():
            model(torch.arange(tokens, device="cuda").view(1, -1) + 7, 0)
        return calls

    assert run({}, 1) == []
    assert run({"alpha": 1.0}, 1) == ["silu_mul_project"] * layers
    assert run({}, 20) == ["silu_mul"] * layers
