"""The decode step captured in CUDA graphs.

At batch 1 a decode step is hundreds of small kernels, and launching them from Python costs more than
running them. A graph replays the whole step with one launch. Shapes must be fixed inside a graph, so
the attention length is fixed too: one graph per bucket of cache lengths (powers of two), each
replayed for every position inside its bucket, with the step's token and position in static buffers.
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
    def __init__(self, model: Transformer, max_seq_len: int, device: torch.device):
        self.model = model
        self.max_seq_len = max_seq_len
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # one memory pool for all buckets: they never run at the same time

    @torch.inference_mode()
    def _capture(self, bucket: int):
        # Warm up on a side stream first, as CUDA graph capture requires, then record the step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model.step(self.token, self.position, bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.step(self.token, self.position, bucket)
        self.pool = graph.pool()
        return graph, logits

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Logits [vocab] after `token` at `position`; the returned tensor is reused by the next step."""
        self.token.fill_(token)
        self.position.fill_(position)
        bucket = bucket_for(position + 1, self.max_seq_len)
        if bucket not in self.graphs:
            # The warm-up runs write this very step's keys and values, so the cache stays right.
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[0, -1]
