"""benchmarks/bench_onpolicy.py's figures: the reverse KL on sampled sequences against a
sequence-by-sequence float64 reference, the clustered standard error, the prompt/completion
split of functions, the teacher's corpus without the held-out functions."""

import importlib.util
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy.special import log_softmax, rel_entr

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_onpolicy.py"
_SPEC = importlib.util.spec_from_file_location("bench_onpolicy", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_reverse_kl_of_each_sequence_matches_a_one_by_one_float64_reference():
    from flax import nnx

    from toy_model import ToyDecoder

    vocab = 50
    student, teacher = ToyDecoder(vocab, seed=1), ToyDecoder(vocab, hidden=24, seed=2)
    rng = np.random.default_rng(0)
    sequences = [(rng.integers(0, vocab, p).tolist(), rng.integers(0, vocab, c).tolist())
                 for p, c in ((5, 3), (1, 7), (7, 1))]  # one length: one compilation each
    sums, counts = bench.reverse_kl(student, teacher, sequences, batch=2)  # a padded batch too
    np.testing.assert_array_equal(counts, [3, 7, 1])
    assert sums.dtype == np.float64
    alone = nnx.jit(lambda model, ids: model(ids).logits[0])  # one sequence, no padding
    for (prompt, continuation), got in zip(sequences, sums):
        ids = np.asarray([prompt + continuation], np.int32)
        log_s = log_softmax(np.asarray(alone(student, ids), np.float64), axis=-1)
        log_t = log_softmax(np.asarray(alone(teacher, ids), np.float64), axis=-1)
        before = slice(len(prompt) - 1, len(ids[0]) - 1)  # the logits before each new token
        want = rel_entr(np.exp(log_s[before]), np.exp(log_t[before])).sum()
        assert np.isclose(got, want, rtol=1e-5, atol=1e-9)  # float32 logits, batched or not


def test_clustered_standard_error_is_the_plain_one_for_equal_clusters():
    rng = np.random.default_rng(1)
    per_token = rng.gamma(2.0, size=30)
    mean, se = bench.clustered_mean(per_token * 4, np.full(30, 4))
    assert np.isclose(mean, per_token.mean())
    assert np.isclose(se, per_token.std(ddof=1) / np.sqrt(30))
    # unequal clusters: the token mean
    sums, counts = rng.gamma(2.0, size=30), rng.integers(1, 9, 30)
    assert np.isclose(bench.clustered_mean(sums, counts)[0], sums.sum() / counts.sum())


def test_functions_split_into_first_half_prompts_and_the_rest(tmp_path):
    source = tmp_path / "module.py"
    source.write_text(textwrap.dedent('''\
        def short(x):
            return x


        class C:
            def method(self, a):
                b = a + 1
                c = b * 2
                return c
        async def five():
            await one()
            await two()
            await three()
            return 4
        '''))
    characters = SimpleNamespace(encode=lambda text: SimpleNamespace(ids=list(text)))
    records = bench.function_records([str(source)], characters, seq_len=200)
    assert records == [  # functions of 4 lines or more, methods too
        {"prompt": "async def five():\n    await one()\n",
         "completion": "    await two()\n    await three()\n    return 4\n"},
        {"prompt": "    def method(self, a):\n        b = a + 1\n",
         "completion": "        c = b * 2\n        return c\n"}]
    # a row holds the function (81 and 78 characters) and its eos; a prompt (34, 43) at most
    # half a row
    assert bench.function_records([str(source)], characters, seq_len=84) == records[:1]
    assert bench.function_records([str(source)], characters, seq_len=79) == []


def test_the_teachers_corpus_holds_no_held_out_function(tmp_path):
    from pipeline.data.prepare import Document, is_held_out

    def function(name: str, value: int) -> dict:
        return {"prompt": f"def {name}(x):\n    y = x\n",
                "completion": f"    z = y + {value}\n    return z\n"}

    def held_out(record: dict) -> bool:
        return is_held_out(Document(record["completion"], prompt=record["prompt"]), 0.5)

    records = [function(f"f{i}", i) for i in range(12)]
    hidden = next(r for r in records if held_out(r))
    seen = [r for r in records if not held_out(r)]
    # a training function (an outer one) that holds the held-out one verbatim
    outer = next(r for r in ({"prompt": "def outer():\n", "completion": hidden["prompt"]
                              + hidden["completion"] + f"    return {i}\n"} for i in range(99))
                 if not held_out(r))
    functions = tmp_path / "functions.jsonl"
    functions.write_text("".join(json.dumps(r) + "\n" for r in records + [outer]))
    whole = hidden["prompt"] + hidden["completion"]
    demo = tmp_path / "a_demo.py"  # the modules the functions come from
    demo.write_text(whole)
    other = {name: tmp_path / f"{name}.py" for name in ("b", "c", "d")}
    for name, path in other.items():
        path.write_text(f"import {name}\n{whole}X = 1\n")
    config = SimpleNamespace(data=SimpleNamespace(sources=[str(functions)], eval_fraction=0.5))
    corpus = bench.teacher_corpus(config, [str(demo)], None)
    assert corpus[:len(seen)] == seen  # the training functions, less the outer one
    assert corpus[len(seen):] == [{"text": f"import {name}\nX = 1\n"} for name in other]
    assert [r["text"] for r in bench.teacher_corpus(config, [str(demo)], 2)[len(seen):]] == [
        "import b\nX = 1\n", "import c\nX = 1\n"]  # evenly spaced: indices 0 and 1 of 3
    assert bench.teacher_corpus(config, [str(demo)], 0) == seen
