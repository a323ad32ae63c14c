"""Writes tests/data/tokenizer-saved-by-transformers-5/: the tiny models' tokenizer as transformers 5
saves it (tokenizer_class TokenizersBackend, a list of extra_special_tokens), so that the tests of
the oldest supported line (4.57) read what the newest line writes. Run it with transformers 5:

    python tests/data/make_saved_by_transformers_5.py
"""

from pathlib import Path

import transformers

from gate.runner.example import arithmetic_lines, build_tokenizer, toy_sentences

assert int(transformers.__version__.split(".")[0]) >= 5, "run this with transformers 5"
out = Path(__file__).parent / "tokenizer-saved-by-transformers-5"
build_tokenizer(toy_sentences(400, 0) + arithmetic_lines(200, 0)).save_pretrained(out)
print(f"saved by transformers {transformers.__version__}: {out}")
