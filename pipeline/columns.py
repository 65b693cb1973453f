"""Column names shared by the stages, in one place.

Columns starting with ``__`` are internal: they travel between stages and are dropped before the write.
"""

ERROR = "_error"
ROW_KEY = "_row_key"  # "<file>#<row>": unique and stable, the key for exactly-once bookkeeping
DERIVED_ID = "id"  # where the derived id goes when ``input.id_column`` is null
PARTITION_ORIGINAL = "_partition_original"

INTERNAL_PREFIX = "__"


def token_ids(group: str) -> str:
    """Windows of token ids of one tokenizer group: list<list<int32>>."""
    return f"__tok_{group}_ids"


def token_offsets(group: str) -> str:
    """Character offsets per token, flattened (start, end) pairs: list<list<int32>>."""
    return f"__tok_{group}_offsets"


def special_mask(group: str) -> str:
    """Per token 1 where it is not part of the text (special tokens; a QA window's question)."""
    return f"__tok_{group}_special"


def token_types(group: str) -> str:
    """Token type ids of pair inputs (question/context, text/hypothesis): list<list<int8>>."""
    return f"__tok_{group}_types"


def word_ids(group: str) -> str:
    """Per token the index of its word in the text, -1 for none: list<list<int32>>."""
    return f"__tok_{group}_words"


def logits(task: str) -> str:
    """Per window, the flattened logits (tokens x labels for NER): list<list<float32>>."""
    return f"__logits_{task}"


def label(task: str) -> str:
    return f"{task}_label"


def score(task: str) -> str:
    return f"{task}_score"


def top(task: str) -> str:
    return f"{task}_top"
