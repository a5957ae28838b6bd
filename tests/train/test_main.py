"""`dialogue train` argument handling: errors are clear, dialogues come through the caller."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dialogue.document import Dialogue, Kind, Message
from dialogue.train.main import dialogues_from_jsonl, dialogues_to_jsonl, parse_mix, train_main


def test_help_and_usage_errors(capsys):
    assert train_main(["--help"]) == 0
    assert "--data-dialogues" in capsys.readouterr().out
    assert train_main(["--method", "ia3"]) == 2
    assert train_main([]) == 1
    assert "nothing to train on" in capsys.readouterr().err
    assert train_main(["--data-dialogues", "x"]) == 1
    assert "needs the dialogue store" in capsys.readouterr().err
    assert train_main(["--docs", "/no/such/dir"]) == 1
    assert "not found" in capsys.readouterr().err
    assert train_main(["--docs", ".", "--mix", "docs"]) == 1
    assert "bad --mix" in capsys.readouterr().err
    assert train_main(["--data-dialogues", "x"], load_dialogues=lambda names: []) == 1
    assert "no dialogues found" in capsys.readouterr().err


def test_checkpointing_is_chosen_unless_told_either_way():
    from dialogue.train.main import build_parser
    p = build_parser()
    assert p.parse_args([]).gradient_checkpointing is None  # the trainer chooses
    for on in ("--checkpointing", "--gradient-checkpointing"):
        assert p.parse_args([on]).gradient_checkpointing is True
    for off in ("--no-checkpointing", "--no-gradient-checkpointing"):
        assert p.parse_args([off]).gradient_checkpointing is False


def test_importing_the_package_does_not_import_torch():
    code = "import sys, dialogue.train, dialogue.train.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_parse_mix():
    mix = parse_mix(["docs=0.75:0.25", "dialogues=0.25:0.75", "code=0.5"])
    assert mix(0.5) == pytest.approx({"docs": 0.5, "dialogues": 0.5, "code": 0.5})
    assert mix(1.0)["docs"] == pytest.approx(0.25)
    assert parse_mix(None) is None
    with pytest.raises(ValueError):
        parse_mix(["docs=a:b"])


def test_dialogues_jsonl_round_trip(tmp_path):
    d = Dialogue(name="d1", system="sys", messages=[
        Message(kind=Kind.prompt, source="q", response="a", hidden=True),
        Message(kind=Kind.code, source="1+1", outputs=[{"output_type": "stream", "text": "2"}])])
    dialogues_to_jsonl([d], tmp_path / "d.jsonl")
    back = dialogues_from_jsonl(tmp_path / "d.jsonl")[0]
    assert back.name == "d1" and back.system == "sys" and back.id == d.id
    assert [m.to_dict() for m in back.messages] == [m.to_dict() for m in d.messages]
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="not a dialogue"):
        dialogues_from_jsonl(tmp_path / "bad.jsonl")


def test_a_run_ends_with_its_curves_and_plot_and_is_listed(tiny_chat, tmp_path, monkeypatch, capsys):
    """`dialogue train` prints the loss and learning rate as sparklines with their values and the
    labelled plot's path; the run is recorded for the web's training page while it trains."""
    import xml.etree.ElementTree as ET

    from dialogue.service import DialogueService
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    out = tmp_path / "run-a"
    assert train_main(["--model", str(tiny_chat / "model"), "--quant", "none", "--docs", str(tiny_chat / "docs.md"),
                       "--seq-len", "32", "--steps", "4", "--lr", "1e-2", "--r", "2", "--no-progress",
                       "--no-export", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    loss = next(x for x in printed if x.strip().startswith("loss "))
    assert "->" in loss and "smoothed" in loss and any(c in loss for c in "▁▂▃▄▅▆▇█")
    assert any(x.strip().startswith("lr ") and "peak " in x and ", last " in x for x in printed)
    assert f"plot: {out / 'training.svg'}" in printed
    # 32-token sequences of a tiny model: the default leaves checkpointing off, and says why
    assert any(x.startswith("gradient checkpointing: off (auto: ~") and "under the model's" in x for x in printed)
    root = ET.fromstring((out / "training.svg").read_text())
    assert "step (of 4)" in ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    [run] = DialogueService.training_runs()
    assert run.path == str(out.resolve()) and run.steps == 4 and run.last_loss is not None
