"""Tokenizers: the default model's GGUF vocabulary against HF's, special tokens, chat templates, incremental
decoding, and both sentencepiece paths (tokenizer.model files and GGUF llama vocabularies)."""

import functools
import io
import random

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers

from engine.errors import ModelError
from engine.tokenizer import IncrementalDecoder, Tokenizer, _sentencepiece_bpe, load_from_folder
from references import hf_tokenizer, our_model

TEXTS = [
    "Hello world",
    "Numbers 12345, 3.14159 and 1,000,000 in 2024",
    "héllo wörld, café crème, naïve Ångström",
    "emoji 😀🎉 and a family 👨‍👩‍👧 flag 🇫🇷",
    'def f(x):\n    return {"a": x ** 2}  # comment\n',
    "tabs\t\tand   runs of    spaces\n\n\nand newlines  ",
    "日本語のテキストと中文和한국어",
    "  leading and trailing  ",
    "don't I'll we're you've",
    "x² ½ ① ٣ २ ２０２４",
    "Zahlen: 1, 2, 3 und dann 😀 emoji —",
]
MULTIBYTE = ["😀🎉👨‍👩‍👧", "日本語のテキスト", "crème brûlée à la française", "mixed: é 中 😀 ok"]


@functools.lru_cache(maxsize=None)
def smollm2_reference() -> HFTokenizer:
    """HF's tokenizer for the GGUF file, corrected to SmolLM2's own pre-tokenizer.

    The file says `tokenizer.ggml.pre = "smollm"`: numeric characters are split one by one before the
    GPT-2 byte-level regex. That is the Digits(individual_digits=True) step in SmolLM2's original
    tokenizer.json and the `\\p{N}` regex llama.cpp runs first for "smollm". transformers' GGUF converter
    ignores the field and keeps only the byte-level step, so on its own it tokenizes " ½¼" as one
    pre-token; the vocabulary and merges it builds are right, so we add the missing step back.
    """
    tokenizer = HFTokenizer.from_str(hf_tokenizer().backend_tokenizer.to_str())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), tokenizer.pre_tokenizer])
    tokenizer.encode_special_tokens = True  # compare plain-text encoding
    return tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_matches_smollm2_reference(text):
    ours = our_model().tokenizer
    assert ours.encode(text) == smollm2_reference().encode(text, add_special_tokens=False).ids


def test_numerals_are_split_as_smollm2_splits_them_not_as_the_hf_gguf_converter_does():
    text = "x² ½¼"
    ours = our_model().tokenizer.encode(text)
    converter = hf_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert ours != converter  # the difference the reference above corrects; see its docstring
    assert ours == smollm2_reference().encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(text):
    tokenizer = our_model().tokenizer
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_spellings_are_text_in_encode_and_tokens_in_encode_chat():
    tokenizer = our_model().tokenizer
    text = "say <|im_start|> and <|im_end|> ok"
    start = tokenizer.backend.token_id("<|im_start|>")
    plain, chat = tokenizer.encode(text), tokenizer.encode_chat(text)
    assert start not in plain and tokenizer.decode(plain) == text
    assert chat.count(start) == 1 and tokenizer.decode(chat) == text
    assert plain == hf_tokenizer()(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert chat == hf_tokenizer()(text, add_special_tokens=False)["input_ids"]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "Bye"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_chatml_like_transformers(messages, add_generation_prompt):
    tokenizer = our_model().tokenizer
    rendered = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    reference = hf_tokenizer().apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)
    assert rendered == reference
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n")
    assert tokenizer.encode_chat(rendered) == hf_tokenizer()(reference, add_special_tokens=False)["input_ids"]


HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{% for m in messages %}{{ m.content.__class__ }}{% endfor %}",
    "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_cannot_leave_the_sandbox(template):
    messages = [{"role": "user", "content": "Hi"}]
    tokenizer = Tokenizer(our_model().tokenizer.backend, None, [], False, template)
    try:
        rendered = tokenizer.render_chat(messages)
    except ModelError as error:
        assert "chat template" in str(error)
    else:
        assert rendered == ""  # the sandbox turns unsafe attributes into undefined values, which print nothing
    assert messages == [{"role": "user", "content": "Hi"}]


def stream_pieces(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.push(token) for token in ids]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_incremental_decoder_never_splits_a_character(text):
    tokenizer = our_model().tokenizer
    ids = tokenizer.encode(text)
    pieces = stream_pieces(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_incremental_decoder_holds_back_a_partial_character():
    tokenizer = our_model().tokenizer
    ids = tokenizer.encode("😀")
    assert len(ids) > 1  # byte-level BPE spells this emoji with several tokens
    assert stream_pieces(tokenizer, ids) == [""] * (len(ids) - 1) + ["😀"]


# A tiny sentencepiece BPE model with Llama's settings: byte fallback, digits split, no normalization and
# whitespace kept as is. GGUF llama vocabularies carry no normalization rules, so that is the
# configuration the GGUF path must reproduce.
WORDS = ("the quick brown fox jumps over a lazy dog while tokenizers merge pieces into bytes and back "
         "café naïve über déjà vu 東京 大阪 hello world llama alpaca model 42 2024 def return print").split()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return str(folder)


@pytest.fixture(scope="module")
def spm(spm_model):
    return sentencepiece.SentencePieceProcessor(model_file=f"{spm_model}/tokenizer.model")


SPM_TEXTS = TEXTS + [
    "the quick brown fox jumps over the lazy dog",
    "tokenizers merge pieces: déjà vu in 東京",
    "unseen letters ζ ψ and bytes \x01\x7f",
    "thethethe quickquick   jumpsjumps",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_folder_with_tokenizer_model_encodes_like_sentencepiece(spm_model, spm, text):
    tokenizer = load_from_folder(spm_model, {"bos_token": "<s>", "eos_token": "</s>"}, None, [])
    assert tokenizer.encode(text) == spm.encode(text)
    assert tokenizer.encode(text, add_bos=True) == [spm.bos_id()] + spm.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_folder_with_tokenizer_model_settings(spm_model, spm):
    settings = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": "{{ messages[0].content }}"}
    tokenizer = load_from_folder(spm_model, settings, None, [])
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.add_bos) == (spm.bos_id(), [spm.eos_id()], True)
    assert tokenizer.encode_chat("hi <s> there</s>") == [spm.bos_id()] + spm.encode("hi ") + [spm.bos_id()] + \
        spm.encode(" there") + [spm.eos_id()]
    assert tokenizer.render_chat([{"role": "user", "content": "plain"}]) == "plain"


def test_special_token_missing_from_a_sentencepiece_vocabulary_is_not_the_unknown_token(spm_model, spm):
    # tokenizer_config.json may name a token the model file lacks; sentencepiece maps such a piece to
    # <unk>, which must not become an end-of-sequence id or swallow the spelling in encode_chat.
    tokenizer = load_from_folder(spm_model, {"eos_token": "<|im_end|>"}, None, [spm.eos_id()])
    assert tokenizer.eos_ids == [spm.eos_id()]
    assert tokenizer.encode_chat("a<|im_end|>") == spm.encode("a<|im_end|>")


# GGUF token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


@pytest.fixture(scope="module")
def gguf_llama_vocab(spm):
    """The sentencepiece model as a GGUF llama vocabulary (tokens, scores, types) turned into a tokenizer."""
    n = spm.get_piece_size()
    tokens = [spm.id_to_piece(i) for i in range(n)]
    scores = [spm.get_score(i) for i in range(n)]
    types = [UNKNOWN if spm.is_unknown(i) else CONTROL if spm.is_control(i) else BYTE if spm.is_byte(i) else NORMAL
             for i in range(n)]
    return _sentencepiece_bpe(tokens, scores, types, {token: i for i, token in enumerate(tokens)})


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_gguf_llama_vocabulary_encodes_like_sentencepiece(gguf_llama_vocab, spm, text):
    ids = gguf_llama_vocab.encode(text, add_special_tokens=False).ids
    assert ids == spm.encode(text)
    assert gguf_llama_vocab.decode(ids) == spm.decode(ids) == text


def test_gguf_llama_vocabulary_on_random_strings(gguf_llama_vocab, spm):
    # Random mixes of the training alphabet and unseen characters reach merge orders no sentence does.
    rng = random.Random(1)
    alphabet = sorted(set("".join(WORDS))) + [" ", "  ", "\n", "😀", "ζ"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    mismatches = [t for t in texts if gguf_llama_vocab.encode(t, add_special_tokens=False).ids != spm.encode(t)]
    assert mismatches == []


@pytest.mark.parametrize("text", MULTIBYTE)
def test_incremental_decoder_over_byte_fallback_pieces(spm_model, text):
    tokenizer = load_from_folder(spm_model, {}, None, [])
    ids = tokenizer.encode(text)
    pieces = stream_pieces(tokenizer, ids)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
