"""KV-cache generation for :class:`pargo_jax.models.llm.CausalLM`: greedy, sampling, beam search.

The prompt (token ids or spliced ``inputs_embeds``, left-padded, ``attention_mask`` 1 = real) is
prefilled in one call, then a ``jax.lax.while_loop`` runs one decode step per token, all inside one
``jax.jit`` (compiled once per shape and setting). After an EOS a row emits ``pad_token_id``; the loop
exits early once every row (or every beam) is finished. Greedy and sampled decoding can check that
every ``check_every`` tokens instead: on a GPU each check makes the host wait for the device (XLA
reads a data-dependent loop condition back every iteration, while an inner loop of a fixed count runs
without), at the cost of up to ``check_every - 1`` steps decoded after the last row ended (discarded).
Stop strings are applied on the host afterwards (given ``detokenize``): the output is cut right after
the first stop string.

Beam search follows Hugging Face ``generate(num_beams=K, do_sample=False)`` step for step (vectorized
beam search: 2K candidates, finished hypotheses scored ``sum_logprob / generated_len**length_penalty``,
``early_stopping`` True / False / "never"), so results match transformers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pargo_jax.models.llm import CausalLM
from pargo_jax.sharding import to_host

NEG = -1.0e9


class GenerateOutput(NamedTuple):
    """``tokens`` (B, max_new_tokens), pad after the end; ``lengths`` (B,) generated tokens (EOS and
    stop string included); ``scores`` (B,): sum of token log-probs (greedy / sample) or the beam's
    length-normalized score."""

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray


def generate(
    module: CausalLM,
    variables: Any,
    *,
    input_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int,
    method: str = "greedy",
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | jax.Array = 0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    check_every: int = 1,
    stop_strings: Sequence[str] = (),
    detokenize: Callable[[Sequence[int]], str] | None = None,
) -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens per prompt with ``method`` "greedy" | "sample" | "beam".

    ``seed`` (int or PRNG key) drives sampling. ``check_every`` (greedy / sample): tokens decoded
    between checks that every row has ended (the same output for any value). Raises ``ValueError``
    if prompt length + ``max_new_tokens`` exceeds the model's ``max_position_embeddings``."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if method not in ("greedy", "sample", "beam"):
        raise ValueError(f"method={method!r}; use 'greedy', 'sample' or 'beam'.")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r}; use True, False or 'never'.")
    if check_every < 1 or (check_every > 1 and method == "beam"):
        raise ValueError(f"check_every={check_every}; use >= 1 (and 1 with beam search).")
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function (token ids -> text).")
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, t = prompt.shape[:2]
    limit = module.config.max_position_embeddings
    if max_new_tokens < 1 or t + max_new_tokens > limit:
        raise ValueError(
            f"Prompt length {t} + max_new_tokens {max_new_tokens} must be in [1 + {t}, {limit}] "
            f"(max_position_embeddings); shorten the prompt or max_new_tokens."
        )
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [-1])
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    knobs = dict(
        eos=jnp.asarray(eos, jnp.int32),
        pad=jnp.int32(pad_token_id),
        temperature=jnp.float32(temperature),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
        length_penalty=jnp.float32(length_penalty),
        early_stopping=jnp.int32({False: 0, True: 1, "never": 2}[early_stopping]),
    )
    beams = int(num_beams) if method == "beam" else 1
    tokens, lengths, scores = _generate_jit(
        variables, input_ids, inputs_embeds, attention_mask, key, knobs, module=module,
        max_new_tokens=int(max_new_tokens), method=method, num_beams=beams, check_every=int(check_every),
    )  # fmt: skip
    tokens, lengths, scores = to_host(tokens), to_host(lengths), to_host(scores)
    if stop_strings:
        tokens, lengths = apply_stop_strings(tokens, lengths, stop_strings, detokenize, pad_token_id)
    return GenerateOutput(tokens, lengths, scores)


def apply_stop_strings(
    tokens: np.ndarray,
    lengths: np.ndarray,
    stop_strings: Sequence[str],
    detokenize: Callable[[Sequence[int]], str],
    pad_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts each row right after the shortest prefix whose text contains a stop string."""
    tokens, lengths = tokens.copy(), lengths.copy()
    for row in range(tokens.shape[0]):
        for n in range(1, int(lengths[row]) + 1):
            text = detokenize(tokens[row, :n].tolist())
            if any(s in text for s in stop_strings):
                tokens[row, n:] = pad_token_id
                lengths[row] = n
                break
    return tokens, lengths


def stream(
    module: CausalLM,
    variables: Any,
    *,
    input_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int,
    method: str = "greedy",
    eos_token_id: int | Sequence[int] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[int]:
    """Yields the tokens of ONE prompt as they are decoded (EOS included), for interactive use: a host
    loop over a jitted step, so each token can be shown at once. Greedy and sampling give the same
    tokens as :func:`generate` with the same settings; use :func:`generate` for batches and beams."""
    if method not in ("greedy", "sample"):
        raise ValueError(f"stream() decodes with 'greedy' or 'sample', not {method!r}; use generate().")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt is None or prompt.shape[0] != 1:
        raise ValueError("stream() decodes one prompt: pass input_ids or inputs_embeds of batch size 1.")
    t = prompt.shape[1]
    if max_new_tokens < 1 or t + max_new_tokens > module.config.max_position_embeddings:
        raise ValueError(
            f"Prompt length {t} + max_new_tokens {max_new_tokens} exceeds max_position_embeddings="
            f"{module.config.max_position_embeddings}; shorten the prompt or max_new_tokens."
        )
    mask = jnp.ones((1, t), jnp.int32) if attention_mask is None else attention_mask
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    key = jax.random.key(seed)
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    length = t + max_new_tokens
    logits, cache = _prefill(variables, input_ids, inputs_embeds, mask, module=module, length=length)
    for i in range(max_new_tokens):
        tok = _choose_jit(logits, key, jnp.int32(i), *knobs, method=method)
        token = int(tok[0])
        yield token
        if token in eos or i == max_new_tokens - 1:
            return
        logits, cache = _step(variables, tok, cache, module=module)


@functools.partial(jax.jit, static_argnames=("module", "length"))
def _prefill(variables, input_ids, inputs_embeds, attention_mask, *, module, length):
    cache = module.init_cache(attention_mask.shape[0], length)
    logits, cache = module.apply(
        variables, input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
        last_logits_only=True,
    )  # fmt: skip
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("module",), donate_argnames=("cache",))
def _step(variables, tok, cache, *, module):
    logits, cache = module.apply(variables, tok[:, None], cache=cache)
    return logits[:, 0], cache


# --- logits processing -----------------------------------------------------------------------------
def process_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Temperature, then top-k (0 = off), then top-p (nucleus) filtering as HF's warpers: filtered
    logits become -inf. All three may be traced values (one compilation serves every setting)."""
    logits = logits.astype(jnp.float32) / temperature
    v = logits.shape[-1]
    srt = -jnp.sort(-logits, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    srt = jnp.where(jnp.arange(v) < k, srt, -jnp.inf)
    # HF removes the ascending-sorted tokens whose cumulative probability is <= 1 - top_p, i.e. the
    # tokens whose mass *before* them in descending order is >= top_p; the top token always stays.
    before = jnp.cumsum(jax.nn.softmax(srt, -1), -1) - jax.nn.softmax(srt, -1)
    keep = jnp.maximum(jnp.sum((before < top_p) & jnp.isfinite(srt), -1, keepdims=True), 1)
    threshold = jnp.take_along_axis(srt, keep - 1, -1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


# --- the jitted core -------------------------------------------------------------------------------
@functools.partial(
    jax.jit,
    static_argnames=("module", "max_new_tokens", "method", "num_beams", "check_every"),
)
def _generate_jit(
    variables, input_ids, inputs_embeds, attention_mask, key, knobs, *, module, max_new_tokens, **kw
):
    """``knobs``: dict of traced settings (eos ids array, pad, temperature, top_k, top_p,
    length_penalty, early_stopping code 0/1/2 = False/True/"never")."""
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, t = prompt.shape[:2]
    cache = module.init_cache(b, t + max_new_tokens)
    logits, cache = module.apply(
        variables,
        input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        last_logits_only=True,
    )
    step = lambda tok, cache: module.apply(variables, tok[:, None], cache=cache)
    if kw["method"] == "beam":
        return _beam_search(step, logits[:, 0], cache, max_new_tokens, kw["num_beams"], **knobs)
    every = kw["check_every"]
    return _sample_loop(step, logits[:, 0], cache, key, max_new_tokens, kw["method"], every, **knobs)


def _choose(logits, key, i, temperature, top_k, top_p, *, method: str) -> jax.Array:
    """Token ``i`` of each row: argmax (greedy) or a sample of the processed logits."""
    if method == "greedy":
        return jnp.argmax(logits, -1).astype(jnp.int32)
    key = jax.random.fold_in(key, i)
    return jax.random.categorical(key, process_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


_choose_jit = jax.jit(_choose, static_argnames=("method",))


def _sample_loop(step, logits, cache, key, n, method, every, *, eos, pad, temperature, top_k, top_p, **_):
    """Greedy (argmax) or sampled decoding; one row stops at its first EOS. The loop checks for the end
    every ``every`` tokens; steps past ``n`` change nothing (their cache writes land past the cache's
    end, clamped, after the last token that reads it)."""
    b = logits.shape[0]

    def pick(i, logits, done, tokens, lengths, scores):
        done = done | (i >= n)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tok = jnp.where(done, pad, _choose(logits, key, i, temperature, top_k, top_p, method=method))
        scores = scores + jnp.where(done, 0.0, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0])
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.isin(tok, eos)
        return tok, done, tokens.at[:, i].set(tok, mode="drop"), lengths, scores

    zeros = jnp.zeros((b,), jnp.int32)
    state = pick(0, logits, jnp.zeros((b,), bool), jnp.full((b, n), pad, jnp.int32), zeros, jnp.zeros((b,)))

    def cond(carry):
        i, (_, done, *_), _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, (tok, done, tokens, lengths, scores), cache = carry
        logits, cache = step(tok, cache)
        return i + 1, pick(i, logits[:, 0], done, tokens, lengths, scores), cache

    if every > 1:  # a fixed-count inner loop: its iterations need no check
        body = functools.partial(jax.lax.fori_loop, 0, every, lambda _, carry, body=body: body(carry))
    _, (_, _, tokens, lengths, scores), _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache))
    return tokens, lengths, scores


class _Beams(NamedTuple):
    running_seq: jax.Array  # (B, K, N) tokens of the live beams
    running_scores: jax.Array  # (B, K) summed log-probs
    seq: jax.Array  # (B, K) finished hypotheses, sorted by score
    scores: jax.Array
    lengths: jax.Array
    finished: jax.Array  # (B, K) slot holds a finished hypothesis
    improvable: jax.Array  # (B,) HF "is_early_stop_heuristic_unsatisfied"
    all_hit: jax.Array  # () every candidate of the last step hit a stopping criterion


def _beam_search(step, logits, cache, n, num_beams, *, eos, pad, length_penalty, early_stopping, **_):
    """HF vectorized beam search (see module docstring); returns the best hypothesis per row.
    ``early_stopping``: traced code 0 = False, 1 = True, 2 = "never"."""
    k = num_beams
    b, v = logits.shape
    keep = max(2, 1 + eos.shape[0]) * k
    top_mask = jnp.arange(keep) < k
    stop_when_full = early_stopping == 1
    gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

    def select(i, logits, st: _Beams):
        """One step from (B*K, V) logits: returns new state and the parent beam of each live beam."""
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, k, v)
        acc = (logp + st.running_scores[:, :, None]).reshape(b, k * v)
        top_lp, top_idx = jax.lax.top_k(acc, keep)
        parent, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        top_seq = gather(st.running_seq, parent).at[:, :, i].set(tok)
        hit = jnp.isin(tok, eos) | (i == n - 1)
        # live beams: best k candidates that did not stop
        run_lp, nxt = jax.lax.top_k(top_lp + hit * NEG, k)
        running_seq, running_parent = gather(top_seq, nxt), gather(parent, nxt)
        # finished: merge newly stopped top-k candidates into the sorted finished set
        cand = top_lp / ((i + 1.0) ** length_penalty)
        full = jnp.all(st.finished, -1, keepdims=True) & stop_when_full
        cand = cand + full * NEG + (~st.improvable[:, None]) * NEG
        just = hit & top_mask[None]
        cand = cand + (~just) * NEG
        m_scores = jnp.concatenate([st.scores, cand], 1)
        scores, idx = jax.lax.top_k(m_scores, k)
        seq = gather(jnp.concatenate([st.seq, top_seq], 1), idx)
        lengths = gather(jnp.concatenate([st.lengths, jnp.full((b, keep), i + 1, jnp.int32)], 1), idx)
        finished = gather(jnp.concatenate([st.finished, just], 1), idx)
        # HF _check_early_stop_heuristic, at cur_len + 1
        best_len = jnp.where((early_stopping == 2) & (length_penalty > 0.0), n, i + 1).astype(jnp.float32)
        best_running = run_lp[:, :1] / (best_len**length_penalty)
        worst = jnp.where(finished, jnp.min(scores, 1, keepdims=True), NEG)
        improvable = st.improvable & jnp.any(best_running > worst, -1)
        new = _Beams(running_seq, run_lp, seq, scores, lengths, finished, improvable, jnp.all(hit))
        return new, running_parent

    def reorder(cache, parent):
        flat = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        return cache._replace(k=cache.k[:, flat], v=cache.v[:, flat], mask=cache.mask[flat])

    tile = lambda x, axis: jnp.repeat(x, k, axis=axis)
    cache = cache._replace(k=tile(cache.k, 1), v=tile(cache.v, 1), mask=tile(cache.mask, 0))
    init = _Beams(
        running_seq=jnp.full((b, k, n), pad, jnp.int32),
        running_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG), (b, 1)),
        seq=jnp.full((b, k, n), pad, jnp.int32),
        scores=jnp.full((b, k), NEG),
        lengths=jnp.zeros((b, k), jnp.int32),
        finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        all_hit=jnp.zeros((), bool),
    )
    st, parent = select(0, tile(logits, 0), init)
    cache = reorder(cache, parent)

    def cond(carry):
        i, st, _ = carry
        open_beam = ~(jnp.all(st.finished) & stop_when_full)
        return (i < n) & jnp.any(st.improvable) & open_beam & ~st.all_hit

    def body(carry):
        i, st, cache = carry
        tok = st.running_seq[:, :, i - 1].reshape(-1)
        logits, cache = step(tok, cache)
        st, parent = select(i, logits[:, 0], st)
        return i + 1, st, reorder(cache, parent)

    _, st, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), st, cache))
    return st.seq[:, 0], st.lengths[:, 0], st.scores[:, 0]
