"""Prompt records and lineage."""

import pytest

from eva_ray.records import PromptRecord, child_id, make_child


def test_child_inherits_info_and_extends_lineage():
    parent = PromptRecord(id="seed-3", text="Sort a list.", info=0.7, info_measured=True, generation=0)
    child = make_child(parent, "Sort a list without extra memory.", operator="constraints", step=12, index=1)
    assert (child.parent_id, child.generation, child.operator, child.step_born) == ("seed-3", 1, "constraints", 12)
    assert child.source == "evolved" and child.info == 0.7 and child.info_measured is False
    grandchild = make_child(child, "Sort a linked list in place.", operator="concretizing", step=20, index=0)
    assert grandchild.generation == 2 and grandchild.parent_id == child.id


def test_child_ids_are_unique_and_stay_short_in_deep_lineages():
    ids = {child_id("seed-1", step, i) for step in range(50) for i in range(4)}
    assert len(ids) == 200
    deep = "seed-1"
    seen = set()
    for gen in range(40):
        deep = child_id(deep, gen, 0)
        assert len(deep) <= 64 and deep not in seen
        seen.add(deep)


def test_text_or_messages_exactly_one():
    with pytest.raises(ValueError, match="exactly one"):
        PromptRecord(id="x")
    with pytest.raises(ValueError, match="exactly one"):
        PromptRecord(id="x", text="a", messages=[{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="source"):
        PromptRecord(id="x", text="a", source="mined")


def test_chat_prompts_expose_the_last_user_turn_and_round_trip():
    rec = PromptRecord(id="s", messages=[{"role": "system", "content": "Be terse."},
                                         {"role": "user", "content": "Name a prime."}])
    assert rec.prompt_text == "Name a prime."
    assert rec.as_messages()[0]["role"] == "system"
    assert PromptRecord.from_dict(rec.to_dict()) == rec
    assert PromptRecord(id="t", text="hi").as_messages() == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="unknown prompt record fields"):
        PromptRecord.from_dict({**rec.to_dict(), "colour": "red"})
