"""Incremental detokenization and stop strings, on a real byte-level BPE that splits characters."""

from __future__ import annotations

import random

import pytest
import json

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.server.engine.detokenizer import IncrementalDetokenizer, StopChecker

EOS = "<|eos|>"
CORPUS = [
    "The café serves crème brûlée for €5 — naïve but good.",
    "Le garçon a mangé une pêche à la plage.",
    "日本語のテキストも少しあります。東京は大きい。",
    "Emoji time: 🙂 🚀 🎉 and the rocket 🚀 again 🙂.",
    "Price: €10, €20 and €30 — a dash — another dash.",
    "Hello world, hello tokens, hello streaming text.",
]
TEXTS = CORPUS + [
    "Unseen: Ωmega ψ 😀😀 ñandú, 中文 and a trailing emoji 🎉",
    "€€€ — ——  double  spaces\nnew line\ttab 🚀🚀",
]


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE with few merges: multi-byte characters mostly stay split over several tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def _sentencepiece_style(model):
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


@pytest.fixture(scope="module")
def llama_style_tokenizer():
    """Llama-2/Mistral style: "▁" for spaces, the leading one stripped on decode, and characters
    outside the vocabulary spelled as <0xNN> byte tokens."""
    backend = _sentencepiece_style(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(
        vocab_size=260, special_tokens=["<unk>", EOS], limit_alphabet=60, show_progress=False
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    backend = _sentencepiece_style(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, unk_token="<unk>", clean_up_tokenization_spaces=False
    )


def stream(tokenizer, output_ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    deltas = [detok.push(i) for i in output_ids]
    return deltas, detok.flush()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_fixture_splits_characters_across_tokens(tokenizer):
    # Without tokens that carry part of a character, the hold-back tests below would prove nothing.
    ids = [i for text in TEXTS for i in encode(tokenizer, text)]
    assert sum("\ufffd" in tokenizer.decode([i]) for i in ids) > 20
    assert all(tokenizer.decode(encode(tokenizer, text)) == text for text in TEXTS)


def test_llama_style_fixture_spells_characters_as_bytes(llama_style_tokenizer):
    ids = [i for text in TEXTS for i in encode(llama_style_tokenizer, text)]
    assert sum(llama_style_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in ids) > 20
    assert all(llama_style_tokenizer.decode(encode(llama_style_tokenizer, text)) == text for text in TEXTS)


@pytest.mark.parametrize("prompt", ["", "Q: say something\nA:", "ends in multi-byte: 東京 🙂"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_without_broken_characters(tokenizer, text, prompt):
    ids = encode(tokenizer, text)
    deltas, tail = stream(tokenizer, ids, encode(tokenizer, prompt))
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)
    if any("\ufffd" in tokenizer.decode([i]) for i in ids):
        assert "" in deltas  # a character was held back until its last byte arrived


def test_text_is_emitted_as_soon_as_the_decode_ends_in_a_complete_character(tokenizer):
    ids = encode(tokenizer, TEXTS[0])
    deltas, _ = stream(tokenizer, ids)
    for n in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:n])
        emitted = "".join(deltas[:n])
        if decoded.endswith("\ufffd"):
            assert decoded.startswith(emitted) and len(emitted) < len(decoded)
        else:
            assert emitted == decoded


def test_special_tokens_produce_no_text(tokenizer):
    eos = tokenizer.eos_token_id
    text = "crème 🚀 brûlée"
    ids = encode(tokenizer, text)
    output = [eos] + ids[:3] + [eos] + ids[3:] + [eos, eos]
    deltas, tail = stream(tokenizer, output, encode(tokenizer, "prompt"))
    assert deltas[0] == "" and deltas[4] == "" and deltas[-2:] == ["", ""]
    assert "".join(deltas) + tail == tokenizer.decode(output, skip_special_tokens=True) == text


def test_flush_returns_an_incomplete_character_at_the_end(tokenizer):
    ids = encode(tokenizer, "ok 😀")  # unseen in training: split into its four bytes
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    deltas, tail = stream(tokenizer, ids[:cut])
    assert "\ufffd" not in "".join(deltas)
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == tokenizer.decode(ids[:cut])


@pytest.mark.parametrize("seed", range(5))
def test_random_token_streams_concatenate_to_the_full_decode(tokenizer, seed):
    # Arbitrary ids (what a random model emits), invalid UTF-8 sequences and specials included.
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(200)]
    deltas, tail = stream(tokenizer, ids, encode(tokenizer, "Hello 🙂"))
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(d.endswith("\ufffd") for d in deltas)


@pytest.mark.parametrize("seed", range(5))
def test_random_llama_style_streams_concatenate_to_the_full_decode(llama_style_tokenizer, seed):
    # Random pieces, and characters spelled as <0xNN> tokens. (Random *invalid* byte runs are left
    # out: ByteFallback turns a whole run into U+FFFD once it turns invalid, valid bytes before
    # included, so no stream that emits text early can equal that decode; nor does vLLM's.)
    tokenizer = llama_style_tokenizer
    pieces = [i for i in range(len(tokenizer)) if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    rng = random.Random(seed)
    ids = []
    while len(ids) < 200:
        if rng.random() < 0.7:
            ids.append(rng.choice(pieces))
        else:
            char = rng.choice("ψ😀€日é")
            ids += tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in char.encode()])
    prompt = encode(tokenizer, "Hello 🙂")
    deltas, tail = stream(tokenizer, ids, prompt)
    full = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    assert "".join(deltas) + tail == full[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]
    assert tail == "" and not any("\ufffd" in d for d in deltas)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)


# ---- stop strings ----


def run(checker, deltas):
    outs = [checker.feed(d) for d in deltas]
    return [text for text, _ in outs], [stopped for _, stopped in outs]


def test_no_stop_strings_pass_text_through():
    checker = StopChecker(())
    assert run(checker, ["a", "", "bc"]) == (["a", "", "bc"], [False, False, False])
    assert checker.flush() == ""


def test_stop_string_split_over_three_deltas():
    checker = StopChecker(("STOP",))
    texts, stopped = run(checker, ["say S", "T", "O", "P and more", "ignored"])
    assert texts == ["say ", "", "", "", ""]
    assert stopped == [False, False, False, True, True]
    assert checker.flush() == ""


def test_partial_match_is_released_when_it_does_not_complete():
    checker = StopChecker(("STOP",))
    texts, stopped = run(checker, ["a ST", "ay", " ok S"])
    assert texts == ["a ", "STay", " ok "]
    assert stopped == [False, False, False]
    assert checker.flush() == "S"  # generation ended for another reason: the held tail is output


def test_overlapping_prefix_keeps_only_the_tail_that_can_still_match():
    checker = StopChecker(("aab",))
    assert run(checker, ["a", "a", "a", "b"]) == (["", "", "a", ""], [False, False, False, True])


def test_earliest_of_several_stop_strings_wins():
    assert StopChecker(("world", "lo w")).feed("hello world") == ("hel", True)
    checker = StopChecker(("world", "lo w", "xyz"))
    # "l" and then "lo" could start "lo w": held back until the match completes
    assert run(checker, ["hel", "lo", " wor", "ld"]) == (["he", "l", "", ""], [False, False, True, True])


def test_shorter_stop_string_completing_first_stops_before_a_longer_one_could():
    checker = StopChecker(("abcdef", "cd"))
    assert run(checker, ["ab", "cd", "ef"]) == (["", "ab", ""], [False, True, True])


def test_stop_string_at_the_very_start():
    checker = StopChecker(("###",))
    assert checker.feed("### rest") == ("", True)
    checker = StopChecker(("###",))
    assert run(checker, ["#", "##x"]) == (["", ""], [False, True])


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_stop_exactly_before_the_first_occurrence(seed):
    rng = random.Random(seed)
    alphabet = "ab é🙂"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = tuple({text[s : s + rng.randint(1, 4)] for s in (rng.randrange(60) for _ in range(3))})
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    checker = StopChecker(stops)
    texts, stopped = run(checker, deltas)
    first = min(text.find(s) for s in stops)
    assert stopped[-1] and "".join(texts) == text[:first]


def test_detokenizer_and_stop_checker_together(tokenizer):
    text = "Price: €10 — crème brûlée 🚀 then the end."
    ids = encode(tokenizer, text)
    detok, checker = IncrementalDetokenizer(tokenizer, []), StopChecker(("brûlée 🚀",))
    out = []
    for i in ids:
        emitted, stopped = checker.feed(detok.push(i))
        out.append(emitted)
        if stopped:
            break
    assert stopped and "".join(out) == "Price: €10 — crème "



@pytest.mark.parametrize("text", TEXTS)
def test_llama_style_tokenizer_keeps_the_space_that_continues_the_prompt(llama_style_tokenizer, text):
    tokenizer = llama_style_tokenizer
    prompt_ids, ids = encode(tokenizer, "Q: hi\nA:"), encode(tokenizer, text)  # ids start with "▁"
    deltas, tail = stream(tokenizer, ids, prompt_ids)
    # decode() drops the leading space of its first token; the stream continues the prompt instead
    full = tokenizer.decode(prompt_ids + ids)
    assert "".join(deltas) + tail == full[len(tokenizer.decode(prompt_ids)) :] == " " + text
    assert tail == "" and not any("\ufffd" in d for d in deltas)
    alone, tail = stream(tokenizer, ids)
    assert "".join(alone) + tail == tokenizer.decode(ids) == text  # without a prompt: exactly decode()
