"""The documented option × backend table (docs/attention.md) says what the backend registry says."""

from pathlib import Path

from attention_simulator.attention.backends import BACKENDS

ROWS = {  # table row prefix -> the capability it documents
    "`causal`": "causal",
    "`window: N`": "window",
    "`position: alibi`": "alibi",
    "`sigmoid_bias: auto": "sigmoid_bias",
    "`bias_n: per_row`": "per_row_bias",
    "`learnable_bias": "sigmoid_bias",
    "`length_norm": "length_norm",
    "`attn_drop > 0`": "dropout",
}


def test_table_matches_the_registry():
    page = (Path(__file__).parents[2] / "docs" / "attention.md").read_text()
    lines = page.split("# Attention options")[1].split("\n| ")
    header = [c.strip() for c in lines[1].split("|")[1:-1]]
    for prefix, option in ROWS.items():
        row = next(line for line in lines if line.startswith(prefix))
        cells = dict(zip(header, (c.strip() for c in row.split(" | ")[1:])))
        for backend, info in BACKENDS.items():
            documented = not cells[backend].rstrip(" |").startswith("error")
            assert documented == (option in info.supports), f"docs/attention.md row {prefix!r}, column {backend!r}"
