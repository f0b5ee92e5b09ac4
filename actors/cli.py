"""The ``kdpipe`` command line.

Each verb loads and checks the config, then calls one function of ``pipeline`` (one host) or of
the driver (a Ray cluster). A problem with what the user gave (``KdpipeError``: config, data,
model, cache, checkpoint) prints one paragraph and exits with code 2; ``--debug`` shows the
traceback instead. SIGTERM during ``train`` saves a checkpoint and exits with code 143, and
running the same command again resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

USER_ERROR = 2
PREEMPTED = 128 + 15  # the shell's code for a process ended by SIGTERM

DESCRIPTION = """\
Distil a large language model into a small one: prepare token data, fill a compressed
teacher-output cache, train the student from it (or from a live teacher), evaluate, export
to a Hugging Face directory. `kdpipe demo` runs the whole thing on this machine in minutes."""

EPILOG = """\
typical flow:
  kdpipe prepare-data run.yaml    # text/JSONL/parquet -> packed token shards
  kdpipe cache run.yaml           # teacher -> <cache.path>/{train,eval}
  kdpipe train run.yaml           # student from the cache; resumes from run_dir
  kdpipe export run.yaml          # student -> <run_dir>/student (Hugging Face format)
or all at once on a Ray cluster (teacher and student host groups side by side):
  kdpipe run run.yaml [--address HOST:6379]   # embedded local Ray without an address
every field of run.yaml: docs/config-reference.md"""


def _load(args):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


def _teacher(config):
    from pipeline.data import read_info
    from pipeline.errors import ConfigError
    from pipeline.models.build import build_model, check_model_context
    from pipeline.teacher import teacher_mesh

    spec = config.model.teacher
    if not spec.from_pretrained:
        raise ConfigError("model.teacher.path: this verb needs the teacher's Hugging Face "
                          "directory (config.json + *.safetensors)")
    check_model_context(spec, "teacher", read_info(config.data.prepared_dir).seq_len)
    return build_model(spec, frozen=True, mesh=teacher_mesh(config.mesh))


def cmd_prepare_data(args) -> int:
    from pipeline.data import prepare_dataset

    config = _load(args)
    info = prepare_dataset(config.data, overwrite=args.overwrite, progress=True)
    for split, meta in info.splits.items():
        print(f"{split}: {meta['num_rows']} rows of {info.seq_len} tokens, "
              f"{meta['num_target_tokens']} target tokens, fingerprint {meta['fingerprint']}")
    segments = ("with segment ids (data.document_mask: attention and positions per document)"
                if info.document_mask else "without segment ids (documents in a row attend to "
                "each other)")
    print(f"written to {config.data.prepared_dir}, {segments}")
    return 0


def cmd_cache(args) -> int:
    from pipeline.errors import ConfigError
    from pipeline.models.hf_io import teacher_fingerprint
    from pipeline.teacher import fill_cache

    config = _load(args)
    if config.cache is None:
        raise ConfigError("cache: the config has no `cache:` section to fill")
    teacher = _teacher(config)
    fingerprint = teacher_fingerprint(config.model.teacher.path)
    for split in (("train", "eval") if args.split == "all" else (args.split,)):
        result = fill_cache(config, teacher, split, teacher_fp=fingerprint, progress=True)
        if not result.shards_written and not result.shards_skipped:
            print(f"{split}: no rows, nothing to cache")
            continue
        print(f"{split}: wrote {len(result.shards_written)} shards, "
              f"{len(result.shards_skipped)} already committed, "
              f"{result.tokens_per_s:,.0f} tokens/s")
    return 0


def cmd_train(args) -> int:
    from pipeline.train import train

    result = train(_load(args))
    print(json.dumps({"step": result.step, "eval": result.final_eval,
                      "tokens_per_s": round(result.tokens_per_s, 1),
                      "skipped_updates": result.skipped_updates,
                      "empty_batches": result.empty_batches,
                      "export": str(result.run_dir / "student")}, indent=1))
    return 0


def cmd_run(args) -> int:
    from actors.driver import run
    from actors.group_errors import HostGroupError

    try:
        outcome = run(_load(args), address=args.address)
    except HostGroupError as error:
        if error.user_error is None:
            raise
        raise error.user_error from error
    result = outcome.result
    print(json.dumps({"step": result.step, "eval": result.final_eval,
                      "skipped_updates": result.skipped_updates,
                      "empty_batches": result.empty_batches,
                      "teacher_source": outcome.source, "teacher_hosts": outcome.teacher_hosts,
                      "student_hosts": outcome.student_hosts,
                      "shards_written": len(outcome.shards_written),
                      "teacher_hosts_lost": outcome.teacher_hosts_lost,
                      "student_restarts": [dataclasses.asdict(r) for r in outcome.student_restarts],
                      "seconds": {k: round(v, 1) for k, v in outcome.seconds.items()},
                      "export": str(result.run_dir / "student")}, indent=1))
    return 0


def cmd_eval(args) -> int:
    from pipeline.checkpoint_commands import evaluate_checkpoint

    step, values, targets = evaluate_checkpoint(_load(args), step=args.step)
    print(json.dumps({"step": step, "teacher_targets": targets, **values}, indent=1))
    return 0


def cmd_export(args) -> int:
    from pipeline.checkpoint_commands import export_checkpoint

    step, path = export_checkpoint(_load(args), out=args.out, step=args.step)
    print(f"step {step} exported to {path}")
    return 0


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from pipeline.checkpoint_commands import checkpoint_student
    from pipeline.data.prepare import TOKENIZER_FILE, load_tokenizer
    from pipeline.errors import DataError
    from pipeline.generate import Sampling, generate, left_pad
    from pipeline.models.hf_io import load_pretrained

    config = _load(args)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    tokenizer_path = config.data.tokenizer
    if args.model:
        model = load_pretrained(args.model, dtype=config.model.student.dtype)
        if (Path(args.model) / TOKENIZER_FILE).is_file():
            tokenizer_path = args.model
    else:
        _, model = checkpoint_student(config, step=args.step)
    tokenizer = load_tokenizer(tokenizer_path)
    eos_id = None
    if config.data.eos_token is not None:
        eos_id = tokenizer.token_to_id(config.data.eos_token)
        if eos_id is None:
            raise DataError(f"data.eos_token: {config.data.eos_token!r} is not in the tokenizer "
                            f"{tokenizer_path}")
    prompts = [tokenizer.encode(text, add_special_tokens=False).ids for text in args.prompt]
    ids, mask = left_pad(prompts, pad_id=0)
    out = generate(model, ids, mask, max_new_tokens=args.max_new_tokens, sampling=sampling,
                   eos_id=eos_id, key=jax.random.PRNGKey(args.seed))
    tokens, lengths, stopped = (np.asarray(x) for x in (out.tokens, out.lengths, out.stopped))
    for i, text in enumerate(args.prompt):
        new = tokens[i, :lengths[i] - stopped[i]].tolist()  # the eos itself not printed
        if len(args.prompt) > 1:
            print(f"--- prompt {i + 1}" + (" (stopped at eos)" if stopped[i] else ""))
        print(text + tokenizer.decode(new))
    return 0


def cmd_inspect(args) -> int:
    from actors.inspect import describe

    print(describe(args.path))
    return 0


def cmd_demo(args) -> int:
    from actors.demo import run_demo

    run_demo(args.config, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdpipe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name, func, help_text, *, config=True, overrides=True):
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        if config:
            sub.add_argument("config", help="run config YAML (see configs/ and docs/config-reference.md)")
        if overrides:
            sub.add_argument("--set", dest="overrides", action="append", default=[],
                             metavar="KEY=VALUE", help="override a config field, e.g. --set "
                             "loss.temperature=2 (repeatable)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks of user errors")
        sub.set_defaults(func=func)
        return sub

    sub = verb("prepare-data", cmd_prepare_data,
               "tokenize data.sources with data.tokenizer and pack them into parquet token shards "
               "in data.prepared_dir (train and held-out splits)")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing prepared dataset (refused otherwise)")
    sub = verb("cache", cmd_cache,
               "run the teacher (model.teacher.path) over the prepared data and write its compressed "
               "targets to cache.path; committed shards are skipped, so a rerun resumes")
    sub.add_argument("--split", choices=("train", "eval", "all"), default="all",
                     help="which split to cache (default: both)")
    verb("train", cmd_train,
         "train the student on this host from the cache (offline) or a live teacher; resumes from "
         "the latest checkpoint in run_dir; exports the student and writes report.md at the end")
    sub = verb("run", cmd_run,
               "the whole run on Ray: a teacher host group fills the cache (offline) or serves "
               "targets (remote, hybrid) while the student host group trains as one JAX program; "
               "cluster.teacher_source picks the source, cluster.{teacher,student}.hosts the "
               "group sizes; a complete cache is reused; resumes from run_dir's checkpoints")
    sub.add_argument("--address", help="Ray cluster to join (GCS address, e.g. 10.0.0.2:6379, or "
                     "'auto'); default: RAY_ADDRESS, else the config's cluster.address, else an "
                     "embedded local Ray on this machine")
    sub = verb("eval", cmd_eval,
               "evaluate a checkpoint on the held-out split: CE on hard labels, KL to the teacher, "
               "top-1 agreement; the teacher's targets come from the eval cache (offline, and "
               "remote/hybrid when it is complete) or the teacher run on this host (live, and "
               "remote/hybrid otherwise), as teacher_targets in the output says")
    sub.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    sub = verb("export", cmd_export,
               "write a checkpoint's student as a Hugging Face directory (config.json + "
               "safetensors); needs the checkpoint and the config's student only (no teacher, "
               "cache or prepared data)")
    sub.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    sub.add_argument("--out", help="output directory (default: <run_dir>/student)")
    sub = verb("generate", cmd_generate,
               "continue each --prompt with the student of a checkpoint (or --model, a Hugging "
               "Face directory) and print prompt and continuation: KV-cache decoding, greedy or "
               "sampled, stopping at data.eos_token; the tokenizer is data.tokenizer's (or "
               "--model's tokenizer.json)")
    sub.add_argument("--prompt", action="append", required=True,
                     help="text to continue (repeatable: the prompts run as one batch)")
    sub.add_argument("--model", help="a Hugging Face directory to generate with instead of the "
                     "run's checkpoint")
    sub.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    sub.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens to generate at most per prompt")
    sub.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0: greedy")
    sub.add_argument("--top-k", type=int, default=0,
                     help="sample among the k most likely tokens; 0: all")
    sub.add_argument("--top-p", type=float, default=1.0,
                     help="sample among the most likely tokens holding this probability, in "
                     "(0, 1]; 1: all")
    sub.add_argument("--seed", type=int, default=0, help="sampling seed")
    sub = verb("inspect", cmd_inspect,
               "describe a cache (manifest, size, bytes/token, completeness), a run directory or a "
               "checkpoint directory (steps, position); reads a path, not a config, so --set is "
               "refused", config=False, overrides=False)
    sub.add_argument("path", help="a cache: a local directory or a TensorStore kvstore URL as "
                     "cache.path takes them (gs://bucket/prefix/, file:///path/); or a local run "
                     "directory or its checkpoints/")
    sub = verb("demo", cmd_demo,
               "the whole pipeline on this machine: tokenizer, teacher, top-k cache, a distilled "
               "student and a hard-label student, compared on held-out Python stdlib sources",
               config=False)
    sub.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"),
                     help="demo config (default: configs/demo.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.errors import KdpipeError
    from pipeline.train import Preempted

    try:
        return args.func(args)
    except KdpipeError as error:
        if args.debug:
            raise
        # paths and fingerprints stay whole, so that they can be copied from the message
        message = textwrap.fill(str(error), width=100, subsequent_indent="  ",
                                break_long_words=False, break_on_hyphens=False)
        print(f"kdpipe {args.verb}: error: {message}", file=sys.stderr)
        return USER_ERROR
    except Preempted as stop:
        print(f"kdpipe {args.verb}: {stop}", file=sys.stderr)
        return PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
