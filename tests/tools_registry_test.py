"""@tool, prompt rendering, pickling, and BM25 search ranking."""

import pickle

import pytest

from toolr1_jax.tools import registry, search


@registry.tool
def area(width: float, height: float = 1.0) -> float:
    """Area of a rectangle."""
    return width * height


def test_tool_signature_doc_call_and_render():
    assert isinstance(area, registry.Tool) and not area.host
    assert area.signature == "area(width: float, height: float = 1.0) -> float"
    assert area(3.0, height=2.0) == 6.0
    text = registry.render_tools([area, registry.final_answer])
    assert text.startswith('def area(width: float, height: float = 1.0) -> float:\n    """Area')
    assert "def final_answer(answer: Any) -> None:" in text


def test_decorated_tool_pickles_by_name():
    assert pickle.loads(pickle.dumps(area)) is area


def _perimeter(width: float, height: float) -> float:
    """Perimeter of a rectangle."""
    return 2 * (width + height)


def test_hidden_tools_are_served_but_not_rendered():
    hidden = registry.make_tool(_perimeter, name="_perimeter", hidden=True)
    clone = pickle.loads(pickle.dumps(hidden))
    assert (clone.hidden, clone(1.0, 2.0)) == (True, 6.0)
    assert registry.render_tools([area, hidden]) == registry.render_tools([area])
    assert registry.render_signatures([area, hidden]) == area.signature


def test_bad_tools_are_rejected_with_the_reason():
    def untyped(x):
        """Doc."""

    def undocumented(x: int) -> int:
        return x

    def no_return(x: int):
        """Doc."""

    with pytest.raises(ValueError, match=r"\['x'\] have no type annotation"):
        registry.tool(untyped)
    with pytest.raises(ValueError, match="no docstring"):
        registry.tool(undocumented)
    with pytest.raises(ValueError, match="return type"):
        registry.tool(no_return)
    with pytest.raises(ValueError, match="identifier"):
        registry.make_tool(area.fn, name="not a name")
    with pytest.raises(TypeError, match="Tool"):
        registry.check_unique([area.fn])


DOCS = [
    {"doc_id": "1", "title": "Zorblat flux capacitor", "text": "Invented by Mira Quell in 1987."},
    {"doc_id": "2", "title": "Quimby river", "text": "The Quimby river flows 412 km to the sea."},
    {"doc_id": "3", "title": "Quell family", "text": "Mira Quell was born in Zorbton."},
    {"doc_id": "4", "title": "Weather", "text": "Rain is common in spring."},
]


def test_search_ranks_by_bm25_and_formats():
    tool = search.make_search_tool(DOCS)
    assert tool.signature == "search(query: str, k: int = 5) -> str"
    ranked = tool.fn.rank("Mira Quell", k=5)
    assert [DOCS[i]["doc_id"] for i, _ in ranked] == ["3", "1"]  # title+text match first
    assert ranked[0][1] > ranked[1][1] > 0
    out = tool("Quimby river length", k=1)
    assert out == "[1] Quimby river (id: 2)\nThe Quimby river flows 412 km to the sea."
    assert tool("the of what") == "No documents match 'the of what'."
    assert tool("unrelated words") == "No documents match 'unrelated words'."


def test_search_pickles_documents_not_index():
    tool = search.make_search_tool(DOCS)
    tool.fn.warm()
    clone = pickle.loads(pickle.dumps(tool))
    assert clone.fn._index is None and clone.fn.documents == tool.fn.documents
    assert clone("Zorbton", k=1).startswith("[1] Quell family")


def test_search_rejects_bad_input():
    with pytest.raises(ValueError, match="lacks keys"):
        search.make_search_tool([{"doc_id": "1", "text": "no title"}])
    with pytest.raises(ValueError, match="empty"):
        search.make_search_tool([])
    tool = search.make_search_tool(DOCS)
    with pytest.raises(ValueError, match="k must be"):
        tool("river", k=0)
