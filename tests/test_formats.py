"""Users' own data: chat messages, prompt/completion and plain text; every record is checked."""

import json
from pathlib import Path

import pytest

from edgelam.config import ConfigError, DataConfig
from edgelam.data.build import build_federated_data
from edgelam.data.format import IGNORE, Encoded, encode, prompt_ids
from edgelam.data.sources import DataError, Example, load_file

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}]}
ALPACA = {"instruction": "Add", "input": "2 and 2", "output": "4"}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _labelled(tok, enc: Encoded) -> list[str]:
    """The decoded runs of tokens that carry loss (each label is its own input token)."""
    runs, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs, cur = runs + [tok.decode(cur)], []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("row, expected", [
    (CHAT, Example("2+2?", "", "4", "chat", turns=(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"),
                                                   ("user", "2+2?"), ("assistant", "4")))),
    ({"prompt": "Capital of France?", "completion": "Paris"}, Example("Capital of France?", "", "Paris", "completion")),
    ({"text": "Once upon a time."}, Example("", "", "Once upon a time.", "text", plain=True)),
])
def test_user_formats_are_detected(tmp_path: Path, row, expected):
    assert load_file(_jsonl(tmp_path / "x.jsonl", [row, row])) == [expected, expected]
    (tmp_path / "x.json").write_text(json.dumps([row]))
    assert load_file(tmp_path / "x.json") == [expected]


def test_two_turn_chat_has_loss_on_both_assistant_turns_only(tiny, tmp_path: Path):
    tok = tiny.tokenizer
    ex = load_file(_jsonl(tmp_path / "chat.jsonl", [CHAT]))[0]
    enc = encode(ex, tok, 256)
    assert tok.decode(list(enc.input_ids)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    # byte tokens: 'Hello' 5 + <|im_end|> + '\n' = 7, then '4' + <|im_end|> + '\n' = 3
    assert _labelled(tok, enc) == ["Hello<|im_end|>\n", "4<|im_end|>\n"]
    assert sum(lab != IGNORE for lab in enc.labels) == 10
    # generation sees the whole history and the last assistant header, not the last answer
    assert tok.decode(prompt_ids(tok, ex)).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_long_chat_keeps_its_last_answer(tiny):
    ex = Example("x", "", "4", "chat", turns=(("user", "y" * 300), ("assistant", "Hello"), ("user", "2+2?"), ("assistant", "4")))
    enc = encode(ex, tiny.tokenizer, 64)
    assert len(enc.input_ids) == 64  # the middle of the prompt (with the first answer) is cut
    assert _labelled(tiny.tokenizer, enc) == ["4<|im_end|>\n"]


def test_prompt_completion_reads_like_an_instruction_record(tiny, tmp_path: Path):
    tok = tiny.tokenizer
    ex = load_file(_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Capital of France?", "completion": "Paris"}]))[0]
    enc = encode(ex, tok, 128)
    ref = encode(Example("Capital of France?", "", "Paris", "finance"), tok, 128)  # the fingpt format's encoding
    assert (enc.input_ids, enc.labels) == (ref.input_ids, ref.labels)
    assert _labelled(tok, enc) == ["Paris<|im_end|>\n"]


def test_plain_text_has_loss_on_every_token(tiny, tmp_path: Path):
    tok = tiny.tokenizer
    ex = load_file(_jsonl(tmp_path / "notes.jsonl", [{"text": "Once upon a time."}]))[0]
    enc = encode(ex, tok, 128)
    assert enc.labels == enc.input_ids and tok.decode(list(enc.input_ids)) == "Once upon a time.<|im_end|>"  # + EOS
    assert tok.decode(prompt_ids(tok, ex)) == "Once upo"  # the first 17 // 2 bytes
    assert len(encode(Example("", "", "z" * 300, "t", plain=True), tok, 64).input_ids) == 64


def test_every_record_is_checked_against_the_format(tmp_path: Path):  # probe C17
    rows = [ALPACA] + [{"foo": k, "bar": k} for k in range(39)]
    with pytest.raises(DataError, match=r"x.jsonl line 2: keys \['bar', 'foo'\] do not fit format 'alpaca' \(detected "
                                        r"from the first record\), which expects \['instruction', 'input', 'output'\]"):
        load_file(_jsonl(tmp_path / "x.jsonl", rows))
    (tmp_path / "x.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"x.json record 2: keys \['bar', 'foo'\]"):
        load_file(tmp_path / "x.json")
    with pytest.raises(DataError, match=r"line 1: keys \['input', 'instruction', 'output'\] do not fit format 'gsm8k' "
                                        r"\(set by data.format\)"):
        load_file(tmp_path / "x.jsonl", "gsm8k")


def test_corrupt_jsonl_line_is_named_by_its_number(tmp_path: Path):  # probe C16
    lines = [json.dumps(ALPACA)] * 40
    lines[4] = ""  # a blank line still counts
    lines[20] = '{"instruction": "Add", "input": oops}'
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"x.jsonl line 21: not valid JSON \(Expecting value at column 33\)"):
        load_file(tmp_path / "x.jsonl")


@pytest.mark.parametrize("bad, error", [
    ({"messages": CHAT["messages"][:4]}, r"end with an assistant message.*got roles \['system', 'user', 'assistant', 'user'\]"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, r"start with a user message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]}, r"message 2 must be \{\"role\""),
    ({"messages": [{"role": "user", "content": ["a", "b"]}]}, r"message 1 must be"),
    ({"messages": "Hi"}, r"'messages' must be a non-empty list"),
])
def test_chat_records_are_validated(tmp_path: Path, bad, error):
    with pytest.raises(DataError, match=r"x.jsonl line 2: .*" + error):
        load_file(_jsonl(tmp_path / "x.jsonl", [CHAT, bad]))


def test_a_chat_in_prompt_completion_points_to_messages(tmp_path: Path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": [{"role": "user", "content": "a"}], "completion": "b"}]
    with pytest.raises(DataError, match=r"line 2: 'prompt' must be text, got a JSON list; a chat goes in the 'messages' format"):
        load_file(_jsonl(tmp_path / "x.jsonl", rows))


def test_empty_answers_are_skipped_and_counted(tiny, tmp_path: Path):
    rows = [dict(ALPACA, input=f"{k} and {k}", output=str(2 * k)) for k in range(12)]
    rows[2]["output"], rows[6]["output"] = "", "  "
    path = _jsonl(tmp_path / "add.jsonl", rows)
    cfg = DataConfig(source="files", files=(str(path),), num_clients=2, global_eval_per_task=2, heldout_fraction=0.0)
    data = build_federated_data(cfg, tiny.tokenizer, seed=0)
    assert sum(len(c.train) for c in data.clients) + len(data.global_eval["add"]) == 10
    assert data.description.endswith(f"; 2 records with an empty answer skipped ({path} line 3, {path} line 7)")
    blank_chat = Example("Hi", "", "", "chat", turns=(("user", "Hi"), ("assistant", " ")))
    assert blank_chat.is_empty and not Example("", "", "x", "t", plain=True).is_empty


def test_build_from_the_three_user_formats(tiny, tmp_path: Path):
    files = (
        _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"{k}?"},
                                                       {"role": "assistant", "content": str(k)}]} for k in range(6)]),
        _jsonl(tmp_path / "qa.jsonl", [{"prompt": f"{k}+1?", "completion": str(k + 1)} for k in range(6)]),
        _jsonl(tmp_path / "notes.jsonl", [{"text": f"note number {k}"} for k in range(6)]),
    )
    cfg = DataConfig(source="files", files=tuple(map(str, files)), num_clients=2, global_eval_per_task=1, heldout_fraction=0.0)
    data = build_federated_data(cfg, tiny.tokenizer, seed=0)
    assert sorted(data.global_eval) == ["chat", "notes", "qa"]
    assert sum(len(c.train) for c in data.clients) == 15
    notes = [e for c in data.clients for e in c.train if e.task == "notes"]
    assert notes and all(e.labels == e.input_ids for e in notes)


def test_too_few_examples_for_a_dirichlet_split_is_a_data_error(tiny):  # probe C19
    cfg = DataConfig(source="synthetic", tasks=("arithmetic",), examples_per_task=1, num_clients=10, partition="dirichlet")
    with pytest.raises(DataError, match=r"1 examples cannot give 10 clients 1 each; lower data.num_clients"):
        build_federated_data(cfg, tiny.tokenizer, seed=0)


def test_hf_source_fails_at_once_with_one_line_offline(tiny, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"needs the `datasets` package|could not load Hugging Face dataset 'no-such/set'"):
        build_federated_data(DataConfig(source="hf", hf_name="no-such/set"), tiny.tokenizer, seed=0)


def test_format_names_in_the_config():
    assert DataConfig(format="messages").format == "messages"
    with pytest.raises(ConfigError, match="prompt_completion"):
        DataConfig(format="chatml")
