"""Embedding rows/s: ``bertpipe run`` with a ``kind: embedding`` task against
``SentenceTransformer.encode``, both on the shipped all-MiniLM-L6-v2, in fp32 and bf16, on the same
corpus (the benchmark's generated corpus, ``benchmarks/corpus.py``).

    python benchmarks/embedding.py --rows 2000

Each way embeds every row (truncated at the model's 256 tokens, as sentence-transformers does). bertpipe
is timed end to end (a local Ray, read, tokenise, model, write); ``encode`` on the texts in memory with
``batch_size=32``, so its figure leaves out reading and writing. Agreement is the lowest per-row cosine
of each way against sentence-transformers in fp32. bf16 on a CPU without AVX512-BF16 or AMX is emulated
by torch and slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corpus import Corpus  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sentence_transformers_way(folder: str, texts: list[str], dtype: str) -> tuple[np.ndarray, float]:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device="cpu")
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.encode(texts[:32], batch_size=32)  # warm-up
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32, convert_to_numpy=False)
    seconds = time.perf_counter() - started
    return np.stack([v.float().numpy() for v in vectors]), seconds


def bertpipe_way(folder: str, corpus: Corpus, out: Path, dtype: str) -> tuple[dict[str, np.ndarray], float]:
    import bertpipe

    started = time.perf_counter()
    bertpipe.run(
        {
            "input": {"paths": [str(corpus.shards)]},
            "output": {"path": str(out), "mode": "overwrite"},
            "tasks": [{"name": "embedding", "kind": "embedding", "model": folder}],
            "runtime": {"dtype": dtype},
        }
    )
    seconds = time.perf_counter() - started
    table = pads.dataset(str(out), partitioning="hive").to_table(columns=["id", "embedding"])
    return dict(
        zip(table.column("id").to_pylist(), table.column("embedding").to_numpy(), strict=True)
    ), seconds


def main(argv: list[str] | None = None) -> int:
    from bertpipe.models.loading import shipped_encoder_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=RESULTS / "work")
    p.add_argument("--out", type=Path, default=RESULTS / "embedding.json")
    args = p.parse_args(argv)
    folder = str(shipped_encoder_dir())
    corpus = Corpus.ensure(args.work, args.rows, args.seed)
    table = corpus.table()
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    reference = None
    report = {"rows": len(texts), "ways": {}}
    for dtype in ("float32", "bfloat16"):
        st_vectors, st_seconds = sentence_transformers_way(folder, texts, dtype)
        if reference is None:
            reference = st_vectors
        got, bp_seconds = bertpipe_way(folder, corpus, args.work / f"embedding-{dtype}", dtype)
        bp_vectors = np.stack([np.asarray(got[i], np.float32) for i in ids])
        for way, vectors, seconds in (
            (f"SentenceTransformer.encode {dtype}", st_vectors, st_seconds),
            (f"bertpipe run {dtype}", bp_vectors, bp_seconds),
        ):
            cosine = (vectors * reference).sum(1) / (
                np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
            )
            report["ways"][way] = {
                "seconds": round(seconds, 2),
                "rows_per_s": round(len(texts) / seconds, 2),
                "min_cosine_vs_st_fp32": round(float(cosine.min()), 6),
            }
            print(f"{way:40s} {len(texts) / seconds:8.2f} rows/s  min cosine {cosine.min():.6f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
