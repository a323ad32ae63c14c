"""Writes tests/data/tokenizer-saved-by-transformers-5/: the tiny models' tokenizer as transformers 5
saves it (tokenizer_class TokenizersBackend, a list of extra_special_tokens), so that the tests of
the oldest supported line (4.57) read what the newest line writes. Run it with transformers 5:

    python tests/data/make_saved_by_transformers_5.py
"""

from pathlib import Path

import transformers

from gate.train.tiny import arithmetic_lines, build_tokenizer, toy_sentences

assert int(transformers.__version__.split(".")[0]) >= 5, "run this with transformers 5"
out = Path(__file__).parent / "tokenizer-saved-by-transformers-5"
build_tokenizer(toy_sentences(400, 0) + arithmetic_lines(200, 0)).save_pretrained(out)
print(f"saved by transformers {transformers.__version__}: {out}")

# A LoRA adapter on a tiny Qwen3-MoE's attention and experts (target_parameters on the fused
# experts of transformers 5), as a transformers 5 training run saves it.
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from gate.train.tiny import build_moe_base, save_adapter  # noqa: E402

adapter = Path(__file__).parent / "moe-adapter-saved-by-transformers-5"
with tempfile.TemporaryDirectory() as tmp:
    base = build_moe_base(Path(tmp) / "base")
    save_adapter(base, Path(tmp) / "adapter", seed=3, target_modules=["q_proj", "v_proj"],
                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    shutil.rmtree(adapter, ignore_errors=True)
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(Path(tmp) / "adapter" / name, adapter / name)
config = json.loads((adapter / "adapter_config.json").read_text())
config["base_model_name_or_path"] = "tiny-qwen3-moe"
(adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
print(f"saved by transformers {transformers.__version__}: {adapter}")
