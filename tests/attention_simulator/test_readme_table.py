"""README's option × backend table says what the backend registry says."""

from pathlib import Path

from attention_simulator.attention.backends import BACKENDS

ROWS = {  # README row prefix -> the capability it documents
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
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = readme.split("## Attention options")[1].split("\n| ")
    header = [c.strip() for c in lines[1].split("|")[1:-1]]
    for prefix, option in ROWS.items():
        row = next(line for line in lines if line.startswith(prefix))
        cells = dict(zip(header, (c.strip() for c in row.split(" | ")[1:])))
        for backend, info in BACKENDS.items():
            documented = not cells[backend].rstrip(" |").startswith("error")
            assert documented == (option in info.supports), f"README row {prefix!r}, column {backend!r}"
