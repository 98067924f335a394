"""The decode step captured in CUDA graphs.

At batch 1 a decode step is hundreds of small kernels, and launching them from Python costs more than
running them. A graph replays the whole step with one launch. Shapes must be fixed inside a graph, so
the attention length is fixed too: one graph per bucket of cache lengths (powers of two), each
replayed for every position inside its bucket, with the step's position and token in static buffers (the
token's id, looked up inside the graph, or its row, where the table stays in CPU memory: EmbeddedTokens).

A model split over GPUs has one graph per (segment, bucket), each captured on its segment's device, since
a graph belongs to one device. Between them the hidden state is copied from one segment's output to the
next one's input buffer, outside the graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cuda import fused
from .model import Transformer

SMALLEST_BUCKET = 256


def bucket_for(length: int, max_seq_len: int) -> int:
    """The smallest bucket that holds `length` cache slots."""
    bucket = SMALLEST_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_seq_len)


class EmbeddedTokens:
    """A graph's token input on the model's first device, for up to `rows` tokens at one position each: `write`
    fills it before a replay, and `hidden`, called inside the capture, turns it into the first segment's input.

    The buffer holds token ids, which may come straight from the device's own draw (sampling.draw), so that a
    step can be queued before the host has read the token that feeds it. The graph looks the rows up itself:
    in the table where it sits on the device, and from the pinned pages of a table kept in CPU memory
    (model.embedding_device), which the GPU reads over the bus (fused.table_rows). Without Triton such a table's
    rows are gathered on the host, which must then know the ids first."""

    def __init__(self, model: Transformer, rows: int):
        self.model, self.table = model, model.embed_tokens
        device = model.segments[0].device
        self.rows_from_host = self.table.device != device and not fused.available()
        shape = (rows, 1, model.config.hidden_size) if self.rows_from_host else (rows, 1)
        self.buffer = torch.zeros(shape, dtype=self.table.dtype if self.rows_from_host else torch.long, device=device)

    def write(self, tokens: torch.Tensor) -> None:
        """Take the next replay's tokens (ids [n], on the CPU or on a GPU) into the first n rows."""
        count = len(tokens)
        if self.rows_from_host:
            self.buffer[:count, 0].copy_(self.model.host_rows(tokens.cpu()), non_blocking=True)
        elif tokens.device.type == "cpu" and count == 1:
            self.buffer[0, 0].fill_(int(tokens[0]))  # by value: a copy from pageable memory would wait for the GPU
        else:
            self.buffer[:count, 0].copy_(tokens)

    def hidden(self, rows: int) -> torch.Tensor:
        """The hidden states [rows, 1, hidden] of the first `rows` tokens."""
        if self.rows_from_host:
            return self.buffer[:rows]
        ids = self.buffer[:rows]
        return F.embedding(ids, self.table) if self.table.device == ids.device else fused.table_rows(self.table, ids)


class GraphedDecoder:
    def __init__(self, model: Transformer, max_seq_len: int):
        self.model = model
        self.max_seq_len = max_seq_len
        segments = model.segments
        # Each segment's graph reads static buffers on its own device: the first one the token, the others the
        # hidden state handed on (handed_on[i] feeds segment i + 1); all of them the position.
        self.token = EmbeddedTokens(model, 1)
        hidden = (1, 1, model.config.hidden_size)
        self.handed_on = [torch.zeros(hidden, dtype=model.embed_tokens.dtype, device=s.device) for s in segments[1:]]
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
            def run():  # inside the stream or the capture: the first segment's input may be a lookup to record
                x = self.token.hidden(1) if index == 0 else self.handed_on[index - 1]
                return self.model.run_segment(index, x, self.positions[index], bucket)

            with torch.cuda.device(segment.device):
                # Warm up on the side stream first, as CUDA graph capture requires, then record the segment.
                stream = self.streams[index]
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pools[index], stream=stream):
                    output = run()
                self.pools[index] = graph.pool()
            captured.append((graph, output))
        return captured

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position: int, with_adapters: bool = False) -> torch.Tensor:
        """Logits [vocab] after `token` (a one-element tensor of its id, on the CPU or on a GPU) at `position`; the
        returned tensor is reused by the next step.

        `with_adapters` says whether the model applies LoRA adapters now: a graph records the adapters' kernels
        or not, so each bucket has a graph for either case."""
        self.token.write(token)
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
                self.handed_on[index - 1].copy_(graphs[index - 1][1])
            graph.replay()
        return output[0, -1]
