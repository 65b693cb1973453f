"""Which operations flip the NER model's near-tie tokens in bf16: argmax labels of real tokens against fp32.

    python benchmarks/near_ties.py [--texts 600] [--max-length 128]

The benchmark's NER model (all-MiniLM-L6-v2 encoder and token head, ``benchmarks/models.py``) on texts of
the benchmark corpus, run as bertpipe's model actor runs it (bf16 autocast, the encoder's Linear weights
stored in bf16, the head in fp32), and again with one part of the encoder kept in fp32: the attention
blocks, the feed-forward blocks, or the last layer. For each, the share of tokens whose label differs
from fp32, and how many of those were near ties in fp32 (top-2 logit margin below ``--margin``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.corpus import make_texts  # noqa: E402
from benchmarks.models import build_models  # noqa: E402


def kept_fp32(module: torch.nn.Module) -> None:
    """Run ``module`` in fp32 inside a bf16 autocast region: fp32 weights, fp32 inputs, autocast off."""
    module.float()
    forward = module.forward

    def fp32_forward(*args, **kwargs):
        def up(x):
            return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

        with torch.autocast("cpu", enabled=False):
            return forward(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    module.forward = fp32_forward


def variants(model_dir: Path) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForTokenClassification

    from bertpipe.stages.infer import store_linear_weights

    def load(keep=None):
        model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
        store_linear_weights(model, torch.bfloat16, "classifier")
        for module in keep(model) if keep else ():
            kept_fp32(module)
        return model

    layers = lambda m: m.bert.encoder.layer  # noqa: E731
    return {
        "bf16 (bertpipe)": load(),
        "attention fp32": load(lambda m: [layer.attention for layer in layers(m)]),
        "feed-forward fp32": load(
            lambda m: [x for layer in layers(m) for x in (layer.intermediate, layer.output)]
        ),
        "last layer fp32": load(lambda m: [layers(m)[-1]]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "work")
    parser.add_argument(
        "--model", type=Path, help="a BERT token classifier folder (default: the benchmark's)"
    )
    parser.add_argument("--margin", type=float, default=1.0, help="fp32 top-2 logit margin of a near tie")
    args = parser.parse_args()
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model_dir = args.model or build_models(args.work / "models-s0", seed=0)["ner"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = make_texts(args.texts, seed=0)
    batches = [
        tokenizer(
            texts[i : i + args.batch],
            truncation=True,
            max_length=args.max_length,
            padding=True,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        for i in range(0, len(texts), args.batch)
    ]

    def logits(model, autocast: bool) -> list[torch.Tensor]:
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for b in batches:
                out.append(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float())
        return out

    reference = logits(AutoModelForTokenClassification.from_pretrained(model_dir).eval(), autocast=False)
    real = [(b["attention_mask"] == 1) & (b["special_tokens_mask"] == 0) for b in batches]
    tokens = int(sum(m.sum() for m in real))
    top2 = [r.topk(2, dim=-1).values for r in reference]
    near = [(t[..., 0] - t[..., 1] < args.margin) & m for t, m in zip(top2, real, strict=True)]
    ties = int(sum(n.sum() for n in near))
    print(f"{len(texts)} texts, {tokens:,} tokens, {ties:,} near ties (margin < {args.margin}) in fp32")
    for name, model in variants(model_dir).items():
        got = logits(model, autocast=True)
        flips = [(g.argmax(-1) != r.argmax(-1)) & m for g, r, m in zip(got, reference, real, strict=True)]
        n_flips = int(sum(f.sum() for f in flips))
        on_ties = int(sum((f & n).sum() for f, n in zip(flips, near, strict=True)))
        drift = max(float((g - r)[m].abs().max()) for g, r, m in zip(got, reference, real, strict=True))
        print(
            f"{name:18s} flipped {n_flips:4d} tokens ({n_flips / tokens:.3%}), {on_ties} of them near ties; "
            f"largest logit difference {drift:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
