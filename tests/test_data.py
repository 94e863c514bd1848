import json

import pytest

from gotr1.data import PromptStream, read_prompts


def test_read_prompts_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two cats  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red circle", "two cats"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a dog", "category": "x"}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a dog"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_prompts(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def test_stream_is_seeded_covers_each_epoch_and_resumes():
    prompts = [f"p{i}" for i in range(7)]
    s = PromptStream(prompts, seed=3)
    first = s.take(7)
    assert sorted(first) == prompts
    second = s.take(7)
    assert sorted(second) == prompts and second != first
    a = PromptStream(prompts, seed=3)
    a.take(5)
    b = PromptStream(prompts, seed=3)
    b.load_state(a.state())
    assert a.take(10) == b.take(10)
    with pytest.raises(ValueError, match="empty"):
        PromptStream([])
