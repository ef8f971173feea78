"""KV-cache generation: greedy and beam search equal transformers ``generate``; sampling, stop strings,
inputs_embeds prompts, scanned models and the length guard."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pargo_jax.convert.hf import load_llm
from pargo_jax.generate import generate, process_logits
from tests.torch_refs.tiny_llm import FAMILIES, checkpoint

N = 16
PAD = 127
# Left-padded batch: row 0 has 9 real tokens, row 1 has 5.
IDS = np.random.RandomState(1).randint(3, 128, (2, 9))
MASK = np.ones_like(IDS)
IDS[1, :4], MASK[1, :4] = 0, 0


@functools.cache
def _load(family, scan_layers=False):
    return load_llm(checkpoint(family)[1], scan_layers=scan_layers)


def _hf_generate(family, eos, pad=0, **kw):
    """HF (tokens after the prompt padded with 0 to N, sequence scores or None)."""
    import torch

    model = checkpoint(family)[0]
    with torch.no_grad():
        out = model.generate(
            torch.tensor(IDS), attention_mask=torch.tensor(MASK), max_new_tokens=N, do_sample=False,
            eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True, output_scores=True, **kw,
        )  # fmt: skip
    tokens = out.sequences.numpy()[:, IDS.shape[1] :]
    scores = getattr(out, "sequences_scores", None)
    return np.pad(
        tokens, ((0, 0), (0, N - tokens.shape[1])), constant_values=pad
    ), None if scores is None else scores.numpy()


def _eos_hit_mid_sequence(family):
    """An EOS id that greedy decoding emits in row 0 at step 5 (so EOS handling is exercised)."""
    module, variables = _load(family)
    free = generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N)
    return int(free.tokens[0, 5])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family):
    module, variables = _load(family)
    eos = [2, _eos_hit_mid_sequence(family)] if family == "llama" else 2
    out = generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N, eos_token_id=eos)
    ref, _ = _hf_generate(family, eos)
    np.testing.assert_array_equal(out.tokens, ref)
    if family == "llama":  # row 0 stopped at the EOS, then padded
        assert out.lengths[0] <= 6 and (out.tokens[0, out.lengths[0] :] == 0).all()


@pytest.mark.parametrize(
    "early_stopping,length_penalty", [(False, 1.0), (True, 2.0), ("never", 0.5)]
)  # fmt: skip
def test_beam_search_matches_transformers(early_stopping, length_penalty):
    # HF beam search fills finished hypotheses with `pad_token_id or eos[0]`, so pad 0 would read as
    # "no pad"; a non-zero pad keeps the comparison about the search itself.
    module, variables = _load("llama")
    eos = [2, _eos_hit_mid_sequence("llama")]
    out = generate(
        module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N, method="beam", num_beams=4,
        eos_token_id=eos, length_penalty=length_penalty, early_stopping=early_stopping, pad_token_id=PAD,
    )  # fmt: skip
    ref, scores = _hf_generate(
        "llama", eos, PAD, num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping
    )
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_allclose(out.scores, scores, atol=1e-4)


def test_beam_of_one_is_greedy():
    module, variables = _load("qwen2")
    greedy = generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=8)
    beam = generate(
        module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=8, method="beam", num_beams=1,
        length_penalty=0.0,
    )  # fmt: skip
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.scores, atol=1e-4)


def test_sampling_seeded_and_degenerate_cases():
    module, variables = _load("smollm2")
    kw = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=8)
    greedy = generate(module, variables, **kw).tokens
    sample = lambda **s: generate(module, variables, method="sample", **kw, **s).tokens
    a, b, c = sample(seed=0), sample(seed=0), sample(seed=1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(sample(seed=3, top_k=1), greedy)
    np.testing.assert_array_equal(sample(seed=4, top_p=1e-6), greedy)
    np.testing.assert_array_equal(sample(seed=5, temperature=1e-4), greedy)


def test_process_logits_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda **kw: np.isfinite(np.asarray(process_logits(logits, 1.0, **kw)))[0].tolist()
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False, False]
    assert kept(top_k=0, top_p=0.8) == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 <= 0.85
    assert kept(top_k=0, top_p=0.5) == [True, False, False, False, False]
    np.testing.assert_allclose(process_logits(logits, 2.0, 0, 1.0), logits / 2.0, rtol=1e-6)


def test_inputs_embeds_prompt_and_scanned_model_match():
    module, variables = _load("llama3")
    ref = generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N).tokens
    embeds = module.apply(variables, jnp.asarray(IDS), method=module.embed)
    out = generate(module, variables, inputs_embeds=embeds, attention_mask=MASK, max_new_tokens=N).tokens
    np.testing.assert_array_equal(out, ref)
    scanned, svars = _load("llama3", scan_layers=True)
    out = generate(scanned, svars, input_ids=IDS, attention_mask=MASK, max_new_tokens=N).tokens
    np.testing.assert_array_equal(out, ref)


def test_stop_strings_cut_after_match():
    module, variables = _load("llama")
    full = generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N)
    detok = lambda ids: "".join(f"<{i}>" for i in ids)
    stop = f"<{full.tokens[1, 3]}>"
    first = [int(np.flatnonzero(row == full.tokens[1, 3])[0]) + 1 if (row == full.tokens[1, 3]).any() else N
             for row in full.tokens]  # fmt: skip
    out = generate(
        module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N, stop_strings=[stop],
        detokenize=detok,
    )  # fmt: skip
    np.testing.assert_array_equal(out.lengths, first)
    for row, n in enumerate(first):
        np.testing.assert_array_equal(out.tokens[row, :n], full.tokens[row, :n])
        assert (out.tokens[row, n:] == 0).all()


def test_checking_the_end_every_k_tokens_decodes_the_same():
    """``check_every`` > 1 (fewer loop checks, for GPUs) gives the same tokens, lengths and scores, when
    both rows end early (the loop stops inside a block) and at the full cache length (steps past it)."""
    module, variables = _load("llama")  # max_position_embeddings = 64
    free = generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=N).tokens
    eos = [int(free[0, 5]), int(free[1, 3])]  # each row ends early
    early = dict(max_new_tokens=N, eos_token_id=eos)
    cases = [early, dict(early, method="sample"), dict(max_new_tokens=64 - IDS.shape[1])]
    for kw in cases:
        ref = generate(module, variables, input_ids=IDS, attention_mask=MASK, **kw)
        for every in (3, N):
            out = generate(module, variables, input_ids=IDS, attention_mask=MASK, check_every=every, **kw)
            np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"{kw} every {every}")
            np.testing.assert_array_equal(out.lengths, ref.lengths)
            np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-6)
    assert ref.lengths.min() == 64 - IDS.shape[1]
    assert generate(module, variables, input_ids=IDS, attention_mask=MASK, **early).lengths.max() <= 6


def test_length_guard_and_argument_errors():
    module, variables = _load("llama")  # max_position_embeddings = 64
    with pytest.raises(ValueError, match=r"Prompt length 9 \+ max_new_tokens 56 .*64"):
        generate(module, variables, input_ids=IDS, attention_mask=MASK, max_new_tokens=56)
    with pytest.raises(ValueError, match="detokenize"):
        generate(module, variables, input_ids=IDS, max_new_tokens=2, stop_strings=["x"])
    with pytest.raises(ValueError, match="method"):
        generate(module, variables, input_ids=IDS, max_new_tokens=2, method="contrastive")
    for every, method in ((0, "greedy"), (2, "beam")):
        with pytest.raises(ValueError, match=f"check_every={every}; use >= 1"):
            generate(module, variables, input_ids=IDS, max_new_tokens=2, method=method, check_every=every)
    assert jax.device_count() == 8  # conftest's fake devices do not disturb single-device decoding
