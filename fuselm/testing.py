"""Hermetic fixtures: tiny tokenizers of several families and tiny random causal LMs.

Every later stage is tested against these, never against a hub download. Why several
tokenizer *families*: the hard parts of knowledge fusion (offset conventions, word-start
markers, byte fallback, dropped whitespace) differ per family, so a test suite with only
one family would pass while real pairs break. The families mirror real tokenizers:

- ``bpe``: GPT-2 style byte-level BPE (``Ġ`` word starts, ``Ċ`` newlines, offsets trimmed
  of the leading space).
- ``spm``: Llama/SentencePiece style (``▁`` word starts, ``<0xNN>`` byte fallback, offsets
  that keep the leading space inside ``▁word``).
- ``wordpiece``: BERT style (``##`` continuations, whitespace dropped, unknown characters
  become ``[UNK]``), case preserved.
- ``wordpiece_lower``: the same with lower-casing and accent stripping, i.e. a tokenizer
  that *normalises* text, so offsets do not index characters of the same surface form.

The module lives inside the package (not under ``tests/``) so that ``bench/`` scripts and
downstream users' tests can build the same fixtures.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TokenizerFamily = Literal["bpe", "spm", "wordpiece", "wordpiece_lower"]
FAMILIES: tuple[str, ...] = ("bpe", "spm", "wordpiece", "wordpiece_lower")

# A small multi-domain corpus with the characters that break aligners: accents and
# combining marks, CJK, emoji, digits, runs of spaces, tabs and newlines, code.
FIXTURE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nprint(fibonacci(10))  # 55\n",
    "class Stack:\n\tdef __init__(self):\n\t\tself.items = []\n\n\tdef push(self, x):\n"
    "\t\tself.items.append(x)\n",
    "In 2024, 1234567 people paid $89.99 each; 3.14159 is pi and 2718 is e * 1000.\n",
    "Café, naïve, résumé, façade, coöperate; e\u0301 is e plus a combining acute accent.\n",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.\n",
    "Emoji: 🙂🚀👍🏽 and flags 🇫🇷🇯🇵; math: ∑ x² ≤ ∞, arrows → ← ↔.\n",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n",
    "   indented    text   with     many spaces\t\ttabs\n\n\nand blank lines.\n",
)

SPECIAL_BPE = ("<|endoftext|>",)
SPECIAL_SPM = ("<unk>", "<s>", "</s>")
SPECIAL_WP = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _corpus(texts: tuple[str, ...] | None) -> list[str]:
    # Repeat the texts so that merges are learned for frequent words.
    return list(texts or FIXTURE_TEXTS) * 3


def _bpe(texts: tuple[str, ...] | None, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_BPE),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(texts), trainer=trainer)
    return tok


def _spm(texts: tuple[str, ...] | None, vocab_size: int) -> Tokenizer:
    # Train merges on "▁"-joined words, then rebuild the model with Llama's id layout:
    # specials first, then the 256 byte-fallback tokens <0x00>..<0xFF>, then the pieces.
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_SPM), show_progress=False
    )
    probe.train_from_iterator(_corpus(texts), trainer=trainer)
    trained = probe.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(probe)]
    vocab: dict[str, int] = {}
    for piece in SPECIAL_SPM:
        vocab[piece] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(list(SPECIAL_SPM))
    return tok


def _merges(tok: Tokenizer) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def _wordpiece(texts: tuple[str, ...] | None, vocab_size: int, lower: bool) -> Tokenizer:
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower, lowercase=lower
    )
    pre = pre_tokenizers.BertPreTokenizer()
    # The tokenizers library's WordPiece training breaks ties between equally frequent
    # pairs differently in every process, so fixtures would change from run to run. A
    # simple deterministic vocabulary instead: every character (as word start and as
    # "##" continuation), then the most useful whole words and continuation pieces.
    counts: dict[str, int] = {}
    for text in _corpus(texts):
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for w in counts for c in w})
    vocab_list = list(SPECIAL_WP) + chars + [f"##{c}" for c in chars]
    score: dict[str, int] = {}
    for word, n in counts.items():
        if 1 < len(word) <= 10:
            score[word] = score.get(word, 0) + n * len(word)
        for i in range(1, len(word)):
            for j in range(i + 2, min(len(word), i + 4) + 1):
                piece = "##" + word[i:j]
                score[piece] = score.get(piece, 0) + n * (j - i)
    for piece, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab_list) >= vocab_size:
            break
        vocab_list.append(piece)
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


@functools.cache
def _raw_tokenizer(family: str, vocab_size: int, texts: tuple[str, ...] | None) -> str:
    if family == "bpe":
        tok = _bpe(texts, vocab_size)
    elif family == "spm":
        tok = _spm(texts, vocab_size)
    elif family in ("wordpiece", "wordpiece_lower"):
        tok = _wordpiece(texts, vocab_size, lower=family == "wordpiece_lower")
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; choose one of {FAMILIES}")
    return tok.to_str()


def build_tokenizer(
    family: TokenizerFamily, vocab_size: int = 600, texts: tuple[str, ...] | None = None
):
    """Train a small fast tokenizer of one family in-process (deterministic, ~0.1 s).

    Args:
        family: one of ``FAMILIES``.
        vocab_size: target vocabulary size of the trainer (the SentencePiece-style family
            adds 256 byte-fallback tokens on top).
        texts: training texts; defaults to ``FIXTURE_TEXTS``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with the family's special tokens set
        (BOS/EOS/UNK/PAD as the real tokenizers of that family define them).
    """
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_raw_tokenizer(family, vocab_size, texts))
    if family == "bpe":
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token=None)
    elif family == "spm":
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    else:
        kw = dict(
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **kw)
    if family == "spm":
        _enable_bos(tok)
    return tok


def _enable_bos(tok) -> None:
    """Make the SentencePiece-style tokenizer prepend ``<s>`` like Llama's does."""
    from tokenizers import processors

    bos_id = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )


def save_tiny_model(
    path: str | Path,
    tokenizer,
    arch: Literal["llama", "gpt2"] = "llama",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    vocab_rows: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Save a tiny random causal LM and its tokenizer to ``path`` (safetensors).

    Args:
        path: output directory (created).
        tokenizer: the tokenizer to save beside the model.
        arch: ``llama`` (RoPE, RMSNorm) or ``gpt2`` (learned positions) so that tests see
            two architectures.
        hidden: hidden size (32–64 keeps a forward pass in milliseconds).
        layers: number of decoder layers.
        heads: attention heads.
        vocab_rows: embedding rows; defaults to ``len(tokenizer)``. Pass a larger number to
            get a *padded vocabulary* like Qwen's, where ids >= len(tokenizer) are never real
            tokens but still receive probability mass.
        max_positions: the model's context length.
        seed: torch seed for the random weights.

    Returns:
        ``Path(path)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = vocab_rows or len(tokenizer)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=rows,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **special,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=rows,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            **special,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; choose 'llama' or 'gpt2'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


#: Stage folders of a finished multi-mode run of a target named ``tgt`` and one source named
#: ``spm`` with the control (the tiny two-model run several tests build), in stage order.
TINY_RUN_STAGES = (
    "prepare",
    "capture/tgt",
    "capture/spm",
    "align/tgt",
    "align/spm",
    "train/fused",
    "train/control",
    "eval",
    "report",
)
