"""Bifurcated attention on the GPU, in float16 and through the captured graphs: every sample sees the logits
a single-sample run over the same tokens sees. A tiny random-weight model stands in for a real one, so this
runs with `pytest --noconftest` on a machine without the default model or the web server's packages."""

import pytest
import torch

from engine import synthetic
from engine.generator import Generator
from engine.parallel import SMALLEST_OWN_BUCKET, SharedPrefixDecoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4)


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def tiny_model(request):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(synthetic.SHAPES, "tiny", dict(TINY, num_kv_heads=request.param))
        return synthetic.synthetic_model("tiny", "cuda", max_seq_len=1024)


def single_run_logits(loaded, prompt_ids, tokens):
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + tokens], device="cuda"), 0, last_only=False)[0]
    return logits[len(prompt_ids):]


def test_each_sample_sees_the_logits_of_a_single_sample_run(tiny_model):
    """20 samples (past the 16 rows of the 4-bit kernel), a context whose graph bucket reaches past it into
    stale keys, own tokens across a bucket boundary, then the batch cut to 8 samples in a new order."""
    rng = torch.Generator().manual_seed(0)
    generator = Generator(tiny_model)
    generator.prefill(torch.randint(0, 512, (700,), generator=rng).tolist())  # leaves keys past the prompt
    prompt = generator.cached[:300]
    generator.prefill(prompt)
    steps, kept = SMALLEST_OWN_BUCKET + 8, [19, 3, 0, 7, 12, 5, 16, 9]
    tokens = torch.randint(0, 512, (20, steps), generator=rng)
    decoder = SharedPrefixDecoder(tiny_model)
    decoder.start(len(prompt), rows=20, capacity=steps)
    seen = [[] for _ in range(20)]
    rows = list(range(20))
    for t in range(steps):
        if t == 10:
            decoder.keep_rows(kept)
            rows = kept
        logits = decoder.step(tokens[rows, t])
        for row, sample in enumerate(rows):
            seen[sample].append(logits[row].clone())
    assert len(decoder.graphs) == 3  # 20 rows, 8 rows, and 8 rows past the first own bucket
    for sample in kept:
        expected = single_run_logits(tiny_model, prompt, tokens[sample].tolist())
        torch.testing.assert_close(torch.stack(seen[sample]), expected, rtol=1e-2, atol=1e-2)
    for sample in set(range(20)) - set(kept):
        expected = single_run_logits(tiny_model, prompt, tokens[sample, :10].tolist())
        torch.testing.assert_close(torch.stack(seen[sample]), expected, rtol=1e-2, atol=1e-2)


def test_graphed_steps_match_eager_ones(tiny_model):
    prompt = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens = torch.randint(0, 512, (4, 6), generator=torch.Generator().manual_seed(2))
    runs = []
    for use_graphs in (False, True):
        Generator(tiny_model).prefill(prompt)
        decoder = SharedPrefixDecoder(tiny_model, use_graphs=use_graphs)
        decoder.start(len(prompt), rows=4, capacity=6)
        runs.append(torch.stack([decoder.step(tokens[:, t]).clone() for t in range(6)]))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-2, atol=1e-2)
