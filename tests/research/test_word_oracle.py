"""research/word_oracle.py: the prompter's invariants and one short run end to end."""

import json

import pytest
import torch


def load_tool():
    from research import word_oracle

    return word_oracle


def test_vocabulary_pads_and_normalises():
    vocab = load_tool().Vocabulary()
    ids = vocab.ids(["Please segment the red circle.", "the circle"])
    assert ids.shape == (2, 3)  # wrapper and punctuation stripped: "the red circle" / "the circle" + pad
    assert ids[0].tolist() == [1, 2, 3] and ids[1].tolist() == [1, 3, 0]


def test_prompter_shape_and_padding_invariance():
    torch.manual_seed(0)
    prompter = load_tool().WordPrompter(vocab_size=10, dim=8, prompt_dim=16, prompt_tokens=2)
    out = prompter(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 2, 16)
    # an expression's prompt must not depend on how much padding its batch adds
    batch = prompter(torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]))
    assert torch.allclose(batch[0], out[0], atol=1e-6)
    assert not torch.allclose(batch[1], out[0])  # and different words give a different prompt


def test_prompt_gain_scales_the_initial_prompt():
    tool = load_tool()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    torch.manual_seed(0)
    base = tool.WordPrompter(vocab_size=10, dim=8, prompt_dim=16, prompt_tokens=1)(ids)
    torch.manual_seed(0)
    scaled = tool.WordPrompter(vocab_size=10, dim=8, prompt_dim=16, prompt_tokens=1, gain=30.0)(ids)
    assert torch.allclose(scaled, 30.0 * base, atol=1e-5)


def test_expression_kind():
    kind = load_tool().expression_kind
    assert kind("the red circle") == "attr"
    assert kind("Please segment the blue square on the left.") == "position"
    assert kind("the largest object") == "size"
    assert kind("the circle left of the red square") == "relation"
    assert kind("a cat on a sofa") == "other"


def test_short_run_writes_result(synthetic_root, tmp_path):
    out = tmp_path / "oracle.json"
    assert load_tool().main(["--data", str(synthetic_root), "--steps", "3", "--batch", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    from lens.data.refer import load_refer

    held = sum(len(load_refer(synthetic_root, "refcoco", s)) for s in ("val", "testA", "testB"))
    assert result["n"] == held > 0
    assert 0.0 <= result["giou"] <= 1.0 and 0.0 <= result["ciou"] <= 1.0
    assert result["steps"] == 3 and result["prompt_tokens"] == 1 and result["prompt_gain"] == 1.0
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0 and result["final_loss"] > 0
    by_kind = result["mean_iou_by_kind"]
    assert sum(v["n"] for v in by_kind.values()) == held and set(by_kind) <= {"attr", "position", "size", "relation"}


def test_bad_arguments_name_the_problem(synthetic_root):
    tool = load_tool()
    with pytest.raises(SystemExit, match="--batch 100000 needs"):
        tool.main(["--data", str(synthetic_root), "--batch", "100000", "--steps", "1"])
    with pytest.raises(SystemExit):  # argparse error: exit status 2
        tool.main(["--data", str(synthetic_root), "--steps", "0"])
    with pytest.raises(SystemExit):
        tool.main(["--data", str(synthetic_root), "--prompt-gain", "0"])
