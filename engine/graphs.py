"""The decode step captured in CUDA graphs.

At batch 1 a decode step is hundreds of small kernels, and launching them from Python costs more than
running them. A graph replays the whole step with one launch. Shapes must be fixed inside a graph, so
the attention length is fixed too: one graph per bucket of cache lengths (powers of two), each
replayed for every position inside its bucket, with the step's token and position in static buffers.

A model split over GPUs has one graph per (segment, bucket), each captured on its segment's device, since
a graph belongs to one device. Between them the hidden state is copied from one segment's output to the
next one's input buffer, outside the graphs.
"""

from __future__ import annotations

import torch

from .model import Transformer

SMALLEST_BUCKET = 256


def bucket_for(length: int, max_seq_len: int) -> int:
    """The smallest bucket that holds `length` cache slots."""
    bucket = SMALLEST_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_seq_len)


class GraphedDecoder:
    def __init__(self, model: Transformer, max_seq_len: int):
        self.model = model
        self.max_seq_len = max_seq_len
        segments = model.segments
        # Each segment's graph reads static buffers on its own device: the first one the token, the others
        # the hidden state handed on; all of them the position.
        hidden = (1, 1, model.config.hidden_size)
        self.inputs = [torch.zeros(1, 1, dtype=torch.long, device=segments[0].device)]
        self.inputs += [torch.zeros(hidden, dtype=model.embed_tokens.dtype, device=s.device) for s in segments[1:]]
        self.positions = [torch.zeros(1, dtype=torch.long, device=s.device) for s in segments]
        # One capture stream and one memory pool per segment: a pool serves one device, and all buckets share
        # it because they never run at the same time.
        self.streams = [torch.cuda.Stream(s.device) for s in segments]
        self.pools = [None] * len(segments)
        # (bucket, with adapters) -> each segment's graph and output
        self.graphs: dict[tuple[int, bool], list[tuple[torch.cuda.CUDAGraph, torch.Tensor]]] = {}

    @torch.inference_mode()
    def _capture(self, bucket: int) -> list[tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
        captured = []
        for index, segment in enumerate(self.model.segments):
            args = (index, self.inputs[index], self.positions[index], bucket)
            with torch.cuda.device(segment.device):
                # Warm up on the side stream first, as CUDA graph capture requires, then record the segment.
                stream = self.streams[index]
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.model.run_segment(*args)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pools[index], stream=stream):
                    output = self.model.run_segment(*args)
                self.pools[index] = graph.pool()
            captured.append((graph, output))
        return captured

    @torch.inference_mode()
    def step(self, token: int, position: int, with_adapters: bool = False) -> torch.Tensor:
        """Logits [vocab] after `token` at `position`; the returned tensor is reused by the next step.

        `with_adapters` says whether the model applies LoRA adapters now: a graph records the adapters' kernels
        or not, so each bucket has a graph for either case."""
        self.inputs[0].fill_(token)
        for buffer in self.positions:
            buffer.fill_(position)
        bucket = bucket_for(position + 1, self.max_seq_len)
        key = (bucket, with_adapters)
        if key not in self.graphs:
            # Warm-up and capture write this step's cache slot with whatever the input buffers held; the
            # replay below writes it again with the real hidden states.
            self.graphs[key] = self._capture(bucket)
        graphs = self.graphs[key]
        for index, (graph, output) in enumerate(graphs):
            if index:
                # A copy between devices waits for the source's stream and makes the target's stream wait for it.
                self.inputs[index].copy_(graphs[index - 1][1])
            graph.replay()
        return output[0, -1]
