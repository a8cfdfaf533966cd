"""Importing a Hugging Face checkpoint: time and peak memory, ours against transformers' own loader.

    python benchmarks/interop_import.py [--family llama|mixtral] [--layers 12] [--append BENCHMARKS.md]

Writes a random checkpoint of the family with save_pretrained (a ~200M-parameter Llama by default),
then, each in a fresh process so that peak memory is its own: transformers'
``AutoModelForCausalLM.from_pretrained`` (the reference), ``moeformer.interop.import_hf`` (built on
the meta device, filled with the checkpoint's tensors), and the floor: reading every tensor of the
file with safetensors and nothing else. Reports wall time and peak resident memory (ru_maxrss)
after one forward pass, so that lazily mapped weights are counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LOADERS = {
    "transformers from_pretrained (reference)": (
        "import transformers; m = transformers.AutoModelForCausalLM.from_pretrained(PATH); "
        "m(input_ids=torch.ones(1, 8, dtype=torch.long))"
    ),
    "moeformer import_hf": (
        "from moeformer.interop import import_hf; m = import_hf(PATH); m(torch.ones(1, 8, dtype=torch.long))"
    ),
    "safetensors read only (floor)": (
        "import safetensors.torch; t = safetensors.torch.load_file(PATH + '/model.safetensors'); "
        "s = sum(float(v.float().sum()) for v in t.values())"
    ),
}


def measure(code: str, path: str) -> dict[str, float]:
    script = (
        "import json, resource, time, torch\n"
        f"PATH = {path!r}\n"
        "start = time.perf_counter()\n"
        f"{code}\n"
        "print(json.dumps({'s': time.perf_counter() - start, "
        "'gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint(family: str, layers: int, directory: str) -> int:
    import transformers

    sizes = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers)
    sizes.update(num_attention_heads=16, num_key_value_heads=4)
    if family == "mixtral":
        config = transformers.MixtralConfig(**sizes, num_local_experts=8, intermediate_size=704)
    else:
        config = transformers.LlamaConfig(**sizes)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["llama", "mixtral"], default="llama")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader; the median time and memory")
    parser.add_argument("--append", type=Path, help="also append the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        n = checkpoint(args.family, args.layers, directory)
        size = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")) / 1e9
        lines = [
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}",
            f"\nImport of a random {args.family} checkpoint: {n / 1e6:.0f}M parameters, {size:.2f} GB of float32 "
            f"safetensors; median of {args.repeats} fresh processes",
            f"| {'loader':42} | {'s':>6} | {'peak RSS GB':>11} | {'vs reference':>12} |",
            f"|{'-' * 44}|{'-' * 8}|{'-' * 13}|{'-' * 14}|",
        ]
        base = None
        for name, code in LOADERS.items():
            runs = [measure(code, directory) for _ in range(args.repeats)]
            s = sorted(r["s"] for r in runs)[len(runs) // 2]
            gb = sorted(r["gb"] for r in runs)[len(runs) // 2]
            base = base or (s, gb)
            lines.append(f"| {name:42} | {s:6.2f} | {gb:11.2f} | {s / base[0]:5.2f}x, {gb / base[1]:4.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write(f"\n```\n$ python benchmarks/interop_import.py --family {args.family}\n{text}\n```\n")


if __name__ == "__main__":
    main()
