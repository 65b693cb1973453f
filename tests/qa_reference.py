"""The QA oracle: transformers' own ``question-answering`` pipeline, which transformers removed after 5.2.

Run by ``tests/test_kinds.py`` in a subprocess whose PYTHONPATH starts with an isolated
``transformers==5.2.0`` install: ``python qa_reference.py IN.json OUT.json``. IN holds the model folder
and jobs, each (question, context) pairs with the pipeline's keyword arguments; OUT gets the
transformers version and, per job and pair, the list of answers (``top_k=1`` answers come back as one
dict, so they are wrapped).
"""

import json
import sys

import transformers
from transformers import pipeline

with open(sys.argv[1], encoding="utf-8") as fh:
    args = json.load(fh)
qa = pipeline("question-answering", model=args["model"], device="cpu")
answers = []
for job in args["jobs"]:
    answers.append([])
    for question, context in job["pairs"]:
        result = qa(question=question, context=context, **job["params"])
        answers[-1].append(result if isinstance(result, list) else [result])
with open(sys.argv[2], "w", encoding="utf-8") as fh:
    json.dump({"version": transformers.__version__, "answers": answers}, fh)
