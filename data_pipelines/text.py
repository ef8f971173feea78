"""Tokenizer wrapper over ``tokenizers`` + Jinja chat templates from ``tokenizer_config.json``.

``Tokenizer.load(dir)`` reads ``tokenizer.json`` and ``tokenizer_config.json`` (a Hugging Face
checkpoint dir). ``apply_chat_template`` renders the config's ``chat_template`` the way transformers
does (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``) and tokenizes without adding special
tokens, so ids equal ``AutoTokenizer.apply_chat_template``. ``<image>`` must be ONE token id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.schema import IMAGE_PLACEHOLDER, BadRecord

Message = dict[str, str]
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


def _token_str(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TokenizerDir:
    """What a tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) gives every wrapper:
    reading it, pickling for grain worker processes, the vocabulary size, decoding."""

    def __init__(self, tokenizer: Any, config: dict[str, Any], path: str = "<memory>"):
        self._tok = tokenizer
        self.config = dict(config)
        self.path = path

    @staticmethod
    def read(path: str, hint: str) -> tuple[Any, dict[str, Any]]:
        """(HF ``tokenizers.Tokenizer``, tokenizer_config.json) of the dir ``path`` (local or any epath
        URL); a missing file is one error ending with ``hint``."""
        from etils import epath
        from tokenizers import Tokenizer as HFTokenizer

        root = epath.Path(path)
        tj, tc = root / "tokenizer.json", root / "tokenizer_config.json"
        for f in (tj, tc):
            if not f.exists():
                raise FileNotFoundError(f"{f} not found; {hint}")
        return HFTokenizer.from_str(tj.read_text()), json.loads(tc.read_text())

    def token_ids(self, token: str) -> tuple[int | None, list[int]]:
        """(the vocabulary's id of ``token`` or None, what encoding it as text gives)."""
        return self._tok.token_to_id(token), self._tok.encode(token, add_special_tokens=False).ids

    def __getstate__(self):  # picklable for grain worker processes
        return {"json": self._tok.to_str(), "config": self.config, "path": self.path}

    def __setstate__(self, state):
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"]), state["config"], state["path"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class Tokenizer(TokenizerDir):
    """Text <-> ids plus chat-template rendering and answer masks for training."""

    def __init__(self, tokenizer: Any, config: dict[str, Any], path: str = "<memory>"):
        super().__init__(tokenizer, config, path)
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:
            raise ValueError(
                f"{path}: tokenizer_config.json has no chat_template; add a Jinja chat_template to it."
            )
        self.chat_template: str = template
        self._compiled = None
        # the template sees every *_token of the config (bos_token, eos_token, ...) as a variable
        self._template_tokens = {
            k: _token_str(v)
            for k, v in self.config.items()
            if k.endswith("_token") and isinstance(_token_str(v), str)
        }
        self.image_token = self.config.get("image_token") or IMAGE_PLACEHOLDER
        self.image_token_id = self._single_id(self.image_token, "image_token")
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token")) or self.eos_token
        if self.pad_token is None:
            raise ValueError(f"{path}: tokenizer_config.json sets neither pad_token nor eos_token; set one.")
        self.pad_id = self._single_id(self.pad_token, "pad_token")
        self.eos_id = self._single_id(self.eos_token, "eos_token") if self.eos_token else None
        self.bos_id = self._single_id(self.bos_token, "bos_token") if self.bos_token else None

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``) from a
        checkpoint dir (local or any epath URL, gs://...)."""
        from etils import epath

        tok, config = cls.read(
            path, "point input.tokenizer at a dir holding tokenizer.json and tokenizer_config.json "
            "(data_pipelines.shapes.build writes one).",
        )  # fmt: skip
        template = epath.Path(path) / "chat_template.jinja"
        if not config.get("chat_template") and template.exists():
            config["chat_template"] = template.read_text()
        return cls(tok, config, path)

    def save(self, path: str) -> str:
        """Writes ``tokenizer.json`` + ``tokenizer_config.json`` (chat template included) to ``path``
        (local or any ``etils.epath`` URL); :meth:`load` reads them back. Returns ``path``."""
        from etils import epath

        out = epath.Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self._tok.to_str())
        config = dict(self.config, chat_template=self.chat_template)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return str(path)

    def with_chat_template(self, template: str) -> Tokenizer:
        """The same vocabulary rendering chats with ``template``."""
        return Tokenizer(self._tok, {**self.config, "chat_template": template}, self.path)

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an answer: ``eos_token`` and the end-of-turn tokens of common chat templates
        that this vocabulary has as single tokens."""
        ids = [self.eos_id] if self.eos_id is not None else []
        for token in END_OF_TURN:
            tid = self._tok.token_to_id(token)
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    def _single_id(self, token: str, what: str) -> int:
        tid, ids = self.token_ids(token)
        if tid is None or ids != [tid]:
            raise ValueError(
                f"{self.path}: {what} {token!r} is not a single token (encodes to {ids}); add it to the "
                "tokenizer as a special token."
            )
        return tid

    # --- basic ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # --- chat template -------------------------------------------------------------------------
    def _template(self):
        if self._compiled is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(
                    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
                )

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat template's text for ``messages`` (list of ``{"role", "content"}``)."""
        return self._template().render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            **self._template_tokens, **kwargs,
        )  # fmt: skip

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> list[int]:
        """Token ids of the rendered template (same ids as transformers' ``apply_chat_template``)."""
        return self.encode(self.render(messages, add_generation_prompt))

    def tokenize_chat(
        self, messages: Sequence[Message], record_id: str = "?"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the rendered conversation and a bool mask of answer (assistant) tokens.

        An assistant turn's answer is the text the template adds for that turn after the generation
        prompt: its content plus the end-of-turn token(s). Tokens are assigned by character offset.
        """
        import jinja2

        try:
            full = self.render(messages)
        except jinja2.TemplateError as e:
            raise BadRecord("template_error", record_id, str(e)) from e
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1])
            if not full.startswith(upto) or start > len(upto):
                raise ValueError(
                    f"{self.path}: the chat template does not render conversation prefixes as prefixes "
                    f"(record {record_id}); answer masks need a prefix-stable template."
                )
            end = len(upto)
            tail = upto[start:end].rstrip()  # drop whitespace the template adds after end-of-turn
            if self.eos_token and tail.endswith(self.eos_token):
                end = start + len(tail)
            spans.append((start, end))
        enc = self._tok.encode(full, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int32)
        starts = np.asarray([o[0] for o in enc.offsets], np.int64)
        answer = np.zeros(len(ids), bool)
        for s, e in spans:
            answer |= (starts >= s) & (starts < e)
        return ids, answer


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer dir named by ``input.tokenizer``; see ``Tokenizer`` for the attributes."""
    return Tokenizer.load(path)


def expand_image_tokens(
    ids: np.ndarray, image_token_id: int, num_image_tokens: int, num_images: int = 1, record_id: str = "?"
) -> np.ndarray:
    """``ids`` with each of its image tokens repeated ``num_image_tokens`` times (the k-th block holds the
    k-th image's tokens); ``BadRecord`` unless it has exactly ``num_images`` image tokens."""
    return _expand(ids, ids == image_token_id, num_image_tokens, num_images, record_id)[0]


def _expand(ids, is_image, num_image_tokens, num_images, record_id, *more):
    """``ids`` and each array of ``more`` with the image positions repeated ``num_image_tokens`` times."""
    count = int(is_image.sum())
    if count != num_images:
        if num_images == 0:
            raise BadRecord("misplaced_image_placeholder", record_id, f"text-only, {count} image tokens")
        if count == 0:
            raise BadRecord("no_image_placeholder", record_id, "the rendered chat has no image token")
        raise BadRecord("image_count_mismatch", record_id, f"{count} image tokens for {num_images} images")
    reps = np.where(is_image, num_image_tokens, 1)
    return [np.repeat(x, reps) for x in (ids, *more)]


def prompt_ids(
    tok: Tokenizer,
    messages: Sequence[Message],
    *,
    num_image_tokens: int,
    num_images: int = 1,
    record_id: str = "?",
) -> np.ndarray:
    """The ids a model reads before answering ``messages`` (which end with a user turn): the chat
    template with its generation prompt, each of its ``num_images`` image tokens expanded as in training."""
    ids = np.asarray(tok.apply_chat_template(messages, add_generation_prompt=True), np.int32)
    return expand_image_tokens(ids, tok.image_token_id, num_image_tokens, num_images, record_id)


def pack_example(
    tok: Tokenizer,
    messages: Sequence[Message],
    *,
    num_image_tokens: int,
    max_len: int,
    overlong: str = "truncate",
    record_id: str = "?",
    num_images: int = 1,
) -> dict[str, np.ndarray]:
    """Render + tokenize a conversation into fixed-length training arrays.

    Each of the ``num_images`` image tokens is expanded to ``num_image_tokens`` copies (0: a text-only
    conversation). Returns ``input_ids``, ``targets`` (ids shifted left, last = pad), ``loss_mask`` (1
    where the target is an answer token) and ``attention_mask``, all of length ``max_len``; ``length``
    (the tokens before the padding) and ``truncated`` (whether tokens past ``max_len`` were cut, with
    ``overlong="truncate"``; an image is never cut: its record is ``too_long``).
    """
    ids, answer = tok.tokenize_chat(messages, record_id)
    is_image = ids == tok.image_token_id
    ids, answer, is_image = _expand(
        ids, is_image, num_image_tokens, num_images, record_id, answer & ~is_image, is_image
    )
    truncated = len(ids) > max_len
    if truncated:
        if overlong == "skip":
            raise BadRecord("too_long", record_id, f"{len(ids)} tokens > max_len {max_len}")
        if is_image[max_len:].any():
            end = int(np.flatnonzero(is_image)[-1]) + 1
            raise BadRecord("too_long", record_id, f"image tokens end at {end} > {max_len}")
        ids, answer = ids[:max_len], answer[:max_len]
    n = len(ids)
    input_ids = np.full(max_len, tok.pad_id, np.int32)
    input_ids[:n] = ids
    targets = np.full(max_len, tok.pad_id, np.int32)
    targets[: n - 1] = ids[1:]
    loss_mask = np.zeros(max_len, np.float32)
    loss_mask[: n - 1] = answer[1:]
    if not loss_mask.any():
        raise BadRecord("no_answer_tokens", record_id, f"no answer token within max_len {max_len}")
    attention_mask = np.zeros(max_len, np.int32)
    attention_mask[:n] = 1
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "length": n,
        "truncated": truncated,
    }


def prepare_tokenizer(src: str, dst: str, *, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """An LLM's tokenizer directory made usable for training: ``image_token`` added as a special token
    (the next free id, which must fit the LLM's embedding rows) and named in ``tokenizer_config.json``,
    the chat template kept (``tokenizer_config.json`` or ``chat_template.jinja``). Writes ``dst``.

    ``python -m data_pipelines.text SRC DST``"""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        found = sorted(os.listdir(src)) if os.path.isdir(src) else []
        raise FileNotFoundError(
            f"No tokenizer.json in {src!r} (found {found}); save a sentencepiece-only tokenizer "
            "(tokenizer.model) as a fast one first: AutoTokenizer.from_pretrained(src).save_pretrained(dir)."
        )
    tok = HFTokenizer.from_file(os.path.join(src, "tokenizer.json"))
    config_file = os.path.join(src, "tokenizer_config.json")
    config = json.load(open(config_file, encoding="utf-8")) if os.path.exists(config_file) else {}
    template = os.path.join(src, "chat_template.jinja")
    if not config.get("chat_template") and os.path.exists(template):
        config["chat_template"] = open(template, encoding="utf-8").read()
    if tok.token_to_id(image_token) is None:
        tok.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
    config["image_token"] = image_token
    os.makedirs(dst, exist_ok=True)
    tok.save(os.path.join(dst, "tokenizer.json"))
    with open(os.path.join(dst, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    Tokenizer.load(dst)  # the same checks training makes: chat template, single-token specials
    return dst


# --- the Q-Former's caption tokens (BLIP-2 / X-Former stage 1) ---------------------------------------
DEC_TOKEN = "[DEC]"  # LAVIS: tokenizer.add_special_tokens({"bos_token": "[DEC]"}); the ITG loss's first id


class QFormerTokenizer(TokenizerDir):
    """The Q-Former text branch's tokenizer (BLIP-2 reads the caption with ``bert-base-uncased`` + ``[DEC]``),
    separate from the LLM's chat-template tokens.

    ``encode(text, max_len)`` gives ``[CLS] text [SEP] [PAD]...`` and its attention mask, as
    ``BertTokenizer(text, padding="max_length", truncation=True, max_length=max_len)``. The special tokens
    come from ``tokenizer_config.json``: ``cls_token`` / ``sep_token`` / ``pad_token``, else ``bos_token`` /
    ``eos_token`` / the sep token for a tokenizer without BERT's; ``dec_token`` (default ``[DEC]``) must be
    one token (:func:`prepare_qformer_tokenizer` adds it). Normalization (BERT's lowercasing) is the
    ``tokenizer.json``'s own.
    """

    def __init__(self, tokenizer: Any, config: dict[str, Any], path: str = "<memory>"):
        super().__init__(tokenizer, config, path)
        self._tok.no_truncation()  # encode() truncates and pads itself
        self._tok.no_padding()

        def token(keys: tuple[str, str], what: str) -> str:
            value = next((t for k in keys if isinstance(t := _token_str(self.config.get(k)), str)), None)
            if value is None:
                raise ValueError(
                    f"{path}: tokenizer_config.json sets neither {keys[0]} nor {keys[1]} (the Q-Former's "
                    f"{what} token); set one, e.g. prepare_qformer_tokenizer(src, dst, {keys[0]}=...)."
                )
            return value

        self.cls_token = token(("cls_token", "bos_token"), "first")
        self.sep_token = token(("sep_token", "eos_token"), "last")
        self.pad_token = _token_str(self.config.get("pad_token")) or self.sep_token
        self.dec_token = _token_str(self.config.get("dec_token")) or DEC_TOKEN
        self.cls_id = self._single_id(self.cls_token, "cls_token")
        self.sep_id = self._single_id(self.sep_token, "sep_token")
        self.pad_id = self._single_id(self.pad_token, "pad_token")
        self.dec_id = self._single_id(self.dec_token, "dec_token")

    def _single_id(self, token: str, what: str) -> int:
        tid, ids = self.token_ids(token)
        if tid is None or ids != [tid]:
            raise ValueError(
                f"{self.path}: the Q-Former's {what} {token!r} is not a single token (encodes to {ids}); "
                + (
                    "run data_pipelines.text.prepare_qformer_tokenizer(src, dst) on the dir (it adds [DEC])."
                    if what == "dec_token"
                    else f"set {what} in tokenizer_config.json to a token of the vocabulary."
                )
            )
        return tid

    @classmethod
    def load(cls, path: str) -> QFormerTokenizer:
        """Load ``tokenizer.json`` + ``tokenizer_config.json`` from a dir (local or any epath URL)."""
        hint = ("point input.qformer_tokenizer at a dir holding tokenizer.json and tokenizer_config.json "
                "(data_pipelines.text.prepare_qformer_tokenizer writes one).")  # fmt: skip
        return cls(*cls.read(path, hint), path)

    def text_ids(self, text: str) -> list[int]:
        """The caption's ids, no special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, int32 ``(max_len,)``: ``[CLS] text [SEP]`` padded with ``pad_id``; the text is
        cut so that ``[SEP]`` stays last (as transformers' ``truncation=True``)."""
        if max_len < 3:
            raise ValueError(f"max_len={max_len} leaves no text token between CLS and SEP; use >= 3.")
        body = self.text_ids(text)[: max_len - 2]
        n = len(body) + 2
        ids = np.full(max_len, self.pad_id, np.int32)
        ids[:n] = [self.cls_id, *body, self.sep_id]
        mask = np.zeros(max_len, np.int32)
        mask[:n] = 1
        return ids, mask


def load_qformer_tokenizer(path: str) -> QFormerTokenizer:
    """Load the tokenizer dir named by ``input.qformer_tokenizer``."""
    return QFormerTokenizer.load(path)


def prepare_qformer_tokenizer(
    src: str, dst: str, *, cls_token: str | None = None, sep_token: str | None = None
) -> str:
    """A tokenizer dir (e.g. ``bert-base-uncased``'s) made usable as the Q-Former's: ``[DEC]`` added as a
    special token at the end of the vocabulary if missing (as LAVIS's ``add_special_tokens({"bos_token":
    "[DEC]"})``: BERT's 30522 words -> id 30522) and named ``dec_token`` in ``tokenizer_config.json``;
    ``cls_token`` / ``sep_token`` set there when given (a tokenizer without BERT's otherwise uses its
    ``bos_token`` / ``eos_token``). Writes ``dst`` (local or epath) and returns it."""
    from etils import epath
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    root, out = epath.Path(src), epath.Path(dst)
    if not (root / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"No tokenizer.json in {src!r}; save the tokenizer as a fast one first: "
            "AutoTokenizer.from_pretrained(src).save_pretrained(dir)."
        )
    tok = HFTokenizer.from_str((root / "tokenizer.json").read_text())
    config_file = root / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if tok.token_to_id(DEC_TOKEN) is None:
        tok.add_special_tokens([AddedToken(DEC_TOKEN, special=True, normalized=False)])
    config["dec_token"] = DEC_TOKEN
    for key, value in (("cls_token", cls_token), ("sep_token", sep_token)):
        if value is not None:
            config[key] = value
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str())
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    QFormerTokenizer.load(dst)  # the checks the pipeline makes: single-token specials
    return dst


def main(argv: list[str]) -> None:
    """``python -m data_pipelines.text SRC_TOKENIZER_DIR DST_DIR``: :func:`prepare_tokenizer`."""
    if len(argv) != 3:
        raise SystemExit("usage: python -m data_pipelines.text SRC_TOKENIZER_DIR DST_DIR")
    out = Tokenizer.load(prepare_tokenizer(argv[1], argv[2]))
    print(f"{argv[2]}: {out.vocab_size} tokens, {out.image_token!r} = id {out.image_token_id}")


if __name__ == "__main__":
    from pargo_jax import launcher

    launcher.run(main)
