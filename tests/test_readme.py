"""The README stays true: its Python example runs, and its first lines are the two set-up commands."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "out/dora/adapter_model.safetensors").is_file()


def test_readme_opens_with_the_two_setup_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```bash") + 3]
    assert block[0].endswith("peftlab compare")
    assert block[1].endswith("python -m pytest -q")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pytest" in ci and "README.md" in ci
