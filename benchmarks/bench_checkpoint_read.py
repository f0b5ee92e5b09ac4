"""Bytes each host reads of a safetensors checkpoint kept behind http: ours (each JAX process
reads only the byte ranges of its devices' slices, ``pipeline.models.checkpoint_store``) vs
reading the whole checkpoint on every host (a download, or a whole-file read).

A random Llama-shaped checkpoint (``--hidden``, ``--intermediate``, ``--layers``, ``--vocab``,
bfloat16) is written with ``save_pretrained``, served on loopback by ``tests/loopback_http.py``
(which honours Range requests and counts the bytes it serves per client URL), and loaded with
``load_pretrained(url, mesh=...)`` by ``--processes`` JAX processes (``jax.distributed`` on CPU,
one device each) for each mesh of ``--meshes``; every process checks its shards against a
local whole-file load. The table gives each process's bytes read over the checkpoint's bytes;
the last lines the headline ratios: bytes per host, whole file / ours.

Which tensors split by Hugging Face rows depends on the mesh: with ``tensor`` the embedding,
q/k/v, gate and up split by rows (one byte range each) and o and down by columns (a range per
row, which TensorStore merges into one read when the gaps are under about 4 KiB, so narrow rows
are read whole); with ``fsdp`` the reverse, roughly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

_WORKER = """
import sys
import jax, numpy as np
from flax import nnx
coordinator, process, processes, url, local, axes = sys.argv[1:7]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator, num_processes=int(processes), process_id=int(process),
                           initialization_timeout=300)
from pipeline.models.hf_io import load_pretrained
from pipeline.models.sharding import make_mesh
sizes = {k: int(v) for k, v in (part.split("=") for part in axes.split(","))}
model = load_pretrained(url, dtype="bfloat16", mesh=make_mesh(**sizes))
whole = load_pretrained(local, dtype="bfloat16")
for (path, var), (_, ref) in zip(nnx.to_flat_state(nnx.state(model)),
                                 nnx.to_flat_state(nnx.state(whole))):
    for shard in var.get_value().addressable_shards:
        assert np.array_equal(np.asarray(shard.data), np.asarray(ref.get_value())[shard.index]), path
print("OK", process)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--meshes", nargs="+", default=["tensor=2", "fsdp=2"],
                   help="mesh axis sizes per run, e.g. tensor=2 or fsdp=2 (product = processes)")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args(argv)


def write_checkpoint(args, directory: Path) -> int:
    from pipeline.config import ModelSpec
    from pipeline.models.build import build_model
    from pipeline.models.hf_io import save_pretrained

    spec = ModelSpec(hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_hidden_layers=args.layers, num_attention_heads=args.heads,
                     num_key_value_heads=args.kv_heads, tie_word_embeddings=False,
                     dtype="bfloat16")
    save_pretrained(build_model(spec, args.vocab, seed=0), directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def load_on_processes(args, server, directory: Path, axes: str) -> list[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    server.take()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, coordinator, str(i),
                               str(args.processes), f"{server.url}/p{i}/{directory.name}/",
                               str(directory), axes], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(args.processes)]
    for proc in procs:
        out = proc.communicate(timeout=900)[0]
        if proc.returncode:
            raise SystemExit(f"a loading process failed ({axes}):\n{out[-3000:]}")
    served = server.take()
    return [served.get(f"p{i}", 0) for i in range(args.processes)]


def main(argv=None) -> None:
    args = parse_args(argv)
    from loopback_http import RangeServer

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "checkpoint"
        weight_bytes = write_checkpoint(args, directory)
        server = RangeServer(Path(tmp), prefixed=True)
        figures = {"checkpoint_bytes": weight_bytes, "meshes": {}}
        print(f"checkpoint: {weight_bytes / 2**20:.1f} MiB of safetensors (hidden {args.hidden}, "
              f"{args.layers} layers, vocab {args.vocab}, bfloat16), {args.processes} processes")
        print(f"{'mesh':<12}{'process':>8}{'MiB read':>11}{'share of file':>15}")
        for axes in args.meshes:
            per_process = load_on_processes(args, server, directory, axes)
            figures["meshes"][axes] = per_process
            for i, nbytes in enumerate(per_process):
                print(f"{axes:<12}{i:>8}{nbytes / 2**20:>11.2f}{nbytes / weight_bytes:>15.3f}")
        server.close()
    for axes, per_process in figures["meshes"].items():
        mean = sum(per_process) / len(per_process)
        print(f"{axes}: bytes per host, whole file / ours = {weight_bytes / mean:.2f}x "
              f"(ideal {args.processes}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
