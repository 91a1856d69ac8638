"""`search(query, k)`: BM25 retrieval over a local document corpus, run inside the sandbox.

The index is built once in the sandbox's pre-warmed parent (`warm`) and shared copy-on-write by
every forked worker; only the documents cross the pickle boundary. rank-bm25 rather than bm25s:
bm25s imports JAX, which the sandbox must not load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from toolr1_jax.tools import registry

_TOKEN = re.compile(r"\w+", re.UNICODE)
# Function words that carry no topic; BM25's idf would only down-weight them anyway.
_STOPWORDS = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "has",
     "have", "how", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was",
     "were", "what", "when", "where", "which", "who", "whom", "why", "will", "with"]
)  # fmt: skip


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS]


class Bm25Search:
    """Callable behind the `search` tool; pickles as its documents, not its index."""

    def __init__(self, documents: Sequence[Mapping[str, str]], max_chars_per_doc: int = 2000):
        docs = []
        for i, d in enumerate(documents):
            if not isinstance(d, Mapping):
                raise TypeError(f"document {i} must be a dict, got {type(d).__name__}")
            missing = [key for key in ("doc_id", "title", "text") if key not in d]
            if missing:
                raise ValueError(f"document {i} lacks keys {missing}")
            docs.append({key: str(d[key]) for key in ("doc_id", "title", "text")})
        if not docs:
            raise ValueError("the search corpus is empty")
        self.documents = docs
        self.max_chars_per_doc = max_chars_per_doc
        self._index = None

    def __getstate__(self):
        return {"documents": self.documents, "max_chars_per_doc": self.max_chars_per_doc}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._index = None

    def warm(self) -> None:
        if self._index is None:
            import rank_bm25

            corpus = [tokenize(f"{d['title']} {d['text']}") for d in self.documents]
            # BM25+ keeps idf positive, so a term found in half of a small corpus still counts.
            self._index = rank_bm25.BM25Plus(corpus)

    def rank(self, query: str, k: int) -> list[tuple[int, float]]:
        """(document index, score) of the top-k documents with a positive score, best first."""
        self.warm()
        terms = tokenize(query)
        if not terms:
            return []
        scores = self._index.get_scores(terms)
        # BM25+ gives every document a floor score; only documents with a query term qualify.
        freqs = self._index.doc_freqs
        matching = [i for i in range(len(scores)) if any(t in freqs[i] for t in terms)]
        order = sorted(matching, key=lambda i: (-scores[i], i))[:k]
        return [(i, float(scores[i])) for i in order]

    def __call__(self, query: str, k: int = 5) -> str:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("search: query must be a non-empty string")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"search: k must be a positive integer, got {k!r}")
        hits = self.rank(query, k)
        if not hits:
            return f"No documents match {query!r}."
        blocks = []
        for rank, (i, _) in enumerate(hits, 1):
            d = self.documents[i]
            text = d["text"]
            if len(text) > self.max_chars_per_doc:
                text = text[: self.max_chars_per_doc] + " [...]"
            blocks.append(f"[{rank}] {d['title']} (id: {d['doc_id']})\n{text}")
        return "\n\n".join(blocks)


def make_search_tool(
    documents: Sequence[Mapping[str, str]], max_chars_per_doc: int = 2000
) -> registry.Tool:
    """The `search(query: str, k: int = 5) -> str` tool over `documents`, each a dict with
    "doc_id", "title" and "text"."""
    return registry.make_tool(
        Bm25Search(documents, max_chars_per_doc),
        name="search",
        doc=(
            "Search the local document collection (BM25 keyword ranking) and return the k best "
            "matching documents, each as '[rank] title (id: ...)' followed by its text. Use "
            "distinctive keywords (names, terms) rather than whole questions."
        ),
    )
