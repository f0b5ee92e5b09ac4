"""On-policy distillation vs offline-only distillation vs hard labels, on held-out Python functions.

The demo corpus (actors/demo.py: the standard-library modules ``kdpipe demo`` selects) cut into
functions: each function's first half of lines is a prompt, the rest its completion
(``prompt``/``completion`` JSONL, one function a row, loss on completions only; the held-out
split is ``pipeline.data.prepare``'s, by hash). In a work directory that reruns reuse:

1. the demo's tokenizer, the function dataset, and the teacher: the demo's teacher model
   trained (hard labels, ``--teacher-steps``, rows packed) on more text than the student sees,
   as real teachers are: the student's training functions plus the whole source of
   ``--teacher-modules`` standard-library modules outside the demo's selection (default: all
   of them). The held-out functions stay unseen by the teacher: their modules are not among
   those, the functions it gets are the training split's (less any that holds a held-out
   one, as a class's or an outer function's text can), and any verbatim copy of a held-out
   function in the extra modules is cut out (``teacher_corpus``). Its held-out CE is printed
   next to the hard-label student's;
2. a student trained ``--warm-steps`` on hard labels (GKD, like most on-policy recipes,
   starts from a supervised student: reverse KL from a random student learns slowly), then
   four students from it, ``--steps`` steps each at the same batch, the teacher live in the
   step (``pipeline.train.train``), every loss at temperature 1: **hard labels** (CE alone),
   **offline** (the divergence ``--divergence`` to the teacher on the dataset's completions:
   the same loss as on-policy, so the two differ only in the text trained on),
   **offline-fkl** (the forward KL on the dataset's completions: supervised KD, what kdpipe
   does offline by default and GKD's baseline), **on-policy** (``--divergence``, with
   ``--fraction`` of each batch the student's own continuations of its prompts,
   ``train.on_policy``, sampled as the evaluation samples: ``--temperature``, no top-p or
   top-k, at most ``--new-tokens``). The distilled arms run the teacher over the same number
   of rows per step: equal steps, equal teacher FLOPs;
3. each student continues ``--prompts`` held-out prompts ``--samples`` times (``pipeline.generate``,
   temperature ``--temperature``, at most ``--new-tokens`` tokens); the teacher and the student
   score those sequences, and the **reverse KL on the student's own samples**,
   ``KL(p_student || p_teacher)`` per generated token (through eos), is reduced in float64
   (token mean over all the arm's sampled tokens, the same normalisation for every arm, and its
   standard error over sequences); the same reverse KL on the held-out completions
   (**on data**: the teacher-forced text offline training sees; on-policy can only gain where
   the student's own samples are scored worse than that); **held-out CE** is the student's
   cross-entropy on the held-out completions, float64, standard error over rows.

One table side by side; the last lines are the issue's goal: on-policy has the lowest reverse
KL on student samples, and held-out CE no worse than each offline arm's by more than noise
(two standard errors of the per-row difference, both students being scored on the same rows).

    python benchmarks/bench_onpolicy.py                    # the default, minutes on 2 cores
    python benchmarks/bench_onpolicy.py --warm-steps 0          # every arm from initialisation
    python benchmarks/bench_onpolicy.py --steps 600 --teacher-steps 1500 --workdir runs/onp-big
    python benchmarks/bench_onpolicy.py --arms hard-labels    # the teacher vs the hard-label student
    python benchmarks/bench_onpolicy.py --teacher-steps 800 --warm-steps 150 --steps 600
        --new-tokens 44 --prompts 156 --samples 4 --divergence forward_kl   (one line; ~40 min)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
ARMS = ("hard-labels", "offline", "offline-fkl", "on-policy")


# --------------------------------------------------------------------------------------------
# Data and teacher
# --------------------------------------------------------------------------------------------

def function_records(sources: list[str], tokenizer, seq_len: int) -> list[dict]:
    """Every function (and method) of ``sources`` of at least 4 lines whose tokens and eos fit
    one row of ``seq_len``, its prompt half of it at most: ``{"prompt": first half of its
    lines, "completion": the rest}``."""
    records = []
    for source in sources:
        text = Path(source).read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = lines[node.lineno - 1:node.end_lineno]
            if len(body) < 4:
                continue
            half = len(body) // 2
            prompt, completion = "".join(body[:half]), "".join(body[half:])
            if (len(tokenizer.encode(prompt + completion).ids) < seq_len  # + eos
                    and len(tokenizer.encode(prompt).ids) <= seq_len // 2):
                records.append({"prompt": prompt, "completion": completion})
    return records


def base_config(workdir: Path, args):
    """configs/demo.yaml with its paths under ``workdir``, rows of one function each."""
    from pipeline.config import load_config

    config = load_config(DEMO_CONFIG, [
        f"run_dir={workdir}", f"data.tokenizer={workdir / 'tokenizer.json'}",
        f"data.prepared_dir={workdir / 'data'}", f"data.sources=[{workdir / 'functions.jsonl'}]",
        "data.pack=false", f"demo.teacher_steps={args.teacher_steps}",
        f"train.steps={args.steps}", f"train.global_batch_size={args.batch}",
        "cluster.teacher_source=live", "eval.every_steps=0", "checkpoint.every_steps=1000000",
        "logging.every_steps=25",
        "logging.progress=false", "logging.report=false", "logging.tensorboard=false"])
    return dataclasses.replace(config, cache=None)  # the teacher runs live: nothing cached


def teacher_corpus(config, demo_sources: list[str], modules: int | None) -> list[dict]:
    """The teacher's documents: the student's training functions (``prompt``/``completion``
    records outside ``pipeline.data.prepare``'s held-out split) that hold no held-out function
    (a method's class or an outer function can), and, as ``text`` records, the whole source of
    ``modules`` (None: all) standard-library modules outside ``demo_sources``, evenly spaced
    over their sorted list, each with any verbatim copy of a held-out function cut out."""
    from pipeline.data.prepare import Document, is_held_out

    def whole(record: dict) -> str:
        return record["text"] if "text" in record else record["prompt"] + record["completion"]

    records = [json.loads(line) for line in Path(config.data.sources[0]).read_text().splitlines()]
    split = [is_held_out(Document(r["completion"], prompt=r["prompt"]), config.data.eval_fraction)
             for r in records]
    held_out = [whole(r) for r, out in zip(records, split) if out]
    corpus = [r for r, out in zip(records, split)
              if not out and not any(function in whole(r) for function in held_out)]
    others = sorted(set(map(str, Path(demo_sources[0]).parent.glob("*.py"))) - set(demo_sources))
    count = len(others) if modules is None else min(modules, len(others))
    for path in (others[i * len(others) // count] for i in range(count)):
        text = Path(path).read_text(encoding="utf-8")
        for function in held_out:
            text = text.replace(function, "")
        corpus.append({"text": text})
    return corpus


def teacher_run(config, demo_sources: list[str], args):
    """The teacher's training run (the demo's teacher, ``actors.demo.demo_configs``) on
    ``teacher_corpus``, packed, every row for training; its corpus and prepared data made once
    in the work dir, named after the run."""
    from actors.demo import demo_configs
    from pipeline.data import prepare_dataset

    workdir = Path(config.run_dir)
    modules = "all" if args.teacher_modules is None else args.teacher_modules
    name = f"teacher-m{modules}-{args.teacher_steps}"
    corpus = workdir / f"{name}.jsonl"
    data = dataclasses.replace(config.data, sources=(str(corpus),), pack=True, eval_fraction=0.0,
                               prepared_dir=str(workdir / f"{name}-data"))
    if not (Path(data.prepared_dir) / "metadata.json").exists():
        records = teacher_corpus(config, demo_sources, args.teacher_modules)
        corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
        prepare_dataset(data, overwrite=True, progress=False)
    teacher = demo_configs(config, list(data.sources))["teacher"]
    return dataclasses.replace(teacher, run_dir=str(workdir / name), data=data)


def prepare(workdir: Path, args):
    """Tokenizer, function dataset and trained teacher in ``workdir`` (each made once);
    returns the base config and the teacher's Hugging Face directory."""
    from actors.demo import stdlib_sources
    from pipeline.data import load_tokenizer, prepare_dataset, train_bpe_tokenizer
    from pipeline.train import train

    config = base_config(workdir, args)
    sources = stdlib_sources(config.demo.max_files)
    if not Path(config.data.tokenizer).exists():
        train_bpe_tokenizer(sources, config.demo.tokenizer_vocab_size, config.data.tokenizer)
    functions = Path(config.data.sources[0])
    if not functions.exists():
        records = function_records(sources, load_tokenizer(config.data.tokenizer),
                                   config.data.seq_len)
        functions.write_text("".join(json.dumps(r) + "\n" for r in records))
    if not (Path(config.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(config.data, progress=False)
    teacher_config = teacher_run(config, sources, args)
    teacher_dir = Path(teacher_config.run_dir) / "student"
    if not (teacher_dir / "config.json").exists():
        started = time.perf_counter()
        train(teacher_config)
        print(f"teacher: {args.teacher_steps} steps in {time.perf_counter() - started:.0f} s")
    return config, teacher_dir


def arm_config(config, teacher_dir: Path, arm: str, args, *, start: Path | None = None,
               steps: int | None = None, name: str | None = None):
    """The run of one arm: the same student (initialised from ``train.seed``, or the one
    exported at ``start``), steps (``steps``, default ``--steps``), batch and optimizer; the
    teacher live. Its run directory: ``name`` under the work dir."""
    from pipeline.config import ModelSpec

    model = dataclasses.replace(config.model, teacher=ModelSpec(path=str(teacher_dir)))
    if start is not None:
        model = dataclasses.replace(model, student=ModelSpec(path=str(start)))
    # hard labels use no divergence: the configured one, whatever --divergence, so that the
    # warm start and the hard-label arm serve every --divergence of a work dir
    divergence = {"hard-labels": config.loss.divergence, "offline-fkl": "forward_kl"}
    loss = dataclasses.replace(config.loss, alpha=0.0 if arm == "hard-labels" else 1.0,
                               use_hard_labels=arm == "hard-labels",
                               divergence=divergence.get(arm, args.divergence), temperature=1.0)
    train = dataclasses.replace(config.train, steps=steps or args.steps)
    name = name or f"{arm}-w{args.warm_steps}-{train.steps}"
    if arm != "hard-labels":
        name += f"-{teacher_dir.parent.name}"
    if arm in ("offline", "on-policy"):
        name += f"-{args.divergence}"
    if arm == "on-policy":
        train = dataclasses.replace(train, on_policy=on_policy_section(args))
        name += f"-l{args.fraction}-n{args.new_tokens}-t{args.temperature}"
    return dataclasses.replace(config, run_dir=str(Path(config.run_dir) / name), model=model,
                               loss=loss, train=train)


def warm_start(config, teacher_dir: Path, args) -> Path | None:
    """The student every arm starts from: ``--warm-steps`` of hard-label training (GKD starts
    from a supervised student too), exported; None: from initialisation."""
    from pipeline.train import train

    if not args.warm_steps:
        return None
    run = arm_config(config, teacher_dir, "hard-labels", args, steps=args.warm_steps,
                     name=f"warm-{args.warm_steps}")
    started = time.perf_counter()
    train(run)
    print(f"warm start: {args.warm_steps} hard-label steps, {time.perf_counter() - started:.0f} s")
    return Path(run.run_dir) / "student"


def on_policy_section(args):
    """``train.on_policy`` of the on-policy arm: λ = ``--fraction`` of each batch rolled out
    by the student from its rows' prompts."""
    from pipeline.config import OnPolicyConfig

    return OnPolicyConfig(fraction=args.fraction, max_new_tokens=args.new_tokens,
                          temperature=args.temperature, prompt_source="prompt")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def held_out_prompts(config, count: int) -> list[list[int]]:
    """The token ids of the first ``count`` held-out functions' prompts (the split rule of
    ``pipeline.data.prepare``, the tokenization of its ``prompt`` fields)."""
    from pipeline.data import load_tokenizer
    from pipeline.data.prepare import Document, is_held_out

    tokenizer = load_tokenizer(config.data.tokenizer)
    prompts = []
    for line in Path(config.data.sources[0]).read_text().splitlines():
        record = json.loads(line)
        if is_held_out(Document(record["completion"], prompt=record["prompt"]),
                       config.data.eval_fraction):
            prompts.append(tokenizer.encode(record["prompt"]).ids)
        if len(prompts) == count:
            break
    return prompts


def _logits_fn():
    from flax import nnx

    @nnx.jit
    def logits(model, ids, mask, segments):
        return model(ids, mask, segment_ids=segments).logits

    return logits


def float64_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def clustered_mean(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Token mean ``Σ sums / Σ counts`` over clusters (sequences) and its standard error
    (the ratio estimator's linearisation: tokens of one sequence are not independent)."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    mean = sums.sum() / counts.sum()
    n = len(sums)
    se = math.sqrt(n / max(n - 1, 1) * np.sum((sums - mean * counts) ** 2)) / counts.sum()
    return float(mean), float(se)


def sample_continuations(student, prompts: list[list[int]], *, samples: int, new_tokens: int,
                         temperature: float, eos_id: int, seed: int, batch: int = 32
                         ) -> tuple[list[tuple[list[int], list[int]]], float]:
    """``samples`` continuations of each of ``prompts`` by ``student`` (``pipeline.generate``,
    at most ``new_tokens``, through eos): ``[(prompt, continuation)]``, and the fraction of
    them that stopped at eos."""
    import jax

    from pipeline.generate import Sampling, generate, left_pad

    jobs = [p for p in prompts for _ in range(samples)]
    key = jax.random.PRNGKey(seed)
    out, stopped = [], []
    for first in range(0, len(jobs), batch):
        group = jobs[first:first + batch]
        real = len(group)
        group = group + [group[-1]] * (batch - real)  # one compiled shape
        ids, mask = left_pad(group, pad_id=0)
        generated = generate(student, ids, mask, max_new_tokens=new_tokens,
                             sampling=Sampling(temperature=temperature), eos_id=eos_id,
                             key=jax.random.fold_in(key, first))
        tokens, lengths = np.asarray(generated.tokens), np.asarray(generated.lengths)
        out += [(group[i], tokens[i, :lengths[i]].tolist()) for i in range(real)]
        stopped += np.asarray(generated.stopped)[:real].tolist()
    return out, float(np.mean(stopped))


def reverse_kl(student, teacher, sequences: list[tuple[list[int], list[int]]], *,
               batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per ``(prompt, continuation)``: the sum over its continuation's tokens ``t`` of
    ``KL(p_s || p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v))``, both distributions from the
    logits before ``t``, in float64; and the continuation's length."""
    logits = _logits_fn()
    width = max(len(p) + len(c) for p, c in sequences)  # one compiled shape
    sums = []
    for first in range(0, len(sequences), batch):
        group = sequences[first:first + batch]
        # right-padded prompt + continuation: plain causal positions
        seq = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), np.int32)
        for i, (prompt, continuation) in enumerate(group):
            seq[i, :len(prompt) + len(continuation)] = prompt + continuation
            mask[i, :len(prompt) + len(continuation)] = 1
        log_s = float64_log_softmax(logits(student, seq, mask, mask))
        log_t = float64_log_softmax(logits(teacher, seq, mask, mask))
        kl = np.sum(np.exp(log_s) * (log_s - log_t), axis=-1)  # [batch, width]
        sums += [kl[i, len(p) - 1:len(p) - 1 + len(c)].sum() for i, (p, c) in enumerate(group)]
    return np.asarray(sums), np.asarray([len(c) for _, c in sequences])


def reverse_kl_on_samples(student, teacher, prompts: list[list[int]], **sampling) -> dict:
    """The teacher's reverse KL on the student's own continuations of ``prompts``
    (``sample_continuations``'s ``sampling`` options): token mean and its standard error over
    sequences, mean generated length, fraction stopped at eos."""
    sequences, eos_fraction = sample_continuations(student, prompts, **sampling)
    sums, counts = reverse_kl(student, teacher, sequences)
    mean, se = clustered_mean(sums, counts)
    return {"reverse_kl": mean, "reverse_kl_se": se, "mean_length": float(counts.mean()),
            "eos_fraction": eos_fraction, "sequences": len(sequences)}


def held_out_sequences(config) -> list[tuple[list[int], list[int]]]:
    """Every held-out row with a completion as ``(prompt, completion)`` token lists: the prompt
    through the token whose label is the first (``pipeline.onpolicy.prompt_lengths``), the
    completion the labelled tokens after it (through eos), as ``reverse_kl`` takes them."""
    from pipeline.config import OnPolicyConfig
    from pipeline.data import TokenDataset
    from pipeline.data.dataset import IGNORE_INDEX
    from pipeline.onpolicy import prompt_lengths

    data = TokenDataset(config.data.prepared_dir, "eval")
    rows = data.read_rows(np.arange(data.num_rows))
    labelled = rows["labels"] != IGNORE_INDEX
    starts = prompt_lengths(rows, OnPolicyConfig(prompt_source="prompt"), data.seq_len)
    ends = data.seq_len - np.argmax(labelled[:, ::-1], axis=1)  # after the last label
    # the targets, not input_ids[start:]: a full row's last target is past its input_ids
    return [(ids[:start].tolist(), labels[start - 1:end].tolist())
            for ids, labels, start, end, any_label in zip(
                rows["input_ids"], rows["labels"], starts, ends, labelled.any(axis=1))
            if any_label]


def held_out_ce(student, config, *, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The student's cross-entropy on the held-out completions (labelled tokens), float64:
    per held-out row with a completion, its sum over tokens and its token count."""
    from pipeline.data import TokenDataset
    from pipeline.data.dataset import IGNORE_INDEX

    logits = _logits_fn()
    data = TokenDataset(config.data.prepared_dir, "eval")
    sums, counts = [], []
    for first in range(0, data.num_rows, batch):
        rows = data.read_rows(np.arange(first, min(first + batch, data.num_rows)))
        log_p = float64_log_softmax(logits(student, rows["input_ids"], rows["attention_mask"],
                                           rows.get("segment_ids")))
        labels = rows["labels"]
        taken = np.take_along_axis(log_p, np.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        labelled = labels != IGNORE_INDEX
        ce = np.where(labelled, -taken, 0.0)
        sums.extend(ce.sum(axis=1))
        counts.extend(labelled.sum(axis=1))
    keep = np.asarray(counts) > 0
    return np.asarray(sums)[keep], np.asarray(counts)[keep]


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------

TABLE_HEADER = (f"{'arm':<12} {'rev KL own samples':>18} {'rev KL on data':>16} "
                f"{'held-out CE':>16} {'gen len':>8} {'eos':>5} {'teacher tokens':>15}")


def table_row(arm: str, f: dict) -> str:
    return (f"{arm:<12} {f['reverse_kl']:>9.4f} ± {f['reverse_kl_se']:.4f} "
            f"{f['reverse_kl_data']:>7.4f} ± {f['reverse_kl_data_se']:.4f} "
            f"{f['held_out_ce']:>7.4f} ± {f['held_out_ce_se']:.4f} {f['mean_length']:>8.1f} "
            f"{f['eos_fraction']:>5.2f} {f['teacher_tokens']:>15,}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default="runs/bench_onpolicy",
                        help="tokenizer, data, teacher and students; reruns reuse them")
    parser.add_argument("--teacher-steps", type=int, default=300,
                        help="hard-label steps of the teacher (made once per work dir)")
    parser.add_argument("--teacher-modules", type=int, default=None,
                        help="standard-library modules outside the demo's selection whose "
                             "whole source the teacher also trains on (default: all; 0: only "
                             "the student's training functions)")
    parser.add_argument("--warm-steps", type=int, default=100,
                        help="hard-label steps of the student all arms start from (0: none)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each arm")
    parser.add_argument("--batch", type=int, default=16, help="rows per step, each arm")
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="on-policy arm: share of each batch the student rolls out (λ)")
    parser.add_argument("--divergence", default="reverse_kl",
                        choices=("forward_kl", "reverse_kl", "jsd"),
                        help="the distilled arms' divergence (loss.divergence)")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="tokens the student generates per prompt (training and evaluation)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts evaluated")
    parser.add_argument("--samples", type=int, default=2, help="continuations per prompt")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.teacher_modules is not None and args.teacher_modules < 0:
        parser.error("--teacher-modules: expected an integer >= 0")
    for name in ("teacher_steps", "steps", "batch", "new_tokens", "prompts", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.warm_steps < 0:
        parser.error("--warm-steps: expected an integer >= 0")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction: expected a number in (0, 1], got {args.fraction}")
    if not args.temperature > 0:
        parser.error(f"--temperature: expected a number > 0, got {args.temperature}")
    return args


def main():
    args = parse_args()
    from pipeline.data import load_tokenizer
    from pipeline.models.build import build_model
    from pipeline.config import ModelSpec
    from pipeline.train import train

    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    seq_len = base_config(workdir, args).data.seq_len
    if args.new_tokens > seq_len - seq_len // 2:
        raise SystemExit(f"--new-tokens: at most {seq_len - seq_len // 2} (prompts take up to "
                         f"half of a {seq_len}-token row)")
    config, teacher_dir = prepare(workdir, args)
    for name in ("steps", "warm_steps"):
        if 0 < getattr(args, name) < config.optimizer.warmup_steps:
            raise SystemExit(f"--{name.replace('_', '-')}: at least optimizer.warmup_steps "
                             f"({config.optimizer.warmup_steps}) or 0")
    teacher = build_model(ModelSpec(path=str(teacher_dir)), frozen=True)
    eos_id = load_tokenizer(config.data.tokenizer).token_to_id(config.data.eos_token)
    prompts = held_out_prompts(config, args.prompts)
    completions = held_out_sequences(config)
    if len(prompts) < args.prompts:
        print(f"only {len(prompts)} held-out functions; evaluating those")
    out = {"args": vars(args), "arms": {}}
    teacher_ce, ce_counts = held_out_ce(teacher, config)  # per held-out row, as every arm's
    out["teacher"] = dict(zip(("held_out_ce", "held_out_ce_se"),
                              clustered_mean(teacher_ce, ce_counts)))
    print(f"teacher: held-out CE {out['teacher']['held_out_ce']:.4f} ± "
          f"{out['teacher']['held_out_ce_se']:.4f}", flush=True)
    ce_sums = {}  # arm -> per held-out row
    start = warm_start(config, teacher_dir, args)
    for arm in args.arms:
        run = arm_config(config, teacher_dir, arm, args, start=start)
        started = time.perf_counter()
        train(run)
        seconds = time.perf_counter() - started
        student = build_model(ModelSpec(path=str(Path(run.run_dir) / "student")), frozen=True)
        figures = reverse_kl_on_samples(student, teacher, prompts, samples=args.samples,
                                        new_tokens=args.new_tokens, temperature=args.temperature,
                                        eos_id=eos_id, seed=0)
        figures["reverse_kl_data"], figures["reverse_kl_data_se"] = clustered_mean(
            *reverse_kl(student, teacher, completions))
        ce_sums[arm] = held_out_ce(student, config)[0]
        figures["held_out_ce"], figures["held_out_ce_se"] = clustered_mean(ce_sums[arm], ce_counts)
        # the tokens the live teacher runs over in training (whole rows each step); the
        # on-policy arm's rollout_reverse_kl metric runs it once more on each logged step
        logged = 0 if arm != "on-policy" else -(-args.steps // run.logging.every_steps)
        figures["teacher_tokens"] = (0 if arm == "hard-labels" else
                                     (args.steps + logged) * args.batch * seq_len)
        figures["train_s"] = seconds
        out["arms"][arm] = figures
        print(f"{arm}: {seconds:.0f} s (a finished run in the work dir is reused)")
        print(table_row(arm, figures), flush=True)

    print(f"\n{args.warm_steps} hard-label steps, then {args.steps} steps x {args.batch} rows, "
          f"λ = {args.fraction}, divergence {args.divergence} (offline-fkl: forward_kl), "
          f"{len(prompts)} held-out prompts x {args.samples} samples of <= {args.new_tokens} "
          f"tokens, {len(completions)} held-out completions")
    print(TABLE_HEADER)
    for arm, f in out["arms"].items():
        print(table_row(arm, f))
    arms = out["arms"]
    if "hard-labels" in arms:  # paired: the same rows
        gap, gap_se = clustered_mean(teacher_ce - ce_sums["hard-labels"], ce_counts)
        out["teacher"]["vs_hard_labels"] = {"ce_gap": gap, "ce_noise": 2 * gap_se}
        print(f"teacher vs the hard-label student: held-out CE {gap:+.4f} nats (noise, 2 s.e.: "
              f"{2 * gap_se:.4f})")
    offline = [arm for arm in ("offline", "offline-fkl") if arm in arms]
    if "on-policy" in arms and offline:
        lowest = min(arms, key=lambda a: arms[a]["reverse_kl"])
        out["goal"] = {"lowest_reverse_kl": lowest, "vs": {}}
        met = lowest == "on-policy"
        for arm in offline:
            kl_ratio = arms["on-policy"]["reverse_kl"] / arms[arm]["reverse_kl"]
            # paired: both students on the same rows
            ce_gap, gap_se = clustered_mean(ce_sums["on-policy"] - ce_sums[arm], ce_counts)
            out["goal"]["vs"][arm] = {"reverse_kl_ratio": kl_ratio, "ce_gap": ce_gap,
                                      "ce_noise": 2 * gap_se}
            met = met and ce_gap <= 2 * gap_se
            print(f"on-policy vs {arm}: reverse KL on student samples {kl_ratio:.3f}x; held-out "
                  f"CE {ce_gap:+.4f} nats (noise, 2 s.e.: {2 * gap_se:.4f})")
        out["goal"]["met"] = met
        absent = [arm for arm in ARMS if arm not in arms]  # a verdict among the arms run only
        print(f"lowest reverse KL on student samples: {lowest}; goal {'met' if met else 'NOT met'}"
              + (f" among the arms of this run (not run: {', '.join(absent)})" if absent else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
