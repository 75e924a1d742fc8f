"""Chat data: each model's own template, prompt masking (token by token), turn alignment."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import yaml

from fuselm import chat
from fuselm.artifacts import StageError
from fuselm.cli import main
from fuselm.testing import build_tokenizer, save_tiny_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{{ m['content'] | trim }} [/INST]{% elif m['role'] == 'assistant' %} "
    "{{ m['content'] | trim }}{{ eos_token }}{% endif %}{% endfor %}"
)
CONVS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4, of course."},
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "Thanks for asking the quick brown fox!"},
    ],
    [
        {"role": "user", "content": "Write a function."},
        {"role": "assistant", "content": "def f(x):\n    return x + 1"},
    ],
    [
        {"role": "user", "content": "Say hello to the lazy dog."},
        {"role": "assistant", "content": "Hello, lazy dog! How are you today?"},
    ],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_models")
    bpe = build_tokenizer("bpe")
    bpe.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    bpe.chat_template = CHATML
    spm = build_tokenizer("spm")
    spm.chat_template = INST
    return {
        "chatml": save_tiny_model(root / "chatml", bpe, max_positions=256),
        "inst": save_tiny_model(root / "inst", spm, arch="gpt2", max_positions=256),
        "plain": save_tiny_model(root / "plain", build_tokenizer("wordpiece")),
    }


def _corpus(tmp_path, convs=CONVS, copies=4):
    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {**m, "content": m["content"] + ("" if j == 0 else f" #{j}")}
                if m["role"] != "system"
                else m
                for m in c
            ]
        }
        for j in range(copies)
        for c in convs
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _config(tmp_path, chat_models, corpus, **extra):
    cfg = {
        "corpus": {
            "inputs": [{"path": str(corpus), "domain": "chat"}],
            "block_tokens": 200,
            "validation_fraction": 0.3,
        },
        "target": {"model": str(chat_models["chatml"]), "name": "tgt"},
        "sources": [{"model": str(chat_models["inst"]), "name": "inst"}],
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "seq_len": 256,
            "precision": "float32",
        },
        "eval": {"control": False},
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _chatml_assistant_chars(text: str) -> np.ndarray:
    """Independent of fuselm.chat: which characters of a ChatML rendering are assistant
    content (between '<|im_start|>assistant\\n' and the next '<|im_end|>')."""
    inside = np.zeros(len(text), bool)
    for m in re.finditer(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, re.S):
        inside[m.start(1) : m.end(1)] = True
    return inside


def test_render_locates_turns_and_refuses_bad_templates(chat_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_models["inst"])
    r = chat.render(tok, CONVS[0], INST, "inst")
    assert [r.text[a:b] for a, b, _ in r.spans] == [
        "It is 4, of course.",
        "Thanks for asking the quick brown fox!",
    ]
    assert r.text.startswith("<s>[INST] What is 2+2? [/INST] It is 4")  # system dropped
    padded = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  yes  "}]
    r = chat.render(tok, padded, INST, "inst")  # trimmed by the template: located inside
    assert r.spans == ((r.text.index("yes"), r.text.index("yes") + 3, 2),)
    mixed = CHATML.replace(
        "{{ m['content'] }}",
        "{% if m['role'] == 'assistant' %}{{ m['content'] | trim }}{% else %}"
        "{{ m['content'] }}{% endif %}",
    )
    conv = [{"role": "user", "content": " hi there "}, {"role": "assistant", "content": "\n ok! "}]
    r = chat.render(tok, conv, mixed, "inst")
    assert (
        r.text == "<|im_start|>user\n hi there <|im_end|>\n<|im_start|>assistant\nok!<|im_end|>\n"
    )
    ((a, b, lead),) = r.spans
    assert r.text[a:b] == "ok!" and conv[1]["content"][lead : lead + 3] == "ok!"
    upper = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(chat.ChatTemplateError, match="changes the text"):
        chat.render(tok, CONVS[1], upper, "inst")
    twice = CHATML.replace("{{ m['content'] }}", "{{ m['content'] }}{{ m['content'] }}")
    with pytest.raises(chat.ChatTemplateError, match="repeats"):
        chat.render(tok, CONVS[1], twice, "inst")
    with pytest.raises(StageError, match=r"messages\[1\].content"):
        chat.parse_messages(
            [{"role": "user", "content": "a"}, {"role": "assistant"}], "f:1", "messages"
        )


def test_truncate_by_whole_turns():
    conv = CONVS[0]

    def fits_upto(n):
        return lambda msgs: len(msgs) <= n

    assert chat.truncate_to_fit(conv, fits_upto(5)) == tuple(conv)
    assert chat.truncate_to_fit(conv, fits_upto(4)) == tuple(conv[:3])  # ends on assistant
    assert chat.truncate_to_fit(conv, fits_upto(2)) is None
    assert chat.truncate_to_fit([{"role": "user", "content": "x"}], fits_upto(9)) is None


def test_missing_template_is_a_clear_error(chat_models, tmp_path, capsys):
    corpus = _corpus(tmp_path)
    cfg = _config(tmp_path, chat_models, corpus)
    data = yaml.safe_load(cfg.read_text())
    data["sources"] = [{"model": str(chat_models["plain"]), "name": "plain"}]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["-q", "prepare", "-c", str(cfg), "-o", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"model 'plain'.*no chat template.*`chat_template:`", err), err
    # The override fixes it.
    data["sources"][0]["chat_template"] = CHATML
    cfg.write_text(yaml.safe_dump(data))
    assert main(["-q", "prepare", "-c", str(cfg), "-o", str(tmp_path / "run")]) == 0


def test_prepare_truncates_and_skips_conversations(chat_models, tmp_path):
    from fuselm.config import load_config
    from fuselm.corpus import read_blocks, run_prepare

    long_turns = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "Ok."}]
    long_turns += [
        {"role": "user", "content": "More " * 30},
        {"role": "assistant", "content": "x " * 60},
    ]
    too_long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "no"}]
    no_answer = [{"role": "user", "content": "anyone?"}]
    corpus = _corpus(tmp_path, [CONVS[1], long_turns, too_long, no_answer], copies=1)
    cfg = load_config(_config(tmp_path, chat_models, corpus), ["corpus.block_tokens=60"])
    man = run_prepare(cfg, tmp_path / "run")
    st = man["stats"]
    assert st["conversations"] == 2 and st["conversations_truncated"] == 1
    assert st["conversations_skipped"] == 2
    rows = read_blocks(tmp_path / "run").to_pylist()
    kept = {len(json.loads(r["messages"])) for r in rows}
    assert kept == {2}  # the long one cut after its first assistant turn, never mid-turn
    for r in rows:
        assert r["text"] == chat.conversation_text(json.loads(r["messages"]))


def test_chat_pipeline_masks_prompts_token_by_token(chat_models, tmp_path):
    from transformers import AutoTokenizer

    from fuselm.align.store import load_aligned
    from fuselm.capture.storage import iter_capture
    from fuselm.config import load_config
    from fuselm.train.batching import collate
    from fuselm.train.data import FusionSpec, build_examples, join_sources

    cfg_path = _config(tmp_path, chat_models, _corpus(tmp_path))
    run = tmp_path / "run"
    for stage in ("prepare", "capture", "align"):
        assert main(["-q", stage, "-c", str(cfg_path), "-o", str(run)]) == 0

    tgt_tok = AutoTokenizer.from_pretrained(chat_models["chatml"])
    src_tok = AutoTokenizer.from_pretrained(chat_models["inst"])
    from fuselm.corpus import read_blocks

    prepared = {r["hash"]: r for r in read_blocks(run).to_pylist()}
    # Capture: every model tokenized ITS OWN rendering (ids differ per model).
    for cb in iter_capture(run, "tgt"):
        msgs = json.loads(prepared[cb.hash]["messages"])
        want = tgt_tok.apply_chat_template(msgs, tokenize=False)
        assert cb.token_ids.tolist() == tgt_tok(want, add_special_tokens=False)["input_ids"]
        assert cb.text_roundtrip
    for cb in iter_capture(run, "inst"):
        msgs = json.loads(prepared[cb.hash]["messages"])
        want = src_tok.apply_chat_template(msgs, tokenize=False)
        assert cb.token_ids.tolist() == src_tok(want, add_special_tokens=False)["input_ids"]
        assert cb.token_ids[0] == src_tok.bos_token_id  # the template's BOS, added once

    cfg = load_config(cfg_path)
    teachers = ["tgt", "inst"]
    aligned = {n: load_aligned(run, n, "train") for n in teachers}
    im_end = tgt_tok.convert_tokens_to_ids("<|im_end|>")
    checked = 0
    for h, blk in aligned["tgt"].items():
        msgs = json.loads(prepared[h]["messages"])
        text = tgt_tok.apply_chat_template(msgs, tokenize=False)
        enc = tgt_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = _chatml_assistant_chars(text)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        # Token by token: position t is trained iff token t+1 is assistant text, or the
        # <|im_end|> closing an assistant turn.
        for t in range(len(ids) - 1):
            a, b = offs[t + 1]
            is_content = b > a and inside[a:b].any()
            closes = ids[t + 1] == im_end and inside[max(offs[t][1] - 1, 0)]
            assert blk.target_mask[t] == (is_content or closes), (t, tgt_tok.decode(ids[t + 1]))
            checked += 1
        # Teachers only where training happens; the source's too.
        for n in teachers:
            assert not (aligned[n][h].valid & ~blk.target_mask).any()
        assert aligned["inst"][h].valid.any()  # the turns did align across templates
    assert checked > 100

    # The source's teacher rows sit on the right target positions: where the source's
    # gold token is the same text as the target's next token, its gold log-prob is
    # among the teacher's... checked through the per-turn text: matched positions cover
    # at least half of the assistant positions of the target.
    inst = aligned["inst"]
    share = sum(inst[h].valid.sum() for h in inst) / sum(
        aligned["tgt"][h].target_mask.sum() for h in inst
    )
    assert share > 0.5

    # Train rows: labels -100 on prompt positions, teacher rows only on trained ones.
    joined = join_sources(aligned, split="train")
    data = build_examples(joined, teachers, FusionSpec(), seq_len=256)
    batch = collate(data.examples[:2])
    for r, e in enumerate(data.examples[:2]):
        lab = batch["labels"][r, 1 : len(e)]
        assert ((lab != -100).numpy() == e.target_mask).all()
        has = (batch["teacher_ids"][r, : len(e) - 1] >= 0).any(-1).numpy()
        assert not (has & ~e.target_mask).any()
        assert has[e.target_mask].all()  # one_hot_next fallback fills the rest
    assert int(batch["clm_tokens"]) == sum(int(e.target_mask.sum()) for e in data.examples[:2])

    # The rest of the pipeline runs on chat data; eval scores assistant text only.
    for stage in ("train", "eval"):
        assert main(["-q", stage, "-c", str(cfg_path), "-o", str(run)]) == 0
    res = json.loads((run / "eval" / "results.json").read_text())
    n_bytes = {r["overall"]["bytes"] for r in res["models"].values()}
    assert len(n_bytes) == 1  # same denominator (assistant bytes) for every model
    val = [r for r in read_blocks(run, "validation").to_pylist()]
    assert n_bytes == {sum(chat.content_bytes(json.loads(r["messages"])) for r in val)}
    assert cfg.target.resolved_name() + "-fused" in res["models"]


def test_uncaptured_target_tokenizes_its_own_rendering(chat_models, tmp_path):
    from fuselm.align.store import load_aligned

    corpus = _corpus(tmp_path, copies=1)
    out = {}
    for as_source in (True, False):
        cfg = _config(tmp_path, chat_models, corpus)
        run = tmp_path / f"run-{as_source}"
        over = [f"target.as_source={str(as_source).lower()}"]
        for stage in ("prepare", "capture", "align"):
            assert main(["-q", stage, "-c", str(cfg), "-o", str(run), *over]) == 0
        out[as_source] = load_aligned(run, "inst", None)
    assert out[True].keys() == out[False].keys()
    for h, a in out[True].items():
        b = out[False][h]
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert (a.target_mask == b.target_mask).all() and (a.valid == b.valid).all()


REAL = os.environ.get("FUSELM_REAL_TOKENIZERS")


@pytest.mark.skipif(not REAL, reason="FUSELM_REAL_TOKENIZERS not set (see test_align_real)")
@pytest.mark.parametrize("source", ["llama_spm", "gpt2", "qwen2", "llama-bpe", "phi-3"])
def test_real_templates_align_turns_as_well_as_plain_text(source):
    """SmolLM2 (ChatML) as target; each source with its own template (or INST): the
    per-turn alignment inside the two renderings matches at least as many positions as
    aligning each turn's text on its own, and never outside the trained positions."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from fuselm.align import get_align_method, offsets_method, tokenize
    from fuselm.align.surface import vocab_surface

    root = Path(REAL)
    if not (root / "smollm2").is_dir() or not (root / source).is_dir():
        pytest.skip(f"{source} (or smollm2) not under FUSELM_REAL_TOKENIZERS")
    tgt = AutoTokenizer.from_pretrained(root / "smollm2")
    src = AutoTokenizer.from_pretrained(root / source)
    msgs = CONVS[0] + [
        {"role": "user", "content": "Code?"},
        {
            "role": "assistant",
            "content": "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)\n"
            "# Café, naïve — 東京 🙂 12345",
        },
    ]
    sides = []
    for tok in (src, tgt):
        r = chat.render(tok, msgs, tok.chat_template or INST, "x")
        ids, offs = chat.encode(tok, r)
        surf = vocab_surface(tok)
        sides.append(chat.Side(ids, offs, r, surf, chat.lead_id(surf)))
    matched = chat.align_turns(sides[0], sides[1], get_align_method("offsets"))
    t = sides[1]
    mask = chat.target_mask(t.ids, t.offsets, t.rendered, tgt.all_special_ids)
    assert not ((matched[:-1] >= 0) & ~mask).any()
    baseline = 0
    for c in t.rendered.contents:
        m = offsets_method(c, tokenize(src, c, False), tokenize(tgt, c, False))
        baseline += int((m[:-1] >= 0).sum())
    assert int((matched >= 0).sum()) >= baseline - 1


def test_online_teachers_refuse_chat_data(chat_models, tmp_path):
    """Online mode does not render chat templates yet: it must refuse, not train on raw text."""
    from fuselm.artifacts import StageError
    from fuselm.config import load_config
    from fuselm.corpus import run_prepare
    from fuselm.train.online import OnlineTeachers

    cfg = load_config(_config(tmp_path, chat_models, _corpus(tmp_path)), ["capture.mode=online"])
    run_prepare(cfg, tmp_path / "run")
    with pytest.raises(
        StageError, match=r"online does not support chat data.*capture.mode: offline"
    ):
        OnlineTeachers(cfg, tmp_path / "run", "train")
