"""The graph-captured decode step gives the same tokens as the eager one, across bucket boundaries, also when
each step is queued before the host has read the token that feeds it."""

import pytest
import torch

from engine import synthetic
from engine.generator import Generator
from engine.graphs import SMALLEST_BUCKET
from engine.sampling import SamplingSettings, draw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_model():
    import engine

    return engine.load_model("default", device="cuda", dtype=torch.float16)


def greedy(generator, ids, steps):
    stream = generator.generate(ids, SamplingSettings(temperature=0), max_new_tokens=steps, stop_on_eos=False)
    "".join(stream)
    return stream.result.token_ids


def test_graphed_decode_matches_eager(cuda_model):
    # Start just below the first bucket's end, so decoding crosses into the next bucket's graph.
    ids = cuda_model.tokenizer.encode("Tell me about the sea. " * 60)[: SMALLEST_BUCKET - 10]
    eager = greedy(Generator(cuda_model, use_graphs=False), ids, 40)
    graphed_generator = Generator(cuda_model)
    assert greedy(graphed_generator, ids, 40) == eager
    assert len(graphed_generator.graphs.graphs) == 2


@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_graphed_decode_matches_eager_over_a_quantized_cache(kind):
    import engine

    model = engine.load_model("default", device="cuda", dtype=torch.float16, kv_cache=kind)
    ids = model.tokenizer.encode("Tell me about the sea. " * 60)[: SMALLEST_BUCKET - 10]
    assert greedy(Generator(model), ids, 40) == greedy(Generator(model, use_graphs=False), ids, 40)


def test_graphed_sampling_is_reproducible_with_a_seed(cuda_model):
    ids = cuda_model.tokenizer.encode("Once upon a time")
    settings = SamplingSettings(temperature=0.9, top_p=0.9, seed=7)
    runs = []
    for _ in range(2):
        stream = Generator(cuda_model).generate(ids, settings, max_new_tokens=30, stop_on_eos=False)
        "".join(stream)
        runs.append(stream.result.token_ids)
    assert runs[0] == runs[1]


def test_device_tokens_feed_graphs_from_a_table_in_cpu_memory():
    # A synthetic model's table is untied, so it stays in CPU memory, pinned, and the graph reads its rows over
    # the bus; the tokens come from the device, as a drawn token does.
    tiny = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(synthetic.SHAPES, "tiny", tiny)
        loaded = synthetic.synthetic_model("tiny", "cuda", max_seq_len=512)
    assert loaded.model.embed_tokens.device.type == "cpu" and loaded.model.embed_tokens.is_pinned()
    ids = torch.randint(0, 512, (60,), generator=torch.Generator().manual_seed(5)).tolist()
    generator = Generator(loaded)
    logits, _ = generator.prefill(ids[:40])
    steps = [logits.clone()]
    for position in range(40, len(ids) - 1):
        steps.append(generator._forward(torch.tensor([ids[position]], device="cuda"), position).clone())
    with torch.inference_mode():
        expected = loaded.model(torch.tensor([ids]), 0, last_only=False)[0, 39:-1]
    torch.testing.assert_close(torch.stack(steps), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("settings", [
    SamplingSettings(temperature=0),
    SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, typical=0.95, repetition_penalty=1.1,
                     frequency_penalty=0.2, presence_penalty=0.1, seed=3),
], ids=["greedy", "every-sampler"])
def test_drawing_a_token_never_waits_for_the_gpu(settings):
    # The next decode step is queued behind the draw: a draw that synchronized would wait for that step and
    # leave the GPU idle while the host works.
    logits = torch.randn(32000, device="cuda") * 3
    rng = torch.Generator(device="cuda").manual_seed(1)
    history = list(range(0, 900, 3)) + [31999]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token = draw(logits, history, settings, rng)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0 <= token.id() < 32000
