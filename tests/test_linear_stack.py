"""LinearStack: layers that read one input run as one product where their weights can be stacked, and one
after another where they cannot; either way the output is each layer's own product, side by side."""

import pytest
import torch
import torch.nn.functional as F

from engine.model import LinearStack
from engine.quant import Q4Linear


def q4(out_features, in_features=128, group_size=32, seed=0, perm=None):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    layer = Q4Linear.quantize(weight, group_size)
    if perm is not None:
        layer = Q4Linear(layer.packed, layer.scale, layer.offset, layer.group_size, perm)
    return layer


def separate_outputs(layers, x):
    return torch.cat([layer(x) if isinstance(layer, Q4Linear) else F.linear(x, layer) for layer in layers], dim=-1)


@pytest.mark.parametrize("case,parts", [
    ("same groups", 1),
    ("group sizes differ", 3),
    ("4-bit and dense", 3),
    ("dense", 1),
])
def test_stack_matches_each_layer_and_stacks_only_what_can_share_a_weight(case, parts):
    layers = {
        "same groups": lambda: [q4(48, seed=1), q4(16, seed=2), q4(16, seed=3)],
        "group sizes differ": lambda: [q4(48, seed=1), q4(16, group_size=64, seed=2), q4(16, seed=3)],
        "4-bit and dense": lambda: [q4(48, seed=1), torch.randn(16, 128), q4(16, seed=3)],
        "dense": lambda: [torch.randn(48, 128), torch.randn(16, 128), torch.randn(16, 128)],
    }[case]()
    x = torch.randn(2, 3, 128)
    reference = separate_outputs(layers, x)
    stack = LinearStack(dict(zip(("q_proj", "k_proj", "v_proj"), layers)))
    assert len(stack.parts) == parts
    assert (stack.in_features, stack.out_features) == (128, 80)
    assert stack.rows("k_proj") == range(48, 64)
    torch.testing.assert_close(stack(x), reference, rtol=1e-5, atol=1e-5)

    # A low-rank update is added to the stacked output the same way, however the stack runs.
    h, b = torch.randn(2, 3, 8), torch.randn(80, 8)
    torch.testing.assert_close(stack(x, (h, b)), reference + h @ b.t(), rtol=1e-5, atol=1e-4)


def test_act_order_layers_stack_only_with_the_same_input_order():
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(5))
    other = torch.randperm(128, generator=torch.Generator().manual_seed(6))
    same = [q4(32, seed=1, perm=perm), q4(32, seed=2, perm=perm.clone())]
    mixed = [q4(32, seed=1, perm=perm), q4(32, seed=2, perm=other)]
    x = torch.randn(4, 128)
    for layers, parts in ((same, 1), (mixed, 2)):
        reference = separate_outputs(layers, x)
        stack = LinearStack({"gate_proj": layers[0], "up_proj": layers[1]})
        assert len(stack.parts) == parts
        torch.testing.assert_close(stack(x), reference, rtol=1e-5, atol=1e-5)
