"""Safety: no code from a model folder runs unless asked, no path reaches a shell.

(Pickle weights are refused and a malicious pickle as a checkpoint never runs: see
``tests/test_bad_inputs.py``, ``test_pickle_weights_only`` and the ``*_pickle_*`` cases.)
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

import layerfold
from layerfold.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--calib-samples", "4", "--seq-len", "16"]


def _payload(marker: Path) -> str:
    """Python that leaves ``marker`` behind when it is imported (and then behaves like llama)."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies a folder's code into its modules cache before importing it: the test's own."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def remote_code_model(tmp_path, tiny_model_dir, modules_cache):
    """The tiny llama, its config naming code in the folder (``auto_map``), as a hub repository would."""
    model = tmp_path / "remote"
    shutil.copytree(tiny_model_dir("llama"), model)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(_payload(marker))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


@pytest.mark.parametrize("command", ["analyze", "compress"])
def test_code_in_a_model_folder_runs_only_with_trust_remote_code(command, remote_code_model, text_file, tmp_path,
                                                                  capsys):
    model, marker = remote_code_model
    argv = {"analyze": ["analyze", str(model), "--calib", text_file, *SMALL],
            "compress": ["compress", str(model), "--calib", text_file, *SMALL, "--remove", "2", "--no-heal",
                         "--no-eval", "-o", str(tmp_path / "out")]}[command]
    assert main(["-q", *argv]) == 0, capsys.readouterr().err
    assert not marker.exists()  # the stock llama code ran, not the folder's
    if command == "compress":
        shutil.rmtree(tmp_path / "out")
    main(["-q", *argv, "--trust-remote-code"])  # asked: the folder's code is imported
    assert marker.exists()


def test_a_shared_folders_own_code_never_runs_in_layerfold(tiny_model_dir, text_file, tmp_path, modules_cache, capsys):
    """A FoldGPT folder carries modeling_layerfold_shared.py for transformers' trust_remote_code;
    layerfold's own loader rebuilds the sharing from config.json and never imports that file."""
    out = tmp_path / "fold"
    assert main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2", "--group-size",
                 "2", "--calib", text_file, *SMALL, "--gate-steps", "2", "--cure-steps", "0", "--no-eval",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    code = out / "modeling_layerfold_shared.py"
    marker = tmp_path / "code-ran"
    code.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + code.read_text())
    assert main(["-q", "eval", str(out), "--ppl", text_file, "--ppl-window", "16", "--limit", "2", "--no-speed",
                 "--json", str(tmp_path / "e.json")]) == 0, capsys.readouterr().err
    assert main(["-q", "export", str(out), "-o", str(tmp_path / "unfolded")]) == 0, capsys.readouterr().err
    assert not marker.exists()
    from transformers import AutoModelForCausalLM  # the payload is live: stock transformers, when asked, runs it

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert marker.exists()


# -- no shell ------------------------------------------------------------------------------

_SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "execv"),
                ("os", "execvp"), ("os", "spawnl"), ("os", "spawnlp"), ("os", "posix_spawn")}


def _shell_uses(source: str) -> list[str]:
    """Every import of subprocess/pty, call of os.system-like functions, ``shell=True``, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in ("subprocess", "pty", "commands")]
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in _SHELL_CALLS:
                found.append(f"{f.value.id}.{f.attr}()")
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                found.append(f"{f.id}()")
            found += ["shell=True" for k in node.keywords
                      if k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value]
    return found


def test_the_library_never_starts_a_shell_or_a_program():
    package = Path(layerfold.__file__).parent
    uses = {str(p.relative_to(package)): _shell_uses(p.read_text(encoding="utf-8"))
            for p in sorted(package.rglob("*.py"))}
    assert len(uses) > 40
    assert {name: u for name, u in uses.items() if u} == {}


def test_the_scan_sees_shell_uses():
    src = "import subprocess\nimport os\nos.system('x')\nsubprocess.run('x', shell=True)\neval('1')\n"
    assert _shell_uses(src) == ["import subprocess", "os.system()", "shell=True", "eval()"]


def test_paths_with_shell_syntax_are_only_paths(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    """Model, data and output paths full of shell syntax are used as names, never interpreted."""
    monkeypatch.chdir(tmp_path)
    weird = "m; touch pwned1 && $(touch pwned2) `touch pwned3` 'q\" |x"
    model = tmp_path / f"model {weird}"
    shutil.copytree(tiny_model_dir("llama"), model)
    calib = tmp_path / "calib $(touch pwned4).txt"
    shutil.copy(text_file, calib)
    out = tmp_path / f"out {weird}"
    assert main(["-q", "compress", str(model), "--calib", str(calib), *SMALL, "--remove", "2", "--no-heal",
                 "--no-eval", "-o", str(out)]) == 0, capsys.readouterr().err
    assert (out / "config.json").is_file()
    assert not [p.name for p in tmp_path.rglob("pwned*")]
    assert json.loads((out / "layerfold.json").read_text())["options"]["output"]["path"] == str(out)


def test_a_malicious_gate_checkpoint_never_runs(tiny_model_dir, text_file, tmp_path, capsys):
    """Gate training resumes from checkpoints too: a pickle that would run code is refused there as well."""
    import os
    import pickle

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ck" / "gates").mkdir(parents=True)
    with open(tmp_path / "ck" / "gates" / "gates-round1.pt", "wb") as f:
        pickle.dump({"step": Payload()}, f)
    code = main(["-q", "compress", tiny_model_dir("llama"), "--method", "foldgpt", "--remove", "2", "--calib",
                 text_file, *SMALL, "--gate-steps", "2", "--cure-steps", "0", "--no-eval", "--checkpoint-dir",
                 str(tmp_path / "ck"), "--resume", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "refused: not a checkpoint layerfold wrote" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o").exists()
