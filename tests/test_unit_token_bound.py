"""The prompt-token bound of a secondary call's reservation: above what every tokenizer counts, for
adversarial text, through the chat templates; offline; off the event loop for long prompts.

A reservation below a call's real cost lets a cap overrun; one above it is settled at the actual cost.
So the bound is checked against the tokenizers that run offline here (OpenAI's tiktoken encodings and
Anthropic's tokenizer, both shipped inside litellm) and against the worst tokenizer of each family:
a byte-level one that emits one token per byte, and a SentencePiece-style one with byte fallback and
no pieces at all but "▁" (every other character falls back to one token per byte), with the
normalisations tokenizers apply (NFC, NFKC).
"""

import asyncio
import base64
import random
import re
import threading
import unicodedata
from pathlib import Path

import litellm
import pytest
import tiktoken
from tokenizers import Tokenizer, normalizers
from tokenizers.models import BPE

import relay_plugin
from relay_plugin import prompt_token_bound, prompt_tokens_off_loop

LITELLM_TOKENIZERS = Path(litellm.__file__).parent / "litellm_core_utils" / "tokenizers"

_rng = random.Random(13)
ADVERSARIAL = {
    "cjk": "漢字かな交じり文、中文字符，한국어 텍스트。" * 50,
    "emoji": "👩‍👩‍👧‍👦🏳️‍🌈👍🏽🙂🇫🇷" * 50,
    "digits": "1234567890" * 100,
    "one digit": "9" * 1000,
    "spaces": " " * 1000,
    "newlines": "\n" * 1000,
    "mixed whitespace": " \n\t\r\u00a0\u3000\u2003" * 150,
    "base64": base64.b64encode(_rng.randbytes(1000)).decode(),
    "hex": _rng.randbytes(500).hex(),
    "nfkc expands 11x": "\ufdfa" * 100,
    "ligatures": "ﬃﬄﬅ ㎒㎓ ⅻ ½" * 80,
    "combining marks": ("e" + "\u0301\u0308\u0323" * 10) * 30,
    "hangul jamo": "한국어" * 150,
    "arabic with marks": "السَّلَامُ عَلَيْكُمْ" * 50,
    "latin-1": "déjà vu, naïve façade, Straße, Ærø" * 50,
    "control characters": "".join(chr(c) for c in range(32)) * 30,
    "random code points": "".join(chr(_rng.choice([_rng.randrange(0x20, 0xD800), _rng.randrange(0xE000, 0x110000)]))
                                  for _ in range(1000)),
    "english": "The quick brown fox jumps over the lazy dog. " * 30,
    "one character": "x",
    "empty": "",
}
SYSTEM = "You review an answer. Rewrite it if it is wrong. " * 3


def _worst_byte_fallback(normalizer) -> Tokenizer:
    """SentencePiece's shape (Llama 2, Mistral, Gemma) with no pieces but "▁": every character falls back
    to one token per UTF-8 byte of the normalised text, each space is one "▁", and one "▁" is prepended."""
    vocab = {"<unk>": 0, "▁": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [*([normalizer] if normalizer else []), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return tokenizer


#: the chat templates, as text; their marker tokens are added as special tokens where the family has them
TEMPLATES = {
    "llama-2": (lambda m: "<s>" + "".join(
        f"[INST] <<SYS>>\n{x['content']}\n<</SYS>>\n\n" if x["role"] == "system" else
        f"{x['content']} [/INST]" if x["role"] == "user" else f" {x['content']} </s><s>[INST] " for x in m),
        ["<s>", "</s>"]),
    "llama-3": (lambda m: "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{x['role']}<|end_header_id|>\n\n{x['content']}<|eot_id|>" for x in m)
        + "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "chatml": (lambda m: "".join(f"<|im_start|>{x['role']}\n{x['content']}<|im_end|>\n" for x in m)
               + "<|im_start|>assistant\n", ["<|im_start|>", "<|im_end|>"]),
}


def _counters(monkeypatch) -> dict:
    """name -> count of a text (no special tokens in it)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(LITELLM_TOKENIZERS))  # the encodings litellm ships: no download
    counters = {}
    for name in ("cl100k_base", "o200k_base", "p50k_base"):
        encoding = tiktoken.get_encoding(name)
        counters[name] = lambda text, e=encoding: len(e.encode(text, disallowed_special=()))
    anthropic = Tokenizer.from_file(str(LITELLM_TOKENIZERS / "anthropic_tokenizer.json"))  # NFKC-normalising
    counters["anthropic"] = lambda text: len(anthropic.encode(text, add_special_tokens=False).ids)
    counters["bytes"] = lambda text: len(text.encode())  # byte-level BPE without merges
    for label, normalizer in (("none", None), ("NFC", normalizers.NFC()), ("NFKC", normalizers.NFKC())):
        worst = _worst_byte_fallback(normalizer)
        counters[f"byte fallback, {label}"] = lambda text, t=worst: len(t.encode(text, add_special_tokens=False).ids)
    return counters


def _count_prompt(count, prompt: str, specials: list[str]) -> int:
    """A rendered prompt's tokens: one per special token, the text between them counted piece by piece
    (each piece pays its own leading "▁" where the tokenizer prepends one: the count only grows)."""
    pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", prompt)
    return sum(1 if piece in specials else count(piece) for piece in pieces if piece)


def test_the_bound_is_above_every_tokenizers_count_of_adversarial_prompts_in_every_template(monkeypatch):
    counters = _counters(monkeypatch)
    tightest = (float("inf"), "")
    for case, text in ADVERSARIAL.items():
        for messages in ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                         [{"role": "user", "content": text}, {"role": "assistant", "content": text[::-1]},
                          {"role": "user", "content": "Again: " + text}]):
            bound = prompt_token_bound(messages)
            for template, (render, specials) in TEMPLATES.items():
                prompt = render(messages)
                for name, count in counters.items():
                    counted = _count_prompt(count, prompt, specials)
                    assert counted <= bound, f"{case}, {template}, {name}: {counted} tokens > bound {bound}"
                    tightest = min(tightest, (bound - counted, f"{case}/{template}/{name}"))
    # the worst tokenizer comes close: the bound is an upper bound, not a multiple of one
    assert tightest[0] < 200, tightest


def test_the_bound_is_about_the_utf8_size_of_the_text():
    text = "漢字🙂1234 abc"
    messages = [{"role": "user", "content": text}]
    per_text = lambda text: len(text.encode()) + 1  # noqa: E731 - its bytes and a leading "▁"
    expected = (relay_plugin.PROMPT_TOKEN_OVERHEAD + relay_plugin.PROMPT_TOKENS_PER_MESSAGE
                + per_text("user") + per_text(text))
    assert prompt_token_bound(messages) == expected
    user = lambda content: prompt_token_bound([{"role": "user", "content": content}])  # noqa: E731
    # normalisation that lengthens the text counts: U+FDFA is 3 bytes, its NFKC form 33
    assert user("\ufdfa") - user("") == 33
    # what a client can put in a JSON string but UTF-8 cannot hold counts too, without failing
    assert user("\ud800") > user("")


def test_the_bound_never_asks_a_tokenizer_or_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer was asked")

    monkeypatch.setattr(litellm, "token_counter", refuse)
    monkeypatch.setattr(litellm, "encode", refuse)
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    messages = [{"role": "user", "content": "llama-3 replicate llama-2 " + ADVERSARIAL["cjk"]}]
    assert prompt_token_bound(messages) > 0
    assert asyncio.run(relay_plugin.worst_case_usd(messages, (1e-6, 2e-6), 100)) > 100 * 2e-6


def test_a_long_prompt_is_bounded_on_a_worker_thread_and_a_short_one_inline(monkeypatch):
    where = []
    real = relay_plugin.prompt_token_bound
    def recorded(messages):
        where.append(threading.current_thread() is threading.main_thread())
        return real(messages)

    monkeypatch.setattr(relay_plugin, "prompt_token_bound", recorded)
    short = [{"role": "user", "content": "x" * (relay_plugin.LOOP_BOUND_MAX_CHARS - 10)}]
    long = [{"role": "system", "content": "x" * 10},
            {"role": "user", "content": "漢" * relay_plugin.LOOP_BOUND_MAX_CHARS}]

    async def both():
        return await prompt_tokens_off_loop(short), await prompt_tokens_off_loop(long)

    counted = asyncio.run(both())
    assert where == [True, False]
    assert counted == (real(short), real(long))


@pytest.mark.parametrize("size", [10, 100_000, 1_000_000])
def test_a_long_text_bounded_in_pieces_counts_what_the_whole_text_counts(size):
    text = ("한국어 \ufdfa ﬃ " * (size // 8 + 1))[:size]
    whole = max(len(text.encode()), len(unicodedata.normalize("NFKC", text).encode()))
    assert relay_plugin._utf8_bound(text) == whole  # nothing here composes across a cut: the pieces add up
