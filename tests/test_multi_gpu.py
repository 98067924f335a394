"""A model split over two GPUs gives the same greedy tokens as on one, stays within its plan, and a model
that does not fit is refused before anything is allocated. Speed lives in bench/multi_gpu.py."""

import pytest
import torch

import engine
from engine import split
from engine.errors import ModelError
from engine.generator import Generator
from engine.sampling import SamplingSettings
from engine.split import GiB, Footprint, checkpoint_shapes
from engine.synthetic import synthetic_config, synthetic_model, weight_shapes

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

CONTEXT = 4096
DEVICES = (torch.device("cuda", 0), torch.device("cuda", 1))


def half_split(footprint: Footprint) -> str:
    """A --gpu-split that gives GPU 0 room for exactly the first half of the layers."""
    first = footprint.share(0, range(len(footprint.layers) // 2), True, False).total
    # 1 MiB over, far less than a layer; GPU 1's share is capped at its free memory.
    return f"{first / GiB + 0.001},1000"


def synthetic_footprint(name: str) -> Footprint:
    config = synthetic_config(name)
    return Footprint.of(config, weight_shapes(config), CONTEXT)


def greedy_tokens(generator: Generator, prompt: list[int], steps: int) -> list[int]:
    generator.cached = []  # prefill the whole prompt, even when the cache holds it from a previous call
    logits, _ = generator.prefill(prompt)
    tokens = []
    for _ in range(steps):
        tokens.append(int(torch.argmax(logits)))
        logits = generator._forward(tokens[-1:], len(prompt) + len(tokens) - 1)
    return tokens


def planned_totals(loaded, footprint: Footprint) -> list[int]:
    segments = loaded.model.segments
    return [footprint.share(s.device.index, s.layers, i == 0, i == len(segments) - 1).total
            for i, s in enumerate(segments)]


@pytest.fixture(scope="module")
def halves():
    """Synthetic llama2-7b with half its layers on each GPU; what each GPU held before it; its loading peaks."""
    torch.cuda.init()  # the allocator's statistics exist only once CUDA is initialized
    before = [torch.cuda.memory_allocated(d) for d in DEVICES]
    for device in DEVICES:
        torch.cuda.reset_peak_memory_stats(device)
    loaded = synthetic_model("llama2-7b", max_seq_len=CONTEXT, gpu_split=half_split(synthetic_footprint("llama2-7b")))
    load_peaks = [torch.cuda.max_memory_allocated(d) - start for d, start in zip(DEVICES, before)]
    return loaded, before, load_peaks


@pytest.fixture(scope="module")
def whole():
    return synthetic_model("llama2-7b", "cuda:0", max_seq_len=CONTEXT)


def random_prompt(length: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()


# First in the file: `before` is measured when the `halves` fixture is built, before any other model.
def test_a_split_stays_within_its_plan_over_a_full_context(halves):
    loaded, before, load_peaks = halves
    segments = loaded.model.segments
    assert [(s.device, s.layers) for s in segments] == [(DEVICES[0], range(0, 16)), (DEVICES[1], range(16, 32))]
    prompt = random_prompt(CONTEXT - 16, loaded.config.vocab_size)
    generator = Generator(loaded)
    greedy_tokens(generator, prompt, 15)  # captures the decode graphs
    for device in DEVICES:
        torch.cuda.reset_peak_memory_stats(device)
    greedy_tokens(generator, prompt, 15)  # prefill chunks up to the full cache length, with the graphs' pools held
    planned = planned_totals(loaded, synthetic_footprint("llama2-7b"))
    torch.cuda.empty_cache()  # what stays reserved beyond the allocated tensors is the graphs' pools
    for device, start, load_peak, plan in zip(DEVICES, before, load_peaks, planned):
        graph_pools = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        running = torch.cuda.max_memory_allocated(device) - start + graph_pools
        # The reserve is for memory outside PyTorch's allocator (the CUDA context's growth), not seen here.
        print(f"{device}: loading {load_peak / GiB:.2f} GiB, running {running / GiB:.2f} GiB (graph pools "
              f"{graph_pools / GiB:.2f}), planned {plan / GiB:.2f} GiB with {split.RESERVE / GiB:.1f} reserve")
        assert max(load_peak, running) <= plan - split.RESERVE


def test_split_synthetic_model_gives_the_tokens_of_one_gpu(halves, whole):
    split_model = halves[0]
    prompt = random_prompt(250, whole.config.vocab_size)  # decoding crosses from the first graph bucket into the next
    assert greedy_tokens(Generator(split_model), prompt, 24) == greedy_tokens(Generator(whole), prompt, 24)
    eager = greedy_tokens(Generator(whole, use_graphs=False), prompt, 24)
    assert greedy_tokens(Generator(split_model, use_graphs=False), prompt, 24) == eager


def test_split_default_model_gives_the_tokens_of_one_gpu():
    try:
        path = engine.loader.default_model_path()
    except ModelError:
        pytest.skip("the default model is not installed")
    config, shapes = checkpoint_shapes(path, quantize=None)
    split_model = engine.load_model("default", max_seq_len=2048,
                                    gpu_split=half_split(Footprint.of(config, shapes, 2048)))
    assert len(split_model.model.segments) == 2
    one_gpu = engine.load_model("default", device="cuda:0", max_seq_len=2048)
    tokenizer = one_gpu.tokenizer
    ids = tokenizer.encode_chat(tokenizer.render_chat([{"role": "user", "content": "Tell me a story."}]))
    settings = SamplingSettings(temperature=0)
    replies = []
    for loaded in (one_gpu, split_model):
        stream = Generator(loaded).generate(ids, settings, max_new_tokens=40, stop_on_eos=False)
        "".join(stream)
        replies.append(stream.result.token_ids)
    assert replies[0] == replies[1]


def test_seeded_sampling_on_a_split_model_draws_on_the_last_gpu(halves):
    loaded = halves[0]
    generator = Generator(loaded)
    logits, _ = generator.prefill(random_prompt(32, loaded.config.vocab_size))
    assert logits.device == loaded.device == DEVICES[1]
    assert generator._rng(SamplingSettings(seed=3)).device == DEVICES[1]


def test_a_budget_too_small_is_refused_before_anything_is_allocated():
    before = [torch.cuda.memory_allocated(d) for d in DEVICES]
    with pytest.raises(ModelError, match=r"^the model does not fit: it needs .* GiB .* the GPUs offer 2 x 10.0 GiB"):
        synthetic_model("llama2-70b", max_seq_len=CONTEXT, gpu_split="10,10")
    assert [torch.cuda.memory_allocated(d) for d in DEVICES] == before
