"""Memory of a sweep over N checkpoints: the base is loaded once and one adapter at a time, so the
peak stays at base + one adapter + overhead, flat in N.

    python bench/memory.py                 # SmolLM2-135M, N = 2 and N = 8
    python bench/memory.py --model tiny

Each sweep is a separate `gate run` process; its peak resident memory comes from the kernel
(os.wait4), and on CUDA the child also reports torch's peak allocated GPU memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, device_note, known_good_documents, make_adapters, measure, smollm2_base, tiny_base  # noqa: E402


def child(folder: str, config: str, base: str, out: str) -> None:
    """Run gate as a library in this process and print the CUDA peak (if any) as JSON."""
    import torch

    from gate.request import prepare_run
    from gate.flow import run

    request = prepare_run(folder, config_path=config, base=base, out_dir=out)
    run(request)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print("GATE-BENCH " + json.dumps({"cuda_peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "CONFIG", "BASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    base = smollm2_base() if args.model == "smollm2" else tiny_base()
    adapters = make_adapters(base, CACHE / f"adapters-{args.model}-8", 8)
    work = CACHE / f"memory-{args.model}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    suite = work / "ppl.jsonl"
    suite.write_text("".join(json.dumps({"text": t}) + "\n" for t in known_good_documents(30)))
    config = work / "gate.yaml"
    config.write_text(f"suites:\n  - name: ppl\n    path: {suite}\n")
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    adapter = (adapters[0] / "adapter_model.safetensors").stat().st_size / 2**20
    print("# peak memory of a sweep over N checkpoints")
    print(device_note())
    print(f"model: {base.name} (weights {weights:.0f} MiB on disk; one adapter {adapter:.1f} MiB); suite: 30 documents")
    peaks = {}
    for n in (2, 8):
        folder = work / f"n{n}" / "run"
        folder.mkdir(parents=True)
        for a in adapters[:n]:
            shutil.copytree(a, folder / a.name)
        m = measure([sys.executable, __file__, "--child", str(folder.parent), str(config), str(base), str(work / f"out{n}")])
        line = next((json.loads(x.split(" ", 1)[1]) for x in m.output.splitlines() if x.startswith("GATE-BENCH ")), {})
        peaks[n] = m.peak_rss_mib
        gpu = f", GPU peak {line['cuda_peak_mib']:.0f} MiB" if line.get("cuda_peak_mib") else ""
        print(f"N = {n}: peak RSS {m.peak_rss_mib:.0f} MiB{gpu} ({m.seconds:.0f} s)")
    growth = peaks[8] / peaks[2]
    print(f"RESULT memory: peak RSS N=8 / N=2 = {growth:.2f}x (flat in N: {'yes' if growth < 1.1 else 'NO'})")


if __name__ == "__main__":
    main()
