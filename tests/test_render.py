"""scenarios.render on the tiny models' tokenizer: rendering, tokenization and alignment (paper_spec §9.4 I5)."""
from __future__ import annotations

import dataclasses
import re

import pytest

from kvnotes.models import model_spec
from scenarios.render import AlignmentError, align, render_text, tokenize

pytestmark = pytest.mark.usefixtures("single_thread")


def nospace(s: str) -> str:
    return re.sub(r"\s+", "", s)


def some_instances(all_instances, family):
    """A few instances per family: two of every scenario (gated ones and controls alike)."""
    seen, out = {}, []
    for inst in all_instances(family, n_instances=2, seed=1):
        if seen.get(inst.scenario, 0) < 2:
            seen[inst.scenario] = seen.get(inst.scenario, 0) + 1
            out.append(inst)
    assert any(i.kind == "control" for i in out) and any(i.kind == "gated" for i in out)
    return out


# ---------------------------------------------------------------- I5 on every tiny model, both families
@pytest.mark.parametrize("family", ["diverse", "family_a"])
def test_I5_alignment_contract(tiny, family, all_instances, align_for):
    tok = tiny.tokenizer
    bos = tok.bos_token_id
    newline = tok.convert_tokens_to_ids("\n")
    assert newline != tok.unk_token_id
    for inst in some_instances(all_instances, family):
        pair = align_for(tiny, inst)
        old, new = pair.old_ids, pair.new_ids
        a, b = pair.span
        L = pair.length
        where = inst.id
        # equal lengths, identical outside [a, b), differing inside it (at both ends of the span)
        assert len(old) == len(new) == L, where
        assert 0 < a < b < L - 1, where
        assert old[:a].tolist() == new[:a].tolist(), where
        assert old[b:].tolist() == new[b:].tolist(), where
        assert int(old[a]) != int(new[a]) and int(old[b - 1]) != int(new[b - 1]), where
        # the decision token (last) is the same in both arms
        assert int(old[-1]) == int(new[-1]) and pair.dpos == L - 1, where
        # BOS: exactly one, at position 0, for a prepend_bos model; none otherwise
        for ids in (old, new):
            if tiny.spec["prepend_bos"]:
                assert int(ids[0]) == bos and int(ids[1]) != bos, where
                assert int((ids == bos).sum()) == 1, where
            else:
                assert int(ids[0]) != bos and int((ids == bos).sum()) == 0, where
        # the span decodes to the values' changed pieces
        for ids, value in ((old, inst.old_value), (new, inst.new_value)):
            span_text = nospace(tok.decode(ids[a:b].tolist()))
            assert span_text, where
            if inst.kind == "gated":     # these values share no leading pieces: the span is the whole value
                assert span_text == nospace(value), (where, span_text, value)
            else:                        # e.g. "2026-06-..." vs "2026-11-...": the shared "2026 -" stays outside
                assert span_text in nospace(value), (where, span_text, value)
        # line_end: one past the first newline token at or after b
        e = pair.line_end
        assert b < e <= pair.dpos, where
        assert int(old[e - 1]) == newline, where
        assert newline not in old[b:e - 1].tolist(), where
        # the rendered texts carry the values
        assert inst.old_value in pair.text_old and inst.new_value in pair.text_new, where


def test_token_info_regions(tiny, diverse_pair):
    info = diverse_pair.token_info(tiny.tokenizer)
    a, b = diverse_pair.span
    assert info["span"] == [a, b] and info["L"] == diverse_pair.length and info["dpos"] == diverse_pair.length - 1
    assert info["regions"] == {"prefix": [0, a], "field": [a, b], "downstream": [b, info["dpos"]],
                               "decision": [info["dpos"], info["L"]]}
    assert info["span_old"] == ["pending"] and info["span_new"] == ["shipped"]


# ---------------------------------------------------------------- misaligned pairs
def _with_new_value(inst, new_value):
    """The instance with its new arm carrying `new_value` in the field line (and nothing else changed)."""
    old_line = f"{inst.field}: {inst.old_value}"
    new_messages = []
    n_replaced = 0
    for m in inst.old_messages:
        n_replaced += m["content"].count(old_line)
        new_messages.append({**m, "content": m["content"].replace(old_line, f"{inst.field}: {new_value}")})
    assert n_replaced == 1
    (mi, s, _), _ = inst.value_at          # the generator's mark of the value, moved to the new value's length
    return dataclasses.replace(inst, new_value=new_value, new_messages=tuple(new_messages),
                               value_at=(inst.value_at[0], (mi, s, s + len(new_value))))


def test_values_of_different_token_lengths_raise_with_a_precise_message(tiny, all_instances):
    tok = tiny.tokenizer
    inst = all_instances("diverse")[0]
    assert inst.scenario == "order_cancel" and inst.old_value == "pending"
    bad = _with_new_value(inst, "on hold")
    n_old = len(tokenize(render_text(bad.old_messages, tok), tok, tiny.spec["prepend_bos"]))
    n_new = len(tokenize(render_text(bad.new_messages, tok), tok, tiny.spec["prepend_bos"]))
    assert n_new == n_old + 1
    with pytest.raises(AlignmentError) as err:
        align(bad, tok, tiny.spec["prepend_bos"], tiny.spec.get("plain_prompt"))
    msg = str(err.value)
    assert "'order_cancel'" in msg and "order_cancel/000" in msg and "'order_status'" in msg
    assert "'pending'" in msg and "'on hold'" in msg
    assert "1 vs 2 tokens" in msg
    assert f"{n_old} vs {n_new} tokens" in msg
    assert isinstance(err.value, ValueError)


def test_identical_prompts_raise(tiny, all_instances):
    inst = all_instances("diverse")[0]
    same = dataclasses.replace(inst, new_value=inst.old_value, new_messages=inst.old_messages)
    with pytest.raises(AlignmentError, match="order_cancel"):
        align(same, tiny.tokenizer, tiny.spec["prepend_bos"], tiny.spec.get("plain_prompt"))


def test_equal_length_values_still_align(tiny, all_instances, align_for):
    """A hand-made pair whose values are one known token each aligns, with the span on the value."""
    inst = all_instances("diverse")[0]
    pair = align_for(tiny, _with_new_value(inst, "cancelled"))
    a, b = pair.span
    assert b - a == 1 and tiny.tokenizer.decode(pair.new_ids[a:b].tolist()) == "cancelled"


# ---------------------------------------------------------------- tokenize and BOS handling
def test_tokenize_refuses_to_double_a_bos(tiny):
    tok = tiny.tokenizer
    text = "<bos>" + render_text([{"role": "user", "content": "hello"}], tok)
    with pytest.raises(ValueError, match="BOS"):
        tokenize(text, tok, prepend_bos=True)
    ids = tokenize(text, tok, prepend_bos=False)        # a BOS the text writes itself is kept, once
    assert int(ids[0]) == tok.bos_token_id and int((ids == tok.bos_token_id).sum()) == 1
    with pytest.raises(ValueError, match="BOS"):
        tokenize("<bos><bos>" + text[len("<bos>"):], tok, prepend_bos=False)
    plain = tokenize(text[len("<bos>"):], tok, prepend_bos=True)
    assert plain.tolist() == ids.tolist()


def test_tokenize_adds_no_special_tokens_of_its_own(tiny):
    tok = tiny.tokenizer
    text = render_text([{"role": "user", "content": "hello"}], tok)
    ids = tokenize(text, tok, prepend_bos=False)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids.tolist()


def test_prepend_bos_without_a_bos_token_raises():
    class NoBos:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5, 6]}

    with pytest.raises(ValueError, match="no bos"):
        tokenize("x", NoBos(), prepend_bos=True)
    assert tokenize("x", NoBos(), prepend_bos=False).tolist() == [5, 6]


# ---------------------------------------------------------------- plain prompts (base models without a template)
MESSAGES = ({"role": "system", "content": "You are a bot.\nPolicy: deny."},
            {"role": "user", "content": "Cancel order 12?"})


def test_render_text_with_a_plain_prompt_layout(tiny):
    layout = model_spec("gemma3-270m")["plain_prompt"]
    assert layout == {"system": "{content}\n\n", "user": "{content}\n", "generation": "Answer:"}
    tok = tiny.tokenizer
    text = render_text(MESSAGES, tok, plain_prompt=layout)
    assert text == "You are a bot.\nPolicy: deny.\n\nCancel order 12?\nAnswer:"
    assert "<|im_start|>" not in text and "<bos>" not in text
    assert render_text(MESSAGES, tok, plain_prompt=layout, suffix="tool_call:") == text + " tool_call:"


def test_render_text_with_the_chat_template(tiny):
    tok = tiny.tokenizer
    text = render_text(MESSAGES, tok)
    assert text == ("<|im_start|>system\nYou are a bot.\nPolicy: deny.<|im_end|>\n"
                    "<|im_start|>user\nCancel order 12?<|im_end|>\n<|im_start|>assistant\n")
    assert render_text(MESSAGES, tok, suffix="tool_call:") == text + "tool_call:"


def test_render_text_without_template_or_layout_raises():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="plain_prompt"):
        render_text(MESSAGES, NoTemplate())


def test_plain_prompt_pair_aligns_with_one_bos(tiny, all_instances):
    """The gemma3-270m layout (prepend_bos, no template) on the tiny tokenizer renders and aligns."""
    layout = model_spec("gemma3-270m")["plain_prompt"]
    tok = tiny.tokenizer
    for inst in all_instances("diverse")[:3] + all_instances("family_a")[:1]:
        pair = align(inst, tok, prepend_bos=True, plain_prompt=layout)
        assert "<|im_start|>" not in pair.text_old and pair.text_old.endswith("Answer:" + (
            " " + inst.suffix if inst.suffix else ""))
        assert int(pair.old_ids[0]) == tok.bos_token_id and int((pair.old_ids == tok.bos_token_id).sum()) == 1
        a, b = pair.span
        assert nospace(tok.decode(pair.old_ids[a:b].tolist())) == nospace(inst.old_value)
