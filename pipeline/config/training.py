"""The sections that fix what a run computes: data, cache, loss, optimizer and train (all in
the config hash but for their paths and cadences)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from pipeline.config.fields import Section, field
from pipeline.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Raw inputs, tokenizer, packing, the prepared token dataset and the sample order."""

    PATH: ClassVar[str] = "data"
    sources: tuple[str, ...] = field((), "Input files, directories or glob patterns (`**` "
                                     "recurses), read in this order. By extension: .jsonl "
                                     "(one JSON object a line), .parquet, .arrow (Hugging Face "
                                     "`datasets` files); any other file is one UTF-8 text "
                                     "document. A directory stands for its .jsonl/.parquet/"
                                     ".arrow/.txt files.", hashed=False)
    tokenizer: str | None = field(None, "Hugging Face `tokenizer.json` file, or a directory "
                                  "holding one: a local path, a gs://, s3:// or http(s):// URL, "
                                  "or hf://org/name[@revision]. null: the teacher's, "
                                  "model.teacher.path's tokenizer.json.", hashed=False)
    prepared_dir: str = field("data/prepared", "Directory of the prepared token dataset "
                              "(written by prepare-data, read by cache/train/eval).", hashed=False)
    seq_len: int = field(512, "Tokens per training sequence; at most the student's and the "
                         "teacher's max_position_embeddings.", gt=0)
    pack: bool = field(True, "Concatenate documents (each followed by eos_token) and cut the "
                       "stream into seq_len windows; false: every document starts a new row.")
    document_mask: bool = field(True, "Write per-token segment ids (each document's number "
                                "within its row from 1, 0 for padding): a token attends only "
                                "to its own document and RoPE positions restart at 0 at each "
                                "document start, so a packed row computes as its documents "
                                "alone; a document's last token gets no label (its successor "
                                "starts the next document). false: documents in a row see "
                                "each other, as datasets prepared before this option.")
    eos_token: str | None = field("<|endoftext|>", "Token appended after every document; must "
                                  "exist in the tokenizer. null: none.")
    text_field: str = field("text", "JSONL key / column holding a plain document (loss on "
                            "every token).")
    prompt_field: str = field("prompt", "JSONL key / column of a prompt (no loss on its tokens).")
    completion_field: str = field("completion", "JSONL key / column of the completion that "
                                  "follows the prompt (loss only on these tokens).")
    eval_fraction: float = field(0.05, "Share of documents held out for eval. A document is held "
                                 "out when the first 8 bytes of the SHA-256 of its text, read "
                                 "as a fraction of 2^64, fall below this value: stable under "
                                 "reordering, renaming and appending data.", ge=0.0, lt=1.0)
    seed: int = field(0, "Seed of the sample order; (seed, epoch) fix each epoch's permutation.")
    shuffle_window: int = field(
        0, "0: each epoch is a uniform shuffle of all rows. N > 0: each epoch visits blocks of N "
        "consecutive rows in a random order and the rows of each block in a random order, so "
        "the first steps of `kdpipe run` (offline) need only the first cache shards, not nearly "
        "all of them. Use a multiple of cache.shard_sequences, and blocks of many documents.",
        ge=0)
    rows_per_shard: int = field(8192, "Rows per parquet shard file of the prepared dataset.",
                                gt=0, hashed=False)


@dataclasses.dataclass(frozen=True)
class CacheConfig(Section):
    """The teacher-output cache (omit the section for a live or remote teacher only). Field names
    follow ``pipeline.cache.format.TargetSpec`` and ``CacheManifest``."""

    PATH: ClassVar[str] = "cache"
    path: str = field("cache", "Cache location: a local directory or a TensorStore kvstore URL "
                      "(gs://bucket/prefix/).", hashed=False)
    mode: Literal["full", "topk", "sampled"] = field("topk", "What is stored per token: all "
                                                     "logits, the top k log-probabilities plus "
                                                     "the tail mass, or n_draws sampled ids with "
                                                     "counts and the teacher entropy.")
    k: int = field(64, "Top-k size (mode topk); with top_p or bytes_per_token, the most ids a "
                   "token keeps.", gt=0)
    top_p: float | None = field(None, "Adaptive top-k (mode topk): each token keeps its most "
                                "probable ids until their mass reaches top_p (min_k to k of "
                                "them); the rest joins the exact tail bucket. null: k ids.",
                                gt=0.0, le=1.0)
    bytes_per_token: float | None = field(
        None, "Adaptive top-k by a bytes budget (mode topk; not with top_p): each cache shard "
        "keeps min_k ids per token, then as many of its most probable remaining candidates (of "
        "the top k, over all its tokens) as keep its stored bytes per token (as written, "
        "compressed) <= this; min_k ids are kept even past it. A live teacher's targets for "
        "uncached rows (hybrid) keep it per sequence. The cache writer holds a shard's "
        "candidates, shard_sequences x seq_len x k x 8 bytes. null: no budget.", gt=0.0)
    min_k: int = field(1, "Fewest ids a token keeps under top_p or bytes_per_token.", gt=0)
    n_draws: int = field(64, "Draws per token (mode sampled).", gt=0, le=255)
    value_dtype: Literal["q8sqrt", "q8", "bfloat16", "float32"] | None = field(
        None, "Stored values: q8sqrt (8-bit levels uniform in sqrt(p), then 1-nat log steps "
        "below p = 4e-4; topk only), q8 (8-bit log-probs with a per-token scale; topk only), "
        "bfloat16 or float32. null: q8sqrt for topk, float32 for full; must stay null for "
        "sampled.")
    id_encoding: Literal["gap", "packed"] = field("gap", "Token ids as sorted gaps (smaller) or "
                                                  "fixed-width packed bits.")
    temperature: float | None = field(None, "T_cache: the teacher temperature the topk/sampled "
                                      "targets are taken at; such a cache only serves "
                                      "loss.temperature == T_cache. null: loss.temperature.",
                                      gt=0.0)
    seed: int = field(0, "Seed of the sampled draws (mode sampled).")
    shard_sequences: int = field(256, "Sequences per cache shard: the unit one teacher host "
                                 "writes and commits.", gt=0, hashed=False)
    chunk_sequences: int = field(1, "Sequences per inner chunk: the unit a reader fetches; must "
                                 "divide shard_sequences.", gt=0, hashed=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "sampled" and self.value_dtype is not None:
            raise ConfigError(f"cache.value_dtype: must be null in mode sampled (it stores counts), "
                              f"got {self.value_dtype!r}")
        if self.mode == "full" and self.value_dtype in ("q8", "q8sqrt"):
            raise ConfigError(f"cache.value_dtype: {self.value_dtype} is for mode topk; use "
                              f"bfloat16 or float32 in mode full")
        if self.top_p is not None and self.bytes_per_token is not None:
            raise ConfigError(f"cache.top_p ({self.top_p}) and cache.bytes_per_token "
                              f"({self.bytes_per_token}): set one of them (each picks how many "
                              f"ids a token keeps)")
        if (self.top_p is not None or self.bytes_per_token is not None) and self.mode != "topk":
            raise ConfigError(f"cache.top_p / cache.bytes_per_token: adaptive top-k needs mode "
                              f"topk, got mode {self.mode!r}")
        if self.min_k > self.k:
            raise ConfigError(f"cache.min_k ({self.min_k}) must be <= cache.k ({self.k})")
        if self.shard_sequences % self.chunk_sequences:
            raise ConfigError(f"cache.chunk_sequences ({self.chunk_sequences}) must divide "
                              f"cache.shard_sequences ({self.shard_sequences})")


def hard_labels_only(alpha: float, use_hard_labels: bool) -> bool:
    """Whether the loss is the cross-entropy on the labels alone (``alpha == 0`` with
    ``use_hard_labels``): such a run, or step, needs no teacher targets."""
    return alpha == 0.0 and use_hard_labels


@dataclasses.dataclass(frozen=True)
class LossConfig(Section):
    """The distillation loss (``pipeline.losses.targets_distillation_loss`` and friends)."""

    PATH: ClassVar[str] = "loss"
    temperature: float = field(4.0, "Softmax temperature T of teacher and student; the KL term "
                               "is scaled by T^2.", gt=0.0)
    alpha: float = field(0.9, "Weight of the KL term; (1 - alpha) weighs the hard-label CE.",
                         ge=0.0, le=1.0)
    use_hard_labels: bool = field(False, "Add the cross-entropy on the dataset's labels.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = field(
        "forward_kl", "KL(teacher || student), KL(student || teacher), or the generalised "
        "Jensen-Shannon divergence with weight beta.")
    beta: float = field(0.5, "Mixture weight of the generalised JSD.", ge=0.0, le=1.0)
    hidden_state_weight: float = field(0.0, "Weight of the hidden-state loss (0: off).", ge=0.0)
    hidden_state_layers: tuple[int, ...] | None = field(None, "Indices into hidden_states "
                                                        "(negatives count from the end); null: all.")
    hidden_state_loss: Literal["mse", "cosine"] = field(
        "mse", "Hidden-state distance: mse (summed over features) or cosine (1 - cosine similarity).")
    attention_weight: float = field(0.0, "Weight of the attention-map MSE (0: off).", ge=0.0)
    attention_layers: tuple[int, ...] | None = field(None, "Layer indices for the attention "
                                                     "loss; null: all.")
    attention_normalize: bool = field(False, "Row-normalise attention maps before the MSE.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW with linear warmup then cosine decay (``build_optimizer``)."""

    PATH: ClassVar[str] = "optimizer"
    learning_rate: float = field(3e-4, "Peak learning rate, reached after warmup_steps.", gt=0.0)
    warmup_steps: int = field(100, "Steps of linear warmup from 0 to learning_rate.", ge=0)
    decay_steps: int | None = field(None, "Step at which the cosine decay reaches its end "
                                    "(counted from step 0); null: train.steps.", gt=0)
    min_lr_ratio: float = field(0.1, "Final learning rate as a fraction of learning_rate.",
                                ge=0.0, le=1.0)
    b1: float = field(0.9, "Adam beta1.", ge=0.0, lt=1.0)
    b2: float = field(0.95, "Adam beta2.", ge=0.0, lt=1.0)
    eps: float = field(1e-8, "Adam epsilon.", gt=0.0)
    weight_decay: float = field(0.1, "Decoupled weight decay, applied to matrices only (not to "
                                "norm scales or biases).", ge=0.0)
    clip_grad_norm: float | None = field(1.0, "Clip gradients to this global norm; null: no "
                                         "clipping.", gt=0.0)


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024): each step, a share of every host's
    rows is replaced by the student's own continuations of their prompts, scored by the teacher
    (``pipeline.onpolicy``). The loss (``loss.divergence``; GKD uses reverse_kl or jsd) covers
    the generated tokens only; the other rows train as without this section."""

    PATH: ClassVar[str] = "train.on_policy"
    fraction: float = field(0.5, "Share lambda of each host's rows replaced by rollouts: "
                            "round(fraction x rows per host) rows each step.", ge=0.0, le=1.0)
    max_new_tokens: int = field(64, "Most tokens generated per rollout (a rollout also stops at "
                                "data.eos_token).", gt=0)
    temperature: float = field(1.0, "Sampling temperature of the rollouts; 0: greedy.", ge=0.0)
    top_p: float = field(1.0, "Nucleus sampling: the smallest set of most likely tokens whose "
                         "probability reaches top_p; 1: all.", gt=0.0, le=1.0)
    top_k: int = field(0, "Sample among the top_k most likely tokens only; 0: all.", ge=0)
    prompt_source: Literal["prompt", "prefix"] = field(
        "prompt", "What the student continues: prompt = each row's prompt (the tokens before its "
        "first label, as prompt/completion data is prepared; prepare it with data.pack: false so "
        "that rows start with a prompt); prefix = the first prefix_tokens tokens of each row's "
        "first document.")
    prefix_tokens: int | None = field(None, "Prompt length for prompt_source prefix; null: "
                                      "data.seq_len - max_new_tokens.", gt=0)
    lag: int = field(0, "0: rollouts come from the current parameters; 1: from the parameters "
                     "one step behind, generated and scored while the previous step runs "
                     "(staleness reported as rollout_staleness).", ge=0, le=1)

    def prompt_tokens(self, seq_len: int) -> int:
        """The prompt width: the most prompt tokens a rollout continues, so that prompt plus
        ``max_new_tokens`` fit a row of ``seq_len`` tokens."""
        if self.prompt_source == "prefix" and self.prefix_tokens is not None:
            return self.prefix_tokens
        return seq_len - self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Steps, batch sizes and gradient accumulation."""

    PATH: ClassVar[str] = "train"
    steps: int = field(1000, "Optimizer steps of the run.", gt=0)
    global_batch_size: int = field(32, "Sequences per optimizer step, over all student hosts.", gt=0)
    grad_accum_steps: int = field(1, "Microbatches per step on each host (token-weighted "
                                  "accumulation). Not in the config hash: a resumed run may "
                                  "change it to fit fewer hosts.", gt=0, hashed=False)
    seed: int = field(0, "Seed of the student's initialisation and of the step's RNG.")
    logits_chunk_size: int = field(0, "Tokens per chunk of the fused output head + loss "
                                   "(pipeline.losses.fused_head); 0: materialise the full "
                                   "logits.",
                                   ge=0, hashed=False)
    on_policy: OnPolicyConfig | None = field(None, "On-policy distillation; null: off (every "
                                             "row from the dataset).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps ({self.grad_accum_steps}) must divide "
                              f"train.global_batch_size ({self.global_batch_size})")

    def micro_batch_size(self, hosts: int) -> int:
        """Sequences per microbatch on each of ``hosts`` hosts."""
        return self.global_batch_size // (hosts * self.grad_accum_steps)
