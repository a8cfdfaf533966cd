"""Peak memory of weight orthogonalization: shard by shard (``--stream``) vs the whole model in memory.

    python benchmarks/abliterate_stream.py [--layers 10] [--experts 64] [--d-model 1024]
                                           [--hidden 512] [--workdir /tmp] [--append BENCHMARKS.md]

Builds a synthetic DeepSeek-V3-layout MoE checkpoint (bf16, per-expert tensors, one shard per
layer: about 2 GB in 10+ shards with the defaults) in a temporary directory, then runs each
method in a fresh process that reports its own peak RSS (``VmHWM``) and time:

- ``stream``: :func:`moeformer.refusal.streaming.stream_orthogonalize`;
- ``in-memory``: every shard read into one state dict, each writer edited with the same
  arithmetic, the dict written back with the same sharding: the least any load-edit-save path
  needs (building a transformers model on top of it only adds to it).

Both outputs are compared tensor by tensor (they must be equal), then everything is deleted.
Read the edit's memory (peak RSS minus the RSS after imports: Python + torch are ~400 MB
whatever the model) against the largest shard: the target for ``stream`` is <= 2.5x.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeformer.refusal.hf import writer_axis
from moeformer.refusal.streaming import INDEX, checkpoint_shards, stream_orthogonalize


def build_checkpoint(path: Path, layers: int, experts: int, d: int, h: int, vocab: int = 32000) -> None:
    """A DeepSeek-V3-layout checkpoint: embeddings + head in the first shard, one shard per layer."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}
    first = {
        "model.embed_tokens.weight": rand(vocab, d),
        "lm_head.weight": rand(vocab, d),
        "model.norm.weight": rand(d),
    }
    shards = [("model-00000.safetensors", first)]
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {f"{p}.self_attn.o_proj.weight": rand(d, d), f"{p}.self_attn.q_proj.weight": rand(d, d),
                   f"{p}.mlp.gate.weight": rand(experts, d), f"{p}.input_layernorm.weight": rand(d)}  # fmt: skip
        for e in range(experts):
            tensors |= {f"{p}.mlp.experts.{e}.gate_proj.weight": rand(h, d), f"{p}.mlp.experts.{e}.up_proj.weight":
                        rand(h, d), f"{p}.mlp.experts.{e}.down_proj.weight": rand(d, h)}  # fmt: skip
        shards.append((f"model-{i + 1:05d}.safetensors", tensors))
    for name, tensors in shards:
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    total = sum((path / n).stat().st_size for n, _ in shards)
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"model_type": "deepseek_v3", "hidden_size": d, "num_hidden_layers": layers, "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(config))


def in_memory(source: Path, out: Path, direction: torch.Tensor) -> None:
    """Load everything, edit, save: the baseline."""
    shards, weight_map = checkpoint_shards(source)
    state = {}
    for shard in shards:
        with safe_open(str(source / shard), "pt") as f:
            state |= {n: f.get_tensor(n) for n in f.keys()}
    d, r_hat = direction.numel(), direction / direction.norm()
    for name, tensor in state.items():
        axis = tensor.dim() - 1 if name == "model.embed_tokens.weight" else writer_axis(name, tuple(tensor.shape), d)
        if axis is None or not name.startswith(("model.layers.", "model.embed_tokens")):
            continue
        moved = tensor.movedim(axis, -1).float().clone()
        state[name] = (moved - (moved @ r_hat).unsqueeze(-1) * r_hat).to(tensor.dtype).movedim(-1, axis).contiguous()
    out.mkdir()
    for shard in shards:
        save_file(
            {n: state[n] for n, s in weight_map.items() if s == shard}, str(out / shard), metadata={"format": "pt"}
        )


def child(method: str, source: Path, out: Path) -> None:
    d = json.loads((source / "config.json").read_text())["hidden_size"]
    direction = torch.randn(d, generator=torch.Generator().manual_seed(1))
    base = _status_bytes("VmRSS")  # resident after imports
    start = time.perf_counter()
    if method == "stream":
        stream_orthogonalize(source, out, direction)
    else:
        in_memory(source, out, direction)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_rss": peak, "work_rss": peak - base, "seconds": seconds}))


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status. VmHWM, not getrusage's ru_maxrss: after
    fork + exec, ru_maxrss keeps the parent's high-water mark (here: the parent built the checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def same_tensors(a: Path, b: Path) -> bool:
    for shard in checkpoint_shards(a)[0]:
        with safe_open(str(a / shard), "pt") as fa, safe_open(str(b / shard), "pt") as fb:
            if set(fa.keys()) != set(fb.keys()) or not all(
                torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in fa.keys()
            ):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--append", type=Path, help="append the table to this markdown file")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    work = Path(tempfile.mkdtemp(prefix="abliterate-stream-", dir=args.workdir))
    try:
        source = work / "source"
        build_checkpoint(source, args.layers, args.experts, args.d_model, args.hidden)
        shards = checkpoint_shards(source)[0]
        sizes = [(source / s).stat().st_size for s in shards]
        rows = {}
        for method in ("stream", "in-memory"):
            cmd = [sys.executable, __file__, "--child", method, str(source), str(work / method)]
            rows[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        equal = same_tensors(work / "stream", work / "in-memory")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    largest = max(sizes)
    lines = [
        f"`python benchmarks/abliterate_stream.py --layers {args.layers} --experts {args.experts} --d-model "
        f"{args.d_model} --hidden {args.hidden}`: synthetic DeepSeek-V3-layout bf16 checkpoint, "
        f"{sum(sizes) / 2**30:.2f} GiB in {len(sizes)} shards (largest {largest / 2**20:.0f} MiB); "
        f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}; "
        f"outputs equal tensor for tensor: {equal}",
        "",
        "| method | peak RSS (MiB) | of which the edit (peak - RSS after imports) | edit / largest shard | "
        "edit / whole checkpoint | time (s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {m} | {r['peak_rss'] / 2**20:,.0f} | {r['work_rss'] / 2**20:,.0f} | {r['work_rss'] / largest:.2f} | "
            f"{r['work_rss'] / sum(sizes):.2f} | {r['seconds']:.1f} |"
            for m, r in rows.items()
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.append:
        with args.append.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")
    if not equal:
        sys.exit("the streamed and in-memory outputs differ")


if __name__ == "__main__":
    main()
