"""Masked modelling: BERT masking, packed documents attended separately, the task's loss, and the
stability study's pieces (the max-logit probe, gradient norms without clipping)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from attention_simulator.attention import AttentionConfig
from attention_simulator.attention.masks import Documents, document_index
from attention_simulator.data.masking import IGNORE, BertMasking, MaskedBlocks, document_ids
from attention_simulator.diagnostics import Diagnostics, DiagnosticsConfig
from attention_simulator.models.lm import DecoderLM
from attention_simulator.tasks.masked_modeling import MaskedModelingTask

from ..helpers import compose_config, train

EOS = 9


def documents_by_loops(tokens, lengths):
    """[(row, [positions])] of each document piece, written out position by position."""
    pieces = []
    for r in range(tokens.shape[0]):
        current = []
        for t in range(int(lengths[r])):
            current.append(t)
            if tokens[r, t] == EOS:
                pieces.append((r, current))
                current = []
        if current:
            pieces.append((r, current))
    return pieces


def block_batch(generator):
    tokens = torch.randint(0, EOS, (3, 12), generator=generator)
    tokens[0, [2, 7]] = EOS  # three documents in the first block, one ending at its last position
    tokens[0, 11] = EOS
    tokens[2, 5] = EOS
    lengths = torch.tensor([12, 12, 8])  # the last block is padded
    return tokens, lengths


def test_document_index_lists_every_piece():
    tokens, lengths = block_batch(torch.Generator().manual_seed(0))
    real = torch.arange(12)[None] < lengths[:, None]
    index, doc_lengths = document_index(document_ids(tokens, real, EOS))
    expected = documents_by_loops(tokens, lengths)
    assert len(expected) == len(doc_lengths) == index.shape[0]
    for (row, positions), idx, n in zip(expected, index, doc_lengths):
        assert n == len(positions)
        assert idx[:n].tolist() == [row * 12 + t for t in positions]
        assert (idx[n:] == 3 * 12).all()  # the spare row
    x = torch.randn(3, 12, 5)
    documents = Documents.of(index, doc_lengths)
    back = documents.ungroup(documents.group(x), 3, 12)
    assert torch.equal(back, torch.where(real[..., None], x, 0))


MODELS = [
    ("softmax", "rope", False),
    ("sigmoid", "rope", False),
    ("flash_softmax", "rope", False),
    ("flash_sigmoid", "rope", False),
    ("sigmoid", "alibi", False),
    ("softmax", "alibi", True),
    ("flash_sigmoid", "rope", True),
]


@pytest.mark.parametrize("backend, position, causal", MODELS)
def test_each_document_attends_only_to_itself(backend, position, causal):
    """Every piece's logits equal the same tokens run alone (so RoPE restarts and b = −log n
    uses its own length), and perturbing one document changes no other's."""
    torch.manual_seed(0)
    sigmoid = "sigmoid" in backend
    config = AttentionConfig(backend=backend, position=position, sigmoid_bias="auto" if sigmoid else None)
    model = DecoderLM(vocab_size=11, dim=32, depth=2, num_heads=2, attention=config, causal=causal).eval()
    tokens, lengths = block_batch(torch.Generator().manual_seed(1))
    real = torch.arange(12)[None] < lengths[:, None]
    documents = Documents.of(*document_index(document_ids(tokens, real, EOS)))
    with torch.no_grad():
        logits = model(tokens, lengths=lengths, documents=documents)  # (3, 12, 11)
        for row, positions in documents_by_loops(tokens, lengths):
            alone = model(tokens[row, positions][None])[0]
            torch.testing.assert_close(logits[row, positions], alone, atol=2e-5, rtol=1e-4)
        changed = tokens.clone()
        changed[0, 3:7] = (changed[0, 3:7] + 1) % EOS  # inside the first block's second document
        other = model(changed, lengths=lengths, documents=documents)
    same = torch.ones(3, 12, dtype=torch.bool)
    same[0, 3:8] = False
    torch.testing.assert_close(other[same & real], logits[same & real], atol=1e-6, rtol=0)
    assert not torch.allclose(other[0, 3:8], logits[0, 3:8])


def test_masked_blocks_pad_the_last_block():
    stream = np.arange(1, 30, dtype=np.uint16)  # 29 tokens in blocks of 8: 3 full, 5 left
    blocks = MaskedBlocks(stream, 8, pad_id=EOS)
    assert len(blocks) == 4
    rows, lengths = blocks[[3, 0]]
    assert lengths.tolist() == [5, 8]
    assert rows[0].tolist() == [25, 26, 27, 28, 29, EOS, EOS, EOS] and rows[1].tolist() == list(range(1, 9))


def test_bert_masking_predicts_the_configured_fraction():
    masking = BertMasking(0.15, vocab_size=10, eos_id=EOS, mask_id=10, documents=False)
    tokens = torch.randint(0, EOS, (64, 40), generator=torch.Generator().manual_seed(0))
    tokens[:, ::13] = EOS
    lengths = torch.full((64,), 40)
    lengths[-1] = 20
    batch = masking((tokens, lengths), [torch.Generator().manual_seed(i) for i in range(64)])
    how = {"mask": 0, "random": 0, "kept": 0}
    for r in range(64):
        candidates = [t for t in range(int(lengths[r])) if tokens[r, t] != EOS]
        predicted = [t for t in range(40) if batch["targets"][r, t] != IGNORE]
        assert len(predicted) == max(1, round(0.15 * len(candidates)))
        assert set(predicted) <= set(candidates)  # never an end of document, never padding
        for t in range(40):
            if t in predicted:
                assert batch["targets"][r, t] == tokens[r, t]
                token = int(batch["inputs"][r, t])
                how["mask" if token == 10 else "kept" if token == tokens[r, t] else "random"] += 1
                assert token != EOS
            else:
                assert batch["inputs"][r, t] == tokens[r, t]
    total = sum(how.values())
    assert 0.7 < how["mask"] / total < 0.9 and 0.03 < how["random"] / total < 0.17
    again = masking((tokens, lengths), [torch.Generator().manual_seed(i) for i in range(64)])
    assert torch.equal(again["inputs"], batch["inputs"])  # a block's masks are a function of its key


def test_loss_is_the_mean_over_predicted_tokens():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=11, dim=16, depth=1, num_heads=2, causal=False)
    tokens, lengths = block_batch(torch.Generator().manual_seed(2))
    masking = BertMasking(0.3, vocab_size=10, eos_id=EOS, mask_id=10, documents=True)
    batch = masking((tokens, lengths), [torch.Generator().manual_seed(i) for i in range(3)])
    loss, metrics = MaskedModelingTask().training_step(model, batch)
    with torch.no_grad():
        documents = Documents.of(batch["doc_index"], batch["doc_lengths"])
        logits = model(batch["inputs"], lengths=lengths, documents=documents).double()
    terms, hits, per_row = [], 0, [[] for _ in range(3)]
    for r in range(3):
        for t in range(12):
            target = int(batch["targets"][r, t])
            if target != IGNORE:
                row = logits[r, t]
                terms.append(math.log(sum(math.exp(v) for v in row.tolist())) - row[target].item())
                per_row[r].append(terms[-1])
                hits += int(row.argmax()) == target
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert metrics["accuracy"].item() == pytest.approx(hits / len(terms))
    sums = MaskedModelingTask().eval_step(model, batch)
    assert sums["loss"][1].tolist() == [len(row) for row in per_row]  # per sequence
    assert sums["loss"][0].tolist() == pytest.approx([sum(row) for row in per_row], rel=1e-5)
    assert sums["accuracy"][0].sum().item() == hits


@pytest.mark.parametrize("backend", ["softmax", "flash_sigmoid"])
def test_max_logit_probe_against_loops(backend):
    torch.manual_seed(0)
    sigmoid = backend == "flash_sigmoid"
    config = AttentionConfig(backend=backend, position="none", sigmoid_bias=-2.0 if sigmoid else None)
    model = DecoderLM(vocab_size=11, dim=16, depth=1, num_heads=2, attention=config)
    recorder = Diagnostics(DiagnosticsConfig(every_n_steps=1, probes=["attn"]), model)
    tokens, lengths = torch.randint(0, 11, (2, 7)), torch.tensor([7, 4])
    captured = {}
    attn = model.blocks[0].attn
    attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    with recorder.recording():
        model(tokens, lengths=lengths)
    recorded = recorder.pop()["attn/block_00/logit_max"]
    q, k, _ = attn.project(captured["x"], None)
    best = -math.inf
    for b in range(2):
        n = int(lengths[b])
        for h in range(2):
            for i in range(n):
                for j in range(i + 1):  # causal, real keys only
                    best = max(best, (q[b, i, h] @ k[b, j, h]).item() / math.sqrt(8))
    assert recorded.item() == pytest.approx(best, rel=1e-5)


def test_gradient_norm_is_logged_without_clipping(tmp_path):
    """grad_clip=null logs the global gradient norm each logged step: the same as a clip that
    never binds reports (optorch's clip state)."""
    common = ["+experiment=mlm_sigmoid", "trainer.max_steps=3", "trainer.log_every=1", "data.batch_size=4",
              "data.eval_max_tokens=2048", "diagnostics=off"]  # fmt: skip
    train(tmp_path / "off", *common, "trainer.grad_clip=null")
    train(tmp_path / "huge", *common, "trainer.grad_clip=1e9")
    off, huge = (pd.read_parquet(tmp_path / run / "metrics.parquet") for run in ("off", "huge"))
    norms = off["train/grad_norm"].dropna()
    assert len(norms) == 3 and "train/grad_norm_clipped" not in off
    np.testing.assert_allclose(norms.to_numpy(), huge["train/grad_norm"].dropna().to_numpy(), rtol=1e-6)


def test_masked_modeling_needs_masked_data(tmp_path):
    from attention_simulator.errors import ConfigError
    from attention_simulator.train import make_trainer

    cfg = compose_config("+experiment=mlm_softmax", "data.masking=null", "logger.wandb=false")
    with pytest.raises(ConfigError, match="data.masking"):
        make_trainer(cfg, tmp_path)


def test_context_parallelism_refuses_masked_and_packed_documents():
    from attention_simulator.config import build
    from attention_simulator.errors import ConfigError
    from attention_simulator.parallel import check_context_parallel

    for experiment in ("mlm_sigmoid", "lm_sigmoid"):
        cfg = compose_config(f"+experiment={experiment}", "data.document_masks=true")
        with pytest.raises(ConfigError, match="data.document_masks"):
            check_context_parallel(2, cfg, build(cfg.attention), compile=False)


def test_first_rows_keep_their_documents():
    """What the Lipschitz diagnostic runs on: the first blocks of a batch, with the layout those
    blocks would have alone."""
    from attention_simulator.data.masking import first_rows

    tokens, lengths = block_batch(torch.Generator().manual_seed(3))
    masking = BertMasking(0.15, vocab_size=10, eos_id=EOS, mask_id=10, documents=True)
    batch = masking((tokens, lengths), [torch.Generator().manual_seed(i) for i in range(3)])
    for n in (1, 2, 5):
        alone = masking((tokens[:n], lengths[:n]), [torch.Generator().manual_seed(i) for i in range(min(n, 3))])
        rows = first_rows(batch, n)
        assert rows.keys() == alone.keys()
        for key in rows:
            assert torch.equal(rows[key], alone[key]), key
