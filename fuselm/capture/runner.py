"""The part of capture that touches the model: tokenize, batch, forward, top-k, encode.

``Capturer`` tokenizes blocks with offsets, fills batches up to a token budget with
length bucketing (never padding every block to the maximum), runs the forward pass,
takes the top-k of the log-softmax in chunks (``compute.topk_logprobs``) and encodes
each block (``storage.encode_block``). The orchestration (shards, resume, ranks,
manifests) lives in ``stage.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuselm.artifacts import (
    StageError,
)
from fuselm.capture import storage

log = logging.getLogger("fuselm.capture")


# --------------------------------------------------------------------------- the model part


def bos_added(tokenizer: Any, policy: str) -> bool:
    """Whether every encoded block starts with the BOS token under a BOS policy."""
    if policy != "auto":
        return policy == "add"
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return bool(ids) and bos is not None and ids[0] == bos


@dataclass
class Block:
    """One prepared block: its id, content hash and text (and its conversation, if chat)."""

    block_id: str
    hash: str
    text: str
    messages: tuple[dict[str, str], ...] | None = None


class Capturer:
    """Run one causal LM over blocks and encode its top-k next-token distributions.

    Everything that touches the model lives here, so that ``bench/capture_bench.py`` times
    exactly the code path of the stage.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        top_k: int = 10,
        batch_tokens: int = 8192,
        bos: str = "auto",
        max_context: int | None = None,
        fused_head: bool | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Bind a loaded model and fast tokenizer.

        Args:
            model: a ``transformers`` causal LM in eval mode, on its device.
            tokenizer: a fast tokenizer (``return_offsets_mapping`` must work).
            name: the source name, for messages.
            top_k: entries per position.
            batch_tokens: padded tokens per forward batch (a single longer block still
                runs, alone).
            bos: ``auto`` (the tokenizer's own special tokens), ``add`` (BOS only) or
                ``none`` (no special tokens).
            max_context: the model's context; longer blocks are an error.
            fused_head: compute logits chunk by chunk from the final hidden states, so
                no batch of full-vocabulary logits exists (``_split_output_head``).
                Default: on accelerators, where it bounds memory; off on CPUs, where
                it is not faster (each chunk re-reads the output layer's weights).
            chat_template: the template chat blocks are rendered with (``fuselm.chat``);
                None: a chat block is an error naming the fix.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        self.top_k = int(top_k)
        self.batch_tokens = int(batch_tokens)
        self.bos = bos
        self.max_context = max_context
        self.device = next(model.parameters()).device
        emb = model.get_output_embeddings()
        weight = getattr(emb, "weight", None)
        if weight is not None:
            self.embedding_rows = int(weight.shape[0])
        else:
            self.embedding_rows = int(model.config.get_text_config().vocab_size)
        # Rows past the tokenizer's largest id are padding of the embedding (Qwen-style),
        # never real tokens. Largest id, not len(): added tokens may leave holes.
        n_ids = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
        if n_ids > self.embedding_rows:  # ids past the output rows: not this model's tokenizer
            raise StageError(
                f"capture: source '{name}': its tokenizer has {n_ids} token ids but the model "
                f"has only {self.embedding_rows} output rows, so the tokenizer does not belong "
                "to this model; point `tokenizer:` of this source at the model's own "
                "tokenizer (or leave it empty to use the one saved with the model)"
            )
        self.vocab_size = min(n_ids, self.embedding_rows)
        self.padded = self.embedding_rows > self.vocab_size
        if self.top_k > self.vocab_size:
            raise StageError(
                f"capture: source '{name}': capture.top_k={self.top_k} exceeds its "
                f"vocabulary of {self.vocab_size} tokens; lower capture.top_k"
            )
        if bos == "add" and tokenizer.bos_token_id is None:
            raise StageError(
                f"capture: source '{name}': bos: add, but the tokenizer has no BOS token; "
                "use bos: auto or none for this source"
            )
        # Right-padding filler: any real token id but the model's pad id (transformers
        # warns about missing attention masks whenever it sees that one at the end).
        config_pad = getattr(model.config, "pad_token_id", None)
        fillers = (tokenizer.eos_token_id, tokenizer.bos_token_id, 0, 1, 2)
        self.pad_id = next(
            i for i in fillers if i is not None and i != config_pad and 0 <= i < self.vocab_size
        )
        self.pad_mass_sum = 0.0  # probability mass dropped from padded columns, summed
        if fused_head is None:
            fused_head = self.device.type != "cpu"
        self.split = _split_output_head(model, tokenizer, max_context) if fused_head else None

    @property
    def fused_head(self) -> bool:
        """Whether logits are computed chunk by chunk from hidden states (see compute)."""
        return self.split is not None

    # ---- tokenization
    def encode(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize texts with offsets under the BOS policy.

        Returns:
            Per text ``(token_ids (T,) int64, offsets (T, 2) int64)``; an added BOS sits at
            offsets ``(0, 0)``.
        """
        if not texts:
            return []
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=self.bos == "auto",
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        if "offset_mapping" not in enc:
            raise StageError(
                f"capture: source '{self.name}': the tokenizer returns no character offsets; "
                "provide a fast tokenizer (tokenizer.json) via `tokenizer:`"
            )
        out = []
        for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            ids = np.asarray(ids, dtype=np.int64)
            offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
            if self.bos == "add":
                ids = np.concatenate([[self.tokenizer.bos_token_id], ids])
                offs = np.concatenate([np.zeros((1, 2), np.int64), offs])
            out.append((ids, offs))
        return out

    def encode_blocks(self, blocks: Sequence[Block]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``encode`` for plain blocks; chat blocks in the model's own chat template.

        Chat blocks are tokenized from ``fuselm.chat.render(...).text`` without added
        special tokens; their offsets index that rendered text.
        """
        from fuselm import chat

        out = list(self.encode([b.text for b in blocks if b.messages is None]))
        if len(out) == len(blocks):
            return out
        plain = iter(out)
        result = []
        for b in blocks:
            if b.messages is None:
                result.append(next(plain))
                continue
            result.append(chat.encode(self.tokenizer, self.render(b)))
        return result

    def render(self, b: Block) -> Any:
        """The chat rendering of a chat block (``fuselm.chat.Rendered``)."""
        from fuselm import chat

        if self.chat_template is None:
            raise chat.ChatTemplateError(
                f"capture: source '{self.name}': block {b.block_id} is a conversation but no "
                "chat template was given to the runner (set `chat_template:` for this model)"
            )
        assert b.messages is not None
        return chat.render(self.tokenizer, b.messages, self.chat_template, self.name)

    # ---- batching
    def batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        """Group block indices into batches of at most ``batch_tokens`` padded tokens.

        Length bucketing: blocks are taken longest first, so each batch holds blocks of
        similar length and padding stays small; no block is ever padded to the longest
        block of the shard. Deterministic for given lengths (ties by index).
        """
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * lengths[batch[0]] > self.batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    # ---- the forward pass
    def capture(
        self, blocks: Sequence[Block], on_batch: Callable[[int, int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Capture blocks and return their encoded rows, in the order of ``blocks``.

        Args:
            blocks: the blocks to run.
            on_batch: called after each forward with ``(blocks, tokens)`` done.

        Raises:
            StageError: a block longer than the context, a token id outside the model,
                or non-finite logits (naming the block and the source).
        """
        import torch

        from fuselm.capture.compute import NonFiniteLogitsError, topk_logprobs

        encoded = self.encode_blocks(blocks)
        lengths = [len(ids) for ids, _ in encoded]
        for b, (ids, _) in zip(blocks, encoded, strict=True):
            self._check(b, ids)
        k = self.top_k
        results: list[tuple[np.ndarray, ...] | None] = [None] * len(blocks)
        runnable = [i for i, n in enumerate(lengths) if n >= 2]  # one token: nothing to predict
        if on_batch is not None and len(runnable) < len(blocks):
            on_batch(len(blocks) - len(runnable), sum(n for n in lengths if n < 2))
        for sub in self.batches([lengths[i] for i in runnable]):
            batch = [runnable[j] for j in sub]
            width = lengths[batch[0]]
            x = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, : lengths[i]] = torch.from_numpy(encoded[i][0])
            # Right padding needs no attention mask: in a causal LM position t sees only
            # tokens <= t, so pads after a block never reach its positions. A mask would
            # only move attention off its causal fast path (SDPA is_causal / flash).
            x = x.to(self.device)
            with torch.inference_mode():
                if self.split is not None:  # (B, L, H) hidden states; logits per chunk
                    base, head = self.split
                    out = base(input_ids=x, use_cache=False)
                    scores = out.last_hidden_state
                else:  # (B, L, V_rows): one batch of full-vocabulary logits
                    head = None
                    out = self.model(input_ids=x, use_cache=False)
                    scores = out.logits
                for r, i in enumerate(batch):
                    p = lengths[i] - 1
                    try:
                        res = topk_logprobs(  # (P, V) -> (P, K)
                            scores[r, :p],
                            k,
                            gold_ids=x[r, 1 : p + 1],
                            vocab_size=self.vocab_size,
                            head=head,
                        )
                    except NonFiniteLogitsError as e:
                        raise StageError(
                            f"capture: source '{self.name}': non-finite logits (NaN/inf) in "
                            f"block {blocks[i].block_id} (hash {blocks[i].hash}) at token "
                            f"position {e.row}; the model's output is broken. With bfloat16/"
                            "float16 try dtype: float32; otherwise check the weights"
                        ) from None
                    if self.padded:
                        self.pad_mass_sum += float(res.pad_logmass.double().exp().sum())
                    results[i] = (
                        res.ids.to("cpu", torch.int32).numpy(),
                        res.logprobs.cpu().numpy(),
                        res.gold.cpu().numpy(),
                        res.tail_logmass.cpu().numpy(),
                    )
                del out, scores
            if on_batch is not None:
                on_batch(len(batch), sum(lengths[i] for i in batch))
        rows = []
        empty = (
            np.zeros((0, k), np.int32),
            np.zeros((0, k), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
        )
        for i, (b, (ids, offs)) in enumerate(zip(blocks, encoded, strict=True)):
            top_ids, lps, gold, tail = results[i] if results[i] is not None else empty
            rows.append(
                storage.encode_block(
                    block_id=b.block_id,
                    block_hash=b.hash,
                    token_ids=ids,
                    offsets=offs,
                    ids=top_ids,
                    logprobs=lps,
                    gold=gold,
                    tail_logmass=tail,
                    text_roundtrip=self._roundtrip(b, ids),
                )
            )
        return rows

    def _check(self, b: Block, ids: np.ndarray) -> None:
        if self.max_context and len(ids) > self.max_context:
            raise StageError(
                f"capture: source '{self.name}': block {b.block_id} (hash {b.hash}) has "
                f"{len(ids)} tokens (special tokens included) but the model's context is "
                f"{self.max_context}; nothing is truncated silently. Re-run prepare so that "
                "blocks fit (lower corpus.block_tokens, with this model configured), or "
                "raise max_context for this source if the model supports longer inputs"
            )
        if ids.size and int(ids.max()) >= self.embedding_rows:
            raise StageError(
                f"capture: source '{self.name}': the tokenizer produced id {int(ids.max())} "
                f"but the model has only {self.embedding_rows} embedding rows; the tokenizer "
                "does not belong to this model (check `tokenizer:`)"
            )

    def _roundtrip(self, b: Block, ids: np.ndarray) -> bool:
        # Normalising tokenizers (lower-casing, NFKC, dropped whitespace) do not give the
        # text back, and then their offsets may not index it character for character.
        # A chat block's text is its rendering, template specials included.
        chat = b.messages is not None
        out = self.tokenizer.decode(
            ids.tolist(), skip_special_tokens=not chat, clean_up_tokenization_spaces=False
        )
        return out == (self.render(b).text if chat else b.text)


def _split_output_head(model: Any, tokenizer: Any, max_context: int | None) -> tuple | None:
    """``(base_model, output_layer)`` when ``logits == output_layer(base(x))``, else None.

    Most causal LMs compute logits as a plain linear layer over the base model's final
    hidden states; then the capture computes them chunk by chunk (``compute.topk_logprobs``
    with ``head``) and never holds a batch of full-vocabulary logits. Models that scale,
    soft-cap or otherwise post-process their logits (Gemma 2, Cohere, Granite, remote
    code, ...) fail the numerical probe below and keep the plain forward: nothing is
    assumed about an architecture, it is checked.
    """
    import torch

    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    text = "The quick brown fox jumps over the lazy dog.\ndef f(x):\n    return x + 1\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: min(16, max_context or 16)]
    if len(ids) < 2:
        return None
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    try:
        with torch.inference_mode():
            ref = model(input_ids=x, use_cache=False).logits[0].float()
            got = head(base(input_ids=x, use_cache=False).last_hidden_state[0]).float()
    except Exception as e:  # any mismatch of interfaces: use the plain forward
        log.debug("capture: no split output head (%s)", e)
        return None
    scale = float(ref.abs().max()) or 1.0
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * scale):
        return None
    return base, head


# --------------------------------------------------------------------------- processes
