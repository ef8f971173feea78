"""Prediction: jitted, sharded functions over (model, params, batch) and a ``Predictor`` that prepares
queries the way the run was trained. Used by the ``predict`` command (:mod:`pargo_jax.predict`), the
evaluators and training.

Functions (big_vision's ``predict_fns``): :func:`decode` (greedy / sampling / beam, stop strings),
:func:`score` (log-likelihood of the loss-masked target tokens: perplexity, multiple choice) and
:func:`image_tokens`. Batches are global arrays split over the mesh's (data, fsdp) axes; on a
multi-process job every process passes its slice and gets every row back. :class:`Predictor` runs
them over lists of queries: each process prepares its share, padded rows are dropped, and the results
come back in order on every process. Preprocessing (image size, resize mode, chat template, pixel
normalization) is the run's own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.boxes import BoxCodec
from pargo_jax import sharding
from pargo_jax.generate import GenerateOutput, generate, stream
from pargo_jax.models.llm import CausalLM, unscanned
from pargo_jax.models.mllm import MLLMConfig, VisionLanguageModel

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: one compilation per bucket


class PredictError(ValueError):
    """A query the model cannot be asked (missing / undecodable image, empty prompt, ...)."""


# --- device functions ---------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _embed(model: VisionLanguageModel, params, images, input_ids, boxes=None):
    return model.apply({"params": params}, images, input_ids, True, boxes, method=model.embed_inputs)


@functools.partial(jax.jit, static_argnums=0)
def _score(model: VisionLanguageModel, params, batch):
    logits = model.apply(
        {"params": params},
        batch["image"],
        batch["input_ids"],
        batch["attention_mask"],
        boxes=batch.get("boxes"),
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    target = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    out = {
        "logprob": jnp.sum(target * mask, 1),
        "tokens": jnp.sum(mask, 1),
        "correct": jnp.sum(correct * mask, 1),
    }
    if "group_masks" in batch:  # (B, G, T): the same sums over each group's tokens, in the same pass
        groups = batch["group_masks"].astype(jnp.float32) * mask[:, None]
        out |= {
            "group_logprob": jnp.einsum("bgt,bt->bg", groups, target),
            "group_tokens": jnp.sum(groups, 2),
            "group_correct": jnp.einsum("bgt,bt->bg", groups, correct),
        }
    return out


@functools.partial(jax.jit, static_argnums=0)
def _image_tokens(model: VisionLanguageModel, params, images):
    return model.apply({"params": params}, images, method=model.encode_images)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How :func:`decode` generates (see :func:`pargo_jax.generate.generate`)."""

    max_new_tokens: int = 64
    method: str = "greedy"  # "greedy" | "sample" | "beam"
    num_beams: int = 4
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()


def decode(
    model: VisionLanguageModel,
    params,
    batch: Mapping[str, jax.Array],
    options: DecodeOptions,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    detokenize: Callable[[Sequence[int]], str] | None = None,
) -> GenerateOutput:
    """Answers of a batch: ``image`` (B, H, W, 3) or (B, I, H, W, 3) (several per row), left-padded
    ``input_ids`` / ``attention_mask`` (B, T). Returns host arrays of every row (all processes)."""
    embeds = _embed(model, params, batch["image"], batch["input_ids"], batch.get("boxes"))
    o = options
    return generate(
        CausalLM(model.config.llm), {"params": params["llm"]}, inputs_embeds=embeds,
        attention_mask=batch["attention_mask"], max_new_tokens=o.max_new_tokens, method=o.method,
        eos_token_id=list(eos_ids), pad_token_id=pad_id, temperature=o.temperature, top_k=o.top_k,
        top_p=o.top_p, seed=o.seed, num_beams=o.num_beams, length_penalty=o.length_penalty,
        stop_strings=o.stop_strings, detokenize=detokenize,
    )  # fmt: skip


def score(model: VisionLanguageModel, params, batch: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """Per row of a training-format batch (``image`` (B, [I,] H, W, 3), ``input_ids``,
    ``attention_mask``, ``targets``, ``loss_mask``): summed log-likelihood of the masked targets, their
    number, and how many are the argmax. With ``group_masks`` (B, G, T) also ``group_logprob`` /
    ``group_tokens`` / ``group_correct`` (B, G): the same sums over the masked targets each group
    selects. Host arrays of every row."""
    return {k: sharding.to_host(v) for k, v in _score(model, params, batch).items()}


def image_tokens(model: VisionLanguageModel, params, images: jax.Array) -> np.ndarray:
    """The projector's tokens (B, T_img, D_llm) of ``images``, as the LLM receives them."""
    return sharding.to_host(_image_tokens(model, params, images))


# --- queries -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Query:
    """One question: ``messages`` ({"role", "content"} dicts) end with a user turn and hold one
    ``<image>`` placeholder per image (the k-th stands for the k-th image); ``image`` is the encoded
    image file, or a tuple of them for several images (a list becomes a tuple); ``boxes`` (K, 4) pixel
    boxes (x1, y1, x2, y2) of the (one) image for MG-LLaVA's object tokens, or a detections entry
    ``{"boxes", "scores", "labels"}`` (scores and labels drive its per-class NMS); None: none."""

    id: str
    image: bytes | tuple[bytes, ...]
    messages: tuple[Mapping[str, str], ...]
    boxes: Any = None

    def __post_init__(self):
        if isinstance(self.image, list):
            object.__setattr__(self, "image", tuple(self.image))

    @property
    def images(self) -> tuple[bytes, ...]:
        """Every image of the query, in placeholder order."""
        return self.image if isinstance(self.image, tuple) else (self.image,)


def read_image(path: str) -> bytes:
    from etils import epath

    p = epath.Path(path)
    if not p.exists():
        raise PredictError(f"image file {path!r} not found")
    return p.read_bytes()


def question(qid: str, image: bytes | Sequence[bytes], prompt: str, boxes=None) -> Query:
    """A one-turn query: one ``<image>`` line per image, then ``prompt`` (which may place the
    placeholders itself instead: one per image)."""
    if not prompt or not prompt.strip():
        raise PredictError(f"{qid}: the prompt is empty; ask a question")
    return _with_placeholders(Query(qid, image, ({"role": "user", "content": prompt.strip()},), boxes))


def conversation(
    qid: str, image: bytes | Sequence[bytes], turns: Sequence[Mapping[str, str]], boxes=None
) -> Query:
    """A query from a conversation (``role``/``content`` or LLaVA's ``from``/``value`` turns) ending
    with a user turn; without ``<image>`` placeholders, one line of ``<image>`` per image is put before
    the first user turn's text."""
    roles = {
        "human": "user",
        "gpt": "assistant",
        "user": "user",
        "assistant": "assistant",
        "system": "system",
    }
    messages = []
    for t in turns:
        role, text = t.get("role", t.get("from")), t.get("content", t.get("value"))
        if role not in roles or not isinstance(text, str):
            raise PredictError(f"{qid}: conversation turn {dict(t)} needs a role and a text")
        messages.append({"role": roles[role], "content": text})
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise PredictError(f"{qid}: the conversation must end with a non-empty user turn")
    return _with_placeholders(Query(qid, image, tuple(messages), boxes))


def _with_placeholders(query: Query) -> Query:
    """``query`` with one ``<image>`` per image: put before the first user turn's text (each on its own
    line) when its messages have none; PredictError when they have another number."""
    from data_pipelines.schema import IMAGE_PLACEHOLDER

    n = len(query.images)
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in query.messages)
    if count and count != n:
        raise PredictError(
            f"{query.id}: the text has {count} {IMAGE_PLACEHOLDER} placeholders for {n} images"
        )
    if count:
        return query
    messages = list(query.messages)
    first = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first] = dict(messages[first], content=f"{IMAGE_PLACEHOLDER}\n" * n + messages[first]["content"])
    return dataclasses.replace(query, messages=tuple(messages))


def _agree(value: int) -> int:
    """The max of ``value`` over all processes (prompt widths must agree for one global batch)."""
    return int(sharding.process_values(np.int32(value)).max())


def shares(n: int, batch_size: int) -> Iterator[list[int]]:
    """For each global batch, the item indices this process handles (``-1`` = a padding row): item i
    belongs to process ``i % process_count``; every process runs the same number of batches."""
    count, me = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {count} processes.")
    local = batch_size // count
    mine = list(range(me, n, count))
    for s in range(math.ceil(math.ceil(n / count) / local)):
        chunk = mine[s * local : (s + 1) * local]
        yield chunk + [-1] * (local - len(chunk))


class Predictor:
    """A model (without its params) and the run's preprocessing: turns queries into batches, runs
    the device functions on them and returns results in query order on every process.
    ``box_codec``: the run's (default norm3 / square), which reads the boxes of its answers:
    ``predictor.box_codec.decode(answer, width, height)``."""

    def __init__(
        self,
        model: VisionLanguageModel,
        tokenizer,
        mesh: jax.sharding.Mesh,
        *,
        resize: str = "letterbox",
        jpeg_draft: bool = False,
        box_codec: BoxCodec | None = None,
    ):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.resize, self.jpeg_draft, self.box_codec = resize, jpeg_draft, box_codec or BoxCodec()
        self._decoding: tuple = (None, model, None)  # (params, model, params) laid out for decoding

    def for_decoding(self, params) -> tuple[VisionLanguageModel, Any]:
        """The model and ``params`` as decoding runs them: a scanned LLM laid out one buffer per layer
        (``llm.unscanned``; on an H200 greedy decoding at batch 1 ran 1.63x faster so). Converted once
        per params tree (one copy of the LLM's weights), not per batch."""
        if not self.mcfg.llm.scan_layers:
            return self.model, params
        if self._decoding[0] is not params:
            config, llm = unscanned(self.mcfg.llm, params["llm"])
            model = VisionLanguageModel(dataclasses.replace(self.mcfg, llm=config))
            self._decoding = (params, model, {**params, "llm": llm})
        return self._decoding[1:]

    @classmethod
    def from_config(cls, model: VisionLanguageModel, tokenizer, mesh, config) -> Predictor:
        """With the preprocessing of ``config.input`` (an experiment config) and its ``box_codec``; the
        padding colour is the model's pixel mean (``config.input.mean``, passed into the model config)."""
        draft = bool(config.input.get("jpeg_draft", False))
        codec = BoxCodec.of_run(config)
        return cls(model, tokenizer, mesh, resize=config.input.resize, jpeg_draft=draft, box_codec=codec)

    @property
    def mcfg(self) -> MLLMConfig:
        return self.model.config

    def batch_size(self, wanted: int) -> int:
        """``wanted`` rounded up to a multiple of the mesh's batch split and the process count."""
        step = math.lcm(sharding.batch_divisor(self.mesh), jax.process_count())
        return max(step, math.ceil(wanted / step) * step)

    # --- host side ---------------------------------------------------------------------------------
    def pixels(self, image: bytes, qid: str = "?") -> np.ndarray:
        """uint8 (S, S, 3) pixels as in training, padded with the model's pixel mean (which the model
        normalizes them with, on device)."""
        from data_pipelines import images
        from data_pipelines.schema import BadRecord

        size, mean = self.mcfg.image_size, self.mcfg.pixel_mean
        try:
            img = images.load(image, size, self.resize, mean, qid, jpeg_draft=self.jpeg_draft)
        except BadRecord as e:
            raise _undecodable(qid, e) from e
        return images.to_array(img)

    def pixels_of(self, images: Sequence[bytes], qid: str = "?") -> np.ndarray:
        """uint8 (n, S, S, 3): each of a query's ``images`` as :meth:`pixels` prepares it; PredictError
        for none, and for several on MG-LLaVA (its object tokens read one image per query)."""
        n = len(images)
        if not n:
            raise PredictError(f"{qid}: no image; a query needs at least one")
        if n > 1 and self.mcfg.high_res:
            raise PredictError(f"{qid}: MG-LLaVA reads one image per query; this query has {n}")
        return np.stack([self.pixels(b, _nth_image(qid, k, n)) for k, b in enumerate(images)])

    @property
    def max_boxes(self) -> int:
        return self.mcfg.high_res.max_boxes if self.mcfg.high_res else 0

    def object_boxes(self, image: bytes, boxes, qid: str = "?") -> tuple[np.ndarray, int]:
        """MG-LLaVA: ((max_boxes, 4) boxes in input pixels, number of real ones), prepared as in
        training (:func:`data_pipelines.detections.prepare_boxes`)."""
        from data_pipelines import detections, images

        try:
            entry = detections.parse_entry([] if boxes is None else boxes, qid)
        except ValueError as e:
            raise PredictError(str(e)) from e
        boxes, scores, labels = entry["boxes"], entry["scores"], entry["labels"]
        width, height = images.size(image) if len(boxes) else (1, 1)
        return detections.prepare_boxes(
            boxes, width, height, self.mcfg.image_size, self.resize, self.max_boxes, scores, labels
        )

    def with_boxes(self, example: dict[str, np.ndarray], image: bytes, boxes, qid: str = "?") -> dict:
        """A copy of the training-format ``example`` with MG-LLaVA's ``boxes`` added and their empty
        slots masked (``example`` itself is not changed)."""
        if not self.max_boxes:
            return example
        from data_pipelines.detections import mask_box_slots

        boxes, real = self.object_boxes(image, boxes, qid)
        out = dict(example, boxes=boxes, attention_mask=np.array(example["attention_mask"]))
        mask_box_slots(
            out["input_ids"], out["attention_mask"], real, self.max_boxes, self.mcfg.image_token_id
        )
        return out

    def prompt(self, query: Query) -> np.ndarray:
        from data_pipelines.schema import BadRecord
        from data_pipelines.text import prompt_ids

        try:
            ids = prompt_ids(
                self.tokenizer,
                query.messages,
                num_image_tokens=self.mcfg.num_image_tokens,
                num_images=len(query.images),
                record_id=query.id,
            )
        except BadRecord as e:
            raise PredictError(f"{query.id}: {e.reason.replace('_', ' ')} ({e.detail})") from e
        return ids

    def _dummy(self) -> dict[str, np.ndarray]:
        size, n = self.mcfg.image_size, self.mcfg.num_image_tokens
        out = {"image": np.zeros((size, size, 3), np.uint8), "ids": np.full(n, self.mcfg.image_token_id)}
        if self.max_boxes:
            out.update(boxes=np.zeros((self.max_boxes, 4), np.float32), real=0)
        return out

    # --- runs --------------------------------------------------------------------------------------
    def answers(
        self,
        params,
        queries: Sequence[Query],
        options: DecodeOptions = DecodeOptions(),
        *,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """``{"id", "answer", "tokens", "ended"}`` per query, in order (``ended``: stopped at an
        end-of-turn token rather than at ``max_new_tokens``). A query that cannot be prepared gets
        ``{"id", "error"}`` instead, and the others are answered."""
        tok = self.tokenizer
        stop_ids = tok.stop_ids
        rows: dict[int, dict[str, Any]] = {}
        batch_size = self.batch_size(batch_size)
        chunks = list(shares(len(queries), batch_size))
        bar = _progress(len(chunks), "answering", progress)
        for chunk in chunks:
            prepared = []
            for i in chunk:
                if i < 0:
                    prepared.append(None)
                    continue
                try:
                    q = queries[i]
                    p = {"image": self.pixels_of(q.images, q.id), "ids": self.prompt(q)}
                    if self.max_boxes:
                        p["boxes"], p["real"] = self.object_boxes(q.images[0], q.boxes, q.id)
                    prepared.append(p)
                except PredictError as e:
                    rows[i] = {"id": queries[i].id, "error": str(e)}
                    prepared.append(None)
            index = np.array([i if p is not None else -1 for i, p in zip(chunk, prepared)], np.int32)
            prepared = [p or self._dummy() for p in prepared]
            width = _agree(max(len(p["ids"]) for p in prepared))
            width = math.ceil(width / PROMPT_BUCKET) * PROMPT_BUCKET
            ids = np.full((len(prepared), width), tok.pad_id, np.int32)
            mask = np.zeros((len(prepared), width), np.int32)
            for r, p in enumerate(prepared):  # left padding: every prompt ends at the last column
                ids[r, width - len(p["ids"]) :], mask[r, width - len(p["ids"]) :] = p["ids"], 1
            arrays = {
                "image": _image_batch([p["image"] for p in prepared]),
                "input_ids": ids,
                "attention_mask": mask,
                "index": index,
            }
            if self.max_boxes:
                from data_pipelines.detections import mask_box_slots

                for r, p in enumerate(prepared):
                    mask_box_slots(ids[r], mask[r], p["real"], self.max_boxes, self.mcfg.image_token_id)
                arrays["boxes"] = np.stack([p["boxes"] for p in prepared])
            batch = sharding.shard_batch(arrays, self.mesh)
            with sharding.mesh_context(self.mesh):
                out = decode(*self.for_decoding(params), batch, options, eos_ids=stop_ids, pad_id=tok.pad_id,
                             detokenize=tok.decode)  # fmt: skip
            for r, i in enumerate(sharding.to_host(batch["index"])):
                if i >= 0:
                    gen = out.tokens[r, : int(out.lengths[r])].tolist()
                    ended = bool(gen) and gen[-1] in stop_ids
                    rows[int(i)] = {
                        "id": queries[i].id,
                        "answer": tok.decode(gen),
                        "tokens": gen,
                        "ended": ended,
                    }
            bar.update(1)
        bar.close()
        errors = {i: r for i, r in rows.items() if "error" in r}  # prepared by their own process only
        for i, r in _share_errors(errors).items():
            rows[i] = r
        return [rows[i] for i in range(len(queries))]

    def stream(self, params, query: Query, options: DecodeOptions = DecodeOptions()) -> Iterator[str]:
        """The answer to one query, piece by piece as it is decoded (greedy or sampling)."""
        if jax.process_count() > 1:
            raise PredictError(
                "streaming one answer runs on a single process; use --input on multi-host jobs"
            )
        tok = self.tokenizer
        images = _image_batch([self.pixels_of(query.images, query.id)])
        ids = self.prompt(query)[None]
        model, params = self.for_decoding(params)
        with sharding.mesh_context(self.mesh):
            embeds = _embed(model, params, images, ids)
        tokens: list[int] = []
        shown = ""
        for t in stream(
            CausalLM(model.config.llm), {"params": params["llm"]}, inputs_embeds=embeds,
            max_new_tokens=options.max_new_tokens, method=options.method, eos_token_id=tok.stop_ids,
            temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, seed=options.seed,
        ):  # fmt: skip
            tokens.append(t)
            text = tok.decode(tokens)
            cut = [text.index(s) + len(s) for s in options.stop_strings if s in text]
            if cut:
                text = text[: min(cut)]
            yield text[len(shown) :]
            shown = text
            if cut:
                return

    def scores(
        self,
        params,
        examples: Sequence[Mapping[str, np.ndarray] | None],
        *,
        batch_size: int = 8,
        groups: int = 0,
    ) -> list[dict[str, Any] | None]:
        """:func:`score` over training-format examples (``pack_example`` + ``image``: (S, S, 3), or
        (n, S, S, 3) for n images, batched as :func:`_image_batch` does), in order;
        None entries (examples that could not be prepared) stay None. Each process reads only its
        share of ``examples`` (others may be None there). ``groups`` > 0: every example carries
        ``group_masks`` (groups, T) and its row the per-group sums as lists."""
        rows: dict[int, dict[str, Any]] = {}
        batch_size = self.batch_size(batch_size)
        dummy = self._score_dummy(examples, groups)  # on every process: its width is agreed by all
        for chunk in shares(len(examples), batch_size):
            real = [examples[i] if i >= 0 else None for i in chunk]
            template = next((e for e in real if e is not None), None) or dummy
            index = np.array([i if e is not None else -1 for i, e in zip(chunk, real)], np.int32)
            keys = ("input_ids", "attention_mask", "targets", "loss_mask")
            keys += ("boxes",) if self.max_boxes else ()
            keys += ("group_masks",) if groups else ()
            stacked = {k: np.stack([(e or template)[k] for e in real]) for k in keys}
            stacked["image"] = _image_batch([(e or template)["image"] for e in real])
            stacked["loss_mask"] = stacked["loss_mask"] * (index >= 0)[:, None]
            batch = sharding.shard_batch({**stacked, "index": index}, self.mesh)
            with sharding.mesh_context(self.mesh):
                out = score(self.model, params, {k: v for k, v in batch.items() if k != "index"})
            for r, i in enumerate(sharding.to_host(batch["index"])):
                if i >= 0:
                    rows[int(i)] = {k: v[r].tolist() for k, v in out.items()}
        return [rows.get(i) for i in range(len(examples))]

    def _score_dummy(self, examples, groups: int = 0) -> dict[str, np.ndarray]:
        """A row of the right shapes when this process has no real example in a batch."""
        size, n = self.mcfg.image_size, self.mcfg.num_image_tokens
        width = _agree(max((len(e["input_ids"]) for e in examples if e is not None), default=n))
        ids = np.full(width, self.tokenizer.pad_id, np.int32)
        ids[:n] = self.mcfg.image_token_id
        zeros = np.zeros(width, np.int32)
        return {"image": np.zeros((size, size, 3), np.uint8), "input_ids": ids, "attention_mask": zeros + 1,
                "targets": zeros, "loss_mask": zeros.astype(np.float32),
                "boxes": np.zeros((self.max_boxes, 4), np.float32),
                "group_masks": np.zeros((groups, width), np.float32)}  # fmt: skip


def _image_batch(pixels: Sequence[np.ndarray]) -> np.ndarray:
    """The batch's images from each row's (S, S, 3) or (n, S, S, 3) pixels: (B, S, S, 3) when every row
    has one image (on every process), else (B, I, S, S, 3) with I the most images of a row over all
    processes, each row's images in its first slots and black in the rest (no image token reads them)."""
    rows = [np.reshape(x, (-1, *np.shape(x)[-3:])) for x in pixels]
    slots = _agree(max(len(x) for x in rows))
    if slots == 1:
        return np.stack([x[0] for x in rows])
    out = np.zeros((len(rows), slots, *rows[0].shape[1:]), np.uint8)
    for r, x in enumerate(rows):
        out[r, : len(x)] = x
    return out


def _share_errors(errors: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every process's preparation errors, on every process."""
    if jax.process_count() == 1:
        return errors
    text = json.dumps({str(k): v for k, v in errors.items()}).encode()
    buf = np.zeros(_agree(len(text)), np.uint8)
    buf[: len(text)] = np.frombuffer(text, np.uint8)
    merged: dict[int, dict[str, Any]] = {}
    for row in sharding.process_values(buf):
        raw = bytes(row).rstrip(b"\0")
        merged.update({int(k): v for k, v in json.loads(raw or b"{}").items()})
    return merged


def _progress(total: int, what: str, show: bool):
    from tqdm import tqdm

    disable = not show or jax.process_index() != 0
    return tqdm(total=total, desc=what, unit="batch", file=sys.stderr, dynamic_ncols=True, disable=disable)


def _nth_image(qid: str, k: int, n: int) -> str:
    """How errors name the k-th (from 0) of a query's n images."""
    return qid if n == 1 else f"{qid} (image {k + 1} of {n})"


def _undecodable(qid: str, e) -> PredictError:
    return PredictError(f"{qid}: the image does not decode ({e.reason}: {e.detail or 'empty'})")


def check_decodes(query: Query) -> None:
    """PredictError unless each of the query's images decodes (checked before a model is loaded)."""
    from data_pipelines import images
    from data_pipelines.schema import BadRecord

    for k, image in enumerate(query.images):
        name = _nth_image(query.id, k, len(query.images))
        try:
            images.decode(image, name)
        except BadRecord as e:
            raise _undecodable(name, e) from e
