"""Tokenizer wrapper, chat templates (vs transformers), answer masks and example packing."""

import json
import os

import numpy as np
import pytest

from data_pipelines import shapes
from data_pipelines.schema import BadRecord
from data_pipelines.text import Tokenizer, load_tokenizer, pack_example

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
CHAT = [
    {"role": "user", "content": "<image>\nWhat is shown? Réponds en français, s'il te plaît."},
    {"role": "assistant", "content": "Un chat noir sur un canapé."},
    {"role": "user", "content": "And the colour of the sofa?"},
    {"role": "assistant", "content": "It is red, with 2 cushions."},
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer with a Qwen2-style chat template, saved like a HF checkpoint."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [m["content"] for m in CHAT] * 20 + ["You are a helpful assistant.", "system user assistant"]
    tok.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("qwen_tok")
    tok.save(str(d / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": QWEN2_TEMPLATE,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"],
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return str(d)


def _hf_ids(out):
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


@pytest.mark.parametrize("gen_prompt", [False, True])
def test_chat_template_ids_match_transformers(qwen_dir, gen_prompt):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen_dir)
    ours = load_tokenizer(qwen_dir)
    for msgs in (CHAT, CHAT[:3], [{"role": "system", "content": "Be brief."}] + CHAT[:2]):
        expected = _hf_ids(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt))
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours.render(msgs, add_generation_prompt=gen_prompt) == text
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt) == expected
    assert ours.image_token_id == hf.convert_tokens_to_ids("<image>")
    assert ours.encode("<image>") == [ours.image_token_id]
    assert ours.pad_id == hf.pad_token_id and ours.eos_id == hf.eos_token_id
    assert ours.vocab_size == len(hf)


def test_answer_mask_covers_exactly_the_answers_and_eos(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    ids, answer = tok.tokenize_chat(CHAT)
    assert ids.tolist() == tok.apply_chat_template(CHAT)
    # contiguous answer runs, each decoding to the assistant text + end-of-turn token
    runs, start = [], None
    for i, a in enumerate(list(answer) + [False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            runs.append(ids[start:i])
            start = None
    decoded = [tok.decode(r, skip_special_tokens=False) for r in runs]
    assert decoded == [CHAT[1]["content"] + "<|im_end|>", CHAT[3]["content"] + "<|im_end|>"]


def test_image_token_must_be_single_token(qwen_dir, tmp_path):
    from tokenizers import Tokenizer as HFTok

    cfg = json.loads(open(os.path.join(qwen_dir, "tokenizer_config.json")).read())
    raw = HFTok.from_file(os.path.join(qwen_dir, "tokenizer.json"))
    with pytest.raises(ValueError, match="not a single token"):
        Tokenizer(raw, dict(cfg, image_token="<img_not_special>"))
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(raw, dict(cfg, chat_template=None))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_shapes_tokenizer_covers_generator_text_and_matches_asset(tmp_path):
    tok = Tokenizer(*shapes.make_tokenizer())
    unk = tok.token_to_id("<unk>")
    for split in ("pretrain", "sft", "eval"):
        for i in range(150):
            text = tok.render(shapes.make_record(split, i, seed=3).messages())
            ids = tok.encode(text)
            assert unk not in ids, text
            assert tok.decode(ids, skip_special_tokens=False) == text
    # the committed copy equals what the code generates (deterministic)
    shapes.write_tokenizer(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(tmp_path / f) as a, open(os.path.join(shapes.ASSET_TOKENIZER, f)) as b:
            assert a.read() == b.read(), f
    loaded = load_tokenizer(shapes.ASSET_TOKENIZER)
    assert (loaded.image_token_id, loaded.pad_id) == (tok.image_token_id, tok.pad_id)
    assert loaded.bos_id is not None and loaded.eos_id == tok.token_to_id("<|im_end|>")


def test_shapes_tokenizer_agrees_with_transformers():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(shapes.ASSET_TOKENIZER)
    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    msgs = shapes.make_record("sft", 5).messages()
    assert tok.apply_chat_template(msgs) == _hf_ids(hf.apply_chat_template(msgs, tokenize=True))


def test_pack_example_expands_image_shifts_targets_and_masks():
    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    msgs = [
        {"role": "user", "content": "<image>\nwhat colour is the circle?"},
        {"role": "assistant", "content": "red"},
    ]
    ids, answer = tok.tokenize_chat(msgs)
    n_img, max_len = 5, 40
    out = pack_example(tok, msgs, num_image_tokens=n_img, max_len=max_len)
    n = len(ids) - 1 + n_img
    p = int(np.flatnonzero(ids == tok.image_token_id)[0])
    x = out["input_ids"]
    assert x.dtype == np.int32 and x.shape == (max_len,)
    assert (x[p : p + n_img] == tok.image_token_id).all() and (x == tok.image_token_id).sum() == n_img
    assert (x[n:] == tok.pad_id).all() and out["attention_mask"].sum() == n
    np.testing.assert_array_equal(out["targets"][:-1], x[1:])
    assert out["targets"][-1] == tok.pad_id
    # loss on the answer "red" and the closing <|im_end|> only
    masked = out["targets"][out["loss_mask"] > 0]
    assert tok.decode(masked, skip_special_tokens=False) == "red<|im_end|>"
    assert out["loss_mask"].dtype == np.float32


def test_pack_example_overlong_truncate_or_skip():
    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    msgs = shapes.make_record("sft", 0).messages()
    full = len(tok.apply_chat_template(msgs)) - 1 + 8
    out = pack_example(tok, msgs, num_image_tokens=8, max_len=full - 3, overlong="truncate")
    assert out["attention_mask"].all() and out["loss_mask"].sum() > 0 and out["truncated"]
    assert not pack_example(tok, msgs, num_image_tokens=8, max_len=full + 1)["truncated"]
    with pytest.raises(BadRecord) as e:
        pack_example(tok, msgs, num_image_tokens=8, max_len=full - 3, overlong="skip", record_id="r1")
    assert e.value.reason == "too_long" and e.value.record_id == "r1"
    with pytest.raises(BadRecord) as e:  # the image itself would be cut
        pack_example(tok, msgs, num_image_tokens=64, max_len=20, overlong="truncate")
    assert e.value.reason == "too_long"
    with pytest.raises(BadRecord) as e:  # answers all past max_len
        pack_example(tok, msgs, num_image_tokens=8, max_len=22, overlong="truncate")
    assert e.value.reason == "no_answer_tokens"
    with pytest.raises(BadRecord) as e:
        pack_example(
            tok,
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}],
            num_image_tokens=8,
            max_len=64,
        )
    assert e.value.reason == "no_image_placeholder"


def test_template_rejection_is_a_counted_bad_record(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    strict = dict(
        tok.config,
        chat_template=(
            "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
            "{{ m['content'] }}{% endfor %}"
        ),
    )
    t = Tokenizer(tok._tok, strict)
    with pytest.raises(BadRecord) as e:
        t.tokenize_chat([CHAT[1], CHAT[0]], record_id="swapped")
    assert e.value.reason == "template_error" and "alternate" in str(e.value)


def test_tokenizer_pickles_for_worker_processes():
    import pickle

    tok = load_tokenizer(shapes.ASSET_TOKENIZER)
    tok.render(CHAT)  # compiled template must not break pickling
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)


def test_prepare_tokenizer_adds_the_image_token(tmp_path):
    """An HF LLM tokenizer (tokenizer.json + chat_template.jinja, no <image>) becomes a training one."""
    from data_pipelines.text import prepare_tokenizer
    from tests.demo import word_tokenizer

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "\n"]
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    src = tmp_path / "qwen"
    word_tokenizer(src, words, words[:3], config)
    (src / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(ValueError, match="'<image>' is not a single token"):
        Tokenizer.load(str(src))  # as it comes: training would stop here
    tok = Tokenizer.load(prepare_tokenizer(str(src), str(tmp_path / "ready")))
    assert tok.image_token_id == len(words) and tok.vocab_size == len(words) + 1
    ids = tok.apply_chat_template([{"role": "user", "content": "<image>\nhi"}])
    assert ids.count(tok.image_token_id) == 1
    with pytest.raises(FileNotFoundError, match=r"No tokenizer.json.*save a sentencepiece-only"):
        prepare_tokenizer(str(tmp_path), str(tmp_path / "x"))


# --- the Q-Former's caption tokens (BLIP-2 stage 1) ---------------------------------------------------------
QFORMER_WORDS = "a the red blue cat dog sits on sofa mat with two small big and is picture of".split()
CAPTIONS = ["A red Cat sits on the SOFA.", "Two small dogs, a big cat with the red mat and a blue sofa " * 3]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from tests.demo import bert_tokenizer

    return bert_tokenizer(tmp_path_factory.mktemp("bert"), QFORMER_WORDS)


def test_qformer_tokenizer_matches_lavis_bert_tokenizer(bert_dir, tmp_path):
    """``encode`` == LAVIS's ``BertTokenizer`` + ``add_special_tokens({"bos_token": "[DEC]"})`` called with
    ``padding="max_length", truncation=True, max_length=...``, on a short and an overlong caption."""
    import pickle

    from transformers import AutoTokenizer, BertTokenizerFast

    from data_pipelines.text import (
        DEC_TOKEN,
        QFormerTokenizer,
        load_qformer_tokenizer,
        prepare_qformer_tokenizer,
    )

    with pytest.raises(
        ValueError, match=r"dec_token '\[DEC\]' is not a single token.*prepare_qformer_tokenizer"
    ):
        QFormerTokenizer.load(bert_dir)
    ready = prepare_qformer_tokenizer(bert_dir, str(tmp_path / "ready"))
    lavis = BertTokenizerFast(tokenizer_file=os.path.join(bert_dir, "tokenizer.json"))
    lavis.add_special_tokens({"bos_token": DEC_TOKEN})
    auto = AutoTokenizer.from_pretrained(ready)
    q = load_qformer_tokenizer(ready)
    assert q.dec_id == lavis.bos_token_id == auto.convert_tokens_to_ids(DEC_TOKEN) == len(lavis) - 1
    assert q.vocab_size == len(lavis) == len(auto)
    assert (q.cls_id, q.pad_id) == (lavis.cls_token_id, lavis.pad_token_id)
    for text in CAPTIONS:
        for max_len in (12, 32):
            ids, mask = q.encode(text, max_len)
            assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (max_len,)
            for ref in (lavis, auto):
                want = ref(text, padding="max_length", truncation=True, max_length=max_len)
                assert ids.tolist() == want["input_ids"] and mask.tolist() == want["attention_mask"]
    ids, mask = q.encode(CAPTIONS[0], 12)
    assert q.decode(ids) == "a red cat sits on the sofa." and mask.sum() == 10
    assert (
        pickle.loads(pickle.dumps(q)).encode(CAPTIONS[1], 12)[0].tolist()
        == q.encode(CAPTIONS[1], 12)[0].tolist()
    )
    again = load_qformer_tokenizer(prepare_qformer_tokenizer(ready, str(tmp_path / "again")))
    assert (again.vocab_size, again.dec_id) == (q.vocab_size, q.dec_id)  # [DEC] is added once


def test_qformer_tokenizer_on_a_tokenizer_without_bert_tokens(tmp_path):
    """The shapes tokenizer has no [CLS]/[SEP]: ``bos_token`` opens the caption and ``eos_token`` (or the
    given ``sep_token``) closes it; a missing one is named."""
    from data_pipelines.text import QFormerTokenizer, prepare_qformer_tokenizer

    q = QFormerTokenizer.load(
        prepare_qformer_tokenizer(shapes.ASSET_TOKENIZER, str(tmp_path / "a"), sep_token="</s>")
    )
    llm = load_tokenizer(shapes.ASSET_TOKENIZER)
    assert (q.cls_token, q.sep_token, q.pad_id) == ("<s>", "</s>", llm.pad_id)
    assert q.dec_id == llm.vocab_size and q.vocab_size == llm.vocab_size + 1
    caption = shapes.make_record("pretrain", 0).caption
    ids, mask = q.encode(caption, 8)
    assert ids.tolist() == [q.cls_id, *llm.encode(caption)[:6], q.sep_id] and mask.all()
    ids, mask = q.encode(caption, 96)
    n = int(mask.sum())
    assert q.decode(ids[1 : n - 1]) == caption and (ids[n:] == llm.pad_id).all() and not mask[n:].any()
    default = QFormerTokenizer.load(prepare_qformer_tokenizer(shapes.ASSET_TOKENIZER, str(tmp_path / "b")))
    assert default.sep_token == "<|im_end|>"  # its eos_token
    config = dict(default.config, bos_token=None)
    with pytest.raises(ValueError, match="sets neither cls_token nor bos_token.*cls_token=") as e:
        QFormerTokenizer(default._tok, config)
    assert "\n" not in str(e.value)
