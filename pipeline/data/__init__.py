"""Token datasets: ``prepare`` writes one from raw text, ``dataset`` reads it back, ``order`` says
which rows each host reads at each train step and evaluation (and so which teacher targets a
cache must hold first)."""

from pipeline.data.dataset import (IGNORE_INDEX, DatasetInfo, HostBatches, TokenDataset,
                                   eval_batches, read_info)
from pipeline.data.order import global_order, host_offsets
from pipeline.data.prepare import (Document, is_held_out, load_tokenizer, pack_rows,
                                   prepare_dataset, resolve_sources, tokenizer_fingerprint,
                                   train_bpe_tokenizer)

__all__ = ["IGNORE_INDEX", "DatasetInfo", "Document", "HostBatches", "TokenDataset", "eval_batches",
           "global_order", "host_offsets", "is_held_out", "load_tokenizer", "pack_rows",
           "prepare_dataset", "read_info", "resolve_sources", "tokenizer_fingerprint",
           "train_bpe_tokenizer"]
