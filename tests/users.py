"""What a user does with the installed package, checked from outside the repository: the
engine environments install the project as a built wheel (noxfile.engine_python), so these
checks see exactly what ``pip install convgpt-*.whl`` gives."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_python_snippet() -> str:
    """README's Python block that loads a checkpoint with transformers' Auto classes."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if "AutoModelForCausalLM" in b)


def run(args: list[str], cwd: Path) -> str:
    """Run a command of the environment as a user would: from ``cwd``, without the test
    suite's PYTHONPATH; returns stdout, failing with its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"`{' '.join(map(str, args))}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def assert_wheel_works_as_a_user_would(tmp_path: Path) -> None:
    """The installed package is a wheel (not this source tree), its CLI makes and inspects a
    checkpoint, and README's transformers snippet loads that checkpoint in a fresh interpreter."""
    import convgpt
    import convgpt_core

    for module in (convgpt, convgpt_core):
        path = Path(module.__file__).resolve()
        assert ROOT / "src" not in path.parents, f"{module.__name__} is imported from the source tree: {path}"
    script = Path(sys.executable).with_name("convgpt")
    assert run([str(script), "--version"], tmp_path).split()[-1] == convgpt.__version__
    ckpt = tmp_path / "ckpt"
    run([str(script), "make-tiny", str(ckpt)], tmp_path)
    report = run([str(script), "inspect", str(ckpt)], tmp_path)
    assert "valid ConvGPT checkpoint" in report, report
    code = readme_python_snippet().replace("path/to/checkpoint", str(ckpt))
    code += "\nprint(type(model).__name__, sum(p.numel() for p in model.parameters()))\n"
    out = run([sys.executable, "-c", code], tmp_path).split()
    assert out[0] == "ConvGPTForCausalLM" and int(out[1]) > 0, out
