import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Usage\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    stats = namespace["out"].router_stats[0].tokens_per_expert
    assert (stats == stats[:, :1]).all()  # expert choice: every expert takes the same number of tokens
    assert (tmp_path / "my-model" / "modeling_diffusion_moe.py").is_file()
