"""Tokenizers (HF tokenizer.json, sentencepiece tokenizer.model, GGUF-embedded vocabularies), incremental
detokenizing and chat templates.

Every source is turned into a `tokenizers.Tokenizer` (sentencepiece models are used through their own
library), so encoding and decoding behave the same whatever the checkpoint format.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ModelError


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template."""

    def __init__(self, backend, bos_id: int | None, eos_ids: list[int], add_bos: bool, chat_template: str | None,
                 bos_token: str = "", eos_token: str = ""):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size = backend.vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Plain text to ids. Special-token spellings in the text are treated as ordinary text."""
        return self._with_bos(self.backend.encode(text, special=False), add_bos)

    def encode_chat(self, text: str) -> list[int]:
        """Text rendered from a template: special-token spellings become special tokens; BOS as the model says."""
        ids = self.backend.encode(text, special=True)
        if ids and ids[0] == self.bos_id:
            return ids
        return self._with_bos(ids, self.add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ModelError("this model has no chat template; use a raw prompt or the roleplay prompt format")
        try:
            template = _jinja().from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as error:
            raise ModelError(f"the model's chat template failed to render: {error}") from None


def _raise_exception(message):
    raise TemplateError(message)


def _jinja():
    # Templates come from model files, i.e. from strangers: run them sandboxed, with HF's whitespace rules.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte character.

    Decoding a token on its own can lose context (a leading space, half of a UTF-8 sequence), so we decode
    a short window that starts one token back and emit only what the window gained since last time.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window_start = 0
        self.window_emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids[self.window_start:])
        if text.endswith("\ufffd") or not text.startswith(self.window_emitted):
            return ""  # an incomplete character: wait for the bytes that complete it
        piece = text[len(self.window_emitted):]
        self.window_start = len(self.ids) - 1
        self.window_emitted = self.tokenizer.decode(self.ids[self.window_start:])
        return piece


class HFBackend:
    """A `tokenizers.Tokenizer`; special tokens are parsed only when asked to."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Special-token parsing is a setting on the shared tokenizer, so a switch and its encode go together.
        self.lock = threading.Lock()

    def encode(self, text: str, special: bool) -> list[int]:
        with self.lock:
            self.tokenizer.encode_special_tokens = not special
            return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


class SentencePieceBackend:
    """A sentencepiece model; special-token spellings are split out by hand when parsing them is asked for."""

    def __init__(self, path: str, special_tokens: list[str]):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.processor.get_piece_size()
        ids = {t: self.token_id(t) for t in special_tokens if t}
        self.special = {t: i for t, i in ids.items() if i is not None}

    def encode(self, text: str, special: bool) -> list[int]:
        if not special or not self.special:
            return self.processor.encode(text)
        ids, rest = [], text
        while rest:
            hits = [(rest.find(t), t) for t in self.special if t in rest]
            if not hits:
                ids += self.processor.encode(rest)
                break
            at, token = min(hits)
            if at:
                ids += self.processor.encode(rest[:at])
            ids.append(self.special[token])
            rest = rest[at + len(token):]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def token_id(self, token: str) -> int | None:
        # sentencepiece answers <unk>'s id for a piece it lacks; callers need to know it is missing.
        token_id = self.processor.piece_to_id(token)
        return token_id if self.processor.id_to_piece(token_id) == token else None


def _token_text(value) -> str:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} objects."""
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def load_from_folder(folder: str, settings: dict, bos_id, eos_ids) -> Tokenizer:
    """An HF model folder: tokenizer.json preferred, tokenizer.model (sentencepiece) otherwise."""
    bos_token = _token_text(settings.get("bos_token"))
    eos_token = _token_text(settings.get("eos_token"))
    json_path = os.path.join(folder, "tokenizer.json")
    spm_path = os.path.join(folder, "tokenizer.model")
    if os.path.exists(json_path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFBackend(HFTokenizer.from_file(json_path))
        except Exception as error:
            raise ModelError(f"{json_path}: cannot read the tokenizer ({error})") from None
    elif os.path.exists(spm_path):
        added = [_token_text(t) for t in settings.get("added_tokens_decoder", {}).values()]
        backend = SentencePieceBackend(spm_path, [bos_token, eos_token, *added])
    else:
        raise ModelError(f"{folder}: no tokenizer.json or tokenizer.model found")
    if bos_token and backend.token_id(bos_token) is not None:
        bos_id = backend.token_id(bos_token)
    if eos_token and backend.token_id(eos_token) is not None and backend.token_id(eos_token) not in eos_ids:
        eos_ids = [backend.token_id(eos_token), *eos_ids]
    add_bos = bool(settings.get("add_bos_token", bos_id is not None and backend.__class__ is SentencePieceBackend))
    return Tokenizer(backend, bos_id, eos_ids, add_bos, settings.get("chat_template"), bos_token, eos_token)


GGUF_CONTROL = 3  # token_type of special tokens in GGUF vocabularies


def load_from_gguf(reader) -> Tokenizer:
    """The vocabulary embedded in a GGUF file: gpt2-style byte-level BPE or llama sentencepiece."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=False))
        # SmolLM-style vocabularies split digits one by one before the GPT-2 byte-level split.
        digits = [pre_tokenizers.Digits(individual_digits=True)] if field("tokenizer.ggml.pre") == "smollm" else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(digits + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        tok = _sentencepiece_bpe(tokens, field("tokenizer.ggml.scores"), types, vocab)
    else:
        raise ModelError(f"the GGUF tokenizer type {kind!r} is not supported (gpt2 and llama are)")
    specials = [AddedToken(t, special=True, normalized=False) for t, kind_ in zip(tokens, types) if kind_ == GGUF_CONTROL]
    tok.add_special_tokens(specials)
    bos_id = field("tokenizer.ggml.bos_token_id")
    eos_id = field("tokenizer.ggml.eos_token_id")
    eos_ids = [] if eos_id is None else [int(eos_id)]
    add_bos = bool(field("tokenizer.ggml.add_bos_token", kind == "llama"))
    return Tokenizer(HFBackend(tok), bos_id, eos_ids, add_bos, field("tokenizer.chat_template"),
                     tokens[bos_id] if bos_id is not None else "", tokens[eos_id] if eos_id is not None else "")


def _sentencepiece_bpe(tokens, scores, types, vocab):
    """Llama's sentencepiece BPE as a `tokenizers` BPE: merges ranked by the score of the merged piece."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    normal = [i for i, kind in enumerate(types) if kind == 1]
    merges = []
    for i in normal:
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[i], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    tok = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], byte_fallback=True, fuse_unk=True,
                                 unk_token=tokens[0]))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok
