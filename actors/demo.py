"""``kdpipe demo``: the whole pipeline on this machine, on real text that needs no download.

The corpus is a fixed selection of the Python standard library's own sources (the running
interpreter's ``Lib/*.py``); the data split holds some modules out for evaluation. The demo

1. trains a small byte-level BPE tokenizer on the selection and packs the token data;
2. pretrains a small teacher on it (hard labels);
3. runs the distillation as ``kdpipe run`` does (``actors.driver.run``, an embedded Ray): a
   teacher host fills the teacher-output cache (the config's mode, top-k by default) for both
   splits while a student host distils a smaller student from the committed shards;
4. trains the same student, from the same initialisation, on hard labels only for the same
   number of steps (the same driver; it finds the cache complete and starts no teacher);
5. prints and saves (``<run_dir>/report.md``, ``comparison.json``) held-out CE, KL to the
   teacher, top-1 agreement, tokens/s, the cache's bytes/token and each phase's wall time.

Every phase is resumable: rerunning the demo after an interruption skips what is done and
resumes the rest (training runs from their checkpoints, the cache from its committed shards).
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
import time
from pathlib import Path

from pipeline.config import (DemoConfig, ModelConfig, ModelSpec, RunConfig, load_config)
from pipeline.errors import ConfigError

PHASES = ("tokenizer+data", "teacher", "distilled student (+ cache fill)", "hard-label student")


def stdlib_sources(max_files: int) -> list[str]:
    """``max_files`` of the interpreter's top-level standard-library modules, evenly spaced
    over their sorted list (the same selection on every run of one Python version)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise ConfigError(f"demo: no .py files found in {sysconfig.get_paths()['stdlib']}")
    count = min(max_files, len(files))
    return [str(files[i * len(files) // count]) for i in range(count)]


def demo_configs(config: RunConfig, sources: list[str]) -> dict[str, RunConfig]:
    """The three training runs of the demo, derived from one config."""
    run_dir = Path(config.run_dir)
    demo = config.demo or DemoConfig()
    hard_labels = dataclasses.replace(config.loss, alpha=0.0, use_hard_labels=True,
                                      hidden_state_weight=0.0, attention_weight=0.0)
    data = dataclasses.replace(config.data, sources=tuple(sources))
    teacher = dataclasses.replace(
        config, run_dir=str(run_dir / "teacher"), data=data, cache=None, loss=hard_labels,
        model=ModelConfig(teacher=ModelSpec(), student=config.model.teacher),
        train=dataclasses.replace(config.train, steps=demo.teacher_steps),
        optimizer=dataclasses.replace(config.optimizer, learning_rate=demo.teacher_learning_rate),
        cluster=dataclasses.replace(config.cluster, teacher_source=None))
    teacher_dir = str(run_dir / "teacher" / "student")
    with_teacher = dataclasses.replace(
        config.model, teacher=ModelSpec(path=teacher_dir, dtype=config.model.teacher.dtype))
    distilled = dataclasses.replace(config, run_dir=str(run_dir / "distilled"), data=data,
                                    model=with_teacher)
    baseline = dataclasses.replace(distilled, run_dir=str(run_dir / "hard-labels"), loss=hard_labels)
    return {"teacher": teacher, "distilled": distilled, "hard-labels": baseline}


def run_demo(config_path: str, overrides: list[str]) -> dict:
    """Run (or resume) the demo of ``config_path``; returns the comparison it saves."""
    from rich.console import Console
    from rich.table import Table

    from actors.driver import run
    from pipeline.cache import read_manifest, split_location
    from pipeline.data import prepare_dataset, train_bpe_tokenizer
    from pipeline.metrics import table_cell, write_report
    from pipeline.train import train

    console = Console()
    config = load_config(config_path, overrides)
    if config.cache is None:
        raise ConfigError("cache: the demo distils from a cache; its config needs a `cache:` section")
    if config.data.tokenizer is None:
        raise ConfigError("data.tokenizer: the demo trains its tokenizer into this file; set it "
                          "(configs/demo.yaml: runs/demo/tokenizer.json)")
    demo = config.demo or DemoConfig()
    run_dir = Path(config.run_dir)
    sources = stdlib_sources(demo.max_files)
    runs = demo_configs(config, sources)
    seconds: dict[str, float] = {}

    def phase(name: str):
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    start = phase(PHASES[0])
    tokenizer_path = Path(config.data.tokenizer)
    if not tokenizer_path.exists():
        train_bpe_tokenizer(sources, demo.tokenizer_vocab_size, tokenizer_path)
    if not (Path(config.data.prepared_dir) / "metadata.json").exists():
        prepare_dataset(runs["teacher"].data, progress=config.logging.progress)
    console.print(f"{len(sources)} stdlib files, tokenizer {tokenizer_path}")
    seconds[PHASES[0]] = time.perf_counter() - start

    start = phase(PHASES[1])
    teacher_result = train(runs["teacher"])
    seconds[PHASES[1]] = time.perf_counter() - start

    # Both students go through `kdpipe run`'s driver: for the distilled one a teacher host
    # fills the cache (train and eval splits) while the student trains on committed shards;
    # the hard-label one then finds the cache complete and starts no teacher (its eval reads
    # the teacher's held-out targets from it).
    results, outcomes = {}, {}
    for name, phase_name in (("distilled", PHASES[2]), ("hard-labels", PHASES[3])):
        start = phase(phase_name)
        outcomes[name] = run(runs[name], console=console)
        results[name] = outcomes[name].result
        seconds[phase_name] = time.perf_counter() - start
    fill_seconds = outcomes["distilled"].seconds.get("cache fill", 0.0)
    manifest = read_manifest(split_location(runs["distilled"].cache.path, "train"))
    bytes_per_token = manifest.committed_bytes / (manifest.num_sequences * manifest.seq_len)

    # The teacher is not measured against itself: no KL or agreement in its row (None, shown "—").
    rows = [{"model": "teacher", "held-out CE": teacher_result.final_eval.get("ce_loss"),
             "KL to teacher": None, "top-1 agreement": None,
             "train tokens/s": teacher_result.tokens_per_s}]
    for name, result in results.items():
        rows.append({"model": f"student ({name})",
                     "held-out CE": result.final_eval.get("ce_loss"),
                     "KL to teacher": result.final_eval.get("kl_loss"),
                     "top-1 agreement": result.final_eval.get("top1_agreement"),
                     "train tokens/s": result.tokens_per_s})
    gain = rows[2]["held-out CE"] - rows[1]["held-out CE"]
    comparison = {
        "rows": rows,
        "cache": {"mode": manifest.target.mode, "k": manifest.target.k,
                  "bytes_per_token": bytes_per_token},
        "seconds": seconds,
        "distilled_beats_hard_labels": gain > 0,
    }
    (run_dir / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n")
    notes = [f"cache: {manifest.target.mode}"
             + (f" k={manifest.target.k}" if manifest.target.k else "")
             + f", {bytes_per_token:.1f} bytes/token on disk",
             f"held-out CE of the distilled student is {abs(gain):.4f} nats "
             f"{'below' if gain > 0 else 'ABOVE'} the hard-label student's",
             "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
             f"the teacher host filled the cache in {fill_seconds:.0f} s of the distilled "
             f"student's phase, the student training on the shards already committed",
             f"corpus: {len(sources)} Python stdlib files; KL and top-1 agreement are measured "
             f"against the teacher's cached held-out targets; KL to teacher is "
             f"{manifest.target.kl_meaning}"]
    write_report(run_dir, "kdpipe demo: distilled vs hard-label student", rows, notes=notes,
                 runs={name: runs[name].run_dir for name in ("teacher", "distilled", "hard-labels")})

    table = Table(title="kdpipe demo: held-out Python stdlib modules")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*[table_cell(value) for value in row.values()])
    console.print(table)
    for note in notes:
        console.print(f"- {note}")
    console.print(f"report: {run_dir / 'report.md'}")
    return comparison
